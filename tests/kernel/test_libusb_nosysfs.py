"""Our usbipd finding host devices through libusb instead of sysfs, imported by the guest's vhci-hcd.

* forced libusb enumeration (``--enumerate libusb``, sysfs still mounted, Debian's libusb):
  the exported record is the one the sysfs enumeration gives (busid, devid, speed, ids,
  classes, configuration, interfaces; only the path differs), and the import opens the
  device with ``libusb_open``;
* no sysfs at all: usbipd runs in a mount namespace whose /sys is an empty tmpfs, with a
  libusb built without udev (Debian's udev build lists nothing without sysfs; the
  ``libusb-package`` wheel ships one) picked by ``LD_LIBRARY_PATH``. ``auto`` must choose
  libusb, the record must still match the sysfs one (libusb alone knows neither port path
  nor speed there: usbfs' CONNINFO_EX fills them in), the import must work, and so must
  hotplug: unplugged, the device is withdrawn; plugged in again, it is exported and imported
  again (libusb's long-lived context does not learn about it: the usbfs node is wrapped).

Every import is checked by reading SourceSink's mod-63 pattern over bulk IN through the vhci
device and writing it back over bulk OUT.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from . import gadgets, guest_usbipd
from .gadgets import q
from .guest_usbipd import PORT, STATE
from .guest_usbipd import stop as _stop_usbipd
from .guest_usbipd import wait_exportable as _wait_exportable

WORK = "/tmp/cyusbip-nosysfs"
#: what must be the same whichever enumeration found the device (the path is not: sysfs path vs usbfs node)
SAME = (
    "busid",
    "busnum",
    "devnum",
    "devid",
    "speed",
    "idVendor",
    "idProduct",
    "bcdDevice",
    "bDeviceClass",
    "bDeviceSubClass",
    "bDeviceProtocol",
    "bConfigurationValue",
    "bNumConfigurations",
    "bNumInterfaces",
    "interfaces",
)
#: a shell prefix that hides sysfs from what follows it (private mount namespace, empty tmpfs on /sys)
NO_SYSFS = "unshare -m sh -c {}"


def _nonudev_libusb() -> str | None:
    """Directory holding a ``libusb-1.0.so.0`` built without udev (from the libusb-package wheel)."""
    try:
        import libusb_package
    except ImportError:
        return None
    lib = os.path.join(os.path.dirname(libusb_package.__file__), "libusb-1.0.so")
    return lib if os.path.exists(lib) else None


def _in_no_sysfs(guest, cmd: str) -> str:
    """``cmd`` run with /sys hidden and the udev-less libusb first in the library path."""
    lib = _nonudev_libusb()
    assert lib is not None
    guest.run(f"mkdir -p {WORK}/lib && ln -sf {q(lib)} {WORK}/lib/libusb-1.0.so.0", check=True)
    inner = f"mount -t tmpfs none /sys && export LD_LIBRARY_PATH={WORK}/lib && {cmd}"
    return NO_SYSFS.format(q(inner))


def _ours(args: str) -> str:
    return f"$CYUSBIP_PYTHON -m usbip.cli.usbip_main {args}"


def _start_usbipd(guest, args: str = "", *, no_sysfs: bool = False) -> tuple[int, str]:
    return guest_usbipd.start(guest, args, wrap=(lambda cmd: _in_no_sysfs(guest, cmd)) if no_sysfs else None)


def _records(guest) -> dict[str, dict]:
    """Our client's view of the exported records (every field), by busid."""
    r = guest.run(_ours(f"--json -t {PORT} list -r 127.0.0.1"), timeout=60)
    assert r.rc == 0, r.out
    return {d["busid"]: d for d in json.loads(r.out)["devices"]}


def _same(record: dict) -> dict:
    return {k: record[k] for k in SAME}


def _debian_listing(text: str, busid: str) -> list[str]:
    """Debian's ``usbip list -r`` lines of one device, the path line left out."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith(f"{busid}:"))
    block = []
    for ln in lines[start:]:
        if not ln.strip():
            break
        block.append(ln.strip())
    return [block[0]] + [ln for ln in block[1:] if not ln.startswith(": /")]


def _sysfs_baseline(guest, busid: str) -> tuple[dict, list[str]]:
    """The record and Debian's listing of ``busid`` exported with sysfs enumeration."""
    guest.run(f"mkdir -p {WORK}; rm -f {STATE}", check=True)
    pid, _log = _start_usbipd(guest, "--enumerate sysfs")
    try:
        r = guest.run(_ours(f"bind -b {q(busid)} --state-file {STATE} --enumerate sysfs"))
        assert r.rc == 0, r.out
        listing = _wait_exportable(guest, busid)
        rec = _records(guest)[busid]
    finally:
        _stop_usbipd(guest, pid)
    assert rec["speed"] == 3 and (rec["idVendor"], rec["idProduct"]) == ("0525", "a4a0"), rec  # high speed
    return rec, _debian_listing(listing, busid)


def _bulk_pattern(guest, local: str) -> None:
    """Read SourceSink's pattern over bulk IN through the vhci device, write it back over bulk OUT."""
    r = guest.run_python(
        f"""
import os, usb1
d = '/sys/bus/usb/devices/{local}'
b, n = int(open(d + '/busnum').read()), int(open(d + '/devnum').read())
ctx = usb1.USBContext(); ctx.open()
h = ctx.wrapSysDevice(os.open('/dev/bus/usb/%03d/%03d' % (b, n), os.O_RDWR))
if h.kernelDriverActive(0): h.detachKernelDriver(0)
h.claimInterface(0)
eps = [e.getAddress() for e in h.getDevice()[0][0][0]]
ep_in = [e for e in eps if e & 0x80][0]; ep_out = [e for e in eps if not e & 0x80][0]
total = 0
for i in range(10):
    data = h.bulkRead(ep_in, 4096, timeout=5000)
    bad = [j for j in range(len(data)) if data[j] != j % 512 % 63]
    assert data and not bad, ('pattern', len(data), bad[:5])
    total += len(data)
    h.bulkWrite(ep_out, bytes(j % 512 % 63 for j in range(4096)), timeout=5000)
print('OK', total)
""",
        timeout=120,
    )
    assert "OK" in r.out, r.out


def _import_and_check(guest, busid: str) -> None:
    port = gadgets.vhci_attach(guest, busid, port=PORT, vid=gadgets.GADGET_ZERO_VID, pid=gadgets.GADGET_ZERO_PID)
    try:
        assert port.local_busid
        # vhci-hcd put it on a high-speed port with the speed from our record
        speed = guest.run(f"cat /sys/bus/usb/devices/{port.local_busid}/speed").out.strip()
        assert speed == "480", speed
        _bulk_pattern(guest, port.local_busid)
    finally:
        gadgets.vhci_detach(guest, port.port)


@pytest.fixture
def vhci_guest(clean_guest):
    """The clean guest with vhci-hcd loaded, and a list of (pid, log) of usbipds stopped at teardown."""
    g = clean_guest
    gadgets.modprobe(g, "vhci-hcd")
    started: list[tuple[int, str]] = []
    yield g, started
    hung = []
    for pid, log in started:
        if g.run(f"kill -0 {pid}").rc == 0 and (why := _stop_usbipd(g, pid)):
            hung.append(why)
        print(f"--- {log}\n" + g.run(f"grep -vE ' submit | done seq=' {log} | tail -60").out)
    assert not hung, hung


def test_forced_libusb_enumeration_matches_sysfs_and_imports(vhci_guest):
    g, started = vhci_guest
    busid = gadgets.sourcesink(g)
    baseline, debian = _sysfs_baseline(g, busid)
    # usbip list -l: the same devices whichever enumeration lists them
    by = {}
    for mode in ("sysfs", "libusb"):
        r = g.run(f"USBIP_STATE_FILE={STATE} " + _ours(f"--json list -l --enumerate {mode}"))
        assert r.rc == 0, r.out
        by[mode] = {d["busid"]: (d["idVendor"], d["idProduct"], d["bound"]) for d in json.loads(r.out)["devices"]}
    assert by["libusb"] == by["sysfs"] and by["libusb"][busid] == ("0525", "a4a0", True), by
    # the same export through libusb enumeration (the rule in the state file is kept)
    pid, log = _start_usbipd(g, "--enumerate libusb")
    started.append((pid, log))
    listing = _wait_exportable(g, busid)
    rec = _records(g)[busid]
    assert _same(rec) == _same(baseline), (rec, baseline)
    assert rec["path"] == f"/dev/bus/usb/{rec['busnum']:03d}/{rec['devnum']:03d}"
    assert _debian_listing(listing, busid) == debian, listing
    _import_and_check(g, busid)
    out = g.run(f"cat {log}").out
    assert "devices found through libusb" in out and "opened through libusb_open" in out, out[-3000:]


@pytest.mark.long  # ~2 min under TCG; scripts/kernel-long (the forced libusb enumeration test stays in CI)
@pytest.mark.skipif(_nonudev_libusb() is None, reason="no libusb built without udev (pip install libusb-package)")
def test_no_sysfs_auto_chooses_libusb_imports_and_follows_hotplug(vhci_guest):
    g, started = vhci_guest
    busid = gadgets.sourcesink(g)
    baseline, debian = _sysfs_baseline(g, busid)
    # the namespace really has no sysfs, and usbip list -l / bind work there (auto -> libusb)
    r = g.run(_in_no_sysfs(g, f"ls /sys/bus/usb/devices 2>&1; {_ours('--json list -l --enumerate auto')}"))
    assert "No such file" in r.out, r.out
    listed = json.loads(r.out[r.out.index("{") :])["devices"]
    assert [(d["idVendor"], d["idProduct"]) for d in listed if d["busid"] == busid] == [("0525", "a4a0")], listed
    r = g.run(_in_no_sysfs(g, _ours(f"bind -b {q(busid)} --state-file {STATE}")))
    assert r.rc == 0, r.out
    pid, log = _start_usbipd(g, no_sysfs=True)  # --enumerate left to auto
    started.append((pid, log))
    listing = _wait_exportable(g, busid)
    rec = _records(g)[busid]
    assert _same(rec) == _same(baseline), (rec, baseline)
    assert _debian_listing(listing, busid) == debian, listing
    _import_and_check(g, busid)
    # unplugged: withdrawn; plugged in again (new address): exported and importable again
    udc_file = f"{gadgets.CONFIGFS}/sourcesink/UDC"
    udc = g.run(f"cat {udc_file}").out.strip()
    g.run(f'echo "" > {udc_file}', check=True)
    _wait_exportable(g, busid, present=False)
    g.run(f"echo {q(udc)} > {udc_file}", check=True)
    gadgets.wait_for_device(g, gadgets.GADGET_ZERO_VID, gadgets.GADGET_ZERO_PID, "/dummy_hcd.", timeout=30)
    _wait_exportable(g, busid)
    again = _records(g)[busid]
    assert again["devnum"] != rec["devnum"] and _same(again) == {
        **_same(rec),
        "devnum": again["devnum"],
        "devid": again["devid"],
    }
    _import_and_check(g, busid)
    out = g.run(f"cat {log}").out
    assert "devices found through libusb" in out, out[-3000:]
    opened = re.findall(rf"{re.escape(busid)}: (opened through libusb_open|not in libusb's device list)", out)
    assert len(opened) == 2, out[-4000:]
    print("imports opened by:", opened)
