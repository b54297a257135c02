"""``usbip attach``, ``detach`` and ``port`` on vhci-hcd (tools/usb/usbip/src/usbip_attach.c, _detach.c, _port.c)."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import ssl
import time

from ..cli import exitcodes
from ..client import Connection, ImportRefused, TlsFailed
from ..protocol import ProtocolError
from ..tls import TlsChannel
from . import relay
from .driver import SPEED_TEXT, STATUS_TEXT, VhciDriver, VhciError, VhciPort

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
    drv = driver or VhciDriver()
    if port is not None:
        drv.check_port(port)  # a bad or busy port fails before the import; its hub is checked below
    relay_pid: int | None = None
    channel, record = await Connection(host, tcp_port, tls=tls, server_hostname=server_hostname).import_channel(busid)
    if isinstance(channel, TlsChannel):
        sock, relay_pid = relay.start(channel, _relay_log(drv))
    else:
        sock = channel.sock
    attached = False
    try:
        sock.setblocking(True)  # the kernel takes the socket as the tool's blocking one
        tries = 1 if port is not None else ATTACH_RETRIES
        chosen = port
        for _ in range(tries):
            port = drv.check_port(chosen, record.speed) if chosen is not None else drv.free_port(record.speed)
            try:
                drv.attach(port, sock.fileno(), record.devid, record.speed)
            except VhciError as exc:
                if exc.errno == errno.EBUSY:
                    continue
                raise
            break
        else:
            raise VhciError(errno.EBUSY, "vhci ports kept being taken; giving up")
        attached = True
        drv.write_record(port, host, tcp_port, busid)
        if relay_pid is not None:
            drv.write_relay(port, relay_pid)
        return port
    finally:
        sock.close()  # vhci-hcd holds its own reference now
        if relay_pid is not None and not attached:
            relay.stop(relay_pid)


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
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.05)
    log.warning("TLS relay %d did not end with the detach; stopping it", pid)
    relay.stop(pid)


def _local_ids(busid: str) -> tuple[int, int]:
    def rd(name: str) -> int:
        try:
            with open(os.path.join(SYSFS_USB, busid, name)) as f:
                return int(f.read().strip(), 16)
        except (OSError, ValueError):
            return 0

    return rd("idVendor"), rd("idProduct")


def imported_ports(driver: VhciDriver) -> list[dict[str, object]]:
    out = []
    for p in driver.ports():
        if not p.in_use:
            continue
        rec = driver.read_record(p.port)
        vid, pid = _local_ids(p.local_busid)
        out.append(
            {
                "port": p.port,
                "hub": p.hub,
                "status": p.status,
                "status_text": STATUS_TEXT.get(p.status, "Unknown"),
                "speed": p.speed,
                "devid": p.devid,
                "busnum": p.busnum,
                "devnum": p.devnum,
                "local_busid": p.local_busid,
                "idVendor": f"{vid:04x}",
                "idProduct": f"{pid:04x}",
                "remote": None if rec is None else {"host": rec.host, "port": rec.port, "busid": rec.busid},
                "tls_relay": driver.read_relay(p.port),
            }
        )
    return out


def format_ports(ports: list[dict[str, object]]) -> str:
    """What usbip_vhci_imported_device_dump (libsrc/vhci_driver.c) prints."""
    from ..names import usb_ids

    ids = usb_ids()
    lines = ["Imported USB devices", "===================="]
    for d in ports:
        speed = SPEED_TEXT.get(int(d["speed"]), "Unknown Speed")  # type: ignore[call-overload]
        lines.append(f"Port {int(d['port']):02d}: <{d['status_text']}> at {speed}")  # type: ignore[call-overload]
        lines.append(f"       {ids.product(int(str(d['idVendor']), 16), int(str(d['idProduct']), 16))}")
        remote = d["remote"]
        busid = str(d["local_busid"])
        if isinstance(remote, dict):
            tls = f" (TLS, relay pid {d['tls_relay']})" if d.get("tls_relay") else ""
            lines.append(f"{busid:>10} -> usbip://{remote['host']}:{remote['port']}/{remote['busid']}{tls}")
        else:
            lines.append(f"{busid:>10} -> unknown host, remote port and remote busid")
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
) -> int:
    try:
        port = asyncio.run(attach(host, tcp_port, busid, port=port, tls=tls, server_hostname=server_hostname))
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
    if as_json:
        print(json.dumps({"port": port, "host": host, "busid": busid}))
    else:
        log.debug("%s from %s attached to port %d", busid, host, port)
    return exitcodes.OK


def detach_command(port: int, as_json: bool = False) -> int:
    try:
        drv = VhciDriver()
        known = {p.port: p for p in drv.ports()}
        if port not in known:
            log.error("invalid port %d (vhci-hcd has ports 0..%d)", port, max(known, default=-1))
            return exitcodes.USAGE
        p: VhciPort = known[port]
        relay_pid = drv.read_relay(port)
        if not p.in_use:
            log.info("Port %d is already detached!", port)
            drv.remove_record(port)
            if relay_pid is not None:
                relay.stop(relay_pid)
            return exitcodes.OK
        drv.remove_record(port)
        drv.detach(port)
        if relay_pid is not None:
            _end_relay(relay_pid)
    except VhciError as exc:
        log.error("%s", exc.strerror or exc)
        return exitcodes.NO_DRIVER
    if as_json:
        print(json.dumps({"port": port, "detached": True}))
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
