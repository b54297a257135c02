"""``usbip attach``, ``detach`` and ``port``: the commands over usbip.vhci (what they print and
their exit codes)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..vhci.driver import SPEED_TEXT, VhciDriver, VhciError
from ..vhci.imports import ImportedPort, attach_device, detach, imported_ports
from . import exitcodes

if TYPE_CHECKING:  # attach imports asyncio, the client and the supervisor; port and detach do not
    import ssl

    from ..protocol import DeviceRecord
    from ..vhci import persist as persist_mod

log = logging.getLogger("usbip")


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
    import asyncio

    from ..vhci import persist as persist_mod

    try:
        drv = driver or VhciDriver()
        port, record = asyncio.run(
            attach_device(host, tcp_port, busid, drv, port=port, tls=tls, server_hostname=server_hostname)
        )
    except Exception as exc:
        return exitcodes.report(log, exc, host, tcp_port)
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
    from ..vhci import persist as persist_mod

    log.info("port %d: persistent import, supervised by this process (pid %d)", port, os.getpid())
    try:
        why, port, signalled = persist_mod.run_foreground(drv, target, port, record.devid, on_ready=on_ready)
    except (OSError, VhciError) as exc:
        log.error("%s is attached to port %d but will not be kept alive: %s", target.busid, port, exc)
        return exitcodes.FAILURE
    if signalled:  # `systemctl stop`, Ctrl-C: the import ends with its supervisor
        return detach_command(port, driver=drv)
    return exitcodes.OK if why.startswith("the persist record is gone") else exitcodes.FAILURE


def detach_command(port: int, as_json: bool = False, driver: VhciDriver | None = None) -> int:
    """``usbip detach``: also ends the port's TLS relay and the supervisor of a persistent import."""
    try:
        done = detach(port, driver)
    except VhciError as exc:
        return exitcodes.report(log, exc)
    if not done.was_attached and done.supervisor is None:
        log.info("Port %d is already detached!", port)
        return exitcodes.OK
    if as_json:
        doc: dict[str, object] = {"port": port, "detached": True}
        if done.supervisor is not None:
            doc["persist_stopped"] = done.supervisor
        print(json.dumps(doc))
    else:
        print(f"port {port} is now detached!")
    return exitcodes.OK


def port_command(as_json: bool = False) -> int:
    try:
        ports = imported_ports(VhciDriver())
    except VhciError as exc:
        return exitcodes.report(log, exc)
    if as_json:
        print(json.dumps({"ports": [p.to_json() for p in ports]}, indent=2))
    else:
        print(format_ports(ports))
    return exitcodes.OK


def format_ports(ports: list[ImportedPort]) -> str:
    """What usbip_vhci_imported_device_dump (libsrc/vhci_driver.c) prints."""
    from ..usb.names import usb_ids

    ids = usb_ids()
    lines = ["Imported USB devices", "===================="]
    for d in ports:
        if d.reattaching:
            lines.append(f"Port {d.port:02d}: <{d.status_text}>")
        else:
            speed = SPEED_TEXT.get(d.speed, "Unknown Speed")
            lines.append(f"Port {d.port:02d}: <{d.status_text}> at {speed}")
            lines.append(f"       {ids.product(d.vendor, d.product)}")
        notes = []
        if d.tls_relay:
            notes.append(f"TLS, relay pid {d.tls_relay}")
        if d.persist is not None:
            running = "" if d.persist.running else " (not running)"
            notes.append(f"persistent, supervisor pid {d.persist.pid}{running}")
        extra = f" ({'; '.join(notes)})" if notes else ""
        if d.remote is not None:
            r = d.remote
            lines.append(f"{d.local_busid:>10} -> usbip://{r.host}:{r.port}/{r.busid}{extra}")
        else:
            lines.append(f"{d.local_busid:>10} -> unknown host, remote port and remote busid{extra}")
        if not d.reattaching:
            lines.append(f"{'':>10} -> remote bus/dev {d.busnum:03d}/{d.devnum:03d}")
    return "\n".join(lines)
