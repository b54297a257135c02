"""Pure-Python twin of the URB buffer pool (``usbip.pool._buffers``); same API.

Buffers are bytearrays, handed out zeroed; a released buffer is reused only when no view of it is
alive (a bytearray with exports refuses to resize, which is the test used here).
"""

from __future__ import annotations

from typing import Any

IMPLEMENTATION = "python"
_MIN_CLASS = 512


class PoolBuffer(bytearray):
    """A bytearray of the requested size that remembers its pool state."""

    __slots__ = ("capacity", "pool", "released")
    capacity: int
    pool: BufferPool | None
    released: bool

    @property
    def in_use(self) -> bool:
        return not self.released

    def clear(self) -> None:
        self[:] = bytes(len(self))


class BufferPool:
    def __init__(
        self, max_pooled: int = 4 * 1024 * 1024, max_free: int = 64, max_cached_bytes: int = 32 * 1024 * 1024
    ) -> None:
        self._free: dict[int, list[PoolBuffer]] = {}
        self.max_pooled = max_pooled
        self.max_free = max_free
        self.max_cached_bytes = max_cached_bytes
        self.cached_bytes = 0
        self.outstanding = 0

    def acquire(self, size: int) -> PoolBuffer:
        if size < 0:
            raise ValueError("negative buffer size")
        cap = _MIN_CLASS
        while cap < size:
            cap <<= 1
        free_list = self._free.get(cap)
        if free_list:
            buf = free_list.pop()
            self.cached_bytes -= cap
            buf[:] = bytes(size)  # zeroed, like a fresh one: no bytes of an earlier URB
        else:
            buf = PoolBuffer(size)
            buf.capacity = cap
        buf.released = False
        buf.pool = self
        self.outstanding += 1
        return buf

    def view(self, buf: Any, n: int) -> memoryview:
        """The first ``n`` bytes of ``buf`` to send (the compiled pool's are read-only)."""
        view = memoryview(buf)
        return view if n == len(view) else view[:n]

    def release(self, buf: object) -> None:
        if not isinstance(buf, PoolBuffer) or buf.released or buf.pool is not self:
            return  # already released, or not from this pool
        buf.released = True
        buf.pool = None
        self.outstanding -= 1
        if buf.capacity > self.max_pooled:
            return
        try:  # resizing fails while any view of the buffer is alive
            buf.append(0)
            buf.pop()
        except BufferError:
            return
        if self.cached_bytes + buf.capacity > self.max_cached_bytes:
            return
        free_list = self._free.setdefault(buf.capacity, [])
        if len(free_list) < self.max_free:
            free_list.append(buf)
            self.cached_bytes += buf.capacity

    def abandon(self, buf: object) -> None:
        """Give ``buf`` up for good: it counts as released but is never reused (a device may
        still write into it)."""
        if not isinstance(buf, PoolBuffer) or buf.released or buf.pool is not self:
            return
        buf.released = True
        buf.pool = None
        self.outstanding -= 1

    @property
    def cached(self) -> int:
        return sum(len(v) for v in self._free.values())
