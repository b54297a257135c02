"""The PyUSB backend: ``usb.backend.IBackend`` over the asyncio USB/IP client.

Every backend object owns an event loop in a daemon thread; each IBackend call runs a coroutine
of the client there and waits for it (bounded: a transfer's own timeout plus the unlink's, an op
request's timeout). Errors reach the program as PyUSB's, with libusb's codes (``_errors``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import itertools
import logging
import re
import ssl
import struct
import threading
import time
import weakref
from array import array
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import usb.backend
import usb.core

from ..cancelsafe import wait_for
from ..client.connection import Connection
from ..client.errors import Disconnected, UsbipError
from ..client.remote import UNLINK_TIMEOUT, PendingUrb, RemoteDevice, UrbResult
from ..protocol.constants import USBIP_PORT
from ..protocol.records import DeviceRecord
from ._descriptors import (
    ConfigDesc,
    Descriptor,
    EndpointDesc,
    InterfaceDesc,
    config_from_record,
    device_desc,
    find_endpoint,
    max_iso_packet_size,
    parse_config,
    urb_interval,
)
from ._errors import (
    LIBUSB_ERROR_BUSY,
    LIBUSB_ERROR_INVALID_PARAM,
    LIBUSB_ERROR_NO_DEVICE,
    LIBUSB_ERROR_NOT_FOUND,
    LIBUSB_ERROR_OTHER,
    LIBUSB_ERROR_TIMEOUT,
    error_code,
    status_code,
    usb_error,
)
from ._loop import LoopGone, LoopThread, settle

log = logging.getLogger("usbip.pyusb")

T = TypeVar("T")

MAX_ISO_PACKETS = 1024  # what a USB/IP peer accepts in one URB (USBIP_MAX_ISO_PACKETS)
PROBE_RETRY = 10.0  # seconds before a device whose descriptors could not be read is probed again
CLOSE_TIMEOUT = 10.0
_backend_ids = itertools.count(1)
_SERVER = re.compile(r"^\[(?P<v6>[^\]]+)\](?::(?P<v6port>\d+))?$|^(?P<host>[^:]*)(?::(?P<port>\d+))?$")

Server = str | tuple[str, int]


def parse_server(spec: Server) -> tuple[str, int]:
    """``"host"``, ``"host:port"``, ``"[v6addr]:port"``, a bare IPv6 address or ``(host, port)``."""
    if isinstance(spec, tuple):
        host, port = spec
        return str(host), int(port)
    text = spec.strip()
    if text.count(":") > 1 and not text.startswith("["):
        return text, USBIP_PORT  # a bare IPv6 address
    m = _SERVER.match(text)
    if m is None or not (m.group("v6") or m.group("host")):
        raise ValueError(f"bad USB/IP server {spec!r}: expected host, host:port or [v6addr]:port")
    host = m.group("v6") or m.group("host")
    digits = m.group("v6port") or m.group("port")
    return host, int(digits) if digits else USBIP_PORT


class _Server:
    def __init__(self, index: int, host: str, port: int, conn: Connection) -> None:
        self.index = index
        self.host = host
        self.port = port
        self.conn = conn

    def __repr__(self) -> str:
        return f"{self.host}:{self.port}"


class DeviceId:
    """One exported device of one server: what :meth:`UsbipBackend.enumerate_devices` yields
    (PyUSB keeps it as ``device._ctx.dev``)."""

    __slots__ = ("key", "record", "server")

    def __init__(self, server: _Server, record: DeviceRecord) -> None:
        self.server = server
        self.record = record
        r = record
        self.key = (server.index, r.busid, r.busnum, r.devnum, r.idVendor, r.idProduct, r.bcdDevice)

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def busid(self) -> str:
        return self.record.busid

    @property
    def bus(self) -> int:
        """PyUSB's ``Device.bus``: the server's bus number, plus ``server index << 16`` past the
        first server, so devices of two servers never compare equal."""
        return (self.server.index << 16) | self.record.busnum

    def __repr__(self) -> str:
        r = self.record
        return f"<DeviceId {self.server}/{r.busid} {r.idVendor:04x}:{r.idProduct:04x}>"


class _Descriptors:
    __slots__ = ("configs", "device", "from_device", "when")

    def __init__(self, device: bytes | None, configs: list[ConfigDesc], from_device: bool) -> None:
        self.device = device
        self.configs = configs
        self.from_device = from_device
        self.when = time.monotonic()


class _Import:
    """One OP_REQ_IMPORT, shared by every handle open on the device."""

    def __init__(self, dev: DeviceId, remote: RemoteDevice) -> None:
        self.dev = dev
        self.remote = remote
        self.refs = 0
        self.claims: dict[int, Handle] = {}
        self.alts: dict[int, int] = {}
        self.endpoints: dict[int, EndpointDesc | None] = {}  # by address, for the current settings


class Handle:
    """What :meth:`UsbipBackend.open_device` returns (PyUSB's ``device._ctx.handle``)."""

    __slots__ = ("claimed", "closed", "dev", "imp")

    def __init__(self, dev: DeviceId, imp: _Import) -> None:
        self.dev = dev
        self.imp = imp
        self.closed = False
        self.claimed: set[int] = set()

    @property
    def remote(self) -> RemoteDevice:
        """The client's :class:`~usbip.client.RemoteDevice` (its loop is the backend's)."""
        return self.imp.remote

    def __repr__(self) -> str:
        return f"<Handle {self.dev!r}{' closed' if self.closed else ''}>"


async def _read_descriptors(rd: RemoteDevice) -> tuple[bytes, list[bytes]]:
    """The device descriptor and every configuration descriptor, by GET_DESCRIPTOR."""
    raw = await rd.get_descriptor(1, 0, 18)
    if len(raw) < 18 or raw[1] != 1:
        raise ValueError(f"{rd.busid}: device descriptor {raw.hex()} is not one")
    configs = []
    for index in range(raw[17]):
        head = await rd.get_descriptor(2, index, 9)
        if len(head) < 9 or head[1] != 2:
            raise ValueError(f"{rd.busid}: configuration {index}: header {head.hex()} is not one")
        total = struct.unpack_from("<H", head, 2)[0]
        configs.append(await rd.get_descriptor(2, index, max(total, 9)) if total > 9 else head)
    return raw, configs


class _UrbCall:
    """One URB of a PyUSB call: submitted from a loop callback, its completion handed straight to
    the waiting thread (no task: a coroutine per call costs more than the loopback round trip).

    The timeout is the client's: it unlinks the URB, which then completes with -ECONNRESET (or
    with its real result, if that crossed the unlink); a server that does not answer the unlink
    within UNLINK_TIMEOUT ends the wait anyway.
    """

    __slots__ = ("fut", "kwargs", "loop", "rd", "timed_out", "timeout", "timers", "urb")

    def __init__(self, rd: RemoteDevice, timeout: float | None, **kwargs: Any) -> None:
        self.rd = rd
        self.loop = rd.loop
        self.timeout = timeout
        self.kwargs = kwargs
        self.timed_out = False
        self.timers: list[asyncio.TimerHandle] = []
        self.urb: PendingUrb | None = None
        self.fut: concurrent.futures.Future[tuple[UrbResult, bool]] | None = None

    # on the loop
    def start(self, fut: concurrent.futures.Future[tuple[UrbResult, bool]]) -> None:
        self.fut = fut
        if fut.done():  # the waiter gave up before the loop got here
            return
        self.urb = urb = self.rd.submit(**self.kwargs)
        urb.future.add_done_callback(self._done)
        if self.timeout is not None:
            self.timers.append(self.loop.call_later(self.timeout, self._expire))

    def _done(self, f: asyncio.Future[UrbResult]) -> None:
        self._stop_timers()
        assert self.fut is not None
        exc = None if f.cancelled() else f.exception()
        if f.cancelled() or exc is not None:
            settle(self.fut, exc=exc or Disconnected(f"{self.rd.busid}: URB cancelled"))
            return
        res = f.result()
        settle(self.fut, (res, self.timed_out and res.status in (-errno.ECONNRESET, -errno.ENOENT)))

    def _expire(self) -> None:
        if self.urb is None or self.urb.future.done():
            return
        self.timed_out = True
        self.urb.cancel()  # CMD_UNLINK
        self.timers.append(self.loop.call_later(UNLINK_TIMEOUT, self._give_up))

    def _give_up(self) -> None:
        assert self.fut is not None
        if settle(self.fut, (UrbResult(-errno.ECONNRESET, 0, None), True)):
            log.warning("%s: no answer to the unlink of a timed-out URB", self.rd.busid)

    def _stop_timers(self) -> None:
        for t in self.timers:
            t.cancel()
        self.timers.clear()

    def _cancel_in_loop(self) -> None:
        self._stop_timers()
        if self.urb is not None and not self.urb.future.done():
            self.urb.cancel()

    # from the waiting thread, when its wait ends early (interrupted): ``fut`` is the one given
    # to start(), which may not have run yet (then it submits nothing)
    def cancel(self, fut: concurrent.futures.Future[tuple[UrbResult, bool]]) -> None:
        fut.cancel()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to cancel
            self.loop.call_soon_threadsafe(self._cancel_in_loop)


def _seconds(timeout_ms: int | float | None) -> float | None:
    """PyUSB/libusb timeouts are milliseconds, 0 (or less) for none."""
    if timeout_ms is None or timeout_ms <= 0:
        return None
    return timeout_ms / 1000.0


class _State:
    """What the backend's finalizer needs: the imports, and whether it ran."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.imports: dict[tuple[Any, ...], _Import] = {}
        self.closed = False


def _shutdown(state: _State, loop: LoopThread, servers: list[_Server]) -> None:
    """End every import, close the connections, stop the loop (bounded)."""
    with state.lock:
        if state.closed:
            return
        state.closed = True
        imports = list(state.imports.values())
        state.imports.clear()

    async def cleanup() -> None:
        for imp in imports:
            try:
                await wait_for(imp.remote.close(), CLOSE_TIMEOUT)
            except Exception as exc:
                log.debug("%s: close: %s", imp.dev.busid, exc)
        for srv in servers:
            await srv.conn.close()

    loop.stop(cleanup(), CLOSE_TIMEOUT)
    log.debug("backend for %s closed", ", ".join(map(repr, servers)))


class UsbipBackend(usb.backend.IBackend):
    """A PyUSB backend whose devices are the devices exported by one or more USB/IP servers.

    * ``enumerate_devices`` lists every server (OP_REQ_DEVLIST, concurrently); with ``probe``
      (the default) each device not seen before is imported briefly to read its device and
      configuration descriptors (cached per device; the server resets a device when an import
      ends, as on every detach). A device that cannot be imported (in use elsewhere), or every
      device with ``probe=False``, is described from the device list alone (no string indexes,
      configurations without endpoints) until it is opened. A server that does not answer is
      skipped with a warning; when none answers, the error is raised.
    * ``open_device`` imports the device (OP_REQ_IMPORT) and reads its descriptors; with
      ``configure`` an unconfigured device (the kernel's usbip-host exports them so) gets its
      first configuration, as the local kernel would have chosen one. Handles open on one
      device share the import; ``close_device`` of the last ends it.
    * Interfaces are claimed and released as bookkeeping (no kernel driver to detach here:
      ``is_kernel_driver_active`` is False, detach/attach do nothing).
    * Transfers: timeouts in milliseconds, 0 for none. A timeout unlinks the URB and raises
      ``usb.core.USBTimeoutError`` (bulk and interrupt return what arrived, as libusb does,
      when some data did); a stall raises ``USBError`` with errno EPIPE; the device gone,
      ENODEV. ``iso_read`` / ``iso_write`` split the buffer into packets of the endpoint's
      maximum size (as PyUSB's libusb1 backend does) and return the bytes moved.
    * ``reset_device`` is a port reset (SET_FEATURE(PORT_RESET), which the server carries out).

    ``tls``: a client ``ssl.SSLContext`` (``usbip.net.tls.client_context``) for servers behind TLS;
    ``timeout``: seconds for each op request (list, import). :meth:`close` (or ``with``) stops
    the backend's thread; it is also closed when collected and at exit.
    """

    def __init__(
        self,
        servers: Iterable[Server] = ("localhost",),
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = 10.0,
        probe: bool = True,
        configure: bool = True,
    ) -> None:
        usb.backend.IBackend.__init__(self)
        addrs = [parse_server(s) for s in servers]
        if not addrs:
            raise ValueError("no USB/IP server given")
        self.timeout = timeout
        self.probe = probe
        self.configure = configure
        self._servers = [
            _Server(i, host, port, Connection(host, port, timeout, tls, server_hostname))
            for i, (host, port) in enumerate(addrs)
        ]
        self._op_wait = 3 * timeout + 30.0  # an import and its descriptor reads (5 s each at most)
        self._state = _State()
        self._lock = self._state.lock
        self._imports = self._state.imports
        self._open_lock = threading.Lock()
        self._descs: dict[tuple[Any, ...], _Descriptors] = {}
        self._loop = LoopThread(f"usbip-pyusb-{next(_backend_ids)}")
        # PyUSB's own finalizer does nothing for a backend collected in a reference cycle (its weak
        # reference is cleared first); this one holds what it needs, not the backend
        self._shutdown = weakref.finalize(self, _shutdown, self._state, self._loop, list(self._servers))
        log.debug("backend for %s started", ", ".join(map(repr, self._servers)))

    # ------------------------------------------------------------ plumbing
    @property
    def servers(self) -> list[tuple[str, int]]:
        return [(s.host, s.port) for s in self._servers]

    @property
    def closed(self) -> bool:
        return self._state.closed

    def __repr__(self) -> str:
        return f"<UsbipBackend {', '.join(map(repr, self._servers))}{' closed' if self._state.closed else ''}>"

    def __enter__(self) -> UsbipBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T], wait: float | None) -> T:
        """Run ``coro`` on the backend's loop; its errors become PyUSB's."""
        with self._errors():
            return self._loop.call(coro, wait)
        raise AssertionError("unreachable")  # pragma: no cover - _errors() re-raises

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Errors of the client (and of the loop) as PyUSB's; anything else passes unchanged."""
        try:
            yield
        except usb.core.USBError:
            raise
        except LoopGone as exc:
            raise usb_error(LIBUSB_ERROR_NO_DEVICE) from exc
        except (concurrent.futures.TimeoutError, asyncio.TimeoutError) as exc:
            raise usb_error(LIBUSB_ERROR_TIMEOUT) from exc
        except concurrent.futures.CancelledError as exc:  # the backend closed under the call
            raise usb_error(LIBUSB_ERROR_NO_DEVICE) from exc
        except Exception as exc:
            code = error_code(exc)
            if code == LIBUSB_ERROR_OTHER:
                raise
            log.debug("%s -> libusb error %d", exc, code)
            raise usb_error(code) from exc

    def close(self) -> None:
        """End every import and stop the backend's thread (bounded; idempotent)."""
        self._shutdown()

    def _finalize_object(self) -> None:  # PyUSB's finalizer; self._shutdown also covers reference cycles
        self.close()

    # ------------------------------------------------------------ enumeration and descriptors
    def enumerate_devices(self) -> list[DeviceId]:
        results = self._run(self._list_all(), self._op_wait)
        found: list[DeviceId] = []
        failures: list[BaseException] = []
        for srv, res in zip(self._servers, results, strict=True):
            if isinstance(res, BaseException):
                log.warning("USB/IP server %s: %s", srv, str(res) or type(res).__name__)
                failures.append(res)
                continue
            ids = [DeviceId(srv, rec) for rec in res]
            found += ids
            keep = {d.key for d in ids}
            with self._lock:  # forget the descriptors of devices the server no longer exports
                for key in [k for k in self._descs if k[0] == srv.index and k not in keep]:
                    del self._descs[key]
        if failures and len(failures) == len(self._servers):
            exc = failures[0]
            code = error_code(exc)
            raise usb_error(code if code != LIBUSB_ERROR_OTHER else LIBUSB_ERROR_NO_DEVICE) from exc
        if self.probe:
            todo = [d for d in found if self._needs_probe(d)]
            if todo:
                for dev, got in zip(todo, self._run(self._probe_all(todo), self._op_wait), strict=True):
                    self._store_probe(dev, got)
        return found

    async def _list_all(self) -> list[list[DeviceRecord] | BaseException]:
        return await asyncio.gather(*(s.conn.list_devices() for s in self._servers), return_exceptions=True)

    def _needs_probe(self, dev: DeviceId) -> bool:
        with self._lock:
            d = self._descs.get(dev.key)
        return d is None or (not d.from_device and time.monotonic() - d.when >= PROBE_RETRY)

    async def _probe(self, dev: DeviceId) -> tuple[bytes, list[bytes]]:
        with self._lock:
            imp = self._imports.get(dev.key)
        if imp is not None and not imp.remote.closed:
            return await _read_descriptors(imp.remote)
        rd = await dev.server.conn.import_device(dev.busid, read_descriptors=False, configure=False)
        try:
            return await _read_descriptors(rd)
        finally:
            await rd.close()

    async def _probe_all(self, devs: list[DeviceId]) -> list[tuple[bytes, list[bytes]] | BaseException]:
        return await asyncio.gather(*(self._probe(d) for d in devs), return_exceptions=True)

    def _store_probe(self, dev: DeviceId, got: tuple[bytes, list[bytes]] | BaseException) -> _Descriptors:
        if isinstance(got, BaseException):
            why = str(got) or type(got).__name__
            log.info("%s/%s: descriptors from the device list only (%s)", dev.server, dev.busid, why)
            entry = _Descriptors(None, [config_from_record(dev.record)], False)
        else:
            entry = self._parsed(dev, *got)
        with self._lock:
            self._descs[dev.key] = entry
        return entry

    def _parsed(self, dev: DeviceId, raw: bytes, blobs: list[bytes]) -> _Descriptors:
        configs = []
        for blob in blobs:
            try:
                configs.append(parse_config(blob))
            except ValueError as exc:
                log.warning("%s/%s: %s", dev.server, dev.busid, exc)
        return _Descriptors(raw, configs, True)

    def _descriptors(self, dev: DeviceId) -> _Descriptors:
        with self._lock:
            d = self._descs.get(dev.key)
        if d is not None and (d.from_device or not self.probe or not self._needs_probe(dev)):
            return d
        if not self.probe:
            d = _Descriptors(None, [config_from_record(dev.record)], False)
            with self._lock:
                self._descs[dev.key] = d
            return d
        try:
            got: tuple[bytes, list[bytes]] | BaseException = self._run(self._probe(dev), self._op_wait)
        except usb.core.USBError as exc:
            got = exc
        return self._store_probe(dev, got)

    def get_parent(self, dev: DeviceId) -> None:
        return None  # the hub the device hangs off is on the server

    def get_device_descriptor(self, dev: DeviceId) -> Descriptor:
        return device_desc(dev.record, self._descriptors(dev).device, dev.bus)

    def get_configuration_descriptor(self, dev: DeviceId, config: int) -> ConfigDesc:
        configs = self._descriptors(dev).configs
        if not 0 <= config < len(configs):
            raise usb_error(LIBUSB_ERROR_NOT_FOUND)
        return configs[config]

    def get_interface_descriptor(self, dev: DeviceId, intf: int, alt: int, config: int) -> InterfaceDesc:
        cfg = self.get_configuration_descriptor(dev, config)
        if not 0 <= intf < len(cfg.interface):
            raise IndexError(f"Invalid interface index {intf}")
        alts = cfg.interface[intf]
        if not 0 <= alt < len(alts):
            raise IndexError(f"Invalid alternate setting index {alt}")
        return alts[alt]

    def get_endpoint_descriptor(self, dev: DeviceId, ep: int, intf: int, alt: int, config: int) -> EndpointDesc:
        i = self.get_interface_descriptor(dev, intf, alt, config)
        if not 0 <= ep < len(i.endpoint):
            raise IndexError(f"Invalid endpoint index {ep}")
        return i.endpoint[ep]

    # ------------------------------------------------------------ open / close
    def open_device(self, dev: DeviceId) -> Handle:
        with self._open_lock:
            if self._state.closed:
                raise usb_error(LIBUSB_ERROR_NO_DEVICE)
            with self._lock:
                imp = self._imports.get(dev.key)
            if imp is None or imp.remote.closed:
                imp, got = self._run(self._import(dev), self._op_wait)
                if got is not None:
                    with self._lock:
                        self._descs[dev.key] = self._parsed(dev, *got)
                with self._lock:
                    self._imports[dev.key] = imp
                log.debug("%s/%s imported", dev.server, dev.busid)
            with self._lock:
                imp.refs += 1
            return Handle(dev, imp)

    async def _import(self, dev: DeviceId) -> tuple[_Import, tuple[bytes, list[bytes]] | None]:
        rd = await dev.server.conn.import_device(dev.busid, read_descriptors=False, configure=False)
        try:
            got: tuple[bytes, list[bytes]] | None
            try:
                got = await _read_descriptors(rd)
            except (UsbipError, ValueError) as exc:
                if rd.closed:
                    raise
                log.warning("%s/%s: cannot read its descriptors: %s", dev.server, dev.busid, exc)
                got = None
            if self.configure and rd.record.bConfigurationValue == 0 and got is not None and got[1]:
                value = got[1][0][5]
                log.debug("%s/%s: unconfigured, setting configuration %d", dev.server, dev.busid, value)
                await rd.set_configuration(value)
        except BaseException:
            await rd.close()
            raise
        return _Import(dev, rd), got

    def close_device(self, dev_handle: Handle) -> None:
        if dev_handle.closed:
            return
        dev_handle.closed = True
        imp = dev_handle.imp
        with self._lock:
            for intf in dev_handle.claimed:
                if imp.claims.get(intf) is dev_handle:
                    del imp.claims[intf]
            dev_handle.claimed.clear()
            imp.refs -= 1
            last = imp.refs <= 0
            if last and self._imports.get(imp.dev.key) is imp:
                del self._imports[imp.dev.key]
        if last and not self._state.closed:
            if self._loop.in_loop_thread():  # a Device collected by the loop thread: no waiting there
                self._loop.loop.create_task(imp.remote.close())
                return
            try:
                self._run(imp.remote.close(), CLOSE_TIMEOUT)
            except usb.core.USBError as exc:
                log.debug("%s: close: %s", imp.dev.busid, exc)
            log.debug("%s/%s: import closed", imp.dev.server, imp.dev.busid)

    def _remote(self, h: Handle) -> RemoteDevice:
        if h.closed:
            raise usb_error(LIBUSB_ERROR_NO_DEVICE)
        return h.imp.remote

    # ------------------------------------------------------------ configuration and interfaces
    def set_configuration(self, dev_handle: Handle, config_value: int) -> None:
        rd = self._remote(dev_handle)
        self._run(rd.set_configuration(config_value), self._op_wait)
        with self._lock:
            dev_handle.imp.alts.clear()
            dev_handle.imp.endpoints.clear()

    def get_configuration(self, dev_handle: Handle) -> int:
        rd = self._remote(dev_handle)
        try:
            got = self._run(rd.control_transfer(0x80, 8, 0, 0, 1), self._op_wait)
        except usb.core.USBError as exc:
            if exc.errno != errno.EPIPE:
                raise
            return rd.configuration  # a device that stalls GET_CONFIGURATION: what we last set
        if len(got) != 1:
            return rd.configuration
        rd.configuration = got[0]
        return got[0]

    def set_interface_altsetting(self, dev_handle: Handle, intf: int, altsetting: int) -> None:
        rd = self._remote(dev_handle)
        self._run(rd.set_interface(intf, altsetting), self._op_wait)
        with self._lock:
            dev_handle.imp.alts[intf] = altsetting
            dev_handle.imp.endpoints.clear()

    def _active_interfaces(self, h: Handle) -> set[int] | None:
        with self._lock:
            d = self._descs.get(h.dev.key)
        if d is None or not d.from_device:
            return None
        value = h.imp.remote.configuration
        for cfg in d.configs:
            if cfg.bConfigurationValue == value:
                return {alts[0].bInterfaceNumber for alts in cfg.interface}
        return None

    def claim_interface(self, dev_handle: Handle, intf: int) -> None:
        self._remote(dev_handle)
        known = self._active_interfaces(dev_handle)
        if known is not None and intf not in known:
            raise usb_error(LIBUSB_ERROR_NOT_FOUND)
        with self._lock:
            owner = dev_handle.imp.claims.get(intf)
            if owner is not None and owner is not dev_handle:
                raise usb_error(LIBUSB_ERROR_BUSY)
            dev_handle.imp.claims[intf] = dev_handle
            dev_handle.claimed.add(intf)

    def release_interface(self, dev_handle: Handle, intf: int) -> None:
        with self._lock:
            if intf not in dev_handle.claimed:
                raise usb_error(LIBUSB_ERROR_NOT_FOUND)
            dev_handle.claimed.discard(intf)
            if dev_handle.imp.claims.get(intf) is dev_handle:
                del dev_handle.imp.claims[intf]

    def is_kernel_driver_active(self, dev_handle: Handle, intf: int) -> bool:
        return False  # no driver here; on the server the device belongs to the USB/IP stub

    def detach_kernel_driver(self, dev_handle: Handle, intf: int) -> None:
        log.debug("detach_kernel_driver(%d): no kernel driver on an imported device", intf)

    def attach_kernel_driver(self, dev_handle: Handle, intf: int) -> None:
        log.debug("attach_kernel_driver(%d): no kernel driver on an imported device", intf)

    # ------------------------------------------------------------ transfers
    def _endpoint(self, h: Handle, address: int) -> EndpointDesc | None:
        imp = h.imp
        with self._lock:
            if address in imp.endpoints:
                return imp.endpoints[address]
            d = self._descs.get(h.dev.key)
            ep = find_endpoint(d.configs, imp.remote.configuration, imp.alts, address) if d else None
            imp.endpoints[address] = ep
            return ep

    def _urb(
        self,
        h: Handle,
        endpoint: int,
        data_or_length: bytes | int,
        timeout_ms: int | float | None,
        setup: bytes = bytes(8),
        iso_packets: Sequence[int] | None = None,
        interval: int = 0,
        partial: bool = False,
    ) -> UrbResult:
        """One URB, waited for; a failure or a timeout raises as libusb reports it. With ``partial``
        a timed-out URB that moved data returns it (libusb's bulk and interrupt transfers do)."""
        rd = self._remote(h)
        timeout = _seconds(timeout_ms)
        wait = None if timeout is None else timeout + UNLINK_TIMEOUT + 5.0
        call = _UrbCall(
            rd,
            timeout,
            endpoint=endpoint,
            data_or_length=data_or_length,
            setup=setup,
            iso_packets=iso_packets,
            interval=interval,
        )
        with self._errors():
            fut: concurrent.futures.Future[tuple[UrbResult, bool]] = concurrent.futures.Future()
            try:
                self._loop.call_soon(call.start, fut)
                res, timed_out = self._loop.wait(fut, wait, lambda: call.cancel(fut))
            except BaseException:
                # an interrupt between scheduling and the wait (wait() cancels the rest itself):
                # the URB must not stay in flight with nobody waiting for it
                if not fut.done():
                    call.cancel(fut)
                raise
        if timed_out:
            if partial and res.actual_length > 0:
                return res
            raise usb_error(LIBUSB_ERROR_TIMEOUT)
        if res.status != 0:
            raise usb_error(status_code(res.status))
        return res

    @staticmethod
    def _copy_in(res: UrbResult, buff: array[Any], n: int) -> None:
        if n and res.data is not None:
            with memoryview(buff) as raw, raw.cast("B") as mv, memoryview(res.data) as src:
                k = min(n, len(mv), src.nbytes)
                mv[:k] = src.cast("B")[:k] if src.format != "B" else src[:k]

    def _write(self, h: Handle, ep: int, data: array[Any], timeout: int, interval: int = 0) -> int:
        res = self._urb(h, ep, data.tobytes(), timeout, interval=interval, partial=True)
        return res.actual_length

    def _read(self, h: Handle, ep: int, buff: array[Any], timeout: int, interval: int = 0) -> int:
        res = self._urb(h, ep, len(buff) * buff.itemsize, timeout, interval=interval, partial=True)
        self._copy_in(res, buff, res.actual_length)
        return res.actual_length

    def bulk_write(self, dev_handle: Handle, ep: int, intf: int, data: array[Any], timeout: int) -> int:
        return self._write(dev_handle, ep, data, timeout)

    def bulk_read(self, dev_handle: Handle, ep: int, intf: int, buff: array[Any], timeout: int) -> int:
        return self._read(dev_handle, ep, buff, timeout)

    def _interval(self, h: Handle, ep: int) -> int:
        return urb_interval(self._endpoint(h, ep), h.imp.remote.speed)

    def intr_write(self, dev_handle: Handle, ep: int, intf: int, data: array[Any], timeout: int) -> int:
        return self._write(dev_handle, ep, data, timeout, self._interval(dev_handle, ep))

    def intr_read(self, dev_handle: Handle, ep: int, intf: int, buff: array[Any], timeout: int) -> int:
        return self._read(dev_handle, ep, buff, timeout, self._interval(dev_handle, ep))

    def _iso_packets(self, h: Handle, ep: int, length: int) -> tuple[list[int], int]:
        desc = self._endpoint(h, ep)
        if desc is None:
            raise usb_error(LIBUSB_ERROR_NOT_FOUND)
        size = max_iso_packet_size(desc, h.imp.remote.speed)
        if size <= 0:
            raise usb_error(LIBUSB_ERROR_INVALID_PARAM)
        count = -(-length // size)
        if count > MAX_ISO_PACKETS:
            log.warning("%d iso packets in one transfer: USB/IP carries at most %d", count, MAX_ISO_PACKETS)
            raise usb_error(LIBUSB_ERROR_INVALID_PARAM)
        sizes = [size] * count
        if count and length % size:
            sizes[-1] = length % size
        return sizes, urb_interval(desc, h.imp.remote.speed)

    @staticmethod
    def _iso_moved(res: UrbResult) -> int:
        return sum(p[2] for p in res.iso.tolist()) if res.iso is not None else res.actual_length

    def iso_write(self, dev_handle: Handle, ep: int, intf: int, data: array[Any], timeout: int) -> int:
        payload = data.tobytes()
        sizes, interval = self._iso_packets(dev_handle, ep, len(payload))
        res = self._urb(dev_handle, ep, payload, timeout, iso_packets=sizes, interval=interval)
        return self._iso_moved(res)

    def iso_read(self, dev_handle: Handle, ep: int, intf: int, buff: array[Any], timeout: int) -> int:
        length = len(buff) * buff.itemsize
        sizes, interval = self._iso_packets(dev_handle, ep, length)
        res = self._urb(dev_handle, ep, length, timeout, iso_packets=sizes, interval=interval)
        # as libusb leaves them: each packet at its offset in the buffer, the total moved returned
        self._copy_in(res, buff, length)
        return self._iso_moved(res)

    def ctrl_transfer(
        self,
        dev_handle: Handle,
        bmRequestType: int,
        bRequest: int,
        wValue: int,
        wIndex: int,
        data: array[Any],
        timeout: int,
    ) -> int:
        length = len(data) * data.itemsize
        try:
            setup = struct.pack("<BBHHH", bmRequestType, bRequest, wValue, wIndex, length)
        except struct.error as exc:
            raise usb_error(LIBUSB_ERROR_INVALID_PARAM) from exc
        if bmRequestType & 0x80:
            res = self._urb(dev_handle, 0x80, length, timeout, setup)
            self._copy_in(res, data, res.actual_length)
        else:
            res = self._urb(dev_handle, 0x00, data.tobytes(), timeout, setup)
        return res.actual_length

    def clear_halt(self, dev_handle: Handle, ep: int) -> None:
        self._run(self._remote(dev_handle).clear_halt(ep), self._op_wait)

    def reset_device(self, dev_handle: Handle) -> None:
        """Port reset: SET_FEATURE(PORT_RESET) on the device's port, which the server's stub
        carries out (usbip-host's ``tweak_reset_device_cmd``; ours resets the virtual device)."""
        rd = self._remote(dev_handle)
        try:
            self._run(rd.control_transfer(0x23, 3, 4, 0, b""), self._op_wait)
        except usb.core.USBError as exc:
            # older kernels reset the device, then pass the request on to it, which stalls it
            if exc.errno != errno.EPIPE:
                raise
        with self._lock:
            dev_handle.imp.endpoints.clear()


def get_backend(
    *servers: Server | Iterable[Server],
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float = 10.0,
    probe: bool = True,
    configure: bool = True,
) -> UsbipBackend:
    """A PyUSB backend for the devices of ``servers`` (``"host"``, ``"host:port"``,
    ``"[v6addr]:port"`` or ``(host, port)``; several, or one list of them; ``localhost`` when
    none). Each call makes a new backend with a thread of its own: keep it, and :meth:`close` it
    (or use ``with``) when done. Options: see :class:`UsbipBackend`."""
    flat: list[Server] = []
    for s in servers:
        if isinstance(s, (str, tuple)):
            flat.append(s)
        else:
            flat.extend(s)
    return UsbipBackend(
        flat or ("localhost",),
        tls=tls,
        server_hostname=server_hostname,
        timeout=timeout,
        probe=probe,
        configure=configure,
    )


def location(device: Any) -> tuple[str, int, str]:
    """(host, port, busid) of a ``usb.core.Device`` found through this backend (or of a DeviceId)."""
    dev = getattr(getattr(device, "_ctx", None), "dev", device)
    if not isinstance(dev, DeviceId):
        raise TypeError(f"{device!r} was not found through a usbip.pyusb backend")
    return dev.host, dev.port, dev.busid


__all__ = ["DeviceId", "Handle", "UsbipBackend", "get_backend", "location", "parse_server"]
