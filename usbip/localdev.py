"""Local USB devices as Linux's sysfs shows them (``usbip list -l``)."""

from __future__ import annotations

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


def list_local(root: str = SYSFS_USB) -> list[dict[str, object]]:
    """Every USB device (not hubs' interfaces) with its ids and bound driver names."""
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
        out.append(
            {
                "busid": busid,
                "idVendor": _read(os.path.join(d, "idVendor")),
                "idProduct": _read(os.path.join(d, "idProduct")),
                "busnum": int(_read(os.path.join(d, "busnum")) or 0),
                "devnum": int(_read(os.path.join(d, "devnum")) or 0),
                "drivers": drivers,
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


def bind_command(busid: str, bind: bool = True, as_json: bool = False) -> int:
    what = "bind" if bind else "unbind"
    log.error(
        "%s %s: exporting host devices needs the libusb backend, which this version does not have yet", what, busid
    )
    return exitcodes.FAILURE
