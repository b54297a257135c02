"""Imports through vhci-hcd: attach (a plain or TLS import handed to the kernel), detach, and the
ports in use with their records (what tools/usb/usbip/src/usbip_attach.c, _detach.c and _port.c
do; the commands are in usbip/cli/vhci.py)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from . import relay, supervisors
from .driver import STATUS_TEXT, ImportRecord, VhciDriver, VhciError, VhciPort
from .supervisors import pid_alive

if TYPE_CHECKING:  # the client is imported by attach only: `usbip port` and `detach` start without it
    import ssl

    from ..client.connection import Channel
    from ..protocol import DeviceRecord

log = logging.getLogger("usbip")
SYSFS_USB = "/sys/bus/usb/devices"
ATTACH_RETRIES = 8  # another process may take the free port between our read and our write (EBUSY)


RELAY_EXIT_WAIT = 3.0  # seconds a relay gets to notice the detach by itself


async def attach(
    host: str,
    tcp_port: int,
    busid: str,
    driver: VhciDriver | None = None,
    port: int | None = None,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> int:
    """Import ``busid`` from ``host`` and hand the connection to vhci-hcd; return the vhci port.
    ``port``: that vhci port (it must be free), else the first free one for the device's speed.
    With ``tls`` vhci-hcd gets a local socket and a relay process carries it through TLS."""
    port, _record = await attach_device(host, tcp_port, busid, driver, port, tls, server_hostname)
    return port


async def attach_device(
    host: str,
    tcp_port: int,
    busid: str,
    driver: VhciDriver | None = None,
    port: int | None = None,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> tuple[int, DeviceRecord]:
    """:func:`attach`, returning the vhci port and the device record of the import."""
    drv = driver or VhciDriver()
    kept = live_persist_ports(drv)
    if port is not None:
        drv.check_port(port)  # a bad or busy port fails before the import; its hub is checked below
        if port in kept:
            raise VhciError(
                errno.EBUSY,
                f"vhci port {port} is kept for a persistent import being re-attached (supervisor pid {kept[port]}); "
                f"`usbip detach -p {port}` ends it",
            )
    from ..client import Connection

    channel, record = await Connection(host, tcp_port, tls=tls, server_hostname=server_hostname).import_channel(busid)
    sock, relay_pid = local_socket(channel, drv)
    attached = False
    try:
        port = plug(drv, sock, record, port, avoid=kept)
        attached = True
        drv.write_record(port, host, tcp_port, busid)
        if relay_pid is not None:
            drv.write_relay(port, relay_pid)
        else:  # left by a TLS import that vhci dropped by itself (server gone): not this one's
            drv.remove_relay(port)
        return port, record
    finally:
        sock.close()  # vhci-hcd holds its own reference now
        if relay_pid is not None and not attached:
            relay.stop(relay_pid)


def local_socket(channel: Channel, drv: VhciDriver) -> tuple[socket.socket, int | None]:
    """The socket to give vhci-hcd for an imported ``channel`` and the pid of its TLS relay:
    plain TCP, the channel's own socket (no relay); TLS, one end of a local pair whose other
    end a relay process carries through the session (the channel belongs to the relay then)."""
    from ..net.tls import TlsChannel

    if isinstance(channel, TlsChannel):
        return relay.start(channel, _relay_log(drv))
    return channel.sock, None


def plug(
    drv: VhciDriver,
    sock: socket.socket,
    record: DeviceRecord,
    port: int | None = None,
    fallback: bool = False,
    avoid: Collection[int] = (),
) -> int:
    """Give ``sock`` to vhci-hcd for the device of ``record``; return the port it went to.

    ``port``: that port, else the first free one for the device's speed (ports in ``avoid``
    last). With ``fallback`` a ``port`` that is taken or on the wrong hub gives way to any
    free port (a persistent import coming back) instead of failing.
    """
    sock.setblocking(True)  # the kernel takes the socket as the tool's blocking one
    chosen = port
    tries = 1 if port is not None and not fallback else ATTACH_RETRIES
    for _ in range(tries):
        try:
            target = drv.check_port(chosen, record.speed) if chosen is not None else drv.free_port(record.speed, avoid)
        except VhciError as exc:
            if chosen is None or not fallback or exc.errno not in (errno.EBUSY, errno.EINVAL):
                raise
            chosen = None
            continue
        try:
            drv.attach(target, sock.fileno(), record.devid, record.speed)
        except VhciError as exc:
            if exc.errno == errno.EBUSY:
                if fallback:
                    chosen = None
                continue
            raise
        return target
    raise VhciError(errno.EBUSY, "vhci ports kept being taken; giving up")


def live_persist_ports(drv: VhciDriver) -> dict[int, int]:
    """{port: supervisor pid} of the persistent imports whose supervisor runs."""
    return {port: pid for port, pid in drv.persist_ports().items() if pid_alive(pid)}


def _relay_log(drv: VhciDriver) -> str | None:
    """Where relays log (beside the port records), or None when that directory is not writable."""
    try:
        os.makedirs(drv.record_dir, mode=0o700, exist_ok=True)
    except OSError:
        return None
    return os.path.join(drv.record_dir, "relay.log")


def _end_relay(pid: int) -> None:
    """After a detach: the relay sees vhci's end close and exits; stop it if it has not."""
    end = time.monotonic() + RELAY_EXIT_WAIT
    while time.monotonic() < end:
        if relay.is_relay(pid) is False:  # gone, or the number is another process's now
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.05)
    log.warning("TLS relay %d did not end with the detach; stopping it", pid)
    relay.stop(pid)


def _live_relay(driver: VhciDriver, port: int) -> int | None:
    """The pid of the port's TLS relay if that relay runs: the record outlives a TLS import
    that vhci dropped by itself (server gone), and another tool may have attached there since."""
    pid = driver.read_relay(port)
    return pid if pid is not None and relay.is_relay(pid) is not False else None


def _local_ids(busid: str) -> tuple[int, int]:
    def rd(name: str) -> int:
        try:
            with open(os.path.join(SYSFS_USB, busid, name)) as f:
                return int(f.read().strip(), 16)
        except (OSError, ValueError):
            return 0

    return rd("idVendor"), rd("idProduct")


REATTACHING = "Re-attaching (persistent import)"


@dataclass(frozen=True)
class Supervisor:
    """The supervisor process of a persistent import."""

    pid: int
    running: bool


@dataclass(frozen=True)
class ImportedPort:
    """One vhci port in use (or being re-attached by a persistent import's supervisor)."""

    port: int
    hub: str
    status: int
    status_text: str
    speed: int
    devid: int
    busnum: int
    devnum: int
    local_busid: str
    vendor: int  # of the local device vhci-hcd made, 0 while re-attaching
    product: int
    remote: ImportRecord | None  # where the import came from (the record beside the port)
    tls_relay: int | None
    persist: Supervisor | None

    @property
    def reattaching(self) -> bool:
        return self.status_text == REATTACHING

    def to_json(self) -> dict[str, object]:
        """The form ``usbip port --json`` prints (ids as 4-digit hex, like sysfs)."""
        return {
            "port": self.port,
            "hub": self.hub,
            "status": self.status,
            "status_text": self.status_text,
            "speed": self.speed,
            "devid": self.devid,
            "busnum": self.busnum,
            "devnum": self.devnum,
            "local_busid": self.local_busid,
            "idVendor": f"{self.vendor:04x}",
            "idProduct": f"{self.product:04x}",
            "remote": None if self.remote is None else asdict(self.remote),
            "tls_relay": self.tls_relay,
            "persist": None if self.persist is None else asdict(self.persist),
        }


def imported_ports(driver: VhciDriver) -> list[ImportedPort]:
    """The ports in use, and the free ports a persistent import is being re-attached from."""
    out = []
    persist = driver.persist_ports()
    for p in driver.ports():
        sup = persist.get(p.port)
        running = sup is not None and pid_alive(sup)
        if not p.in_use and not running:
            continue
        rec = driver.read_record(p.port)
        vid, pid = _local_ids(p.local_busid) if p.in_use else (0, 0)
        out.append(
            ImportedPort(
                port=p.port,
                hub=p.hub,
                status=p.status,
                status_text=STATUS_TEXT.get(p.status, "Unknown") if p.in_use else REATTACHING,
                speed=p.speed,
                devid=p.devid,
                busnum=p.busnum,
                devnum=p.devnum,
                local_busid=p.local_busid,
                vendor=vid,
                product=pid,
                remote=rec,
                tls_relay=_live_relay(driver, p.port),
                persist=None if sup is None else Supervisor(sup, running),
            )
        )
    return out


@contextlib.contextmanager
def _records_lock(drv: VhciDriver, port: int) -> Iterator[None]:
    """``persist.lock`` if it can be had (a detach by root without persistent imports works without)."""
    entered = False
    try:
        with drv.lock(supervisors.LOCK_TIMEOUT):
            entered = True
            yield
    except VhciError as exc:
        if entered:
            raise
        if drv.read_persist(port) is not None:
            log.warning("detaching without the persist lock: %s", exc.strerror or exc)
        yield


@dataclass(frozen=True)
class Detached:
    """What :func:`detach` did: whether vhci-hcd held an import on the port, and the supervisor
    of a persistent import it stopped."""

    port: int
    was_attached: bool
    supervisor: int | None


def detach(port: int, driver: VhciDriver | None = None) -> Detached:
    """Detach vhci ``port``; also end its TLS relay and the supervisor of a persistent import.

    The records go first, under the lock the supervisor re-attaches under: a supervisor that
    finds its record gone re-attaches nothing, whatever it was doing. VhciError (EINVAL for a
    port vhci-hcd does not have)."""
    drv = driver or VhciDriver()
    known = {p.port for p in drv.ports()}
    if port not in known:
        raise VhciError(errno.EINVAL, f"invalid port {port} (vhci-hcd has ports 0..{max(known, default=-1)})")
    with _records_lock(drv, port):
        supervisor = drv.read_persist(port)
        relay_pid = drv.read_relay(port)
        p: VhciPort = next(q for q in drv.ports() if q.port == port)  # as of now, under the lock
        drv.remove_record(port)
        if p.in_use:
            drv.detach(port)
    if supervisor is not None:
        supervisors.stop(supervisor)
    if relay_pid is not None:
        if p.in_use:
            _end_relay(relay_pid)
        else:
            relay.stop(relay_pid)
    return Detached(port, p.in_use, supervisor)
