"""Pure-Python reference of the URB-phase codec (headers, iso descriptors, stream decoder).

The compiled twin is ``usbip.protocol._codec`` with the same names and behaviour;
``usbip.protocol`` picks one at import. Layouts are those of ``struct usbip_header``
and ``struct usbip_iso_packet_descriptor`` in ``drivers/usb/usbip/usbip_common.h``
(see also ``Documentation/usb/usbip_protocol.rst``): every field a big-endian 32-bit
integer except the 8-byte setup packet, which travels exactly as on USB.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any

from .constants import (
    DEFAULT_MAX_TRANSFER,
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

IMPLEMENTATION = "python"

_BASIC = struct.Struct(">IIIII")
_CMD_SUBMIT = struct.Struct(">IIIIIIiiii8s")
_RET_SUBMIT = struct.Struct(">IIIIIiiiii8x")
_CMD_UNLINK = struct.Struct(">IIIIII24x")
_RET_UNLINK = struct.Struct(">IIIIIi24x")
_ISO = struct.Struct(">IIIi")
_U32 = struct.Struct(">I")
_ZERO_SETUP = bytes(8)
assert _CMD_SUBMIT.size == _RET_SUBMIT.size == _CMD_UNLINK.size == _RET_UNLINK.size == HEADER_SIZE


def _s32(v: int) -> int:
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
    if len(setup) != 8:
        raise ValueError("setup packet must be 8 bytes")
    _CMD_SUBMIT.pack_into(
        buf,
        offset,
        USBIP_CMD_SUBMIT,
        seqnum,
        devid,
        direction,
        ep,
        transfer_flags,
        transfer_buffer_length,
        start_frame,
        number_of_packets,
        interval,
        bytes(setup),
    )
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
    _RET_SUBMIT.pack_into(
        buf,
        offset,
        USBIP_RET_SUBMIT,
        seqnum,
        devid,
        direction,
        ep,
        status,
        actual_length,
        start_frame,
        number_of_packets,
        error_count,
    )
    return offset + HEADER_SIZE


def pack_cmd_unlink(
    buf: bytearray | memoryview, offset: int, seqnum: int, devid: int, direction: int, ep: int, unlink_seqnum: int
) -> int:
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
    _RET_UNLINK.pack_into(buf, offset, USBIP_RET_UNLINK, seqnum, devid, direction, ep, status)
    return offset + HEADER_SIZE


def unpack_header(buf: bytes | bytearray | memoryview, offset: int = 0) -> Message:
    """Decode one 48-byte header (no payload); raise ProtocolError on an unknown command."""
    if offset < 0:
        raise ValueError(f"negative offset {offset}")
    if len(buf) - offset < HEADER_SIZE:
        raise ProtocolError(f"URB header needs {HEADER_SIZE} bytes, got {len(buf) - offset}")
    command, seqnum, devid, direction, ep = _BASIC.unpack_from(buf, offset)
    if command == USBIP_CMD_SUBMIT:
        f = _CMD_SUBMIT.unpack_from(buf, offset)
        return CmdSubmit(seqnum, devid, direction, ep, f[5], f[6], f[7], f[8], f[9], f[10])
    if command == USBIP_RET_SUBMIT:
        f = _RET_SUBMIT.unpack_from(buf, offset)
        return RetSubmit(seqnum, f[5], f[6], f[7], f[8], f[9], devid, direction, ep)
    if command == USBIP_CMD_UNLINK:
        f = _CMD_UNLINK.unpack_from(buf, offset)
        return CmdUnlink(seqnum, devid, direction, ep, f[5])
    if command == USBIP_RET_UNLINK:
        f = _RET_UNLINK.unpack_from(buf, offset)
        return RetUnlink(seqnum, f[5], devid, direction, ep)
    raise ProtocolError(f"unknown USB/IP command 0x{command:08x}")


# ---------------------------------------------------------------- iso descriptors
class IsoPackets:
    """An array of isochronous packet descriptors: (offset, length, actual_length, status)."""

    __slots__ = ("_d",)

    def __init__(self, count: int = 0) -> None:
        if count < 0 or count > USBIP_MAX_ISO_PACKETS:
            raise ValueError(f"number of iso packets {count} outside 0..{USBIP_MAX_ISO_PACKETS}")
        self._d = [[0, 0, 0, 0] for _ in range(count)]

    @classmethod
    def layout(cls, count: int, packet_size: int) -> IsoPackets:
        """``count`` packets of ``packet_size`` bytes each, back to back."""
        iso = cls(count)
        for i, d in enumerate(iso._d):
            d[0] = i * packet_size
            d[1] = packet_size
        return iso

    @classmethod
    def from_list(cls, packets: Iterable[tuple[int, int, int, int]]) -> IsoPackets:
        items = [list(p) for p in packets]
        iso = cls(len(items))
        for d, p in zip(iso._d, items, strict=True):
            d[0], d[1], d[2], d[3] = (p[0] & 0xFFFFFFFF, p[1] & 0xFFFFFFFF, p[2] & 0xFFFFFFFF, _s32(p[3] & 0xFFFFFFFF))
        return iso

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int, count: int) -> IsoPackets:
        if count < 0 or count > USBIP_MAX_ISO_PACKETS:
            raise ProtocolError(f"number_of_packets {count} outside 0..{USBIP_MAX_ISO_PACKETS}")
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        if len(buf) - offset < count * ISO_DESC_SIZE:
            raise ProtocolError("iso packet descriptors truncated")
        iso = cls(count)
        for i, d in enumerate(iso._d):
            d[:] = _ISO.unpack_from(buf, offset + i * ISO_DESC_SIZE)
        return iso

    def pack_into(self, buf: bytearray | memoryview, offset: int) -> int:
        for d in self._d:
            _ISO.pack_into(buf, offset, *d)
            offset += ISO_DESC_SIZE
        return offset

    def to_bytes(self) -> bytes:
        out = bytearray(len(self._d) * ISO_DESC_SIZE)
        self.pack_into(out, 0)
        return bytes(out)

    def __len__(self) -> int:
        return len(self._d)

    def __getitem__(self, i: int) -> tuple[int, int, int, int]:
        d = self._d[i]
        return (d[0], d[1], d[2], d[3])

    def tolist(self) -> list[tuple[int, int, int, int]]:
        return [(d[0], d[1], d[2], d[3]) for d in self._d]

    def set_result(self, i: int, actual_length: int, status: int = 0) -> None:
        d = self._d[i]
        if actual_length < 0 or actual_length > d[1]:
            raise ValueError(f"iso packet {i}: actual_length {actual_length} outside 0..{d[1]}")
        d[2] = actual_length
        d[3] = status

    def total_actual(self) -> int:
        return sum(d[2] for d in self._d)

    def error_count(self) -> int:
        return sum(1 for d in self._d if d[3] != 0)

    def validate(self, buffer_length: int, actual_length: int | None = None) -> None:
        """Each packet inside the buffer, actual <= length, and (if given) sum(actual) == actual_length."""
        total = 0
        for i, (off, length, actual, _status) in enumerate(self._d):
            if off + length > buffer_length:
                raise ProtocolError(f"iso packet {i} ({off}+{length}) overruns the {buffer_length}-byte buffer")
            if actual > length:
                raise ProtocolError(f"iso packet {i} actual_length {actual} > length {length}")
            total += actual
        if actual_length is not None and total != actual_length:
            raise ProtocolError(f"iso actual_lengths sum to {total}, header says {actual_length}")

    def gather(self, src: bytes | bytearray | memoryview, dst: bytearray | memoryview) -> int:
        """Copy each packet's actual_length bytes from its offset in ``src`` to ``dst`` back to back.

        This is how a RET_SUBMIT carries iso IN data (stub_tx.c); returns the bytes written.
        """
        pos = 0
        for off, _length, actual, _status in self._d:
            if off + actual > len(src) or pos + actual > len(dst):
                raise ValueError("iso packet outside the buffer")
            dst[pos : pos + actual] = src[off : off + actual]
            pos += actual
        return pos

    def spread(self, buf: bytearray | memoryview, actual_length: int) -> None:
        """In place: move packets received back to back at ``buf[0:actual_length]`` to their offsets.

        The receiver's half of iso IN (``usbip_pad_iso`` in usbip_common.c); packets
        are moved last to first so none is overwritten before it is moved.
        """
        mv = memoryview(buf)
        total = self.total_actual()
        if total != actual_length:
            raise ProtocolError(f"iso actual_lengths sum to {total}, header says {actual_length}")
        if actual_length > len(mv):
            raise ProtocolError("iso data larger than the buffer")
        pos = actual_length
        for off, _length, actual, _status in reversed(self._d):
            pos -= actual
            if off + actual > len(mv):
                raise ProtocolError("iso packet outside the buffer")
            if off != pos and actual:
                mv[off : off + actual] = bytes(mv[pos : pos + actual])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IsoPackets) and self.tolist() == other.tolist()

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
            mv = mv[n:]
            out.extend(self.buffer_updated(n))
        return out

    # -- internals
    def _compact(self) -> None:
        """Move the unfinished message into a fresh buffer (old one stays with its views)."""
        have = self._end - self._start
        want = self.chunk_size
        if self._pending is not None:
            want = max(want, HEADER_SIZE + self._need)
        new = bytearray(max(want, have))
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
                msg, need, data_len = self._header(buf, self._start)
                if need == 0:
                    if data_len == 0:
                        msg.data = memoryview(buf)[0:0]  # type: ignore[union-attr]
                    self._start += HEADER_SIZE
                    out.append(msg)
                    continue
                self._pending, self._need, self._data_len = msg, need, data_len
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

    def _header(self, buf: bytearray, pos: int) -> tuple[Message, int, int]:
        try:
            msg = unpack_header(buf, pos)
        except ProtocolError as exc:
            raise self._fail(str(exc)) from None
        if self.is_server:
            if isinstance(msg, CmdSubmit):
                tbl = msg.transfer_buffer_length
                if tbl < 0 or tbl > self.max_transfer:
                    raise self._fail(f"transfer_buffer_length {tbl} outside 0..{self.max_transfer}")
                np = msg.number_of_packets
                if np < -1 or np > self.max_iso_packets:
                    raise self._fail(f"number_of_packets {np} outside 0..{self.max_iso_packets}")
                if msg.direction not in (USBIP_DIR_OUT, USBIP_DIR_IN):
                    raise self._fail(f"direction {msg.direction} is neither 0 nor 1")
                data_len = tbl if msg.direction == USBIP_DIR_OUT else -1
                return msg, max(data_len, 0) + max(np, 0) * ISO_DESC_SIZE, data_len
            if isinstance(msg, CmdUnlink):
                return msg, 0, -1
            raise self._fail(f"a server does not accept command {msg.command}")
        if isinstance(msg, RetSubmit):
            in_length = self._expect.pop(msg.seqnum, None)
            if in_length is None:
                raise self._fail(f"RET_SUBMIT for unknown seqnum {msg.seqnum}")
            np = msg.number_of_packets
            if np < -1 or np > self.max_iso_packets:
                raise self._fail(f"number_of_packets {np} outside 0..{self.max_iso_packets}")
            al = msg.actual_length
            limit = in_length if in_length >= 0 else self.max_transfer
            if al < 0 or al > limit:
                raise self._fail(f"actual_length {al} outside 0..{limit}")
            self._in_length = limit
            data_len = al if in_length >= 0 else -1
            return msg, max(data_len, 0) + max(np, 0) * ISO_DESC_SIZE, data_len
        if isinstance(msg, RetUnlink):
            return msg, 0, -1
        raise self._fail(f"a client does not accept command {msg.command}")

    def _body(self, msg: Message, buf: bytearray, pos: int) -> None:
        data_len = self._data_len
        if data_len >= 0:
            msg.data = memoryview(buf)[pos : pos + data_len]  # type: ignore[union-attr]
        np = msg.number_of_packets  # type: ignore[union-attr]
        if np <= 0:
            return
        iso = IsoPackets.unpack(buf, pos + max(data_len, 0), np)
        try:
            if isinstance(msg, CmdSubmit):
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
    return Urb(
        msg.seqnum,
        msg.ep,
        msg.direction,
        msg.transfer_buffer_length,
        buffer,  # type: ignore[arg-type]
        msg.setup,
        msg.transfer_flags,
        msg.start_frame,
        msg.number_of_packets,
        msg.interval,
        msg.iso,
        on_complete,
    )


def ret_submit_header(urb: Urb, actual_length: int, number_of_packets: int, error_count: int) -> bytearray:
    """A fresh 48-byte RET_SUBMIT header for ``urb`` (status and start_frame from it)."""
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
