# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled URB buffer pool: reusable buffers with the buffer protocol.

Buffers are handed out zeroed (calloc, memset on reuse): a device that reports more
than it wrote can only ever send zeros, never bytes another URB or client left.
A :class:`PoolBuffer` exposes ``len(buf)`` writable bytes to ``recv_into``,
``writelines``/``sendmsg`` and libusb transfers without copies. ``pool.release(buf)``
returns it; the memory goes back to the pool only once no view of it is alive,
so a payload still referenced by a pending send is never overwritten.

Zeroing is skipped where the bytes are known to be zero: a buffer remembers how many of its
leading bytes may have been written (``dirty``: every writable view taken counts its whole
length; the read-only view of :meth:`BufferPool.view`, what a reply sends, does not), so a
buffer a device left as it came (gadget zero's pattern 0) is not zeroed again.
"""

from cpython.buffer cimport PyBuffer_FillInfo
from libc.stdlib cimport calloc, free
from libc.string cimport memset

IMPLEMENTATION = "cython"

DEF MIN_CLASS = 512


cdef inline _unexport(PoolBuffer buf):
    """A view of ``buf`` (its own, or a reply view's) is released: back to its pool once it is
    released and no view is left."""
    buf.exports -= 1
    if buf.exports == 0 and buf.released and buf.pool is not None:
        buf.pool._recycle(buf)


cdef class PoolBuffer:  # attributes: _buffers.pxd
    def __cinit__(self, Py_ssize_t capacity):
        self.data = <char *>calloc(capacity if capacity > 0 else 1, 1)
        if self.data == NULL:
            raise MemoryError()
        self.capacity = capacity
        self.size = capacity
        self.dirty = 0

    def __dealloc__(self):
        free(self.data)

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self.data, self.size, 0, flags)
        self.exports += 1
        if self.dirty < self.size:
            self.dirty = self.size  # whoever holds a view may write through it

    def __releasebuffer__(self, Py_buffer *view):
        _unexport(self)

    def __len__(self):
        return self.size

    @property
    def in_use(self):
        return not self.released

    def clear(self):
        """Zero the buffer (a memset of the bytes a view may have written since they were last zeroed)."""
        if self.dirty:
            memset(self.data, 0, self.dirty)
            if self.exports == 0:  # a live view may still write
                self.dirty = 0


cdef class _ReplyView:
    """A read-only window on the first ``n`` bytes of a PoolBuffer: held like a view of the buffer
    (it is not reused while this lives) but not counted as a write (``dirty`` stays)."""

    cdef PoolBuffer buf
    cdef Py_ssize_t n

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self.buf.data, self.n, 1, flags)  # BufferError if asked to write
        self.buf.exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        _unexport(self.buf)


cdef class BufferPool:
    """Buffers in power-of-two size classes; at most ``max_free`` kept per class and
    ``max_cached_bytes`` kept in all (attributes: _buffers.pxd)."""

    def __init__(self, Py_ssize_t max_pooled=4 * 1024 * 1024, int max_free=64,
                 Py_ssize_t max_cached_bytes=32 * 1024 * 1024):
        self._free = {}
        self.max_pooled = max_pooled
        self.max_free = max_free
        self.max_cached_bytes = max_cached_bytes
        self.cached_bytes = 0
        self.outstanding = 0

    cpdef PoolBuffer acquire(self, Py_ssize_t size):
        """A zeroed buffer of exactly ``size`` bytes."""
        cdef Py_ssize_t cap = MIN_CLASS
        cdef PoolBuffer buf
        cdef list free_list
        if size < 0:
            raise ValueError("negative buffer size")
        while cap < size:
            cap <<= 1
        free_list = self._free.get(cap)
        if free_list:
            buf = free_list.pop()
            self.cached_bytes -= cap
            if buf.dirty:  # recycled only once no view was left: nothing writes into it now
                memset(buf.data, 0, buf.dirty)
                buf.dirty = 0
        else:
            buf = PoolBuffer(cap)
        buf.size = size
        buf.released = False
        buf.pool = self
        self.outstanding += 1
        return buf

    cpdef object view(self, object buf, Py_ssize_t n):
        """The first ``n`` bytes of ``buf`` to send (``n`` <= its length): read-only for this
        pool's buffers, so that sending them does not count as writing them."""
        cdef _ReplyView rv
        if type(buf) is PoolBuffer and (<PoolBuffer>buf).pool is self and 0 <= n <= (<PoolBuffer>buf).size:
            rv = _ReplyView.__new__(_ReplyView)
            rv.buf = <PoolBuffer>buf
            rv.n = n
            return memoryview(rv)
        view = memoryview(buf)
        return view if n == len(view) else view[:n]

    cpdef release(self, PoolBuffer buf):
        """Give ``buf`` back; reused once the last view of it is released."""
        if buf.released or buf.pool is not self:
            return
        buf.released = True
        self.outstanding -= 1
        if buf.exports == 0:
            self._recycle(buf)

    cpdef abandon(self, PoolBuffer buf):
        """Give ``buf`` up for good: it counts as released but is never reused (a device may still
        write into it, e.g. a transfer the kernel has not finished when its session gave up)."""
        if buf.released or buf.pool is not self:
            return
        buf.released = True
        buf.pool = None
        self.outstanding -= 1

    cdef _recycle(self, PoolBuffer buf):
        cdef list free_list
        # buf.pool may hold the last reference to this pool (a view released after the
        # pool's owner let go): keep it alive until we are done with it
        cdef BufferPool keep = self
        buf.pool = None
        if self._free is None:  # the pool is being torn down (interpreter exit)
            return
        if buf.capacity > self.max_pooled:
            return
        if self.cached_bytes + buf.capacity > self.max_cached_bytes:
            return
        free_list = self._free.get(buf.capacity)
        if free_list is None:  # (not setdefault: no empty list made and dropped per buffer)
            free_list = self._free[buf.capacity] = []
        if len(free_list) < self.max_free:
            free_list.append(buf)
            self.cached_bytes += buf.capacity

    @property
    def cached(self):
        return sum(len(v) for v in self._free.values())
