"""Local USB devices as Linux's sysfs names them (``/sys/bus/usb/devices/1-1.2``).

Where sysfs exists the libusb backend enumerates through it rather than through
``libusb_get_device_list`` (:mod:`.discovery` chooses): Debian's libusb is built
with udev, and without a running udevd its cached device list never sees hotplug
events. sysfs is always current, gives the busid exactly as Linux (and ``usbip
list``) spells it, and holds the cached descriptors (the ``descriptors``
attribute: device descriptor, then every configuration descriptor), so listing
never has to open a device. Without sysfs, :mod:`.libusb.enumeration` produces
the same :class:`~.usbdev.UsbDevice` records from libusb.
"""

from __future__ import annotations

import os
import re
import stat

from ..protocol.constants import Speed
from .sources import SOURCE_SYSFS
from .usbdev import DEV_BUS_USB, HUB_CLASS, UsbDevice, busid_for, split_descriptors

SYSFS_USB = "/sys/bus/usb/devices"
BUSID_RE = re.compile(r"^\d+-\d+(\.\d+)*$")  # devices, not root hubs (usbN) or interfaces (1-1:1.0)

#: sysfs ``speed`` attribute -> usbip speed
SYSFS_SPEEDS = {
    "1.5": Speed.LOW,
    "12": Speed.FULL,
    "480": Speed.HIGH,
    "53.3-480": Speed.WIRELESS,
    "5000": Speed.SUPER,
    "10000": Speed.SUPER_PLUS,
    "20000": Speed.SUPER_PLUS,
}

#: the record type (kept under its old name)
SysfsDevice = UsbDevice

__all__ = [
    "BUSID_RE",
    "DEV_BUS_USB",
    "HUB_CLASS",
    "SYSFS_USB",
    "SysfsDevice",
    "UsbDevice",
    "busid_for",
    "open_node",
    "read_device",
    "scan",
    "speed_from_sysfs",
    "split_descriptors",
]


def speed_from_sysfs(text: str) -> Speed:
    return SYSFS_SPEEDS.get(text.strip(), Speed.UNKNOWN)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _int(text: str, base: int = 10) -> int:
    try:
        return int(text, base)
    except ValueError:
        return 0


def read_device(busid: str, root: str = SYSFS_USB) -> UsbDevice | None:
    d = os.path.join(root, busid)
    if not os.path.isdir(d):
        return None
    descriptors = _read_bytes(os.path.join(d, "descriptors"))
    drivers = []
    try:
        entries = sorted(os.listdir(d))
    except OSError:
        return None
    for entry in entries:
        if entry.startswith(busid + ":"):
            link = os.path.join(d, entry, "driver")
            if os.path.islink(link):
                drivers.append(os.path.basename(os.readlink(link)))
    return UsbDevice(
        busid=busid,
        path=os.path.realpath(d),
        busnum=_int(_read(os.path.join(d, "busnum"))),
        devnum=_int(_read(os.path.join(d, "devnum"))),
        speed=speed_from_sysfs(_read(os.path.join(d, "speed"))),
        vid=_int(_read(os.path.join(d, "idVendor")) or "0", 16),
        pid=_int(_read(os.path.join(d, "idProduct")) or "0", 16),
        serial=_read(os.path.join(d, "serial")),
        device_class=_int(_read(os.path.join(d, "bDeviceClass")) or "0", 16),
        configuration_value=_int(_read(os.path.join(d, "bConfigurationValue")) or "0"),
        descriptors=descriptors,
        drivers=drivers,
        source=SOURCE_SYSFS,
    )


def scan(root: str = SYSFS_USB, include_hubs: bool = False) -> list[UsbDevice]:
    """Every USB device under ``root`` (hubs only with include_hubs), by busid."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    out = []
    for busid in names:
        if not BUSID_RE.match(busid):
            continue
        dev = read_device(busid, root)
        if dev is None or (dev.is_hub and not include_hubs):
            continue
        out.append(dev)
    return out


def open_node(dev: UsbDevice, root: str = SYSFS_USB) -> int:
    """Open the device's usbfs node read-write; create it from sysfs ``dev`` if
    devtmpfs/udev did not (minimal systems, initramfs guests)."""
    node = dev.node
    if not os.path.exists(node):
        majmin = _read(os.path.join(root, dev.busid, "dev"))
        if ":" not in majmin:
            raise FileNotFoundError(f"{node} does not exist and {dev.busid} has no dev attribute")
        ma, mi = (int(x) for x in majmin.split(":", 1))
        os.makedirs(os.path.dirname(node), exist_ok=True)
        try:
            os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(ma, mi))
        except FileExistsError:
            pass
    return os.open(node, os.O_RDWR | os.O_CLOEXEC)
