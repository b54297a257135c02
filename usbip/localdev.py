"""Local USB devices as Linux's sysfs shows them (``usbip list -l``) and ``usbip bind``/``unbind``.

Binding does not touch the kernel (no usbip-host): it writes a rule to the bind
state file (:mod:`usbip.backends.state`), which a running ``usbipd`` re-reads on
change and exports through libusb.
"""

from __future__ import annotations

import json
import logging
import os
import re

from .cli import exitcodes

log = logging.getLogger("usbip")
SYSFS_USB = "/sys/bus/usb/devices"
_BUSID = re.compile(r"^\d+-\d+(\.\d+)*$")  # devices, not root hubs (usbN) or interfaces (1-1:1.0)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def list_local(root: str = SYSFS_USB, state_file: str | None = None) -> list[dict[str, object]]:
    """Every USB device (not hubs' interfaces) with its ids, bound driver names and
    whether a bind rule exports it (``bound``)."""
    from .backends.state import BindState, DeviceIdentity

    state = BindState(state_file)
    state.load()
    out: list[dict[str, object]] = []
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return out
    for busid in names:
        if not _BUSID.match(busid):
            continue
        d = os.path.join(root, busid)
        drivers = []
        for entry in sorted(os.listdir(d)):
            if entry.startswith(busid + ":"):
                link = os.path.join(d, entry, "driver")
                if os.path.islink(link):
                    drivers.append(os.path.basename(os.readlink(link)))
        vid, pid = _read(os.path.join(d, "idVendor")), _read(os.path.join(d, "idProduct"))
        serial = _read(os.path.join(d, "serial"))
        ident = DeviceIdentity(busid, int(vid or "0", 16), int(pid or "0", 16), serial)
        out.append(
            {
                "busid": busid,
                "idVendor": vid,
                "idProduct": pid,
                "busnum": int(_read(os.path.join(d, "busnum")) or 0),
                "devnum": int(_read(os.path.join(d, "devnum")) or 0),
                "drivers": drivers,
                "serial": serial,
                "hub": _read(os.path.join(d, "bDeviceClass")) == "09",
                "bound": state.matches(ident),
            }
        )
    return out


def format_local_list(devices: list[dict[str, object]], parsable: bool = False) -> str:
    """What tools/usb/usbip/src/usbip_list.c (list_devices) prints."""
    from .names import usb_ids

    ids = usb_ids()
    lines = []
    for d in devices:
        vid, pid = str(d["idVendor"]), str(d["idProduct"])
        if parsable:
            lines.append(f"busid={d['busid']}#usbid={vid}:{pid}#")
            continue
        name = ids.product(int(vid or "0", 16), int(pid or "0", 16))
        lines += [f" - busid {d['busid']} ({vid}:{pid})", f"   {name}", ""]
    return "\n".join(lines) + ("\n" if lines else "")


def bind_command(
    busid: str | None,
    bind: bool = True,
    as_json: bool = False,
    *,
    vidpid: str | None = None,
    serial: str | None = None,
    state_file: str | None = None,
    root: str = SYSFS_USB,
) -> int:
    """``usbip bind``/``unbind``: add/remove a rule (busid, VID:PID or serial) in the state file."""
    from .backends.state import BindState, DeviceIdentity, make_rule

    what = "bind" if bind else "unbind"
    try:
        rule = make_rule(busid=busid, vidpid=vidpid, serial=serial)
    except ValueError as exc:
        log.error("%s: %s", what, exc)
        return exitcodes.USAGE
    state = BindState(state_file)
    state.load()
    if state.error:
        log.error("%s: %s", what, state.error)
        return exitcodes.FAILURE
    devices = {d["busid"]: d for d in list_local(root, state.path)}
    if busid is not None:
        dev = devices.get(busid)
        if bind and dev is None:
            # the kernel tool's message (tools/usb/usbip/src/usbip_bind.c)
            log.error("device with the specified bus ID does not exist")
            return exitcodes.FAILURE
        if bind and dev is not None and dev.get("hub"):
            log.error("bind of %s failed: it is a hub", busid)
            return exitcodes.FAILURE
    if bind:
        changed = state.add(rule)
        removed: list[dict[str, str]] = []
    else:
        removed = []
        if busid is not None and busid in devices:
            d = devices[busid]
            ident = DeviceIdentity(
                busid,
                int(str(d["idVendor"]) or "0", 16),
                int(str(d["idProduct"]) or "0", 16),
                str(d.get("serial") or ""),
            )
            removed = state.remove_matching(ident)  # every rule that exports this device
        elif state.remove(rule):
            removed = [rule]
        changed = bool(removed)
        if not changed:
            log.error("unbind: %s is not bound", busid or vidpid or serial)
            return exitcodes.FAILURE
    if changed:
        try:
            state.save()
        except OSError as exc:
            log.error("%s: cannot write %s: %s", what, state.path, exc)
            return exitcodes.FAILURE
    target = busid or vidpid or serial
    if as_json:
        print(
            json.dumps(
                {
                    "command": what,
                    "rule": rule,
                    "changed": changed,
                    "removed": removed,
                    "state_file": state.path,
                    "rules": state.rules,
                },
                indent=2,
            )
        )
    elif bind:
        print(
            f"usbip: info: bind device on busid {target}: complete"
            if changed
            else f"usbip: info: {target} is already bound"
        )
    else:
        print(f"usbip: info: unbind device on busid {target}: complete")
    return exitcodes.OK
