"""USB mass storage, Bulk-Only Transport with a SCSI (SBC/SPC) command set, on a disk image.

Interface 0: class 8, subclass 6 (SCSI transparent), protocol 0x50 (BOT). Endpoint
0x81 bulk IN, 0x02 bulk OUT (512 bytes at high speed, 1024 at super speed). Ids
0525:a4a5 (the Linux file-backed storage gadget). One LUN, 512-byte blocks.

Bulk-Only Transport (usbmassbulk_10.pdf): a 31-byte CBW on bulk OUT, an optional
data stage in either direction spanning any number of URBs of any size, and a
13-byte CSW on bulk IN. The thirteen cases of section 6.7:

* the device sends less than the host asked (Hi > Di, including errors with
  Hi > 0): the data ends short and the bulk IN endpoint is halted; the host
  clears it and reads the CSW, whose residue is the difference;
* the host offers more OUT data than the command needs (Ho > Do): the rest is
  accepted and discarded, residue Ho - Do; a failing OUT command halts bulk OUT;
* the host expects less than READ/WRITE transfer (Hi < Di, Ho < Do), no data
  while the command has some (Hn < Di/Do), or the opposite direction: CSW status 2
  (phase error). INQUIRY, MODE SENSE and friends are simply truncated to Hi;
* an invalid CBW (wrong size or signature, bad CB length) halts both bulk
  endpoints until reset recovery (class request 0xFF, then CLEAR_FEATURE on both).

Writes go straight to the image with ``os.pwrite``; :meth:`StorageDevice.close`
(the importing client went away) and SYNCHRONIZE CACHE ``fsync`` it. If the image
file exists its size is used (``size`` only grows an empty file); otherwise it is
created sparse with ``size`` bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct

from ..protocol.constants import EPIPE, XFER_BULK, Speed
from ..usb.ch9 import DIR_IN, RECIP_INTERFACE, TYPE_CLASS
from ..usb.device import Urb
from .descriptors import bulk_max_packet, configuration, endpoint, interface
from .framework import VirtualDevice
from .waiting import WaitQueue, complete_in

log = logging.getLogger(__name__)

BLOCK_SIZE = 512
CBW_SIGNATURE = 0x43425355
CSW_SIGNATURE = 0x53425355
CBW_SIZE = 31
CSW_SIZE = 13
_CBW = struct.Struct("<IIIBBB16s")
_CSW = struct.Struct("<IIIB")

CSW_GOOD = 0
CSW_FAILED = 1
CSW_PHASE_ERROR = 2

# class requests
BOMS_RESET = 0xFF
GET_MAX_LUN = 0xFE

EP_IN = 1
EP_OUT = 2

# (sense key, ASC, ASCQ)
NO_SENSE = (0x00, 0x00, 0x00)
NOT_READY_MEDIUM_NOT_PRESENT = (0x02, 0x3A, 0x00)
MEDIUM_ERROR_READ = (0x03, 0x11, 0x00)
MEDIUM_ERROR_WRITE = (0x03, 0x0C, 0x00)
INVALID_COMMAND = (0x05, 0x20, 0x00)
LBA_OUT_OF_RANGE = (0x05, 0x21, 0x00)
INVALID_FIELD_IN_CDB = (0x05, 0x24, 0x00)
LUN_NOT_SUPPORTED = (0x05, 0x25, 0x00)
SAVING_NOT_SUPPORTED = (0x05, 0x39, 0x00)
REMOVAL_PREVENTED = (0x05, 0x53, 0x02)
WRITE_PROTECTED = (0x07, 0x27, 0x00)

# phases
COMMAND, DATA_IN, DATA_OUT, STATUS, NEED_RESET = range(5)


class SenseError(Exception):
    def __init__(self, sense: tuple[int, int, int]) -> None:
        super().__init__(sense)
        self.sense = sense


def parse_size(text: str) -> int:
    """``"64M"``, ``"1G"``, ``"512K"``, ``"1048576"`` -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if t and t[-1] in "KMGT":
        mult = 1024 ** ("KMGT".index(t[-1]) + 1)
        t = t[:-1]
    try:
        value = int(float(t) * mult) if "." in t else int(t) * mult
    except ValueError:
        raise ValueError(f"bad size {text!r} (examples: 64M, 1G, 1048576)") from None
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


class StorageDevice(VirtualDevice):
    def __init__(
        self,
        path: str | os.PathLike[str],
        size: int | None = None,
        readonly: bool = False,
        vendor: str = "cyusbip",
        product: str = "Virtual Disk",
        revision: str = "1.00",
        *,
        removable: bool = True,
        speed: Speed = Speed.HIGH,
        **kw,
    ) -> None:
        self.image_path = os.fspath(path)
        self.readonly = readonly
        exists = os.path.exists(self.image_path)
        if not exists and size is None:
            raise ValueError(f"{self.image_path} does not exist and no size was given")
        flags = os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT
        self.fd = os.open(self.image_path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            actual = os.fstat(self.fd).st_size
            if size is not None and actual == 0:
                if readonly:
                    raise ValueError(f"{self.image_path} is empty and read-only")
                os.ftruncate(self.fd, size)
                actual = size
            if actual < BLOCK_SIZE:
                raise ValueError(f"{self.image_path}: image smaller than one {BLOCK_SIZE}-byte block")
        except BaseException:
            os.close(self.fd)
            raise
        self.blocks = actual // BLOCK_SIZE
        digest = hashlib.sha1(os.path.abspath(self.image_path).encode()).hexdigest().upper()
        self.vendor = vendor
        self.product_name = product
        self.revision = revision
        self.removable = removable
        self.unit_serial = kw.pop("serial", digest[:12])
        super().__init__(
            vendor_id=kw.pop("vendor_id", 0x0525),
            product_id=kw.pop("product_id", 0xA4A5),
            bcd_device=0x0100,
            manufacturer=vendor,
            product=product,
            serial=self.unit_serial,
            speed=speed,
            **kw,
        )
        mp = bulk_max_packet(self.speed)
        self.setup_descriptors(
            [
                configuration(
                    [
                        interface(
                            0,
                            0,
                            0x08,
                            0x06,
                            0x50,
                            [endpoint(0x80 | EP_IN, XFER_BULK, mp), endpoint(EP_OUT, XFER_BULK, mp)],
                            name="Mass Storage",
                        )
                    ],
                    value=1,
                    max_power_ma=100,
                )
            ]
        )
        self.sense = NO_SENSE
        self.loaded = True
        self.prevent_removal = False
        self.commands = 0
        self._dirty = False  # written since the last fsync
        self._in_wait = WaitQueue(self)
        self._reset_state()
        self._ops = {
            0x00: self._test_unit_ready,
            0x03: self._request_sense,
            0x08: self._read6,
            0x0A: self._write6,
            0x12: self._inquiry,
            0x1A: self._mode_sense6,
            0x1B: self._start_stop,
            0x1E: self._prevent_allow,
            0x23: self._read_format_capacities,
            0x25: self._read_capacity10,
            0x28: self._read10,
            0x2A: self._write10,
            0x2F: self._verify10,
            0x35: self._sync_cache,
            0x5A: self._mode_sense10,
            0x88: self._read16,
            0x8A: self._write16,
            0x91: self._sync_cache,
            0x9E: self._service_action_in,
            0xA0: self._report_luns,
            0xA8: self._read12,
            0xAA: self._write12,
        }
        self.on_endpoint(0x80 | EP_IN, self._bulk_in)
        self.on_endpoint(EP_OUT, self._bulk_out)

    # ------------------------------------------------------------ lifecycle
    @property
    def size(self) -> int:
        return self.blocks * BLOCK_SIZE

    def sync(self) -> None:
        """fsync the image if anything was written since the last sync."""
        if self.fd >= 0 and not self.readonly and self._dirty:
            os.fsync(self.fd)
            self._dirty = False

    async def close(self) -> None:
        try:
            self.sync()
        except OSError as exc:  # the parked URBs must still be let go of
            log.error("%s: fsync: %s", self.image_path, exc)
        finally:
            await super().close()

    def describe(self) -> str:
        return f"image {self.image_path}{' read-only' if self.readonly else ''}"

    def release(self) -> None:
        """Flush and close the image (the device cannot be used afterwards)."""
        if self.fd >= 0:
            self.sync()
            os.close(self.fd)
            self.fd = -1

    def _reset_state(self) -> None:
        self.phase = COMMAND
        self._tag = 0
        self._h_total = 0
        self._h_rem = 0
        self._d_rem = 0
        self._processed = 0
        self._status = CSW_GOOD
        self._residue = 0
        self._in_data: bytes | None = None
        self._in_pos = 0
        self._file_pos = 0
        self._write = False
        self._phase_error = False

    def on_reset(self) -> None:
        self._reset_state()

    def on_configure(self, value: int) -> None:
        self._reset_state()

    def on_clear_halt(self, ep: int, direction: int) -> None:
        if self.phase == NEED_RESET:
            self.halt(ep, direction)  # an invalid CBW stalls until reset recovery

    def control_request(self, urb: Urb, request_type: int, request: int, value: int, index: int, length: int):
        if request_type & 0x7F != TYPE_CLASS | RECIP_INTERFACE or index != 0:
            return None
        if request == BOMS_RESET and not request_type & DIR_IN and value == 0 and length == 0:
            self._reset_state()
            return True
        if request == GET_MAX_LUN and request_type & DIR_IN and value == 0 and length == 1:
            return b"\0"
        return None

    # ------------------------------------------------------------ bulk endpoints
    def _bulk_out(self, urb: Urb) -> None:
        phase = self.phase
        if phase == DATA_OUT:
            self._data_out(urb)
        elif phase == COMMAND:
            self._command(urb)
        else:  # OUT data the host should not send now
            self.halt(EP_OUT, 0)
            urb.complete(EPIPE, 0)

    def _bulk_in(self, urb: Urb) -> None:
        phase = self.phase
        if phase == DATA_IN:
            self._data_in(urb)
        elif phase == STATUS:
            self._send_csw(urb)
        else:
            self._in_wait.park(urb)  # NAK until there is data or a CSW

    def _kick(self) -> None:
        while self.phase in (DATA_IN, STATUS) and not self.is_halted(EP_IN, 1):
            urb = self._in_wait.pop()
            if urb is None:
                break
            self._bulk_in(urb)

    def _send_csw(self, urb: Urb) -> None:
        csw = _CSW.pack(CSW_SIGNATURE, self._tag, self._residue, self._status)
        n = min(CSW_SIZE, urb.transfer_buffer_length)
        memoryview(urb.buffer)[:n] = csw[:n]
        self.phase = COMMAND
        urb.complete(0, n)

    def _data_in(self, urb: Urb) -> None:
        n = min(urb.transfer_buffer_length, self._h_rem, self._d_rem)
        if n:
            with memoryview(urb.buffer) as mv:
                if self._in_data is not None:
                    pos = self._in_pos
                    mv[:n] = self._in_data[pos : pos + n]
                    self._in_pos = pos + n
                else:
                    try:
                        got = os.preadv(self.fd, [mv[:n]], self._file_pos)
                    except OSError as exc:
                        log.error("%s: read error: %s", self.image_path, exc)
                        got = 0
                        self.sense = MEDIUM_ERROR_READ
                        self._status = CSW_FAILED
                    if got < n:
                        mv[got:n] = bytes(n - got)
                    self._file_pos += n
        self._h_rem -= n
        self._d_rem -= n
        self._processed += n
        if self._d_rem == 0 or self._h_rem == 0:
            self._end_data()
        complete_in(urb, n)

    def _data_out(self, urb: Urb) -> None:
        n = min(urb.transfer_buffer_length, self._h_rem)
        take = min(n, self._d_rem)
        if take and self._write:
            with memoryview(urb.buffer) as mv:
                self._dirty = True
                try:
                    done = 0
                    while done < take:
                        done += os.pwrite(self.fd, mv[done:take], self._file_pos + done)
                except OSError as exc:
                    log.error("%s: write error: %s", self.image_path, exc)
                    self.sense = MEDIUM_ERROR_WRITE
                    self._status = CSW_FAILED
                    self._write = False
            self._file_pos += take
        self._d_rem -= take
        self._processed += take
        self._h_rem -= n
        if self._h_rem == 0:
            self._end_data()
        urb.complete(0, n)

    def _end_data(self) -> None:
        if self.phase == DATA_IN and self._h_rem > 0:
            self.halt(EP_IN, 1)
        if self._phase_error:
            self._status = CSW_PHASE_ERROR
        self._residue = self._h_total - self._processed
        self._in_data = None
        self.phase = STATUS

    # ------------------------------------------------------------ command stage
    def _invalid_cbw(self) -> None:
        self.phase = NEED_RESET
        self.halt(EP_IN, 1)
        self.halt(EP_OUT, 0)

    def _command(self, urb: Urb) -> None:
        n = urb.transfer_buffer_length
        if n != CBW_SIZE:
            urb.complete(0, n)
            self._invalid_cbw()
            return
        sig, tag, h_len, flags, lun, cb_len, cb = _CBW.unpack(bytes(memoryview(urb.buffer)[:CBW_SIZE]))
        urb.complete(0, n)
        if sig != CBW_SIGNATURE or not 1 <= cb_len <= 16 or flags & 0x7F:
            self._invalid_cbw()
            return
        h_in = bool(flags & 0x80)
        cdb = cb[:cb_len] + bytes(16 - cb_len)
        self._reset_state()
        self._tag = tag
        self._h_total = h_len
        self.commands += 1
        try:
            if lun != 0:
                raise SenseError(LUN_NOT_SUPPORTED)
            op = cdb[0]
            if op not in (0x03, 0x12):
                self.sense = NO_SENSE
            fn = self._ops.get(op)
            if fn is None:
                raise SenseError(INVALID_COMMAND)
            result = fn(cdb)
        except SenseError as e:
            self.sense = e.sense
            self._finish(CSW_FAILED, h_len, h_in)
            return
        if result is None:  # no data stage
            self._finish(CSW_GOOD, h_len, h_in)
            return
        kind = result[0]
        if kind in ("in", "read"):
            if kind == "in":
                self._in_data = result[1]
                d_len = len(result[1])
                if d_len > h_len:
                    d_len = h_len  # allocation-length style data: just truncated
                if d_len == 0:
                    self._finish(CSW_GOOD, h_len, h_in)
                    return
            else:
                self._file_pos, d_len = result[1], result[2]
            if h_len == 0 or not h_in:
                self._finish(CSW_PHASE_ERROR, h_len, h_in)
                return
            if d_len > h_len:
                d_len = h_len
                self._phase_error = True
            self.phase = DATA_IN
        else:  # "write" / "discard"
            self._file_pos, d_len = result[1], result[2]
            self._write = kind == "write"
            if h_len == 0 or h_in:
                self._finish(CSW_PHASE_ERROR, h_len, h_in)
                return
            if d_len > h_len:  # Ho < Do: take the host's data, write nothing, phase error
                self._write = False
                d_len = h_len
                self._phase_error = True
            self.phase = DATA_OUT
        self._h_rem = h_len
        self._d_rem = d_len
        if d_len == 0 and self.phase == DATA_IN:
            self._end_data()
        self._kick()

    def _finish(self, status: int, h_len: int, h_in: bool) -> None:
        """No data stage: stall the host's data direction if it expected any, then CSW."""
        self._status = status
        self._residue = h_len
        self.phase = STATUS
        if h_len:
            if h_in:
                self.halt(EP_IN, 1)
            else:
                self.halt(EP_OUT, 0)
        self._kick()

    # ------------------------------------------------------------ SCSI commands
    def _need_medium(self) -> None:
        if not self.loaded:
            raise SenseError(NOT_READY_MEDIUM_NOT_PRESENT)

    def _range(self, lba: int, count: int) -> tuple[int, int]:
        self._need_medium()
        if lba + count > self.blocks or (lba >= self.blocks and count):
            raise SenseError(LBA_OUT_OF_RANGE)
        return lba * BLOCK_SIZE, count * BLOCK_SIZE

    def _read(self, lba: int, count: int):
        off, n = self._range(lba, count)
        return ("read", off, n) if n else None

    def _writeop(self, lba: int, count: int):
        self._need_medium()
        if self.readonly:
            raise SenseError(WRITE_PROTECTED)
        off, n = self._range(lba, count)
        return ("write", off, n) if n else None

    @staticmethod
    def _rw6(cdb: bytes) -> tuple[int, int]:
        lba = int.from_bytes(cdb[1:4], "big") & 0x1FFFFF
        return lba, cdb[4] or 256

    def _read6(self, cdb: bytes):
        return self._read(*self._rw6(cdb))

    def _write6(self, cdb: bytes):
        return self._writeop(*self._rw6(cdb))

    def _read10(self, cdb: bytes):
        return self._read(int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big"))

    def _write10(self, cdb: bytes):
        return self._writeop(int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big"))

    def _read12(self, cdb: bytes):
        return self._read(int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[6:10], "big"))

    def _write12(self, cdb: bytes):
        return self._writeop(int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[6:10], "big"))

    def _read16(self, cdb: bytes):
        return self._read(int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big"))

    def _write16(self, cdb: bytes):
        return self._writeop(int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big"))

    def _verify10(self, cdb: bytes):
        off, n = self._range(int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big"))
        if cdb[1] & 0x02 and n:  # BYTCHK: the host sends the data to compare; accept it
            return ("discard", off, n)
        return None

    def _test_unit_ready(self, cdb: bytes):
        self._need_medium()
        return None

    def _request_sense(self, cdb: bytes):
        key, asc, ascq = self.sense
        data = bytearray(18)
        data[0] = 0x70  # current error, fixed format
        data[2] = key
        data[7] = 10
        data[12] = asc
        data[13] = ascq
        self.sense = NO_SENSE
        return ("in", bytes(data[: cdb[4]]))

    def _inquiry(self, cdb: bytes):
        alloc = int.from_bytes(cdb[3:5], "big")
        if cdb[1] & 0x01:  # EVPD
            page = cdb[2]
            if page == 0x00:
                body = bytes((0x00, 0x80, 0x83))
            elif page == 0x80:
                body = self.unit_serial.encode("ascii", "replace")
            elif page == 0x83:
                ident = self._pad(self.vendor, 8) + self._pad(self.product_name, 16) + self.unit_serial.encode()
                body = bytes((0x02, 0x01, 0x00, len(ident))) + ident  # ASCII, T10 vendor id based
            else:
                raise SenseError(INVALID_FIELD_IN_CDB)
            data = bytes((0x00, page)) + struct.pack(">H", len(body)) + body
        else:
            if cdb[2]:
                raise SenseError(INVALID_FIELD_IN_CDB)
            data = (
                bytes((0x00, 0x80 if self.removable else 0x00, 0x06, 0x02, 31, 0, 0, 0))
                + self._pad(self.vendor, 8)
                + self._pad(self.product_name, 16)
                + self._pad(self.revision, 4)
            )
        return ("in", data[:alloc])

    @staticmethod
    def _pad(text: str, n: int) -> bytes:
        return text.encode("ascii", "replace")[:n].ljust(n, b" ")

    def _mode_pages(self, cdb: bytes, page: int, subpage: int) -> bytes:
        pc = cdb[2] >> 6
        if pc == 3:
            raise SenseError(SAVING_NOT_SUPPORTED)
        if subpage not in (0, 0xFF) or (subpage == 0xFF and page != 0x3F):
            raise SenseError(INVALID_FIELD_IN_CDB)
        if page not in (0x08, 0x3F):
            raise SenseError(INVALID_FIELD_IN_CDB)
        caching = bytearray(20)
        caching[0] = 0x08
        caching[1] = 0x12
        if pc != 1:  # current/default: write cache enabled (SYNCHRONIZE CACHE fsyncs)
            caching[2] = 0x04
        return bytes(caching)

    def _mode_sense6(self, cdb: bytes):
        pages = self._mode_pages(cdb, cdb[2] & 0x3F, cdb[3])
        header = bytes((3 + len(pages), 0, 0x80 if self.readonly else 0, 0))
        return ("in", (header + pages)[: cdb[4]])

    def _mode_sense10(self, cdb: bytes):
        pages = self._mode_pages(cdb, cdb[2] & 0x3F, cdb[3])
        header = struct.pack(">HBBBBH", 6 + len(pages), 0, 0x80 if self.readonly else 0, 0, 0, 0)
        return ("in", (header + pages)[: int.from_bytes(cdb[7:9], "big")])

    def _read_capacity10(self, cdb: bytes):
        self._need_medium()
        last = min(self.blocks - 1, 0xFFFFFFFF)
        return ("in", struct.pack(">II", last, BLOCK_SIZE))

    def _service_action_in(self, cdb: bytes):
        if cdb[1] & 0x1F != 0x10:
            raise SenseError(INVALID_FIELD_IN_CDB)
        self._need_medium()
        data = struct.pack(">QI", self.blocks - 1, BLOCK_SIZE) + bytes(20)
        return ("in", data[: int.from_bytes(cdb[10:14], "big")])

    def _read_format_capacities(self, cdb: bytes):
        code = 0x02 if self.loaded else 0x03  # formatted media / no media (maximum capacity)
        data = bytes((0, 0, 0, 8)) + struct.pack(">I", min(self.blocks, 0xFFFFFFFF))
        data += bytes((code,)) + BLOCK_SIZE.to_bytes(3, "big")
        return ("in", data[: int.from_bytes(cdb[7:9], "big")])

    def _prevent_allow(self, cdb: bytes):
        self.prevent_removal = bool(cdb[4] & 0x01)
        return None

    def _start_stop(self, cdb: bytes):
        start, loej = cdb[4] & 0x01, cdb[4] & 0x02
        if loej:
            if start:
                self.loaded = True
            elif self.prevent_removal:
                raise SenseError(REMOVAL_PREVENTED)
            else:
                self.loaded = False
        return None

    def _sync_cache(self, cdb: bytes):
        self._need_medium()
        try:
            self.sync()
        except OSError as exc:
            log.error("%s: fsync: %s", self.image_path, exc)
            raise SenseError(MEDIUM_ERROR_WRITE) from None
        return None

    def _report_luns(self, cdb: bytes):
        data = struct.pack(">IIQ", 8, 0, 0)
        return ("in", data[: int.from_bytes(cdb[6:10], "big")])
