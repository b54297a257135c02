"""The URB buffer pool: compiled ``_buffers`` unless missing or USBIP_NO_EXTENSIONS=1."""

from __future__ import annotations

from .._env import FORCED_PURE, warn_fallback

if FORCED_PURE:
    from .buffers import IMPLEMENTATION, BufferPool, PoolBuffer
else:
    try:
        from ._buffers import IMPLEMENTATION, BufferPool, PoolBuffer
    except ImportError as exc:  # pragma: no cover - depends on the build
        warn_fallback(exc)
        from .buffers import IMPLEMENTATION, BufferPool, PoolBuffer

__all__ = ["IMPLEMENTATION", "BufferPool", "PoolBuffer"]
