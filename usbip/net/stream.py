"""The socket pump of the URB phase (:class:`Stream`): compiled or pure.

The logic lives in ``pump.py``, which runs as it is (the fallback) and which Cython compiles,
augmented by ``_pump.pxd``, into ``usbip.net._pump``. The compiled module serves unless it is
missing or ``USBIP_NO_EXTENSIONS=1`` is set.
"""

from __future__ import annotations

from .._env import FORCED_PURE, warn_fallback

if FORCED_PURE:
    from .pump import IMPLEMENTATION, Stream, TlsSession
else:
    try:
        from ._pump import IMPLEMENTATION, Stream, TlsSession
    except ImportError as exc:  # pragma: no cover - depends on the build
        warn_fallback(exc)
        from .pump import IMPLEMENTATION, Stream, TlsSession

# the pump's tuning constants (READS_PER_WAKEUP, IOV_MAX, ...) live in pump.py; the compiled
# module keeps them as C constants, so they are read from there, not re-exported here
__all__ = ["IMPLEMENTATION", "Stream", "TlsSession"]
