# cython: language_level=3
"""C declarations that Cython adds to ``urbsession.py`` when it compiles it as ``usbip.server._urbsession``.

Cython's pure Python mode, as for the codec (``usbip/protocol/_codec.pxd``): the logic lives in
``urbsession.py`` only; this file makes :class:`UrbSession` a C class with C attributes, its
per-URB methods C calls, and reaches the codec's ``Urb`` / ``CmdSubmit`` fields as C fields.
Every attribute stays visible from Python (``public``): tests, metrics and captures read them.
"""

cimport cython
from libc.stdint cimport int32_t, int64_t, uint32_t

from usbip.protocol cimport _codec
# the codec's hot functions as C calls (these cimports take over the names urbsession.py imports)
from usbip.protocol._codec cimport CmdSubmit, pack_ret_unlink, ret_submit_header, urb_from_submit
from usbip.pool._buffers cimport BufferPool as _CPool
from usbip.net._pump cimport Stream as _CStream

# numbers imported from constants.py / usb.ch9, as C values
cdef Py_ssize_t HEADER_SIZE, ISO_DESC_SIZE
cdef uint32_t USBIP_DIR_IN
cdef int32_t EBADR, ECONNRESET, EINVAL, ENOENT
cdef uint32_t _SEQ_MASK, _SEQ_HALF
cdef int DIR_IN, PORT_FEAT_RESET, RT_PORT, SET_FEATURE, XFER_BULK, XFER_CONTROL, XFER_ISOC


@cython.locals(wlength=int)
cpdef int control_check(object setup, int32_t tbl, uint32_t direction) except? -1

cdef bint _seq_after(uint32_t a, uint32_t b) noexcept


cdef class UrbSession:
    cdef public object device
    cdef public uint32_t devid
    cdef public object send, pool, limits
    cdef public Py_ssize_t budget, backlog_limit
    cdef public object _queued, _pause_input, _readmit
    cdef public bint admission_waiting
    cdef public dict pending
    cdef public Py_ssize_t pending_bytes
    cdef public dict backlog
    cdef public Py_ssize_t backlog_bytes
    cdef public bint input_paused, _draining, closing
    cdef public object _idle
    cdef public dict _ep_cache
    cdef public int64_t submitted, completed, unlinks
    cdef public dict errors
    cdef public uint32_t max_seqnum
    cdef public dict _early_unlinks
    cdef public object capture, _on_complete
    cdef Py_ssize_t _max_pending
    cdef _CPool _cpool  # ``pool`` when it is the compiled pool, else None
    cdef _CStream _stream  # the compiled Stream whose write is ``send``, else None
    cdef list _table  # the device's submit_table, else None

    @cython.locals(msg=object, sub=CmdSubmit, devid=uint32_t)
    cpdef handle(self, list messages)
    cdef _foreign(self, uint32_t devid)
    cdef Py_ssize_t _queued_bytes(self) except -1
    @cython.locals(queued=Py_ssize_t)
    cdef bint _fits(self, Py_ssize_t cost) except -1
    @cython.locals(seqnum=uint32_t)
    cdef _defer(self, _codec.CmdSubmit msg)
    cdef _set_input_paused(self, bint paused)
    @cython.locals(seqnum=uint32_t, msg=_codec.CmdSubmit, backlog=dict)
    cpdef drain(self)
    @cython.locals(key=int, xfer=object)
    cdef tuple _endpoint(self, uint32_t ep, uint32_t direction)
    cpdef invalidate_endpoints(self)
    @cython.locals(seqnum=uint32_t, pending=dict, ep=uint32_t, direction=uint32_t, tbl=int32_t,
                   urb=_codec.Urb, allowed=uint32_t, status=int32_t, cpool=_CPool, table=list)
    cdef _submit(self, _codec.CmdSubmit msg)
    @cython.locals(target=uint32_t, urb=_codec.Urb, held=_codec.CmdSubmit)
    cdef _unlink(self, _codec.CmdUnlink msg)
    @cython.locals(early=dict)
    cdef bint _settle_early_unlinks(self, uint32_t seqnum) except -1
    @cython.locals(hdr=bytearray)
    cdef _send_ret_unlink(self, uint32_t seqnum, int32_t status)
    cdef _send(self, list parts, Py_ssize_t nbytes)
    cdef _refuse(self, _codec.Urb urb, int32_t status)
    cpdef _completed_captured(self, _codec.Urb urb)
    @cython.locals(pending=dict, is_in=bint, setup=object, cpool=_CPool)
    cpdef _completed(self, _codec.Urb urb)
    @cython.locals(actual=int32_t, hdr=bytearray, view=object, n=Py_ssize_t, total=int64_t, descs=bytes,
                   iso=_codec.IsoPackets, cpool=_CPool)
    cdef _send_ret_submit(self, _codec.Urb urb, bint is_in)
