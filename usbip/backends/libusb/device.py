"""A real USB device exported through libusb (the kernel stub's job, in user space).

The rules are those of ``drivers/usb/usbip/stub_rx.c`` / ``stub_tx.c``:

* import: every interface of the active configuration is taken from its kernel
  driver (remembered, given back on release) and claimed;
* SET_CONFIGURATION, SET_INTERFACE and CLEAR_FEATURE(ENDPOINT_HALT) become
  ``setConfiguration`` / ``setInterfaceAltSetting`` / ``clearHalt``; a port reset
  becomes ``resetDevice``; everything else is an async libusb transfer;
* URB_SHORT_NOT_OK / URB_ZERO_PACKET become LIBUSB_TRANSFER_SHORT_NOT_OK /
  ADD_ZERO_PACKET; iso maps packet by packet; an unlink cancels the transfer;
* libusb statuses become kernel errnos (:mod:`.mapping`).

The synchronous libusb calls (claim/release/detach on import, SET_CONFIGURATION,
SET_INTERFACE, CLEAR_HALT, port reset) are usbfs ioctls that sleep on the
device lock and on the device itself, so they run in a per-device worker
thread, never in the event loop: the URB stays pending meanwhile (an unlink
gets its real result when the call returns), and URBs submitted behind one of
these calls wait for it (in order), as they would behind the kernel stub's
synchronous ``usb_set_configuration``.

What a client may reach is checked before libusb sees an URB (the client is not trusted):

* an endpoint must belong to an interface we claimed, in its current alternate setting
  (:mod:`.layout`; otherwise -ENOENT, as ``usb_submit_urb``); iso packets are bounded by
  the endpoint's bytes per interval (-EMSGSIZE) and may not add up to more than the URB's
  buffer (overlapping packets would multiply the bounce buffer);
* a standard or class control request naming an interface (or an endpoint of one) that
  we did not claim - its kernel driver on this host still has it - is refused with
  -EPIPE, as a device refuses a request it does not take; vendor requests go through,
  as usbfs lets them (``check_ctrlrecip``);
* SET_CONFIGURATION / SET_INTERFACE naming a configuration, interface or alt setting the
  device does not have is answered -EINVAL without touching the device
  (``usb_set_configuration`` / ``usb_set_interface``); CLEAR_HALT of an endpoint that is
  not reachable is answered -EPIPE (the device would stall it). A failing libusb call is
  mapped per call: LIBUSB_ERROR_NOT_FOUND means "no such thing" there, never "device gone";
* before SET_CONFIGURATION, SET_INTERFACE or a reset, the transfers on the endpoints it
  takes down are cancelled (they complete -ESHUTDOWN, as the kernel's endpoint flush
  gives them back): usbfs would flush them with -ESHUTDOWN itself, which libusb reports
  as LIBUSB_TRANSFER_NO_DEVICE, and the device looked unplugged;
* port resets asked for while one is already waiting are merged (they carry no URB, so
  nothing else bounds them).

Closing never touches the libusb handle while the worker may still be inside a libusb
call on it (a stuck SET_CONFIGURATION, a reset): the handle is closed once the worker is
done. On close the device gets back what the client changed: alternate settings go back
to 0, the configuration found at import is set again, the interfaces are released and
their kernel drivers reattached.

Buffers: python-libusb1 wraps a *writable* buffer in place (``c_char * n``
``.from_buffer``), so bulk/interrupt/iso IN data lands straight in the pooled
URB buffer, and OUT data given as a writable buffer is not copied either (a
read-only ``bytes`` payload is copied once by python-libusb1). Bulk/interrupt
OUT data goes into the transfer's usbfs region instead when it has one
(:mod:`.devmem`: usbfs then does not copy it again). Control transfers always go
through a setup+data buffer of their own (one small copy each way).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ...cancelsafe import wait_for
from ...protocol.constants import (
    ECONNRESET,
    EINVAL,
    ENODEV,
    ENOENT,
    EPIPE,
    EREMOTEIO,
    ESHUTDOWN,
    URB_SHORT_NOT_OK,
    URB_ZERO_PACKET,
    USBIP_DIR_IN,
    XFER_BULK,
    XFER_INT,
    XFER_ISOC,
)
from ...usb.ch9 import (
    DIR_IN,
    RECIP_ENDPOINT,
    RECIP_INTERFACE,
    RECIP_MASK,
    SETUP_STRUCT,
    TYPE_MASK,
    TYPE_STANDARD,
    XFER_CONTROL,
)
from ...usb.device import Device, Urb
from ..usbdev import UsbDevice, split_descriptors
from ..worker import DaemonWorker
from .control import RESET_REQUEST, Special, SpecialRequest, classify_control, control_refusal, interface_numbers
from .devmem import DevMem, stage
from .layout import ConfigLayout, Endpoint
from .mapping import (
    EMSGSIZE,
    TRANSFER_CANCELLED,
    TRANSFER_ERROR,
    TRANSFER_NO_DEVICE,
    IsoPlan,
    UrbRefused,
    apply_iso_results,
    error_to_errno,
    special_error_to_errno,
    status_to_errno,
)
from .opening import close_handle, open_handle
from .transfers import (
    FLAG_SHORT_NOT_OK,
    FLAG_ZERO_PACKET,
    MAX_CONTROL_DATA,
    SETUP_BUFFER,
    TransferPool,
    close_transfer,
    control_data,
    point_at,
    setup_control,
    transfer_key,
    transfer_result,
)

log = logging.getLogger(__name__)
#: how long close() lets cancelled transfers come back before it closes the handle
DRAIN_TIMEOUT = 2.0
#: how long close() waits for a libusb call running in the worker (and for giving the interfaces back)
CLOSE_TIMEOUT = 30.0
#: per-URB debug records (submit / completion) when set AND the logger is at DEBUG; otherwise a
#: single false test per URB: no arguments formatted, no record made
_DEBUG = bool(os.environ.get("USBIP_LIBUSB_DEBUG"))
_LOG_DEBUG = logging.DEBUG

__all__ = ["LibusbDevice", "classify_control", "interface_numbers"]


_RESET = object()  # a port reset waiting in LibusbDevice._deferred


class LibusbDevice(Device):
    """One host device (found through sysfs or libusb), opened through libusb on import."""

    def __init__(
        self,
        sysdev: UsbDevice,
        context: Any,
        events: Any,
        on_gone: Callable[[LibusbDevice], None] | None = None,
    ) -> None:
        self.sysdev = sysdev
        self.busid = sysdev.busid
        self.busnum = sysdev.busnum
        self.devnum = sysdev.devnum
        self.speed = sysdev.speed
        self._dev_desc, self._configs = split_descriptors(sysdev.descriptors)
        if len(self._dev_desc) != 18:
            raise ValueError(f"{sysdev.busid}: no device descriptor ({sysdev.source})")
        self._config_value = sysdev.configuration_value
        self._initial_config = 0  # the configuration found at import: set again on close
        self.context = context
        self.events = events
        self.on_gone = on_gone
        self.handle: Any = None
        self._fd = -1
        self._claimed: list[int] = []
        self._detached: list[int] = []
        self._alts: dict[int, int] = {}  # interface -> current alt setting, where known
        self._pending: dict[int, Urb] = {}  # id(urb) -> urb with a libusb transfer in flight (or waiting)
        self._transfers: TransferPool | None = None  # transfers back from libusb, for reuse (per handle)
        self._devmem: DevMem | None = None  # usbfs memory for OUT data (per handle)
        self._layout_cache: ConfigLayout | None = None
        self._ep_cache: dict[tuple[int, int], Endpoint] | None = None
        self.is_gone = False
        self._worker: DaemonWorker | None = None
        self._jobs: set[concurrent.futures.Future[Any]] = set()  # worker calls not finished yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._close_pending = False
        self._given_back = False
        self._busy: asyncio.Future[Any] | None = None  # the libusb call running in the worker
        # URBs (id -> Urb) and at most one port reset (_RESET) that arrived while _busy runs, in order
        self._deferred: OrderedDict[object, Any] = OrderedDict()
        self._cancel_later: dict[int, Urb] = {}  # unlinked while _busy runs: cancelled when it returns
        self._drained: asyncio.Event | None = None  # close() waits on it for its cancelled transfers
        self.gone: asyncio.Event | None = None  # set when the device disappears (the server ends the session)
        #: the transfers' completion callback: _finish itself when libusb's events are handled in
        #: the loop thread (pollfds), else _on_transfer (hops to the loop)
        in_loop = getattr(events, "mode", "") == "pollfd"
        self._callback: Callable[[Any], None] = self._finish if in_loop else self._on_transfer

    # ------------------------------------------------------------ identity
    @property
    def path(self) -> str:
        return self.sysdev.path

    @property
    def device_descriptor(self) -> bytes:
        return self._dev_desc

    def configuration_descriptor(self, index: int = 0) -> bytes:
        if 0 <= index < len(self._configs):
            return self._configs[index]
        return b"\x09\x02\x09\x00\x00\x00\x00\x80\x00"

    def active_configuration(self) -> bytes:
        for cfg in self._configs:
            if len(cfg) >= 6 and cfg[5] == self._config_value:
                return cfg
        return self.configuration_descriptor(0)

    def listed_configuration(self) -> bytes:
        return self.active_configuration()

    @property
    def configuration_value(self) -> int:
        return self._config_value

    def _layout(self) -> ConfigLayout:
        """The active configuration's interfaces and endpoints (none while unconfigured)."""
        cached = self._layout_cache
        if cached is None or cached.value != self._config_value:
            cfg = self.active_configuration() if self._config_value else b""
            if cfg and len(cfg) >= 6 and cfg[5] != self._config_value:
                cfg = b""  # the configuration value names no configuration we know
            cached = self._layout_cache = ConfigLayout(cfg, self.speed)
            cached.value = self._config_value
        return cached

    def _endpoint(self, ep: int, direction: int) -> Endpoint | None:
        """The endpoint a client may submit to, or None (not in the current settings of an
        interface we claimed). Before import (no handle) every interface counts."""
        cache = self._ep_cache
        if cache is None:
            layout = self._layout()
            claimed: Any = layout.alts if self.handle is None else set(self._claimed)
            cache = self._ep_cache = layout.reachable(claimed, dict(self._alts))
        return cache.get((ep, direction))

    def endpoint_type(self, ep: int, direction: int) -> int | None:
        if ep == 0:
            return 0
        found = self._endpoint(ep, direction)
        return None if found is None else found.xfer

    def _invalidate(self) -> None:
        self._ep_cache = None

    def describe(self) -> str:
        s = self.sysdev
        return f"{s.vid:04x}:{s.pid:04x} {s.node}, found through {s.source}"

    # ------------------------------------------------------------ import / release
    @property
    def is_open(self) -> bool:
        return self.handle is not None

    async def open(self) -> None:
        if self.is_gone:
            raise OSError(f"{self.busid} is gone")
        if self.handle is not None:
            raise OSError(f"{self.busid} is still being released")
        self.gone = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._alts = {}
        self._given_back = False
        self._invalidate()
        try:
            self.handle, self._fd = open_handle(self.context, self.sysdev)
            self._transfers = TransferPool()
            self._devmem = DevMem.for_handle(self.handle)
            await self._in_worker(self._open_sync)
        except BaseException:
            self._close_handle()
            raise
        log.info(
            "%s: opened %s (claimed interfaces %s, detached %s)",
            self.busid,
            self.sysdev.node,
            self._claimed,
            self._detached,
        )

    def _open_sync(self) -> None:
        try:
            current = self.handle.getConfiguration()
            if current:
                self._config_value = current
        except Exception as exc:
            log.debug("%s: getConfiguration: %s", self.busid, exc)
        self._initial_config = self._config_value
        self._take_interfaces()
        self._invalidate()

    def _get_worker(self) -> DaemonWorker:
        if self._worker is None:
            self._worker = DaemonWorker(f"usbip-libusb-{self.busid}")
        return self._worker

    def _job(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn(*args)`` in the worker; the future stays in ``_jobs`` until it is done."""
        fut = self._get_worker().submit(fn, *args)
        self._jobs.add(fut)
        return fut

    def _worker_idle(self) -> bool:
        """No libusb call of ours runs or waits in the worker (a call that was cancelled before
        it started counts as done: DaemonWorker skips it)."""
        self._jobs = {f for f in self._jobs if not f.done()}
        return not self._jobs

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self._job(fn, *args))

    def _take_interfaces(self) -> None:
        """Detach kernel drivers from the active configuration's interfaces and claim them."""
        self._ep_cache = None
        for ifnum in interface_numbers(self.active_configuration()) if self._config_value else []:
            if ifnum in self._claimed:
                continue
            try:
                if self.handle.kernelDriverActive(ifnum):
                    self.handle.detachKernelDriver(ifnum)
                    if ifnum not in self._detached:
                        self._detached.append(ifnum)
            except Exception as exc:
                log.debug("%s: detach driver of interface %d: %s", self.busid, ifnum, exc)
            try:
                self.handle.claimInterface(ifnum)
                self._claimed.append(ifnum)
            except Exception as exc:
                log.warning("%s: cannot claim interface %d: %s", self.busid, ifnum, exc)

    def _release_interfaces(self) -> None:
        for ifnum in self._claimed:
            with contextlib.suppress(Exception):
                self.handle.releaseInterface(ifnum)
        self._claimed = []

    async def close(self) -> None:
        self._deferred.pop(_RESET, None)  # nobody is left to reset the device for
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_TIMEOUT
        while self._busy is not None and loop.time() < deadline:
            # a SET_CONFIGURATION / SET_INTERFACE / reset still runs: cancelling transfers now would
            # wait in usbfs for the device lock that call holds (in the loop thread)
            with contextlib.suppress(Exception):
                await wait_for(asyncio.shield(self._busy), max(0.0, deadline - loop.time()))
            await asyncio.sleep(0)
        if self.handle is not None and not self._worker_idle():
            self._close_handle()  # closes once the worker is done with the handle
            return
        await self._drain_transfers()
        if self.handle is not None and not self.is_gone:
            # interface release / driver re-attach sleep in the kernel: not in the loop thread
            try:
                await wait_for(self._in_worker(self._give_back_interfaces), CLOSE_TIMEOUT)
            except Exception as exc:
                log.warning("%s: giving the interfaces back failed: %r", self.busid, exc)
        self._close_handle()

    def _live_transfers(self) -> list[Urb]:
        """URBs whose libusb transfer has not come back, completed or not (the session completes
        URBs itself when the device is too slow: their transfers are still in flight)."""
        return [u for u in self._pending.values() if u.context is not None]

    async def _drain_transfers(self) -> None:
        """Cancel the transfers in flight and let their cancellations come back through the
        normal event handling (the loop's pollfds or the event thread), bounded by
        DRAIN_TIMEOUT, so that python-libusb1's close() finds nothing in flight: it would cancel
        them and run libusb's event handling itself (blocking, in the loop thread). Each
        transfer is closed (freed) by _finish as it comes back, none is left for the GC.
        The fd: when python-libusb1's close raised before libusb_close, libusb kept polling the
        handle's fd; closing it anyway let the number be reused under libusb, and every later
        libusb_handle_events failed ("reap failed, errno=9" / 25): no transfer of any device
        completed any more (seen in the event-mode benchmark). _close_handle keeps the fd open
        in that case (see opening.close_handle for why wrapped handles used to fail)."""
        self._cancel_later.clear()
        live = self._live_transfers()
        if not live:
            return
        for urb in live:
            transfer: Any = urb.context
            with contextlib.suppress(Exception):
                transfer.cancel()
        # _finish sets it when the last one comes back (no polling: a TCG guest felt every wake-up)
        self._drained = drained = asyncio.Event()
        try:
            await wait_for(drained.wait(), DRAIN_TIMEOUT)
        except asyncio.TimeoutError:
            pass
        finally:
            self._drained = None
        if self._live_transfers():
            log.warning("%s: %d transfers still in flight at close", self.busid, len(self._live_transfers()))

    def _give_back_interfaces(self) -> None:
        """Undo what the client changed, then give the interfaces back to their kernel drivers:
        alt settings back to 0, the configuration found at import set again."""
        h = self.handle
        if h is None or self._given_back:
            return
        self._given_back = True  # once: never again from the loop thread after the worker tried
        for ifnum, alt in list(self._alts.items()):
            if alt and ifnum in self._claimed:
                try:
                    h.setInterfaceAltSetting(ifnum, 0)
                except Exception as exc:
                    log.debug("%s: interface %d back to alt 0: %s", self.busid, ifnum, exc)
        self._release_interfaces()
        initial = self._initial_config
        if initial and self._config_value != initial:
            try:
                h.setConfiguration(initial)
                self._config_value = initial
                log.info("%s: configuration %d set again", self.busid, initial)
            except Exception as exc:
                log.info("%s: setting configuration %d again failed: %s", self.busid, initial, exc)
        self._alts = {}
        self._ep_cache = None
        for ifnum in self._detached:
            try:
                h.attachKernelDriver(ifnum)
            except Exception as exc:
                log.debug("%s: reattach driver of interface %d: %s", self.busid, ifnum, exc)
        self._detached = []

    def _close_handle(self) -> None:
        if self.handle is not None and not self._worker_idle():
            # the worker is still inside a libusb call on this handle (a reset, a SET_CONFIGURATION
            # the device or its lock holds up): closing the handle now would free it under that
            # call. Close it once the worker is done (the worker runs its calls in order).
            self._close_when_idle()
            return
        self._close_pending = False
        pool, self._transfers = self._transfers, None
        if pool is not None:
            pool.close()  # frees the kept transfers; any still in flight is closed as it comes back
        devmem, self._devmem = self._devmem, None
        if devmem is not None:
            devmem.close()  # munmap before the handle goes (usbfs keeps what an URB in flight uses)
        if self.handle is not None:
            if not self.is_gone:
                self._give_back_interfaces()
            self._claimed = []
            self._detached = []
            try:
                close_handle(self.handle, wrapped=self._fd >= 0)
            except Exception as exc:
                # libusb may still poll this handle's fd: closing it would let the number be reused
                # under libusb (see _drain_transfers), so the fd stays open (one leaked fd)
                log.warning("%s: closing the libusb handle failed: %r; keeping its fd open", self.busid, exc)
                self._fd = -1
            self.handle = None
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        self._busy = None
        self._deferred.clear()
        self._cancel_later.clear()
        self._invalidate()
        if self._worker is not None:
            self._worker.shutdown(wait=False)
            self._worker = None

    def _close_when_idle(self) -> None:
        if self._close_pending:
            return
        loop = self._loop
        if loop is None or loop.is_closed():
            log.warning("%s: a libusb call is still running: the handle stays open", self.busid)
            return
        self._close_pending = True
        log.warning("%s: a libusb call is still running: closing the handle when it returns", self.busid)
        give_back = (lambda: None) if self.is_gone else self._give_back_interfaces

        def done(_fut: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the process is exiting
                loop.call_soon_threadsafe(self._close_when_idle_done)

        self._job(give_back).add_done_callback(done)

    def _close_when_idle_done(self) -> None:
        self._close_pending = False
        if self.handle is not None:
            self._close_handle()

    def release(self) -> None:
        self._close_handle()

    def mark_gone(self) -> None:
        """The device was unplugged (or unbound): fail what is in flight and tell the server."""
        if self.is_gone:
            return
        self.is_gone = True
        log.info("%s: device gone", self.busid)
        deferred, self._deferred = self._deferred, OrderedDict()
        for key, urb in deferred.items():
            if key is _RESET:
                continue
            self._pending.pop(key, None)  # type: ignore[call-overload]
            if not urb.done:
                urb.complete(ESHUTDOWN, 0)
        self._cancel_later.clear()
        for urb in list(self._pending.values()):
            transfer: Any = urb.context
            if transfer is not None:
                with contextlib.suppress(Exception):
                    transfer.cancel()
        if self.gone is not None:
            self.gone.set()
        if self.on_gone is not None:
            self.on_gone(self)

    # ------------------------------------------------------------ URBs
    def submit(self, urb: Urb) -> None:
        if self._busy is not None and not self.is_gone:
            # behind a SET_CONFIGURATION / SET_INTERFACE / reset still running in the worker
            self._pending[id(urb)] = urb
            self._deferred[id(urb)] = urb
            return
        self._submit_now(urb)

    def _submit_now(self, urb: Urb) -> None:
        if _DEBUG and log.isEnabledFor(_LOG_DEBUG):
            log.debug("%s: submit %r setup=%s flags=%#x", self.busid, urb, bytes(urb.setup).hex(), urb.transfer_flags)
        if self.is_gone or self.handle is None:
            urb.complete(ESHUTDOWN if self.is_gone else ENODEV, 0)
            return
        is_in = urb.direction == USBIP_DIR_IN
        if urb.ep == 0:
            self._submit_control(urb, is_in)
            return
        ep = self._endpoint(urb.ep, urb.direction)
        if ep is None:
            # not in the current settings of an interface we hold: usb_submit_urb's -ENOENT
            log.debug("%s: %r: no such endpoint in the claimed interfaces' current settings", self.busid, urb)
            urb.complete(ENOENT, 0)
            return
        xfer = ep.xfer
        if xfer not in (XFER_BULK, XFER_INT, XFER_ISOC) or (xfer == XFER_ISOC) != (urb.iso is not None):
            urb.complete(EINVAL, 0)
            return
        if ep.max_bytes <= 0:
            urb.complete(EMSGSIZE, 0)  # usb_submit_urb: "bogus endpoint" (maxpacket 0)
            return
        address = ep.address
        try:
            if xfer == XFER_ISOC:
                transfer = self._iso_transfer(urb, address, is_in, ep.max_bytes)
            else:
                transfer = self._bulk_transfer(urb, address, xfer, is_in)
            self._start(urb, transfer)
        except Exception as exc:
            self._submit_failed(urb, exc)

    def _bulk_transfer(self, urb: Urb, address: int, xfer: int, is_in: bool) -> Any:
        """A bulk / interrupt transfer set up for ``urb``: one kept for the same endpoint and flags
        (only its buffer and user data change), else a new one."""
        flags = urb.transfer_flags
        if is_in:
            tflags = FLAG_SHORT_NOT_OK if flags & URB_SHORT_NOT_OK else 0
        else:
            tflags = FLAG_ZERO_PACKET if flags & URB_ZERO_PACKET else 0
        key = transfer_key(address, xfer, tflags)
        pool = self._transfers
        transfer = pool.get(key) if pool is not None else None
        if transfer is None:
            transfer = self.handle.getTransfer(
                short_is_error=bool(tflags & FLAG_SHORT_NOT_OK), add_zero_packet=bool(tflags & FLAG_ZERO_PACKET)
            )
            transfer.usbip_key = key  # what stays when it is reused
            try:
                if xfer == XFER_INT:
                    transfer.setInterrupt(address, SETUP_BUFFER, self._callback)
                else:
                    transfer.setBulk(address, SETUP_BUFFER, self._callback)
            except BaseException:
                with contextlib.suppress(Exception):
                    transfer.close()
                raise
        buf = urb.buffer
        n = min(len(buf), urb.transfer_buffer_length)
        try:
            # OUT data into the transfer's usbfs region (usbfs does not copy it again), else the
            # URB's buffer in place when writable (IN data lands there, OUT data is not copied here)
            if is_in or not stage(transfer, self._devmem, buf, n):
                point_at(transfer, buf, n)
            transfer.setUserData(urb)
        except BaseException:
            self._put_back(transfer)
            raise
        return transfer

    def _new_transfer(self, key: int, iso_packets: int = 0) -> Any:
        """A kept transfer for ``key``, or a new one (set up by the caller)."""
        pool = self._transfers
        transfer = pool.get(key) if pool is not None else None
        if transfer is None:
            transfer = self.handle.getTransfer(iso_packets=iso_packets)
            transfer.usbip_key = key
        return transfer

    def _put_back(self, transfer: Any) -> None:
        """A transfer libusb is done with (or that was never submitted): kept for reuse, or closed."""
        pool = self._transfers
        key = getattr(transfer, "usbip_key", None)
        if pool is None or key is None:
            close_transfer(transfer)
            return
        pool.put(key, transfer)

    def _start(self, urb: Urb, transfer: Any) -> None:
        urb.context = transfer
        self._pending[id(urb)] = urb
        try:
            transfer.submit()
        except BaseException:
            self._pending.pop(id(urb), None)
            urb.context = None
            self._put_back(transfer)
            raise

    def _submit_failed(self, urb: Urb, exc: BaseException) -> None:
        if isinstance(exc, UrbRefused):
            err = exc.status
        else:
            code = getattr(exc, "value", None)
            err = error_to_errno(code) if isinstance(code, int) else EINVAL
        log.debug("%s: submit %r failed: %s", self.busid, urb, exc)
        if err == ENODEV:
            urb.complete(ENODEV, 0)
            self._schedule_gone()
        else:
            urb.complete(err, 0)

    def _schedule_gone(self) -> None:
        try:
            asyncio.get_running_loop().call_soon(self.mark_gone)
        except RuntimeError:
            self.mark_gone()

    # ------------------------------------------------------------ control
    def _submit_control(self, urb: Urb, is_in: bool) -> None:
        setup = urb.setup
        bm, req, value, index, length = SETUP_STRUCT.unpack_from(setup, 0)
        # the special requests are standard OUT requests; the rest (GET_DESCRIPTOR, ...) skip the checks
        special = classify_control(setup) if bm & (DIR_IN | TYPE_MASK) == TYPE_STANDARD else None
        if special is not None and special.kind is Special.CLEAR_HALT and special.target & 0x0F == 0:
            special = None  # CLEAR_FEATURE(ENDPOINT_HALT) of ep0: an ordinary request (usbfs lets it through)
        if special is not None:
            refused = self._check_special(special)
            if refused:
                log.info("%s: %s refused: %d", self.busid, special, refused)
                urb.complete(refused, 0)
                return
            self._cancel_for(special)
            self._run_blocking(self._special, special, urb)
            return
        # only requests to an interface or an endpoint can name one we do not hold
        if bm & RECIP_MASK in (RECIP_INTERFACE, RECIP_ENDPOINT):
            refused = control_refusal(setup, self._claimed, self._layout(), EPIPE)
            if refused:
                why = "names an interface we do not hold"
                log.info("%s: control request %s %s: %d", self.busid, bytes(setup).hex(), why, refused)
                urb.complete(refused, 0)
                return
        n = min(length, urb.transfer_buffer_length)
        if not is_in and n > MAX_CONTROL_DATA:
            urb.complete(EMSGSIZE, 0)  # libusb cannot send it (usb_submit_urb: too large for the host)
            return
        try:
            transfer = self._new_transfer(transfer_key(0, XFER_CONTROL))
            try:
                if is_in:
                    # at most what libusb takes: a larger wLength asks for "up to" that many bytes,
                    # which the device answers with a short read whenever it has less
                    setup_control(transfer, bm, req, value, index, min(n, MAX_CONTROL_DATA), self._callback)
                else:
                    data = memoryview(urb.buffer)[:n] if n else b""
                    setup_control(transfer, bm, req, value, index, data, self._callback)
                transfer.setUserData(urb)
            except BaseException:
                self._put_back(transfer)
                raise
            self._start(urb, transfer)
        except Exception as exc:
            self._submit_failed(urb, exc)

    def _control_refusal(self, setup: bytes) -> int:
        """0, or -EPIPE for a request naming an interface we did not claim (:func:`.control.control_refusal`)."""
        return control_refusal(setup, self._claimed, self._layout(), EPIPE)

    def _check_special(self, special: SpecialRequest) -> int:
        """0 to go ahead, or the status a special request is refused with without touching the device."""
        kind, a, b = special
        if kind is Special.CONFIG:
            if a == 0:
                return 0
            if a > 0xFF or not any(len(c) >= 6 and c[5] == a for c in self._configs):
                return EINVAL  # usb_set_configuration: no such configuration
            return 0
        if kind is Special.INTERFACE:
            layout = self._layout()
            if a > 0xFF or b > 0xFF or not layout.has_alt(a, b):
                return EINVAL  # usb_set_interface: no such interface / alt setting
            return 0
        # clear_halt: an endpoint a client may reach now; the device would stall anything else
        return 0 if self._endpoint(a & 0x0F, 1 if a & DIR_IN else 0) is not None else EPIPE

    def _cancel_for(self, special: SpecialRequest) -> None:
        """Cancel the transfers a SET_CONFIGURATION, SET_INTERFACE (of its interface) or reset is
        about to take down. usbfs would flush them with -ESHUTDOWN, which libusb reports as
        NO_DEVICE (the device then looked unplugged); cancelled first, they come back CANCELLED
        and complete -ESHUTDOWN, as the kernel flushes them."""
        kind = special.kind
        if kind is Special.CLEAR_HALT:
            return
        targets = None
        if kind is Special.INTERFACE:
            targets = self._layout().endpoints_of(special.target)
        for urb in list(self._pending.values()):
            transfer: Any = urb.context
            if transfer is None or urb.done:
                continue
            if kind is Special.CONFIG and urb.ep == 0:
                continue  # usb_set_configuration leaves ep0 alone
            if targets is not None and (urb.ep | (DIR_IN if urb.direction == USBIP_DIR_IN else 0)) not in targets:
                continue
            try:
                transfer.cancel()
            except Exception as exc:
                log.debug("%s: cancel %r before %s: %s", self.busid, urb, special, exc)

    def _run_blocking(self, fn: Callable[..., int], arg: Any, urb: Urb | None) -> None:
        """Run ``fn(arg)`` (a blocking libusb call returning an errno) in the worker thread,
        then complete ``urb`` with its result. Inline when there is no running loop (tests)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            err = fn(arg)
            self._invalidate()
            if err == ENODEV:
                self.mark_gone()
            if urb is not None and not urb.done:
                urb.complete(err, 0)
            return
        if urb is not None:
            self._pending[id(urb)] = urb
        fut = asyncio.wrap_future(self._job(fn, arg), loop=loop)
        self._busy = fut
        fut.add_done_callback(lambda f: self._blocking_done(f, arg, urb))

    def _blocking_done(self, fut: asyncio.Future[Any], arg: Any, urb: Urb | None) -> None:
        if self._busy is fut:
            self._busy = None
        self._invalidate()  # the worker may have changed the configuration, claims or alt settings
        try:
            err = fut.result()
        except BaseException as exc:  # CancelledError when the worker was shut down
            log.debug("%s: %r: %r", self.busid, arg, exc)
            err = ESHUTDOWN if self.is_gone else EINVAL
        if _DEBUG and log.isEnabledFor(_LOG_DEBUG):
            log.debug("%s: %s -> %d", self.busid, arg, err)
        if urb is not None:
            self._pending.pop(id(urb), None)
            if not urb.done:
                urb.complete(err, 0)
        if err == ENODEV:
            self.mark_gone()
        if self._busy is not None:
            return
        # unlinks that came in meanwhile (cancelling waits for the device lock the call held)
        later, self._cancel_later = self._cancel_later, {}
        for u in later.values():
            self.cancel(u)
        # URBs (and a reset) that arrived meanwhile, in order, until one of them is blocking again
        deferred = self._deferred
        while deferred and self._busy is None:
            key, nxt = deferred.popitem(last=False)
            if key is _RESET:
                self._start_reset()
                continue
            self._pending.pop(key, None)  # type: ignore[call-overload]
            if nxt.done:
                continue
            if nxt.cancelled:
                nxt.complete(ECONNRESET, 0)
                continue
            self._submit_now(nxt)

    def _special(self, special: SpecialRequest) -> int:
        """Worker thread: the libusb call standing for a client's special request."""
        kind, a, b = special
        h = self.handle
        if h is None:
            return ENODEV
        try:
            if kind is Special.CONFIG:
                # usbfs refuses SET_CONFIGURATION while interfaces are claimed: give them back first
                before = self._config_value
                self._release_interfaces()
                ok = False
                try:
                    h.setConfiguration(a)
                    ok = True
                finally:
                    try:
                        cur = h.getConfiguration()
                    except Exception:
                        cur = a if ok else before
                    self._config_value = cur
                    # usb_set_configuration (or usb_reset_configuration for the same value) leaves
                    # every interface in alt 0; after a failure nobody knows
                    self._alts = {i: 0 for i in self._layout().alts} if ok else {}
                    self._take_interfaces()
            elif kind is Special.INTERFACE:
                if a not in self._claimed:
                    self._take_interfaces()  # its kernel driver may have let go of it since
                if a not in self._claimed:
                    log.info("%s: SET_INTERFACE(%d, %d): the interface is not ours", self.busid, a, b)
                    return EPIPE
                h.setInterfaceAltSetting(a, b)
                self._alts[a] = b
            else:
                h.clearHalt(a)
        except Exception as exc:
            code = getattr(exc, "value", None)
            err = special_error_to_errno(kind, code if isinstance(code, int) else None)
            log.info("%s: %s failed: %s", self.busid, special, exc)
            return err  # ENODEV: the caller marks the device gone (loop thread)
        finally:
            self._ep_cache = None
        return 0

    def reset(self) -> None:
        """Port reset: resetDevice in the worker; URBs submitted meanwhile wait for it. A reset
        asked for while another one still waits its turn is the same reset."""
        if self.handle is None or self.is_gone:
            return
        if self._busy is not None:
            if _RESET not in self._deferred:
                self._deferred[_RESET] = None
            return
        self._start_reset()

    def _start_reset(self) -> None:
        if self.handle is None or self.is_gone:
            return
        self._cancel_for(RESET_REQUEST)
        self._run_blocking(self._reset_sync, RESET_REQUEST, None)

    def _reset_sync(self, _arg: Any = None) -> int:
        h = self.handle
        if h is None:
            return ENODEV
        try:
            h.resetDevice()
        except Exception as exc:
            log.info("%s: reset failed: %s", self.busid, exc)
            code = getattr(exc, "value", None)
            # NOT_FOUND: usbfs said ENODEV, or an interface could not be claimed again
            return special_error_to_errno(Special.RESET, code if isinstance(code, int) else None)
        finally:
            self._ep_cache = None
        return 0

    # ------------------------------------------------------------ iso
    def _iso_transfer(self, urb: Urb, address: int, is_in: bool, max_packet: int | None = None) -> Any:
        iso = urb.iso
        assert iso is not None
        packets = iso.tolist()
        # bounded before anything is allocated (UrbRefused: -EMSGSIZE / -EINVAL)
        plan = IsoPlan(packets, urb.transfer_buffer_length, max_packet)
        # libusb fixes the packet count at allocation: kept per endpoint and packet count
        transfer = self._new_transfer(transfer_key(address, XFER_ISOC, 0, len(packets)), len(packets))
        try:
            if plan.contiguous:
                buf: Any = urb.buffer
                bounce = None
            else:
                bounce = bytearray(plan.total)
                if not is_in:
                    plan.gather(memoryview(urb.buffer), memoryview(bounce))
                buf = bounce
            # set up on a scratch buffer of the right length (python-libusb1 checks the packets
            # against it), then pointed at the URB's (or the bounce) buffer: see point_at
            transfer.setIsochronous(
                address, plan.total, self._callback, (urb, plan, bounce), iso_transfer_length_list=plan.setup_lengths
            )
            point_at(transfer, buf, plan.total)
            if plan.zero:
                _patch_iso_lengths(transfer, plan)
        except BaseException:
            self._put_back(transfer)
            raise
        return transfer

    # ------------------------------------------------------------ completion
    def _on_transfer(self, transfer: Any) -> None:
        """python-libusb1 callback (event thread): completes in the loop thread. With pollfds the
        callback runs in the loop thread already and is :meth:`_finish` itself (``_callback``)."""
        self.events.dispatch(self._finish, transfer)

    def _finish(self, transfer: Any) -> None:
        data = transfer.getUserData()
        plan = bounce = None
        if isinstance(data, tuple):
            urb, plan, bounce = data
        else:
            urb = data
        self._pending.pop(id(urb), None)
        self._cancel_later.pop(id(urb), None)
        urb.context = None
        if self._drained is not None and not self._live_transfers():
            self._drained.set()
        try:
            status, actual = transfer_result(transfer)
            if urb.iso is not None and plan is not None:
                results = [(p["status"], p["actual_length"]) for p in transfer.getISOSetupList()]
                if bounce is not None and urb.direction == USBIP_DIR_IN:
                    actuals = [max(0, min(a, n)) for (_s, a), n in zip(results, plan.lengths, strict=True)]
                    plan.scatter(memoryview(bounce), memoryview(urb.buffer), actuals)
                total, errors = apply_iso_results(urb.iso, results)
                urb.error_count = errors
                actual = total
                err = status_to_errno(status)
                if status == TRANSFER_CANCELLED and not urb.cancelled:
                    err = ESHUTDOWN
            else:
                if urb.ep == 0 and urb.direction == USBIP_DIR_IN and actual:
                    actual = min(actual, urb.transfer_buffer_length)
                    memoryview(urb.buffer)[:actual] = control_data(transfer)[:actual]
                err = status_to_errno(status)
                if status == TRANSFER_CANCELLED and not urb.cancelled:
                    err = ESHUTDOWN  # cancelled because the device went away, not by an unlink
                elif (
                    status == TRANSFER_ERROR
                    and urb.ep != 0
                    and urb.direction == USBIP_DIR_IN
                    and urb.transfer_flags & URB_SHORT_NOT_OK
                    and actual < urb.transfer_buffer_length
                ):
                    # libusb reports a short read of a SHORT_NOT_OK transfer as a plain ERROR; the
                    # kernel (and usb-storage, which treats -EPROTO as fatal) says -EREMOTEIO
                    err = EREMOTEIO
        except Exception:
            log.exception("%s: completing %r", self.busid, urb)
            status, err, actual = None, EINVAL, 0
        finally:
            # kept for the next URB on this endpoint (or closed); either way python-libusb1's view of
            # the pooled buffer goes before the session gives the buffer back to its pool
            self._put_back(transfer)
        if _DEBUG and log.isEnabledFor(_LOG_DEBUG):
            log.debug(
                "%s: done seq=%d ep=%d status=%s err=%d actual=%d", self.busid, urb.seqnum, urb.ep, status, err, actual
            )
        urb.complete(err, actual)
        if status == TRANSFER_NO_DEVICE:
            self._schedule_gone()

    def cancel(self, urb: Urb) -> None:
        key = id(urb)
        if self._deferred.get(key) is urb:  # never started: done now (O(1): unlink storms)
            del self._deferred[key]
            self._pending.pop(key, None)
            if not urb.done:
                urb.complete(ECONNRESET, 0)
            return
        transfer: Any = urb.context
        if transfer is None or urb.done:
            return  # a blocking call in the worker: completes with its result when the call returns
        if self._busy is not None:
            # usbfs' DISCARDURB waits for the device lock the worker's call holds: not in the loop
            self._cancel_later[key] = urb
            return
        try:
            transfer.cancel()
        except Exception as exc:  # already completing: its callback will report it
            log.debug("%s: cancel %r: %s", self.busid, urb, exc)

    @property
    def in_flight(self) -> int:
        return len(self._pending)


def _patch_iso_lengths(transfer: Any, plan: IsoPlan) -> None:
    """Set zero-length iso packets python-libusb1 would not accept (set up as 1 byte)."""
    from usb1 import libusb1

    raw = getattr(transfer, "_USBTransfer__transfer", None)
    if raw is None:
        raise ValueError("zero-length iso packets are not supported by this python-libusb1")
    descs = libusb1.get_iso_packet_list(raw)
    for i in plan.zero:
        descs[i].length = 0
