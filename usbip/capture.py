"""URB capture: every submit, completion and unlink written as pcapng that Wireshark decodes as USB.

The file holds one pcapng section with one interface of link type
``LINKTYPE_USB_LINUX_MMAPPED`` (220): each packet is the 64-byte header of the kernel's usbmon
binary API (``struct mon_bin_hdr``, Documentation/usb/usbmon.rst), then for isochronous URBs
``ndesc`` 16-byte ``mon_bin_isodesc`` entries, then the data. Events are usbmon's:

* ``S`` submit: OUT data (IN: none, data flag ``<``); for control URBs the setup packet
  (setup flag 0), for iso URBs the descriptors with each packet's length.
* ``C`` complete: IN data (OUT: none, data flag ``>``), status 0 or a negative errno, the
  actual length; an URB cancelled by CMD_UNLINK completes with -ECONNRESET, as usbmon shows
  it; an URB still pending when the client connection ends, client side, with -ENODEV.
* ``E`` error: the server refused the URB without handing it to the device (no such
  endpoint, a control request whose wLength is not its length, ...), like usbmon's
  submit error after an ``S``.

Bus and device numbers are the exported device's busnum and devnum (devnum & 0xff: usbmon's
field is one byte), so server and client captures of one import agree. The URB id is
``connection id << 32 | seqnum``, connection ids counting from 1 per capture file.

Writing never blocks the event loop: records go into a buffer (one lock per record) that a
writer thread drains with ``os.write``. When the disk does not keep up and ``max_buffer``
bytes are waiting, new records are dropped and counted (a log line says how many); a failing
write (a full disk) is logged, its records are lost and counted, the file is cut back to its
last whole block, and writing resumes when the disk does. Nothing of this reaches the caller.

Size: with ``max_bytes`` a file never grows beyond it. With ``files=1`` capturing then stops
(a log line says so); with ``files=N`` the file is rotated: FILE becomes FILE.1, FILE.1
FILE.2, ... and FILE.(N-1) is removed, each file a complete pcapng of its own.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

from ._version import __version__
from .protocol.constants import ECONNRESET, ENODEV, XFER_BULK, XFER_CONTROL, XFER_INT, XFER_ISOC

log = logging.getLogger(__name__)

LINKTYPE_USB_LINUX_MMAPPED = 220
MON_HDR_SIZE = 64
ISODESC_SIZE = 16
EPB_HEAD = 28  # block type, total length, interface id, timestamp high/low, captured and original length
DEFAULT_SNAPLEN = 256 * 1024  # data bytes kept per record (Wireshark reads USB packets up to 128 MiB)
DEFAULT_MAX_MB = 100.0
DEFAULT_MAX_BUFFER = 16 * 1024 * 1024
CHUNK = 256 * 1024  # records are packed into buffers of this size; a full one wakes the writer
FLUSH_INTERVAL = 0.5  # seconds: the writer wakes this often anyway
REPORT_INTERVAL = 60.0  # seconds between two log lines about the same lasting trouble

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
_PREFIX = struct.Struct("<7IQBBBBHBBqiiII8siiII")
_MON = struct.Struct("<QBBBBHBBqiiII8siiII")
_ISO_REC = struct.Struct("<ii")
_ISODESC = struct.Struct("<iIII")
_U32 = struct.Struct("<I")
_TRAILER = tuple(struct.Struct("<" + "x" * pad + "I") for pad in range(4))  # padding (zeroed), total length
_PAD = (b"", b"\0", b"\0\0", b"\0\0\0")
_NO_SETUP = bytes(8)
_MASK32 = 0xFFFFFFFF
_os_writev = os.writev  # the writer thread's one system call (tests replace it to play a full disk)
IOV_MAX = 1024

PREFIX_SIZE = _PREFIX.size
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
    setup: bytes = _NO_SETUP,
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
        xfer_flags & _MASK32,
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
        _ISODESC.pack_into(out, pos, status, off & _MASK32, (length if submit else actual) & _MASK32, 0)
        pos += ISODESC_SIZE
    return bytes(out)


def packet_block(
    header: bytes, descs: bytes = b"", data: bytes | memoryview = b"", full_length: int | None = None, ts_ns: int = 0
) -> bytes:
    """An Enhanced Packet Block around a usbmon header (for tests and tools; the writer packs its own)."""
    cap = len(header) + len(descs) + len(data)
    orig = max(cap, len(header) + len(descs) + (len(data) if full_length is None else full_length))
    us = ts_ns // 1000
    body = struct.pack("<IIIII", 0, us >> 32, us & _MASK32, cap, orig) + header + descs + bytes(data)
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


# ---------------------------------------------------------------- the file and its writer thread
class CaptureFile:
    """A pcapng capture file written by a thread; :meth:`record` is safe to call from the loop.

    ``max_bytes``: bound of one file (None or 0: no bound); ``files``: 1 to stop at the bound,
    N to keep FILE and FILE.1 .. FILE.(N-1). A path that is not a regular file (a FIFO for a
    live ``wireshark -k -i FIFO``, started first: opening waits for the reader; /dev/null) is
    neither bounded nor rotated. ``snaplen`` bounds the data kept
    per record; ``max_buffer`` the bytes waiting for the disk before records are dropped.
    """

    def __init__(
        self,
        path: str,
        max_bytes: int | None = int(DEFAULT_MAX_MB * 1024 * 1024),
        files: int = 1,
        snaplen: int = DEFAULT_SNAPLEN,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        description: str = "",
    ) -> None:
        if files < 1:
            raise ValueError(f"capture files must be at least 1, not {files}")
        if snaplen < 0:
            raise ValueError(f"snaplen must not be negative, not {snaplen}")
        self.path = path
        self.files = files
        self.snaplen = snaplen
        self.max_buffer = max_buffer
        self._header = file_header(snaplen, description)
        if max_bytes and max_bytes < len(self._header) + 4096:
            raise ValueError(f"capture size bound {max_bytes} bytes is too small (at least {len(self._header) + 4096})")
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        self.max_bytes = max_bytes if max_bytes and self.regular else 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._written = threading.Condition(self._lock)
        self._kicked = False
        self._buf = bytearray()  # the chunk records go into: never resized, handed over when full
        self._view = memoryview(self._buf)  # data is copied through it (bytearray slice assignment copies twice)
        self._pos = 0
        self._buf_records = 0
        self._chunks: list[tuple[bytearray, int, int, bool]] = []  # (chunk, bytes used, records, rotate after)
        self._free: list[bytearray] = []  # written chunks to fill again (fresh memory costs page faults)
        self._held = 0  # bytes buffered, not yet written
        self._file_bytes = len(self._header)  # what the current file holds once everything is written
        self._good = 0  # bytes of whole blocks in the current file on disk
        self._closing = False
        self.stopped = False
        self.closed = False
        # counters
        self.records = 0  # records accepted into the buffer
        self.written = 0  # records written to disk
        self.dropped = 0  # records dropped: the buffer was full (disk too slow), or larger than a whole file
        self.lost = 0  # records lost to failed writes
        self.rotations = 0
        self.write_errors = 0
        self.error: OSError | None = None  # the last write error, None once writing works again
        self._last_drop_report = 0
        self._last_drop_time = 0.0
        self._last_error_report = 0.0
        self._thread = threading.Thread(target=self._run, name=f"capture {path}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<CaptureFile {self.path} records={self.records} dropped={self.dropped} lost={self.lost}>"

    def counters(self) -> dict[str, int | str]:
        """What the capture did so far (``usbipd --metrics``)."""
        return {
            "path": self.path,
            "records": self.records,
            "written": self.written,
            "dropped": self.dropped,
            "lost": self.lost,
            "rotations": self.rotations,
            "write_errors": self.write_errors,
        }

    # ------------------------------------------------------------ sessions
    def session(self, busnum: int, devnum: int) -> UrbCapture:
        """The capture of one server connection (its own id: the high half of every URB id)."""
        return UrbCapture(self, next(self._ids), busnum, devnum)

    def client_session(self, busnum: int, devnum: int) -> ClientCapture:
        """The capture of one imported device driven from user space."""
        return ClientCapture(self, next(self._ids), busnum, devnum)

    # ------------------------------------------------------------ the hot path (event loop)
    def record(
        self,
        urb_id: int,
        event: int,
        xfer: int,
        epnum: int,
        devnum: int,
        busnum: int,
        flag_setup: int,
        flag_data: int,
        status: int,
        length: int,
        setup: bytes,
        interval: int,
        start_frame: int,
        flags: int,
        ndesc: int,
        descs: bytes | None,
        data: Any,
        full: int,
    ) -> None:
        """Buffer one usbmon record; ``data`` (a buffer or None) is copied now, up to ``snaplen``."""
        if self.stopped:
            return
        n = 0
        if data is not None:
            n = len(data)
            if n > self.snaplen:
                data = data[: self.snaplen]
                n = self.snaplen
        dlen = ndesc * ISODESC_SIZE if descs else 0
        cap = MON_HDR_SIZE + dlen + n
        pad = -cap & 3
        total = EPB_HEAD + cap + pad + 4
        us = time.time_ns() // 1000
        with self._lock:
            if self._held + total > self.max_buffer:
                if not self.stopped:
                    self.dropped += 1
                return
            if self.stopped:
                return
            if self.max_bytes and self._file_bytes + total > self.max_bytes and not self._at_bound(total):
                return
            buf = self._buf
            pos = self._pos
            if pos + total > len(buf):
                if pos:
                    self._chunks.append((buf, pos, self._buf_records, False))
                    self._buf_records = 0
                    if not self._kicked:
                        self._kicked = True
                        self._wake.set()
                free = self._free
                buf = self._buf = free.pop() if free and total <= CHUNK else bytearray(max(total, CHUNK))
                self._view = memoryview(buf)
                pos = 0
            _PREFIX.pack_into(
                buf,
                pos,
                6,
                total,
                0,
                us >> 32,
                us & _MASK32,
                cap,
                MON_HDR_SIZE + dlen + (full if full > n else n),
                urb_id,
                event,
                xfer,
                epnum,
                devnum,
                busnum,
                flag_setup,
                flag_data,
                us // 1_000_000,
                us % 1_000_000,
                status,
                length,
                dlen + n,
                setup,
                interval,
                start_frame,
                flags & _MASK32,
                ndesc,
            )
            pos += PREFIX_SIZE
            if descs is not None:  # dlen > 0
                self._view[pos : pos + dlen] = descs
                pos += dlen
            if n:
                self._view[pos : pos + n] = data
                pos += n
            _TRAILER[pad].pack_into(buf, pos, total)
            self._pos = pos + pad + 4
            self._buf_records += 1
            self.records += 1
            self._held += total
            self._file_bytes += total

    def _at_bound(self, total: int) -> bool:
        """The current file cannot take ``total`` more bytes: rotate (True: write it) or stop (False).

        Called with the lock held. A record larger than a whole file is dropped (counted).
        """
        if self.files > 1:
            if len(self._header) + total > self.max_bytes:
                self.dropped += 1
                return False
            self._chunks.append((self._buf, self._pos, self._buf_records, True))
            self._buf = bytearray()
            self._pos = 0
            self._buf_records = 0
            self._file_bytes = len(self._header)
            self._wake.set()
            return True
        self.stopped = True
        log.warning(
            "capture %s reached its size bound (%.2f MiB): capturing stopped (--capture-files N rotates instead)",
            self.path,
            self.max_bytes / (1024 * 1024),
        )
        return False

    # ------------------------------------------------------------ the writer thread
    def _run(self) -> None:
        try:
            while True:
                self._wake.wait(FLUSH_INTERVAL)
                with self._lock:
                    self._wake.clear()
                    self._kicked = False
                    if self._pos:
                        self._chunks.append((self._buf, self._pos, self._buf_records, False))
                        self._buf = bytearray()
                        self._pos = 0
                        self._buf_records = 0
                    chunks, self._chunks = self._chunks, []
                    closing = self._closing
                # one writev per file and pass: the thread needs the GIL back after each system call,
                # which a busy event loop hands over only every switch interval (5 ms)
                batch: list[memoryview] = []
                nrec = 0
                for buf, used, n, rotate in chunks:
                    if used:
                        batch.append(memoryview(buf)[:used])
                        nrec += n
                    if rotate:
                        self._write(batch, nrec)
                        batch, nrec = [], 0
                        self._rotate()
                self._write(batch, nrec)  # with nothing to write, a new file gets its header
                with self._lock:
                    for buf, used, _n, _rotate in chunks:
                        self._held -= used
                        if len(buf) == CHUNK and len(self._free) < 4:
                            self._free.append(buf)
                    self._written.notify_all()
                self._report_drops()
                if closing:
                    return
        except Exception:  # never let the thread die silently
            log.exception("capture %s: writer failed; capturing stopped", self.path)
            with self._lock:
                self.stopped = True
                self._held = 0
                self._written.notify_all()

    def _write(self, views: list[memoryview], nrec: int) -> None:
        if not views and self._good:
            return
        if self._good == 0:  # a file starts with its header (again after a failed first write)
            views.insert(0, memoryview(self._header))
        size = sum(len(v) for v in views)
        try:
            while views:
                k = _os_writev(self._fd, views[:IOV_MAX])
                if k <= 0:
                    raise OSError(errno.EIO, "write returned 0")
                while views and k >= len(views[0]):
                    k -= len(views.pop(0))
                if k:
                    views[0] = views[0][k:]
        except OSError as exc:
            self.write_errors += 1
            self.lost += nrec
            self._write_failed(exc)
            if self.regular:
                try:  # keep the file readable: cut it back to its last whole block
                    os.ftruncate(self._fd, self._good)
                    os.lseek(self._fd, self._good, os.SEEK_SET)
                except OSError:
                    pass
            return
        self._good += size
        self.written += nrec
        if self.error is not None:
            log.warning("capture %s: writing again (%d records lost while it failed)", self.path, self.lost)
            self.error = None

    def _write_failed(self, exc: OSError) -> None:
        now = time.monotonic()
        if self.error is None or now - self._last_error_report >= REPORT_INTERVAL:
            log.error(
                "capture %s: cannot write: %s; these records are lost (%d so far), nothing else is affected",
                self.path,
                exc.strerror or exc,
                self.lost,
            )
            self._last_error_report = now
        self.error = exc

    def _report_drops(self) -> None:
        dropped = self.dropped
        if dropped == self._last_drop_report:
            return
        now = time.monotonic()
        if self._last_drop_report and now - self._last_drop_time < REPORT_INTERVAL:
            return
        log.warning(
            "capture %s: %d records dropped so far: the disk does not keep up (%d MiB wait at most)",
            self.path,
            dropped,
            self.max_buffer >> 20,
        )
        self._last_drop_report = dropped
        self._last_drop_time = now

    def _rotate(self) -> None:
        """FILE -> FILE.1 -> ... -> FILE.(files-1); a new FILE (its header goes with its first write)."""
        try:
            for i in range(self.files - 1, 0, -1):
                src = self.path if i == 1 else f"{self.path}.{i - 1}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i}")
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.error("capture %s: cannot rotate: %s; writing on in the same file", self.path, exc.strerror or exc)
            return
        os.close(self._fd)
        self._fd = fd
        self._good = 0
        self.rotations += 1
        log.info("capture %s: rotated (%d so far)", self.path, self.rotations)

    # ------------------------------------------------------------ flush / close
    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (blocking) until everything recorded so far is written or lost; False on timeout."""
        end = time.monotonic() + timeout
        with self._lock:
            while self._held > 0 and not self.closed:
                self._wake.set()
                left = end - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._written.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is buffered (waiting at most ``timeout`` s) and close the file."""
        if self.closed:
            return
        with self._lock:
            self._closing = True
            self.stopped = True  # what comes after close() is not recorded
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("capture %s: the disk did not take the last %d bytes in %.0f s", self.path, self._held, timeout)
            return  # the daemon thread still owns the descriptor
        self.closed = True
        os.close(self._fd)
        level = logging.WARNING if self.dropped or self.lost else logging.INFO
        log.log(
            level,
            "capture %s: %d records written, %d dropped, %d lost to write errors",
            self.path,
            self.written,
            self.dropped,
            self.lost,
        )

    def stats(self) -> dict[str, int]:
        return {
            "records": self.records,
            "written": self.written,
            "dropped": self.dropped,
            "lost": self.lost,
            "rotations": self.rotations,
            "buffered_bytes": self._held,
        }


def _mon_xfer(xfer: int | None, ep: int, iso: bool) -> int:
    if iso:
        return MON_ISO
    if xfer is None:
        return MON_CONTROL if ep == 0 else MON_BULK
    return USBMON_XFER.get(xfer, MON_BULK)


class UrbCapture:
    """The server side of one connection: records of the :class:`~usbip.protocol.Urb` objects
    the session hands to its device."""

    __slots__ = ("_xfer", "busnum", "devnum", "file", "id_base")

    def __init__(self, file: CaptureFile, conn_id: int, busnum: int, devnum: int) -> None:
        self.file = file
        self.id_base = (conn_id & _MASK32) << 32
        self.busnum = busnum & 0xFFFF
        self.devnum = devnum & 0xFF
        self._xfer: dict[int, int] = {}  # seqnum -> usbmon transfer type of URBs submitted

    def submit(self, urb: Any, xfer: int | None) -> None:
        """The ``S`` record of ``urb`` (``xfer``: its endpoint's XFER_* type, None if unknown)."""
        iso = urb.iso
        mx = self._xfer[urb.seqnum] = _mon_xfer(xfer, urb.ep, iso is not None)
        self._write(urb, EV_SUBMIT, mx, 0)

    def complete(self, urb: Any) -> None:
        """The ``C`` record of ``urb`` (status and actual length as the device left them)."""
        mx = self._xfer.pop(urb.seqnum, None)
        if mx is None:  # refused (its E record is written) or never recorded
            return
        self._write(urb, EV_COMPLETE, mx, urb.status)

    def refused(self, urb: Any, status: int) -> None:
        """The ``E`` record of an URB the server completes with ``status`` itself (no ``C`` follows)."""
        mx = self._xfer.pop(urb.seqnum, None)
        if mx is None:
            return
        ep = urb.ep | (0x80 if urb.direction else 0)
        self.file.record(
            self.id_base | urb.seqnum,
            EV_ERROR,
            mx,
            ep,
            self.devnum,
            self.busnum,
            FLAG_NONE,
            FLAG_ERROR,
            status,
            0,
            _NO_SETUP,
            0,
            0,
            urb.transfer_flags,
            0,
            None,
            None,
            0,
        )

    def cancelled_before_submit(self, msg: Any) -> None:
        """``S`` and ``C`` (-ECONNRESET) of a CMD_SUBMIT unlinked before it reached the device."""
        urb = _MsgUrb(msg)
        mx = _mon_xfer(None, urb.ep, urb.iso is not None)
        self._write(urb, EV_SUBMIT, mx, 0)
        self._write(urb, EV_COMPLETE, mx, ECONNRESET)

    def _write(self, urb: Any, event: int, mx: int, status: int) -> None:
        is_in = urb.direction == 1
        seqnum = urb.seqnum
        tbl = urb.transfer_buffer_length
        iso = urb.iso
        submit = event == EV_SUBMIT
        flag_setup = FLAG_NONE
        setup = _NO_SETUP
        ndesc = 0
        descs = None
        interval = 0
        start_frame = 0
        if mx == MON_CONTROL:
            if submit:
                setup = bytes(urb.setup)
                flag_setup = 0
        elif mx == MON_ISO:
            interval = urb.interval
            start_frame = urb.start_frame
            if iso is not None:
                packets = iso.tolist()
                ndesc = len(packets)
                descs = iso_descriptors(packets, submit)
                setup = iso_info(0 if submit else iso.error_count(), ndesc)
        elif mx == MON_INT:
            interval = urb.interval
        data = None
        full = 0
        if submit:
            length = tbl
            if is_in:
                flag_data = FLAG_IN
            else:
                flag_data = 0
                if tbl:
                    data = memoryview(urb.buffer)[:tbl]
                    full = tbl
        else:
            if iso is not None:
                length = iso.total_actual()
            else:
                length = urb.actual_length
                if length < 0 or length > tbl:
                    length = max(0, min(length, tbl))
            if is_in:
                flag_data = 0
                if iso is not None:
                    if tbl:  # iso IN: the whole buffer, each packet at its offset
                        data = memoryview(urb.buffer)[:tbl]
                        full = len(data)
                elif length:
                    data = memoryview(urb.buffer)[:length]
                    full = len(data)
            else:
                flag_data = FLAG_OUT
        self.file.record(
            self.id_base | seqnum,
            event,
            mx,
            urb.ep | (0x80 if is_in else 0),
            self.devnum,
            self.busnum,
            flag_setup,
            flag_data,
            status,
            length,
            setup,
            interval,
            start_frame,
            urb.transfer_flags,
            ndesc,
            descs,
            data,
            full,
        )


class _MsgUrb:
    """A CMD_SUBMIT seen as the Urb it would have become (for URBs unlinked before submission)."""

    __slots__ = (
        "actual_length",
        "buffer",
        "direction",
        "ep",
        "interval",
        "iso",
        "seqnum",
        "setup",
        "start_frame",
        "transfer_buffer_length",
        "transfer_flags",
    )

    def __init__(self, msg: Any) -> None:
        self.seqnum = msg.seqnum
        self.ep = msg.ep
        self.direction = msg.direction
        self.transfer_buffer_length = msg.transfer_buffer_length
        self.setup = msg.setup
        self.transfer_flags = msg.transfer_flags
        self.interval = msg.interval
        self.start_frame = msg.start_frame
        self.iso = msg.iso
        self.actual_length = 0
        data = msg.data if msg.direction != 1 else None
        self.buffer = data if data is not None else b""
        if data is None and msg.direction != 1:
            self.transfer_buffer_length = 0


class ClientCapture:
    """The client side of one imported device: records of what :class:`~usbip.client.RemoteDevice`
    submits and gets back. Transfer types come from the configuration descriptor (ep 0: control,
    an URB with iso packets: isochronous, an endpoint not described: bulk)."""

    __slots__ = ("_pending", "_types", "_types_of", "busnum", "devnum", "file", "id_base")

    def __init__(self, file: CaptureFile, conn_id: int, busnum: int, devnum: int) -> None:
        self.file = file
        self.id_base = (conn_id & _MASK32) << 32
        self.busnum = busnum & 0xFFFF
        self.devnum = devnum & 0xFF
        self._pending: dict[int, tuple[int, int, int, int]] = {}  # seqnum -> (xfer, ep, length, flags)
        self._types: dict[int, int] = {}
        self._types_of: bytes | None = None

    def _xfer(self, epaddr: int, iso: bool, config: bytes | None) -> int:
        if iso:
            return MON_ISO
        if epaddr & 0x0F == 0:
            return MON_CONTROL
        if config is not self._types_of:
            from .descriptors import endpoints

            types: dict[int, int] = {}
            for e in endpoints(config or b""):
                types.setdefault(e["bEndpointAddress"], USBMON_XFER[e["bmAttributes"] & 3])
            self._types = types
            self._types_of = config
        return self._types.get(epaddr, MON_BULK)

    def submit(
        self,
        seqnum: int,
        epaddr: int,
        setup: bytes,
        flags: int,
        length: int,
        payload: Any,
        iso: Any,
        interval: int,
        start_frame: int,
        config: bytes | None,
    ) -> None:
        mx = self._xfer(epaddr, iso is not None, config)
        self._pending[seqnum] = (mx, epaddr, length, flags)
        ndesc = 0
        descs = None
        s8 = _NO_SETUP
        flag_setup = FLAG_NONE
        if mx == MON_CONTROL:
            s8 = bytes(setup)
            flag_setup = 0
        elif mx == MON_ISO and iso is not None:
            packets = iso.tolist()
            ndesc = len(packets)
            descs = iso_descriptors(packets, True)
            s8 = iso_info(0, ndesc)
        data = None
        if epaddr & 0x80:
            flag_data = FLAG_IN
        else:
            flag_data = 0
            if length:
                data = memoryview(payload).cast("B")
        self.file.record(
            self.id_base | seqnum,
            EV_SUBMIT,
            mx,
            epaddr,
            self.devnum,
            self.busnum,
            flag_setup,
            flag_data,
            0,
            length,
            s8,
            interval if mx in (MON_ISO, MON_INT) else 0,
            start_frame if mx == MON_ISO else 0,
            flags,
            ndesc,
            descs,
            data,
            length if data is not None else 0,
        )

    def complete(self, seqnum: int, res: Any) -> None:
        """The ``C`` record from an :class:`~usbip.client.remote.UrbResult`."""
        info = self._pending.pop(seqnum, None)
        if info is None:
            return
        mx, epaddr, length, flags = info
        iso = res.iso
        ndesc = 0
        descs = None
        s8 = _NO_SETUP
        if mx == MON_ISO and iso is not None:
            packets = iso.tolist()
            ndesc = len(packets)
            descs = iso_descriptors(packets, False)
            s8 = iso_info(res.error_count, ndesc)
        data = None
        full = 0
        if epaddr & 0x80:
            flag_data = 0
            got = res.data
            if got is not None:
                n = length if mx == MON_ISO else res.actual_length
                if n:
                    data = memoryview(got).cast("B")[:n]
                    full = len(data)
        else:
            flag_data = FLAG_OUT
        self.file.record(
            self.id_base | seqnum,
            EV_COMPLETE,
            mx,
            epaddr,
            self.devnum,
            self.busnum,
            FLAG_NONE,
            flag_data,
            res.status,
            res.actual_length,
            s8,
            0,
            res.start_frame if mx == MON_ISO else 0,
            flags,
            ndesc,
            descs,
            data,
            full,
        )

    def ended(self, seqnum: int, status: int) -> None:
        """A ``C`` record with ``status`` and no data (RET_UNLINK: -ECONNRESET)."""
        info = self._pending.pop(seqnum, None)
        if info is None:
            return
        mx, epaddr, _length, flags = info
        self.file.record(
            self.id_base | seqnum,
            EV_COMPLETE,
            mx,
            epaddr,
            self.devnum,
            self.busnum,
            FLAG_NONE,
            0 if epaddr & 0x80 else FLAG_OUT,
            status,
            0,
            _NO_SETUP,
            0,
            0,
            flags,
            0,
            None,
            None,
            0,
        )

    def disconnected(self) -> None:
        """Every URB still pending completes with -ENODEV (vhci's status when the connection ends)."""
        for seqnum in list(self._pending):
            self.ended(seqnum, ENODEV)


# ---------------------------------------------------------------- command line
def add_capture_options(p: argparse.ArgumentParser | Any, what: str = "every URB") -> None:
    """--capture FILE, --capture-max-mb MIB, --capture-files N (usbipd and usbip bench)."""
    p.add_argument(
        "--capture",
        metavar="FILE",
        help=f"write {what} (submit, completion, unlink) to FILE as pcapng that Wireshark decodes as USB "
        "(usbmon link type; see README: Capturing traffic)",
    )
    p.add_argument(
        "--capture-max-mb",
        type=float,
        default=DEFAULT_MAX_MB,
        metavar="MIB",
        help=f"size bound of the capture file; 0: none (default {DEFAULT_MAX_MB:g})",
    )
    p.add_argument(
        "--capture-files",
        type=int,
        default=1,
        metavar="N",
        help="1: stop capturing when the file reaches its bound (default); N: rotate, keeping FILE.1 .. FILE.(N-1)",
    )


def capture_from_args(args: argparse.Namespace, description: str = "") -> CaptureFile | None:
    """The CaptureFile the options ask for (None without --capture); ValueError / OSError."""
    if not getattr(args, "capture", None):
        return None
    if args.capture_max_mb < 0:
        raise ValueError(f"--capture-max-mb {args.capture_max_mb:g}: must not be negative")
    try:
        return CaptureFile(
            args.capture,
            max_bytes=int(args.capture_max_mb * 1024 * 1024),
            files=args.capture_files,
            description=description,
        )
    except ValueError as exc:
        raise ValueError(f"--capture: {exc}") from None
    except OSError as exc:
        raise OSError(f"--capture {args.capture}: {exc.strerror or exc}") from None


__all__ = [
    "LINKTYPE_USB_LINUX_MMAPPED",
    "CaptureFile",
    "ClientCapture",
    "UrbCapture",
    "add_capture_options",
    "capture_from_args",
    "file_header",
    "interface_description",
    "iso_descriptors",
    "iso_info",
    "packet_block",
    "read_records",
    "section_header",
    "usbmon_header",
]
