"""One local USB device as an enumeration found it: the record both enumerations produce.

:mod:`.sysfs` (Linux's ``/sys/bus/usb/devices``) and :mod:`.libusb.enumeration`
(libusb's own device list) both yield :class:`UsbDevice`, so the backend, ``usbip
list -l`` and ``usbip bind`` work the same whichever found the device. ``source``
says which one did: it decides how the device is opened on import (the usbfs node
for sysfs, ``libusb_open`` for libusb).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import CyusbipError
from ..protocol.constants import Speed
from ..usb.ch9 import HUB_CLASS
from .sources import SOURCE_SYSFS
from .state import DeviceIdentity

DEV_BUS_USB = "/dev/bus/usb"


class EnumerationError(CyusbipError, RuntimeError):
    """The devices cannot be listed at all (libusb missing or failing to initialise)."""


def busid_for(bus: int, ports: list[int] | tuple[int, ...]) -> str:
    """Linux's name for a device: bus number, then the port path joined with dots (``1-1.2``)."""
    if not ports:
        return f"usb{bus}"  # a root hub
    return f"{bus}-{'.'.join(str(p) for p in ports)}"


def usbfs_node(busnum: int, devnum: int) -> str:
    """The usbfs node of a device (what libusb opens on Linux)."""
    return f"{DEV_BUS_USB}/{busnum:03d}/{devnum:03d}"


@dataclass
class UsbDevice:
    """Identity, speed and cached descriptors of a local device (nothing here needs it opened)."""

    busid: str
    path: str  # listed by usbip as the device's path: the resolved sysfs path, or the usbfs node (libusb)
    busnum: int
    devnum: int
    speed: Speed
    vid: int
    pid: int
    serial: str
    device_class: int
    configuration_value: int  # bConfigurationValue of the active configuration, 0 when unconfigured
    descriptors: bytes = field(repr=False)  # device descriptor, then every configuration descriptor
    drivers: list[str] = field(default_factory=list)  # interface drivers (sysfs only)
    source: str = SOURCE_SYSFS

    @property
    def identity(self) -> DeviceIdentity:
        return DeviceIdentity(self.busid, self.vid, self.pid, self.serial)

    @property
    def is_hub(self) -> bool:
        return self.device_class == HUB_CLASS

    @property
    def node(self) -> str:
        """The usbfs node libusb opens."""
        return usbfs_node(self.busnum, self.devnum)

    @property
    def key(self) -> tuple[str, int, int]:
        """Changes when the device is unplugged and plugged again (new devnum)."""
        return (self.busid, self.busnum, self.devnum)


def split_descriptors(blob: bytes) -> tuple[bytes, list[bytes]]:
    """Device descriptor + configuration descriptors -> (device descriptor, [configuration descriptors])."""
    dev = blob[:18]
    configs = []
    pos = 18
    while pos + 4 <= len(blob):
        if blob[pos + 1] != 2 or blob[pos] < 4:  # not a configuration descriptor: stop
            break
        total = blob[pos + 2] | (blob[pos + 3] << 8)
        if total < blob[pos]:
            break
        configs.append(bytes(blob[pos : pos + total]))
        pos += total
    return bytes(dev), configs
