"""The interface every exportable device implements, and the URB it is handed.

The server owns the wire; a device only sees :class:`Urb` objects. A device
completes each URB exactly once by calling :meth:`Urb.complete` (synchronously
inside :meth:`Device.submit` or later, from the event loop thread). A cancelled
URB is completed with ``-ECONNRESET`` (or its real result if it finished first).
Virtual devices (``usbip.virtual``) and the libusb backend plug in the same way.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING

from .protocol.constants import USBIP_DIR_IN, Speed
from .protocol.records import DeviceRecord, InterfaceRecord

if TYPE_CHECKING:
    from .protocol import IsoPackets


class Urb:
    """One USB request block as the server hands it to a device.

    ``buffer`` is the transfer buffer: for OUT the bytes the client sent, for IN a
    writable buffer of ``transfer_buffer_length`` bytes the device fills (and
    reports how much through ``actual_length``). ``iso`` holds the isochronous
    packet descriptors (offsets/lengths in, actual_length/status out) or None.
    """

    __slots__ = (
        "actual_length",
        "buffer",
        "cancelled",
        "context",
        "direction",
        "done",
        "ep",
        "error_count",
        "interval",
        "iso",
        "number_of_packets",
        "on_complete",
        "seqnum",
        "setup",
        "start_frame",
        "status",
        "transfer_buffer_length",
        "transfer_flags",
        "unlink_seqnum",
    )

    def __init__(
        self,
        seqnum: int,
        ep: int,
        direction: int,
        transfer_buffer_length: int,
        buffer: memoryview | bytearray | bytes,
        setup: bytes = b"\0" * 8,
        transfer_flags: int = 0,
        start_frame: int = 0,
        number_of_packets: int = 0,
        interval: int = 0,
        iso: IsoPackets | None = None,
        on_complete: Callable[[Urb], None] | None = None,
    ) -> None:
        self.seqnum = seqnum
        self.ep = ep
        self.direction = direction
        self.transfer_flags = transfer_flags
        self.transfer_buffer_length = transfer_buffer_length
        self.start_frame = start_frame
        self.number_of_packets = number_of_packets
        self.interval = interval
        self.setup = setup
        self.buffer = buffer
        self.iso = iso
        self.status = 0
        self.actual_length = 0
        self.error_count = 0
        self.on_complete = on_complete
        self.done = False
        self.cancelled = False
        self.unlink_seqnum = -1  # seqnum of the CMD_UNLINK that cancelled it (server bookkeeping)
        self.context: object = None  # for the device's own bookkeeping

    @property
    def is_in(self) -> bool:
        return self.direction == USBIP_DIR_IN

    def complete(self, status: int = 0, actual_length: int | None = None) -> None:
        """Finish this URB (exactly once; later calls are ignored)."""
        if self.done:
            return
        self.done = True
        self.status = status
        if actual_length is not None:
            self.actual_length = actual_length
        cb = self.on_complete
        if cb is not None:
            cb(self)

    def __repr__(self) -> str:
        d = "IN" if self.is_in else "OUT"
        return f"<Urb seq={self.seqnum} ep={self.ep} {d} len={self.transfer_buffer_length} status={self.status}>"


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

    def record(self) -> DeviceRecord:
        """The 312-byte record plus interface records this device is listed with."""
        from .descriptors import interface_classes, parse_device_descriptor

        dd = parse_device_descriptor(self.device_descriptor)
        cfg = self.configuration_descriptor(0)
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
