"""The USB/IP wire protocol, sans-I/O: constants, records, and the URB-phase codec.

``CmdSubmit``, ``Decoder``, ``IsoPackets``, ``pack_*`` and ``unpack_header`` come
from the compiled ``_codec`` extension unless it is missing or
``USBIP_NO_EXTENSIONS=1`` is set, in which case the pure-Python ``codec`` serves.
"""

from __future__ import annotations

from .._env import FORCED_PURE, warn_fallback
from .constants import *  # noqa: F403
from .errors import ProtocolError
from .records import DeviceRecord, InterfaceRecord, OpHeader

if FORCED_PURE:
    from . import codec
else:
    try:
        from . import _codec as codec  # type: ignore[no-redef]
    except ImportError as exc:  # pragma: no cover - depends on the build
        warn_fallback(exc)
        from . import codec

IMPLEMENTATION: str = codec.IMPLEMENTATION

CmdSubmit = codec.CmdSubmit
RetSubmit = codec.RetSubmit
CmdUnlink = codec.CmdUnlink
RetUnlink = codec.RetUnlink
IsoPackets = codec.IsoPackets
Decoder = codec.Decoder
pack_cmd_submit = codec.pack_cmd_submit
pack_ret_submit = codec.pack_ret_submit
pack_cmd_unlink = codec.pack_cmd_unlink
pack_ret_unlink = codec.pack_ret_unlink
unpack_header = codec.unpack_header
Urb = codec.Urb
urb_from_submit = codec.urb_from_submit
ret_submit_header = codec.ret_submit_header

__all__ = [
    "IMPLEMENTATION",
    "CmdSubmit",
    "CmdUnlink",
    "Decoder",
    "DeviceRecord",
    "InterfaceRecord",
    "IsoPackets",
    "OpHeader",
    "ProtocolError",
    "RetSubmit",
    "RetUnlink",
    "Urb",
    "pack_cmd_submit",
    "pack_cmd_unlink",
    "pack_ret_submit",
    "pack_ret_unlink",
    "ret_submit_header",
    "unpack_header",
    "urb_from_submit",
]
