# cython: language_level=3
"""C declarations that Cython adds to ``codec.py`` when it compiles it as ``usbip.protocol._codec``.

Cython's pure Python mode: the logic lives in ``codec.py`` only; this file gives its
classes C attributes and its hot functions C signatures and typed locals.
"""

cimport cython
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

# the numbers of constants.py (imported there), as C values
cdef Py_ssize_t HEADER_SIZE, ISO_DESC_SIZE, DEFAULT_MAX_TRANSFER
cdef int USBIP_MAX_ISO_PACKETS
cdef int32_t EOVERFLOW
cdef uint32_t USBIP_CMD_SUBMIT, USBIP_CMD_UNLINK, USBIP_RET_SUBMIT, USBIP_RET_UNLINK, USBIP_DIR_IN, USBIP_DIR_OUT


cdef class CmdSubmit:
    cdef public uint32_t seqnum, devid, direction, ep, transfer_flags
    cdef public int32_t transfer_buffer_length, start_frame, number_of_packets, interval
    cdef public object setup, data, iso


cdef class RetSubmit:
    cdef public uint32_t seqnum, devid, direction, ep
    cdef public int32_t status, actual_length, start_frame, number_of_packets, error_count
    cdef public object data, iso


cdef class CmdUnlink:
    cdef public uint32_t seqnum, devid, direction, ep, unlink_seqnum


cdef class RetUnlink:
    cdef public uint32_t seqnum, devid, direction, ep
    cdef public int32_t status


cdef int32_t _s32(uint32_t v) noexcept

@cython.locals(w=uint32_t[10])
cpdef Py_ssize_t pack_cmd_submit(object buf, Py_ssize_t offset, uint32_t seqnum, uint32_t devid,
                                 uint32_t direction, uint32_t ep, uint32_t transfer_flags,
                                 int32_t transfer_buffer_length, int32_t start_frame=*,
                                 int32_t number_of_packets=*, int32_t interval=*, object setup=*) except -1

@cython.locals(w=uint32_t[10])
cpdef Py_ssize_t pack_ret_submit(object buf, Py_ssize_t offset, uint32_t seqnum, int32_t status,
                                 int32_t actual_length, int32_t start_frame=*, int32_t number_of_packets=*,
                                 int32_t error_count=*, uint32_t devid=*, uint32_t direction=*,
                                 uint32_t ep=*) except -1

@cython.locals(w=uint32_t[10])
cpdef Py_ssize_t pack_cmd_unlink(object buf, Py_ssize_t offset, uint32_t seqnum, uint32_t devid,
                                 uint32_t direction, uint32_t ep, uint32_t unlink_seqnum) except -1

@cython.locals(w=uint32_t[10])
cpdef Py_ssize_t pack_ret_unlink(object buf, Py_ssize_t offset, uint32_t seqnum, int32_t status,
                                 uint32_t devid=*, uint32_t direction=*, uint32_t ep=*) except -1

@cython.locals(w=uint32_t[10], command=uint32_t, cs=CmdSubmit, rs=RetSubmit, cu=CmdUnlink, ru=RetUnlink)
cdef object _decode(object buf, Py_ssize_t offset)

@cython.locals(n=Py_ssize_t)
cpdef object unpack_header(object buf, Py_ssize_t offset=*)


cdef class IsoPackets:
    cdef int _n
    cdef bytearray _raw

    cpdef uint64_t set_results(self, int64_t buffer_length, int64_t max_packet, bint clamp=*) except? 0
    cpdef fill(self, object buf, object src)
    cpdef int mismatches(self, object buf, object pattern) except -1
    @cython.locals(total=int64_t, view=object, out=bytearray)
    cpdef object payload(self, object buf)
    cpdef uint64_t total_length(self) except? 0
    cpdef bytes to_bytes(self)
    cpdef uint64_t total_actual(self) except? 0
    cpdef int error_count(self) except -1
    cdef int _first_bad(self, uint64_t buffer_length) except -2
    @cython.locals(pos=int64_t)
    cpdef int64_t gather(self, object src, object dst) except -1
    @cython.locals(r=int)
    cpdef spread(self, object buf, int64_t actual_length)
    @cython.locals(size=Py_ssize_t, end=Py_ssize_t)
    cpdef Py_ssize_t pack_into(self, object buf, Py_ssize_t offset) except -1


cdef _iso_put(IsoPackets iso, Py_ssize_t i, uint32_t offset, uint32_t length, uint32_t actual_length,
              int32_t status)

cdef uint32_t _iso_word(IsoPackets iso, Py_ssize_t i, Py_ssize_t k) noexcept

@cython.locals(iso=IsoPackets)
cdef IsoPackets _iso_of(bytearray raw)

@cython.locals(size=Py_ssize_t, raw=bytearray)
cdef IsoPackets _iso_unpack(object buf, Py_ssize_t offset, Py_ssize_t count)


cdef class Decoder:
    cdef public str role
    cdef public bint is_server
    cdef public Py_ssize_t max_transfer
    cdef public int max_iso_packets
    cdef public Py_ssize_t chunk_size
    cdef public object failed
    cdef bytearray _buf
    cdef Py_ssize_t _start, _end, _need, _data_len, _in_length
    cdef object _pending
    cdef dict _expect

    @cython.locals(have=Py_ssize_t, want=Py_ssize_t)
    cdef _compact(self)
    cdef _fail(self, str msg)
    @cython.locals(avail=Py_ssize_t, body=Py_ssize_t)
    cdef list _parse(self)
    @cython.locals(tbl=int32_t, np=int32_t, al=int32_t, data_len=Py_ssize_t, limit=Py_ssize_t,
                   cs=CmdSubmit, rs=RetSubmit)
    cdef object _header(self, bytearray buf, Py_ssize_t pos)
    @cython.locals(data_len=Py_ssize_t, np=int32_t, iso=IsoPackets)
    cdef _body(self, object msg, bytearray buf, Py_ssize_t pos)


cdef class Urb:
    cdef public uint32_t seqnum, ep, direction, transfer_flags
    cdef public int32_t transfer_buffer_length, start_frame, number_of_packets, interval
    cdef public int32_t status, actual_length, error_count
    cdef public object setup, buffer, iso, on_complete, context
    cdef public bint done, cancelled
    cdef public int64_t unlink_seqnum

    cpdef complete(self, int32_t status=*, object actual_length=*)


@cython.locals(u=Urb)
cpdef Urb urb_from_submit(CmdSubmit msg, object buffer, object on_complete)

@cython.locals(w=uint32_t[10])
cpdef bytearray ret_submit_header(Urb urb, int32_t actual_length, int32_t number_of_packets, int32_t error_count)
