"""cyusbip: USB/IP for Python (Linux kernel wire protocol 0x0111).

``async with usbip.connect(host) as conn`` lists and imports remote devices;
``usbip.Server`` / ``usbip.serve`` export devices; ``usbip.protocol`` is the codec.
Every exception cyusbip raises on purpose is a ``usbip.CyusbipError``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import CyusbipError
from .protocol import IMPLEMENTATION
from .protocol.errors import ProtocolError

if TYPE_CHECKING:
    from .client import connect
    from .server import Server, serve
    from .usb.device import Device, Urb

# imported on first use (PEP 562): the command-line tools start faster without the server or
# the client they do not use (each import is a 9p lookup in the kernel-test guest)
_LAZY = {"connect": ".client", "Device": ".usb.device", "Urb": ".usb.device", "Server": ".server", "serve": ".server"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IMPLEMENTATION",
    "CyusbipError",
    "Device",
    "ProtocolError",
    "Server",
    "Urb",
    "__version__",
    "connect",
    "serve",
]
