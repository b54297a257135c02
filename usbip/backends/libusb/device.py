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

Buffers: python-libusb1 wraps a *writable* buffer in place (``c_char * n``
``.from_buffer``), so bulk/interrupt/iso IN data lands straight in the pooled
URB buffer, and OUT data given as a writable buffer is not copied either (a
read-only ``bytes`` payload is copied once by python-libusb1). Control
transfers always go through python-libusb1's own setup+data buffer (one small
copy each way).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Callable
from typing import Any

from ...descriptors import endpoint_types, walk
from ...device import Device, Urb
from ...protocol.constants import (
    ECONNRESET,
    EINVAL,
    ENODEV,
    EREMOTEIO,
    ESHUTDOWN,
    URB_SHORT_NOT_OK,
    URB_ZERO_PACKET,
    USBIP_DIR_IN,
    XFER_BULK,
    XFER_INT,
    XFER_ISOC,
)
from ..usbdev import UsbDevice, split_descriptors
from ..worker import DaemonWorker
from .mapping import (
    TRANSFER_CANCELLED,
    TRANSFER_ERROR,
    TRANSFER_NO_DEVICE,
    IsoPlan,
    apply_iso_results,
    error_to_errno,
    status_to_errno,
)
from .opening import open_handle

log = logging.getLogger(__name__)
#: how long close() lets cancelled transfers come back before it closes the handle
DRAIN_TIMEOUT = 2.0
_DEBUG = bool(os.environ.get("USBIP_LIBUSB_DEBUG"))

_SETUP = struct.Struct("<BBHHH")
REQ_CLEAR_FEATURE = 1
REQ_SET_CONFIGURATION = 9
REQ_SET_INTERFACE = 11
FEATURE_ENDPOINT_HALT = 0


def interface_numbers(config: bytes) -> list[int]:
    """bInterfaceNumber of each interface in a configuration descriptor (alt 0 only)."""
    out = []
    for dtype, desc in walk(config):
        if dtype == 4 and len(desc) >= 4 and desc[3] == 0 and desc[2] not in out:
            out.append(desc[2])
    return out


def classify_control(setup: bytes) -> tuple[str, int, int] | None:
    """Which control requests the stub performs itself: ("config", value, 0),
    ("interface", interface, alt), ("clear_halt", endpoint address, 0) or None."""
    bm, req, value, index, _length = _SETUP.unpack_from(setup, 0)
    if bm == 0x00 and req == REQ_SET_CONFIGURATION:
        return ("config", value & 0xFF, 0)
    if bm == 0x01 and req == REQ_SET_INTERFACE:
        return ("interface", index & 0xFF, value & 0xFF)
    if bm == 0x02 and req == REQ_CLEAR_FEATURE and value == FEATURE_ENDPOINT_HALT:
        return ("clear_halt", index & 0xFF, 0)
    return None


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
        self.context = context
        self.events = events
        self.on_gone = on_gone
        self.handle: Any = None
        self._fd = -1
        self._claimed: list[int] = []
        self._detached: list[int] = []
        self._pending: dict[int, Urb] = {}  # id(urb) -> urb with a libusb transfer in flight
        self._ep_cache: dict[tuple[int, int], int] | None = None
        self.is_gone = False
        self._worker: DaemonWorker | None = None
        self._busy: asyncio.Future[Any] | None = None  # the libusb call running in the worker
        self._deferred: list[Urb] = []  # URBs submitted while _busy runs, in order
        self.gone: asyncio.Event | None = None  # set when the device disappears (the server ends the session)

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

    def endpoint_type(self, ep: int, direction: int) -> int | None:
        if ep == 0:
            return 0
        if self._ep_cache is None:
            self._ep_cache = endpoint_types(self.active_configuration())
        return self._ep_cache.get((ep, direction))

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
        self.gone = asyncio.Event()
        try:
            self.handle, self._fd = open_handle(self.context, self.sysdev)
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
        self._take_interfaces()

    def _get_worker(self) -> DaemonWorker:
        if self._worker is None:
            self._worker = DaemonWorker(f"usbip-libusb-{self.busid}")
        return self._worker

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._get_worker(), fn, *args)

    def _take_interfaces(self) -> None:
        """Detach kernel drivers from the active configuration's interfaces and claim them."""
        self._ep_cache = None
        for ifnum in interface_numbers(self.active_configuration()):
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
        await self._drain_transfers()
        if self.handle is not None and not self.is_gone:
            # interface release / driver re-attach sleep in the kernel: not in the loop thread
            try:
                await asyncio.wait_for(self._in_worker(self._give_back_interfaces), 30.0)
            except Exception as exc:
                log.warning("%s: giving the interfaces back failed: %s", self.busid, exc)
        self._close_handle()

    def _live_transfers(self) -> list[Urb]:
        return [u for u in self._pending.values() if u.context is not None and not u.done]

    async def _drain_transfers(self) -> None:
        """Cancel the transfers in flight and let their cancellations come back through the
        normal event handling (the loop's pollfds or the event thread), bounded by
        DRAIN_TIMEOUT. Otherwise python-libusb1's close() cancels them and runs libusb's event
        handling itself; when that raised, libusb_close was never called, libusb kept polling
        the handle's fd after we closed it, and once the number was reused every later
        libusb_handle_events failed ("reap failed, errno=9" / 25): no transfer of any device
        completed any more (seen in the event-mode benchmark)."""
        live = self._live_transfers()
        if not live:
            return
        for urb in live:
            with contextlib.suppress(Exception):
                urb.context.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT
        while self._live_transfers() and loop.time() < deadline:
            await asyncio.sleep(0.005)
        if self._live_transfers():
            log.warning("%s: %d transfers still in flight at close", self.busid, len(self._live_transfers()))

    def _give_back_interfaces(self) -> None:
        self._release_interfaces()
        for ifnum in self._detached:
            try:
                self.handle.attachKernelDriver(ifnum)
            except Exception as exc:
                log.debug("%s: reattach driver of interface %d: %s", self.busid, ifnum, exc)
        self._detached = []

    def _close_handle(self) -> None:
        if self.handle is not None:
            if not self.is_gone:
                self._give_back_interfaces()
            self._claimed = []
            self._detached = []
            try:
                self.handle.close()
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
        if self._worker is not None:
            self._worker.shutdown(wait=False)
            self._worker = None

    def release(self) -> None:
        self._close_handle()

    def mark_gone(self) -> None:
        """The device was unplugged (or unbound): fail what is in flight and tell the server."""
        if self.is_gone:
            return
        self.is_gone = True
        log.info("%s: device gone", self.busid)
        deferred, self._deferred = self._deferred, []
        for urb in deferred:
            self._pending.pop(id(urb), None)
            if not urb.done:
                urb.complete(ESHUTDOWN, 0)
        for urb in list(self._pending.values()):
            transfer = urb.context
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
            self._deferred.append(urb)
            return
        self._submit_now(urb)

    def _submit_now(self, urb: Urb) -> None:
        if _DEBUG:
            log.debug("%s: submit %r setup=%s flags=%#x", self.busid, urb, bytes(urb.setup).hex(), urb.transfer_flags)
        if self.is_gone or self.handle is None:
            urb.complete(ESHUTDOWN if self.is_gone else ENODEV, 0)
            return
        is_in = urb.direction == USBIP_DIR_IN
        if urb.ep == 0:
            self._submit_control(urb, is_in)
            return
        xfer = self.endpoint_type(urb.ep, urb.direction)
        address = urb.ep | (0x80 if is_in else 0)
        flags = urb.transfer_flags
        try:
            if xfer == XFER_ISOC:
                transfer = self._iso_transfer(urb, address, is_in)
            else:
                transfer = self.handle.getTransfer(
                    short_is_error=bool(is_in and flags & URB_SHORT_NOT_OK),
                    add_zero_packet=bool(not is_in and flags & URB_ZERO_PACKET),
                )
                buf = self._data_buffer(urb, is_in)
                if xfer == XFER_INT:
                    transfer.setInterrupt(address, buf, self._on_transfer, urb)
                elif xfer == XFER_BULK:
                    transfer.setBulk(address, buf, self._on_transfer, urb)
                else:
                    urb.complete(EINVAL, 0)
                    return
            self._start(urb, transfer)
        except Exception as exc:
            self._submit_failed(urb, exc)

    @staticmethod
    def _data_buffer(urb: Urb, is_in: bool) -> Any:
        buf = urb.buffer
        n = urb.transfer_buffer_length
        if is_in:
            return buf if len(buf) == n else memoryview(buf)[:n]
        if len(buf) != n:
            return memoryview(buf)[:n]
        return buf

    def _start(self, urb: Urb, transfer: Any) -> None:
        urb.context = transfer
        self._pending[id(urb)] = urb
        try:
            transfer.submit()
        except BaseException:
            self._pending.pop(id(urb), None)
            urb.context = None
            with contextlib.suppress(Exception):
                transfer.close()
            raise

    def _submit_failed(self, urb: Urb, exc: BaseException) -> None:
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
        setup = bytes(urb.setup)
        special = classify_control(setup)
        if special is not None:
            self._run_blocking(self._special, special, urb)
            return
        bm, req, value, index, length = _SETUP.unpack_from(setup, 0)
        try:
            transfer = self.handle.getTransfer()
            if is_in:
                transfer.setControl(
                    bm, req, value, index, min(length, urb.transfer_buffer_length), self._on_transfer, urb
                )
            else:
                n = min(length, urb.transfer_buffer_length)
                data = bytes(memoryview(urb.buffer)[:n]) if n else b""
                transfer.setControl(bm, req, value, index, data, self._on_transfer, urb)
            self._start(urb, transfer)
        except Exception as exc:
            self._submit_failed(urb, exc)

    def _run_blocking(self, fn: Callable[..., int], arg: Any, urb: Urb | None) -> None:
        """Run ``fn(arg)`` (a blocking libusb call returning an errno) in the worker thread,
        then complete ``urb`` with its result. Inline when there is no running loop (tests)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            err = fn(arg)
            if err == ENODEV:
                self.mark_gone()
            if urb is not None and not urb.done:
                urb.complete(err, 0)
            return
        if urb is not None:
            self._pending[id(urb)] = urb
        fut = loop.run_in_executor(self._get_worker(), fn, arg)
        self._busy = fut
        fut.add_done_callback(lambda f: self._blocking_done(f, arg, urb))

    def _blocking_done(self, fut: asyncio.Future[Any], arg: Any, urb: Urb | None) -> None:
        if self._busy is fut:
            self._busy = None
        try:
            err = fut.result()
        except BaseException as exc:  # CancelledError when the worker was shut down
            log.debug("%s: %r: %r", self.busid, arg, exc)
            err = ESHUTDOWN if self.is_gone else EINVAL
        if _DEBUG:
            log.debug("%s: %s -> %d", self.busid, arg, err)
        if urb is not None:
            self._pending.pop(id(urb), None)
            if not urb.done:
                urb.complete(err, 0)
        if err == ENODEV:
            self.mark_gone()
        # URBs that arrived meanwhile, in order, until one of them is blocking again
        while self._deferred and self._busy is None:
            nxt = self._deferred.pop(0)
            self._pending.pop(id(nxt), None)
            if nxt.done:
                continue
            if nxt.cancelled:
                nxt.complete(ECONNRESET, 0)
                continue
            self._submit_now(nxt)

    def _special(self, special: tuple[str, int, int]) -> int:
        what, a, b = special
        h = self.handle
        try:
            if what == "config":
                # usbfs refuses SET_CONFIGURATION while interfaces are claimed: give them back first
                self._release_interfaces()
                try:
                    h.setConfiguration(a)
                finally:
                    try:
                        cur = h.getConfiguration()
                    except Exception:
                        cur = a
                    self._config_value = cur
                    self._take_interfaces()
            elif what == "interface":
                if a not in self._claimed:
                    self._take_interfaces()
                h.setInterfaceAltSetting(a, b)
                self._ep_cache = None
            else:
                h.clearHalt(a)
        except Exception as exc:
            code = getattr(exc, "value", None)
            err = error_to_errno(code if isinstance(code, int) else None)
            log.info("%s: %s(%d, %d) failed: %s", self.busid, what, a, b, exc)
            return err  # ENODEV: the caller marks the device gone (loop thread)
        return 0

    def reset(self) -> None:
        """Port reset: resetDevice in the worker; URBs submitted meanwhile wait for it."""
        if self.handle is None or self.is_gone:
            return
        self._run_blocking(self._reset_sync, "reset", None)

    def _reset_sync(self, _arg: Any = None) -> int:
        h = self.handle
        if h is None:
            return ENODEV
        try:
            h.resetDevice()
        except Exception as exc:
            log.info("%s: reset failed: %s", self.busid, exc)
            code = getattr(exc, "value", None)
            if isinstance(code, int) and error_to_errno(code) == ENODEV:
                return ENODEV
            return EINVAL
        return 0

    # ------------------------------------------------------------ iso
    def _iso_transfer(self, urb: Urb, address: int, is_in: bool) -> Any:
        iso = urb.iso
        assert iso is not None
        packets = iso.tolist()
        plan = IsoPlan(packets, urb.transfer_buffer_length)
        transfer = self.handle.getTransfer(iso_packets=len(packets))
        if plan.contiguous:
            buf: Any = memoryview(urb.buffer)[: plan.total] if plan.total != len(urb.buffer) else urb.buffer
            bounce = None
        else:
            bounce = bytearray(plan.total)
            if not is_in:
                plan.gather(memoryview(urb.buffer), memoryview(bounce))
            buf = bounce
        transfer.setIsochronous(
            address, buf, self._on_transfer, (urb, plan, bounce), iso_transfer_length_list=plan.setup_lengths
        )
        if plan.zero:
            _patch_iso_lengths(transfer, plan)
        return transfer

    # ------------------------------------------------------------ completion
    def _on_transfer(self, transfer: Any) -> None:
        """python-libusb1 callback (loop thread with pollfds, event thread otherwise)."""
        self.events.dispatch(self._finish, transfer)

    def _finish(self, transfer: Any) -> None:
        data = transfer.getUserData()
        plan = bounce = None
        if isinstance(data, tuple):
            urb, plan, bounce = data
        else:
            urb = data
        self._pending.pop(id(urb), None)
        urb.context = None
        try:
            status = transfer.getStatus()
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
                actual = transfer.getActualLength()
                if urb.ep == 0 and urb.direction == USBIP_DIR_IN and actual:
                    actual = min(actual, urb.transfer_buffer_length)
                    memoryview(urb.buffer)[:actual] = transfer.getBuffer()[:actual]
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
            with contextlib.suppress(Exception):
                transfer.close()  # drops python-libusb1's view of the pooled buffer before the pool gets it back
        if _DEBUG:
            log.debug(
                "%s: done seq=%d ep=%d status=%s err=%d actual=%d", self.busid, urb.seqnum, urb.ep, status, err, actual
            )
        urb.complete(err, actual)
        if status == TRANSFER_NO_DEVICE:
            self._schedule_gone()

    def cancel(self, urb: Urb) -> None:
        queued = [i for i, u in enumerate(self._deferred) if u is urb]
        if queued:  # never started: done now
            del self._deferred[queued[0]]
            self._pending.pop(id(urb), None)
            if not urb.done:
                urb.complete(ECONNRESET, 0)
            return
        transfer = urb.context
        if transfer is None or urb.done:
            return  # a blocking call in the worker: completes with its result when the call returns
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
