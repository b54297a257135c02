"""The libusb export against a hostile client (issue "hostile and dead peers", item 6).

Every CMD_SUBMIT / CMD_UNLINK is treated as hostile: URBs naming endpoints, interfaces,
configurations or alt settings the client may not reach, special requests with values
that do not exist, resets and unlinks in storms, sizes chosen to make the server
allocate, and a client that vanishes with work in flight. The fakes (python-libusb1
handle and transfer) are those of test_libusb_device, extended here with what libusb
and usbfs do on Linux:

* libusb's error codes for the synchronous calls (os/linux_usbfs.c: op_set_interface,
  op_set_configuration, op_clear_halt map usbfs' EINVAL/ENOENT to LIBUSB_ERROR_NOT_FOUND);
* usbfs flushing the URBs of the endpoints a SET_INTERFACE / SET_CONFIGURATION / reset
  takes down with -ESHUTDOWN, which libusb reports as LIBUSB_TRANSFER_NO_DEVICE, while a
  URB already unlinked (cancelled) keeps its -ECONNRESET (LIBUSB_TRANSFER_CANCELLED).
"""

from __future__ import annotations

import asyncio
import errno
import struct
import threading
import time

import pytest
from test_libusb_device import DEV_DESC, FakeHandle, urb

from usbip.backends.libusb import device as devmod
from usbip.backends.libusb import mapping as m
from usbip.backends.libusb.device import LibusbDevice
from usbip.backends.libusb.layout import ConfigLayout
from usbip.backends.usbdev import UsbDevice
from usbip.protocol import IsoPackets
from usbip.protocol.constants import USBIP_DIR_IN, USBIP_DIR_OUT, XFER_BULK, XFER_INT, XFER_ISOC, Speed

LIBUSB_ERROR_NOT_FOUND = -5


def _config(value: int, *blocks: bytes) -> bytes:
    body = b"".join(blocks)
    n_ifaces = len({b[2] for b in _split(body) if b[1] == 4})
    return struct.pack("<BBHBBBBB", 9, 2, 9 + len(body), n_ifaces, value, 0, 0xC0, 50) + body


def _split(blob: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(blob):
        out.append(blob[pos : pos + blob[pos]])
        pos += blob[pos]
    return out


def _intf(num: int, alt: int, n_eps: int, cls: int = 0xFF) -> bytes:
    return bytes([9, 4, num, alt, n_eps, cls, 0, 0, 0])


def _ep(addr: int, attrs: int, maxp: int, interval: int = 1) -> bytes:
    return struct.pack("<BBBBHB", 7, 5, addr, attrs, maxp, interval)


# configuration 1: interface 0 (ours) has bulk 0x81/0x01 and interrupt 0x82 in alt 0, and in alt 1
# iso 0x82 (same address, another type) and high-bandwidth iso OUT 0x03 (3 x 1024 bytes per
# microframe); interface 1 stays with its kernel driver (never claimed): interrupt 0x84.
CONFIG1 = _config(
    1,
    _intf(0, 0, 3),
    _ep(0x81, 2, 512),
    _ep(0x01, 2, 512),
    _ep(0x82, 3, 64),
    _intf(0, 1, 2),
    _ep(0x82, 5, 1024),
    _ep(0x03, 5, 0x1000 | 1024),
    _intf(1, 0, 1),
    _ep(0x84, 3, 8),
)
CONFIG2 = _config(2, _intf(0, 0, 1), _ep(0x85, 2, 512))


class USBError(Exception):
    """python-libusb1's USBError: the libusb error code in ``value``."""

    def __init__(self, value: int) -> None:
        super().__init__(f"LIBUSB_ERROR {value}")
        self.value = value


class HostileHandle(FakeHandle):
    """A python-libusb1 handle that behaves as libusb over usbfs where it matters here."""

    def __init__(self, layout: ConfigLayout | None = None) -> None:
        super().__init__()
        self.layout = layout or ConfigLayout(CONFIG1, Speed.HIGH)
        self.fail: dict[str, int] = {}  # call name -> libusb error code it raises
        self.threads: dict[str, set[int]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # completions go there (else inline)
        self.gate: threading.Event | None = None  # blocks the next slow call until set
        self.slow = ()
        self.closed_while: list[bool] = []  # close(): was a slow call still running?
        self.running = 0

    def _record(self, name: str, *args: object) -> None:
        self.calls.append((name, *args))
        self.threads.setdefault(name, set()).add(threading.get_ident())
        if name in self.fail:
            raise USBError(self.fail[name])

    def _flush(self, match) -> None:
        """usbfs: the URBs of the endpoints taken down end -ESHUTDOWN (libusb: NO_DEVICE);
        an URB already unlinked keeps -ECONNRESET (CANCELLED)."""
        for t in [t for t in self.transfers if t.submitted and match(t)]:
            status = m.TRANSFER_CANCELLED if t.cancelled else m.TRANSFER_NO_DEVICE
            if self.loop is not None:
                self.loop.call_soon_threadsafe(t.finish, status, 0)
            else:
                t.finish(status, 0)

    def _maybe_block(self, name: str) -> None:
        if name in self.slow and self.gate is not None:
            self.running += 1
            try:
                assert self.gate.wait(10)
            finally:
                self.running -= 1

    def setInterfaceAltSetting(self, iface, alt):
        self._record("setInterfaceAltSetting", iface, alt)
        self._maybe_block("setInterfaceAltSetting")
        eps = self.layout.endpoints_of(iface)
        self._flush(lambda t: t.kind != "control" and t.endpoint in eps)

    def setConfiguration(self, value):
        self._record("setConfiguration", value)
        self._maybe_block("setConfiguration")
        self._flush(lambda t: t.kind != "control")

    def resetDevice(self):
        self._record("resetDevice")
        self._maybe_block("resetDevice")
        self._flush(lambda t: True)

    def clearHalt(self, ep):
        self._record("clearHalt", ep)

    def getConfiguration(self):
        self._record("getConfiguration")
        return self.current_config

    current_config = 1

    def releaseInterface(self, i):
        self._record("releaseInterface", i)

    def claimInterface(self, i):
        self._record("claimInterface", i)

    def kernelDriverActive(self, i):
        self._record("kernelDriverActive", i)
        return False

    def attachKernelDriver(self, i):
        self._record("attachKernelDriver", i)

    def close(self):
        self._record("close")
        self.closed_while.append(self.running > 0)


def hostile_device(claimed=(0,), configs=(CONFIG1,)) -> tuple[LibusbDevice, HostileHandle]:
    desc = bytearray(DEV_DESC)
    desc[17] = len(configs)
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
        descriptors=bytes(desc) + b"".join(configs),
    )

    class Events:
        mode = "fake"

        def dispatch(self, fn, *args):
            fn(*args)

    dev = LibusbDevice(sysdev, context=None, events=Events())
    h = HostileHandle()
    dev.handle = h
    dev._claimed = list(claimed)
    dev._initial_config = 1
    dev.gone = asyncio.Event()
    return dev, h


def ctrl(seq, setup_hex, length=0, direction=USBIP_DIR_OUT):
    return urb(seq, 0, direction, length, bytearray(length), setup=bytes.fromhex(setup_hex))


def gone_after(dev) -> bool:
    return dev.is_gone or dev.gone.is_set()


# ---------------------------------------------------------------- 1. what a client may reach


def test_endpoints_only_of_claimed_interfaces_in_their_current_alt_setting():
    dev, h = hostile_device()
    # the union of all alt settings no longer decides: 0x82 is interrupt in alt 0 (iso in alt 1)
    assert dev.endpoint_type(2, USBIP_DIR_IN) == XFER_INT
    assert dev.endpoint_type(1, USBIP_DIR_IN) == XFER_BULK
    assert dev.endpoint_type(3, USBIP_DIR_OUT) == XFER_ISOC  # alt setting unknown: alt 1's extra endpoint
    assert dev.endpoint_type(4, USBIP_DIR_IN) is None  # interface 1 belongs to its kernel driver
    # an URB there never reaches libusb: usb_submit_urb's -ENOENT
    u, done = urb(1, 4, USBIP_DIR_IN, 8, bytearray(8))
    dev.submit(u)
    assert done == [u] and u.status == -errno.ENOENT and h.transfers == []
    # once the client has set alt 0, alt 1's endpoints are gone
    s, _ = ctrl(2, "010b000000000000")
    dev.submit(s)
    assert s.status == 0 and ("setInterfaceAltSetting", 0, 0) in h.calls
    assert dev.endpoint_type(3, USBIP_DIR_OUT) is None
    iso = IsoPackets.layout(1, 1024)
    v, _ = urb(3, 3, USBIP_DIR_OUT, 1024, bytearray(1024), number_of_packets=1, iso=iso)
    dev.submit(v)
    assert v.status == -errno.ENOENT and h.transfers == []
    # and after SET_INTERFACE(0, 1) 0x82 is iso, bulk 0x81 is gone
    s, _ = ctrl(4, "010b010000000000")
    dev.submit(s)
    assert dev.endpoint_type(2, USBIP_DIR_IN) == XFER_ISOC and dev.endpoint_type(1, USBIP_DIR_IN) is None
    b, _ = urb(5, 1, USBIP_DIR_IN, 512, bytearray(512))
    dev.submit(b)
    assert b.status == -errno.ENOENT and h.transfers == []


def test_control_requests_naming_an_interface_we_do_not_hold_are_refused():
    dev, h = hostile_device()
    # GET_STATUS(interface 1), a class request to interface 1, CLEAR_FEATURE(endpoint 0x84 of it)
    for seq, setup, n, d in (
        (1, "8100000001000200", 2, USBIP_DIR_IN),
        (2, "a101000101000800", 8, USBIP_DIR_IN),
        (3, "0201000084000000", 0, USBIP_DIR_OUT),  # CLEAR_FEATURE(HALT) 0x84: a special request
        (4, "8200000084000200", 2, USBIP_DIR_IN),  # GET_STATUS(endpoint 0x84)
        (5, "2109000201000100", 1, USBIP_DIR_OUT),  # HID SET_REPORT to interface 1
        (6, "8100000007000200", 2, USBIP_DIR_IN),  # an interface the device does not have
    ):
        u, _ = ctrl(seq, setup, n, d)
        dev.submit(u)
        assert u.done and u.status == -errno.EPIPE, (setup, u.status)
    assert h.transfers == [] and not [c for c in h.calls if c[0] == "clearHalt"]
    # ours, the device, ep0, vendor requests (usbfs lets those through) and unknown endpoints go to the device
    for seq, setup, n, d in (
        (10, "8100000000000200", 2, USBIP_DIR_IN),
        (11, "8200000081000200", 2, USBIP_DIR_IN),
        (12, "8200000001000200", 2, USBIP_DIR_IN),  # endpoint number without its direction (usbfs allows)
        (13, "8000000000000200", 2, USBIP_DIR_IN),
        (14, "8200000080000200", 2, USBIP_DIR_IN),
        (15, "c101000001000400", 4, USBIP_DIR_IN),
        (16, "820000008f000200", 2, USBIP_DIR_IN),
    ):
        u, _ = ctrl(seq, setup, n, d)
        dev.submit(u)
        assert not u.done, setup
    assert len(h.transfers) == 7 and not gone_after(dev)


def test_special_requests_naming_what_does_not_exist_never_mark_the_device_gone():
    """libusb says NOT_FOUND for "no such alt setting / configuration / endpoint"; read as
    -ENODEV it marked the device gone (the import ended, the device left the registry)."""
    dev, h = hostile_device(configs=(CONFIG1, CONFIG2))
    cases = [
        ("010b050000000000", -errno.EINVAL),  # SET_INTERFACE(0, 5): no alt 5
        ("010b000007000000", -errno.EINVAL),  # SET_INTERFACE(7, 0): no interface 7
        ("010b000001010000", -errno.EINVAL),  # SET_INTERFACE(0x101, 0): wIndex beyond 8 bits
        ("0009070000000000", -errno.EINVAL),  # SET_CONFIGURATION(7)
        ("0009010100000000", -errno.EINVAL),  # SET_CONFIGURATION(0x101): not configuration 1
        ("0201000085000000", -errno.EPIPE),  # CLEAR_HALT(0x85): not in configuration 1
    ]
    for i, (setup, status) in enumerate(cases):
        u, _ = ctrl(i, setup)
        dev.submit(u)
        assert u.done and u.status == status, (setup, u.status)
    names = {c[0] for c in h.calls}
    assert not names & {"setInterfaceAltSetting", "setConfiguration", "clearHalt", "releaseInterface"}
    assert dev._claimed == [0] and not gone_after(dev)
    # libusb refusing what the descriptors allow (usbfs EINVAL / ENOENT -> NOT_FOUND): not "gone" either
    h.fail = {"setInterfaceAltSetting": LIBUSB_ERROR_NOT_FOUND, "clearHalt": LIBUSB_ERROR_NOT_FOUND}
    u, _ = ctrl(20, "010b010000000000")
    dev.submit(u)
    assert u.status == -errno.EINVAL
    u, _ = ctrl(21, "0201000081000000")
    dev.submit(u)
    assert u.status == -errno.EPIPE
    h.fail = {"setConfiguration": LIBUSB_ERROR_NOT_FOUND}
    u, _ = ctrl(22, "0009020000000000")
    dev.submit(u)
    assert u.status == -errno.EINVAL and 0 in dev._claimed and dev.configuration_value == 1
    assert not gone_after(dev)
    # a reset that libusb answers NOT_FOUND (usbfs ENODEV: re-enumerated): that one is gone
    h.fail = {"resetDevice": LIBUSB_ERROR_NOT_FOUND}
    dev.reset()
    assert gone_after(dev)


def test_set_interface_to_an_interface_we_could_not_claim():
    dev, h = hostile_device()
    h.fail = {"claimInterface": -6}  # LIBUSB_ERROR_BUSY: its kernel driver keeps it
    u, _ = ctrl(1, "010b000001000000")
    dev.submit(u)
    assert u.status == -errno.EPIPE and ("claimInterface", 1) in h.calls
    assert not [c for c in h.calls if c[0] == "setInterfaceAltSetting"] and not gone_after(dev)


# ---------------------------------------------------------------- transfers a special request takes down


@pytest.mark.parametrize(
    "setup, hit, spared",
    [
        ("010b010000000000", {0x81, 0x01}, {0x84, 0}),  # SET_INTERFACE(0, 1): interface 0's endpoints
        ("0009010000000000", {0x81, 0x01, 0x84}, {0}),  # SET_CONFIGURATION(1): all but ep0
    ],
)
def test_transfers_a_special_request_takes_down_are_cancelled_first(setup, hit, spared):
    """usbfs flushes them with -ESHUTDOWN, which libusb reports as NO_DEVICE: the device was
    marked gone by a client's SET_INTERFACE with a bulk read pending."""
    dev, h = hostile_device(claimed=(0, 1))
    urbs = {}
    for seq, (ep, d) in enumerate(((1, USBIP_DIR_IN), (1, USBIP_DIR_OUT), (4, USBIP_DIR_IN))):
        u, _ = urb(seq, ep, d, 8, bytearray(8))
        dev.submit(u)
        urbs[ep | (0x80 if d else 0)] = u
    c, _ = ctrl(9, "8006000100001200", 18, USBIP_DIR_IN)
    dev.submit(c)
    urbs[0] = c
    s, _ = ctrl(10, setup)
    dev.submit(s)
    assert s.status == 0 and not gone_after(dev)
    for addr in hit:
        assert urbs[addr].done and urbs[addr].status == -errno.ESHUTDOWN, hex(addr)
    for addr in spared:
        assert not urbs[addr].done, hex(addr)
    assert all(t.closed for t in h.transfers if not t.submitted)


def test_a_reset_in_the_middle_of_transfers():
    dev, h = hostile_device()
    b, _ = urb(1, 1, USBIP_DIR_IN, 512, bytearray(512))
    c, _ = ctrl(2, "8006000100001200", 18, USBIP_DIR_IN)
    dev.submit(b)
    dev.submit(c)
    dev.reset()
    assert ("resetDevice",) in h.calls and not gone_after(dev)
    assert b.status == c.status == -errno.ESHUTDOWN and dev.in_flight == 0
    assert all(t.closed for t in h.transfers)


def test_reset_storm_is_merged_while_the_worker_is_busy():
    """A reset URB is answered at once by the session and carries nothing pending: every one
    became a resetDevice queued in the worker (thousands of resets, minutes of worker time)."""

    async def body():
        dev, h = hostile_device()
        h.loop = asyncio.get_running_loop()
        h.gate, h.slow = threading.Event(), ("setInterfaceAltSetting",)
        s, sdone = ctrl(1, "010b000000000000")
        dev.submit(s)
        await asyncio.sleep(0.05)
        for _ in range(5000):
            dev.reset()
        # an URB submitted after the resets waits for them
        b, bdone = urb(2, 1, USBIP_DIR_IN, 512, bytearray(512))
        dev.submit(b)
        h.gate.set()
        for _ in range(200):
            if sdone and dev._busy is None:
                break
            await asyncio.sleep(0.01)
        resets = [c for c in h.calls if c[0] == "resetDevice"]
        assert len(resets) == 1, len(resets)
        names = [c[0] for c in h.calls]
        (t,) = h.transfers  # the bulk URB went out after the reset
        assert names.index("resetDevice") < len(names) and not bdone and t.endpoint == 0x81
        t.finish(m.TRANSFER_COMPLETED, 0)
        dev.release()

    asyncio.run(body())


# ---------------------------------------------------------------- 2. unlinks


def test_unlink_of_a_special_request_in_the_worker_completes_once_with_its_result():
    async def body():
        dev, h = hostile_device()
        h.loop = asyncio.get_running_loop()
        h.gate, h.slow = threading.Event(), ("setInterfaceAltSetting",)
        s, sdone = ctrl(1, "010b010000000000")
        dev.submit(s)
        await asyncio.sleep(0.05)
        s.cancelled = True  # what the session does for CMD_UNLINK
        dev.cancel(s)
        dev.cancel(s)
        assert not sdone and dev.in_flight == 1  # cannot be cancelled: it answers when the call returns
        h.gate.set()
        for _ in range(200):
            if sdone:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert sdone == [s] and s.status == 0 and dev.in_flight == 0 and dev._busy is None
        dev.release()

    asyncio.run(body())


def test_cancelling_a_transfer_waits_while_the_worker_holds_the_device():
    """usbfs' DISCARDURB takes the device lock a SET_INTERFACE / reset holds for its whole
    duration: an unlink then blocked the event loop (every client of the server)."""

    async def body():
        dev, h = hostile_device(claimed=(0, 1))
        h.loop = asyncio.get_running_loop()
        b, bdone = urb(1, 4, USBIP_DIR_IN, 8, bytearray(8))  # interface 1: untouched by the SET_INTERFACE
        dev.submit(b)
        (t,) = h.transfers
        h.gate, h.slow = threading.Event(), ("setInterfaceAltSetting",)
        s, _ = ctrl(2, "010b010000000000")
        dev.submit(s)
        await asyncio.sleep(0.05)
        b.cancelled = True
        dev.cancel(b)
        assert not t.cancelled  # not while the worker is inside usbfs
        h.gate.set()
        for _ in range(200):
            if t.cancelled:
                break
            await asyncio.sleep(0.01)
        assert t.cancelled
        t.finish(m.TRANSFER_CANCELLED, 0)
        assert bdone == [b] and b.status == -errno.ECONNRESET
        dev.release()

    asyncio.run(body())


def test_unlink_storm_of_urbs_waiting_behind_a_blocking_call():
    async def body():
        dev, h = hostile_device()
        h.loop = asyncio.get_running_loop()
        h.gate, h.slow = threading.Event(), ("setInterfaceAltSetting",)
        s, _ = ctrl(0, "010b000000000000")
        dev.submit(s)
        await asyncio.sleep(0.05)
        n = 20000
        waiting = []
        for seq in range(1, n + 1):
            u, done = urb(seq, 1, USBIP_DIR_IN, 64, bytearray(64))
            dev.submit(u)
            waiting.append((u, done))
        started = time.perf_counter()
        for u, _ in reversed(waiting):  # the worst order for a list scan
            u.cancelled = True
            dev.cancel(u)
            dev.cancel(u)  # a second unlink of the same URB
        took = time.perf_counter() - started
        assert all(done == [u] and u.status == -errno.ECONNRESET for u, done in waiting)
        assert took < 2.0, took  # was quadratic: a scan of the waiting list per unlink
        assert dev.in_flight == 1 and not dev._deferred
        h.gate.set()
        for _ in range(200):
            if dev._busy is None:
                break
            await asyncio.sleep(0.01)
        assert dev.in_flight == 0 and h.transfers == []
        dev.release()

    asyncio.run(body())


def test_client_vanishing_with_transfers_in_flight_frees_everything():
    async def body():
        loop = asyncio.get_running_loop()
        dev, h = hostile_device(configs=(CONFIG1, CONFIG2))
        dev._detached = [0]
        h.loop = loop
        # the client changed what it could: alt setting, then configuration 2 and back is not done
        s, _ = ctrl(1, "010b010000000000")
        dev.submit(s)
        for _ in range(100):
            if s.done and dev._busy is None:
                break
            await asyncio.sleep(0.01)
        urbs = []
        for seq in range(2, 202):
            u, _ = urb(seq, 2, USBIP_DIR_IN, 1024, bytearray(1024), number_of_packets=1, iso=IsoPackets.layout(1, 1024))
            dev.submit(u)
            urbs.append(u)
        assert len(h.transfers) == 200
        # the session's shutdown: every URB unlinked; libusb reports the cancellations later
        for t in h.transfers:
            t.iso_results = [(m.TRANSFER_CANCELLED, 0)]
            orig = t.cancel
            t.cancel = lambda t=t, orig=orig: (orig(), loop.call_later(0.01, t.finish, m.TRANSFER_CANCELLED, 0))
        for u in urbs[:150]:
            u.cancelled = True
            dev.cancel(u)
        for u in urbs[150:]:
            u.complete(-errno.ECONNRESET, 0)  # the session gave up waiting: transfers still in flight
        await dev.close()
        assert all(u.done for u in urbs) and dev.in_flight == 0
        assert all(t.closed and not t.submitted for t in h.transfers)
        names = [c[0] for c in h.calls]
        assert ("setInterfaceAltSetting", 0, 0) in h.calls  # alt setting back to 0 ...
        assert names.index("releaseInterface") < names.index("attachKernelDriver") < names.index("close")
        assert ("attachKernelDriver", 0) in h.calls and dev.handle is None
        assert h.closed_while == [False]

    asyncio.run(body())


def test_close_sets_the_configuration_found_at_import_again():
    async def body():
        dev, h = hostile_device(configs=(CONFIG1, CONFIG2))
        dev._detached = [0, 1]
        u, _ = ctrl(1, "0009020000000000")
        h.current_config = 2
        dev.submit(u)
        for _ in range(100):
            if u.done and dev._busy is None:
                break
            await asyncio.sleep(0.01)
        assert u.status == 0 and dev.configuration_value == 2 and dev.endpoint_type(5, USBIP_DIR_IN) == XFER_BULK
        h.calls.clear()
        await dev.close()
        names = [c[0] for c in h.calls]
        assert ("setConfiguration", 1) in h.calls
        assert names.index("releaseInterface") < names.index("setConfiguration") < names.index("attachKernelDriver")
        assert {("attachKernelDriver", 0), ("attachKernelDriver", 1)} <= set(h.calls)

    asyncio.run(body())


def test_close_never_closes_the_handle_under_a_running_libusb_call(monkeypatch):
    """A SET_CONFIGURATION stuck in the kernel: close() gave up after 30 s, then released the
    interfaces and closed the handle from the loop thread while the worker was still inside
    libusb with that handle (use after free in libusb; the loop blocked on the device lock)."""
    monkeypatch.setattr(devmod, "CLOSE_TIMEOUT", 0.2, raising=False)

    async def body():
        dev, h = hostile_device()
        dev._detached = [0]
        dev._loop = asyncio.get_running_loop()
        h.loop = dev._loop
        h.gate, h.slow = threading.Event(), ("setConfiguration",)
        s, sdone = ctrl(1, "0009010000000000")
        dev.submit(s)
        await asyncio.sleep(0.05)
        await asyncio.wait_for(dev.close(), 5)
        loop_thread = threading.get_ident()
        assert ("close",) not in h.calls and dev.handle is h and dev.is_open  # still in use
        assert loop_thread not in h.threads.get("releaseInterface", set())
        h.gate.set()
        for _ in range(300):
            if dev.handle is None:
                break
            await asyncio.sleep(0.01)
        assert dev.handle is None and h.closed_while == [False]
        assert ("attachKernelDriver", 0) in h.calls
        assert loop_thread not in h.threads["attachKernelDriver"]
        assert h.threads["close"] == {loop_thread}  # libusb's pollfd bookkeeping stays in the loop thread
        assert sdone

    asyncio.run(body())


def test_open_refuses_while_the_previous_import_is_still_being_released():
    async def body():
        dev, _h = hostile_device()
        with pytest.raises(OSError):
            await dev.open()

    asyncio.run(body())


# ---------------------------------------------------------------- 3. sizes


def test_iso_packets_are_bounded_before_anything_is_allocated():
    dev, h = hostile_device()
    s, _ = ctrl(1, "010b010000000000")
    dev.submit(s)
    # 1024 packets all naming the whole 1024-byte buffer: a 1 MiB bounce buffer per URB before
    # (16 GiB for 1024 packets over a 16 MiB buffer)
    overlapping = IsoPackets.from_list([(0, 1024, 0, 0)] * 1024)
    u, _ = urb(2, 2, USBIP_DIR_IN, 1024, bytearray(1024), number_of_packets=1024, iso=overlapping)
    dev.submit(u)
    assert u.status == -errno.EINVAL and h.transfers == []
    # a packet larger than the endpoint moves per microframe: usb_submit_urb's -EMSGSIZE
    big = IsoPackets.from_list([(0, 2048, 0, 0)])
    v, _ = urb(3, 2, USBIP_DIR_IN, 2048, bytearray(2048), number_of_packets=1, iso=big)
    dev.submit(v)
    assert v.status == -errno.EMSGSIZE and h.transfers == []
    # high bandwidth (3 x 1024 per microframe) takes 3072; non-overlapping gaps are fine
    hb = IsoPackets.from_list([(0, 3072, 0, 0), (4096, 3072, 0, 0)])
    w, _ = urb(4, 3, USBIP_DIR_OUT, 8192, bytearray(8192), number_of_packets=2, iso=hb)
    dev.submit(w)
    assert not w.done and len(h.transfers) == 1 and h.transfers[0].iso_lengths == [3072, 3072]


def test_control_sizes():
    dev, h = hostile_device()
    # GET_DESCRIPTOR with wLength 65535: libusb refuses more than 4096 bytes of control data on
    # Linux; asked for "up to" 65535 the device answers what it has
    u, _ = ctrl(1, "80060002000000ff".replace("00ff", "ffff"), 65535, USBIP_DIR_IN)
    dev.submit(u)
    (t,) = h.transfers
    assert len(t.view) == 4096 and not u.done
    t.finish(m.TRANSFER_COMPLETED, 32, bytes(range(32)))
    assert u.status == 0 and u.actual_length == 32 and bytes(u.buffer[:32]) == bytes(range(32))
    # OUT data libusb cannot send: refused before a transfer exists
    v, _ = ctrl(2, "4001000000000120", 0x2001, USBIP_DIR_OUT)
    dev.submit(v)
    assert v.status == -errno.EMSGSIZE and len(h.transfers) == 1


def test_iso_plan_bounds():
    with pytest.raises(m.UrbRefused) as exc:
        m.IsoPlan([(0, 8, 0, 0), (0, 8, 0, 0)], 8)
    assert exc.value.status == -errno.EINVAL
    with pytest.raises(m.UrbRefused) as exc:
        m.IsoPlan([(0, 9, 0, 0)], 16, max_packet=8)
    assert exc.value.status == -errno.EMSGSIZE
    assert m.IsoPlan([(0, 8, 0, 0), (4, 4, 0, 0)], 12).total == 12  # overlapping within the length: allowed


def test_special_error_mapping():
    nf = m.LIBUSB_ERROR_NOT_FOUND
    assert m.error_to_errno(nf) == -errno.EPROTO  # never "no device" by itself
    assert m.special_error_to_errno("interface", nf) == -errno.EINVAL
    assert m.special_error_to_errno("config", nf) == -errno.EINVAL
    assert m.special_error_to_errno("clear_halt", nf) == -errno.EPIPE
    assert m.special_error_to_errno("reset", nf) == -errno.ENODEV
    assert m.special_error_to_errno("interface", m.LIBUSB_ERROR_NO_DEVICE) == -errno.ENODEV


def test_layout_bytes_per_interval():
    ss = _config(
        1,
        _intf(0, 0, 1),
        _ep(0x81, 5, 1024),
        bytes([6, 0x30, 3, 2, 0, 0x30]),  # bMaxBurst 3 (4 packets), Mult 2 (3 bursts)
    )
    lay = ConfigLayout(ss, Speed.SUPER)
    (ep,) = lay.endpoints
    assert ep.max_bytes == 1024 * 4 * 3 and ep.interface == 0
    assert ConfigLayout(ss, Speed.HIGH).endpoints[0].max_bytes == 1024
    hs = ConfigLayout(CONFIG1, Speed.HIGH)
    assert {e.address: e.max_bytes for e in hs.endpoints if e.xfer == XFER_ISOC} == {0x82: 1024, 0x03: 3072}
    assert hs.owner(0x84) == 1 and hs.owner(0x85) is None and hs.has_alt(0, 1) and not hs.has_alt(1, 1)
