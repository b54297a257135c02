"""Local USB devices as libusb lists them: the same records the sysfs scan gives.

For hosts without ``/sys/bus/usb/devices`` (containers that only get
``/dev/bus/usb``, other systems libusb supports). Every field of
:class:`~usbip.backends.usbdev.UsbDevice` comes from libusb:

* busid ``"{bus}-{port.port...}"`` from ``libusb_get_bus_number`` /
  ``libusb_get_port_numbers``, devid from the bus number and device address;
* speed from ``libusb_get_device_speed``, mapped to USB/IP's values;
* descriptors: the device descriptor and every configuration descriptor,
  rebuilt from libusb's parsed copies (interfaces, alternate settings,
  endpoints and the class-specific "extra" descriptors, in that order);
* bConfigurationValue from ``libusb_get_active_config_descriptor``: the value
  libusb caches for the active configuration, read without a request to the
  device (on Linux it is the sysfs attribute the kernel's usbipd reports, or
  without sysfs what libusb asked the device when it enumerated it), 0 when the
  device is unconfigured;
* the serial number only by opening the device (libusb has no cached copy), so
  only when asked (``serials=True``: ``usbip list -l``, or serial-number bind
  rules), once per plugged-in device, the same string the kernel caches (the
  device's first language); a device that cannot be opened gets ``""`` and is
  tried again after ``retry_after`` seconds.

Hubs are skipped unless asked for, root hubs always (as in sysfs, whose busids
never name them). On Linux without sysfs libusb knows neither port path nor
speed; both are then asked from the device's usbfs node (:mod:`..usbfs`), and a
device still without a port path is named ``"{bus}-0.{address}"`` (USB ports
count from 1, so this never collides with a real busid).

Each scan uses a fresh libusb context: libusb builds its device list when a
context is created and afterwards relies on hotplug events - from udevd on
udev builds (none without a running udevd), and on Linux without sysfs it cannot
describe a hot-plugged device at all. A new context re-enumerates: on Linux it
reads sysfs, or without sysfs opens every device node (libusb's own cost).
"""

from __future__ import annotations

import ctypes
import logging
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

from ...protocol.constants import Speed
from .. import usbfs
from ..sources import SOURCE_LIBUSB
from ..usbdev import HUB_CLASS, EnumerationError, UsbDevice, busid_for, usbfs_node
from .mapping import speed_from_libusb

log = logging.getLogger(__name__)

_DEVICE = struct.Struct("<BBHBBBBHHHBBBB")
_CONFIG = struct.Struct("<BBHBBBBB")
_INTERFACE = struct.Struct("<BBBBBBBBB")
_ENDPOINT = struct.Struct("<BBBBHB")
LIBUSB_SPEED_SUPER = 4
LIBUSB_ERROR_NOT_FOUND = -5
LANGID_EN_US = 0x0409

Incarnation = tuple[int, int, int, int]  # bus, address, vid, pid: new when the device is plugged in again


# ---------------------------------------------------------------- descriptors
def device_descriptor(dev: Any) -> bytes:
    """The 18-byte device descriptor, from libusb's cached copy."""
    return _DEVICE.pack(
        18,
        1,
        dev.getbcdUSB(),
        dev.getDeviceClass(),
        dev.getDeviceSubClass(),
        dev.getDeviceProtocol(),
        dev.getMaxPacketSize0(),
        dev.getVendorID(),
        dev.getProductID(),
        dev.getbcdDevice(),
        dev.getManufacturerDescriptor(),
        dev.getProductDescriptor(),
        dev.getSerialNumberDescriptor(),
        dev.getNumConfigurations(),
    )


def _extra(descriptor: Any) -> bytes:
    return b"".join(bytes(d) for d in descriptor.getExtra())


def _endpoint(ep: Any) -> bytes:
    refresh, sync = ep.getRefresh(), ep.getSyncAddress()
    size = 9 if refresh or sync else 7  # audio endpoints carry bRefresh/bSynchAddress
    raw = _ENDPOINT.pack(size, 5, ep.getAddress(), ep.getAttributes(), ep.getMaxPacketSize(), ep.getInterval())
    if size == 9:
        raw += bytes((refresh, sync))
    return raw + _extra(ep)


def configuration_descriptor(config: Any, libusb_speed: int = 0) -> bytes:
    """A full configuration descriptor rebuilt from a python-libusb1 ``USBConfiguration``."""
    body = bytearray(_extra(config))
    for interface in config:
        for setting in interface:
            body += _INTERFACE.pack(
                9,
                4,
                setting.getNumber(),
                setting.getAlternateSetting(),
                setting.getNumEndpoints(),
                setting.getClass(),
                setting.getSubClass(),
                setting.getProtocol(),
                setting.getDescriptor(),
            )
            body += _extra(setting)
            for ep in setting:
                body += _endpoint(ep)
    # python-libusb1 reports MaxPower in mA: 8 mA units at SuperSpeed, 2 mA otherwise
    unit = 8 if libusb_speed == LIBUSB_SPEED_SUPER else 2
    head = _CONFIG.pack(
        9,
        2,
        _CONFIG.size + len(body),
        config.getNumInterfaces(),
        config.getConfigurationValue(),
        config.getDescriptor(),
        config.getAttributes(),
        min(0xFF, config.getMaxPower() // unit),
    )
    return head + bytes(body)


def active_config_value(dev: Any, lib: Any = None) -> int | None:
    """bConfigurationValue of the active configuration as libusb caches it (no request to the
    device); 0 when unconfigured, None when libusb cannot tell."""
    try:
        if lib is None:
            from usb1 import libusb1

            lib = libusb1
        ptr = lib.libusb_config_descriptor_p()
        result = lib.libusb_get_active_config_descriptor(dev.device_p, ctypes.byref(ptr))
    except (AttributeError, ImportError, TypeError, OSError) as exc:
        log.debug("%s: active configuration: %s", dev, exc)
        return None
    if result == LIBUSB_ERROR_NOT_FOUND:
        return 0
    if result != 0:
        return None
    try:
        return int(ptr.contents.bConfigurationValue)
    finally:
        lib.libusb_free_config_descriptor(ptr)


def read_serial(dev: Any) -> str:
    """iSerialNumber in the device's first language (what the kernel caches for sysfs).
    Opens the device; raises what python-libusb1 raises when that or the request fails."""
    index = dev.getSerialNumberDescriptor()
    if not index:
        return ""
    handle = dev.open()
    try:
        try:
            langs = handle.getSupportedLanguageList()
        except Exception as exc:  # no language table: the kernel falls back to US English too
            log.debug("%s: language list: %s", dev, exc)
            langs = []
        text = handle.getStringDescriptor(index, langs[0] if langs else LANGID_EN_US, errors="replace")
    finally:
        handle.close()
    return (text or "").split("\0", 1)[0].strip()


def find_device(context: Any, busnum: int, devnum: int, vid: int, pid: int) -> Any | None:
    """The python-libusb1 device at ``busnum``/``devnum`` with these ids in ``context``'s list, or None."""
    found = None
    for dev in context.getDeviceList(skip_on_error=True):
        if found is None and (dev.getBusNumber(), dev.getDeviceAddress(), dev.getVendorID(), dev.getProductID()) == (
            busnum,
            devnum,
            vid,
            pid,
        ):
            found = dev
        else:
            dev.close()
    return found


# ---------------------------------------------------------------- the scan
class LibusbScanner:
    """``scan()`` -> :class:`UsbDevice` records of every device libusb lists (see the module doc)."""

    source = SOURCE_LIBUSB

    def __init__(
        self,
        context_factory: Callable[[], Any] | None = None,
        *,
        active_config: Callable[[Any], int | None] = active_config_value,
        conninfo: Callable[[int, int], usbfs.ConnInfo | None] = usbfs.conninfo,
        retry_after: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._context_factory = context_factory
        self._active_config = active_config
        self._conninfo = conninfo
        self.retry_after = retry_after
        self._clock = clock
        self._serials: dict[Incarnation, tuple[str, float | None]] = {}  # serial, when reading it failed
        self._topology: dict[Incarnation, usbfs.ConnInfo | None] = {}
        self._warned: set[Incarnation] = set()

    def describe(self) -> str:
        return "libusb"

    def _open_context(self) -> Any:
        try:
            if self._context_factory is not None:
                ctx = self._context_factory()
            else:
                import usb1

                ctx = usb1.USBContext()
            ctx.open()
        except Exception as exc:
            raise EnumerationError(f"libusb cannot be initialised: {exc}") from exc
        return ctx

    def scan(self, include_hubs: bool = False, *, serials: bool = True) -> list[UsbDevice]:
        """Every device (hubs only with ``include_hubs``), by busid. Blocking: call it off the event loop."""
        ctx = self._open_context()
        seen: set[Incarnation] = set()
        out: list[UsbDevice] = []
        try:
            try:
                devices: Iterable[Any] = ctx.getDeviceList(skip_on_error=True)
            except Exception as exc:
                raise EnumerationError(f"libusb cannot list devices: {exc}") from exc
            for dev in devices:
                try:
                    rec = self._record(dev, include_hubs, serials, seen)
                except Exception as exc:  # a device that vanished or whose descriptors libusb rejects
                    log.debug("libusb device %s skipped: %s", dev, exc)
                    continue
                if rec is not None:
                    out.append(rec)
        finally:
            ctx.close()
        for cache in (self._serials, self._topology):
            for key in [k for k in cache if k not in seen]:
                del cache[key]
        self._warned &= seen
        return sorted(out, key=lambda d: d.busid)

    def _record(self, dev: Any, include_hubs: bool, serials: bool, seen: set[Incarnation]) -> UsbDevice | None:
        bus, addr = dev.getBusNumber(), dev.getDeviceAddress()
        vid, pid, cls = dev.getVendorID(), dev.getProductID(), dev.getDeviceClass()
        inc: Incarnation = (bus, addr, vid, pid)
        seen.add(inc)
        libusb_speed = dev.getDeviceSpeed()
        speed = speed_from_libusb(libusb_speed)
        ports = tuple(dev.getPortNumberList())
        hub = cls == HUB_CLASS
        if not ports and not (hub and (addr == 1 or not include_hubs)):
            info = self._connection(inc)  # libusb without sysfs: no topology
            if info is not None:
                ports = info.ports
                if speed == Speed.UNKNOWN:
                    speed = info.speed
        if hub and (not ports or not include_hubs):
            return None  # root hubs never; other hubs only when asked
        if ports:
            busid = busid_for(bus, ports)
        else:
            busid = f"{bus}-0.{addr}"
            if inc not in self._warned:
                self._warned.add(inc)
                log.warning("%s: libusb knows no port path for bus %d address %d: named %s", busid, bus, addr, busid)
        configs = b"".join(configuration_descriptor(c, libusb_speed) for c in dev.iterConfigurations())
        value = self._active_config(dev)
        return UsbDevice(
            busid=busid,
            path=usbfs_node(bus, addr),
            busnum=bus,
            devnum=addr,
            speed=speed,
            vid=vid,
            pid=pid,
            serial=self._serial(dev, inc, busid) if serials else "",
            device_class=cls,
            configuration_value=value or 0,
            descriptors=device_descriptor(dev) + configs,
            drivers=[],
            source=SOURCE_LIBUSB,
        )

    def _connection(self, inc: Incarnation) -> usbfs.ConnInfo | None:
        if inc not in self._topology:
            self._topology[inc] = self._conninfo(inc[0], inc[1])
        return self._topology[inc]

    def _serial(self, dev: Any, inc: Incarnation, busid: str) -> str:
        if not dev.getSerialNumberDescriptor():
            return ""
        cached = self._serials.get(inc)
        now = self._clock()
        if cached is not None and (cached[1] is None or now - cached[1] < self.retry_after):
            return cached[0]
        try:
            serial = read_serial(dev)
        except Exception as exc:  # USBError (no access, busy, gone), ValueError (a malformed string)
            level = logging.DEBUG if cached is not None else logging.INFO
            log.log(level, "%s: cannot read the serial number (%s): serial-number rules do not match it", busid, exc)
            self._serials[inc] = ("", now)
            return ""
        self._serials[inc] = (serial, None)
        return serial
