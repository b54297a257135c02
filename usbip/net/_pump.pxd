# cython: language_level=3
"""C declarations that Cython adds to ``pump.py`` when it compiles it as ``usbip.net._pump``.

Cython's pure Python mode, as for the codec (``usbip/protocol/_codec.pxd``): the logic lives in
``pump.py`` only; this file makes :class:`Stream` a C class with C counters and flags and its
per-read / per-write methods C calls. The attributes others read or set stay ``public``.
"""

cimport cython

cdef Py_ssize_t IOV_MAX, TLS_DIRECT_WRITE, TLS_OUT_CHUNK, ADMIT_THRESHOLD
cdef int READS_PER_WAKEUP, PAUSED_OUTPUT, PAUSED_CONSUMER, PAUSED_ADMIT


cdef class Stream:
    cdef public object sock, decoder, on_messages, on_close, loop
    cdef public int _fd
    cdef public list _out
    cdef public Py_ssize_t _out_pos, _out_bytes
    cdef public bint _writer, _reading, _started
    cdef public int _paused
    cdef public object high_water
    cdef public Py_ssize_t low_water
    cdef public object stall_timeout, on_drain, admit
    cdef public bint _admitted
    cdef public object tls
    cdef public list _plain
    cdef public Py_ssize_t _plain_bytes
    cdef public bytearray _raw
    cdef public object _stall_timer, _hangup_timer
    cdef public double _last_progress
    cdef public bint _flush_scheduled, _in_read, closed
    cdef public long long bytes_in, bytes_out

    cpdef start(self)
    cpdef pause_reading(self)
    cpdef resume_reading(self)
    @cython.locals(want=bint)
    cdef _update_reading(self)
    @cython.locals(want=Py_ssize_t, n=Py_ssize_t)
    cpdef _on_readable(self)
    @cython.locals(n=Py_ssize_t)
    cdef _on_readable_tls(self)
    @cython.locals(n=Py_ssize_t)
    cdef bint _decrypt(self) except -1
    @cython.locals(need=Py_ssize_t)
    cdef bint _admit_body(self) except -1
    cpdef readmit(self)
    cpdef write(self, list buffers, Py_ssize_t nbytes)
    cpdef _scheduled_flush(self)
    cpdef flush(self)
    @cython.locals(nbytes=Py_ssize_t, produced=Py_ssize_t, plain=list, run=list)
    cdef _encrypt(self)
    @cython.locals(out=list, progress=bint, end=Py_ssize_t, sent=Py_ssize_t, pos=Py_ssize_t, size=Py_ssize_t)
    cpdef _send(self)
    cdef _stop(self)
    cpdef Py_ssize_t queued_bytes(self)
    cpdef close(self, exc=*)
