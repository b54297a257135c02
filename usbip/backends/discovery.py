"""Which enumeration finds the local USB devices: sysfs, libusb, or auto.

``auto`` (the default) takes sysfs when ``/sys/bus/usb/devices`` exists, libusb
otherwise; ``USBIP_ENUMERATE`` or ``--enumerate`` forces one. Both produce
:class:`~.usbdev.UsbDevice` records, so whatever uses them (the libusb backend,
``usbip list -l``, ``usbip bind``) does not care which one ran.
"""

from __future__ import annotations

import os
from typing import Protocol

from . import sysfs
from .sources import AUTO, MODES, SOURCE_LIBUSB, SOURCE_SYSFS
from .usbdev import UsbDevice

ENV_ENUMERATE = "USBIP_ENUMERATE"


class Scanner(Protocol):
    source: str

    def scan(self, include_hubs: bool = False, *, serials: bool = True) -> list[UsbDevice]: ...

    def describe(self) -> str: ...


class SysfsScanner:
    source = SOURCE_SYSFS

    def __init__(self, root: str = sysfs.SYSFS_USB) -> None:
        self.root = root

    def scan(self, include_hubs: bool = False, *, serials: bool = True) -> list[UsbDevice]:
        return sysfs.scan(self.root, include_hubs)  # sysfs caches the serial: always there

    def describe(self) -> str:
        return f"sysfs ({self.root})"


def default_mode() -> str:
    return os.environ.get(ENV_ENUMERATE, "").strip().lower() or AUTO


def resolve(mode: str | None = None, sysfs_root: str = sysfs.SYSFS_USB) -> str:
    """``"sysfs"`` or ``"libusb"`` for ``mode`` (None: ``$USBIP_ENUMERATE``, else auto);
    ValueError for an unknown mode."""
    chosen = (mode or default_mode()).strip().lower()
    if chosen not in MODES:
        raise ValueError(f"unknown device enumeration {chosen!r} (choose from {', '.join(MODES)})")
    if chosen == AUTO:
        return SOURCE_SYSFS if os.path.isdir(sysfs_root) else SOURCE_LIBUSB
    return chosen


def make_scanner(mode: str | None = None, sysfs_root: str = sysfs.SYSFS_USB) -> Scanner:
    if resolve(mode, sysfs_root) == SOURCE_SYSFS:
        return SysfsScanner(sysfs_root)
    from .libusb.enumeration import LibusbScanner

    return LibusbScanner()
