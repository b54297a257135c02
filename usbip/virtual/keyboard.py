"""A HID boot keyboard that types a text (US layout).

Interface 0: class 3 (HID), subclass 1 (boot), protocol 1 (keyboard), with the
standard 63-byte boot keyboard report descriptor. Endpoint 0x81: interrupt IN,
8 bytes, bInterval 10 (ms at full speed; 2**(10-1) microframes at high speed is
too slow, so high speed uses bInterval 7 = 8 ms).

Every character becomes two reports: key down (modifier + usage) and release (all
zero), so a host that polls continuously sees each press followed by a release.
When nothing is left to type the IN URB waits (cancellable) until
:meth:`KeyboardDevice.type_text` queues more.
"""

from __future__ import annotations

import struct
from collections import deque

from ..device import Urb
from ..protocol.constants import XFER_INT, Speed
from .framework import (
    DIR_IN,
    RECIP_INTERFACE,
    TYPE_CLASS,
    VirtualDevice,
    WaitQueue,
    configuration,
    endpoint,
    instance_serial,
    interface,
)

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


def key_report(ch: str) -> bytes:
    try:
        mod, usage = KEYMAP[ch]
    except KeyError:
        raise ValueError(f"cannot type {ch!r} on a US keyboard") from None
    return bytes((mod, 0, usage, 0, 0, 0, 0, 0))


def decode_reports(reports: list[bytes]) -> str:
    """Text typed by a sequence of boot keyboard reports (for tests and tools)."""
    reverse = {v: c for c, v in KEYMAP.items() if c != "\r"}
    out = []
    for r in reports:
        if r[2]:
            out.append(reverse[(LEFT_SHIFT if r[0] & 0x22 else 0, r[2])])
    return "".join(out)


class KeyboardDevice(VirtualDevice):
    def __init__(self, text: str = "", speed: Speed = Speed.FULL, **kw) -> None:
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
        self._reports: deque[bytes] = deque()
        self._in_wait = WaitQueue(self)
        self.on_endpoint(0x81, self._interrupt_in)
        self.type_text(text)

    def type_text(self, text: str) -> None:
        """Queue ``text`` to be typed (ValueError for characters without a key)."""
        reports = []
        for ch in text:
            reports.append(key_report(ch))
            reports.append(RELEASE)
        self._reports.extend(reports)
        while self._reports:
            urb = self._in_wait.pop()
            if urb is None:
                break
            self._send(urb)

    @property
    def pending_reports(self) -> int:
        return len(self._reports)

    def _interrupt_in(self, urb: Urb) -> None:
        if self._reports:
            self._send(urb)
        else:
            self._in_wait.park(urb)

    def _send(self, urb: Urb) -> None:
        report = self._reports.popleft()
        n = min(8, urb.transfer_buffer_length)
        memoryview(urb.buffer)[:n] = report[:n]
        self.last_report = report
        urb.complete(0, n)

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
