"""LibusbDevice URB mapping against a faked python-libusb1 handle/transfer."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os

import pytest

from usbip.backends.libusb import mapping as m
from usbip.backends.libusb import transfers as tp
from usbip.backends.libusb.device import LibusbDevice
from usbip.backends.libusb.transfers import TransferPool
from usbip.backends.usbdev import UsbDevice
from usbip.pool import BufferPool
from usbip.protocol import IsoPackets
from usbip.protocol.constants import URB_SHORT_NOT_OK, URB_ZERO_PACKET, USBIP_DIR_IN, USBIP_DIR_OUT, Speed
from usbip.usb.device import Urb

DEV_DESC = bytes.fromhex("12010002000000402505a0a4000101020301")
CONFIG = bytes.fromhex(
    "09023000010100c032"
    "0904000003ff000000"
    "07058102000200"  # 0x81 bulk IN
    "07050102000200"  # 0x01 bulk OUT
    "07058201000401"  # 0x82 iso IN
    "0904000100ff000000"  # (alt 1 of interface 0, for interface_numbers)
)


class FakeTransfer:
    def __init__(self, owner, iso_packets=0, short_is_error=False, add_zero_packet=False):
        self.owner = owner
        self.iso_packets = iso_packets
        self.short_is_error = short_is_error
        self.add_zero_packet = add_zero_packet
        self.kind = None
        self.usbip_view = None
        self.closed = False
        self.submitted = False
        self.cancelled = False
        self.status = 0
        self.actual = 0
        self.iso_results = []

    # the device's name for the ctypes view it holds while libusb owns the buffer (transfers.point_at)
    @property
    def cbuf(self):
        return self.usbip_view

    @property
    def view(self):
        return self._USBTransfer__transfer_py_buffer

    def _set(self, kind, endpoint, buf, cb, ud):
        self.kind, self.endpoint, self.cb, self.ud = kind, endpoint, cb, ud
        self.setBuffer(buf)

    def setBuffer(self, buf):
        assert not self.submitted and not self.closed
        if isinstance(buf, int):
            buf = bytearray(buf)
        # python-libusb1 wraps writable buffers in place, copies read-only ones
        try:
            self.usbip_view = (ctypes.c_char * len(buf)).from_buffer(buf)
            self._USBTransfer__transfer_py_buffer = memoryview(buf)
        except TypeError:
            self._USBTransfer__transfer_py_buffer = memoryview(bytearray(buf))
            self.usbip_view = None

    def setUserData(self, ud):
        self.ud = ud

    def setBulk(self, endpoint, buf, callback=None, user_data=None, timeout=0):
        self._set("bulk", endpoint, buf, callback, user_data)

    def setInterrupt(self, endpoint, buf, callback=None, user_data=None, timeout=0):
        self._set("int", endpoint, buf, callback, user_data)

    def setIsochronous(self, endpoint, buf, callback=None, user_data=None, timeout=0, iso_transfer_length_list=None):
        self._set("iso", endpoint, buf, callback, user_data)
        self.iso_lengths = iso_transfer_length_list

    def setControl(self, bm, req, value, index, buf_or_len, callback=None, user_data=None, timeout=0):
        self.kind, self.cb, self.ud = "control", callback, user_data
        self.setup = (bm, req, value, index)
        self._USBTransfer__transfer_py_buffer = memoryview(bytearray(buf_or_len))

    def submit(self):
        assert not self.submitted and not self.closed
        self.submitted = True
        self.owner.transfers.append(self)

    def cancel(self):
        self.cancelled = True
        self.owner.cancels.append(self)

    def close(self):
        # like python-libusb1: the ctypes view of the caller's buffer goes away with the transfer
        self.usbip_view = None
        self._USBTransfer__transfer_py_buffer = None
        self.closed = True

    def getUserData(self):
        return self.ud

    def getStatus(self):
        return self.status

    def getActualLength(self):
        return self.actual

    def getBuffer(self):
        return self.view

    def getISOSetupList(self):
        return [
            {"length": n, "actual_length": a, "status": s}
            for n, (s, a) in zip(self.iso_lengths, self.iso_results, strict=True)
        ]

    def finish(self, status=0, actual=0, data=b""):
        if data:
            self.view[: len(data)] = data
        self.status, self.actual = status, actual
        self.submitted = False
        self.cb(self)


class FakeHandle:
    def __init__(self):
        self.transfers = []
        self.calls = []
        self.cancels = []  # FakeTransfer.cancel() calls, in order

    def getTransfer(self, iso_packets=0, short_is_error=False, add_zero_packet=False):
        return FakeTransfer(self, iso_packets, short_is_error, add_zero_packet)

    def __getattr__(self, name):  # setConfiguration, claimInterface, ...: recorded
        def call(*args):
            self.calls.append((name, *args))
            return 1 if name == "getConfiguration" else None

        return call


class Events:
    mode = "fake"

    def dispatch(self, fn, *args):
        fn(*args)


def make_device():
    sysdev = UsbDevice(
        busid="1-1",
        path="/sys/devices/platform/dummy_hcd.0/usb1/1-1",
        busnum=1,
        devnum=2,
        speed=Speed.HIGH,
        vid=0x0525,
        pid=0xA4A0,
        serial="",
        device_class=0,
        configuration_value=1,
        descriptors=DEV_DESC + CONFIG,
    )
    dev = LibusbDevice(sysdev, context=None, events=Events())
    dev.handle = FakeHandle()
    dev._transfers = TransferPool()  # as open() makes it
    dev._claimed = [0]  # as open() leaves it: interface 0 claimed
    dev.gone = asyncio.Event()
    return dev


def urb(seq, ep, direction, length, buffer, **kw):
    done = []
    u = Urb(seq, ep, direction, length, buffer, on_complete=done.append, **kw)
    return u, done


def test_identity_and_record():
    dev = make_device()
    assert dev.busid == "1-1" and dev.devid == (1 << 16) | 2
    assert dev.path.endswith("/usb1/1-1")
    r = dev.record()
    assert (r.idVendor, r.idProduct, r.bConfigurationValue, r.speed) == (0x0525, 0xA4A0, 1, 3)


def test_bulk_in_zero_copy_short_read_and_flags():
    dev = make_device()
    pool = BufferPool()
    buf = pool.acquire(4096)
    u, done = urb(1, 1, USBIP_DIR_IN, 4096, buf, transfer_flags=URB_SHORT_NOT_OK)
    dev.submit(u)
    (t,) = dev.handle.transfers
    assert t.kind == "bulk" and t.endpoint == 0x81 and t.short_is_error and not t.add_zero_packet
    assert t.cbuf is not None  # wrapped in place: no copy
    t.finish(m.TRANSFER_COMPLETED, 10, b"0123456789")
    assert done == [u] and u.status == 0 and u.actual_length == 10 and bytes(memoryview(buf)[:10]) == b"0123456789"
    # kept for the next URB on 0x81 with the same flags, without its view of the pooled buffer
    assert not t.closed and t.cbuf is None and t.ud is None
    pool.release(buf)
    assert pool.outstanding == 0


def test_bulk_out_zero_packet_and_zero_length():
    dev = make_device()
    u, _done = urb(2, 1, USBIP_DIR_OUT, 512, bytearray(512), transfer_flags=URB_ZERO_PACKET)
    dev.submit(u)
    t = dev.handle.transfers[-1]
    assert t.endpoint == 0x01 and t.add_zero_packet and not t.short_is_error
    t.finish(m.TRANSFER_COMPLETED, 512)
    assert u.status == 0 and u.actual_length == 512
    z, zdone = urb(3, 1, USBIP_DIR_OUT, 0, b"")
    dev.submit(z)
    dev.handle.transfers[-1].finish(m.TRANSFER_COMPLETED, 0)
    assert zdone and z.status == 0 and z.actual_length == 0


def test_errors_map_and_unlink_is_econnreset():
    dev = make_device()
    u, _ = urb(4, 1, USBIP_DIR_IN, 64, bytearray(64))
    dev.submit(u)
    dev.handle.transfers[-1].finish(m.TRANSFER_STALL, 0)
    assert u.status == -errno.EPIPE
    c, _ = urb(5, 1, USBIP_DIR_IN, 64, bytearray(64))
    dev.submit(c)
    t = dev.handle.transfers[-1]
    c.cancelled = True  # what the session sets before calling cancel
    dev.cancel(c)
    assert t.cancelled
    t.finish(m.TRANSFER_CANCELLED, 0)
    assert c.status == -errno.ECONNRESET


def test_no_device_marks_gone():
    async def body():
        dev = make_device()
        gone = []
        dev.on_gone = gone.append
        u, _ = urb(6, 1, USBIP_DIR_IN, 64, bytearray(64))
        v, _ = urb(7, 1, USBIP_DIR_IN, 64, bytearray(64))
        dev.submit(u)
        dev.submit(v)
        t1, t2 = dev.handle.transfers
        t1.finish(m.TRANSFER_NO_DEVICE, 0)
        assert u.status == -errno.ENODEV
        await asyncio.sleep(0)
        assert dev.is_gone and dev.gone.is_set() and gone == [dev] and t2.cancelled
        t2.finish(m.TRANSFER_CANCELLED, 0)  # cancelled by the disconnect, not by an unlink
        assert v.status == -errno.ESHUTDOWN
        w, _ = urb(8, 1, USBIP_DIR_IN, 64, bytearray(64))
        dev.submit(w)
        assert w.done and w.status == -errno.ESHUTDOWN

    asyncio.run(body())


def test_control_special_requests_become_libusb_calls():
    dev = make_device()
    dev._claimed = [0]
    u, _ = urb(9, 0, USBIP_DIR_OUT, 0, b"", setup=bytes.fromhex("0009010000000000"))
    dev.submit(u)
    names = [c[0] for c in dev.handle.calls]
    assert u.status == 0 and names.index("releaseInterface") < names.index("setConfiguration")
    assert ("setConfiguration", 1) in dev.handle.calls and ("claimInterface", 0) in dev.handle.calls
    dev.handle.calls.clear()
    u, _ = urb(11, 0, USBIP_DIR_OUT, 0, b"", setup=bytes.fromhex("0201000081000000"))
    dev.submit(u)
    assert ("clearHalt", 0x81) in dev.handle.calls and u.status == 0
    u, _ = urb(10, 0, USBIP_DIR_OUT, 0, b"", setup=bytes.fromhex("010b010000000000"))
    dev.submit(u)
    assert ("setInterfaceAltSetting", 0, 1) in dev.handle.calls
    # alt 1 has no endpoints: 0x81 is no longer reachable, its CLEAR_HALT is the device's stall
    dev.handle.calls.clear()
    u, _ = urb(12, 0, USBIP_DIR_OUT, 0, b"", setup=bytes.fromhex("0201000081000000"))
    dev.submit(u)
    assert u.status == -errno.EPIPE and dev.handle.calls == []
    assert dev.handle.transfers == []
    dev.reset()
    assert ("resetDevice",) in dev.handle.calls


def test_control_in_through_a_transfer():
    dev = make_device()
    buf = bytearray(18)
    u, _ = urb(12, 0, USBIP_DIR_IN, 18, buf, setup=bytes.fromhex("8006000100001200"))
    dev.submit(u)
    t = dev.handle.transfers[-1]
    assert t.kind == "control" and t.setup == (0x80, 6, 0x100, 0)
    t.finish(m.TRANSFER_COMPLETED, 18, DEV_DESC)
    assert u.actual_length == 18 and bytes(buf) == DEV_DESC


def test_iso_in_packet_by_packet():
    dev = make_device()
    iso = IsoPackets.layout(3, 1024)
    buf = bytearray(3072)
    u, _ = urb(13, 2, USBIP_DIR_IN, 3072, buf, number_of_packets=3, iso=iso)
    dev.submit(u)
    t = dev.handle.transfers[-1]
    assert t.kind == "iso" and t.endpoint == 0x82 and t.iso_lengths == [1024] * 3 and t.cbuf is not None
    t.iso_results = [(m.TRANSFER_COMPLETED, 1024), (m.TRANSFER_COMPLETED, 0), (m.TRANSFER_ERROR, 0)]
    t.finish(m.TRANSFER_COMPLETED, 0)
    assert u.status == 0 and u.actual_length == 1024 and u.error_count == 1
    assert iso.tolist()[2] == (2048, 1024, 0, -errno.EPROTO)


def test_iso_out_with_gaps_uses_a_bounce_buffer():
    dev = make_device()
    iso = IsoPackets.from_list([(0, 2, 0, 0), (4, 2, 0, 0)])
    u, _ = urb(14, 2, USBIP_DIR_IN, 6, bytearray(6), number_of_packets=2, iso=iso)
    dev.submit(u)
    t = dev.handle.transfers[-1]
    assert t.iso_lengths == [2, 2] and len(t.view) == 4
    t.iso_results = [(0, 2), (0, 1)]
    t.finish(0, 0, b"abcd")
    assert bytes(u.buffer) == b"ab\0\0c\0" and u.actual_length == 3


def test_blocking_calls_run_in_a_worker_and_later_urbs_wait():
    import threading

    async def body():
        dev = make_device()
        dev._claimed = [0]
        loop_thread = threading.get_ident()
        gate = threading.Event()
        threads = []

        class SlowHandle(FakeHandle):
            def setConfiguration(self, value):
                threads.append(threading.get_ident())
                assert gate.wait(5)
                self.calls.append(("setConfiguration", value))

        h = SlowHandle()
        dev.handle = h
        u, done = urb(20, 0, USBIP_DIR_OUT, 0, b"", setup=bytes.fromhex("0009010000000000"))
        dev.submit(u)
        # the loop is free while setConfiguration sleeps; the URB is pending
        await asyncio.sleep(0.05)
        assert not done and threads and threads[0] != loop_thread and dev.in_flight == 1
        # URBs behind it wait; an unlinked one completes at once with -ECONNRESET
        v, vdone = urb(21, 1, USBIP_DIR_IN, 64, bytearray(64))
        w, wdone = urb(22, 1, USBIP_DIR_IN, 64, bytearray(64))
        dev.submit(v)
        dev.submit(w)
        assert h.transfers == [] and not vdone
        w.cancelled = True
        dev.cancel(w)
        assert wdone and w.status == -errno.ECONNRESET
        gate.set()
        for _ in range(100):
            if done:
                break
            await asyncio.sleep(0.01)
        assert done and u.status == 0 and ("setConfiguration", 1) in h.calls and ("claimInterface", 0) in h.calls
        (t,) = h.transfers  # the deferred IN URB was submitted after the call returned
        assert t.endpoint == 0x81
        t.finish(m.TRANSFER_COMPLETED, 0)
        assert vdone and dev.in_flight == 0
        # a port reset runs in the worker too
        dev.reset()
        for _ in range(100):
            if ("resetDevice",) in h.calls and dev._busy is None:
                break
            await asyncio.sleep(0.01)
        assert ("resetDevice",) in h.calls and dev._busy is None
        dev.release()

    asyncio.run(body())


def test_short_read_of_short_not_ok_transfer_is_eremoteio():
    dev = make_device()
    u, _ = urb(30, 1, USBIP_DIR_IN, 192, bytearray(192), transfer_flags=URB_SHORT_NOT_OK)
    dev.submit(u)
    dev.handle.transfers[-1].finish(m.TRANSFER_ERROR, 4, b"\x03\x00\x00\x00")
    assert u.status == -errno.EREMOTEIO and u.actual_length == 4
    v, _ = urb(31, 1, USBIP_DIR_IN, 192, bytearray(192))
    dev.submit(v)
    dev.handle.transfers[-1].finish(m.TRANSFER_ERROR, 0)
    assert v.status == -errno.EPROTO


class ClosingHandle(FakeHandle):
    """Records what was still in flight when close() came; can fail like python-libusb1's close."""

    def __init__(self, fail=False):
        super().__init__()
        self.fail = fail
        self.in_flight_at_close = None

    def close(self):
        self.in_flight_at_close = [t for t in self.transfers if t.submitted]
        if self.fail:
            raise AssertionError  # python-libusb1 3.x asserts on its finalizer bookkeeping (no message)


def test_close_lets_cancelled_transfers_come_back_before_closing_the_handle(tmp_path):
    async def main():
        dev = make_device()
        dev.handle = ClosingHandle()
        u, done = urb(6, 1, USBIP_DIR_IN, 64, bytearray(64))
        dev.submit(u)
        (t,) = dev.handle.transfers
        loop = asyncio.get_running_loop()
        # the cancellation is reported later, through the event handling, as libusb does
        orig_cancel = t.cancel
        t.cancel = lambda: (orig_cancel(), loop.call_later(0.05, t.finish, m.TRANSFER_CANCELLED, 0))
        handle = dev.handle
        await dev.close()
        assert t.cancelled and done == [u] and u.status == -errno.ESHUTDOWN  # not unlinked: the device went away
        assert handle.in_flight_at_close == []  # nothing left for python-libusb1's close to cancel
        assert dev.handle is None

    asyncio.run(main())


def test_a_failing_handle_close_keeps_the_fd_libusb_may_still_poll(tmp_path):
    async def main():
        dev = make_device()
        dev.handle = ClosingHandle(fail=True)
        f = tmp_path / "node"
        f.write_bytes(b"")
        fd = os.open(f, os.O_RDONLY)
        dev._fd = fd
        await dev.close()
        os.fstat(fd)  # still open: libusb may still have it in its poll set
        os.close(fd)
        assert dev.handle is None and dev._fd == -1

    asyncio.run(main())


def _fake_handle(monkeypatch, wrapped):
    """A real python-libusb1 USBDeviceHandle on faked libusb calls, as ``wrapSysDevice`` makes it
    (a USBDevice of its own holding the handle) or as ``libusb_open`` of a listed device does;
    returns (handle, the libusb calls that free something)."""
    import usb1
    from usb1 import libusb1

    calls = []
    # loaded lazily (loadLibrary): raising=False
    monkeypatch.setattr(libusb1, "libusb_close", lambda h: calls.append(("close", h)), raising=False)
    monkeypatch.setattr(libusb1, "libusb_ref_device", lambda d: None, raising=False)
    monkeypatch.setattr(libusb1, "libusb_unref_device", lambda d: calls.append(("unref", d)), raising=False)
    monkeypatch.setattr(libusb1, "libusb_open", lambda d, h: 0, raising=False)
    # a zeroed device descriptor: no configuration to load (or free)
    monkeypatch.setattr(libusb1, "libusb_get_device_descriptor", lambda dev, desc: 0, raising=False)
    monkeypatch.setattr(libusb1, "libusb_free_config_descriptor", lambda c: pytest.fail("no config"), raising=False)
    for name in ("libusb_get_bus_number", "libusb_get_port_number", "libusb_get_device_address"):
        monkeypatch.setattr(libusb1, name, lambda dev: 1, raising=False)
    context = usb1._LibUSB1Finalizer()  # what USBContext keeps its devices' finalizers in
    device = usb1.USBDevice(
        context=context,
        device_p=object(),
        getFinalizer=context._getFinalizer,
        can_load_configuration=True,
        can_change_refcount=not wrapped,
        handle_p=object() if wrapped else None,
    )
    return device.open(), calls


def test_close_handle_closes_a_wrapped_handle(monkeypatch):
    """python-libusb1 3.4's own USBDeviceHandle.close() of a wrapSysDevice handle fails
    ``assert handle not in finalizer_dict`` (its own finalizer, in the device's dict) before
    libusb_close: close_handle closes it through the device."""
    from usbip.backends.libusb.opening import close_handle

    handle, calls = _fake_handle(monkeypatch, wrapped=True)
    device = handle.getDevice()
    close_handle(handle, wrapped=True)
    assert [c[0] for c in calls] == ["close"]  # libusb_close, once (the device has no reference to drop)
    assert not handle.close.alive and not device.close.alive and not device._finalizer_dict
    close_handle(handle, wrapped=True)  # again: nothing more
    assert len(calls) == 1


def test_close_handle_closes_a_libusb_open_handle_and_its_device(monkeypatch):
    from usbip.backends.libusb.opening import close_handle

    handle, calls = _fake_handle(monkeypatch, wrapped=False)
    device = handle.getDevice()
    close_handle(handle, wrapped=False)
    assert [c[0] for c in calls] == ["close", "unref"]  # the handle, then the device's reference
    assert not handle.close.alive and not device.close.alive


def test_transfers_are_reused_per_endpoint_and_flags():
    dev = make_device()
    pool = dev._transfers
    u1, _ = urb(1, 1, USBIP_DIR_IN, 512, bytearray(512))
    u2, _ = urb(2, 1, USBIP_DIR_IN, 512, bytearray(512))
    dev.submit(u1)
    dev.submit(u2)
    t1, t2 = dev.handle.transfers
    assert t1 is not t2  # both in flight: two transfers
    t1.finish(m.TRANSFER_COMPLETED, 512)
    t2.finish(m.TRANSFER_COMPLETED, 512)
    assert pool.count == 2
    buf = bytearray(512)
    u3, done = urb(3, 1, USBIP_DIR_IN, 512, buf)
    dev.submit(u3)
    t3 = dev.handle.transfers[-1]
    assert t3 in (t1, t2) and pool.reused == 1 and t3.ud is u3 and t3.cbuf is not None  # the new buffer, in place
    t3.finish(m.TRANSFER_COMPLETED, 3, b"abc")
    assert done == [u3] and bytes(buf[:3]) == b"abc"
    # other flags (SHORT_NOT_OK), another endpoint (OUT), control: transfers of their own
    u4, _ = urb(4, 1, USBIP_DIR_IN, 512, bytearray(512), transfer_flags=URB_SHORT_NOT_OK)
    dev.submit(u4)
    t4 = dev.handle.transfers[-1]
    assert t4 not in (t1, t2) and t4.short_is_error
    u5, _ = urb(5, 1, USBIP_DIR_OUT, 8, bytearray(8))
    dev.submit(u5)
    assert dev.handle.transfers[-1] not in (t1, t2, t4)
    assert pool.count == 2  # t1 and t2 (t3 is one of them) still kept


def test_kept_transfers_are_freed_with_the_handle():
    dev = make_device()
    h = dev.handle
    u, _ = urb(1, 1, USBIP_DIR_IN, 64, bytearray(64))
    v, _ = urb(2, 1, USBIP_DIR_IN, 64, bytearray(64))
    dev.submit(u)
    dev.submit(v)
    t, w = h.transfers
    t.finish(m.TRANSFER_COMPLETED, 0)
    assert not t.closed
    dev._close_handle()
    assert t.closed and dev._transfers is None
    w.finish(m.TRANSFER_CANCELLED, 0)  # one still in flight at close: closed as it comes back
    assert w.closed


def test_transfer_pool_bounds():
    pool = TransferPool()

    class T:
        closed = False

        def setUserData(self, _ud):
            pass

        def close(self):
            self.closed = True

    kept = [T() for _ in range(tp.PER_KEY + 1)]
    for t in kept:
        pool.put(1, t)
    assert pool.count == tp.PER_KEY and kept[-1].closed  # per key
    for key in range(2, 2 + tp.TOTAL):
        pool.put(key, T())
    assert pool.count == tp.TOTAL  # over all keys
    extra = T()
    pool.put(10_000, extra)
    assert extra.closed
    assert pool.get(1) is kept[tp.PER_KEY - 1] and pool.get(99_999) is None
    pool.close()
    assert all(t.closed for t in kept[: tp.PER_KEY - 1]) and pool.count == 0
    late = T()
    pool.put(1, late)
    assert late.closed


def test_point_at_pins_the_urb_buffer_only_while_libusb_has_it():
    """python-libusb1's own setBuffer/setBulk leave the buffer's export alive until the GC runs (a
    ctypes.cast reference cycle): the session's pool could never reuse an IN buffer."""
    usb1 = pytest.importorskip("usb1")
    import gc

    ctx = usb1.USBContext()
    ctx.open()
    try:
        fin = usb1._LibUSB1Finalizer()
        t = usb1.USBTransfer(ctx, None, 0, lambda t: None, lambda t: None, fin._getFinalizer, False, False)
        t.setBulk(0x81, tp.SETUP_BUFFER)
        pool = BufferPool()
        gc.disable()
        try:
            buf = pool.acquire(512)
            tp.point_at(t, buf, 500)
            raw = t._USBTransfer__transfer.contents
            assert raw.length == 500 and raw.buffer == ctypes.addressof(ctypes.c_char.from_buffer(buf))
            tp.unpin(t)
            pool.release(buf)
            assert pool.acquire(512) is buf  # reused: no export left
            tp.point_at(t, b"read-only", 4)  # copied
            assert t._USBTransfer__transfer.contents.length == 4
            tp.point_at(t, bytearray(), 0)
            assert t._USBTransfer__transfer.contents.length == 0
        finally:
            gc.enable()
        t.close()
    finally:
        ctx.close()


def test_setup_control_reuses_the_transfers_own_buffer():
    usb1 = pytest.importorskip("usb1")
    ctx = usb1.USBContext()
    ctx.open()
    try:
        fin = usb1._LibUSB1Finalizer()
        t = usb1.USBTransfer(ctx, None, 0, lambda t: None, lambda t: None, fin._getFinalizer, False, False)
        tp.setup_control(t, 0x80, 6, 0x0100, 0, 18, None)
        buf = t.usbip_ctrl
        c = t._USBTransfer__transfer.contents
        assert c.type == usb1.TRANSFER_TYPE_CONTROL and c.endpoint == 0 and c.length == 8 + 18
        assert bytes(buf[:8]) == bytes.fromhex("8006000100001200") and c.buffer == t.usbip_ctrl_address
        tp.setup_control(t, 0x40, 1, 2, 3, memoryview(b"abcd"), None)
        assert t.usbip_ctrl is buf and c.length == 12 and bytes(buf[:12]) == bytes.fromhex("4001020003000400") + b"abcd"
        assert bytes(tp.control_data(t)[:4]) == b"abcd"
        t.close()
    finally:
        ctx.close()


def test_pollfd_events_complete_without_a_hop():
    """With libusb's pollfds on the loop, python-libusb1 calls the completion itself (no dispatch)."""

    class PollFd(Events):
        mode = "pollfd"

        def dispatch(self, fn, *args):  # pragma: no cover - must not be used
            raise AssertionError("dispatched")

    dev = make_device()
    dev2 = LibusbDevice(dev.sysdev, context=None, events=PollFd())
    assert dev2._callback == dev2._finish and dev._callback == dev._on_transfer
    dev2.handle, dev2._transfers, dev2._claimed, dev2.gone = FakeHandle(), TransferPool(), [0], asyncio.Event()
    u, done = urb(1, 1, USBIP_DIR_IN, 8, bytearray(8))
    dev2.submit(u)
    dev2.handle.transfers[-1].finish(m.TRANSFER_COMPLETED, 8)
    assert done == [u] and u.actual_length == 8
