"""Which host devices usbipd exports: device enumeration + bind rules + hotplug by polling.

:class:`LibusbBackend` keeps the server's :class:`~usbip.server.registry.Registry`
in step with the bound devices that are plugged in:

* every ``poll_interval`` seconds, and whenever a client asks for the device list
  or an import (``Registry.refresh``), it re-reads the state file if its mtime
  changed and rescans the devices: through ``/sys/bus/usb/devices`` or through libusb
  (:mod:`usbip.backends.discovery` picks, ``enumeration``);
* a bound device that appears (or reappears with a new devnum) is added; one that
  disappears or is unbound is marked gone (its pending URBs fail, the server
  ends its session, the vhci side sees the connection close) and removed.

Hotplug is polled: Debian's libusb uses udev for hotplug, which delivers
nothing without a running udevd (containers, initramfs guests), and sysfs is
cheap to scan (the libusb enumeration re-enumerates with a fresh context).

The scan never runs in the event loop thread: reading some sysfs attributes
(``bConfigurationValue``, ``serial``, ...) takes the USB device lock
(``usb_lock_device_interruptible``), and that lock is held by the hub thread
for the whole enumeration of a device - including a device that vhci-hcd is
enumerating *through this very server* (an import into the same host). A
scan in the loop thread then blocks the loop, the vhci URB that enumeration
waits for is never answered, and both sides wait forever. So the periodic
rescan runs in a worker thread, and a refresh (device list / import request)
applies the latest scan result and asks for a new one without waiting. The
libusb enumeration reads the same attributes through libusb (or, without sysfs,
opens device nodes, which takes the same lock), so it runs there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from ...cancelsafe import cancel_and_wait, wait_for
from ..discovery import make_scanner
from ..state import BindState
from ..sysfs import SYSFS_USB
from ..usbdev import EnumerationError, UsbDevice
from ..worker import DaemonWorker
from .device import LibusbDevice
from .events import make_events

log = logging.getLogger(__name__)


class LibusbBackend:
    def __init__(
        self,
        registry: Any,
        state_file: str | None = None,
        *,
        poll_interval: float = 1.0,
        events_mode: str = "pollfd",
        sysfs_root: str = SYSFS_USB,
        enumeration: str | None = None,
    ) -> None:
        self.registry = registry
        self.state = BindState(state_file)
        self.poll_interval = max(0.1, poll_interval)
        self.events_mode = events_mode
        self.sysfs_root = sysfs_root
        self.scanner = make_scanner(enumeration, sysfs_root)  # ValueError: unknown enumeration
        # a sysfs scan reads files; a libusb one also creates a context (and a thread, with udev)
        self.slow_scan = 0.25 if self.scanner.source == "sysfs" else 2.0
        self.context: Any = None
        self.events: Any = None
        self.devices: dict[str, LibusbDevice] = {}
        self._retired: list[LibusbDevice] = []
        self._task: asyncio.Task[None] | None = None
        self._hook_installed = False
        self._last_error: str | None = None
        self._last_scan_error: str | None = None
        self._init_failed = False
        self._scan_executor: DaemonWorker | None = None
        self._scan_future: asyncio.Future[dict[str, UsbDevice]] | None = None
        self._wake: asyncio.Event | None = None
        self.scan_timeout = 10.0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Watch the state file; libusb itself is initialised once the file has rules."""
        hooks = getattr(self.registry, "refresh_hooks", None)
        if hooks is not None:
            hooks.append(self.refresh)
            self._hook_installed = True
        log.info("libusb backend: state file %s, devices found through %s", self.state.path, self.scanner.describe())
        self._wake = asyncio.Event()
        self._wake.set()  # first scan right away
        self._task = asyncio.create_task(self._poll())

    def refresh(self) -> None:
        """Registry refresh hook (loop thread): never scans here, asks the poller for a scan now."""
        if self._wake is not None:
            self._wake.set()

    def _init_libusb(self) -> bool:
        if self.context is not None:
            return True
        if self._init_failed:
            return False
        try:
            import usb1

            ctx = usb1.USBContext()
            ctx.open()
            self.events = make_events(ctx, asyncio.get_running_loop(), self.events_mode)
        except Exception as exc:
            self._init_failed = True
            log.error("libusb cannot be initialised (%s): exporting virtual devices only", exc)
            return False
        self.context = ctx
        log.info("libusb initialised, events via %s", self.events.mode)
        return True

    async def _poll(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()
            started = time.monotonic()
            try:
                wanted = await self._scan()
            except asyncio.TimeoutError:
                log.warning("libusb backend: device scan still blocked after %.1fs", self.scan_timeout)
                continue
            except EnumerationError as exc:
                if str(exc) != self._last_scan_error:
                    log.error("libusb backend: %s", exc)
                self._last_scan_error = str(exc)
                continue
            except Exception:
                log.exception("libusb backend: rescan failed")
                continue
            self._last_scan_error = None
            took = time.monotonic() - started
            if took > self.slow_scan:
                log.info("libusb backend: device scan took %.2fs (a USB device lock was held?)", took)
            try:
                self.apply(wanted)
            except Exception:
                log.exception("libusb backend: rescan failed")

    async def _scan(self) -> dict[str, UsbDevice]:
        """bound_devices() in a worker thread (bounded wait; a stuck scan is not restarted)."""
        if self._scan_executor is None:
            self._scan_executor = DaemonWorker("usbip-scan")
        if self._scan_future is None or self._scan_future.done():
            loop = asyncio.get_running_loop()
            self._scan_future = loop.run_in_executor(self._scan_executor, self.bound_devices)
        return await wait_for(asyncio.shield(self._scan_future), self.scan_timeout)

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if self._hook_installed:
            with contextlib.suppress(ValueError):
                self.registry.refresh_hooks.remove(self.refresh)
            self._hook_installed = False
        if self._scan_executor is not None:
            self._scan_executor.shutdown(wait=False, cancel_futures=True)
            self._scan_executor = None
            self._scan_future = None
        for dev in list(self.devices.values()) + self._retired:
            try:
                dev.release()
            except Exception:
                log.exception("%s: release failed", dev.busid)
        self.devices.clear()
        self._retired.clear()
        if self.events is not None:
            self.events.stop()
            self.events = None
        if self.context is not None:
            with contextlib.suppress(Exception):
                self.context.close()
            self.context = None

    # ------------------------------------------------------------ rescans
    def bound_devices(self) -> dict[str, UsbDevice]:
        self.state.reload_if_changed()
        if self.state.error and self.state.error != self._last_error:
            log.error("bind state: %s", self.state.error)
        self._last_error = self.state.error
        if not self.state.rules:
            return {}
        serials = any("serial" in rule for rule in self.state.rules)  # libusb opens devices to read them
        return {d.busid: d for d in self.scanner.scan(serials=serials) if self.state.matches(d.identity)}

    def sync(self) -> None:
        """Scan now (blocking: not for the loop thread of a running server) and apply."""
        self.apply(self.bound_devices())

    def apply(self, wanted: dict[str, UsbDevice]) -> None:
        """Bring the registry in line with the bound, present devices (loop thread)."""
        if not wanted and not self.devices and not self._retired:
            return
        if not self._init_libusb():
            return
        self._retired = [d for d in self._retired if d.is_open]
        for busid, dev in list(self.devices.items()):
            now = wanted.get(busid)
            if now is None or now.key != dev.sysdev.key:
                self._drop(dev, "unbound or unplugged" if now is None else "re-enumerated")
        for busid, sysdev in wanted.items():
            if busid in self.devices:
                continue
            if any(d.busid == busid for d in self._retired):
                continue  # the previous incarnation is still being released
            if self.registry.get(busid) is not None:
                continue  # someone else exports this busid
            try:
                dev = LibusbDevice(sysdev, self.context, self.events, on_gone=self._on_gone)
            except ValueError as exc:
                log.warning("%s: cannot export: %s", busid, exc)
                continue
            self.registry.add(dev)
            self.devices[busid] = dev
            log.info("exporting %s: %s (%s)", busid, type(dev).__name__, dev.describe())

    def _drop(self, dev: LibusbDevice, why: str) -> None:
        log.info("%s: no longer exported (%s)", dev.busid, why)
        self.devices.pop(dev.busid, None)
        if self.registry.get(dev.busid) is dev:
            self.registry.remove(dev.busid)
        if dev.is_open:
            self._retired.append(dev)
        dev.on_gone = None
        dev.mark_gone()

    def _on_gone(self, dev: LibusbDevice) -> None:
        """A transfer reported NO_DEVICE: drop it now; a rescan re-adds it if it is back."""
        if self.devices.get(dev.busid) is dev:
            self._drop(dev, "device reported gone")
