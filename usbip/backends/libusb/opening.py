"""How a device record becomes an open libusb handle when a client imports it.

* found through sysfs: the usbfs node (``/dev/bus/usb/BBB/DDD``, created from
  sysfs if missing) is opened and handed to ``libusb_wrap_sys_device``;
* found through libusb: ``libusb_open`` on the device in the backend's context.
  That context's device list only follows hotplug events, which some builds
  never get (udev without udevd; Linux without sysfs), so a device plugged in
  after the context was created may be missing there: its usbfs node, when it
  exists, is wrapped instead.

Closing (:func:`close_handle`) goes through the wrapped handle's own device: see there.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

from ..sources import SOURCE_LIBUSB
from ..sysfs import SYSFS_USB, open_node
from ..usbdev import UsbDevice
from .enumeration import find_device

log = logging.getLogger(__name__)


def open_handle(context: Any, rec: UsbDevice, sysfs_root: str = SYSFS_USB) -> tuple[Any, int]:
    """(python-libusb1 handle, file descriptor to close after the handle or -1)."""
    if rec.source == SOURCE_LIBUSB:
        dev = find_device(context, rec.busnum, rec.devnum, rec.vid, rec.pid)
        if dev is not None:
            handle = dev.open()
            log.info("%s: opened through libusb_open (bus %d address %d)", rec.busid, rec.busnum, rec.devnum)
            return handle, -1
        if not os.path.exists(rec.node):
            raise OSError(errno.ENODEV, f"{rec.busid} is not in libusb's device list and {rec.node} does not exist")
        log.info("%s: not in libusb's device list (no hotplug event reached it): wrapping %s", rec.busid, rec.node)
        fd = os.open(rec.node, os.O_RDWR | os.O_CLOEXEC)
    else:
        fd = open_node(rec, sysfs_root)
    try:
        return context.wrapSysDevice(fd), fd
    except BaseException:
        os.close(fd)
        raise


def close_handle(handle: Any, wrapped: bool) -> None:
    """Close a handle from :func:`open_handle` (``wrapped``: it came with a file descriptor, from
    ``wrapSysDevice``); raises when python-libusb1 did not get to ``libusb_close``.

    ``wrapSysDevice`` makes a USBDevice for the handle alone: the handle's close finalizer sits in
    that device's finalizer dict, and closing the handle closes the device. python-libusb1 3.x's
    ``USBDeviceHandle.close()`` therefore walks the device's dict, finds its own finalizer there
    (already running: calling it does nothing, so it is still listed), fails ``assert handle not
    in finalizer_dict`` and never reaches ``libusb_close``: every wrapped handle leaked, libusb
    kept polling its fd. Closed from the device instead, the device's walk runs the handle's
    finalizer (in-flight transfers, ``libusb_close``), whose nested ``device.close()`` is then a
    no-op, and removes it from the dict as it should. A handle from ``libusb_open`` closes
    normally; its device goes too."""
    device = handle.getDevice()
    if wrapped and device is not None:
        device.close()
    if getattr(handle.close, "alive", True):  # a finalizer until python-libusb1 has run it
        handle.close()
    if not wrapped and device is not None:
        device.close()  # libusb_open's: from find_device, ours alone (its reference dropped now, not by the GC)
