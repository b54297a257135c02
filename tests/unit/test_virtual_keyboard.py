"""KeyboardDevice: HID boot keyboard descriptors, class requests, typed reports."""

from __future__ import annotations

import asyncio
import time

import pytest

from usbip.cli.device_spec import make_device
from usbip.protocol.constants import ECONNRESET, EPIPE
from usbip.usb.descriptors import endpoints, interface_classes, walk
from usbip.virtual import KeyboardDevice
from usbip.virtual.keyboard import BOOT_KEYBOARD_REPORT, DEFAULT_DELAY, decode_reports
from usbip.virtual.testing import bulk_in, control, get_descriptor, result, set_configuration


def make(text=""):
    dev = KeyboardDevice(text, delay=0)  # typing starts at SET_CONFIGURATION
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


def test_nothing_typed_before_set_configuration():
    dev = KeyboardDevice("ab", delay=0)
    urb = bulk_in(dev, 1, 8)  # the device starts configured, but no host configured it yet
    assert not urb.done and dev.pending_reports == 4
    assert set_configuration(dev, 0) == 0  # unconfigured: the endpoint is gone
    assert urb.status == -108  # ESHUTDOWN
    assert set_configuration(dev, 1) == 0
    assert decode_reports(read_reports(dev, 4)) == "ab"


def test_settle_delay_without_event_loop():
    """Driven synchronously (no loop, no timer), the clock is read at the next poll."""
    dev = KeyboardDevice("q", delay=0.01)
    assert set_configuration(dev, 1) == 0
    assert not dev.ready
    first = bulk_in(dev, 1, 8)
    assert not first.done
    deadline = time.monotonic() + 5
    while not dev.ready and time.monotonic() < deadline:
        time.sleep(0.005)
    assert dev.ready
    second = bulk_in(dev, 1, 8)  # the older poll gets the key, this one the release
    assert result(first)[1][2] == 0x14 and result(second)[1] == bytes(8)


def test_reset_and_reconfiguration_restart_the_wait():
    dev = make("abc")
    assert decode_reports(read_reports(dev, 2)) == "a"
    dev.reset()  # port reset (also what a client leaving does): wait for the next SET_CONFIGURATION
    assert not dev.ready
    polled = bulk_in(dev, 1, 8)
    assert not polled.done and dev.pending_reports == 4
    dev.delay = 60  # a long settle delay from now on
    assert set_configuration(dev, 1) == 0
    assert not dev.ready and not polled.done
    dev.type_text("d")  # queued behind, not typed before the delay either
    assert not polled.done and dev.pending_reports == 6
    dev.delay = 0
    assert set_configuration(dev, 1) == 0  # configured again: the wait restarts (now 0 s)
    assert dev.ready and polled.done
    assert decode_reports([result(polled)[1], *read_reports(dev, 5)]) == "bcd"


def test_type_text_strict_and_lenient():
    dev = make()
    with pytest.raises(ValueError):
        dev.type_text("aé")
    assert dev.pending_reports == 0  # nothing of a refused text is queued
    assert dev.type_text("aé€b", strict=False) == 2
    assert dev.skipped == 2
    assert decode_reports(read_reports(dev, 4)) == "ab"


def test_queue_cap():
    dev = KeyboardDevice(delay=0, max_pending=5)
    assert dev.type_text("abc") == 3
    assert dev.type_text("defg") == 2 and dev.dropped == 2
    assert dev.type_text("h") == 0 and dev.dropped == 3
    assert set_configuration(dev, 1) == 0
    assert decode_reports(read_reports(dev, 10)) == "abcde"
    assert dev.type_text("z") == 1


def test_bad_delay():
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            KeyboardDevice(delay=bad)


@pytest.mark.parametrize(
    ("spec", "text", "delay", "fifo"),
    [
        ("keyboard", "", DEFAULT_DELAY, None),
        ("keyboard:", "", DEFAULT_DELAY, None),
        ("keyboard:Hi\\n", "Hi\n", DEFAULT_DELAY, None),
        ("keyboard:a:b", "a:b", DEFAULT_DELAY, None),
        ("keyboard:http://x\\t", "http://x\t", DEFAULT_DELAY, None),
        ("keyboard:x=1", "x=1", DEFAULT_DELAY, None),
        ("keyboard:ls\\n:delay=3", "ls\n", 3.0, None),
        ("keyboard:delay=0.25:ls", "ls", 0.25, None),
        ("keyboard:DELAY=0", "", 0.0, None),
        ("keyboard:fifo=FIFO", "", DEFAULT_DELAY, "FIFO"),
        ("keyboard:hello:fifo=FIFO:delay=0", "hello", 0.0, "FIFO"),
    ],
)
def test_spec(spec, text, delay, fifo, tmp_path):
    path = str(tmp_path / "kbd")
    dev = make_device(spec.replace("FIFO", path))
    try:
        assert isinstance(dev, KeyboardDevice)
        assert dev.delay == delay
        assert dev.fifo_path == (path if fifo else None)
        assert dev.pending_reports == 2 * len(text)
        dev.delay = 0
        assert set_configuration(dev, 1) == 0
        if text:
            assert decode_reports(read_reports(dev, 2 * len(text))) == text
    finally:
        dev.release()
    assert not (tmp_path / "kbd").exists()  # the FIFO it created is removed again


@pytest.mark.parametrize(
    "spec", ["keyboard:delay=soon", "keyboard:a:delay=-1", "keyboard:delay=nan", "keyboard:fifo=", "keyboard:é"]
)
def test_bad_specs(spec):
    with pytest.raises(ValueError):
        make_device(spec)


def test_fifo_path_that_is_not_a_fifo(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a FIFO"):
        make_device(f"keyboard:fifo={tmp_path / 'file'}")
