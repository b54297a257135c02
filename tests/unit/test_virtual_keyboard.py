"""KeyboardDevice: HID boot keyboard descriptors, class requests, typed reports."""

from __future__ import annotations

import asyncio

import pytest

from usbip.descriptors import endpoints, interface_classes, walk
from usbip.protocol.constants import ECONNRESET, EPIPE
from usbip.virtual import KeyboardDevice
from usbip.virtual.keyboard import BOOT_KEYBOARD_REPORT, decode_reports
from usbip.virtual.testing import bulk_in, control, get_descriptor, result, set_configuration


def make(text=""):
    dev = KeyboardDevice(text)
    assert set_configuration(dev, 1) == 0
    return dev


def read_reports(dev, n):
    out = []
    for _ in range(n):
        urb = bulk_in(dev, 1, 8)
        assert urb.done, "report expected"
        st, data = result(urb)
        assert st == 0 and len(data) == 8
        out.append(data)
    return out


def test_descriptors():
    dev = KeyboardDevice()
    cfg = dev.configuration_descriptor(0)
    assert interface_classes(cfg) == [(3, 1, 1)]
    hid = [d for t, d in walk(cfg) if t == 0x21]
    assert len(hid) == 1 and hid[0][6] == 0x22 and int.from_bytes(hid[0][7:9], "little") == 63
    (ep,) = endpoints(cfg)
    assert ep == {"bEndpointAddress": 0x81, "bmAttributes": 3, "wMaxPacketSize": 8, "bInterval": 10}
    assert len(BOOT_KEYBOARD_REPORT) == 63
    set_configuration(dev, 1)
    assert control(dev, 0x81, 0x06, 0x2200, 0, 255) == (0, BOOT_KEYBOARD_REPORT)
    assert control(dev, 0x81, 0x06, 0x2200, 0, 16) == (0, BOOT_KEYBOARD_REPORT[:16])
    assert control(dev, 0x81, 0x06, 0x2100, 0, 9) == (0, hid[0])
    assert control(dev, 0x81, 0x06, 0x2300, 0, 9)[0] == EPIPE
    st, prod = get_descriptor(dev, 3, 2)
    assert st == 0 and prod[2:].decode("utf-16-le") == "Virtual Keyboard"


def test_hid_class_requests():
    dev = make()
    assert control(dev, 0x21, 0x0A, 0x0400, 0, 0)[0] == 0  # SET_IDLE 16 ms
    assert control(dev, 0xA1, 0x02, 0, 0, 1) == (0, b"\x04")
    assert control(dev, 0x21, 0x0B, 0, 0, 0)[0] == 0  # SET_PROTOCOL boot
    assert control(dev, 0xA1, 0x03, 0, 0, 1) == (0, b"\x00")
    assert control(dev, 0x21, 0x0B, 5, 0, 0)[0] == EPIPE
    assert control(dev, 0x21, 0x09, 0x0200, 0, 1, b"\x02")[0] == 0  # SET_REPORT: caps lock LED
    assert dev.leds == 2
    assert control(dev, 0xA1, 0x01, 0x0100, 0, 8) == (0, bytes(8))  # GET_REPORT(input)
    assert control(dev, 0xA1, 0x55, 0, 0, 1)[0] == EPIPE


def test_hi_reports_decode_to_text():
    dev = make("Hi!\n")
    reports = read_reports(dev, 8)
    for down, up in zip(reports[::2], reports[1::2], strict=True):
        assert down[2] != 0 and up == bytes(8)  # each press is followed by a release
    assert reports[0] == bytes((0x02, 0, 0x0B, 0, 0, 0, 0, 0))  # shift + h
    assert reports[2] == bytes((0, 0, 0x0C, 0, 0, 0, 0, 0))  # i
    assert reports[4] == bytes((0x02, 0, 0x1E, 0, 0, 0, 0, 0))  # shift + 1
    assert reports[6][2] == 0x28  # Enter
    assert decode_reports(reports) == "Hi!\n"
    assert not bulk_in(dev, 1, 8).done  # nothing left: the poll waits


def test_all_printable_ascii_round_trip():
    text = "".join(chr(c) for c in range(32, 127)) + "\t\n"
    dev = make(text)
    assert decode_reports(read_reports(dev, 2 * len(text))) == text


def test_repeated_letters_are_separate_presses():
    dev = make("aa")
    r = read_reports(dev, 4)
    assert r[0] == r[2] and r[1] == r[3] == bytes(8)


def test_waiting_poll_gets_queued_text_and_cancel():
    async def main():
        dev = make()
        urb = bulk_in(dev, 1, 8)
        await asyncio.sleep(0.01)
        assert not urb.done
        dev.type_text("x")
        assert urb.done and result(urb)[1][2] == 0x1B
        assert result(bulk_in(dev, 1, 8))[1] == bytes(8)
        waiting = bulk_in(dev, 1, 8)
        dev.cancel(waiting)
        assert waiting.status == ECONNRESET
        dev.type_text("y")  # goes to the next poll, not the cancelled one
        assert result(bulk_in(dev, 1, 8))[1][2] == 0x1C

    asyncio.run(main())


def test_unsupported_character():
    with pytest.raises(ValueError):
        KeyboardDevice("é")
