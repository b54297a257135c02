# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled URB-phase codec: the twin of ``usbip.protocol.codec`` (same API, bytes, errors).

Header words and iso descriptors are read and written by the C helpers in
``csrc/usbip_wire.h``; layouts per ``drivers/usb/usbip/usbip_common.h``.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memmove

from .constants import DEFAULT_MAX_TRANSFER, USBIP_MAX_ISO_PACKETS as _MAX_ISO_PY
from .errors import ProtocolError


cdef extern from "Python.h":
    ctypedef struct PyByteArrayObject:
        Py_ssize_t ob_exports


cdef extern from "usbip_wire.h":
    ctypedef struct usbip_iso_desc:
        uint32_t offset
        uint32_t length
        uint32_t actual_length
        int32_t status
    void usbip_unpack_words(const unsigned char *p, uint32_t *w)
    void usbip_pack_words(unsigned char *p, const uint32_t *w, const unsigned char *setup)
    void usbip_iso_unpack(const unsigned char *p, usbip_iso_desc *d, int n)
    void usbip_iso_pack(unsigned char *p, const usbip_iso_desc *d, int n)
    int usbip_iso_check(const usbip_iso_desc *d, int n, uint64_t buflen, uint64_t *total, int *why)
    int64_t usbip_iso_gather(const unsigned char *src, uint64_t srclen, unsigned char *dst, uint64_t dstlen,
                             const usbip_iso_desc *d, int n)
    int usbip_iso_spread(unsigned char *buf, uint64_t buflen, uint64_t actual, const usbip_iso_desc *d, int n)


IMPLEMENTATION = "cython"

DEF HEADER_SIZE = 48
DEF ISO_DESC_SIZE = 16
DEF MAX_ISO = 1024
DEF CMD_SUBMIT = 1
DEF CMD_UNLINK = 2
DEF RET_SUBMIT = 3
DEF RET_UNLINK = 4
DEF CHUNK = 262144
DEF MIN_FREE = 16384

cdef bytes _ZERO_SETUP = bytes(8)


cdef inline int32_t _s32(uint32_t v):
    return <int32_t>v


# ---------------------------------------------------------------- messages
cdef class CmdSubmit:
    cdef public uint32_t seqnum, devid, direction, ep, transfer_flags
    cdef public int32_t transfer_buffer_length, start_frame, number_of_packets, interval
    cdef public object setup, data, iso
    command = CMD_SUBMIT

    def __init__(self, uint32_t seqnum, uint32_t devid, uint32_t direction, uint32_t ep,
                 uint32_t transfer_flags=0, int32_t transfer_buffer_length=0, int32_t start_frame=0,
                 int32_t number_of_packets=0, int32_t interval=0, setup=_ZERO_SETUP, data=None, iso=None):
        self.seqnum = seqnum
        self.devid = devid
        self.direction = direction
        self.ep = ep
        self.transfer_flags = transfer_flags
        self.transfer_buffer_length = transfer_buffer_length
        self.start_frame = start_frame
        self.number_of_packets = number_of_packets
        self.interval = interval
        self.setup = setup
        self.data = data
        self.iso = iso

    def fields(self):
        return (CMD_SUBMIT, self.seqnum, self.devid, self.direction, self.ep, self.transfer_flags,
                self.transfer_buffer_length, self.start_frame, self.number_of_packets, self.interval,
                bytes(self.setup), None if self.data is None else bytes(self.data),
                None if self.iso is None else self.iso.to_bytes())

    def __repr__(self):
        return f"CmdSubmit{self.fields()[1:11]}"


cdef class RetSubmit:
    cdef public uint32_t seqnum, devid, direction, ep
    cdef public int32_t status, actual_length, start_frame, number_of_packets, error_count
    cdef public object data, iso
    command = RET_SUBMIT

    def __init__(self, uint32_t seqnum, int32_t status=0, int32_t actual_length=0, int32_t start_frame=0,
                 int32_t number_of_packets=0, int32_t error_count=0, uint32_t devid=0, uint32_t direction=0,
                 uint32_t ep=0, data=None, iso=None):
        self.seqnum = seqnum
        self.devid = devid
        self.direction = direction
        self.ep = ep
        self.status = status
        self.actual_length = actual_length
        self.start_frame = start_frame
        self.number_of_packets = number_of_packets
        self.error_count = error_count
        self.data = data
        self.iso = iso

    def fields(self):
        return (RET_SUBMIT, self.seqnum, self.devid, self.direction, self.ep, self.status,
                self.actual_length, self.start_frame, self.number_of_packets, self.error_count,
                None if self.data is None else bytes(self.data),
                None if self.iso is None else self.iso.to_bytes())

    def __repr__(self):
        return f"RetSubmit{self.fields()[1:10]}"


cdef class CmdUnlink:
    cdef public uint32_t seqnum, devid, direction, ep, unlink_seqnum
    command = CMD_UNLINK

    def __init__(self, uint32_t seqnum, uint32_t devid, uint32_t direction, uint32_t ep, uint32_t unlink_seqnum):
        self.seqnum = seqnum
        self.devid = devid
        self.direction = direction
        self.ep = ep
        self.unlink_seqnum = unlink_seqnum

    def fields(self):
        return (CMD_UNLINK, self.seqnum, self.devid, self.direction, self.ep, self.unlink_seqnum)

    def __repr__(self):
        return f"CmdUnlink{self.fields()[1:]}"


cdef class RetUnlink:
    cdef public uint32_t seqnum, devid, direction, ep
    cdef public int32_t status
    command = RET_UNLINK

    def __init__(self, uint32_t seqnum, int32_t status, uint32_t devid=0, uint32_t direction=0, uint32_t ep=0):
        self.seqnum = seqnum
        self.devid = devid
        self.direction = direction
        self.ep = ep
        self.status = status

    def fields(self):
        return (RET_UNLINK, self.seqnum, self.devid, self.direction, self.ep, self.status)

    def __repr__(self):
        return f"RetUnlink{self.fields()[1:]}"


# ---------------------------------------------------------------- buffer access
cdef class _View:
    """A Py_buffer held for the duration of one call."""
    cdef Py_buffer view
    cdef bint held

    cdef int acquire(self, object obj, bint writable) except -1:
        PyObject_GetBuffer(obj, &self.view, PyBUF_WRITABLE if writable else PyBUF_SIMPLE)
        self.held = True
        return 0

    cdef void release(self):
        if self.held:
            PyBuffer_Release(&self.view)
            self.held = False

    def __dealloc__(self):
        self.release()


cdef inline unsigned char *_wptr(_View v, object buf, Py_ssize_t offset, Py_ssize_t need) except NULL:
    v.acquire(buf, True)
    if offset < 0 or v.view.len - offset < need:
        v.release()
        raise ValueError(f"buffer too small: need {need} bytes at offset {offset}")
    return <unsigned char *>v.view.buf + offset


# ---------------------------------------------------------------- encoders
cdef inline Py_ssize_t _pack(object buf, Py_ssize_t offset, uint32_t *w, const unsigned char *setup) except -1:
    cdef Py_buffer view
    if isinstance(buf, bytearray):  # fast path: no Py_buffer round trip
        if offset < 0 or PyByteArray_GET_SIZE(buf) - offset < HEADER_SIZE:
            raise ValueError(f"buffer too small: need {HEADER_SIZE} bytes at offset {offset}")
        usbip_pack_words(<unsigned char *>PyByteArray_AS_STRING(buf) + offset, w, setup)
        return offset + HEADER_SIZE
    PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
    try:
        if offset < 0 or view.len - offset < HEADER_SIZE:
            raise ValueError(f"buffer too small: need {HEADER_SIZE} bytes at offset {offset}")
        usbip_pack_words(<unsigned char *>view.buf + offset, w, setup)
    finally:
        PyBuffer_Release(&view)
    return offset + HEADER_SIZE


def pack_cmd_submit(buf, Py_ssize_t offset, uint32_t seqnum, uint32_t devid, uint32_t direction, uint32_t ep,
                    uint32_t transfer_flags, int32_t transfer_buffer_length, int32_t start_frame=0,
                    int32_t number_of_packets=0, int32_t interval=0, setup=_ZERO_SETUP):
    """Write a CMD_SUBMIT header at ``buf[offset:offset+48]``; return the end offset."""
    cdef uint32_t w[10]
    if not isinstance(setup, bytes):
        if len(setup) != 8:
            raise ValueError("setup packet must be 8 bytes")
        setup = bytes(setup)
    if PyBytes_GET_SIZE(setup) != 8:
        raise ValueError("setup packet must be 8 bytes")
    w[0] = CMD_SUBMIT; w[1] = seqnum; w[2] = devid; w[3] = direction; w[4] = ep
    w[5] = transfer_flags; w[6] = <uint32_t>transfer_buffer_length; w[7] = <uint32_t>start_frame
    w[8] = <uint32_t>number_of_packets; w[9] = <uint32_t>interval
    return _pack(buf, offset, w, <const unsigned char *>PyBytes_AS_STRING(setup))


def pack_ret_submit(buf, Py_ssize_t offset, uint32_t seqnum, int32_t status, int32_t actual_length,
                    int32_t start_frame=0, int32_t number_of_packets=0, int32_t error_count=0,
                    uint32_t devid=0, uint32_t direction=0, uint32_t ep=0):
    """Write a RET_SUBMIT header. The kernel stub leaves devid/direction/ep zero (stub_tx.c)."""
    cdef uint32_t w[10]
    w[0] = RET_SUBMIT; w[1] = seqnum; w[2] = devid; w[3] = direction; w[4] = ep
    w[5] = <uint32_t>status; w[6] = <uint32_t>actual_length; w[7] = <uint32_t>start_frame
    w[8] = <uint32_t>number_of_packets; w[9] = <uint32_t>error_count
    return _pack(buf, offset, w, NULL)


def pack_cmd_unlink(buf, Py_ssize_t offset, uint32_t seqnum, uint32_t devid, uint32_t direction, uint32_t ep,
                    uint32_t unlink_seqnum):
    cdef uint32_t w[10]
    w[0] = CMD_UNLINK; w[1] = seqnum; w[2] = devid; w[3] = direction; w[4] = ep
    w[5] = unlink_seqnum; w[6] = 0; w[7] = 0; w[8] = 0; w[9] = 0
    return _pack(buf, offset, w, NULL)


def pack_ret_unlink(buf, Py_ssize_t offset, uint32_t seqnum, int32_t status, uint32_t devid=0,
                    uint32_t direction=0, uint32_t ep=0):
    cdef uint32_t w[10]
    w[0] = RET_UNLINK; w[1] = seqnum; w[2] = devid; w[3] = direction; w[4] = ep
    w[5] = <uint32_t>status; w[6] = 0; w[7] = 0; w[8] = 0; w[9] = 0
    return _pack(buf, offset, w, NULL)


cdef object _decode_header(const unsigned char *p):
    # objects are made with __new__ and filled in directly: no __init__ argument parsing
    cdef uint32_t w[10]
    cdef CmdSubmit cs
    cdef RetSubmit rs
    cdef CmdUnlink cu
    cdef RetUnlink ru
    usbip_unpack_words(p, w)
    if w[0] == CMD_SUBMIT:
        cs = CmdSubmit.__new__(CmdSubmit)
        cs.seqnum = w[1]; cs.devid = w[2]; cs.direction = w[3]; cs.ep = w[4]; cs.transfer_flags = w[5]
        cs.transfer_buffer_length = _s32(w[6]); cs.start_frame = _s32(w[7])
        cs.number_of_packets = _s32(w[8]); cs.interval = _s32(w[9])
        cs.setup = PyBytes_FromStringAndSize(<const char *>p + 40, 8)
        return cs
    if w[0] == RET_SUBMIT:
        rs = RetSubmit.__new__(RetSubmit)
        rs.seqnum = w[1]; rs.devid = w[2]; rs.direction = w[3]; rs.ep = w[4]
        rs.status = _s32(w[5]); rs.actual_length = _s32(w[6]); rs.start_frame = _s32(w[7])
        rs.number_of_packets = _s32(w[8]); rs.error_count = _s32(w[9])
        return rs
    if w[0] == CMD_UNLINK:
        cu = CmdUnlink.__new__(CmdUnlink)
        cu.seqnum = w[1]; cu.devid = w[2]; cu.direction = w[3]; cu.ep = w[4]; cu.unlink_seqnum = w[5]
        return cu
    if w[0] == RET_UNLINK:
        ru = RetUnlink.__new__(RetUnlink)
        ru.seqnum = w[1]; ru.devid = w[2]; ru.direction = w[3]; ru.ep = w[4]; ru.status = _s32(w[5])
        return ru
    raise ProtocolError(f"unknown USB/IP command 0x{w[0]:08x}")


def unpack_header(buf, Py_ssize_t offset=0):
    """Decode one 48-byte header (no payload); raise ProtocolError on an unknown command."""
    cdef Py_buffer view
    cdef Py_ssize_t n
    if offset < 0:
        raise ValueError(f"negative offset {offset}")
    if isinstance(buf, bytes):  # fast paths: no Py_buffer round trip
        n = PyBytes_GET_SIZE(buf)
        if n - offset < HEADER_SIZE:
            raise ProtocolError(f"URB header needs {HEADER_SIZE} bytes, got {n - offset}")
        return _decode_header(<const unsigned char *>PyBytes_AS_STRING(buf) + offset)
    if isinstance(buf, bytearray):
        n = PyByteArray_GET_SIZE(buf)
        if n - offset < HEADER_SIZE:
            raise ProtocolError(f"URB header needs {HEADER_SIZE} bytes, got {n - offset}")
        return _decode_header(<const unsigned char *>PyByteArray_AS_STRING(buf) + offset)
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if view.len - offset < HEADER_SIZE:
            raise ProtocolError(f"URB header needs {HEADER_SIZE} bytes, got {view.len - offset}")
        return _decode_header(<const unsigned char *>view.buf + offset)
    finally:
        PyBuffer_Release(&view)


# ---------------------------------------------------------------- iso descriptors
cdef class IsoPackets:
    """An array of isochronous packet descriptors: (offset, length, actual_length, status)."""
    cdef usbip_iso_desc *d
    cdef int n

    def __cinit__(self, int count=0):
        if count < 0 or count > MAX_ISO:
            raise ValueError(f"number of iso packets {count} outside 0..{MAX_ISO}")
        self.n = count
        self.d = <usbip_iso_desc *>malloc(sizeof(usbip_iso_desc) * (count if count else 1))
        if self.d == NULL:
            raise MemoryError()
        cdef int i
        for i in range(count):
            self.d[i].offset = 0
            self.d[i].length = 0
            self.d[i].actual_length = 0
            self.d[i].status = 0

    def __dealloc__(self):
        free(self.d)

    @classmethod
    def layout(cls, int count, uint32_t packet_size):
        """``count`` packets of ``packet_size`` bytes each, back to back."""
        cdef IsoPackets iso = IsoPackets(count)
        cdef int i
        for i in range(count):
            iso.d[i].offset = i * packet_size
            iso.d[i].length = packet_size
        return iso

    @classmethod
    def from_list(cls, packets):
        items = [tuple(p) for p in packets]
        cdef IsoPackets iso = IsoPackets(len(items))
        cdef int i
        for i in range(iso.n):
            p = items[i]
            if len(p) != 4:
                raise ValueError("each iso packet is (offset, length, actual_length, status)")
            iso.d[i].offset = p[0] & 0xFFFFFFFF
            iso.d[i].length = p[1] & 0xFFFFFFFF
            iso.d[i].actual_length = p[2] & 0xFFFFFFFF
            iso.d[i].status = <int32_t><uint32_t>(p[3] & 0xFFFFFFFF)
        return iso

    @classmethod
    def unpack(cls, buf, Py_ssize_t offset, int count):
        if count < 0 or count > MAX_ISO:
            raise ProtocolError(f"number_of_packets {count} outside 0..{MAX_ISO}")
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        cdef _View v = _View()
        v.acquire(buf, False)
        try:
            if v.view.len - offset < count * ISO_DESC_SIZE:
                raise ProtocolError("iso packet descriptors truncated")
            return _iso_from(<const unsigned char *>v.view.buf + offset, count)
        finally:
            v.release()

    def pack_into(self, buf, Py_ssize_t offset):
        cdef _View v = _View()
        cdef unsigned char *p = _wptr(v, buf, offset, self.n * ISO_DESC_SIZE)
        usbip_iso_pack(p, self.d, self.n)
        v.release()
        return offset + self.n * ISO_DESC_SIZE

    def to_bytes(self):
        out = bytearray(self.n * ISO_DESC_SIZE)
        self.pack_into(out, 0)
        return bytes(out)

    def __len__(self):
        return self.n

    def __getitem__(self, Py_ssize_t i):
        if i < 0:
            i += self.n
        if i < 0 or i >= self.n:
            raise IndexError("iso packet index out of range")
        return (self.d[i].offset, self.d[i].length, self.d[i].actual_length, self.d[i].status)

    def tolist(self):
        return [self[i] for i in range(self.n)]

    def set_result(self, Py_ssize_t i, uint32_t actual_length, int32_t status=0):
        if i < 0:
            i += self.n
        if i < 0 or i >= self.n:
            raise IndexError("iso packet index out of range")
        if actual_length > self.d[i].length:
            raise ValueError(f"iso packet {i}: actual_length {actual_length} outside 0..{self.d[i].length}")
        self.d[i].actual_length = actual_length
        self.d[i].status = status

    def total_actual(self):
        cdef uint64_t t = 0
        cdef int i
        for i in range(self.n):
            t += self.d[i].actual_length
        return t

    def error_count(self):
        cdef int i, c = 0
        for i in range(self.n):
            if self.d[i].status != 0:
                c += 1
        return c

    def validate(self, uint64_t buffer_length, actual_length=None):
        """Each packet inside the buffer, actual <= length, and (if given) sum(actual) == actual_length."""
        self._check(buffer_length, actual_length)

    cdef int _check(self, uint64_t buffer_length, object actual_length) except -1:
        cdef uint64_t total = 0
        cdef int why = 0
        cdef int bad = usbip_iso_check(self.d, self.n, buffer_length, &total, &why)
        if bad >= 0:
            if why == 1:
                raise ProtocolError(f"iso packet {bad} ({self.d[bad].offset}+{self.d[bad].length}) "
                                    f"overruns the {buffer_length}-byte buffer")
            raise ProtocolError(f"iso packet {bad} actual_length {self.d[bad].actual_length} > "
                                f"length {self.d[bad].length}")
        if actual_length is not None and total != actual_length:
            raise ProtocolError(f"iso actual_lengths sum to {total}, header says {actual_length}")
        return 0

    def gather(self, src, dst):
        """Copy each packet's actual_length bytes from its offset in ``src`` to ``dst`` back to back."""
        cdef _View s = _View()
        cdef _View t = _View()
        s.acquire(src, False)
        t.acquire(dst, True)
        cdef int64_t r = usbip_iso_gather(<const unsigned char *>s.view.buf, s.view.len,
                                          <unsigned char *>t.view.buf, t.view.len, self.d, self.n)
        s.release()
        t.release()
        if r < 0:
            raise ValueError("iso packet outside the buffer")
        return r

    def spread(self, buf, int64_t actual_length):
        """In place: move packets received back to back at ``buf[0:actual_length]`` to their offsets."""
        cdef uint64_t total = self.total_actual()
        if actual_length < 0 or total != <uint64_t>actual_length:
            raise ProtocolError(f"iso actual_lengths sum to {total}, header says {actual_length}")
        cdef _View v = _View()
        v.acquire(buf, True)
        try:
            if <uint64_t>actual_length > <uint64_t>v.view.len:
                raise ProtocolError("iso data larger than the buffer")
            if usbip_iso_spread(<unsigned char *>v.view.buf, v.view.len, actual_length, self.d, self.n) < 0:
                raise ProtocolError("iso packet outside the buffer")
        finally:
            v.release()

    def __eq__(self, other):
        return isinstance(other, IsoPackets) and self.tolist() == other.tolist()

    def __repr__(self):
        return f"IsoPackets({self.tolist()!r})"


cdef IsoPackets _iso_from(const unsigned char *p, int count):
    cdef IsoPackets iso = IsoPackets(count)
    usbip_iso_unpack(p, iso.d, count)
    return iso


# ---------------------------------------------------------------- stream decoder
cdef class Decoder:
    """Sans-I/O decoder of the URB phase: bytes in (any fragmentation), whole messages out.

    See ``usbip.protocol.codec.Decoder`` for the contract; this twin reuses a
    receive buffer once no payload view into it is alive.
    """
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

    def __init__(self, str role="server", Py_ssize_t max_transfer=DEFAULT_MAX_TRANSFER,
                 int max_iso_packets=_MAX_ISO_PY, Py_ssize_t chunk_size=CHUNK):
        if role not in ("server", "client"):
            raise ValueError("role must be 'server' or 'client'")
        self.role = role
        self.is_server = role == "server"
        self.max_transfer = max_transfer
        self.max_iso_packets = min(max_iso_packets, MAX_ISO)
        self.chunk_size = max(chunk_size, 4096)
        self._buf = bytearray(self.chunk_size)
        self._start = 0
        self._end = 0
        self._pending = None
        self._need = 0
        self._data_len = 0
        self._in_length = 0
        self._expect = {}
        self.failed = None

    def expect(self, uint32_t seqnum, Py_ssize_t in_length):
        """Announce a submitted URB: ``in_length`` is its buffer length if IN, -1 if OUT."""
        self._expect[seqnum] = in_length

    def forget(self, uint32_t seqnum):
        self._expect.pop(seqnum, None)

    @property
    def pending_body(self):
        """Body bytes (payload and iso descriptors) of the message being assembled; 0 between messages."""
        return self._need if self._pending is not None else 0

    @property
    def buffered(self):
        return self._end - self._start

    def get_buffer(self, Py_ssize_t sizehint=-1):
        """A writable view to receive into (asyncio.BufferedProtocol.get_buffer)."""
        if self.failed is not None:
            raise self.failed
        cdef Py_ssize_t free = len(self._buf) - self._end
        cdef Py_ssize_t have = self._end - self._start
        cdef Py_ssize_t needed = (HEADER_SIZE + self._need if self._pending is not None else HEADER_SIZE) - have
        if free < needed or (free < MIN_FREE and self._pending is None):
            self._compact()
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, Py_ssize_t nbytes):
        if self.failed is not None:
            raise self.failed
        if nbytes < 0 or self._end + nbytes > len(self._buf):
            raise ValueError("buffer_updated beyond the buffer")
        self._end += nbytes
        return self._parse()

    def feed(self, data):
        """Copy ``data`` in and return every message it completes."""
        cdef list out = []
        cdef _View v = _View()
        cdef Py_ssize_t pos = 0, n, total
        cdef Py_ssize_t free
        if self.failed is not None:
            raise self.failed
        v.acquire(data, False)
        try:
            total = v.view.len
            while pos < total:
                self.get_buffer(total - pos)
                free = len(self._buf) - self._end
                n = min(free, total - pos)
                memcpy(PyByteArray_AS_STRING(self._buf) + self._end, <char *>v.view.buf + pos, n)
                pos += n
                out.extend(self.buffer_updated(n))
        finally:
            v.release()
        return out

    cdef int _compact(self) except -1:
        cdef Py_ssize_t have = self._end - self._start
        cdef Py_ssize_t want = self.chunk_size
        if self._pending is not None:
            want = max(want, HEADER_SIZE + self._need)
        want = max(want, have)
        if (<PyByteArrayObject *>self._buf).ob_exports == 0 and len(self._buf) >= want:
            # no payload view into this buffer is alive: reuse it
            memmove(PyByteArray_AS_STRING(self._buf), PyByteArray_AS_STRING(self._buf) + self._start, have)
        else:
            new = bytearray(want)
            memcpy(PyByteArray_AS_STRING(new), PyByteArray_AS_STRING(self._buf) + self._start, have)
            self._buf = new
        self._start = 0
        self._end = have
        return 0

    cdef _fail(self, str msg):
        self.failed = ProtocolError(msg)
        return self.failed

    cdef list _parse(self):
        cdef list out = []
        cdef Py_ssize_t avail, need, body
        cdef const unsigned char *base
        while True:
            avail = self._end - self._start
            if self._pending is None:
                if avail < HEADER_SIZE:
                    break
                base = <const unsigned char *>PyByteArray_AS_STRING(self._buf)
                msg = self._header(base + self._start)
                if self._need == 0:
                    if self._data_len == 0:
                        msg.data = memoryview(self._buf)[0:0]
                    self._start += HEADER_SIZE
                    out.append(msg)
                    continue
                self._pending = msg
                # a body that does not fit gets its buffer in get_buffer, when the caller reads
                # it: a server can refuse that allocation (pending_body) before it is made
                continue
            if avail < HEADER_SIZE + self._need:
                break
            body = self._start + HEADER_SIZE
            msg = self._pending
            self._body(msg, body)
            self._start = body + self._need
            self._pending = None
            out.append(msg)
        return out

    cdef object _header(self, const unsigned char *p):
        cdef uint32_t w[10]
        cdef int32_t tbl, np, al
        cdef Py_ssize_t data_len, limit
        usbip_unpack_words(p, w)
        try:
            msg = _decode_header(p)
        except ProtocolError as exc:
            raise self._fail(str(exc)) from None
        if self.is_server:
            if w[0] == CMD_SUBMIT:
                tbl = _s32(w[6])
                if tbl < 0 or tbl > self.max_transfer:
                    raise self._fail(f"transfer_buffer_length {tbl} outside 0..{self.max_transfer}")
                np = _s32(w[8])
                if np < -1 or np > self.max_iso_packets:
                    raise self._fail(f"number_of_packets {np} outside 0..{self.max_iso_packets}")
                if w[3] > 1:
                    raise self._fail(f"direction {w[3]} is neither 0 nor 1")
                data_len = tbl if w[3] == 0 else -1
                self._data_len = data_len
                self._need = max(data_len, 0) + max(np, 0) * ISO_DESC_SIZE
                return msg
            if w[0] == CMD_UNLINK:
                self._data_len = -1
                self._need = 0
                return msg
            raise self._fail(f"a server does not accept command {w[0]}")
        if w[0] == RET_SUBMIT:
            in_length_obj = self._expect.pop(w[1], None)
            if in_length_obj is None:
                raise self._fail(f"RET_SUBMIT for unknown seqnum {w[1]}")
            np = _s32(w[8])
            if np < -1 or np > self.max_iso_packets:
                raise self._fail(f"number_of_packets {np} outside 0..{self.max_iso_packets}")
            al = _s32(w[6])
            limit = in_length_obj if in_length_obj >= 0 else self.max_transfer
            if al < 0 or al > limit:
                raise self._fail(f"actual_length {al} outside 0..{limit}")
            self._in_length = limit
            data_len = al if in_length_obj >= 0 else -1
            self._data_len = data_len
            self._need = max(data_len, 0) + max(np, 0) * ISO_DESC_SIZE
            return msg
        if w[0] == RET_UNLINK:
            self._data_len = -1
            self._need = 0
            return msg
        raise self._fail(f"a client does not accept command {w[0]}")

    cdef int _body(self, object msg, Py_ssize_t pos) except -1:
        cdef Py_ssize_t data_len = self._data_len
        cdef int np
        cdef IsoPackets iso
        if data_len >= 0:
            msg.data = memoryview(self._buf)[pos:pos + data_len]
        np = msg.number_of_packets
        if np <= 0:
            return 0
        iso = _iso_from(<const unsigned char *>PyByteArray_AS_STRING(self._buf) + pos + max(data_len, 0), np)
        try:
            if type(msg) is CmdSubmit:
                iso._check((<CmdSubmit>msg).transfer_buffer_length, None)
            else:
                # usbip_recv_iso: the packets' actual lengths must add up to actual_length
                iso._check(self._in_length, (<RetSubmit>msg).actual_length)
        except ProtocolError as exc:
            raise self._fail(str(exc)) from None
        msg.iso = iso
        return 0


# ---------------------------------------------------------------- the URB a device is handed
cdef class Urb:
    """One USB request block as the server hands it to a device (twin of codec.Urb).

    ``buffer`` is the transfer buffer: for OUT the bytes the client sent, for IN a
    writable buffer of ``transfer_buffer_length`` bytes the device fills. ``iso``
    holds the isochronous packet descriptors or None. Complete it exactly once
    with :meth:`complete`.
    """
    cdef public uint32_t seqnum, ep, direction, transfer_flags
    cdef public int32_t transfer_buffer_length, start_frame, number_of_packets, interval
    cdef public int32_t status, actual_length, error_count
    cdef public object setup, buffer, iso, on_complete, context
    cdef public bint done, cancelled
    cdef public int64_t unlink_seqnum

    def __init__(self, uint32_t seqnum, uint32_t ep, uint32_t direction, int32_t transfer_buffer_length, buffer,
                 setup=_ZERO_SETUP, uint32_t transfer_flags=0, int32_t start_frame=0, int32_t number_of_packets=0,
                 int32_t interval=0, iso=None, on_complete=None):
        self.seqnum = seqnum
        self.ep = ep
        self.direction = direction
        self.transfer_flags = transfer_flags
        self.transfer_buffer_length = transfer_buffer_length
        self.start_frame = start_frame
        self.number_of_packets = number_of_packets
        self.interval = interval
        self.setup = setup
        self.buffer = buffer
        self.iso = iso
        self.on_complete = on_complete
        self.unlink_seqnum = -1

    @property
    def is_in(self):
        return self.direction == 1

    cpdef complete(self, int32_t status=0, object actual_length=None):
        """Finish this URB (exactly once; later calls are ignored)."""
        if self.done:
            return
        self.done = True
        self.status = status
        if actual_length is not None:
            self.actual_length = actual_length
        cb = self.on_complete
        if cb is not None:
            cb(self)

    def __repr__(self):
        d = "IN" if self.direction == 1 else "OUT"
        return f"<Urb seq={self.seqnum} ep={self.ep} {d} len={self.transfer_buffer_length} status={self.status}>"


def urb_from_submit(CmdSubmit msg, buffer, on_complete):
    """The server's Urb for a decoded CMD_SUBMIT (``buffer``: OUT data or the IN buffer)."""
    cdef Urb u = Urb.__new__(Urb)
    u.seqnum = msg.seqnum
    u.ep = msg.ep
    u.direction = msg.direction
    u.transfer_flags = msg.transfer_flags
    u.transfer_buffer_length = msg.transfer_buffer_length
    u.start_frame = msg.start_frame
    u.number_of_packets = msg.number_of_packets
    u.interval = msg.interval
    u.setup = msg.setup
    u.buffer = buffer
    u.iso = msg.iso
    u.on_complete = on_complete
    u.unlink_seqnum = -1
    return u


def ret_submit_header(Urb urb, int32_t actual_length, int32_t number_of_packets, int32_t error_count):
    """A fresh 48-byte RET_SUBMIT header for ``urb`` (status and start_frame from it)."""
    cdef bytearray hdr = bytearray(HEADER_SIZE)
    cdef uint32_t w[10]
    w[0] = RET_SUBMIT; w[1] = urb.seqnum; w[2] = 0; w[3] = 0; w[4] = 0
    w[5] = <uint32_t>urb.status; w[6] = <uint32_t>actual_length; w[7] = <uint32_t>urb.start_frame
    w[8] = <uint32_t>number_of_packets; w[9] = <uint32_t>error_count
    usbip_pack_words(<unsigned char *>PyByteArray_AS_STRING(hdr), w, NULL)
    return hdr
