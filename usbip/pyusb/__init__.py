"""PyUSB programs over USB/IP: a PyUSB backend on cyusbip's client.

A program written for PyUSB drives a device exported by a USB/IP server (the kernel's
usbipd, or ours) with only ``backend=`` changed; nothing is attached to the local kernel::

    import usb.core, usbip.pyusb
    be = usbip.pyusb.get_backend("server.example:3240")
    dev = usb.core.find(idVendor=0x0525, idProduct=0xA4A0, backend=be)
    dev.set_configuration()
    dev.write(0x02, b"hello")
    print(dev.read(0x82, 512, timeout=1000))

Needs PyUSB: ``pip install 'cyusbip[pyusb]'``. See :class:`UsbipBackend` for what the
backend does and how it differs from libusb.
"""

from __future__ import annotations

try:
    import usb.backend
    import usb.core  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "usbip.pyusb needs PyUSB, an optional dependency: pip install 'cyusbip[pyusb]'", name=exc.name
    ) from exc

from .backend import DeviceId, Handle, UsbipBackend, get_backend, location

__all__ = ["DeviceId", "Handle", "UsbipBackend", "get_backend", "location"]
