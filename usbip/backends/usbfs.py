"""What libusb cannot tell without sysfs, asked from Linux's usbfs node itself.

libusb on Linux learns a device's port path and speed from sysfs; when it has to
enumerate through ``/dev/bus/usb`` alone (no sysfs mounted: some containers)
every device comes back with no port numbers and an unknown speed. The kernel
still knows both, and hands them out per device node since Linux 5.3 through
the ``USBDEVFS_CONNINFO_EX`` ioctl: bus number, device address, speed (the
kernel's ``enum usb_device_speed``, i.e. USB/IP's speed values) and the port
path from the root hub. :mod:`.libusb.enumeration` asks it only for devices
libusb left without a port path.
"""

from __future__ import annotations

import fcntl
import logging
import os
import platform
import struct
import sys
from dataclasses import dataclass

from ..protocol.constants import Speed
from .usbdev import usbfs_node

log = logging.getLogger(__name__)

#: struct usbdevfs_conninfo_ex: u32 size, busnum, devnum, speed; u8 num_ports, ports[7]
_CONNINFO = struct.Struct("=IIIIB7B")
#: machines whose ioctl numbers use the generic encoding (dir << 30 | size << 16 | type << 8 | nr)
_GENERIC_IOCTL = ("x86_64", "amd64", "i386", "i486", "i586", "i686", "aarch64", "arm64", "riscv64", "s390x")


def _ioc_read(type_: int, nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (type_ << 8) | nr


#: USBDEVFS_CONNINFO_EX(sizeof(struct usbdevfs_conninfo_ex)) = _IOC(_IOC_READ, 'U', 32, len)
USBDEVFS_CONNINFO_EX = _ioc_read(ord("U"), 32, _CONNINFO.size)


@dataclass(frozen=True)
class ConnInfo:
    busnum: int
    devnum: int
    speed: Speed
    ports: tuple[int, ...]  # empty for a root hub


def parse_conninfo(raw: bytes) -> ConnInfo:
    size, busnum, devnum, speed, num_ports, *ports = _CONNINFO.unpack_from(raw.ljust(_CONNINFO.size, b"\0"))
    if size < 17:  # the kernel filled less than the port count: nothing usable
        raise ValueError(f"short usbdevfs_conninfo_ex ({size} bytes)")
    try:
        sp = Speed(speed)
    except ValueError:
        sp = Speed.UNKNOWN
    return ConnInfo(busnum, devnum, sp, tuple(ports[: min(num_ports, len(ports))]))


def supported() -> bool:
    return sys.platform.startswith("linux") and platform.machine().lower() in _GENERIC_IOCTL


def conninfo(busnum: int, devnum: int) -> ConnInfo | None:
    """Port path and speed of the device at ``busnum``/``devnum`` from its usbfs node;
    None when the node, the ioctl (Linux < 5.3) or the permission is missing.

    Opening the node resumes an autosuspended device, like libusb's own
    enumeration through usbfs does."""
    if not supported():
        return None
    node = usbfs_node(busnum, devnum)
    fd = -1
    err: OSError | None = None
    for mode in (os.O_RDWR, os.O_RDONLY):  # usbfs ioctls want a writable file; read-only is worth a try
        try:
            fd = os.open(node, mode | os.O_CLOEXEC)
            break
        except OSError as exc:
            err = exc
    if fd < 0:
        log.debug("%s: %s", node, err)
        return None
    try:
        buf = bytearray(_CONNINFO.size)
        fcntl.ioctl(fd, USBDEVFS_CONNINFO_EX, buf)
        info = parse_conninfo(bytes(buf))
    except (OSError, ValueError) as exc:
        log.debug("%s: USBDEVFS_CONNINFO_EX: %s", node, exc)
        return None
    finally:
        os.close(fd)
    if (info.busnum, info.devnum) != (busnum, devnum):  # the node was reused by another device meanwhile
        return None
    return info
