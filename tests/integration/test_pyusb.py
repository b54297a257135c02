"""PyUSB programs driving our virtual devices through the usbip.pyusb backend.

Each test serves its devices from an in-process server on 127.0.0.1 (its own event loop in a
thread, as a remote machine would run it) and talks to them with plain PyUSB calls: only
``backend=`` says the devices are on the other side of a USB/IP connection.
"""

from __future__ import annotations

import array
import asyncio
import errno
import gc
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("usb")
import usb.core
import usb.util

import usbip.pyusb
from usbip.server import Server
from usbip.virtual import AudioDevice, KeyboardDevice, LoopbackDevice, StorageDevice
from usbip.virtual.keyboard import decode_reports
from usbip.virtual.loopback import pattern_bytes

from .helpers import idle

GZ = {"idVendor": 0x0525, "idProduct": 0xA4A0}


class ServedDevices:
    """Our server exporting ``devices`` on its own event loop in a thread."""

    def __init__(self, *devices: Any) -> None:
        self.devices = devices
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-usbip-server", daemon=True)
        self.thread.start()
        self.srv = Server(list(devices), host="127.0.0.1", port=0)
        self.call(self.srv.start())
        self.port = self.srv.port
        self.addr = f"127.0.0.1:{self.port}"

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def in_loop(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return self.call(run())

    def stats(self) -> dict[str, int]:
        return self.in_loop(self.srv.stats)

    def wait(self, pred: Callable[[dict[str, int]], bool], timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while not pred(self.stats()):
            if time.monotonic() > end:
                return False
            time.sleep(0.01)
        return True

    def idle(self, timeout: float = 5.0) -> bool:
        """Wait (bounded) until nothing is left on the server."""
        end = time.monotonic() + timeout
        while not self.in_loop(lambda: idle(self.srv)):
            if time.monotonic() > end:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        try:
            self.call(self.srv.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., ServedDevices]]:
    """``serve(*devices)``: a server for this test; at the end it must be idle, then it stops."""
    started: list[ServedDevices] = []

    def start(*devices: Any) -> ServedDevices:
        s = ServedDevices(*devices)
        started.append(s)
        return s

    yield start
    try:
        for s in started:
            assert s.idle(), f"server not idle after the test: {s.stats()}"
    finally:
        for s in started:
            s.close()


@pytest.fixture
def backends() -> Iterator[Callable[..., usbip.pyusb.UsbipBackend]]:
    """``backends(*servers, **options)``: PyUSB backends closed at the end of the test."""
    made: list[usbip.pyusb.UsbipBackend] = []

    def make(*servers: Any, **kw: Any) -> usbip.pyusb.UsbipBackend:
        be = usbip.pyusb.get_backend(*servers, **kw)
        made.append(be)
        return be

    yield make
    for be in made:
        be.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("usbip-pyusb-")]


def find(be: Any, **match: Any) -> usb.core.Device:
    dev = usb.core.find(backend=be, **match)
    assert dev is not None, f"no device matching {match}"
    return dev


# ---------------------------------------------------------------- loopback: bulk, interrupt, control
def test_loopback_bulk_interrupt_and_control(serve, backends) -> None:
    gz = LoopbackDevice(pattern=1)
    s = serve(gz)
    dev = find(backends(s.addr), **GZ)
    assert (dev.bus, dev.address, dev.port_number, dev.speed) == (100, gz.devnum, 1, 3)  # libusb HIGH = 3
    assert usbip.pyusb.location(dev) == ("127.0.0.1", s.port, "100-1")
    assert dev.bcdUSB == 0x0200 and dev.bMaxPacketSize0 == 64 and dev.bNumConfigurations == 1
    dev.set_configuration()
    cfg = dev.get_active_configuration()
    assert cfg.bConfigurationValue == 1
    intf = cfg[(0, 0)]
    assert intf.bInterfaceClass == 0xFF and [e.bEndpointAddress for e in intf] == [0x81, 0x01, 0x82, 0x02, 0x84, 0x04]
    assert dev.is_kernel_driver_active(0) is False
    dev.detach_kernel_driver(0)  # nothing to detach: a no-op
    usb.util.claim_interface(dev, 0)

    # loopback: what goes out on 0x02 comes back on 0x82, in order
    for size in (1, 511, 512, 513, 4096):
        data = os.urandom(size)
        assert dev.write(0x02, data) == size
        assert bytes(dev.read(0x82, 8192, timeout=2000)) == data
    # source 0x81 sends gadget zero's pattern 1; sink 0x01 checks it
    got = dev.read(0x81, 4096, timeout=2000)
    assert bytes(got) == pattern_bytes(512, 4096)
    assert dev.write(0x01, pattern_bytes(512, 2048)) == 2048
    assert gz.sink_errors == 0
    # interrupt endpoints: the same source and sink
    assert bytes(dev.read(0x84, 1024, timeout=2000)) == pattern_bytes(1024, 1024)
    assert dev.write(0x04, pattern_bytes(1024, 1024)) == 1024
    assert gz.sink_errors == 0
    # an array as the buffer: filled in place, the count returned
    buf = usb.util.create_buffer(64)
    assert dev.read(0x81, buf) == 64 and bytes(buf) == pattern_bytes(512, 64)

    # control: strings through usb.util (GET_DESCRIPTOR on ep 0), vendor requests 0x5b / 0x5c
    assert dev.langids == (0x0409,)
    assert dev.manufacturer == "cyusbip" and dev.product == "Gadget Zero"
    assert usb.util.get_string(dev, dev.iSerialNumber) == gz.serial
    raw = dev.ctrl_transfer(0x80, 6, 0x0100, 0, 18)
    assert len(raw) == 18 and raw[0] == 18 and struct.unpack_from("<H", raw, 8)[0] == 0x0525
    blob = os.urandom(100)
    assert dev.ctrl_transfer(0x40, 0x5B, 0, 0, blob) == 100
    assert bytes(dev.ctrl_transfer(0xC0, 0x5C, 0, 0, 100)) == blob
    assert dev.ctrl_transfer(0x80, 8, 0, 0, 1)[0] == 1  # GET_CONFIGURATION
    usb.util.release_interface(dev, 0)
    usb.util.dispose_resources(dev)
    assert s.wait(lambda st: st["sessions"] == 0)


def test_timeout_unlinks_and_device_still_works(serve, backends) -> None:
    s = serve(LoopbackDevice())
    dev = find(backends(s.addr), **GZ)
    dev.set_configuration()
    # 0x82 answers only when 0x02 got data: this read waits until its timeout unlinks it
    with pytest.raises(usb.core.USBTimeoutError) as info:
        dev.read(0x82, 512, timeout=50)
    assert info.value.errno == errno.ETIMEDOUT and info.value.backend_error_code == -7
    assert s.wait(lambda st: st["pending_urbs"] == 0)  # the server let go of it
    # the device still works, and the unlinked read took nothing
    assert dev.write(0x02, b"after") == 5
    assert bytes(dev.read(0x82, 512, timeout=2000)) == b"after"


def test_no_timeout_waits_for_data(serve, backends) -> None:
    """timeout=0 is libusb's "no timeout": the read waits until the data is there."""
    s = serve(LoopbackDevice())
    dev = find(backends(s.addr), **GZ)
    dev.set_configuration()
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(bytes(dev.read(0x82, 512, timeout=0))), daemon=True)
    reader.start()
    assert s.wait(lambda st: st["pending_urbs"] == 1)
    assert dev.write(0x02, b"late data", timeout=2000) == 9
    reader.join(10)
    assert got == [b"late data"]


def test_interrupted_read_is_unlinked(serve, backends) -> None:
    """Ctrl-C in a read without timeout: KeyboardInterrupt at once, the URB unlinked on the server."""
    s = serve(LoopbackDevice())
    dev = find(backends(s.addr), **GZ)
    dev.set_configuration()
    main = threading.main_thread().ident
    assert threading.get_ident() == main
    assert main is not None

    def interrupt() -> None:
        if s.wait(lambda st: st["pending_urbs"] == 1):
            signal.pthread_kill(main, signal.SIGINT)

    timer = threading.Thread(target=interrupt, daemon=True)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        dev.read(0x82, 512, timeout=0)
    timer.join(10)
    assert s.wait(lambda st: st["pending_urbs"] == 0)
    assert dev.write(0x02, b"still here") == 10
    assert bytes(dev.read(0x82, 512, timeout=2000)) == b"still here"


def test_interrupt_before_the_wait_began_still_unlinks(serve, backends, monkeypatch) -> None:
    """Ctrl-C landing after the URB was scheduled but before the wait for it began (seen in CI under
    load: the URB stayed in flight on the server with nobody waiting for it)."""
    s = serve(LoopbackDevice())
    be = backends(s.addr)
    dev = find(be, **GZ)
    dev.set_configuration()

    def interrupted_wait(fut: Any, wait: Any, cancel: Any) -> Any:
        assert s.wait(lambda st: st["pending_urbs"] == 1)
        raise KeyboardInterrupt

    monkeypatch.setattr(be._loop, "wait", interrupted_wait)
    with pytest.raises(KeyboardInterrupt):
        dev.read(0x82, 512, timeout=0)
    monkeypatch.undo()
    assert s.wait(lambda st: st["pending_urbs"] == 0)
    assert dev.write(0x02, b"still here") == 10
    assert bytes(dev.read(0x82, 512, timeout=2000)) == b"still here"


def test_stall_is_epipe_and_clear_halt_recovers(serve, backends) -> None:
    s = serve(LoopbackDevice())
    dev = find(backends(s.addr), **GZ)
    dev.set_configuration()
    dev.ctrl_transfer(0x02, 3, 0, 0x81)  # SET_FEATURE(ENDPOINT_HALT) on 0x81
    with pytest.raises(usb.core.USBError) as info:
        dev.read(0x81, 512)
    e = info.value
    assert not isinstance(e, usb.core.USBTimeoutError)
    assert (e.errno, e.backend_error_code, e.strerror) == (errno.EPIPE, -9, "Pipe error")
    assert dev.ctrl_transfer(0x82, 0, 0, 0x81, 2)[0] == 1  # GET_STATUS: halted
    dev.clear_halt(0x81)
    assert len(dev.read(0x81, 512)) == 512
    # a control request the device does not know stalls ep 0 the same way
    with pytest.raises(usb.core.USBError) as info:
        dev.ctrl_transfer(0xC0, 0x77, 0, 0, 4)
    assert info.value.errno == errno.EPIPE
    assert dev.ctrl_transfer(0x80, 0, 0, 0, 2) is not None  # ep 0 takes the next request


def test_configuration_altsetting_iso_and_reset(serve, backends) -> None:
    class Counting(LoopbackDevice):
        resets = 0

        def on_reset(self) -> None:
            self.resets += 1
            super().on_reset()

    gz = Counting(pattern=1)
    s = serve(gz)
    be = backends(s.addr)
    dev = find(be, **GZ)
    dev.set_configuration(1)
    assert dev.get_active_configuration().bConfigurationValue == 1
    with pytest.raises(ValueError, match="Invalid endpoint"):
        dev.read(0x83, 1024)  # the iso endpoints live in alt setting 1
    dev.set_interface_altsetting(interface=0, alternate_setting=1)
    # iso IN: the buffer is split into packets of wMaxPacketSize (1024), as libusb does
    buf = array.array("B", bytes(4 * 1024))
    assert dev.read(0x83, buf, timeout=2000) == 4096
    assert bytes(buf) == pattern_bytes(1024, 1024) * 4
    assert dev.write(0x03, pattern_bytes(1024, 1024) * 3, timeout=2000) == 3072
    assert gz.sink_errors == 0
    dev.set_interface_altsetting(0, 0)
    with pytest.raises(usb.core.USBError):
        dev.ctrl_transfer(0x00, 9, 7, 0)  # SET_CONFIGURATION 7: no such configuration, it stalls
    dev.set_configuration(0)
    assert dev._ctx.backend.get_configuration(dev._ctx.handle) == 0
    dev.set_configuration()
    assert dev.get_active_configuration().bConfigurationValue == 1

    # port reset: a second Device keeps the import open, so what resets the device is the reset
    other = find(be, **GZ)
    other.ctrl_transfer(0x80, 0, 0, 0, 2)
    assert dev.write(0x02, b"lost in the reset") == 17
    before = gz.resets
    dev.reset()
    assert gz.resets == before + 1 and gz.fifo_bytes == 0
    with pytest.raises(usb.core.USBTimeoutError):
        dev.read(0x82, 512, timeout=50)  # opened again (the same import): the FIFO went with the reset
    assert len(dev.read(0x81, 64)) == 64
    assert s.stats()["sessions"] == 1
    # two handles are two claimants, as two libusb handles are: the interface dev holds is busy
    with pytest.raises(usb.core.USBError) as info:
        other.read(0x81, 64)
    assert info.value.errno == errno.EBUSY


# ---------------------------------------------------------------- other devices
CBW = struct.Struct("<IIIBBB16s")
CSW = struct.Struct("<IIIB")


def _scsi(dev: usb.core.Device, tag: int, cdb: bytes, data_in: int = 0, data_out: bytes = b"") -> tuple[int, bytes]:
    """One Bulk-Only Transport command: CBW on 0x02, data stage, CSW on 0x81 -> (status, data)."""
    length = len(data_out) or data_in
    flags = 0x80 if data_in else 0
    assert dev.write(0x02, CBW.pack(0x43425355, tag, length, flags, 0, len(cdb), cdb.ljust(16, b"\0"))) == 31
    got = b""
    if data_out:
        assert dev.write(0x02, data_out, timeout=5000) == len(data_out)
    elif data_in:
        got = bytes(dev.read(0x81, data_in, timeout=5000))
    sig, rtag, _residue, status = CSW.unpack(bytes(dev.read(0x81, 13, timeout=5000)))
    assert (sig, rtag) == (0x53425355, tag)
    return status, got


def test_storage_scsi_round_trip(serve, backends, tmp_path) -> None:
    s = serve(StorageDevice(tmp_path / "disk.img", size=1 << 20))
    dev = find(backends(s.addr), idVendor=0x0525, idProduct=0xA4A5)
    assert dev[0][(0, 0)].bInterfaceClass == 8
    dev.set_configuration()
    assert dev.ctrl_transfer(0xA1, 0xFE, 0, 0, 1)[0] == 0  # GET MAX LUN: one LUN
    status, inquiry = _scsi(dev, 1, bytes((0x12, 0, 0, 0, 36, 0)), data_in=36)
    assert status == 0 and inquiry[8:16].rstrip() == b"cyusbip"
    status, cap = _scsi(dev, 2, bytes((0x25,)) + bytes(9), data_in=8)
    last, block = struct.unpack(">II", cap)
    assert status == 0 and block == 512 and last == (1 << 20) // 512 - 1
    data = os.urandom(1024)
    status, _ = _scsi(dev, 3, struct.pack(">BBIBHB", 0x2A, 0, 7, 0, 2, 0), data_out=data)
    assert status == 0
    status, back = _scsi(dev, 4, struct.pack(">BBIBHB", 0x28, 0, 7, 0, 2, 0), data_in=1024)
    assert status == 0 and back == data
    usb.util.dispose_resources(dev)
    assert (tmp_path / "disk.img").read_bytes()[7 * 512 : 9 * 512] == data


def test_keyboard_interrupt_reports(serve, backends) -> None:
    kb = KeyboardDevice("hi", delay=0)
    s = serve(kb)
    dev = find(backends(s.addr), bDeviceClass=0, idVendor=0x1209)
    intf = dev[0][(0, 0)]
    assert (intf.bInterfaceClass, intf.bInterfaceSubClass, intf.bInterfaceProtocol) == (3, 1, 1)
    assert dev.speed == 2  # full speed
    dev.set_configuration()
    reports = [bytes(dev.read(0x81, 8, timeout=2000)) for _ in range(4)]
    assert decode_reports(reports) == "hi"
    with pytest.raises(usb.core.USBTimeoutError):
        dev.read(0x81, 8, timeout=30)  # nothing left to type
    s.in_loop(lambda: kb.type_text("Z"))
    assert decode_reports([bytes(dev.read(0x81, 8, timeout=2000)) for _ in range(2)]) == "Z"


def test_audio_iso_capture(serve, backends) -> None:
    audio = AudioDevice()
    s = serve(audio)
    dev = find(backends(s.addr), idVendor=0x1D6B, idProduct=0x0101)
    assert dev.bDeviceClass == 0xEF
    capture = usb.util.find_descriptor(dev[0], bInterfaceNumber=1, bAlternateSetting=1)
    ep = capture[0]
    assert ep.bEndpointAddress == 0x81 and ep.bmAttributes & 3 == 1 and ep.extra_descriptors  # CS endpoint
    dev.set_configuration()
    dev.set_interface_altsetting(1, 1)
    mps = ep.wMaxPacketSize  # 196: 48 frames of 4 bytes per 1 ms packet, plus one frame of headroom
    frames: list[int] = []
    for _ in range(2):
        buf = array.array("B", bytes(8 * mps))
        assert dev.read(0x81, buf, timeout=2000) == 8 * 192
        for i in range(8):  # each packet at its offset, as libusb leaves it
            frames += struct.unpack_from("<48I", buf, i * mps)
    assert frames == list(range(16 * 48))  # the test signal: frame n is n
    assert (audio.capture.frames, audio.capture.packets) == (16 * 48, 16)
    dev.set_interface_altsetting(1, 0)


# ---------------------------------------------------------------- enumeration
def test_find_across_servers(serve, backends, caplog) -> None:
    a = serve(LoopbackDevice(), KeyboardDevice(delay=0))
    b = serve(LoopbackDevice(serial="SECOND"))
    be = backends(a.addr, ("127.0.0.1", b.port))
    assert be.servers == [("127.0.0.1", a.port), ("127.0.0.1", b.port)]
    every = list(usb.core.find(find_all=True, backend=be))
    assert len(every) == 3
    gzs = list(usb.core.find(find_all=True, backend=be, **GZ))
    assert [usbip.pyusb.location(d)[1] for d in gzs] == [a.port, b.port]
    assert gzs[0] != gzs[1]  # same bus and address numbers on two servers: told apart by bus
    assert gzs[1].serial_number == "SECOND"
    hid = list(usb.core.find(find_all=True, backend=be, custom_match=lambda d: d[0][(0, 0)].bInterfaceClass == 3))
    assert [d.idVendor for d in hid] == [0x1209]
    # one server down: the others are still found (with a warning); all down: PyUSB's error
    dead = socket_port_nobody_listens_on()
    be2 = backends(a.addr, f"127.0.0.1:{dead}")
    assert len(list(usb.core.find(find_all=True, backend=be2))) == 2
    assert f"127.0.0.1:{dead}" in caplog.text
    with pytest.raises(usb.core.USBError) as info:
        usb.core.find(backend=backends(f"127.0.0.1:{dead}"))
    assert info.value.errno == errno.ENODEV


def socket_port_nobody_listens_on() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_device_in_use_elsewhere_and_probe_off(serve, backends) -> None:
    s = serve(LoopbackDevice())
    user = find(backends(s.addr), **GZ)
    user.set_configuration()  # imported by the first backend
    dev = find(backends(s.addr), **GZ)  # cannot be imported: described from the device list
    assert dev.iManufacturer == 0 and dev.bNumConfigurations == 1 and dev.speed == 3
    assert dev[0][(0, 0)].bInterfaceClass == 0xFF and dev[0][(0, 0)].bNumEndpoints == 0
    with pytest.raises(usb.core.USBError) as info:
        dev.set_configuration()
    assert info.value.errno == errno.EBUSY and info.value.backend_error_code == -6
    usb.util.dispose_resources(user)
    assert s.wait(lambda st: st["busy_devices"] == 0)

    # probe=False: nothing imported until the device is opened; then its real descriptors
    lazy = find(backends(s.addr, probe=False), **GZ)
    assert s.stats()["sessions"] == 0
    assert lazy[0][(0, 0)].bNumEndpoints == 0
    lazy.set_configuration()
    assert lazy[0][(0, 0)].bNumEndpoints == 6
    assert lazy.write(0x02, b"x") == 1 and bytes(lazy.read(0x82, 64)) == b"x"


def test_close_and_collect_end_the_thread_and_imports(serve) -> None:
    s = serve(LoopbackDevice())
    be = usbip.pyusb.get_backend(s.addr)
    dev = find(be, **GZ)
    dev.set_configuration()
    assert s.wait(lambda st: st["sessions"] == 1)
    with be:
        pass  # close() (idempotent), with a device still open
    assert s.wait(lambda st: st["sessions"] == 0)
    with pytest.raises(usb.core.USBError) as info:
        dev.read(0x81, 64)
    assert info.value.errno == errno.ENODEV
    del dev, be

    def use() -> None:
        d = find(usbip.pyusb.get_backend(s.addr), **GZ)
        d.set_configuration()
        assert len(d.read(0x81, 64)) == 64

    use()  # nothing keeps that backend: collecting it closes it
    gc.collect()
    assert s.wait(lambda st: st["sessions"] == 0)
    end = time.monotonic() + 10
    while [t for t in threading.enumerate() if t.name.startswith("usbip-pyusb-")] and time.monotonic() < end:
        time.sleep(0.02)
    assert not [t for t in threading.enumerate() if t.name.startswith("usbip-pyusb-")]


def test_server_specs() -> None:
    from usbip.pyusb.backend import parse_server

    assert parse_server("host") == ("host", 3240)
    assert parse_server("host:3241") == ("host", 3241)
    assert parse_server("[::1]:3242") == ("::1", 3242)
    assert parse_server("[fe80::1]") == ("fe80::1", 3240)
    assert parse_server("::1") == ("::1", 3240)
    assert parse_server(("10.0.0.1", 1)) == ("10.0.0.1", 1)
    with pytest.raises(ValueError):
        parse_server("host:port")


def test_import_without_pyusb_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['usb'] = None\n"
        "import usbip, usbip.client, usbip.server, usbip.virtual\n"
        "try:\n    import usbip.pyusb\nexcept ImportError as e:\n    print(e)\nelse:\n    print('imported')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "cyusbip[pyusb]" in r.stdout
    # and nothing but usbip.pyusb imports PyUSB
    code = (
        "import sys, usbip, usbip.client, usbip.server, usbip.virtual, usbip.cli.usbip_main\n"
        "print('usb' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
