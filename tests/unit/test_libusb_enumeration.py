"""Enumeration through libusb (no sysfs) against faked python-libusb1 contexts and devices.

The fakes are built from raw descriptor bytes the way libusb parses them (class-specific
"extra" descriptors attached to the configuration, interface or endpoint they follow), so a
record from the libusb scan can be compared field by field, descriptors included, with the
sysfs scan of a sysfs tree holding the same bytes.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import errno
import json
import os

import pytest

from usbip.backends import discovery, sysfs, usbdev, usbfs
from usbip.backends.libusb import enumeration as en
from usbip.backends.libusb.opening import open_handle
from usbip.backends.state import BindState
from usbip.backends.usbdev import EnumerationError, UsbDevice
from usbip.protocol.constants import Speed
from usbip.usb.descriptors import walk

DEV_DESC = bytes.fromhex("12010002000000402505a0a4000101020301")  # 0525:a4a0, iSerialNumber 3
CONFIG = bytes.fromhex(
    "09024c00020100c032"  # config: wTotalLength 76, 2 interfaces, value 1, MaxPower 100 mA
    "080b000202020100"  # interface association (libusb: configuration extra)
    "090400000102010000"  # interface 0 alt 0, CDC
    "0524001001"  # class-specific (interface extra)
    "0705830308000a"  # 0x83 interrupt IN
    "0904010002ff000000"  # interface 1 alt 0: 2 bulk endpoints
    "07058102000200"  # 0x81 bulk IN, 512
    "063000000000"  # SuperSpeed companion (endpoint extra)
    "07050102000200"  # 0x01 bulk OUT
    "0904010100ff000000"  # interface 1 alt 1, no endpoints
)
LIBUSB_SPEED_HIGH = 3


# ---------------------------------------------------------------- fakes built from descriptor bytes
class FakeEndpoint:
    def __init__(self, raw: bytes):
        self.raw, self.extra = raw, []

    def getAddress(self):
        return self.raw[2]

    def getAttributes(self):
        return self.raw[3]

    def getMaxPacketSize(self):
        return self.raw[4] | self.raw[5] << 8

    def getInterval(self):
        return self.raw[6]

    def getRefresh(self):
        return self.raw[7] if len(self.raw) >= 9 else 0

    def getSyncAddress(self):
        return self.raw[8] if len(self.raw) >= 9 else 0

    def getExtra(self):
        return [bytearray(e) for e in self.extra]


class FakeSetting:
    def __init__(self, raw: bytes):
        self.raw, self.extra, self.endpoints = raw, [], []

    def getNumber(self):
        return self.raw[2]

    def getAlternateSetting(self):
        return self.raw[3]

    def getNumEndpoints(self):
        return self.raw[4]

    def getClass(self):
        return self.raw[5]

    def getSubClass(self):
        return self.raw[6]

    def getProtocol(self):
        return self.raw[7]

    def getDescriptor(self):
        return self.raw[8]

    def getExtra(self):
        return [bytearray(e) for e in self.extra]

    def __iter__(self):
        return iter(self.endpoints)


class FakeConfig:
    """A python-libusb1 USBConfiguration over one raw configuration descriptor, parsed like libusb."""

    def __init__(self, raw: bytes, speed: int = LIBUSB_SPEED_HIGH):
        self.raw, self.speed, self.extra = raw[:9], speed, []
        self.interfaces: dict[int, list[FakeSetting]] = {}
        owner = self
        for dtype, d in list(walk(raw))[1:]:
            if dtype == 4:
                owner = FakeSetting(bytes(d))
                self.interfaces.setdefault(d[2], []).append(owner)
            elif dtype == 5 and isinstance(owner, (FakeSetting, FakeEndpoint)):
                ep = FakeEndpoint(bytes(d))
                setting = owner if isinstance(owner, FakeSetting) else self._last_setting()
                setting.endpoints.append(ep)
                owner = ep
            else:
                owner.extra.append(bytes(d))

    def _last_setting(self) -> FakeSetting:
        return list(self.interfaces.values())[-1][-1]

    def getNumInterfaces(self):
        return self.raw[4]

    def getConfigurationValue(self):
        return self.raw[5]

    def getDescriptor(self):
        return self.raw[6]

    def getAttributes(self):
        return self.raw[7]

    def getMaxPower(self):  # python-libusb1 scales to mA
        return self.raw[8] * (8 if self.speed == 4 else 2)

    def getExtra(self):
        return [bytearray(e) for e in self.extra]

    def __iter__(self):
        return iter(list(self.interfaces.values()))


class FakeHandle:
    def __init__(self, dev):
        self.dev = dev
        self.closed = False

    def getSupportedLanguageList(self):
        return list(self.dev.langs)

    def getStringDescriptor(self, index, lang, errors="strict"):
        self.dev.asked.append((index, lang))
        return self.dev.strings.get(index)

    def close(self):
        self.closed = True


class FakeDevice:
    def __init__(
        self,
        bus=1,
        addr=2,
        ports=(1,),
        speed=LIBUSB_SPEED_HIGH,
        desc=DEV_DESC,
        configs=(CONFIG,),
        serial="SN-0001",
        active=1,
        open_error=None,
        langs=(0x0409,),
    ):
        self.bus, self.addr, self.ports, self.speed = bus, addr, list(ports), speed
        self.desc, self.configs = desc, list(configs)
        self.strings = {desc[16]: serial} if desc[16] else {}
        self.active, self.open_error, self.langs = active, open_error, langs
        self.opened = 0
        self.asked: list[tuple[int, int]] = []
        self.closed = False

    def _w(self, off):
        return self.desc[off] | self.desc[off + 1] << 8

    def getBusNumber(self):
        return self.bus

    def getDeviceAddress(self):
        return self.addr

    def getPortNumberList(self):
        return list(self.ports)

    def getDeviceSpeed(self):
        return self.speed

    def getbcdUSB(self):
        return self._w(2)

    def getDeviceClass(self):
        return self.desc[4]

    def getDeviceSubClass(self):
        return self.desc[5]

    def getDeviceProtocol(self):
        return self.desc[6]

    def getMaxPacketSize0(self):
        return self.desc[7]

    def getVendorID(self):
        return self._w(8)

    def getProductID(self):
        return self._w(10)

    def getbcdDevice(self):
        return self._w(12)

    def getManufacturerDescriptor(self):
        return self.desc[14]

    def getProductDescriptor(self):
        return self.desc[15]

    def getSerialNumberDescriptor(self):
        return self.desc[16]

    def getNumConfigurations(self):
        return self.desc[17]

    def iterConfigurations(self):
        return iter([FakeConfig(c, self.speed) for c in self.configs])

    def open(self):
        self.opened += 1
        if self.open_error is not None:
            raise self.open_error
        return FakeHandle(self)

    def close(self):
        self.closed = True

    def __str__(self):
        return f"Bus {self.bus:03} Device {self.addr:03}"


class FakeContext:
    def __init__(self, devices):
        self.devices = devices
        self.opened = self.closed = 0
        self.wrapped: list[int] = []

    def open(self):
        self.opened += 1
        return self

    def close(self):
        self.closed += 1

    def getDeviceList(self, skip_on_error=False):
        return list(self.devices)

    def wrapSysDevice(self, fd):
        self.wrapped.append(fd)
        return ("wrapped", fd)


class Contexts:
    """context_factory for LibusbScanner: a fresh FakeContext per scan over a shared device list."""

    def __init__(self, devices):
        self.devices = devices
        self.made: list[FakeContext] = []

    def __call__(self):
        ctx = FakeContext(self.devices)
        self.made.append(ctx)
        return ctx


def scanner(devices, **kw):
    kw.setdefault("active_config", lambda d: d.active)
    kw.setdefault("conninfo", lambda bus, addr: None)
    return en.LibusbScanner(Contexts(devices), **kw)


def make_sysfs(root, busid="1-1", serial="SN-0001", speed="480", devnum=2, descriptors=DEV_DESC + CONFIG):
    d = root / busid
    d.mkdir(parents=True)
    attrs = {
        "idVendor": "0525",
        "idProduct": "a4a0",
        "serial": serial,
        "busnum": busid.split("-")[0],
        "devnum": str(devnum),
        "speed": speed,
        "bDeviceClass": f"{descriptors[4]:02x}",
        "bConfigurationValue": "1",
    }
    for k, v in attrs.items():
        (d / k).write_text(v + "\n")
    (d / "descriptors").write_bytes(descriptors)
    return d


# ---------------------------------------------------------------- records
def test_descriptors_rebuilt_byte_for_byte():
    dev = FakeDevice()
    assert en.device_descriptor(dev) == DEV_DESC
    assert en.configuration_descriptor(FakeConfig(CONFIG), LIBUSB_SPEED_HIGH) == CONFIG
    # SuperSpeed: python-libusb1 reports MaxPower in 8 mA units; the rebuilt byte is the original one
    assert en.configuration_descriptor(FakeConfig(CONFIG, speed=4), 4) == CONFIG
    # an audio-style 9-byte endpoint keeps bRefresh/bSynchAddress
    audio = bytes.fromhex("09021b00010100c0320904000001010200000905810d4000040182")
    assert en.configuration_descriptor(FakeConfig(audio), 2) == audio


def test_same_record_as_the_sysfs_scan(tmp_path):
    make_sysfs(tmp_path, "1-1")
    (from_sysfs,) = sysfs.scan(str(tmp_path))
    (from_libusb,) = scanner([FakeDevice(bus=1, addr=2, ports=(1,))]).scan()
    assert type(from_libusb) is type(from_sysfs) is UsbDevice
    a, b = dataclasses.asdict(from_sysfs), dataclasses.asdict(from_libusb)
    assert (a.pop("source"), b.pop("source")) == ("sysfs", "libusb")
    assert a.pop("path").endswith("/1-1") and b.pop("path") == "/dev/bus/usb/001/002"
    assert a == b  # busid, bus/dev numbers, speed, ids, serial, class, config value, descriptors, drivers
    assert from_libusb.identity == from_sysfs.identity and from_libusb.key == from_sysfs.key


def test_busid_devid_and_speed():
    devs = [
        FakeDevice(bus=3, addr=7, ports=(2, 4, 1), speed=4),
        FakeDevice(bus=1, addr=9, ports=(5,), speed=1),
        FakeDevice(bus=2, addr=4, ports=(1,), speed=6),  # SUPER_PLUS_X2
        FakeDevice(bus=2, addr=5, ports=(2,), speed=0),
    ]
    recs = {r.busid: r for r in scanner(devs).scan()}
    assert sorted(recs) == ["1-5", "2-1", "2-2", "3-2.4.1"]
    r = recs["3-2.4.1"]
    assert (r.busnum, r.devnum, r.speed) == (3, 7, Speed.SUPER)
    from usbip.backends.libusb.device import LibusbDevice

    assert LibusbDevice(r, None, None).devid == (3 << 16) | 7
    assert [recs[b].speed for b in ("1-5", "2-1", "2-2")] == [Speed.LOW, Speed.SUPER_PLUS, Speed.UNKNOWN]


def test_device_record_lists_the_active_configuration():
    second = bytearray(bytes.fromhex("09021200010200c032090400000008065000"))  # value 2: mass storage
    desc = bytearray(DEV_DESC)
    desc[17] = 2
    (rec,) = scanner([FakeDevice(desc=bytes(desc), configs=(CONFIG, bytes(second)), active=2)]).scan()
    assert rec.configuration_value == 2
    from usbip.backends.libusb.device import LibusbDevice

    record = LibusbDevice(rec, None, None).record()
    assert (record.bConfigurationValue, record.bNumConfigurations, record.bNumInterfaces) == (2, 2, 1)
    assert [(i.bInterfaceClass, i.bInterfaceSubClass, i.bInterfaceProtocol) for i in record.interfaces] == [
        (8, 6, 0x50)
    ]
    (unconfigured,) = scanner([FakeDevice(active=None)]).scan()
    assert unconfigured.configuration_value == 0


def test_hubs_skipped_root_hubs_always():
    hub_desc = bytearray(DEV_DESC)
    hub_desc[4] = 0x09
    devs = [
        FakeDevice(bus=1, addr=1, ports=(), desc=bytes(hub_desc)),  # root hub
        FakeDevice(bus=1, addr=2, ports=(1,), desc=bytes(hub_desc)),  # external hub
        FakeDevice(bus=1, addr=3, ports=(1, 2)),
    ]
    assert [r.busid for r in scanner(devs).scan()] == ["1-1.2"]
    listed = scanner(devs).scan(include_hubs=True)
    assert [(r.busid, r.is_hub) for r in listed] == [("1-1", True), ("1-1.2", False)]


def test_a_broken_device_is_skipped():
    bad = FakeDevice(addr=3, ports=(2,))
    bad.iterConfigurations = lambda: (_ for _ in ()).throw(ValueError("invalid descriptor"))
    assert [r.busid for r in scanner([bad, FakeDevice()]).scan()] == ["1-1"]


# ---------------------------------------------------------------- serial numbers
def test_serial_read_only_when_asked_and_once_per_device():
    dev = FakeDevice(langs=(0x0407, 0x0409))
    sc = scanner([dev])
    (rec,) = sc.scan(serials=False)
    assert rec.serial == "" and dev.opened == 0  # never opened
    assert sc.scan()[0].serial == "SN-0001" and dev.asked == [(3, 0x0407)]  # the first language, as the kernel
    assert sc.scan()[0].serial == "SN-0001" and dev.opened == 1  # cached for this device
    replugged = FakeDevice(addr=5)
    sc2 = scanner([replugged])
    sc2._serials = sc._serials
    assert sc2.scan()[0].serial == "SN-0001" and replugged.opened == 1  # a new address: read again
    nolang = FakeDevice(langs=())
    assert scanner([nolang]).scan()[0].serial == "SN-0001" and nolang.asked == [(3, 0x0409)]
    noserial = bytearray(DEV_DESC)
    noserial[16] = 0
    quiet = FakeDevice(desc=bytes(noserial))
    assert scanner([quiet]).scan()[0].serial == "" and quiet.opened == 0


def test_serial_open_failure_is_not_fatal_and_retried_later(caplog):
    usb1 = pytest.importorskip("usb1")
    now = [100.0]
    dev = FakeDevice(open_error=usb1.USBErrorAccess())
    sc = scanner([dev], clock=lambda: now[0], retry_after=30.0)
    with caplog.at_level("INFO"):
        (rec,) = sc.scan()
    assert rec.serial == "" and rec.busid == "1-1" and dev.opened == 1
    assert "cannot read the serial number" in caplog.text
    now[0] += 10
    assert sc.scan()[0].serial == "" and dev.opened == 1  # not hammered every scan
    dev.open_error = None
    now[0] += 25
    assert sc.scan()[0].serial == "SN-0001" and dev.opened == 2
    # a serial-number rule matches only once it could be read
    state = BindState("/nonexistent/x.json")
    state.rules = [{"serial": "SN-0001"}]
    assert state.matches(sc.scan()[0].identity)


# ---------------------------------------------------------------- libusb without a port path (Linux, no sysfs)
def test_no_port_path_asks_usbfs_then_falls_back():
    asked = []

    def conninfo(bus, addr):
        asked.append((bus, addr))
        return usbfs.ConnInfo(bus, addr, Speed.HIGH, (1, 3)) if addr == 2 else None

    hub_desc = bytearray(DEV_DESC)
    hub_desc[4] = 0x09
    devs = [
        FakeDevice(bus=1, addr=1, ports=(), speed=0, desc=bytes(hub_desc)),  # root hub: not even asked
        FakeDevice(bus=1, addr=2, ports=(), speed=0),
        FakeDevice(bus=1, addr=5, ports=(), speed=0),
    ]
    sc = scanner(devs, conninfo=conninfo)
    recs = {r.busid: r for r in sc.scan()}
    assert sorted(recs) == ["1-0.5", "1-1.3"]
    assert recs["1-1.3"].speed == Speed.HIGH and recs["1-0.5"].speed == Speed.UNKNOWN
    sc.scan()
    assert asked == [(1, 2), (1, 5)]  # once per plugged-in device


def test_parse_conninfo():
    raw = (24).to_bytes(4, "little") + (2).to_bytes(4, "little") + (9).to_bytes(4, "little")
    raw += (5).to_bytes(4, "little") + bytes([3, 1, 4, 2, 0, 0, 0, 0])
    info = usbfs.parse_conninfo(raw)
    assert info == usbfs.ConnInfo(2, 9, Speed.SUPER, (1, 4, 2))
    assert usbdev.busid_for(info.busnum, info.ports) == "2-1.4.2"
    assert usbfs.parse_conninfo(raw[:16] + bytes(8)).ports == ()  # a root hub
    with pytest.raises(ValueError):
        usbfs.parse_conninfo(bytes(24))
    assert usbfs.USBDEVFS_CONNINFO_EX == 0x80185520  # _IOC(_IOC_READ, 'U', 32, 24) as in usbdevice_fs.h


def test_active_config_value_through_libusb():
    class Cfg(ctypes.Structure):
        _fields_ = [("bConfigurationValue", ctypes.c_uint8)]

    class Lib:
        libusb_config_descriptor_p = ctypes.POINTER(Cfg)

        def __init__(self, result):
            self.result, self.freed = result, 0

        def libusb_get_active_config_descriptor(self, device_p, ref):
            if self.result == 0:
                ref._obj.contents = Cfg(device_p)
            return self.result

        def libusb_free_config_descriptor(self, ptr):
            self.freed += 1

    dev = type("D", (), {"device_p": 3})()
    ok = Lib(0)
    assert en.active_config_value(dev, ok) == 3 and ok.freed == 1
    assert en.active_config_value(dev, Lib(en.LIBUSB_ERROR_NOT_FOUND)) == 0  # unconfigured
    assert en.active_config_value(dev, Lib(-4)) is None
    assert en.active_config_value(object(), ok) is None  # not a python-libusb1 device


def test_constants_agree_with_usb1():
    usb1 = pytest.importorskip("usb1")
    assert en.LIBUSB_SPEED_SUPER == usb1.SPEED_SUPER
    assert en.LIBUSB_ERROR_NOT_FOUND == usb1.ERROR_NOT_FOUND


# ---------------------------------------------------------------- contexts, choice of enumeration
def test_a_fresh_context_per_scan_and_init_failure():
    contexts = Contexts([FakeDevice()])
    sc = en.LibusbScanner(contexts, active_config=lambda d: 1, conninfo=lambda b, a: None)
    sc.scan()
    contexts.devices = [FakeDevice(addr=3, ports=(2,))]  # hotplug: seen by the next scan's new context
    assert [r.busid for r in sc.scan()] == ["1-2"]
    assert [(c.opened, c.closed) for c in contexts.made] == [(1, 1), (1, 1)]

    def broken():
        raise OSError("cannot find a suitable libusb-1.0")

    with pytest.raises(EnumerationError, match="libusb cannot be initialised"):
        en.LibusbScanner(broken).scan()


def test_resolve_and_make_scanner(tmp_path, monkeypatch):
    monkeypatch.delenv(discovery.ENV_ENUMERATE, raising=False)
    missing = str(tmp_path / "nosys")
    assert discovery.resolve(None, str(tmp_path)) == "sysfs"
    assert discovery.resolve("auto", missing) == "libusb"
    assert discovery.resolve("sysfs", missing) == "sysfs"
    assert discovery.resolve("LIBUSB", str(tmp_path)) == "libusb"
    monkeypatch.setenv(discovery.ENV_ENUMERATE, "libusb")
    assert discovery.resolve(None, str(tmp_path)) == "libusb"
    assert isinstance(discovery.make_scanner(None, str(tmp_path)), en.LibusbScanner)
    assert isinstance(discovery.make_scanner("sysfs", str(tmp_path)), discovery.SysfsScanner)
    monkeypatch.setenv(discovery.ENV_ENUMERATE, "udev")
    with pytest.raises(ValueError, match="unknown device enumeration"):
        discovery.resolve()


# ---------------------------------------------------------------- users of the records
@pytest.fixture
def fake_usb1(monkeypatch):
    """usb1.USBContext() -> a FakeContext over ``devices`` (what the default LibusbScanner creates)."""
    usb1 = pytest.importorskip("usb1")
    devices: list[FakeDevice] = []
    monkeypatch.setattr(usb1, "USBContext", lambda *a, **kw: FakeContext(devices))
    return devices


def test_list_local_and_bind_through_libusb(tmp_path, fake_usb1, capsys):
    from usbip.cli.local import bind_command, list_local
    from usbip.cli.usbip_main import main

    make_sysfs(tmp_path / "sys", "1-1")
    fake_usb1.append(FakeDevice())
    state = str(tmp_path / "exported.json")
    nosys = str(tmp_path / "nosys")
    by_sysfs = list_local(str(tmp_path / "sys"), state)
    by_libusb = list_local(nosys, state)  # auto: no sysfs tree -> libusb
    assert by_libusb == by_sysfs and by_libusb[0]["busid"] == "1-1" and by_libusb[0]["serial"] == "SN-0001"
    assert bind_command("1-1", True, state_file=state, root=nosys) == 0
    assert bind_command("1-9", True, state_file=state, root=nosys, enumeration="libusb") != 0
    assert [d["bound"] for d in list_local(nosys, state)] == [True]
    assert bind_command(None, True, serial="SN-0001", state_file=state, root=nosys) == 0
    assert bind_command("1-1", False, state_file=state, root=nosys) == 0  # drops the busid and serial rules
    assert json.load(open(state))["rules"] == []
    capsys.readouterr()
    assert main(["--json", "list", "-l", "--enumerate", "libusb"]) == 0
    assert [d["busid"] for d in json.loads(capsys.readouterr().out)["devices"]] == ["1-1"]


def test_backend_exports_and_follows_hotplug_with_libusb(tmp_path, fake_usb1):
    from usbip.backends.libusb.backend import LibusbBackend
    from usbip.backends.libusb.device import LibusbDevice

    class Registry:
        def __init__(self):
            self.devs, self.refresh_hooks = {}, []

        def add(self, d):
            self.devs[d.busid] = d

        def remove(self, busid):
            return self.devs.pop(busid, None)

        def get(self, busid):
            return self.devs.get(busid)

    dev = FakeDevice()
    fake_usb1.append(dev)
    state = BindState(str(tmp_path / "exported.json"))
    reg = Registry()
    be = LibusbBackend(reg, state.path, sysfs_root=str(tmp_path / "sys"), enumeration="auto")
    assert be.scanner.source == "libusb"
    be._init_libusb = lambda: setattr(be, "context", FakeContext(fake_usb1)) or True
    state.add({"busid": "1-1"})
    state.save()
    be.sync()
    exported = reg.devs["1-1"]
    assert isinstance(exported, LibusbDevice) and exported.sysdev.source == "libusb"
    assert (exported.devid, exported.speed, exported.record().idVendor) == ((1 << 16) | 2, Speed.HIGH, 0x0525)
    assert dev.opened == 0  # a busid rule needs no serial number: the device is not opened to scan it
    # import: libusb_open on the device found in the backend's context
    handle, fd = open_handle(be.context, exported.sysdev)
    assert isinstance(handle, FakeHandle) and handle.dev is dev and fd == -1
    # unplugged and plugged again at a new address: dropped, then exported again
    exported.gone = asyncio.Event()
    fake_usb1[:] = []
    be.sync()
    assert reg.devs == {} and exported.is_gone
    fake_usb1.append(FakeDevice(addr=7))
    be.sync()
    assert reg.devs["1-1"].devnum == 7
    # a serial-number rule makes the scan read serial numbers
    state.rules = [{"serial": "SN-0001"}]
    state.save()
    be.sync()
    assert "1-1" in reg.devs and fake_usb1[0].opened == 1


def test_open_handle_falls_back_to_the_usbfs_node(tmp_path, monkeypatch):
    rec = UsbDevice("1-1", "", 1, 5, Speed.HIGH, 0x0525, 0xA4A0, "", 0, 1, DEV_DESC + CONFIG, source="libusb")
    ctx = FakeContext([FakeDevice(addr=4)])  # libusb's list is stale: the device at address 5 is missing
    monkeypatch.setattr(usbdev, "DEV_BUS_USB", str(tmp_path))
    with pytest.raises(OSError) as exc:
        open_handle(ctx, rec)
    assert exc.value.errno == errno.ENODEV
    (tmp_path / "001").mkdir()
    (tmp_path / "001" / "005").write_bytes(b"")
    handle, fd = open_handle(ctx, rec)
    try:
        assert (
            handle == ("wrapped", fd)
            and ctx.wrapped == [fd]
            and os.readlink(f"/proc/self/fd/{fd}").endswith("/001/005")
        )
    finally:
        os.close(fd)
