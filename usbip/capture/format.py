"""The capture file's format: pcapng blocks whose packets are usbmon binary records
(``struct mon_bin_hdr``, Documentation/usb/usbmon.rst; link type 220), and a reader for tests."""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from typing import Any

from .._version import __version__
from ..protocol.constants import XFER_BULK, XFER_CONTROL, XFER_INT, XFER_ISOC

log = logging.getLogger(__name__)

LINKTYPE_USB_LINUX_MMAPPED = 220
MON_HDR_SIZE = 64
ISODESC_SIZE = 16
EPB_HEAD = 28  # block type, total length, interface id, timestamp high/low, captured and original length
DEFAULT_SNAPLEN = 256 * 1024  # data bytes kept per record (Wireshark reads USB packets up to 128 MiB)

EV_SUBMIT = ord("S")
EV_COMPLETE = ord("C")
EV_ERROR = ord("E")
FLAG_NONE = ord("-")  # setup flag: no setup packet
FLAG_IN = ord("<")  # data flag: an IN submit carries no data
FLAG_OUT = ord(">")  # data flag: an OUT completion carries no data
FLAG_ERROR = ord("E")

#: usbmon's transfer types (xfer_to_pipe in mon_bin.c) from the USB endpoint types (XFER_*)
USBMON_XFER = {XFER_ISOC: 0, XFER_INT: 1, XFER_CONTROL: 2, XFER_BULK: 3}
MON_ISO, MON_INT, MON_CONTROL, MON_BULK = 0, 1, 2, 3

# the enhanced packet block's head and the usbmon header, packed in one go
PREFIX = struct.Struct("<7IQBBBBHBBqiiII8siiII")
_MON = struct.Struct("<QBBBBHBBqiiII8siiII")
_ISO_REC = struct.Struct("<ii")
_ISODESC = struct.Struct("<iIII")
_U32 = struct.Struct("<I")
TRAILER = tuple(struct.Struct("<" + "x" * pad + "I") for pad in range(4))  # padding (zeroed), total length
_PAD = (b"", b"\0", b"\0\0", b"\0\0\0")
NO_SETUP = bytes(8)
MASK32 = 0xFFFFFFFF

PREFIX_SIZE = PREFIX.size
assert PREFIX_SIZE == EPB_HEAD + MON_HDR_SIZE and _MON.size == MON_HDR_SIZE


# ---------------------------------------------------------------- pcapng blocks
def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + _PAD[-len(value) & 3]


def _block(btype: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", btype, total) + body + _U32.pack(total)


def section_header(application: str = f"cyusbip {__version__}") -> bytes:
    """A little-endian Section Header Block (section length unknown) naming the writer."""
    opts = _option(4, application.encode()) + _option(0, b"")  # shb_userappl, opt_endofopt
    return _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + opts)


def interface_description(snaplen: int, name: str = "usbip", description: str = "") -> bytes:
    """An Interface Description Block: link type 220 (usbmon, mmapped), microsecond timestamps."""
    opts = _option(2, name.encode())  # if_name
    if description:
        opts += _option(3, description.encode())  # if_description
    opts += _option(0, b"")
    return _block(1, struct.pack("<HHI", LINKTYPE_USB_LINUX_MMAPPED, 0, MON_HDR_SIZE + snaplen) + opts)


def file_header(snaplen: int = DEFAULT_SNAPLEN, description: str = "") -> bytes:
    """What every capture file starts with: the section header and the one interface."""
    return section_header() + interface_description(snaplen, description=description)


def usbmon_header(
    urb_id: int,
    event: int,
    xfer_type: int,
    epnum: int,
    devnum: int,
    busnum: int,
    flag_setup: int,
    flag_data: int,
    ts_sec: int,
    ts_usec: int,
    status: int,
    length: int,
    len_cap: int,
    setup: bytes = NO_SETUP,
    interval: int = 0,
    start_frame: int = 0,
    xfer_flags: int = 0,
    ndesc: int = 0,
) -> bytes:
    """The 64-byte ``struct usbmon_packet`` (little endian, as the section header says).

    ``setup`` is the union at offset 40: the setup packet of a control submit, or
    (error_count, numdesc) of an iso URB (see :func:`iso_info`).
    """
    return _MON.pack(
        urb_id,
        event,
        xfer_type,
        epnum,
        devnum,
        busnum,
        flag_setup,
        flag_data,
        ts_sec,
        ts_usec,
        status,
        length,
        len_cap,
        setup,
        interval,
        start_frame,
        xfer_flags & MASK32,
        ndesc,
    )


def iso_info(error_count: int, numdesc: int) -> bytes:
    """The 8-byte union of an iso URB's header: error_count, numdesc."""
    return _ISO_REC.pack(error_count, numdesc)


def iso_descriptors(packets: Sequence[tuple[int, int, int, int]], submit: bool) -> bytes:
    """``mon_bin_isodesc`` entries (status, offset, length, pad) from (offset, length, actual, status)
    tuples: a submit shows each packet's length, a completion its actual length."""
    out = bytearray(len(packets) * ISODESC_SIZE)
    pos = 0
    for off, length, actual, status in packets:
        _ISODESC.pack_into(out, pos, status, off & MASK32, (length if submit else actual) & MASK32, 0)
        pos += ISODESC_SIZE
    return bytes(out)


def packet_block(
    header: bytes, descs: bytes = b"", data: bytes | memoryview = b"", full_length: int | None = None, ts_ns: int = 0
) -> bytes:
    """An Enhanced Packet Block around a usbmon header (for tests and tools; the writer packs its own)."""
    cap = len(header) + len(descs) + len(data)
    orig = max(cap, len(header) + len(descs) + (len(data) if full_length is None else full_length))
    us = ts_ns // 1000
    body = struct.pack("<IIIII", 0, us >> 32, us & MASK32, cap, orig) + header + descs + bytes(data)
    return _block(6, body + _PAD[-cap & 3])


MON_FIELDS = (
    "id",
    "type",
    "xfer_type",
    "epnum",
    "devnum",
    "busnum",
    "flag_setup",
    "flag_data",
    "ts_sec",
    "ts_usec",
    "status",
    "length",
    "len_cap",
    "setup",
    "interval",
    "start_frame",
    "xfer_flags",
    "ndesc",
)


def read_records(data: bytes) -> list[dict[str, Any]]:
    """The usbmon records of a little-endian pcapng written by :class:`CaptureFile` (for tests and
    tools): each the header's fields (``MON_FIELDS``) plus ``descs`` ((status, offset, length)
    per iso packet), ``data``, ``caplen``, ``origlen`` and ``ts_us`` (the block's timestamp).
    Raises ValueError on anything else."""
    out: list[dict[str, Any]] = []
    pos = 0
    linktype = None
    while pos < len(data):
        if len(data) - pos < 12:
            raise ValueError(f"truncated block at {pos}")
        btype, total = struct.unpack_from("<II", data, pos)
        if total < 12 or total % 4 or pos + total > len(data):
            raise ValueError(f"bad block length {total} at {pos}")
        if _U32.unpack_from(data, pos + total - 4)[0] != total:
            raise ValueError(f"block at {pos}: trailing length differs")
        if btype == 0x0A0D0D0A:
            if _U32.unpack_from(data, pos + 8)[0] != 0x1A2B3C4D:
                raise ValueError("not a little-endian section")
        elif btype == 1:
            linktype = struct.unpack_from("<H", data, pos + 8)[0]
        elif btype == 6:
            if linktype != LINKTYPE_USB_LINUX_MMAPPED:
                raise ValueError(f"link type {linktype}, not {LINKTYPE_USB_LINUX_MMAPPED}")
            _ifid, hi, lo, caplen, origlen = struct.unpack_from("<5I", data, pos + 8)
            body = data[pos + EPB_HEAD : pos + EPB_HEAD + caplen]
            rec = dict(zip(MON_FIELDS, _MON.unpack_from(body, 0), strict=True))
            nd = rec["ndesc"] * ISODESC_SIZE
            rec["descs"] = [_ISODESC.unpack_from(body, MON_HDR_SIZE + i)[:3] for i in range(0, nd, ISODESC_SIZE)]
            rec["data"] = bytes(body[MON_HDR_SIZE + nd :])
            rec.update(caplen=caplen, origlen=origlen, ts_us=hi << 32 | lo)
            out.append(rec)
        pos += total
    return out
