"""The capture file and its writer thread (rotation, bounds, a disk that does not keep up)."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import threading
import time
from typing import Any

from .defaults import DEFAULT_MAX_MB
from .format import (
    DEFAULT_SNAPLEN,
    EPB_HEAD,
    ISODESC_SIZE,
    MASK32,
    MON_HDR_SIZE,
    PREFIX,
    PREFIX_SIZE,
    TRAILER,
    file_header,
)
from .taps import ClientCapture, UrbCapture

log = logging.getLogger(__name__)

DEFAULT_MAX_BUFFER = 16 * 1024 * 1024
CHUNK = 256 * 1024  # records are packed into buffers of this size; a full one wakes the writer
FLUSH_INTERVAL = 0.5  # seconds: the writer wakes this often anyway
REPORT_INTERVAL = 60.0  # seconds between two log lines about the same lasting trouble
_os_writev = os.writev  # the writer thread's one system call (tests replace it to play a full disk)
IOV_MAX = 1024


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
            PREFIX.pack_into(
                buf,
                pos,
                6,
                total,
                0,
                us >> 32,
                us & MASK32,
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
                flags & MASK32,
                ndesc,
            )
            pos += PREFIX_SIZE
            if descs is not None:  # dlen > 0
                self._view[pos : pos + dlen] = descs
                pos += dlen
            if n:
                self._view[pos : pos + n] = data
                pos += n
            TRAILER[pad].pack_into(buf, pos, total)
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
