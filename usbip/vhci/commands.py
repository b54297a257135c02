"""``usbip attach``, ``detach`` and ``port`` on vhci-hcd (tools/usb/usbip/src/usbip_attach.c, _detach.c, _port.c)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Collection, Iterator

from ..cli import exitcodes
from ..client import Connection, ImportRefused, TlsFailed
from ..client.connection import Channel
from ..protocol import DeviceRecord, ProtocolError
from ..tls import TlsChannel
from . import persist as persist_mod
from . import relay
from .driver import SPEED_TEXT, STATUS_TEXT, VhciDriver, VhciError, VhciPort
from .persist import pid_alive

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


def imported_ports(driver: VhciDriver) -> list[dict[str, object]]:
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
            {
                "port": p.port,
                "hub": p.hub,
                "status": p.status,
                "status_text": STATUS_TEXT.get(p.status, "Unknown") if p.in_use else REATTACHING,
                "speed": p.speed,
                "devid": p.devid,
                "busnum": p.busnum,
                "devnum": p.devnum,
                "local_busid": p.local_busid,
                "idVendor": f"{vid:04x}",
                "idProduct": f"{pid:04x}",
                "remote": None if rec is None else {"host": rec.host, "port": rec.port, "busid": rec.busid},
                "tls_relay": _live_relay(driver, p.port),
                "persist": None if sup is None else {"pid": sup, "running": running},
            }
        )
    return out


REATTACHING = "Re-attaching (persistent import)"


def format_ports(ports: list[dict[str, object]]) -> str:
    """What usbip_vhci_imported_device_dump (libsrc/vhci_driver.c) prints."""
    from ..names import usb_ids

    ids = usb_ids()
    lines = ["Imported USB devices", "===================="]
    for d in ports:
        speed = SPEED_TEXT.get(int(d["speed"]), "Unknown Speed")  # type: ignore[call-overload]
        waiting = d["status_text"] == REATTACHING
        if waiting:
            lines.append(f"Port {int(d['port']):02d}: <{d['status_text']}>")  # type: ignore[call-overload]
        else:
            lines.append(f"Port {int(d['port']):02d}: <{d['status_text']}> at {speed}")  # type: ignore[call-overload]
            lines.append(f"       {ids.product(int(str(d['idVendor']), 16), int(str(d['idProduct']), 16))}")
        remote = d["remote"]
        busid = str(d["local_busid"])
        notes = []
        if d.get("tls_relay"):
            notes.append(f"TLS, relay pid {d['tls_relay']}")
        sup = d.get("persist")
        if isinstance(sup, dict):
            notes.append(f"persistent, supervisor pid {sup['pid']}" + ("" if sup["running"] else " (not running)"))
        extra = f" ({'; '.join(notes)})" if notes else ""
        if isinstance(remote, dict):
            lines.append(f"{busid:>10} -> usbip://{remote['host']}:{remote['port']}/{remote['busid']}{extra}")
        else:
            lines.append(f"{busid:>10} -> unknown host, remote port and remote busid{extra}")
        if not waiting:
            lines.append(f"{'':>10} -> remote bus/dev {int(d['busnum']):03d}/{int(d['devnum']):03d}")  # type: ignore[call-overload]
    return "\n".join(lines)


def attach_command(
    host: str,
    tcp_port: int,
    busid: str,
    as_json: bool = False,
    port: int | None = None,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    persist: bool = False,
    foreground: bool = False,
    on_ready: Callable[[], object] | None = None,
    driver: VhciDriver | None = None,
) -> int:
    """``usbip attach``; with ``persist`` a supervisor process keeps the import alive
    (usbip/vhci/persist.py) once the first import went through; with ``foreground`` too, this
    process is the supervisor (``on_ready`` is called once the import is attached) and returns
    when it ends, detaching the device if a signal ended it."""
    try:
        drv = driver or VhciDriver()
        port, record = asyncio.run(
            attach_device(host, tcp_port, busid, drv, port=port, tls=tls, server_hostname=server_hostname)
        )
    except (ImportRefused, TlsFailed) as exc:
        log.error("%s", exc)
        return exitcodes.REFUSED
    except VhciError as exc:
        log.error("%s", exc.strerror or exc)
        return exitcodes.USAGE if exc.errno == errno.EINVAL else exitcodes.NO_DRIVER
    except ProtocolError as exc:
        log.error("%s:%d: %s", host, tcp_port, exc)
        return exitcodes.FAILURE
    except (OSError, asyncio.TimeoutError) as exc:
        log.error("could not connect to %s:%d: %s", host, tcp_port, exc or "timed out")
        return exitcodes.UNREACHABLE
    supervisor = None
    if persist:
        target = persist_mod.Target(host, tcp_port, busid, tls, server_hostname)
        if foreground:
            return _supervise_here(drv, target, port, record, on_ready)
        try:
            supervisor = persist_mod.spawn(drv, target, port, record.devid)
        except (OSError, VhciError) as exc:
            log.error("%s is attached to port %d but will not be kept alive: %s", busid, port, exc)
            return exitcodes.FAILURE
        log.info("port %d: persistent import, supervisor pid %d (log: %s)", port, supervisor, persist_mod.log_path(drv))
    if as_json:
        doc: dict[str, object] = {"port": port, "host": host, "busid": busid}
        if supervisor is not None:
            doc["persist"] = supervisor
        print(json.dumps(doc))
    else:
        log.debug("%s from %s attached to port %d", busid, host, port)
    return exitcodes.OK


def _supervise_here(
    drv: VhciDriver, target: persist_mod.Target, port: int, record: DeviceRecord, on_ready: Callable[[], object] | None
) -> int:
    log.info("port %d: persistent import, supervised by this process (pid %d)", port, os.getpid())
    try:
        why, port, signalled = persist_mod.run_foreground(drv, target, port, record.devid, on_ready=on_ready)
    except (OSError, VhciError) as exc:
        log.error("%s is attached to port %d but will not be kept alive: %s", target.busid, port, exc)
        return exitcodes.FAILURE
    if signalled:  # `systemctl stop`, Ctrl-C: the import ends with its supervisor
        return detach_command(port, driver=drv)
    return exitcodes.OK if why.startswith("the persist record is gone") else exitcodes.FAILURE


@contextlib.contextmanager
def _records_lock(drv: VhciDriver, port: int) -> Iterator[None]:
    """``persist.lock`` if it can be had (a detach by root without persistent imports works without)."""
    entered = False
    try:
        with drv.lock(persist_mod.LOCK_TIMEOUT):
            entered = True
            yield
    except VhciError as exc:
        if entered:
            raise
        if drv.read_persist(port) is not None:
            log.warning("detaching without the persist lock: %s", exc.strerror or exc)
        yield


def detach_command(port: int, as_json: bool = False, driver: VhciDriver | None = None) -> int:
    """``usbip detach``: also ends the port's TLS relay and the supervisor of a persistent import.

    The records go first, under the lock the supervisor re-attaches under: a supervisor
    that finds its record gone re-attaches nothing, whatever it was doing."""
    supervisor = None
    try:
        drv = driver or VhciDriver()
        known = {p.port: p for p in drv.ports()}
        if port not in known:
            log.error("invalid port %d (vhci-hcd has ports 0..%d)", port, max(known, default=-1))
            return exitcodes.USAGE
        with _records_lock(drv, port):
            supervisor = drv.read_persist(port)
            relay_pid = drv.read_relay(port)
            p: VhciPort = next(q for q in drv.ports() if q.port == port)  # as of now, under the lock
            drv.remove_record(port)
            if p.in_use:
                drv.detach(port)
        if supervisor is not None:
            persist_mod.stop(supervisor)
        if not p.in_use:
            if relay_pid is not None:
                relay.stop(relay_pid)
            if supervisor is None:
                log.info("Port %d is already detached!", port)
                return exitcodes.OK
        elif relay_pid is not None:
            _end_relay(relay_pid)
    except VhciError as exc:
        log.error("%s", exc.strerror or exc)
        return exitcodes.NO_DRIVER
    if as_json:
        doc: dict[str, object] = {"port": port, "detached": True}
        if supervisor is not None:
            doc["persist_stopped"] = supervisor
        print(json.dumps(doc))
    else:
        print(f"port {port} is now detached!")
    return exitcodes.OK


def port_command(as_json: bool = False) -> int:
    try:
        drv = VhciDriver()
        ports = imported_ports(drv)
    except VhciError as exc:
        log.error("%s", exc.strerror or exc)
        return exitcodes.NO_DRIVER
    if as_json:
        print(json.dumps({"ports": ports}, indent=2))
    else:
        print(format_ports(ports))
    return exitcodes.OK
