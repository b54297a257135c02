# cython: language_level=3
"""C side of the compiled codec: csrc/usbip_wire.h declared for Cython, and the few
helpers that need the C API (buffer protocol, bytearray internals).

Only ``cimport``-ed by ``usbip/protocol/codec.py`` when Cython compiles it as
``usbip.protocol._codec`` (every function here is inline: no module of its own).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove


cdef extern from "Python.h":
    ctypedef struct PyByteArrayObject:
        Py_ssize_t ob_exports


cdef extern from "usbip_wire.h":
    uint32_t usbip_get_be32(const unsigned char *p)
    void usbip_unpack_words(const unsigned char *p, uint32_t *w)
    void usbip_pack_words(unsigned char *p, const uint32_t *w, const unsigned char *setup)
    void usbip_iso_put(unsigned char *p, uint32_t offset, uint32_t length, uint32_t actual, int32_t status)
    int usbip_iso_first_bad(const unsigned char *d, int n, uint64_t buflen)
    uint64_t usbip_iso_total(const unsigned char *d, int n)
    int usbip_iso_errors(const unsigned char *d, int n)
    int64_t usbip_iso_gather(const unsigned char *src, uint64_t srclen, unsigned char *dst, uint64_t dstlen,
                             const unsigned char *d, int n)
    int usbip_iso_spread(unsigned char *buf, uint64_t buflen, uint64_t actual, const unsigned char *d, int n)
    uint64_t usbip_iso_total_length(const unsigned char *d, int n)
    uint64_t usbip_iso_set_results(unsigned char *d, int n, uint64_t buflen, uint32_t max_packet, int clamp,
                                   int32_t overflow)
    int usbip_iso_fill(unsigned char *buf, uint64_t buflen, const unsigned char *src, uint64_t srclen,
                       const unsigned char *d, int n)
    int usbip_iso_mismatches(const unsigned char *buf, uint64_t buflen, const unsigned char *pat, uint64_t patlen,
                             const unsigned char *d, int n)
    int64_t usbip_iso_contiguous(const unsigned char *d, int n)


cdef inline unsigned char *ba_ptr(bytearray b):
    return <unsigned char *>PyByteArray_AS_STRING(b)


cdef inline bytearray ba_new(Py_ssize_t size):
    """A new bytearray of ``size`` bytes left uninitialised (the caller writes every byte):
    one C call where ``bytearray(size)`` is a Python call of the type plus a memset."""
    return PyByteArray_FromStringAndSize(NULL, size)


cdef inline bint ba_exported(bytearray b):
    """True while a memoryview (a payload handed out) holds the bytearray's memory."""
    return (<PyByteArrayObject *>b).ob_exports != 0


cdef inline bytearray copy_out(object buf, Py_ssize_t offset, Py_ssize_t size):
    """A new bytearray of ``buf[offset:offset+size]`` (one memcpy); None if the buffer is shorter.

    The caller has checked ``offset >= 0`` and ``size >= 0``.
    """
    cdef Py_buffer view
    cdef const char *p
    cdef Py_ssize_t n
    if type(buf) is bytearray:  # fast paths: no Py_buffer round trip
        p = PyByteArray_AS_STRING(buf)
        n = PyByteArray_GET_SIZE(buf)
    elif type(buf) is bytes:
        p = PyBytes_AS_STRING(buf)
        n = PyBytes_GET_SIZE(buf)
    else:
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            if view.len - offset < size:
                return None
            return PyByteArray_FromStringAndSize(<const char *>view.buf + offset, size)
        finally:
            PyBuffer_Release(&view)
    if n - offset < size:
        return None
    return PyByteArray_FromStringAndSize(p + offset, size)


cdef inline void ba_put(bytearray dst, Py_ssize_t offset, bytearray src) noexcept:
    """``dst[offset:offset+len(src)] = src`` as a memmove (the caller has checked that it fits)."""
    memmove(PyByteArray_AS_STRING(dst) + offset, PyByteArray_AS_STRING(src), PyByteArray_GET_SIZE(src))


cdef inline object read_header(object buf, Py_ssize_t offset, uint32_t *w):
    """Header words at buf[offset:] into w; return the setup packet (bytes) for CMD_SUBMIT, else None.

    The caller has checked that 48 bytes are there.
    """
    cdef Py_buffer view
    cdef const unsigned char *p
    if type(buf) is bytearray:  # fast paths: no Py_buffer round trip
        p = <const unsigned char *>PyByteArray_AS_STRING(buf) + offset
    elif type(buf) is bytes:
        p = <const unsigned char *>PyBytes_AS_STRING(buf) + offset
    else:
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            if offset < 0 or view.len - offset < 48:
                raise ValueError(f"buffer too small: need 48 bytes at offset {offset}")
            usbip_unpack_words(<const unsigned char *>view.buf + offset, w)
            return PyBytes_FromStringAndSize(<const char *>view.buf + offset + 40, 8) if w[0] == 1 else None
        finally:
            PyBuffer_Release(&view)
    usbip_unpack_words(p, w)
    return PyBytes_FromStringAndSize(<const char *>p + 40, 8) if w[0] == 1 else None


cdef inline Py_ssize_t write_header(object buf, Py_ssize_t offset, const uint32_t *w, bytes setup) except -1:
    """Header words w (and setup, or zeros) at buf[offset:offset+48]; return the end offset."""
    cdef Py_buffer view
    cdef const unsigned char *s = NULL if setup is None else <const unsigned char *>PyBytes_AS_STRING(setup)
    if type(buf) is bytearray:
        if offset < 0 or PyByteArray_GET_SIZE(buf) - offset < 48:
            raise ValueError(f"buffer too small: need 48 bytes at offset {offset}")
        usbip_pack_words(<unsigned char *>PyByteArray_AS_STRING(buf) + offset, w, s)
        return offset + 48
    PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
    try:
        if offset < 0 or view.len - offset < 48:
            raise ValueError(f"buffer too small: need 48 bytes at offset {offset}")
        usbip_pack_words(<unsigned char *>view.buf + offset, w, s)
    finally:
        PyBuffer_Release(&view)
    return offset + 48


cdef inline int64_t iso_gather(object src, object dst, const unsigned char *d, int n) except -2:
    cdef Py_buffer s, t
    cdef int64_t r
    PyObject_GetBuffer(src, &s, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(dst, &t, PyBUF_WRITABLE)
        try:
            r = usbip_iso_gather(<const unsigned char *>s.buf, s.len, <unsigned char *>t.buf, t.len, d, n)
        finally:
            PyBuffer_Release(&t)
    finally:
        PyBuffer_Release(&s)
    return r


cdef inline int iso_fill(object buf, object src, const unsigned char *d, int n) except -2:
    """-1 if a packet does not fit the buffer or is longer than ``src``; 0 done."""
    cdef Py_buffer b, s
    cdef int r
    PyObject_GetBuffer(buf, &b, PyBUF_WRITABLE)
    try:
        PyObject_GetBuffer(src, &s, PyBUF_SIMPLE)
        try:
            r = usbip_iso_fill(<unsigned char *>b.buf, b.len, <const unsigned char *>s.buf, s.len, d, n)
        finally:
            PyBuffer_Release(&s)
    finally:
        PyBuffer_Release(&b)
    return r


cdef inline int iso_mismatches(object buf, object pat, const unsigned char *d, int n) except -1:
    cdef Py_buffer b, p
    cdef int r
    PyObject_GetBuffer(buf, &b, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(pat, &p, PyBUF_SIMPLE)
        try:
            r = usbip_iso_mismatches(<const unsigned char *>b.buf, b.len, <const unsigned char *>p.buf, p.len, d, n)
        finally:
            PyBuffer_Release(&p)
    finally:
        PyBuffer_Release(&b)
    return r


cdef inline int iso_spread(object buf, uint64_t actual, const unsigned char *d, int n) except -2:
    """-1: data larger than the buffer, -2 never (errors raise), -3 a packet outside; 0 done."""
    cdef Py_buffer v
    PyObject_GetBuffer(buf, &v, PyBUF_WRITABLE)
    try:
        if actual > <uint64_t>v.len:
            return -1
        if usbip_iso_spread(<unsigned char *>v.buf, v.len, actual, d, n) < 0:
            return -3
        return 0
    finally:
        PyBuffer_Release(&v)


cdef inline Py_ssize_t buf_len(object buf) except -1:
    """Length in bytes of any buffer."""
    cdef Py_buffer v
    PyObject_GetBuffer(buf, &v, PyBUF_SIMPLE)
    cdef Py_ssize_t n = v.len
    PyBuffer_Release(&v)
    return n
