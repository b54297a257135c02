# cython: language_level=3
"""C declarations of the compiled buffer pool (``_buffers.pyx``), for modules that ``cimport`` it:
the compiled URB session calls ``acquire`` / ``release`` as C methods when it holds this pool."""


cdef class PoolBuffer:
    cdef char *data
    cdef Py_ssize_t size
    cdef readonly Py_ssize_t capacity
    cdef int exports
    cdef bint released
    cdef Py_ssize_t dirty  # bytes from the start that may be non-zero (a writable view was taken)
    cdef BufferPool pool


cdef class BufferPool:
    cdef dict _free
    cdef readonly Py_ssize_t max_pooled
    cdef readonly int max_free
    cdef readonly Py_ssize_t outstanding
    cdef readonly Py_ssize_t max_cached_bytes
    cdef readonly Py_ssize_t cached_bytes

    cpdef PoolBuffer acquire(self, Py_ssize_t size)
    cpdef object view(self, object buf, Py_ssize_t n)
    cpdef release(self, PoolBuffer buf)
    cpdef abandon(self, PoolBuffer buf)
    cdef _recycle(self, PoolBuffer buf)
