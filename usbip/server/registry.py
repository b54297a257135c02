"""Which devices the server exports and which connection holds each of them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from ..protocol.constants import ST_DEV_BUSY, ST_NODEV, ST_OK
from ..usb.device import Device

#: Bus number given to virtual devices (real buses are numbered from 1 by Linux).
VIRTUAL_BUS = 100

log = logging.getLogger(__name__)


class Registry:
    """Exported devices by busid, with the kernel usbipd's import statuses."""

    def __init__(self) -> None:
        self._devices: dict[str, Device] = {}
        self._owner: dict[str, object] = {}
        self._next_port = 1
        #: called (in order) by :meth:`refresh` before the server answers a device list or an
        #: import, so a backend (usbip.backends.libusb) can add/remove devices at runtime
        self.refresh_hooks: list[Callable[[], None]] = []

    def refresh(self) -> None:
        """Let the backends bring the device set up to date (errors are logged, not raised)."""
        for hook in list(self.refresh_hooks):
            try:
                hook()
            except Exception:
                log.exception("registry refresh hook %r failed", hook)

    def add_virtual(self, device: Device) -> Device:
        """Give ``device`` a place on the virtual bus (busid "100-N") and export it."""
        port = self._next_port
        self._next_port += 1
        device.busnum = VIRTUAL_BUS
        device.devnum = port + 1
        device.busid = f"{VIRTUAL_BUS}-{port}"
        return self.add(device)

    def add(self, device: Device) -> Device:
        if device.busid in self._devices:
            raise ValueError(f"busid {device.busid} is already exported")
        self._devices[device.busid] = device
        return device

    def remove(self, busid: str) -> Device | None:
        self._owner.pop(busid, None)
        return self._devices.pop(busid, None)

    def get(self, busid: str) -> Device | None:
        return self._devices.get(busid)

    def devices(self) -> Iterable[Device]:
        return list(self._devices.values())

    def claim(self, busid: str, owner: object) -> tuple[int, Device | None]:
        """(status, device): ST_NODEV for an unknown busid, ST_DEV_BUSY when imported already.

        The statuses are those tools/usb/usbip/src/usbipd.c (recv_request_import)
        and libsrc/usbip_host_common.c (usbip_export_device) send.
        """
        device = self._devices.get(busid)
        if device is None:
            return ST_NODEV, None
        if busid in self._owner:
            return ST_DEV_BUSY, device
        self._owner[busid] = owner
        return ST_OK, device

    def release(self, busid: str, owner: object) -> None:
        if self._owner.get(busid) is owner:
            del self._owner[busid]

    def is_busy(self, busid: str) -> bool:
        return busid in self._owner

    @property
    def busy_count(self) -> int:
        return len(self._owner)
