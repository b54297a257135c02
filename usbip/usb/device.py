"""The interface every exportable device implements, and the URB it is handed.

The server owns the wire; a device only sees :class:`Urb` objects (they live with
the codec in ``usbip.protocol``, compiled with it). A device completes each URB
exactly once by calling :meth:`Urb.complete` (synchronously inside
:meth:`Device.submit` or later, from the event loop thread). A cancelled URB is
completed with ``-ECONNRESET`` (or its real result if it finished first). The server gives
each IN URB a buffer fresh from its pool (``usbip.pool``), which hands buffers out zeroed.
Virtual devices (``usbip.virtual``) and the libusb backend plug in the same way.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable

from ..protocol import Urb
from ..protocol.constants import Speed
from ..protocol.records import DeviceRecord, InterfaceRecord


class Device(abc.ABC):
    """A USB device the server can export.

    Identity (busid, busnum, devnum, speed) and descriptors are read before
    import; :meth:`open` is called when a client imports it and :meth:`close`
    when that client goes away (after every pending URB has completed or been
    cancelled).
    """

    busid: str
    busnum: int
    devnum: int
    speed: Speed
    #: Set by devices that can disappear (a real device unplugged): when the event is set the
    #: server ends the import as if the client had closed, like the kernel stub on disconnect.
    gone: asyncio.Event | None = None

    @property
    def devid(self) -> int:
        return (self.busnum << 16) | self.devnum

    @property
    def path(self) -> str:
        return f"/sys/devices/usbip/{self.busid}"

    @property
    @abc.abstractmethod
    def device_descriptor(self) -> bytes:
        """The 18-byte device descriptor."""

    @abc.abstractmethod
    def configuration_descriptor(self, index: int = 0) -> bytes:
        """The full configuration descriptor (with interfaces and endpoints)."""

    @property
    def configuration_value(self) -> int:
        """bConfigurationValue of the active configuration (0: unconfigured)."""
        return 0

    def endpoint_type(self, ep: int, direction: int) -> int | None:
        """Transfer type (XFER_*) of endpoint ``ep`` in ``direction``; None if absent."""
        from .descriptors import endpoint_types

        if ep == 0:
            return 0
        types = endpoint_types(self.configuration_descriptor(0))
        return types.get((ep, direction))

    def listed_configuration(self) -> bytes:
        """The configuration whose interfaces the device record lists (the kernel: the active one)."""
        return self.configuration_descriptor(0)

    def record(self) -> DeviceRecord:
        """The 312-byte record plus interface records this device is listed with."""
        from .descriptors import interface_classes, parse_device_descriptor

        dd = parse_device_descriptor(self.device_descriptor)
        cfg = self.listed_configuration()
        ifaces = tuple(InterfaceRecord(*c) for c in interface_classes(cfg))
        return DeviceRecord(
            path=self.path,
            busid=self.busid,
            busnum=self.busnum,
            devnum=self.devnum,
            speed=int(self.speed),
            idVendor=dd["idVendor"],
            idProduct=dd["idProduct"],
            bcdDevice=dd["bcdDevice"],
            bDeviceClass=dd["bDeviceClass"],
            bDeviceSubClass=dd["bDeviceSubClass"],
            bDeviceProtocol=dd["bDeviceProtocol"],
            bConfigurationValue=self.configuration_value,
            bNumConfigurations=dd["bNumConfigurations"],
            bNumInterfaces=len(ifaces),
            interfaces=ifaces,
        )

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Called when a client imports the device."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Called when the importing client is gone and its URBs are finished."""

    @abc.abstractmethod
    def submit(self, urb: Urb) -> None:
        """Start ``urb``; complete it (now or later) with ``urb.complete(...)``."""

    def submit_table(self) -> list[Callable[[Urb], None]] | None:
        """An optional fast path of :meth:`submit`, or None (the default: the server calls submit).

        A list of 32 callables, entry ``ep | direction << 4`` doing what ``submit(urb)`` does for an
        URB of that endpoint (endpoint 0: both entries). The device keeps the list up to date in
        place (halts, configurations) and never replaces it, so the server asks for it once per
        import and calls the entry of each URB directly.
        """
        return None

    @abc.abstractmethod
    def cancel(self, urb: Urb) -> None:
        """Ask for ``urb`` to end early; it must still complete (normally -ECONNRESET)."""

    def reset(self) -> None:  # noqa: B027 - optional hook
        """Port reset (SET_FEATURE(PORT_RESET) from the client)."""

    def release(self) -> None:  # noqa: B027 - optional hook
        """The server stops exporting the device for good: free files, PTYs, handles."""

    def describe(self) -> str:
        """One line for logs (e.g. the PTY of a serial device)."""
        return ""


__all__ = ["Device", "Urb"]
