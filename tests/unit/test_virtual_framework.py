"""The VirtualDevice base class: chapter 9 requests, halts, dispatch, async handlers."""

from __future__ import annotations

import asyncio
import struct

import pytest

from usbip.protocol.constants import ECONNRESET, ENOENT, EPIPE, ESHUTDOWN, XFER_BULK, XFER_INT, Speed
from usbip.usb.descriptors import endpoints, interface_classes, parse_device_descriptor, walk
from usbip.virtual import (
    DEFERRED,
    LoopbackDevice,
    UsbError,
    VirtualDevice,
    WaitQueue,
    configuration,
    endpoint,
    interface,
)
from usbip.virtual.testing import (
    bulk_in,
    bulk_out,
    clear_halt,
    control,
    get_descriptor,
    in_urb,
    result,
    set_configuration,
    set_interface,
    setup_packet,
)


def configured(dev):
    assert set_configuration(dev, 1) == 0
    return dev


def test_device_descriptor_parses_and_truncates():
    dev = LoopbackDevice()
    st, data = get_descriptor(dev, 1, length=18)
    assert st == 0 and data == dev.device_descriptor
    dd = parse_device_descriptor(data)
    assert (dd["idVendor"], dd["idProduct"]) == (0x0525, 0xA4A0)
    assert dd["bcdUSB"] == 0x0200 and dd["bMaxPacketSize0"] == 64 and dd["bNumConfigurations"] == 1
    st, data = get_descriptor(dev, 1, length=8)  # the host's first 8-byte read
    assert st == 0 and data == dev.device_descriptor[:8]


def test_config_descriptor_wlength_truncation():
    dev = LoopbackDevice()
    full = dev.configuration_descriptor(0)
    total = struct.unpack_from("<H", full, 2)[0]
    assert total == len(full)
    st, head = get_descriptor(dev, 2, length=9)
    assert st == 0 and head == full[:9]
    st, data = get_descriptor(dev, 2, length=1000)
    assert st == 0 and data == full
    st, data = get_descriptor(dev, 2, length=20)
    assert st == 0 and data == full[:20]
    assert get_descriptor(dev, 2, index=1)[0] == EPIPE  # only one configuration
    types = [t for t, _ in walk(full)]
    assert types.count(4) == 2  # alt settings 0 and 1
    assert interface_classes(full) == [(0xFF, 0, 0)]


def test_strings():
    dev = LoopbackDevice()
    st, langs = get_descriptor(dev, 3, 0)
    assert st == 0 and langs == bytes((4, 3, 0x09, 0x04))
    dd = parse_device_descriptor(dev.device_descriptor)
    st, prod = get_descriptor(dev, 3, dd["iProduct"], lang=0x0409)
    assert st == 0 and prod[0] == len(prod) and prod[1] == 3
    assert prod[2:].decode("utf-16-le") == "Gadget Zero"
    st, short = get_descriptor(dev, 3, dd["iProduct"], length=4)
    assert st == 0 and short == prod[:4]
    assert get_descriptor(dev, 3, 99)[0] == EPIPE


def test_unknown_requests_stall():
    dev = LoopbackDevice()
    assert get_descriptor(dev, 0x42)[0] == EPIPE  # unknown descriptor type
    assert control(dev, 0x80, 0x77, 0, 0, 2)[0] == EPIPE  # unknown standard request
    assert control(dev, 0xC0, 0x99, 0, 0, 2)[0] == EPIPE  # unknown vendor request
    assert control(dev, 0x00, 0x07, 0x0100, 0, 0, b"")[0] == EPIPE  # SET_DESCRIPTOR
    assert control(dev, 0x00, 0x09, 7)[0] == EPIPE  # no configuration 7


def test_qualifier_and_other_speed_for_high_speed():
    dev = LoopbackDevice()
    st, q = get_descriptor(dev, 6, length=10)
    assert st == 0 and len(q) == 10 and q[1] == 6 and q[2:4] == b"\x00\x02" and q[8] == 1
    st, other = get_descriptor(dev, 7, length=1024)
    assert st == 0 and other[1] == 7 and struct.unpack_from("<H", other, 2)[0] == len(other)
    bulk = [e for e in endpoints(other) if e["bmAttributes"] & 3 == XFER_BULK]
    assert bulk and all(e["wMaxPacketSize"] == 64 for e in bulk)
    assert get_descriptor(dev, 15)[0] == EPIPE  # no BOS at high speed


def test_super_speed_bos_and_companions():
    dev = LoopbackDevice(speed=Speed.SUPER)
    dd = parse_device_descriptor(dev.device_descriptor)
    assert dd["bcdUSB"] >= 0x0300 and dd["bMaxPacketSize0"] == 9
    st, bos = get_descriptor(dev, 15, length=5)
    assert st == 0 and bos[1] == 15
    total, ncaps = struct.unpack_from("<HB", bos, 2)
    st, bos = get_descriptor(dev, 15, length=total)
    assert len(bos) == total
    caps = [d for t, d in walk(bos) if t == 0x10]
    assert len(caps) == ncaps and {c[2] for c in caps} == {0x02, 0x03}
    cfg = dev.configuration_descriptor(0)
    seq = [t for t, _ in walk(cfg)]
    # every endpoint descriptor is followed by its SuperSpeed companion
    for i, t in enumerate(seq):
        if t == 5:
            assert seq[i + 1] == 0x30
    assert seq.count(0x30) == seq.count(5)
    assert all(e["wMaxPacketSize"] == 1024 for e in endpoints(cfg))
    assert get_descriptor(dev, 6)[0] == EPIPE  # no device qualifier at super speed


def test_configuration_and_interfaces():
    dev = LoopbackDevice()
    # exported configured, as usbip-host hands over a device its USB core configured
    assert dev.configuration_value == 1
    assert bulk_in(dev, 1, 512).status == 0
    assert control(dev, 0x00, 0x09, 0, 0, 0)[0] == 0  # SET_CONFIGURATION(0)
    assert dev.configuration_value == 0
    assert control(dev, 0x80, 0x08, 0, 0, 1) == (0, b"\x00")
    assert bulk_in(dev, 1, 512).status == ENOENT  # unconfigured: no endpoint
    configured(dev)
    assert dev.configuration_value == 1
    assert control(dev, 0x80, 0x08, 0, 0, 1) == (0, b"\x01")
    assert control(dev, 0x81, 0x0A, 0, 0, 1) == (0, b"\x00")
    assert control(dev, 0x81, 0x0A, 0, 5, 1)[0] == EPIPE  # no interface 5
    assert bulk_in(dev, 3, 1024).status == ENOENT  # iso only in alt 1
    assert set_interface(dev, 0, 1) == 0
    assert control(dev, 0x81, 0x0A, 0, 0, 1) == (0, b"\x01")
    assert set_interface(dev, 0, 2) == EPIPE
    assert dev.endpoint_type(3, 1) == 1
    assert dev.record().bConfigurationValue == 1
    assert set_configuration(dev, 0) == 0
    assert dev.configuration_value == 0 and bulk_in(dev, 1, 512).status == ENOENT


def test_get_status():
    dev = configured(LoopbackDevice())
    assert control(dev, 0x80, 0x00, 0, 0, 2) == (0, b"\x00\x00")
    assert control(dev, 0x81, 0x00, 0, 0, 2) == (0, b"\x00\x00")
    assert control(dev, 0x82, 0x00, 0, 0x81, 2) == (0, b"\x00\x00")
    assert control(dev, 0x82, 0x00, 0, 0x8F, 2)[0] == EPIPE
    assert control(dev, 0x00, 0x03, 1)[0] == 0  # SET_FEATURE(DEVICE_REMOTE_WAKEUP)
    assert control(dev, 0x80, 0x00, 0, 0, 2) == (0, b"\x02\x00")
    assert control(dev, 0x00, 0x05, 7)[0] == 0 and dev.address == 7  # SET_ADDRESS


def test_halt_and_clear_halt():
    dev = configured(LoopbackDevice())
    assert bulk_in(dev, 1, 512).status == 0
    assert control(dev, 0x02, 0x03, 0, 0x81)[0] == 0  # SET_FEATURE(ENDPOINT_HALT)
    assert control(dev, 0x82, 0x00, 0, 0x81, 2) == (0, b"\x01\x00")
    assert bulk_in(dev, 1, 512).status == EPIPE
    assert bulk_out(dev, 1, b"x" * 512).status == 0  # the OUT direction is separate
    assert clear_halt(dev, 0x81) == 0
    assert control(dev, 0x82, 0x00, 0, 0x81, 2) == (0, b"\x00\x00")
    assert bulk_in(dev, 1, 512).status == 0
    dev.halt(1, 0)
    assert bulk_out(dev, 1, b"x").status == EPIPE
    dev.reset()
    assert bulk_out(dev, 1, b"x").status == 0
    assert dev.configuration_value == 1  # a reset keeps the configuration (like the kernel stub)


def test_halt_aborts_waiting_urb():
    dev = configured(LoopbackDevice())
    urb = bulk_in(dev, 2, 512)  # loopback IN: nothing written yet, so it waits
    assert not urb.done
    assert control(dev, 0x02, 0x03, 0, 0x82)[0] == 0
    assert urb.done and urb.status == EPIPE


def test_set_interface_away_shuts_down_waiting_iso_endpoint():
    dev = configured(LoopbackDevice())
    set_interface(dev, 0, 1)
    urb = bulk_in(dev, 2, 512)
    assert not urb.done
    set_configuration(dev, 0)
    assert urb.done and urb.status == ESHUTDOWN


class Slow(VirtualDevice):
    """A device whose bulk IN handler is a coroutine."""

    def __init__(self) -> None:
        super().__init__(vendor_id=0x1234, product_id=0x5678, product="slow")
        self.setup_descriptors(
            [
                configuration(
                    [interface(0, 0, 0xFF, 0, 0, [endpoint(0x81, XFER_BULK, 512), endpoint(0x82, XFER_INT, 8, 4)])]
                )
            ]
        )
        self.event = asyncio.Event()
        self.on_endpoint(0x81, self.slow_in)
        self.on_endpoint(0x82, self.failing)

    async def slow_in(self, urb):
        await self.event.wait()
        memoryview(urb.buffer)[:3] = b"abc"
        return 3

    async def failing(self, urb):
        raise UsbError(EPIPE)


def test_async_handler_completes_and_cancels():
    async def main():
        dev = configured(Slow())
        a = bulk_in(dev, 1, 512)
        b = bulk_in(dev, 1, 512)
        await asyncio.sleep(0)
        assert not a.done and not b.done and dev.pending_count == 2
        dev.cancel(b)
        await asyncio.sleep(0.01)
        assert b.done and b.status == ECONNRESET
        dev.event.set()
        await asyncio.wait_for(_until(lambda: a.done), 1)
        assert result(a) == (0, b"abc")
        c = bulk_in(dev, 2, 8)
        await asyncio.wait_for(_until(lambda: c.done), 1)
        assert c.status == EPIPE
        # cancelled before the task ever ran
        d = bulk_in(dev, 1, 512)
        dev.cancel(d)
        await asyncio.wait_for(_until(lambda: d.done), 1)
        assert d.status in (0, ECONNRESET) and dev.pending_count == 0

    asyncio.run(main())


async def _until(cond):
    while not cond():
        await asyncio.sleep(0.001)


def test_cancel_of_completed_urb_is_harmless():
    dev = configured(LoopbackDevice())
    urb = bulk_in(dev, 1, 64)
    assert urb.done and urb.status == 0
    dev.cancel(urb)
    assert urb.status == 0


def test_completion_callback_called_once():
    dev = configured(LoopbackDevice())
    calls = []
    urb = in_urb(2, 16, on_complete=calls.append)
    dev.submit(urb)
    dev.cancel(urb)
    dev.cancel(urb)
    assert calls == [urb] and urb.status == ECONNRESET


@pytest.mark.parametrize("speed", [Speed.FULL, Speed.HIGH, Speed.SUPER])
def test_busid_defaults_and_overrides(speed):
    dev = LoopbackDevice(speed=speed, busnum=3, devnum=9)
    assert dev.busid == "3-9" and dev.devid == (3 << 16) | 9 and dev.speed == speed
    dev.busid, dev.busnum, dev.devnum = "100-1", 100, 2
    assert dev.record().busid == "100-1"


class Deferred(VirtualDevice):
    """A vendor control request answered later (stays cancellable)."""

    def __init__(self) -> None:
        super().__init__(vendor_id=1, product_id=2)
        self.setup_descriptors([configuration([interface(0)])])
        self.queue = WaitQueue(self)

    def control_request(self, urb, request_type, request, value, index, length):
        if request == 0x01:
            self.queue.park(urb)
            return DEFERRED
        return None


def test_deferred_control_request():
    dev = Deferred()
    urb = in_urb(0, 4, setup=setup_packet(0xC0, 0x01, 0, 0, 4))
    dev.submit(urb)
    assert not urb.done
    later = dev.queue.pop()
    assert later is urb
    VirtualDevice.reply(urb, b"\x01\x02\x03\x04\x05")
    assert result(urb) == (0, b"\x01\x02\x03\x04")
    urb2 = in_urb(0, 4, setup=setup_packet(0xC0, 0x01, 0, 0, 4))
    dev.submit(urb2)
    dev.cancel(urb2)
    assert urb2.status == ECONNRESET


def test_control_short_read_with_short_not_ok():
    from usbip.protocol.constants import EREMOTEIO, URB_SHORT_NOT_OK

    dev = LoopbackDevice()
    urb = in_urb(0, 1024, setup=setup_packet(0x80, 0x06, 0x0200, 0, 1024), transfer_flags=URB_SHORT_NOT_OK)
    dev.submit(urb)
    assert urb.status == EREMOTEIO and urb.actual_length == len(dev.configuration_descriptor(0))
    configured(dev)
    assert control(dev, 0x82, 0x00, 0, 0, 2) == (0, b"\x00\x00")  # endpoint 0 status
    assert control(dev, 0x02, 0x01, 0, 0)[0] == 0  # CLEAR_FEATURE(HALT) on endpoint 0


def test_every_device_kind_names_itself_with_a_unique_serial(tmp_path) -> None:
    """iManufacturer/iProduct/iSerialNumber resolve to strings (lsusb, dmesg and PyUSB show them),
    and two instances of one kind never share a serial number."""
    from usbip.virtual import AudioDevice, KeyboardDevice, LoopbackDevice, SerialDevice, StorageDevice
    from usbip.virtual.testing import control

    def strings(dev) -> list[str]:
        out = []
        for idx in dev.device_descriptor[14:17]:
            assert idx, f"{type(dev).__name__}: a string index is 0"
            st, data = control(dev, 0x80, 6, 0x0300 | idx, 0x0409, 255)
            assert st == 0 and data[1] == 3
            out.append(data[2:].decode("utf-16-le"))
        return out

    made = [
        (LoopbackDevice(), LoopbackDevice()),
        (KeyboardDevice("x"), KeyboardDevice("y")),
        (SerialDevice(), SerialDevice()),
        (AudioDevice(), AudioDevice()),
        (StorageDevice(str(tmp_path / "a.img"), 1 << 20), StorageDevice(str(tmp_path / "b.img"), 1 << 20)),
    ]
    try:
        for a, b in made:
            man, prod, ser_a = strings(a)
            assert man and prod and ser_a.isalnum(), (man, prod, ser_a)
            assert strings(b)[2] != ser_a
    finally:
        for pair in made:
            for d in pair:
                d.release()
