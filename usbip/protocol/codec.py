"""The URB-phase codec (headers, iso descriptors, stream decoder), written once.

This file runs as it is (``usbip.protocol.codec``: the fallback when the extension is
missing or ``USBIP_NO_EXTENSIONS=1``, and the reference of the differential tests),
and Cython compiles it, augmented by ``_codec.pxd`` (C types of the classes,
attributes and locals), into ``usbip.protocol._codec``; ``usbip.protocol`` picks one
at import. Where the compiled build reaches bytes directly, an ``if cython.compiled``
branch calls the C helpers of ``_wire.pxd`` / ``csrc/usbip_wire.h``; the other branch is
the same operation with ``struct``.

Layouts are those of ``struct usbip_header`` and ``struct usbip_iso_packet_descriptor``
in ``drivers/usb/usbip/usbip_common.h`` (see also ``Documentation/usb/usbip_protocol.rst``):
every field a big-endian 32-bit integer except the 8-byte setup packet, which travels
exactly as on USB.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any

try:
    import cython
except ImportError:  # Cython is only needed to build: plain Python sees compiled == False
    from . import _cython_shim as cython  # type: ignore[no-redef,unused-ignore]

from .constants import (
    DEFAULT_MAX_TRANSFER,
    EOVERFLOW,
    HEADER_SIZE,
    ISO_DESC_SIZE,
    USBIP_CMD_SUBMIT,
    USBIP_CMD_UNLINK,
    USBIP_DIR_IN,
    USBIP_DIR_OUT,
    USBIP_MAX_ISO_PACKETS,
    USBIP_RET_SUBMIT,
    USBIP_RET_UNLINK,
)
from .errors import ProtocolError

if cython.compiled:
    from cython.cimports.usbip.protocol import _wire  # type: ignore[import-not-found,unused-ignore]

IMPLEMENTATION = "cython" if cython.compiled else "python"

_HEADER = struct.Struct(">IIIIIIiiii8s")  # CMD_SUBMIT's signedness; _s32 fixes word 5 of the replies
_CMD_SUBMIT = _HEADER
_RET_SUBMIT = struct.Struct(">IIIIIiiiii8x")
_CMD_UNLINK = struct.Struct(">IIIIII24x")
_RET_UNLINK = struct.Struct(">IIIIIi24x")
_ISO = struct.Struct(">IIIi")
_ISO_WORD = struct.Struct(">I")
_ZERO_SETUP = bytes(8)
assert _CMD_SUBMIT.size == _RET_SUBMIT.size == _CMD_UNLINK.size == _RET_UNLINK.size == HEADER_SIZE
assert _ISO.size == ISO_DESC_SIZE


def _s32(v: int) -> int:
    """A 32-bit word read as signed (the compiled build: a C cast)."""
    if cython.compiled:
        return v
    return v - (1 << 32) if v & 0x80000000 else v


class CmdSubmit:
    __slots__ = (
        "data",
        "devid",
        "direction",
        "ep",
        "interval",
        "iso",
        "number_of_packets",
        "seqnum",
        "setup",
        "start_frame",
        "transfer_buffer_length",
        "transfer_flags",
    )
    command = USBIP_CMD_SUBMIT

    def __init__(
        self,
        seqnum: int,
        devid: int,
        direction: int,
        ep: int,
        transfer_flags: int = 0,
        transfer_buffer_length: int = 0,
        start_frame: int = 0,
        number_of_packets: int = 0,
        interval: int = 0,
        setup: bytes = _ZERO_SETUP,
        data: memoryview | bytes | None = None,
        iso: IsoPackets | None = None,
    ) -> None:
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

    def fields(self) -> tuple[Any, ...]:
        return (
            self.command,
            self.seqnum,
            self.devid,
            self.direction,
            self.ep,
            self.transfer_flags,
            self.transfer_buffer_length,
            self.start_frame,
            self.number_of_packets,
            self.interval,
            bytes(self.setup),
            None if self.data is None else bytes(self.data),
            None if self.iso is None else self.iso.to_bytes(),
        )

    def __repr__(self) -> str:
        return f"CmdSubmit{self.fields()[1:11]}"


class RetSubmit:
    __slots__ = (
        "actual_length",
        "data",
        "devid",
        "direction",
        "ep",
        "error_count",
        "iso",
        "number_of_packets",
        "seqnum",
        "start_frame",
        "status",
    )
    command = USBIP_RET_SUBMIT

    def __init__(
        self,
        seqnum: int,
        status: int = 0,
        actual_length: int = 0,
        start_frame: int = 0,
        number_of_packets: int = 0,
        error_count: int = 0,
        devid: int = 0,
        direction: int = 0,
        ep: int = 0,
        data: memoryview | bytes | None = None,
        iso: IsoPackets | None = None,
    ) -> None:
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

    def fields(self) -> tuple[Any, ...]:
        return (
            self.command,
            self.seqnum,
            self.devid,
            self.direction,
            self.ep,
            self.status,
            self.actual_length,
            self.start_frame,
            self.number_of_packets,
            self.error_count,
            None if self.data is None else bytes(self.data),
            None if self.iso is None else self.iso.to_bytes(),
        )

    def __repr__(self) -> str:
        return f"RetSubmit{self.fields()[1:10]}"


class CmdUnlink:
    __slots__ = ("devid", "direction", "ep", "seqnum", "unlink_seqnum")
    command = USBIP_CMD_UNLINK

    def __init__(self, seqnum: int, devid: int, direction: int, ep: int, unlink_seqnum: int) -> None:
        self.seqnum = seqnum
        self.devid = devid
        self.direction = direction
        self.ep = ep
        self.unlink_seqnum = unlink_seqnum

    def fields(self) -> tuple[Any, ...]:
        return (self.command, self.seqnum, self.devid, self.direction, self.ep, self.unlink_seqnum)

    def __repr__(self) -> str:
        return f"CmdUnlink{self.fields()[1:]}"


class RetUnlink:
    __slots__ = ("devid", "direction", "ep", "seqnum", "status")
    command = USBIP_RET_UNLINK

    def __init__(self, seqnum: int, status: int, devid: int = 0, direction: int = 0, ep: int = 0) -> None:
        self.seqnum = seqnum
        self.devid = devid
        self.direction = direction
        self.ep = ep
        self.status = status

    def fields(self) -> tuple[Any, ...]:
        return (self.command, self.seqnum, self.devid, self.direction, self.ep, self.status)

    def __repr__(self) -> str:
        return f"RetUnlink{self.fields()[1:]}"


Message = CmdSubmit | RetSubmit | CmdUnlink | RetUnlink


# ---------------------------------------------------------------- encoders
def pack_cmd_submit(
    buf: bytearray | memoryview,
    offset: int,
    seqnum: int,
    devid: int,
    direction: int,
    ep: int,
    transfer_flags: int,
    transfer_buffer_length: int,
    start_frame: int = 0,
    number_of_packets: int = 0,
    interval: int = 0,
    setup: bytes = _ZERO_SETUP,
) -> int:
    """Write a CMD_SUBMIT header at ``buf[offset:offset+48]``; return the end offset."""
    if type(setup) is not bytes:
        setup = bytes(setup)
    if len(setup) != 8:
        raise ValueError("setup packet must be 8 bytes")
    if cython.compiled:
        w = [USBIP_CMD_SUBMIT, seqnum, devid, direction, ep, transfer_flags,
             transfer_buffer_length, start_frame, number_of_packets, interval]  # fmt: skip
        end: int = _wire.write_header(buf, offset, w, setup)
        return end
    _CMD_SUBMIT.pack_into(
        buf, offset, USBIP_CMD_SUBMIT, seqnum, devid, direction, ep, transfer_flags,
        transfer_buffer_length, start_frame, number_of_packets, interval, setup,
    )  # fmt: skip
    return offset + HEADER_SIZE


def pack_ret_submit(
    buf: bytearray | memoryview,
    offset: int,
    seqnum: int,
    status: int,
    actual_length: int,
    start_frame: int = 0,
    number_of_packets: int = 0,
    error_count: int = 0,
    devid: int = 0,
    direction: int = 0,
    ep: int = 0,
) -> int:
    """Write a RET_SUBMIT header. The kernel stub leaves devid/direction/ep zero (stub_tx.c)."""
    if cython.compiled:
        w = [USBIP_RET_SUBMIT, seqnum, devid, direction, ep, status,
             actual_length, start_frame, number_of_packets, error_count]  # fmt: skip
        end: int = _wire.write_header(buf, offset, w, None)
        return end
    _RET_SUBMIT.pack_into(
        buf, offset, USBIP_RET_SUBMIT, seqnum, devid, direction, ep, status,
        actual_length, start_frame, number_of_packets, error_count,
    )  # fmt: skip
    return offset + HEADER_SIZE


def pack_cmd_unlink(
    buf: bytearray | memoryview, offset: int, seqnum: int, devid: int, direction: int, ep: int, unlink_seqnum: int
) -> int:
    if cython.compiled:
        w = [USBIP_CMD_UNLINK, seqnum, devid, direction, ep, unlink_seqnum, 0, 0, 0, 0]
        end: int = _wire.write_header(buf, offset, w, None)
        return end
    _CMD_UNLINK.pack_into(buf, offset, USBIP_CMD_UNLINK, seqnum, devid, direction, ep, unlink_seqnum)
    return offset + HEADER_SIZE


def pack_ret_unlink(
    buf: bytearray | memoryview,
    offset: int,
    seqnum: int,
    status: int,
    devid: int = 0,
    direction: int = 0,
    ep: int = 0,
) -> int:
    if cython.compiled:
        w = [USBIP_RET_UNLINK, seqnum, devid, direction, ep, status, 0, 0, 0, 0]
        end: int = _wire.write_header(buf, offset, w, None)
        return end
    _RET_UNLINK.pack_into(buf, offset, USBIP_RET_UNLINK, seqnum, devid, direction, ep, status)
    return offset + HEADER_SIZE


def _decode(buf: bytes | bytearray | memoryview, offset: int) -> Message:
    """The message of the 48-byte header at ``buf[offset:]`` (the caller checked the length)."""
    if cython.compiled:
        setup = _wire.read_header(buf, offset, w)  # type: ignore[has-type,used-before-def]  # noqa: F821 (uint32_t[10] in _codec.pxd)
    else:
        w = _HEADER.unpack_from(buf, offset)
        setup = w[10]
    command = w[0]
    if command == USBIP_CMD_SUBMIT:
        cs = CmdSubmit.__new__(CmdSubmit)
        cs.seqnum, cs.devid, cs.direction, cs.ep, cs.transfer_flags = w[1], w[2], w[3], w[4], w[5]
        cs.transfer_buffer_length, cs.start_frame, cs.number_of_packets, cs.interval = w[6], w[7], w[8], w[9]
        cs.setup, cs.data, cs.iso = setup, None, None
        return cs
    if command == USBIP_RET_SUBMIT:
        rs = RetSubmit.__new__(RetSubmit)
        rs.seqnum, rs.devid, rs.direction, rs.ep, rs.status = w[1], w[2], w[3], w[4], _s32(w[5])
        rs.actual_length, rs.start_frame, rs.number_of_packets, rs.error_count = w[6], w[7], w[8], w[9]
        rs.data, rs.iso = None, None
        return rs
    if command == USBIP_CMD_UNLINK:
        cu = CmdUnlink.__new__(CmdUnlink)
        cu.seqnum, cu.devid, cu.direction, cu.ep, cu.unlink_seqnum = w[1], w[2], w[3], w[4], w[5]
        return cu
    if command == USBIP_RET_UNLINK:
        ru = RetUnlink.__new__(RetUnlink)
        ru.seqnum, ru.devid, ru.direction, ru.ep, ru.status = w[1], w[2], w[3], w[4], _s32(w[5])
        return ru
    raise ProtocolError(f"unknown USB/IP command 0x{command:08x}")


def unpack_header(buf: bytes | bytearray | memoryview, offset: int = 0) -> Message:
    """Decode one 48-byte header (no payload); raise ProtocolError on an unknown command."""
    if offset < 0:
        raise ValueError(f"negative offset {offset}")
    n = len(buf) if type(buf) is bytes or type(buf) is bytearray or not cython.compiled else _wire.buf_len(buf)
    if n - offset < HEADER_SIZE:
        raise ProtocolError(f"URB header needs {HEADER_SIZE} bytes, got {n - offset}")
    return _decode(buf, offset)


# ---------------------------------------------------------------- iso descriptors
def _iso_put(iso: IsoPackets, i: int, offset: int, length: int, actual_length: int, status: int) -> None:
    if cython.compiled:
        _wire.usbip_iso_put(_wire.ba_ptr(iso._raw) + i * ISO_DESC_SIZE, offset, length, actual_length, status)
    else:
        _ISO.pack_into(iso._raw, i * ISO_DESC_SIZE, offset, length, actual_length, status)


def _iso_word(iso: IsoPackets, i: int, k: int) -> int:
    """Word ``k`` (offset, length, actual_length, status: unsigned) of packet ``i`` (in range: the caller checked)."""
    if cython.compiled:
        r: int = _wire.usbip_get_be32(_wire.ba_ptr(iso._raw) + i * ISO_DESC_SIZE + 4 * k)
        return r
    w: int = _ISO_WORD.unpack_from(iso._raw, i * ISO_DESC_SIZE + 4 * k)[0]
    return w


def _iso_of(raw: bytearray) -> IsoPackets:
    """IsoPackets around ``raw`` (whole descriptors, at most USBIP_MAX_ISO_PACKETS: checked by the caller)."""
    iso = IsoPackets.__new__(IsoPackets)
    iso._n = len(raw) // ISO_DESC_SIZE
    iso._raw = raw
    return iso


def _iso_unpack(buf: bytes | bytearray | memoryview, offset: int, count: int) -> IsoPackets:
    """IsoPackets of the ``count`` descriptors at ``buf[offset:]`` (count and offset checked by the caller)."""
    size = count * ISO_DESC_SIZE
    if cython.compiled:
        raw = _wire.copy_out(buf, offset, size)  # one memcpy into a new bytearray; None if short
        if raw is None:
            raise ProtocolError("iso packet descriptors truncated")
    else:
        if len(buf) - offset < size:
            raise ProtocolError("iso packet descriptors truncated")
        raw = bytearray(memoryview(buf)[offset : offset + size])
    return _iso_of(raw)


class IsoPackets:
    """An array of isochronous packet descriptors: (offset, length, actual_length, status).

    Kept as they travel (16 big-endian bytes each, in ``_raw``): unpacking and packing
    them is a copy; the compiled build reads them with the C helpers of usbip_wire.h.
    """

    __slots__ = ("_n", "_raw")

    def __init__(self, count: int = 0) -> None:
        if count < 0 or count > USBIP_MAX_ISO_PACKETS:
            raise ValueError(f"number of iso packets {count} outside 0..{USBIP_MAX_ISO_PACKETS}")
        self._n = count
        self._raw = bytearray(count * ISO_DESC_SIZE)

    @classmethod
    def layout(cls, count: int, packet_size: int) -> IsoPackets:
        """``count`` packets of ``packet_size`` bytes each, back to back."""
        iso = IsoPackets(count)
        for i in range(count):
            _iso_put(iso, i, i * packet_size, packet_size, 0, 0)
        return iso

    @classmethod
    def from_list(cls, packets: Iterable[tuple[int, int, int, int]]) -> IsoPackets:
        items = [tuple(p) for p in packets]
        iso = IsoPackets(len(items))
        for i, p in enumerate(items):
            if len(p) != 4:
                raise ValueError("each iso packet is (offset, length, actual_length, status)")
            _iso_put(iso, i, p[0] & 0xFFFFFFFF, p[1] & 0xFFFFFFFF, p[2] & 0xFFFFFFFF, _s32(p[3] & 0xFFFFFFFF))
        return iso

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int, count: int) -> IsoPackets:
        if count < 0 or count > USBIP_MAX_ISO_PACKETS:
            raise ProtocolError(f"number_of_packets {count} outside 0..{USBIP_MAX_ISO_PACKETS}")
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        return _iso_unpack(buf, offset, count)

    def pack_into(self, buf: bytearray | memoryview, offset: int) -> int:
        size = len(self._raw)
        end = offset + size
        if offset < 0 or len(buf) < end:
            raise ValueError(f"buffer too small: need {size} bytes at offset {offset}")
        if cython.compiled:
            if type(buf) is bytearray:  # a memmove, no slice object
                _wire.ba_put(buf, offset, self._raw)
                return end
        buf[offset:end] = self._raw
        return end

    def to_bytes(self) -> bytes:
        return bytes(self._raw)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> tuple[int, int, int, int]:
        if i < 0:
            i += self._n
        if i < 0 or i >= self._n:
            raise IndexError("iso packet index out of range")
        if cython.compiled:
            return (_iso_word(self, i, 0), _iso_word(self, i, 1), _iso_word(self, i, 2), _s32(_iso_word(self, i, 3)))
        d = _ISO.unpack_from(self._raw, i * ISO_DESC_SIZE)
        return (d[0], d[1], d[2], d[3])

    def tolist(self) -> list[tuple[int, int, int, int]]:
        return list(_ISO.iter_unpack(self._raw))

    def set_result(self, i: int, actual_length: int, status: int = 0) -> None:
        if i < 0:
            i += self._n
        if i < 0 or i >= self._n:
            raise IndexError("iso packet index out of range")
        if cython.compiled:
            offset, length = _iso_word(self, i, 0), _iso_word(self, i, 1)
        else:
            offset, length, _actual, _status = _ISO.unpack_from(self._raw, i * ISO_DESC_SIZE)
        if actual_length < 0 or actual_length > length:
            raise ValueError(f"iso packet {i}: actual_length {actual_length} outside 0..{length}")
        _iso_put(self, i, offset, length, actual_length, status)

    def set_results(self, buffer_length: int, max_packet: int, clamp: bool = True) -> int:
        """Every packet's result at once, as a device moving at most ``max_packet`` bytes a packet sets it.

        A packet inside ``buffer_length`` gets status 0 and actual_length ``min(length, max_packet)``
        (``clamp``; without it a packet longer than ``max_packet`` gets -EOVERFLOW and 0 bytes); a
        packet outside the buffer gets -EOVERFLOW and 0 bytes. Returns the sum of the actual lengths
        (the URB's actual_length); :meth:`error_count` counts the packets that failed.
        """
        if buffer_length < 0 or max_packet < 0:
            raise ValueError("negative buffer length or max packet size")
        if cython.compiled:
            r: int = _wire.usbip_iso_set_results(
                _wire.ba_ptr(self._raw), self._n, buffer_length, max_packet, clamp, EOVERFLOW
            )
            return r
        total = 0
        for i, (off, length, _actual, _status) in enumerate(_ISO.iter_unpack(self._raw)):
            if off + length > buffer_length or (not clamp and length > max_packet):
                _ISO.pack_into(self._raw, i * ISO_DESC_SIZE, off, length, 0, EOVERFLOW)
                continue
            actual = min(length, max_packet)
            _ISO.pack_into(self._raw, i * ISO_DESC_SIZE, off, length, actual, 0)
            total += actual
        return total

    def fill(self, buf: Any, src: bytes | bytearray | memoryview) -> None:
        """Write ``src[:actual_length]`` at each packet's offset in ``buf`` (an IN device's data:
        :meth:`set_results` first). Raises ValueError if a packet is outside ``buf`` or longer than ``src``."""
        if cython.compiled:
            if _wire.iso_fill(buf, src, _wire.ba_ptr(self._raw), self._n) < 0:
                raise ValueError("iso packet outside the buffer or longer than the source")
            return
        dst = memoryview(buf).cast("B")
        s = memoryview(src).cast("B")
        for off, _length, actual, _status in _ISO.iter_unpack(self._raw):
            if not actual:
                continue
            if off + actual > len(dst) or actual > len(s):
                raise ValueError("iso packet outside the buffer or longer than the source")
            dst[off : off + actual] = s[:actual]

    def mismatches(self, buf: bytes | bytearray | memoryview, pattern: bytes | bytearray | memoryview) -> int:
        """How many packets with status 0 hold at their offset in ``buf`` other than the first
        actual_length bytes of ``pattern`` (an OUT device checking what it was sent)."""
        if cython.compiled:
            r: int = _wire.iso_mismatches(buf, pattern, _wire.ba_ptr(self._raw), self._n)
            return r
        data = memoryview(buf).cast("B")
        pat = memoryview(pattern).cast("B")
        bad = 0
        for off, _length, actual, status in _ISO.iter_unpack(self._raw):
            if status != 0:
                continue
            if off + actual > len(data) or actual > len(pat) or data[off : off + actual] != pat[:actual]:
                bad += 1
        return bad

    def payload(self, buf: bytes | bytearray | memoryview) -> memoryview | bytearray:
        """The IN data of a RET_SUBMIT: each packet's actual bytes back to back (stub_tx.c).

        A view of ``buf``'s first bytes when the packets already lie that way (full packets
        back to back, the usual case), else a copy gathered packet by packet."""
        if cython.compiled:
            total = _wire.usbip_iso_contiguous(_wire.ba_ptr(self._raw), self._n)
        else:
            total = 0
            for off, _length, actual, _status in _ISO.iter_unpack(self._raw):
                if actual and off != total:
                    total = -1
                    break
                total += actual
        if total >= 0:
            view = memoryview(buf)
            if total > len(view):
                raise ValueError("iso packet outside the buffer")
            return view if total == len(view) else view[:total]
        out = bytearray(self.total_actual())
        self.gather(buf, out)
        return out

    def total_length(self) -> int:
        """Sum of the packets' lengths (what the device is asked to move)."""
        if cython.compiled:
            r: int = _wire.usbip_iso_total_length(_wire.ba_ptr(self._raw), self._n)
            return r
        return sum([d[1] for d in _ISO.iter_unpack(self._raw)])

    def total_actual(self) -> int:
        if cython.compiled:
            r: int = _wire.usbip_iso_total(_wire.ba_ptr(self._raw), self._n)
            return r
        total = 0
        for d in _ISO.iter_unpack(self._raw):
            total += d[2]
        return total

    def error_count(self) -> int:
        if cython.compiled:
            r: int = _wire.usbip_iso_errors(_wire.ba_ptr(self._raw), self._n)
            return r
        count = 0
        for d in _ISO.iter_unpack(self._raw):
            if d[3] != 0:
                count += 1
        return count

    def _first_bad(self, buffer_length: int) -> int:
        """Index of the first packet past ``buffer_length`` or with actual > length; -1 if none."""
        if cython.compiled:
            r: int = _wire.usbip_iso_first_bad(_wire.ba_ptr(self._raw), self._n, buffer_length)
            return r
        for i, (off, length, actual, _status) in enumerate(_ISO.iter_unpack(self._raw)):
            if off + length > buffer_length or actual > length:
                return i
        return -1

    def validate(self, buffer_length: int, actual_length: int | None = None) -> None:
        """Each packet inside the buffer, actual <= length, and (if given) sum(actual) == actual_length."""
        bad = self._first_bad(buffer_length)
        if bad >= 0:
            off, length, actual, _status = self[bad]
            if off + length > buffer_length:
                raise ProtocolError(f"iso packet {bad} ({off}+{length}) overruns the {buffer_length}-byte buffer")
            raise ProtocolError(f"iso packet {bad} actual_length {actual} > length {length}")
        if actual_length is not None:
            total = self.total_actual()
            if total != actual_length:
                raise ProtocolError(f"iso actual_lengths sum to {total}, header says {actual_length}")

    def gather(self, src: bytes | bytearray | memoryview, dst: bytearray | memoryview) -> int:
        """Copy each packet's actual_length bytes from its offset in ``src`` to ``dst`` back to back.

        This is how a RET_SUBMIT carries iso IN data (stub_tx.c); returns the bytes written.
        """
        if cython.compiled:
            pos: int = _wire.iso_gather(src, dst, _wire.ba_ptr(self._raw), self._n)
            if pos < 0:
                raise ValueError("iso packet outside the buffer")
            return pos
        # memoryview to memoryview: a memcpy per packet, no intermediate bytes
        s = memoryview(src)
        d = memoryview(dst)
        slen = len(s)
        dlen = len(d)
        pos = 0
        for off, _length, actual, _status in _ISO.iter_unpack(self._raw):
            end = pos + actual
            if off + actual > slen or end > dlen:
                raise ValueError("iso packet outside the buffer")
            d[pos:end] = s[off : off + actual]
            pos = end
        return pos

    def spread(self, buf: bytearray | memoryview, actual_length: int) -> None:
        """In place: move packets received back to back at ``buf[0:actual_length]`` to their offsets.

        The receiver's half of iso IN (``usbip_pad_iso`` in usbip_common.c); packets
        are moved last to first so none is overwritten before it is moved.
        """
        if cython.compiled:
            total = self.total_actual()
            if total != actual_length:
                raise ProtocolError(f"iso actual_lengths sum to {total}, header says {actual_length}")
            r = _wire.iso_spread(buf, actual_length, _wire.ba_ptr(self._raw), self._n)
            if r == -1:
                raise ProtocolError("iso data larger than the buffer")
            if r < 0:
                raise ProtocolError("iso packet outside the buffer")
            return
        packets = self.tolist()  # one pass over the descriptors for the sum and the moves
        total = sum([p[2] for p in packets])
        if total != actual_length:
            raise ProtocolError(f"iso actual_lengths sum to {total}, header says {actual_length}")
        mv = memoryview(buf)
        n = len(mv)
        if actual_length > n:
            raise ProtocolError("iso data larger than the buffer")
        pos = actual_length
        for off, _length, actual, _status in reversed(packets):
            pos -= actual
            if off + actual > n:
                raise ProtocolError("iso packet outside the buffer")
            if off != pos and actual:
                mv[off : off + actual] = mv[pos : pos + actual]  # memoryview copies overlapping slices safely

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IsoPackets) and self.to_bytes() == other.to_bytes()

    def __repr__(self) -> str:
        return f"IsoPackets({self.tolist()!r})"


# ---------------------------------------------------------------- stream decoder
_CHUNK = 256 * 1024
_MIN_FREE = 16 * 1024


class Decoder:
    """Sans-I/O decoder of the URB phase: bytes in (any fragmentation), whole messages out.

    ``role="server"`` decodes CMD_SUBMIT / CMD_UNLINK (OUT payloads follow the
    header); ``role="client"`` decodes RET_SUBMIT / RET_UNLINK and needs to know
    which seqnums are IN transfers and how long their buffers are, given with
    :meth:`expect` before the submit goes out (the kernel leaves direction zero in
    RET_SUBMIT, so vhci also looks the URB up by seqnum).

    Payloads are memoryviews into buffers the decoder owns and never reuses, so
    they stay valid as long as the caller holds them. Large payloads are received
    straight into a buffer of their own (``get_buffer`` returns a view of it, for
    ``recv_into`` / ``asyncio.BufferedProtocol``).
    """

    def __init__(
        self,
        role: str = "server",
        max_transfer: int = DEFAULT_MAX_TRANSFER,
        max_iso_packets: int = USBIP_MAX_ISO_PACKETS,
        chunk_size: int = _CHUNK,
    ) -> None:
        if role not in ("server", "client"):
            raise ValueError("role must be 'server' or 'client'")
        self.role = role
        self.is_server = role == "server"
        self.max_transfer = max_transfer
        self.max_iso_packets = min(max_iso_packets, USBIP_MAX_ISO_PACKETS)
        self.chunk_size = max(chunk_size, 4096)
        self._buf = bytearray(self.chunk_size)
        self._start = 0  # first byte of the message being assembled
        self._end = 0  # end of valid data
        self._pending: Message | None = None  # header decoded, waiting for its body
        self._need = 0  # body bytes of _pending
        self._data_len = 0  # of which payload data
        self._expect: dict[int, int] = {}
        self._in_length = 0
        self.failed: ProtocolError | None = None

    # -- client bookkeeping
    def expect(self, seqnum: int, in_length: int) -> None:
        """Announce a submitted URB: ``in_length`` is its buffer length if IN, -1 if OUT."""
        self._expect[seqnum] = in_length

    def forget(self, seqnum: int) -> None:
        self._expect.pop(seqnum, None)

    @property
    def pending_body(self) -> int:
        """Body bytes (payload and iso descriptors) of the message being assembled; 0 between messages."""
        return self._need if self._pending is not None else 0

    @property
    def buffered(self) -> int:
        return self._end - self._start

    # -- input
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable view to receive into (asyncio.BufferedProtocol.get_buffer)."""
        if self.failed is not None:
            raise self.failed
        free = len(self._buf) - self._end
        have = self._end - self._start
        needed = (HEADER_SIZE + self._need if self._pending is not None else HEADER_SIZE) - have
        if free < needed or (free < _MIN_FREE and self._pending is None):
            self._compact()
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Message]:
        if self.failed is not None:
            raise self.failed
        if nbytes < 0 or self._end + nbytes > len(self._buf):
            raise ValueError("buffer_updated beyond the buffer")
        self._end += nbytes
        return self._parse()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Copy ``data`` in and return every message it completes."""
        if self.failed is not None:
            raise self.failed
        out: list[Message] = []
        mv = memoryview(data).cast("B")
        while len(mv):
            dst = self.get_buffer(len(mv))
            n = min(len(dst), len(mv))
            dst[:n] = mv[:n]
            dst.release()  # so that _compact can reuse the buffer (compiled)
            mv = mv[n:]
            out.extend(self.buffer_updated(n))
        return out

    # -- internals
    def _compact(self) -> None:
        """Move the unfinished message to the front of a buffer: a fresh one while payload views
        into the old one may be alive (they keep it), the same one (compiled) once none is."""
        have = self._end - self._start
        want = self.chunk_size
        if self._pending is not None:
            want = max(want, HEADER_SIZE + self._need)
        want = max(want, have)
        if cython.compiled and not _wire.ba_exported(self._buf) and len(self._buf) >= want:
            self._buf[0:have] = self._buf[self._start : self._end]
        else:
            new = bytearray(want)
            new[:have] = self._buf[self._start : self._end]
            self._buf = new
        self._start = 0
        self._end = have

    def _fail(self, msg: str) -> ProtocolError:
        self.failed = ProtocolError(msg)
        return self.failed

    def _parse(self) -> list[Message]:
        out: list[Message] = []
        buf = self._buf
        while True:
            avail = self._end - self._start
            msg = self._pending
            if msg is None:
                if avail < HEADER_SIZE:
                    break
                msg = self._header(buf, self._start)
                if self._need == 0:
                    if self._data_len == 0:
                        msg.data = memoryview(buf)[0:0]  # type: ignore[union-attr]
                    self._start += HEADER_SIZE
                    out.append(msg)
                    continue
                self._pending = msg
                # a body that does not fit gets a buffer of its own in get_buffer, when the caller
                # reads it: a server can refuse that allocation (pending_body) before it is made
                continue
            if avail < HEADER_SIZE + self._need:
                break
            body = self._start + HEADER_SIZE
            self._body(msg, buf, body)
            self._start = body + self._need
            self._pending = None
            out.append(msg)
        return out

    def _header(self, buf: bytearray, pos: int) -> Message:
        """Decode and check the header at ``buf[pos:]``; set ``_need`` and ``_data_len`` for its body."""
        try:
            msg = _decode(buf, pos)
        except ProtocolError as exc:
            raise self._fail(str(exc)) from None
        if self.is_server:
            if type(msg) is CmdSubmit:
                cs = msg
                tbl = cs.transfer_buffer_length
                if tbl < 0 or tbl > self.max_transfer:
                    raise self._fail(f"transfer_buffer_length {tbl} outside 0..{self.max_transfer}")
                np = cs.number_of_packets
                if np < -1 or np > self.max_iso_packets:
                    raise self._fail(f"number_of_packets {np} outside 0..{self.max_iso_packets}")
                if cs.direction != USBIP_DIR_OUT and cs.direction != USBIP_DIR_IN:
                    raise self._fail(f"direction {cs.direction} is neither 0 nor 1")
                data_len = tbl if cs.direction == USBIP_DIR_OUT else -1
                self._data_len = data_len
                self._need = max(data_len, 0) + max(np, 0) * ISO_DESC_SIZE
                return cs
            if type(msg) is CmdUnlink:
                self._data_len = -1
                self._need = 0
                return msg
            raise self._fail(f"a server does not accept command {msg.command}")
        if type(msg) is RetSubmit:
            rs = msg
            in_length = self._expect.pop(rs.seqnum, None)
            if in_length is None:
                raise self._fail(f"RET_SUBMIT for unknown seqnum {rs.seqnum}")
            np = rs.number_of_packets
            if np < -1 or np > self.max_iso_packets:
                raise self._fail(f"number_of_packets {np} outside 0..{self.max_iso_packets}")
            al = rs.actual_length
            limit = in_length if in_length >= 0 else self.max_transfer
            if al < 0 or al > limit:
                raise self._fail(f"actual_length {al} outside 0..{limit}")
            self._in_length = limit
            data_len = al if in_length >= 0 else -1
            self._data_len = data_len
            self._need = max(data_len, 0) + max(np, 0) * ISO_DESC_SIZE
            return rs
        if type(msg) is RetUnlink:
            self._data_len = -1
            self._need = 0
            return msg
        raise self._fail(f"a client does not accept command {msg.command}")

    def _body(self, msg: Message, buf: bytearray, pos: int) -> None:
        data_len = self._data_len
        if data_len >= 0:
            msg.data = memoryview(buf)[pos : pos + data_len]  # type: ignore[union-attr]
        np = msg.number_of_packets  # type: ignore[union-attr]
        if np <= 0:
            return
        iso = _iso_unpack(buf, pos + max(data_len, 0), np)  # np in 1..max_iso_packets: checked by _header
        try:
            if type(msg) is CmdSubmit:
                iso.validate(msg.transfer_buffer_length)
            else:
                # usbip_recv_iso: the packets' actual lengths must add up to actual_length
                iso.validate(self._in_length, msg.actual_length)  # type: ignore[union-attr]
        except ProtocolError as exc:
            raise self._fail(str(exc)) from None
        msg.iso = iso  # type: ignore[union-attr]


# ---------------------------------------------------------------- the URB a device is handed
class Urb:
    """One USB request block as the server hands it to a device.

    ``buffer`` is the transfer buffer: for OUT the bytes the client sent, for IN a
    writable buffer of ``transfer_buffer_length`` bytes the device fills (and
    reports how much through ``actual_length``). ``iso`` holds the isochronous
    packet descriptors (offsets/lengths in, actual_length/status out) or None.
    """

    __slots__ = (
        "actual_length",
        "buffer",
        "cancelled",
        "context",
        "direction",
        "done",
        "ep",
        "error_count",
        "interval",
        "iso",
        "number_of_packets",
        "on_complete",
        "seqnum",
        "setup",
        "start_frame",
        "status",
        "transfer_buffer_length",
        "transfer_flags",
        "unlink_seqnum",
    )

    def __init__(
        self,
        seqnum: int,
        ep: int,
        direction: int,
        transfer_buffer_length: int,
        buffer: memoryview | bytearray | bytes,
        setup: bytes = b"\0" * 8,
        transfer_flags: int = 0,
        start_frame: int = 0,
        number_of_packets: int = 0,
        interval: int = 0,
        iso: IsoPackets | None = None,
        on_complete: Callable[[Urb], None] | None = None,
    ) -> None:
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
        self.status = 0
        self.actual_length = 0
        self.error_count = 0
        self.on_complete = on_complete
        self.done = False
        self.cancelled = False
        self.unlink_seqnum = -1  # seqnum of the CMD_UNLINK that cancelled it (server bookkeeping)
        self.context: object = None  # for the device's own bookkeeping

    @property
    def is_in(self) -> bool:
        return self.direction == USBIP_DIR_IN

    def complete(self, status: int = 0, actual_length: int | None = None) -> None:
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

    def __repr__(self) -> str:
        d = "IN" if self.is_in else "OUT"
        return f"<Urb seq={self.seqnum} ep={self.ep} {d} len={self.transfer_buffer_length} status={self.status}>"


def urb_from_submit(msg: CmdSubmit, buffer: object, on_complete: Callable[[Urb], None] | None) -> Urb:
    """The server's Urb for a decoded CMD_SUBMIT (``buffer``: OUT data or the IN buffer)."""
    u = Urb.__new__(Urb)  # filled in here: no __init__ argument parsing on the hot path
    u.seqnum, u.ep, u.direction, u.transfer_flags = msg.seqnum, msg.ep, msg.direction, msg.transfer_flags
    u.transfer_buffer_length, u.start_frame = msg.transfer_buffer_length, msg.start_frame
    u.number_of_packets, u.interval = msg.number_of_packets, msg.interval
    u.setup, u.buffer, u.iso, u.on_complete = msg.setup, buffer, msg.iso, on_complete  # type: ignore[assignment]
    u.status = u.actual_length = u.error_count = 0
    u.done = u.cancelled = False
    u.unlink_seqnum = -1
    u.context = None
    return u


def ret_submit_header(urb: Urb, actual_length: int, number_of_packets: int, error_count: int) -> bytearray:
    """A fresh 48-byte RET_SUBMIT header for ``urb`` (status and start_frame from it)."""
    if cython.compiled:
        hdr: bytearray = _wire.ba_new(HEADER_SIZE)  # write_header fills all 48 bytes (setup: zeros)
        w = [USBIP_RET_SUBMIT, urb.seqnum, 0, 0, 0, urb.status, actual_length, urb.start_frame,
             number_of_packets, error_count]  # fmt: skip
        _wire.write_header(hdr, 0, w, None)
        return hdr
    hdr = bytearray(HEADER_SIZE)
    _RET_SUBMIT.pack_into(
        hdr,
        0,
        USBIP_RET_SUBMIT,
        urb.seqnum,
        0,
        0,
        0,
        urb.status,
        actual_length,
        urb.start_frame,
        number_of_packets,
        error_count,
    )
    return hdr


__all__ = [
    "IMPLEMENTATION",
    "CmdSubmit",
    "CmdUnlink",
    "Decoder",
    "IsoPackets",
    "RetSubmit",
    "RetUnlink",
    "Urb",
    "pack_cmd_submit",
    "pack_cmd_unlink",
    "pack_ret_submit",
    "pack_ret_unlink",
    "ret_submit_header",
    "unpack_header",
    "urb_from_submit",
]
