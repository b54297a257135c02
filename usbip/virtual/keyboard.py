"""A HID boot keyboard that types text (US layout), when the host is ready for it.

Interface 0: class 3 (HID), subclass 1 (boot), protocol 1 (keyboard), with the
standard 63-byte boot keyboard report descriptor. Endpoint 0x81: interrupt IN,
8 bytes, bInterval 10 (ms at full speed; 2**(10-1) microframes at high speed is
too slow, so high speed uses bInterval 7 = 8 ms).

Every character becomes two reports: key down (modifier + usage) and release (all
zero), so a host that polls continuously sees each press followed by a release.

Typing waits for the host: queued text is typed only after the host configured the
device (SET_CONFIGURATION with a non-zero value) and a settle delay passed (``delay``,
1.5 s by default), so that programs have time to open the new input device (the
kernel's console keyboard handler polls a keyboard the moment it registers). A new
import, a port reset or another SET_CONFIGURATION restarts the wait for the text not
yet typed. Until then, and whenever nothing is left to type, the IN URB waits
(cancellable).

Text comes from the constructor, from :meth:`KeyboardDevice.type_text` and, with
``fifo=PATH``, from a named pipe the device creates if missing and reads on the
event loop (``echo hello > PATH`` types "hello" and Enter). Characters without a
key on the US layout are logged and skipped there; at most ``max_pending``
characters wait to be typed, more are dropped with a log line.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import math
import os
import stat
import struct
import time
from collections import deque

from ..protocol.constants import XFER_INT, Speed
from ..usb.ch9 import DIR_IN, RECIP_INTERFACE, TYPE_CLASS
from ..usb.device import Urb
from .descriptors import configuration, endpoint, instance_serial, interface
from .framework import VirtualDevice
from .waiting import WaitQueue

log = logging.getLogger(__name__)

#: seconds between SET_CONFIGURATION and the first typed key
DEFAULT_DELAY = 1.5
#: characters that may wait to be typed; more are dropped (with a log line)
MAX_PENDING_TEXT = 64 * 1024
_FIFO_CHUNK = 4096

# HID class requests
GET_REPORT = 0x01
GET_IDLE = 0x02
GET_PROTOCOL = 0x03
SET_REPORT = 0x09
SET_IDLE = 0x0A
SET_PROTOCOL = 0x0B

DT_HID = 0x21
DT_REPORT = 0x22

# HID 1.11 appendix B.1: the boot keyboard report descriptor
BOOT_KEYBOARD_REPORT = bytes.fromhex(
    "05 01 09 06 a1 01"  # Usage Page (Generic Desktop), Usage (Keyboard), Collection (Application)
    " 05 07 19 e0 29 e7 15 00 25 01 75 01 95 08 81 02"  # 8 modifier bits
    " 95 01 75 08 81 01"  # reserved byte
    " 95 05 75 01 05 08 19 01 29 05 91 02"  # 5 LEDs (output)
    " 95 01 75 03 91 01"  # LED padding
    " 95 06 75 08 15 00 25 65 05 07 19 00 29 65 81 00"  # 6 key codes
    " c0"
)
assert len(BOOT_KEYBOARD_REPORT) == 63

LEFT_SHIFT = 0x02

_UNSHIFTED = {
    "\n": 0x28,
    "\r": 0x28,
    "\x1b": 0x29,
    "\b": 0x2A,
    "\t": 0x2B,
    " ": 0x2C,
    "-": 0x2D,
    "=": 0x2E,
    "[": 0x2F,
    "]": 0x30,
    "\\": 0x31,
    ";": 0x33,
    "'": 0x34,
    "`": 0x35,
    ",": 0x36,
    ".": 0x37,
    "/": 0x38,
}
_SHIFTED = {
    "_": 0x2D,
    "+": 0x2E,
    "{": 0x2F,
    "}": 0x30,
    "|": 0x31,
    ":": 0x33,
    '"': 0x34,
    "~": 0x35,
    "<": 0x36,
    ">": 0x37,
    "?": 0x38,
}
for _i, _c in enumerate("1234567890"):
    _UNSHIFTED[_c] = 0x1E + _i
for _i, _c in enumerate("!@#$%^&*()"):
    _SHIFTED[_c] = 0x1E + _i
for _i in range(26):
    _UNSHIFTED[chr(ord("a") + _i)] = 0x04 + _i
    _SHIFTED[chr(ord("A") + _i)] = 0x04 + _i

#: character -> (modifier byte, usage id)
KEYMAP: dict[str, tuple[int, int]] = {c: (0, u) for c, u in _UNSHIFTED.items()}
KEYMAP.update({c: (LEFT_SHIFT, u) for c, u in _SHIFTED.items()})
RELEASE = bytes(8)


#: character -> its key-down report (one shared bytes object per character)
_KEY_REPORTS: dict[str, bytes] = {c: bytes((m, 0, u, 0, 0, 0, 0, 0)) for c, (m, u) in KEYMAP.items()}


def key_report(ch: str) -> bytes:
    try:
        return _KEY_REPORTS[ch]
    except KeyError:
        raise ValueError(f"cannot type {ch!r} on a US keyboard") from None


def decode_reports(reports: list[bytes]) -> str:
    """Text typed by a sequence of boot keyboard reports (for tests and tools)."""
    reverse = {v: c for c, v in KEYMAP.items() if c != "\r"}
    out = []
    for r in reports:
        if r[2]:
            out.append(reverse[(LEFT_SHIFT if r[0] & 0x22 else 0, r[2])])
    return "".join(out)


class KeyboardDevice(VirtualDevice):
    """A boot keyboard typing ``text`` once the host configured it and ``delay`` seconds passed.

    ``fifo``: a path read for more text while the device exists (created as a FIFO, mode
    0600, if missing; removed again by :meth:`release` if this device created it).
    ``max_pending``: how many characters may wait to be typed.
    """

    def __init__(
        self,
        text: str = "",
        speed: Speed = Speed.FULL,
        *,
        delay: float = DEFAULT_DELAY,
        fifo: str | os.PathLike[str] | None = None,
        max_pending: int = MAX_PENDING_TEXT,
        **kw,
    ) -> None:
        if not (math.isfinite(delay) and delay >= 0):
            raise ValueError(f"keyboard delay must be a number of seconds >= 0, not {delay!r}")
        if max_pending < 1:
            raise ValueError(f"keyboard max_pending must be >= 1, not {max_pending!r}")
        super().__init__(
            vendor_id=kw.pop("vendor_id", 0x1209),
            product_id=kw.pop("product_id", 0x0001),
            bcd_device=0x0100,
            manufacturer=kw.pop("manufacturer", "cyusbip"),
            product=kw.pop("product", "Virtual Keyboard"),
            serial=kw.pop("serial", None) or instance_serial("KBD"),
            speed=speed,
            **kw,
        )
        hid = struct.pack("<BBHBBBH", 9, DT_HID, 0x0111, 0, 1, DT_REPORT, len(BOOT_KEYBOARD_REPORT))
        interval = 7 if self.speed >= Speed.HIGH else 10
        self.setup_descriptors(
            [
                configuration(
                    [
                        interface(
                            0,
                            0,
                            0x03,
                            0x01,
                            0x01,
                            [endpoint(0x81, XFER_INT, 8, interval)],
                            name="Keyboard",
                            extra=hid,
                            class_descriptors={DT_HID: hid, DT_REPORT: BOOT_KEYBOARD_REPORT},
                        )
                    ],
                    value=1,
                    attributes=0xA0,  # remote wakeup
                    max_power_ma=100,
                )
            ]
        )
        self.leds = 0
        self.idle = 0  # SET_IDLE duration (4 ms units)
        self.protocol = 1  # 0 boot, 1 report (the boot format either way)
        self.last_report = RELEASE
        self.delay = float(delay)
        self.max_pending = max_pending
        #: characters dropped because the queue was full / skipped for having no key
        self.dropped = 0
        self.skipped = 0
        self._overflowing = False
        self._reports: deque[bytes] = deque()
        self._in_wait = WaitQueue(self)
        # typing starts when _ready is set: by the timer armed at SET_CONFIGURATION, or by
        # the first look at the clock after _ready_at (devices driven without an event loop)
        self._ready = False
        self._ready_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._drained: list[asyncio.Future[None]] = []
        self.fifo_path = os.fspath(fifo) if fifo is not None else None
        self._fifo_fd = -1
        self._fifo_created = False
        self._fifo_loop: asyncio.AbstractEventLoop | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.on_endpoint(0x81, self._interrupt_in)
        self.type_text(text)
        if self.fifo_path is not None:
            self._open_fifo()
            self._start_fifo()  # now if an event loop runs, else at the first import or poll

    # ------------------------------------------------------------ the queue
    def type_text(self, text: str, *, strict: bool = True) -> int:
        """Queue ``text`` to be typed; returns how many characters were queued.

        It is typed at once if the host configured the device and the settle delay has
        passed, else when that happens. Characters without a key on the US layout raise
        ValueError (nothing is queued) or, with ``strict=False``, are skipped with a log
        line. Beyond ``max_pending`` waiting characters the rest is dropped (logged).
        """
        reports: list[bytes] = []
        bad: list[str] = []
        for ch in text:
            report = _KEY_REPORTS.get(ch)
            if report is None:
                bad.append(ch)
            else:
                reports.append(report)
                reports.append(RELEASE)
        if bad:
            if strict:
                raise ValueError(f"cannot type {bad[0]!r} on a US keyboard")
            self.skipped += len(bad)
            shown = ", ".join(repr(c) for c in dict.fromkeys(bad[:64]))
            log.warning(
                "keyboard %s: skipped %d character(s) without a key on the US layout: %s", self.busid, len(bad), shown
            )
        room = 2 * (self.max_pending - (len(self._reports) + 1) // 2)
        if len(reports) > room:
            keep = max(0, room)
            lost = (len(reports) - keep) // 2
            self.dropped += lost
            del reports[keep:]
            if not self._overflowing:
                self._overflowing = True
                log.warning(
                    "keyboard %s: %d characters wait to be typed (the limit): dropping input",
                    self.busid,
                    self.max_pending,
                )
        elif self._overflowing and reports:
            self._overflowing = False
            log.info("keyboard %s: queue has room again (%d characters dropped so far)", self.busid, self.dropped)
        self._reports.extend(reports)
        self._flush()
        return len(reports) // 2

    @property
    def pending_reports(self) -> int:
        return len(self._reports)

    @property
    def ready(self) -> bool:
        """Whether queued text is typed now (configured, and the settle delay has passed)."""
        if not self._ready and self._ready_at is not None and time.monotonic() >= self._ready_at:
            self._mark_ready()
        return self._ready

    async def typed(self) -> None:
        """Wait until every queued report was handed to the host."""
        loop = asyncio.get_running_loop()
        while self._reports:
            fut: asyncio.Future[None] = loop.create_future()
            self._drained.append(fut)
            try:
                await fut
            finally:
                if fut in self._drained:
                    self._drained.remove(fut)

    def _flush(self) -> None:
        while self._reports and self.ready:
            urb = self._in_wait.pop()
            if urb is None:
                break
            self._send(urb)

    def _interrupt_in(self, urb: Urb) -> None:
        if self._ready and self._reports and not self._in_wait:
            self._send(urb)
            return
        self._in_wait.park(urb)  # behind older polls (they get the reports first)
        if self.ready:
            self._flush()
        else:
            self._schedule()
        self._start_fifo()

    def _send(self, urb: Urb) -> None:
        report = self._reports.popleft()
        n = min(8, urb.transfer_buffer_length)
        memoryview(urb.buffer)[:n] = report[:n]
        self.last_report = report
        urb.complete(0, n)
        if not self._reports and self._drained:
            waiters, self._drained = self._drained, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    # ------------------------------------------------------------ the settle delay
    def _arm(self) -> None:
        """SET_CONFIGURATION(n > 0): type after the settle delay."""
        self._disarm()
        self._ready_at = time.monotonic() + self.delay
        log.debug("keyboard %s: configured; typing in %.3g s", self.busid, self.delay)
        if self.delay <= 0:
            self._mark_ready()
            self._flush()
        else:
            self._schedule()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._ready = False
        self._ready_at = None

    def _schedule(self) -> None:
        if self._timer is not None or self._ready or self._ready_at is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # driven without an event loop: the next poll looks at the clock
            return
        self._timer = loop.call_later(max(0.0, self._ready_at - time.monotonic()), self._settled)

    def _mark_ready(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._ready = True
        self._ready_at = None
        if self._reports:
            log.info("keyboard %s: typing %d characters", self.busid, (len(self._reports) + 1) // 2)

    def _settled(self) -> None:
        """The settle delay has passed (timer)."""
        self._timer = None
        self._mark_ready()
        self._flush()

    def on_configure(self, value: int) -> None:
        if value:
            self._arm()
        else:
            self._disarm()

    def on_reset(self) -> None:
        self._disarm()

    async def open(self) -> None:
        """A new import: wait for its SET_CONFIGURATION (and the delay) before typing."""
        self._disarm()
        self._start_fifo()
        await super().open()

    # ------------------------------------------------------------ the FIFO
    def _open_fifo(self) -> None:
        path = self.fifo_path
        assert path is not None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            os.mkfifo(path, 0o600)
            self._fifo_created = True
            log.info("keyboard %s: created FIFO %s", self.busid, path)
        else:
            if not stat.S_ISFIFO(st.st_mode):
                raise ValueError(f"keyboard FIFO {path} exists and is not a FIFO")
        # never blocks (no writer needed); a writer's open() does not block either while it is open
        self._fifo_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def _start_fifo(self) -> None:
        if self._fifo_fd < 0 or self._fifo_loop is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.add_reader(self._fifo_fd, self._on_fifo)
        self._fifo_loop = loop

    def _on_fifo(self) -> None:
        try:
            data = os.read(self._fifo_fd, _FIFO_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.error("keyboard %s: reading FIFO %s failed (%s): no longer reading it", self.busid, self.fifo_path, exc)
            self._stop_fifo()
            return
        if data:
            self._feed(self._decoder.decode(data))
            return
        # EOF: the last writer closed. Flush a cut UTF-8 sequence, then open the FIFO again
        # (before closing the old descriptor, so a new writer never finds it without a reader).
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        self._reopen_fifo()
        self._feed(text)

    def _feed(self, text: str) -> None:
        if text:
            try:
                self.type_text(text, strict=False)
            except Exception:  # FIFO input never takes the server down
                log.exception("keyboard %s: cannot queue FIFO input", self.busid)

    def _reopen_fifo(self) -> None:
        loop, old = self._fifo_loop, self._fifo_fd
        if loop is not None:
            loop.remove_reader(old)
            self._fifo_loop = None
        try:
            self._open_fifo()
        except (OSError, ValueError) as exc:
            log.error("keyboard %s: cannot open FIFO %s again (%s): not reading it", self.busid, self.fifo_path, exc)
            self._fifo_fd = -1
        finally:
            os.close(old)
        if loop is not None and self._fifo_fd >= 0 and not loop.is_closed():
            loop.add_reader(self._fifo_fd, self._on_fifo)
            self._fifo_loop = loop

    def _stop_fifo(self) -> None:
        if self._fifo_loop is not None:
            if not self._fifo_loop.is_closed():
                self._fifo_loop.remove_reader(self._fifo_fd)
            self._fifo_loop = None
        if self._fifo_fd >= 0:
            os.close(self._fifo_fd)
            self._fifo_fd = -1

    # ------------------------------------------------------------ lifecycle
    def describe(self) -> str:
        what = f"types {self.delay:g} s after configuration"
        return f"FIFO {self.fifo_path}, {what}" if self.fifo_path is not None else what

    def release(self) -> None:
        """Stop reading the FIFO (removed if this device created it) and drop pending waits."""
        self.abort_all()
        self._disarm()
        self._stop_fifo()
        if self._fifo_created and self.fifo_path is not None:
            try:
                os.unlink(self.fifo_path)
            except OSError:
                pass
            self._fifo_created = False
        waiters, self._drained = self._drained, []
        for fut in waiters:
            if not fut.done():
                fut.cancel()

    def control_request(self, urb: Urb, request_type: int, request: int, value: int, index: int, length: int):
        if request_type & 0x7F != TYPE_CLASS | RECIP_INTERFACE or index != 0:
            return None
        if request_type & DIR_IN:
            if request == GET_REPORT:
                return self.last_report if value >> 8 == 1 else None
            if request == GET_IDLE:
                return bytes((self.idle,))
            if request == GET_PROTOCOL:
                return bytes((self.protocol,))
            return None
        if request == SET_REPORT:
            if value >> 8 == 2 and length >= 1:  # output report: LEDs
                self.leds = memoryview(urb.buffer)[0]
            return True
        if request == SET_IDLE:
            self.idle = value >> 8
            return True
        if request == SET_PROTOCOL:
            if value > 1:
                return None
            self.protocol = value
            return True
        return None
