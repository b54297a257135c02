"""Local USB devices (``usbip list -l``) and ``usbip bind``/``unbind``.

The devices come from sysfs or libusb (:mod:`usbip.backends.discovery`: ``auto``
unless ``--enumerate`` / ``USBIP_ENUMERATE`` says otherwise), the same
enumeration ``usbipd`` uses. Binding does not touch the kernel (no usbip-host):
it writes a rule to the bind state file (:mod:`usbip.backends.state`), which a
running ``usbipd`` re-reads on change and exports through libusb.
"""

from __future__ import annotations

import json
import logging

from . import exitcodes

log = logging.getLogger("usbip")
SYSFS_USB = "/sys/bus/usb/devices"


def list_local(
    root: str = SYSFS_USB, state_file: str | None = None, enumeration: str | None = None
) -> list[dict[str, object]]:
    """Every USB device but root hubs, with its ids, bound interface driver names (sysfs only)
    and whether a bind rule exports it (``bound``). ValueError for an unknown enumeration,
    :class:`~usbip.backends.usbdev.EnumerationError` when libusb cannot list devices."""
    from ..backends.discovery import make_scanner
    from ..backends.state import BindState

    state = BindState(state_file)
    state.load()
    out: list[dict[str, object]] = []
    for dev in make_scanner(enumeration, root).scan(include_hubs=True, serials=True):
        out.append(
            {
                "busid": dev.busid,
                "idVendor": f"{dev.vid:04x}",
                "idProduct": f"{dev.pid:04x}",
                "busnum": dev.busnum,
                "devnum": dev.devnum,
                "drivers": dev.drivers,
                "serial": dev.serial,
                "hub": dev.is_hub,
                "bound": state.matches(dev.identity),
            }
        )
    return out


def format_local_list(devices: list[dict[str, object]], parsable: bool = False) -> str:
    """What tools/usb/usbip/src/usbip_list.c (list_devices) prints."""
    from ..usb.names import usb_ids

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
    enumeration: str | None = None,
) -> int:
    """``usbip bind``/``unbind``: add/remove a rule (busid, VID:PID or serial) in the state file."""
    from ..backends.state import BindState, DeviceIdentity, make_rule
    from ..backends.usbdev import EnumerationError

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
    try:
        devices = {d["busid"]: d for d in list_local(root, state.path, enumeration)}
    except (ValueError, EnumerationError) as exc:
        log.error("%s: %s", what, exc)
        return exitcodes.FAILURE
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
