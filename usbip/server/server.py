"""The asyncio USB/IP server: op phase (device list, import), then the URB phase per device."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..cancelsafe import cancel_and_wait
from ..net.netio import PeerClosed, PlainChannel, apply_dead_peer_timeout, set_nodelay
from ..net.stream import Stream
from ..net.tls import TlsChannel, TlsError
from ..pool import BufferPool
from ..protocol import Decoder, ProtocolError
from ..protocol.constants import (
    BUSID_SIZE,
    OP_HEADER_SIZE,
    OP_REQ_DEVLIST,
    OP_REQ_IMPORT,
    ST_OK,
    USBIP_PORT,
    OpStatus,
)
from ..protocol.records import pack_devlist_reply, pack_import_reply, unpack_import_busid, unpack_op_header
from ..usb.device import Device
from .access import AccessPolicy, Client
from .limits import ServerLimits
from .metrics import DeviceTotals, Import
from .registry import Registry
from .session import UrbSession

if TYPE_CHECKING:
    from ..capture import CaptureFile

log = logging.getLogger(__name__)

ACCEPT_ERROR_LOG_INTERVAL = 10.0  # seconds between two log lines about failing accepts
# accept() errors that mean "out of descriptors or memory": wait for connections to end
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class ThrottledLog:
    """Logs a recurring event at most once per ``interval`` seconds, counting what it left out:
    a flood of bad connections must not fill the disk."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self.logger = logger
        self.interval = interval
        self.suppressed = 0
        self._last = -interval

    def log(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self.suppressed += 1
            return
        if self.suppressed:
            msg += f" (and {self.suppressed} more like it in the last {now - self._last:.0f} s)"
        self.logger.log(level, msg, *args)
        self.suppressed = 0
        self._last = now


def _fmt_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Server:
    """Exports the devices of a :class:`Registry` over TCP.

    ``async with Server(...) as srv`` listens; ``srv.port`` is the bound port
    (pass ``port=0`` for an ephemeral one). ``stats()`` counts what is alive.
    ``limits`` bounds what each client may cost (memory, time, descriptors);
    ``access`` says who may connect and use which device; with ``tls`` (a server
    ``ssl.SSLContext``, see ``usbip.net.tls.server_context``) every connection is TLS.
    With ``capture`` (a :class:`usbip.capture.CaptureFile`, which the caller closes) every URB
    of every import is written to it.
    """

    def __init__(
        self,
        devices: Iterable[Device] = (),
        host: str | None = None,
        port: int = USBIP_PORT,
        family: int = socket.AF_UNSPEC,
        max_transfer: int | None = None,
        registry: Registry | None = None,
        limits: ServerLimits | None = None,
        access: AccessPolicy | None = None,
        tls: ssl.SSLContext | None = None,
        capture: CaptureFile | None = None,
    ) -> None:
        self.registry = registry or Registry()
        for dev in devices:  # devices given here are virtual: they get busids 100-1, 100-2, ...
            self.registry.add_virtual(dev)
        self.host = host
        self.port = port
        self.family = family
        limits = limits or ServerLimits()
        if max_transfer is not None:
            limits = dataclasses.replace(limits, max_transfer=max_transfer)
        self.limits = limits
        self.access = access or AccessPolicy()
        self.tls = tls
        self.capture = capture
        self.max_transfer = limits.max_transfer
        self.max_connections = limits.connections
        self.pool = BufferPool()
        self.sockets: list[socket.socket] = []
        self._accept_tasks: list[asyncio.Task[None]] = []
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self.sessions: set[UrbSession] = set()
        self.imports: dict[UrbSession, Import] = {}  # the live ones (usbip.server.metrics)
        self.device_totals: dict[str, DeviceTotals] = {}  # counters of the imports that ended
        self._closed = asyncio.Event()
        self.connections_total = 0
        self.connections_refused = 0
        self.protocol_errors = 0
        self._op_phase: Counter[str] = Counter()  # connections per address still in the op phase
        self._slot_free = asyncio.Event()
        self._accept_log = ThrottledLog(log, ACCEPT_ERROR_LOG_INTERVAL)
        self._refused_log = ThrottledLog(log, ACCEPT_ERROR_LOG_INTERVAL)

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self.host, self.port, family=self.family, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        seen = set()
        for fam, stype, proto, _canon, addr in infos:
            if (fam, addr) in seen:
                continue
            seen.add((fam, addr))
            sock = socket.socket(fam, stype, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if fam == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if self.sockets and self.port == 0:
                    addr = (addr[0], self.port, *addr[2:])
                sock.bind(addr)
                sock.listen(128)
                sock.setblocking(False)
            except OSError:
                sock.close()
                if len(infos) == 1:
                    raise
                log.warning("cannot listen on %s", addr[0])
                continue
            if self.port == 0:
                self.port = sock.getsockname()[1]
            self.sockets.append(sock)
        if not self.sockets:
            raise OSError(f"could not listen on any address for port {self.port}")
        for sock in self.sockets:
            self._accept_tasks.append(asyncio.create_task(self._accept_loop(sock)))
        log.info("listening on %s", ", ".join(_fmt_addr(s.getsockname()[0], self.port) for s in self.sockets))

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        for t in self._accept_tasks:
            t.cancel()
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        tasks = list(self._conn_tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in self._accept_tasks:
            await cancel_and_wait(t)
        self._accept_tasks.clear()
        for dev in self.registry.devices():
            try:
                dev.release()
            except Exception:
                log.exception("device %s failed to release", dev.busid)
        self._closed.set()

    def stats(self) -> dict[str, int]:
        return {
            "connections": len(self._conn_tasks),
            "sessions": len(self.sessions),
            "pending_urbs": sum(len(s.pending) for s in self.sessions),
            "busy_devices": self.registry.busy_count,
            "pool_outstanding": self.pool.outstanding,
            "protocol_errors": self.protocol_errors,
            "connections_refused": self.connections_refused,
            "held_bytes": sum(s.held_bytes for s in self.sessions),
        }

    # ------------------------------------------------------------ connections
    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while len(self._conn_tasks) >= self.max_connections:
                # at the cap: leave new connections in the listen backlog until one ends
                self._slot_free.clear()
                await self._slot_free.wait()
            try:
                conn, addr = await loop.sock_accept(lsock)
            except OSError as exc:
                self._accept_failed(exc)
                await asyncio.sleep(0.5 if exc.errno in _RESOURCE_ERRNOS else 0.05)
                continue
            self.connections_total += 1
            host = addr[0] if isinstance(addr, tuple) else str(addr)
            if not self.access.may_connect(host):
                self.connections_refused += 1
                self._refused_log.log(logging.WARNING, "%s: refused: not in an allowed network (--allow)", host)
                conn.close()
                continue
            if self._op_phase[host] >= self.limits.max_op_per_address:
                self.connections_refused += 1
                self._refused_log.log(
                    logging.WARNING,
                    "%s: refused: %d connections from this address are still in the op phase",
                    host,
                    self._op_phase[host],
                )
                conn.close()
                continue
            self._op_phase[host] += 1
            task = asyncio.create_task(self._handle(conn, addr, host))
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_done)

    def _conn_done(self, task: asyncio.Task[None]) -> None:
        self._conn_tasks.discard(task)
        self._slot_free.set()

    def _leave_op_phase(self, host: str) -> None:
        n = self._op_phase[host] - 1
        if n > 0:
            self._op_phase[host] = n
        else:
            del self._op_phase[host]

    def _accept_failed(self, exc: OSError) -> None:
        self._accept_log.log(logging.ERROR, "accept failed: %s (%d connections open)", exc, len(self._conn_tasks))

    async def _handle(self, sock: socket.socket, addr: Any, host: str) -> None:
        peer = _fmt_addr(addr[0], addr[1]) if isinstance(addr, tuple) else str(addr)
        in_op_phase = True
        op_timeout = self.limits.op_timeout
        sock.setblocking(False)
        try:
            set_nodelay(sock)
            apply_dead_peer_timeout(sock, self.limits.dead_peer_timeout)
            channel: PlainChannel | TlsChannel
            if self.tls is not None:
                channel = TlsChannel(sock, self.tls, server_side=True)
                await channel.handshake(op_timeout)
            else:
                channel = PlainChannel(sock)
            client = Client(host, channel.peer_names)
            head = unpack_op_header(await channel.recv_exactly(OP_HEADER_SIZE, op_timeout))
            self.registry.refresh()
            if head.code == OP_REQ_DEVLIST:
                records = [rec for rec in (d.record() for d in self.registry.devices()) if self._may_use(client, rec)]
                await channel.send_all(pack_devlist_reply(records), op_timeout)
                log.debug("%s: sent device list (%d devices)", peer, len(records))
            elif head.code == OP_REQ_IMPORT:
                busid = unpack_import_busid(await channel.recv_exactly(BUSID_SIZE, op_timeout))
                self._leave_op_phase(host)
                in_op_phase = False
                await self._import(channel, peer, client, busid)
                return
            else:
                raise ProtocolError(f"unknown op code 0x{head.code:04x}")
        except ProtocolError as exc:
            self.protocol_errors += 1
            log.warning("%s: dropped: %s", peer, exc)
        except TlsError as exc:
            log.warning("%s: dropped: %s", peer, exc)
        except (PeerClosed, ConnectionError, asyncio.TimeoutError, OSError) as exc:
            log.info("%s: connection ended: %s", peer, exc or type(exc).__name__)
        finally:
            if in_op_phase:
                self._leave_op_phase(host)
            sock.close()

    def _may_use(self, client: Client, record: Any) -> bool:
        return self.access.may_use(client, record.busid, record.idVendor, record.idProduct)

    async def _import(self, channel: PlainChannel | TlsChannel, peer: str, client: Client, busid: str) -> None:
        op_timeout = self.limits.op_timeout
        candidate = self.registry.get(busid)
        if candidate is not None and self.access.rules and not self._may_use(client, candidate.record()):
            # answered as for a busid that is not exported: the client learns nothing about it
            log.warning("%s: import of %s refused for %s by the device rules", peer, busid, client)
            await channel.send_all(pack_import_reply(int(OpStatus.NODEV)), op_timeout)
            return
        owner = object()
        status, device = self.registry.claim(busid, owner)
        if status != ST_OK or device is None:
            log.info("%s: import of %s refused: %s", peer, busid, OpStatus(status).name)
            await channel.send_all(pack_import_reply(status), op_timeout)
            return
        try:
            try:
                record = device.record()
                await device.open()
            except Exception as exc:
                log.error("%s: device %s could not be opened: %s", peer, busid, exc)
                await channel.send_all(pack_import_reply(int(OpStatus.DEV_ERR)), op_timeout)
                return
            try:
                await channel.send_all(pack_import_reply(ST_OK, record), op_timeout)
                log.info("%s: imported %s%s", peer, busid, f" ({client})" if client.names else "")
                await self._urb_phase(channel, peer, device, client)
            finally:
                await device.close()
        finally:
            self.registry.release(busid, owner)
            log.info("%s: released %s", peer, busid)

    async def _urb_phase(
        self, channel: PlainChannel | TlsChannel, peer: str, device: Device, client: Client | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[BaseException | None] = loop.create_future()

        def on_close(exc: BaseException | None) -> None:
            if not done.done():
                done.set_result(exc)

        decoder = Decoder("server", max_transfer=self.max_transfer)
        limits = self.limits

        def on_messages(msgs: list[Any]) -> None:
            try:
                session.handle(msgs)
            except ProtocolError as exc:
                stream.close(exc)

        def on_drain() -> None:
            try:
                session.drain()
            except ProtocolError as exc:
                stream.close(exc)

        def pause_input(paused: bool) -> None:
            if paused:
                stream.pause_reading()
            else:
                stream.resume_reading()

        stream = Stream(
            channel.sock,
            decoder,
            on_messages,
            on_close,
            loop,
            high_water=limits.connection_budget,
            stall_timeout=limits.write_stall_timeout,
            on_drain=on_drain,
            admit=lambda size: session.admit(size),
            tls=channel if isinstance(channel, TlsChannel) else None,
        )
        session = UrbSession(
            device,
            stream.write,
            self.pool,
            limits=limits,
            queued=stream.queued_bytes,
            pause_input=pause_input,
            readmit=stream.readmit,
            capture=None if self.capture is None else self.capture.session(device.busnum, device.devnum),
        )
        self.sessions.add(session)
        imp = self.imports[session] = Import(
            peer, str(client or peer), device.busid, session, stream, isinstance(channel, TlsChannel)
        )
        stream.start()
        # Device.gone (set by devices that can disappear): end the session as if the peer had closed
        gone = device.gone
        gone_task: asyncio.Future[Any] | None = None
        if isinstance(gone, asyncio.Event):
            gone_task = asyncio.ensure_future(gone.wait())

            def device_gone(t: asyncio.Future[Any]) -> None:
                if not t.cancelled():
                    on_close(ConnectionAbortedError(f"device {device.busid} is gone"))

            gone_task.add_done_callback(device_gone)
        try:
            exc = await done
            if isinstance(exc, ProtocolError):
                self.protocol_errors += 1
                log.warning("%s: dropped: %s", peer, exc)
            elif exc is not None:
                log.info("%s: connection ended: %s", peer, exc)
            else:
                log.info("%s: client closed the connection", peer)
        finally:
            if gone_task is not None:
                gone_task.cancel()
            stream.close()
            await session.shutdown()
            self.sessions.discard(session)
            del self.imports[session]
            self.device_totals.setdefault(device.busid, DeviceTotals()).add(imp)


async def serve(devices: Iterable[Device], host: str | None = None, port: int = USBIP_PORT, **options: Any) -> None:
    """Run a server until cancelled (``options``: those of :class:`Server`)."""
    async with Server(devices, host=host, port=port, **options) as srv:
        await srv.serve_forever()


__all__ = ["Server", "serve"]
