"""The socket pump of the URB phase (:class:`Stream`): compiled or pure.

The logic lives in ``pump.py``, which runs as it is (the fallback) and which Cython compiles,
augmented by ``_pump.pxd``, into ``usbip.net._pump``. The compiled module serves unless it is
missing or ``USBIP_NO_EXTENSIONS=1`` is set.
"""

from __future__ import annotations

from .._env import FORCED_PURE, warn_fallback
from .pump import (  # the constants and the TLS protocol are the same in both
    ADMIT_THRESHOLD,
    HANGUP_CHECK_INTERVAL,
    IOV_MAX,
    PAUSED_ADMIT,
    PAUSED_CONSUMER,
    PAUSED_OUTPUT,
    READS_PER_WAKEUP,
    TLS_DIRECT_WRITE,
    TLS_OUT_CHUNK,
    TlsSession,
)

if FORCED_PURE:
    from .pump import IMPLEMENTATION, Stream
else:
    try:
        from ._pump import IMPLEMENTATION, Stream
    except ImportError as exc:  # pragma: no cover - depends on the build
        warn_fallback(exc)
        from .pump import IMPLEMENTATION, Stream

__all__ = [
    "ADMIT_THRESHOLD",
    "HANGUP_CHECK_INTERVAL",
    "IMPLEMENTATION",
    "IOV_MAX",
    "PAUSED_ADMIT",
    "PAUSED_CONSUMER",
    "PAUSED_OUTPUT",
    "READS_PER_WAKEUP",
    "TLS_DIRECT_WRITE",
    "TLS_OUT_CHUNK",
    "Stream",
    "TlsSession",
]
