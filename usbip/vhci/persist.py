"""``usbip attach --persist``: a supervisor process that keeps a vhci import alive.

After the first import went through (and failed loudly if it could not), ``usbip attach``
forks a supervisor, detached from the terminal like the TLS relay. It polls the vhci port
(every :data:`POLL_INTERVAL` seconds; vhci-hcd has no event to wait for) and, when the port no
longer holds its import (server restarted, network lost and the dead-peer timeout expired,
device unplugged on the server), imports the device again with the backoff of a
:class:`~usbip.client.ReconnectPolicy` (1 s doubling to 30 s, jittered) and hands it to
vhci-hcd: on the same port if it is still free, else on any free port. The records follow
the import: ``port<N>`` ("host port busid"), ``port<N>.relay`` (TLS) and ``port<N>.persist``
(the supervisor's pid) live beside the port it is on. While the device is away, the old port
keeps its records and our ``usbip attach`` leaves that port to the supervisor if it can.

``usbip detach -p N`` removes the records under ``persist.lock`` (the supervisor changes a
port and its records only while holding that lock, after checking its ``port<N>.persist``
is still its own), detaches the port, then stops the supervisor with SIGTERM; a supervisor
that finds its record gone stops by itself. Every step is logged, one line each, to
``persist.log`` beside the records.

Every wait is bounded: the poll interval, the backoff (at most ``max_delay``), the import
(``Connection.timeout``), the lock (:data:`LOCK_TIMEOUT`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import ssl
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..cancelsafe import cancel_and_wait, wait_for
from ..client import Connection, ReconnectPolicy
from ..client.connection import Channel
from ..client.reconnect import Backoff
from ..protocol import DeviceRecord
from . import relay
from .driver import VDEV_ST_ERROR, VhciDriver, VhciError
from .supervisors import LOCK_TIMEOUT, _set_name, log_path

log = logging.getLogger("usbip.persist")

POLL_INTERVAL = 1.0  # seconds between two looks at the vhci port


@dataclass(frozen=True)
class Target:
    """What a persistent import imports: ``busid`` on ``host:tcp_port`` (with ``tls``, if set)."""

    host: str
    tcp_port: int
    busid: str
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None

    @property
    def url(self) -> str:
        return f"usbip://{self.host}:{self.tcp_port}/{self.busid}" + (" (TLS)" if self.tls else "")

    async def import_channel(self) -> tuple[Channel, DeviceRecord]:
        conn = Connection(self.host, self.tcp_port, tls=self.tls, server_hostname=self.server_hostname)
        return await conn.import_channel(self.busid)


class Supervisor:
    """Keeps ``target`` attached to vhci-hcd, starting from ``port`` holding the import ``devid``.

    Runs in-process with :meth:`run` (the forked process of :func:`spawn` runs it too);
    ``importer`` replaces the network import in tests.
    """

    def __init__(
        self,
        drv: VhciDriver,
        target: Target,
        port: int,
        devid: int,
        policy: ReconnectPolicy | None = None,
        poll: float | None = None,
        pid: int | None = None,
        importer: Callable[[], Awaitable[tuple[Channel, DeviceRecord]]] | None = None,
    ) -> None:
        self.drv = drv
        self.target = target
        self.port = port
        self.devid = devid
        self.policy = policy or ReconnectPolicy()
        self.poll = POLL_INTERVAL if poll is None else poll
        self.pid = os.getpid() if pid is None else pid
        self.importer = importer or target.import_channel
        self.backoff = Backoff(self.policy)
        self.reattached = 0  # re-imports that made it into a vhci port
        self._stop: asyncio.Event | None = None

    def say(self, level: int, fmt: str, *args: object) -> None:
        log.log(level, "port %d %s: " + fmt, self.port, self.target.url, *args)

    def stop(self) -> None:
        """Ask :meth:`run` to end (from the event loop's thread, e.g. a signal handler)."""
        if self._stop is not None:
            self._stop.set()

    def wanted(self) -> bool:
        """The record of this persistent import is still ours (``usbip detach`` removes it)."""
        return self.drv.read_persist(self.port) == self.pid

    def port_state(self) -> str:
        """What the port holds: "ours" (our import), "error" (ours, in VDEV_ST_ERROR) or "gone"."""
        for p in self.drv.ports():
            if p.port == self.port:
                if p.in_use and p.devid == self.devid:
                    return "error" if p.status == VDEV_ST_ERROR else "ours"
                return "gone"
        return "gone"

    async def run(self) -> str:
        """Watch and re-attach until stopped, detached, or out of attempts; returns why it ended."""
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.say(logging.INFO, "supervising (pid %d, polling every %.1f s)", self.pid, self.poll)
        attached_at = loop.time()
        while True:
            why = await self._watch()
            if why is not None:
                return why
            if loop.time() - attached_at >= self.policy.stable_after:
                self.backoff.reset()
            why = await self._reattach()
            if why is not None:
                return why
            attached_at = loop.time()

    async def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; True when asked to stop meanwhile."""
        assert self._stop is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await wait_for(self._stop.wait(), seconds)
        return self._stop.is_set()

    async def _watch(self) -> str | None:
        """Poll until the import is gone (None) or the supervisor must end (why)."""
        while True:
            if await self._sleep(self.poll):
                return "stopped"
            try:
                state = self.port_state()
            except OSError as exc:
                return f"cannot read vhci-hcd any more: {exc}"
            if not self.wanted():
                return "the persist record is gone (usbip detach)"
            if state == "ours":
                continue
            if state == "error":
                self.say(logging.WARNING, "vhci-hcd reports the port in error; detaching it")
                with contextlib.suppress(VhciError), self.drv.lock(LOCK_TIMEOUT):
                    if self.wanted():
                        self.drv.detach(self.port)
            self.say(logging.WARNING, "the import ended (connection dropped or device gone)")
            return None

    async def _import(self) -> tuple[Channel, DeviceRecord] | None:
        """The import, or None when asked to stop meanwhile."""
        assert self._stop is not None
        task = asyncio.ensure_future(self.importer())
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            return task.result()
        with contextlib.suppress(Exception):  # whatever the abandoned import ended with
            await cancel_and_wait(task)
        return None

    async def _reattach(self) -> str | None:
        """Re-import with backoff until it is attached again (None) or the supervisor must end (why)."""
        while True:
            delay = self.backoff.next_delay()
            if delay is None:
                return f"gave up after {self.backoff.attempt} attempts"
            self.say(logging.INFO, "re-import attempt %d in %.1f s", self.backoff.attempt, delay)
            if await self._sleep(delay):
                return "stopped"
            if not self.wanted():
                return "the persist record is gone (usbip detach)"
            try:
                got = await self._import()
            except Exception as exc:  # refused, unreachable, timed out, TLS, bad reply: all worth another try
                self.say(logging.WARNING, "re-import failed: %s", str(exc) or type(exc).__name__)
                continue
            if got is None:
                return "stopped"
            try:
                port = self._attach(*got)
            except VhciError as exc:
                self.say(logging.WARNING, "vhci-hcd did not take the import: %s", exc.strerror or exc)
                if exc.errno == errno.ENODEV:
                    return "vhci-hcd is gone"
                continue
            except _Detached:
                return "the persist record is gone (usbip detach)"
            self.reattached += 1
            old, self.port, self.devid = self.port, port, got[1].devid
            moved = "" if port == old else f" (port {old} was taken; the records moved)"
            self.say(logging.INFO, "re-attached after %d attempt(s)%s", self.backoff.attempt, moved)
            return None

    def _attach(self, channel: Channel, record: DeviceRecord) -> int:
        """Hand the new import to vhci-hcd (the same port if free) and move the records with it."""
        from .imports import live_persist_ports, local_socket, plug

        try:
            sock, relay_pid = local_socket(channel, self.drv)
        except BaseException:
            channel.sock.close()
            raise
        attached = False
        try:
            with self.drv.lock(LOCK_TIMEOUT):
                if not self.wanted():
                    raise _Detached
                avoid = set(live_persist_ports(self.drv)) - {self.port}
                port = plug(self.drv, sock, record, self.port, fallback=True, avoid=avoid)
                attached = True
                self._move_records(port, relay_pid)
                return port
        finally:
            sock.close()  # vhci-hcd holds its own reference
            if relay_pid is not None and not attached:
                relay.stop(relay_pid)

    def _move_records(self, port: int, relay_pid: int | None) -> None:
        t = self.target
        old_record = self.drv.read_record(self.port)
        self.drv.write_record(port, t.host, t.tcp_port, t.busid)
        if relay_pid is not None:
            self.drv.write_relay(port, relay_pid)
        else:
            self.drv.remove_relay(port)
        self.drv.write_persist(port, self.pid)
        if port != self.port:
            self.drv.remove_persist(self.port)
            self.drv.remove_relay(self.port)
            mine = old_record is not None and (old_record.host, old_record.port, old_record.busid) == (
                t.host,
                str(t.tcp_port),
                t.busid,
            )
            if mine:  # another tool may have attached there meanwhile and written its own
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.drv.record_path(self.port))

    def forget(self) -> None:
        """On the way out: drop our persist record, unless ``usbip detach`` already did."""
        with contextlib.suppress(VhciError, OSError), self.drv.lock(LOCK_TIMEOUT):
            if self.wanted():
                self.drv.remove_persist(self.port)


class _Detached(Exception):
    """The persist record vanished between the import and the attach."""


# ---------------------------------------------------------------- the process


def spawn(drv: VhciDriver, target: Target, port: int, devid: int, policy: ReconnectPolicy | None = None) -> int:
    """Fork the supervisor of the import on ``port``; return its pid once its record is written.

    The supervisor is a grandchild in a session of its own (it outlives ``usbip attach`` and
    the terminal); it keeps no descriptor of the attaching process but the log.
    """
    path = log_path(drv)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child (exercised through the process by the tests)
        code = 1
        try:
            os.close(r)
            relay._close_fds_except({0, 1, 2, w})
            os.setsid()
            if os.fork() > 0:
                os._exit(0)
            me = os.getpid()
            _set_name()
            with drv.lock(LOCK_TIMEOUT):
                drv.write_persist(port, me)
            os.write(w, str(me).encode())
            os.close(w)
            relay._redirect_output(path)
            code = _main(drv, target, port, devid, policy)
        except BaseException:
            with contextlib.suppress(OSError):
                os.write(2, f"usbip persist[{os.getpid()}]: {traceback.format_exc()}\n".encode())
        finally:
            os._exit(code)
    os.close(w)
    os.waitpid(pid, 0)  # the intermediate child exits at once; the supervisor is reparented
    with os.fdopen(r) as f:
        text = f.read().strip()
    if not text:
        raise OSError("the persist supervisor did not start (see " + (path or "its log") + ")")
    return int(text)


def _main(  # pragma: no cover - in the child
    drv: VhciDriver, target: Target, port: int, devid: int, policy: ReconnectPolicy | None
) -> int:
    # fd 2 is the log file now (sys.stderr may be another object, e.g. under a test runner)
    handler = logging.StreamHandler(open(2, "w", buffering=1, closefd=False))
    handler.setFormatter(logging.Formatter("%(asctime)s usbip persist[%(process)d]: %(levelname)s: %(message)s"))
    for name in ("", "usbip"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sup = Supervisor(drv, target, port, devid, policy)

    async def main() -> str:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, sup.stop)
        return await sup.run()

    why = asyncio.run(main())
    sup.forget()
    sup.say(logging.INFO, "supervisor ends: %s (%d re-attaches)", why, sup.reattached)
    return 0


def run_foreground(
    drv: VhciDriver,
    target: Target,
    port: int,
    devid: int,
    policy: ReconnectPolicy | None = None,
    on_ready: Callable[[], object] | None = None,
) -> tuple[str, int, bool]:
    """The supervisor in this process (``usbip attach --persist --foreground``, the systemd unit
    ``usbip-attach@.service``); its log goes where the command's goes. It ends on SIGTERM or
    SIGINT (``systemctl stop``), on ``usbip detach`` of its port, or when it gives up. Returns
    why it ended, the port the import is on by then, and whether a signal ended it (the caller
    then detaches that port, as the service's stop means)."""
    with open("/proc/self/comm", "rb") as f:
        name = f.read().strip()
    _set_name()  # what `usbip detach` checks before it signals the supervisor of a record
    with drv.lock(LOCK_TIMEOUT):
        drv.write_persist(port, os.getpid())
    sup = Supervisor(drv, target, port, devid, policy)
    signalled = False

    def on_signal() -> None:
        nonlocal signalled
        signalled = True
        sup.stop()

    async def main() -> str:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        if on_ready is not None:
            on_ready()
        return await sup.run()

    try:
        why = asyncio.run(main())
    finally:
        sup.forget()
        _set_name(name)
    sup.say(logging.INFO, "supervisor ends: %s (%d re-attaches)", why, sup.reattached)
    return why, sup.port, signalled


__all__ = ["Supervisor", "Target", "run_foreground", "spawn"]
