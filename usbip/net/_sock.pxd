# cython: language_level=3
"""C side of the compiled socket pump: one ``sendmsg(2)`` of a run of queued buffers.

Only ``cimport``-ed by ``usbip/net/pump.py`` when Cython compiles it as ``usbip.net._pump``
(every function here is inline: no module of its own). ``socket.sendmsg`` parses every buffer of
the list through a format string and builds a tuple of arguments per call; here each buffer is
one ``PyObject_GetBuffer``. Same semantics: the views are held until the call returns, the
socket is non-blocking, SIGPIPE is ignored by Python, so no MSG_NOSIGNAL is needed.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.exc cimport PyErr_SetFromErrno
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.errno cimport EAGAIN, EINTR, errno
from posix.uio cimport iovec


cdef extern from "<errno.h>":
    int EWOULDBLOCK


cdef extern from "<sys/types.h>":
    ctypedef long ssize_t


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)


cdef inline Py_ssize_t send_buffers(int fd, list items, Py_ssize_t start, Py_ssize_t end) except -2:
    """``sendmsg`` of ``items[start:end]`` (objects with the buffer protocol) on the non-blocking
    socket ``fd``: the bytes sent, -1 if the socket would block (or the call was interrupted);
    raises OSError otherwise."""
    cdef Py_ssize_t n = end - start
    cdef Py_ssize_t i, got = 0
    cdef ssize_t sent
    cdef int err
    cdef msghdr msg
    cdef Py_buffer *views = <Py_buffer *>PyMem_Malloc(n * sizeof(Py_buffer))
    cdef iovec *iov = <iovec *>PyMem_Malloc(n * sizeof(iovec))
    if views == NULL or iov == NULL:
        PyMem_Free(views)
        PyMem_Free(iov)
        raise MemoryError()
    try:
        for i in range(n):
            PyObject_GetBuffer(items[start + i], &views[i], PyBUF_SIMPLE)
            got += 1
            iov[i].iov_base = views[i].buf
            iov[i].iov_len = <size_t>views[i].len
        msg.msg_name = NULL
        msg.msg_namelen = 0
        msg.msg_iov = iov
        msg.msg_iovlen = <size_t>n
        msg.msg_control = NULL
        msg.msg_controllen = 0
        msg.msg_flags = 0
        with nogil:
            sent = sendmsg(fd, &msg, 0)
        if sent < 0:
            err = errno
            if err == EAGAIN or err == EWOULDBLOCK or err == EINTR:
                return -1
            PyErr_SetFromErrno(OSError)
            return -2
        return sent
    finally:
        for i in range(got):
            PyBuffer_Release(&views[i])
        PyMem_Free(views)
        PyMem_Free(iov)
