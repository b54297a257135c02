"""Base class for devices written in Python: descriptors as data, chapter 9 handled here.

A :class:`VirtualDevice` subclass declares its descriptors with the small builders
below (:func:`endpoint`, :func:`interface`, :func:`configuration`) and registers one
handler per data endpoint with :meth:`VirtualDevice.on_endpoint`. The base class
answers the standard requests on endpoint 0 (USB 2.0 chapter 9.4, USB 3 9.4 for the
BOS descriptor) and dispatches every other URB to the handler of its endpoint.

Handlers come in two kinds:

* a plain function ``handler(urb)`` that completes the URB itself (now, or later by
  parking it in a :class:`WaitQueue`). This is the fast path: one list lookup and
  one call per URB, no task and no copy.
* an ``async def handler(urb)`` coroutine, run as a task. It may return the actual
  length (the URB then completes with status 0), complete the URB itself, or raise
  :class:`UsbError`. Cancelling the URB cancels the task and completes it with
  ``-ECONNRESET``.

Endpoint rules: an URB for an endpoint that is not part of the active configuration
and alternate settings completes with ``-ENOENT``, which is what ``usb_submit_urb()``
answers the kernel stub for a missing endpoint. A halted endpoint (``SET_FEATURE``
or :meth:`VirtualDevice.halt`) completes every URB with ``-EPIPE`` until
``CLEAR_FEATURE(ENDPOINT_HALT)``, ``SET_INTERFACE``, ``SET_CONFIGURATION`` or a reset.

:meth:`VirtualDevice.reset` (port reset) clears halts and device state but keeps the
configuration and alternate settings, like the kernel stub whose
``usb_reset_device()`` restores them; the host sends SET_CONFIGURATION again anyway.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import struct
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import CyusbipError
from ..protocol.constants import (
    ECONNRESET,
    EPIPE,
    EPROTO,
    ESHUTDOWN,
    Speed,
)
from ..usb.ch9 import (
    CLEAR_FEATURE,
    DIR_IN,
    DT_BOS,
    DT_CONFIG,
    DT_DEVICE,
    DT_DEVICE_QUALIFIER,
    DT_OTHER_SPEED_CONFIG,
    DT_STRING,
    FEATURE_ENDPOINT_HALT,
    FEATURE_REMOTE_WAKEUP,
    GET_CONFIGURATION,
    GET_DESCRIPTOR,
    GET_INTERFACE,
    GET_STATUS,
    RECIP_DEVICE,
    RECIP_ENDPOINT,
    RECIP_INTERFACE,
    RECIP_MASK,
    SET_ADDRESS,
    SET_CONFIGURATION,
    SET_FEATURE,
    SET_INTERFACE,
    SET_ISOCH_DELAY,
    SET_SEL,
    SETUP_STRUCT,
    TYPE_MASK,
    TYPE_STANDARD,
)
from ..usb.device import Device, Urb
from .descriptors import (
    Configuration,
    Endpoint,
    bos_descriptor,
    config_descriptor,
    device_descriptor,
    full_speed,
    string_descriptor,
)
from .waiting import WaitQueue, complete_in, no_endpoint, stall

log = logging.getLogger(__name__)

_SETUP = SETUP_STRUCT
_devnums = itertools.count(2)


#: Returned by :meth:`VirtualDevice.control_request` that will complete the URB later itself.
DEFERRED = object()


class UsbError(CyusbipError):
    """Raised by a handler (or async handler) to complete its URB with ``status``."""

    def __init__(self, status: int, actual_length: int = 0) -> None:
        super().__init__(status)
        self.status = status
        self.actual_length = actual_length


# ---------------------------------------------------------------- the device


class VirtualDevice(Device):
    """A device implemented in Python. Subclasses call :meth:`setup_descriptors` and
    :meth:`on_endpoint` in their constructor and override :meth:`control_request`
    for class/vendor requests."""

    def __init__(
        self,
        *,
        vendor_id: int,
        product_id: int,
        bcd_device: int = 0x0100,
        device_class: int = 0,
        device_subclass: int = 0,
        device_protocol: int = 0,
        manufacturer: str | None = "cyusbip",
        product: str | None = None,
        serial: str | None = None,
        speed: Speed = Speed.HIGH,
        busnum: int = 1,
        devnum: int | None = None,
    ) -> None:
        self.speed = Speed(speed)
        self.busnum = busnum
        self.devnum = next(_devnums) if devnum is None else devnum
        self.busid = f"{busnum}-{self.devnum}"
        self.vendor_id = vendor_id
        self.product_id = product_id
        self.bcd_device = bcd_device
        self.device_class = device_class
        self.device_subclass = device_subclass
        self.device_protocol = device_protocol
        self.manufacturer = manufacturer
        self.product = product
        self.serial = serial
        self.configurations: list[Configuration] = []
        self.address = 0
        self.remote_wakeup = False
        self._strings: list[str] = []
        self._handlers: dict[tuple[int, int], Callable[[Urb], None]] = {}
        # entry ep | direction << 4: the handler of each endpoint, endpoint 0 included; changed in
        # place only (halts, _rebuild), so it can serve as Device.submit_table
        self._dispatch: list[Callable[[Urb], None]] = [no_endpoint] * 32
        self._active: dict[tuple[int, int], Endpoint] = {}
        self._halted: set[tuple[int, int]] = set()
        self._config: Configuration | None = None
        self._alts: dict[int, int] = {}
        self._waiting: dict[Urb, Callable[[Urb, int], None]] = {}
        self._tasks: dict[Urb, asyncio.Task[Any]] = {}
        self._queues: list[WaitQueue] = self.__dict__.get("_queues", [])  # WaitQueues register themselves
        self._dev_desc = b""
        self._config_descs: list[bytes] = []
        self._other_speed: list[bytes] = []
        self._bos = b""
        # setup packet -> reply of a standard GET_DESCRIPTOR to the device (truncated to wLength): the
        # blobs are built once by setup_descriptors, so a repeated request is answered without parsing
        self._replies: dict[bytes, bytes] = {}

    # ------------------------------------------------------------ declaration
    def setup_descriptors(self, configurations: Sequence[Configuration]) -> None:
        """Fix the configurations and build every descriptor blob once."""
        self.configurations = list(configurations)
        self._strings = []
        self._replies = {}
        speed = self.speed
        i_man = self.string_index(self.manufacturer)
        i_prod = self.string_index(self.product)
        i_ser = self.string_index(self.serial)
        if speed >= Speed.SUPER:
            bcd_usb, mp0 = 0x0320, 9  # 2**9 = 512
        elif speed == Speed.LOW:
            bcd_usb, mp0 = 0x0200, 8
        else:
            bcd_usb, mp0 = 0x0200, 64
        self._dev_desc = device_descriptor(
            bcd_usb=bcd_usb,
            device_class=self.device_class,
            device_subclass=self.device_subclass,
            device_protocol=self.device_protocol,
            max_packet0=mp0,
            vendor_id=self.vendor_id,
            product_id=self.product_id,
            bcd_device=self.bcd_device,
            i_manufacturer=i_man,
            i_product=i_prod,
            i_serial=i_ser,
            num_configurations=len(self.configurations),
        )
        self._config_descs = [config_descriptor(c, speed, self.string_index) for c in self.configurations]
        if speed == Speed.HIGH:
            self._other_speed = [
                config_descriptor(c, Speed.FULL, self.string_index, DT_OTHER_SPEED_CONFIG, full_speed)
                for c in self.configurations
            ]
        else:
            self._other_speed = []
        self._bos = bos_descriptor(speed) if speed >= Speed.SUPER else b""
        # Start configured, as the server host's USB core leaves a device the kernel stub exports
        # (usbip-host hands over a configured device; vhci's own SET_CONFIGURATION then re-selects it).
        if self.configurations:
            self._config = self.configurations[0]
            self._alts = {n: 0 for n in self._config.interface_numbers()}
        self._rebuild()

    def string_index(self, text: str | None) -> int:
        """The string descriptor index of ``text`` (allocated on first use; 0 for None)."""
        if not text:
            return 0
        try:
            return self._strings.index(text) + 1
        except ValueError:
            self._strings.append(text)
            return len(self._strings)

    def on_endpoint(self, address: int, handler: Callable[[Urb], Any]) -> None:
        """Route URBs for endpoint ``address`` (0x81: ep 1 IN) to ``handler``."""
        key = (address & 0x0F, 1 if address & 0x80 else 0)
        if inspect.iscoroutinefunction(handler):
            handler = self._async_runner(handler)
        self._handlers[key] = handler
        self._rebuild()

    # ------------------------------------------------------------ Device ABC
    @property
    def device_descriptor(self) -> bytes:
        return self._dev_desc

    def configuration_descriptor(self, index: int = 0) -> bytes:
        return self._config_descs[index]

    @property
    def configuration_value(self) -> int:
        return self._config.value if self._config is not None else 0

    @property
    def alternate_settings(self) -> dict[int, int]:
        return dict(self._alts)

    def endpoint_type(self, ep: int, direction: int) -> int | None:
        if ep == 0:
            return 0
        config = self._config or (self.configurations[0] if self.configurations else None)
        if config is None:
            return None
        for intf in config.interfaces:
            for e in intf.endpoints:
                if e.key == (ep, direction):
                    return e.type
        return None

    def submit(self, urb: Urb) -> None:
        self._dispatch[urb.ep | (urb.direction << 4)](urb)

    def submit_table(self) -> list[Callable[[Urb], None]] | None:
        # submit() replaced (by a subclass, or on the instance): every URB goes through it
        if type(self).submit is not VirtualDevice.submit or "submit" in self.__dict__:
            return None
        return self._dispatch

    def cancel(self, urb: Urb) -> None:
        if urb.done:
            return
        task = self._tasks.get(urb)
        if task is not None:
            task.cancel()
            return
        abort = self._waiting.pop(urb, None)
        if abort is not None:
            abort(urb, ECONNRESET)
        else:
            urb.complete(ECONNRESET, 0)

    async def close(self) -> None:
        """The importing client is gone: reset, as the kernel stub resets a device whose
        connection went down (stub_dev.c: SDEV_EVENT_DOWN carries USBIP_EH_RESET)."""
        self.reset()

    def reset(self) -> None:
        """Port reset: halts and device state are cleared; configuration is kept."""
        self.abort_all(ECONNRESET)
        self._halted.clear()
        self.address = 0
        self.remote_wakeup = False
        self._rebuild()
        self.on_reset()

    # ------------------------------------------------------------ hooks
    def control_request(self, urb: Urb, request_type: int, request: int, value: int, index: int, length: int) -> Any:
        """Class/vendor request (and standard requests the base class does not know).

        Return bytes for an IN request (truncated to wLength), True to accept an OUT
        request (its data is in ``urb.buffer``), or None to stall. A handler may also
        complete ``urb`` itself: now (the return value is then ignored) or later
        (return :data:`DEFERRED` and keep the URB cancellable, e.g. in a :class:`WaitQueue`).
        """
        return None

    def interface_descriptor(self, interface: int, dtype: int, index: int) -> bytes | None:
        """GET_DESCRIPTOR addressed to an interface (HID 0x21/0x22 by default from the tables)."""
        config = self._config or (self.configurations[0] if self.configurations else None)
        if config is None:
            return None
        intf = config.find(interface, self._alts.get(interface, 0))
        if intf is None:
            return None
        return intf.class_descriptors.get(dtype)

    def on_configure(self, value: int) -> None:
        """After SET_CONFIGURATION."""

    def on_set_interface(self, interface: int, alternate: int) -> None:
        """After SET_INTERFACE."""

    def on_clear_halt(self, ep: int, direction: int) -> None:
        """After CLEAR_FEATURE(ENDPOINT_HALT); may call :meth:`halt` again to keep stalling."""

    def on_reset(self) -> None:
        """After a port reset."""

    # ------------------------------------------------------------ halts and waiting URBs
    def halt(self, ep: int, direction: int) -> None:
        """Stall endpoint ``ep``: parked and new URBs fail with -EPIPE until the halt is cleared."""
        key = (ep, direction)
        if key not in self._active:
            return
        self._halted.add(key)
        self._dispatch[ep | (direction << 4)] = stall
        self.abort_endpoint(ep, direction, EPIPE)

    def clear_halt(self, ep: int, direction: int) -> None:
        key = (ep, direction)
        self._halted.discard(key)
        if key in self._active:
            self._dispatch[ep | (direction << 4)] = self._handlers.get(key, no_endpoint)

    def is_halted(self, ep: int, direction: int) -> bool:
        return (ep, direction) in self._halted

    def abort_endpoint(self, ep: int, direction: int, status: int) -> None:
        """Complete every parked URB and task of one endpoint with ``status``."""
        for urb in [u for u in self._waiting if u.ep == ep and u.direction == direction]:
            abort = self._waiting.pop(urb, None)
            if abort is not None:
                abort(urb, status)
        for urb, task in list(self._tasks.items()):
            if urb.ep == ep and urb.direction == direction:
                urb.complete(status, 0)
                task.cancel()

    def abort_all(self, status: int = ECONNRESET) -> None:
        """Complete every parked URB and task with ``status`` and let go of them all.

        Called on reset and when the importing client is gone (:meth:`close`): afterwards the
        device holds no URB, so nothing of the ended session (its callbacks, its buffers) stays
        reachable from the device.
        """
        while self._waiting:  # (an abort callback may park another URB)
            for urb in list(self._waiting):
                abort = self._waiting.pop(urb, None)
                if abort is not None:
                    abort(urb, status)
        for queue in self._queues:  # URBs a queue still holds (completed, or taken out of _waiting)
            queue.abort_all(status)
        for urb, task in list(self._tasks.items()):
            urb.complete(status, 0)
            task.cancel()

    def park(self, urb: Urb, abort: Callable[[Urb, int], None]) -> None:
        """Keep ``urb`` pending until the device completes it (after :meth:`unpark`).

        ``abort(urb, status)`` must complete it early: it is called on cancel (-ECONNRESET),
        halt (-EPIPE), when its endpoint leaves the active alternate setting (-ESHUTDOWN) or
        on reset. :class:`WaitQueue` is the FIFO flavour of this.
        """
        self._waiting[urb] = abort

    def unpark(self, urb: Urb) -> None:
        """``urb`` is no longer abortable through :meth:`park` (the device completes it now)."""
        self._waiting.pop(urb, None)

    @property
    def pending_count(self) -> int:
        """URBs parked or running as tasks."""
        return len(self._waiting) + len(self._tasks)

    def _rebuild(self) -> None:
        """Recompute the active endpoints and the dispatch table."""
        old = set(self._active)
        active: dict[tuple[int, int], Endpoint] = {}
        config = self._config
        if config is not None:
            for num in config.interface_numbers():
                intf = config.find(num, self._alts.get(num, 0))
                if intf is not None:
                    for e in intf.endpoints:
                        active[e.key] = e
        self._active = active
        self._halted &= set(active)
        table: list[Callable[[Urb], None]] = [no_endpoint] * 32
        table[0] = table[16] = self._control
        for key in active:
            ep, d = key
            if key in self._halted:
                table[ep | (d << 4)] = stall
            else:
                table[ep | (d << 4)] = self._handlers.get(key, no_endpoint)
        self._dispatch[:] = table
        for ep, d in old - set(active):
            self.abort_endpoint(ep, d, ESHUTDOWN)

    # ------------------------------------------------------------ async handlers
    def _async_runner(self, fn: Callable[[Urb], Any]) -> Callable[[Urb], None]:
        def start(urb: Urb) -> None:
            task = asyncio.get_running_loop().create_task(fn(urb))
            self._tasks[urb] = task
            task.add_done_callback(lambda t: self._task_done(urb, t))

        return start

    def _task_done(self, urb: Urb, task: asyncio.Task[Any]) -> None:
        self._tasks.pop(urb, None)
        if urb.done:
            return
        if task.cancelled():
            urb.complete(ECONNRESET, 0)
            return
        exc = task.exception()
        if exc is None:
            result = task.result()
            urb.complete(0, result if isinstance(result, int) else 0)
        elif isinstance(exc, UsbError):
            urb.complete(exc.status, exc.actual_length)
        else:
            log.error("device %s: handler for %r failed", self.busid, urb, exc_info=exc)
            urb.complete(EPROTO, 0)

    # ------------------------------------------------------------ endpoint 0
    @staticmethod
    def reply(urb: Urb, data: bytes | bytearray | memoryview, length: int | None = None) -> None:
        """Complete a control IN URB with ``data`` truncated to wLength and the buffer."""
        n = min(len(data), urb.transfer_buffer_length)
        if length is not None:
            n = min(n, length)
        if n:
            memoryview(urb.buffer)[:n] = memoryview(data)[:n]
        complete_in(urb, n)  # short + URB_SHORT_NOT_OK: -EREMOTEIO (usbtest's control cases 10, 13, 14)

    def _control(self, urb: Urb) -> None:
        setup = urb.setup
        if type(setup) is bytes:
            cached = self._replies.get(setup)
            if cached is not None:
                self.reply(urb, cached)
                return
        try:
            rt, req, value, index, length = _SETUP.unpack_from(urb.setup)
        except struct.error:
            urb.complete(EPIPE, 0)
            return
        result: Any = None
        if rt & TYPE_MASK == TYPE_STANDARD:
            result = self._standard(urb, rt, req, value, index, length)
            if result is NotImplemented:
                result = self.control_request(urb, rt, req, value, index, length)
        else:
            result = self.control_request(urb, rt, req, value, index, length)
        if urb.done or result is DEFERRED:
            return
        if result is None or result is False:
            urb.complete(EPIPE, 0)
        elif rt & DIR_IN:
            if result is True:
                result = b""
            self.reply(urb, result, length)
        else:
            urb.complete(0, min(length, urb.transfer_buffer_length))

    def _standard(self, urb: Urb, rt: int, req: int, value: int, index: int, length: int) -> Any:
        recip = rt & RECIP_MASK
        if req == GET_DESCRIPTOR and rt & DIR_IN:
            if recip == RECIP_DEVICE:
                desc = self._get_descriptor(value >> 8, value & 0xFF, index)
                if desc is not None and type(urb.setup) is bytes and self._caches_descriptors():
                    self._replies[urb.setup] = bytes(desc[:length])
                return desc
            if recip == RECIP_INTERFACE:
                return self.interface_descriptor(index & 0xFF, value >> 8, value & 0xFF)
            return None
        if req == GET_STATUS and rt & DIR_IN:
            if recip == RECIP_DEVICE:
                cfg = self._config or (self.configurations[0] if self.configurations else None)
                self_powered = bool(cfg and cfg.attributes & 0x40)
                return struct.pack("<H", int(self_powered) | (int(self.remote_wakeup) << 1))
            if recip == RECIP_INTERFACE:
                return b"\0\0" if self._has_interface(index & 0xFF) else None
            if recip == RECIP_ENDPOINT:
                if index & 0x7F == 0:
                    return b"\0\0"  # endpoint 0 never stays halted
                key = self._ep_key(index)
                if key is None:
                    return None
                return b"\1\0" if key in self._halted else b"\0\0"
            return None
        if rt & DIR_IN:
            if req == GET_CONFIGURATION and recip == RECIP_DEVICE:
                return bytes((self.configuration_value,))
            if req == GET_INTERFACE and recip == RECIP_INTERFACE:
                num = index & 0xFF
                return bytes((self._alts.get(num, 0),)) if self._has_interface(num) else None
            return NotImplemented
        # standard OUT requests
        if req in (CLEAR_FEATURE, SET_FEATURE):
            if recip == RECIP_ENDPOINT:
                if index & 0x7F == 0 and value == FEATURE_ENDPOINT_HALT:
                    return True  # endpoint 0: a protocol stall clears itself
                key = self._ep_key(index)
                if key is None or value != FEATURE_ENDPOINT_HALT:
                    return None
                if req == SET_FEATURE:
                    self.halt(*key)
                else:
                    self.clear_halt(*key)
                    self.on_clear_halt(*key)
                return True
            if recip == RECIP_DEVICE:
                if value == FEATURE_REMOTE_WAKEUP:
                    self.remote_wakeup = req == SET_FEATURE
                    return True
                return value in (2, 48, 49, 50)  # TEST_MODE, U1/U2 enable, LTM enable
            if recip == RECIP_INTERFACE:
                return self._has_interface(index & 0xFF) and value == 0  # FUNCTION_SUSPEND
            return None
        if req == SET_ADDRESS and recip == RECIP_DEVICE:
            if value > 127:
                return None
            self.address = value
            return True
        if req == SET_CONFIGURATION and recip == RECIP_DEVICE:
            return self._set_configuration(value & 0xFF)
        if req == SET_INTERFACE and recip == RECIP_INTERFACE:
            return self._set_interface(index & 0xFF, value)
        if req in (SET_SEL, SET_ISOCH_DELAY) and recip == RECIP_DEVICE:
            return self.speed >= Speed.SUPER
        return NotImplemented

    def _caches_descriptors(self) -> bool:
        """Whether GET_DESCRIPTOR replies may be cached: the class answers them the base class's way."""
        cls = type(self)
        return cls._standard is VirtualDevice._standard and cls._get_descriptor is VirtualDevice._get_descriptor

    def _has_interface(self, number: int) -> bool:
        return self._config is not None and number in self._config.interface_numbers()

    def _ep_key(self, index: int) -> tuple[int, int] | None:
        key = (index & 0x0F, 1 if index & 0x80 else 0)
        if key[0] == 0:
            return None
        return key if key in self._active else None

    def _get_descriptor(self, dtype: int, idx: int, lang: int) -> bytes | None:
        if dtype == DT_DEVICE:
            return self._dev_desc
        if dtype == DT_CONFIG:
            return self._config_descs[idx] if idx < len(self._config_descs) else None
        if dtype == DT_STRING:
            if idx == 0:
                return bytes((4, DT_STRING)) + struct.pack("<H", 0x0409)
            if idx <= len(self._strings):
                return string_descriptor(self._strings[idx - 1])
            return None
        if dtype == DT_BOS:
            return self._bos or None
        if dtype == DT_DEVICE_QUALIFIER and self.speed == Speed.HIGH:
            d = self._dev_desc
            return bytes((10, DT_DEVICE_QUALIFIER)) + d[2:8] + bytes((d[17], 0))
        if dtype == DT_OTHER_SPEED_CONFIG and self.speed == Speed.HIGH:
            return self._other_speed[idx] if idx < len(self._other_speed) else None
        return None

    def _set_configuration(self, value: int) -> bool:
        if value == 0:
            self._config = None
        else:
            for c in self.configurations:
                if c.value == value:
                    self._config = c
                    break
            else:
                return False
        self._alts = {n: 0 for n in self._config.interface_numbers()} if self._config else {}
        self._halted.clear()
        self._rebuild()
        self.on_configure(value)
        return True

    def _set_interface(self, number: int, alternate: int) -> bool:
        config = self._config
        if config is None or config.find(number, alternate) is None:
            return False
        old = config.find(number, self._alts.get(number, 0))
        self._alts[number] = alternate
        if old is not None:
            for e in old.endpoints:  # SET_INTERFACE resets the interface's endpoints
                self._halted.discard(e.key)
        for e in config.find(number, alternate).endpoints:  # type: ignore[union-attr]
            self._halted.discard(e.key)
        self._rebuild()
        self.on_set_interface(number, alternate)
        return True

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.busid} {self.vendor_id:04x}:{self.product_id:04x}>"
