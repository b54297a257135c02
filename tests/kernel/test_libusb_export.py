"""Our usbipd exporting real (configfs gadget on dummy_hcd) devices through libusb,
imported by the guest kernel's own vhci-hcd."""

from __future__ import annotations

import json
import re
import time

import pytest

from usbip.virtual.keyboard import BOOT_KEYBOARD_REPORT

from . import gadgets, usbtest
from .audio import AUDIO_PID, AUDIO_VID, capture_and_playback
from .gadgets import assert_no_oops, dmesg_mark, q
from .guest_usbipd import PORT, STATE
from .guest_usbipd import bind as _bind
from .guest_usbipd import start as _start_usbipd
from .guest_usbipd import stop as _stop_usbipd
from .guest_usbipd import usbip as _usbip
from .guest_usbipd import wait_exportable as _wait_exportable
from .ourserver import HOST_FROM_GUEST, our_usbipd_fixture  # noqa: F401  (the our_usbipd fixture)

# Issue 5 (vhci hung after SET_CONFIGURATION): usbipd's sysfs rescan ran in the event loop and
# read bConfigurationValue/serial of every USB device, the vhci-imported one included; those
# attributes take the USB device lock, which the hub thread holds while it configures the
# device through us -> the loop blocked, the next URB was never answered. Scans now run in a
# worker thread (usbip/backends/libusb/backend.py).

MS_VID, MS_PID = 0x1209, 0x0001  # pid.codes test ids: nothing in the guest claims them but usb-storage


def _our_attach(guest, busid: str, vid: int, pid: int, vhci_port: int | None = None) -> str:
    """OUR ``usbip attach`` of busid from our usbipd (on ``vhci_port`` if given); the local
    busid under vhci_hcd."""
    before = gadgets.vhci_devices(guest, vid, pid)
    choice = "" if vhci_port is None else f" -p {vhci_port}"
    r = _usbip(guest, f"-t {PORT} attach -r 127.0.0.1 -b {q(busid)}{choice}")
    assert r.rc == 0, r.out
    return gadgets.wait_for_device(guest, vid, pid, "/vhci_hcd.", timeout=60, exclude=before)


@pytest.fixture
def usbipd(clean_guest):
    guest = clean_guest
    gadgets.modprobe(guest, "vhci-hcd")
    guest.run(f"rm -f {STATE}", check=True)
    pid, log = _start_usbipd(guest)
    yield guest, pid, log
    hung = _stop_usbipd(guest, pid) if guest.run(f"kill -0 {pid}").rc == 0 else ""
    print(guest.run(f"tail -{80 if hung else 40} {log}").out)
    assert not hung, hung


def test_bind_list_and_sourcesink_import(usbipd):
    guest, pid, _log = usbipd
    busid = gadgets.sourcesink(guest)
    # not bound yet: not listed, not importable
    assert f" {busid}:" not in gadgets.exportable(guest, port=PORT)
    out = _usbip(guest, "--json list -l").out
    assert re.search(rf'"busid": "{re.escape(busid)}"', out)
    _bind(guest, busid)
    cmd = f"USBIP_STATE_FILE={STATE} {guest.python} -m usbip.cli.usbip_main --json list -l"
    listed = json.loads(guest.run(cmd).out)
    assert [d["bound"] for d in listed["devices"] if d["busid"] == busid] == [True]
    listing = _wait_exportable(guest, busid)
    assert "0525:a4a0" in listing
    # Debian's client imports it through the kernel's vhci-hcd
    try:
        port = gadgets.vhci_attach(guest, busid, port=PORT, vid=gadgets.GADGET_ZERO_VID, pid=gadgets.GADGET_ZERO_PID)
    except Exception:
        print(
            guest.run(
                f"for t in /proc/{pid}/task/*; do echo $t; cat $t/comm $t/wchan; echo; cat $t/stack; done; "
                f"echo w > /proc/sysrq-trigger; dmesg | tail -150; tail -30 {_log}",
                timeout=30,
            ).out
        )
        raise
    local = port.local_busid
    assert local
    # enumerated and configured through us: same descriptors as on the exporting side
    same = guest.run(
        f"cmp /sys/bus/usb/devices/{local}/descriptors /sys/bus/usb/devices/{busid}/descriptors && "
        f"cat /sys/bus/usb/devices/{local}/bConfigurationValue"
    )
    assert same.rc == 0 and same.out.strip() == "1", same.out
    # bulk traffic: usbtest (when bound on the vhci side) or raw usbfs through libusb
    r = guest.run_python(
        f"""
import usb1, sys
ctx = usb1.USBContext(); ctx.open()
d = '/sys/bus/usb/devices/{local}'
b, n = open(d + '/busnum').read().strip(), open(d + '/devnum').read().strip()
import os
h = ctx.wrapSysDevice(os.open('/dev/bus/usb/%03d/%03d' % (int(b), int(n)), os.O_RDWR))
if h.kernelDriverActive(0): h.detachKernelDriver(0)
h.claimInterface(0)
cfg = h.getDevice()[0]
eps = [e.getAddress() for e in cfg[0][0]]
ep_in = [e for e in eps if e & 0x80][0]; ep_out = [e for e in eps if not e & 0x80][0]
total = 0
for i in range(20):
    data = h.bulkRead(ep_in, 4096, timeout=5000)
    bad = [j for j in range(len(data)) if data[j] != j % 512 % 63]  # restarts every packet
    assert not bad, ('pattern', len(data), bad[:5], bytes(data[:80]).hex(), bytes(data[bad[0]:bad[0]+16]).hex())
    total += len(data)
    h.bulkWrite(ep_out, bytes(j % 512 % 63 for j in range(4096)), timeout=5000)
# hostile special requests, raw (the kernel here checks nothing): SET_INTERFACE to an alt setting
# and SET_CONFIGURATION to configurations the device does not have. Each fails; the import lives on
# (libusb's NOT_FOUND for them used to mark the exported device gone and end the import).
hostile = []
for bm, req, val, idx in ((0x01, 0x0B, 5, 0), (0x00, 0x09, 7, 0), (0x00, 0x09, 0x0101, 0)):
    try:
        h.controlWrite(bm, req, val, idx, b'', timeout=5000)
        hostile.append('accepted')
    except usb1.USBError as e:
        hostile.append(type(e).__name__)
assert 'accepted' not in hostile, hostile
data = h.bulkRead(ep_in, 512, timeout=5000)
assert len(data) == 512 and data[1] == 1, bytes(data[:8])
print('HOSTILE', hostile)
print('OK', total)
""",
        timeout=120,
    )
    assert "OK" in r.out, r.out
    conf = guest.run(f"cat /sys/bus/usb/devices/{busid}/bConfigurationValue").out.strip()
    assert conf == "1" and "gone" not in guest.run(f"cat {_log}").out, conf
    gadgets.vhci_detach(guest, port.port)
    assert guest.run(f"kill -0 {pid}").rc == 0
    # unbind: no longer exported; the device goes back to its kernel driver state
    assert _usbip(guest, f"unbind -b {q(busid)} --state-file {STATE}").rc == 0
    _wait_exportable(guest, busid, present=False)


def test_mass_storage_roundtrip(usbipd):
    guest, _pid, _log = usbipd
    gadgets.modprobe(guest, "usb-storage", "sd_mod", "usb_f_mass_storage")
    backing = "/tmp/cyusbip-libusb/backing.img"
    guest.run(f"dd if=/dev/zero of={backing} bs=1M count=8 2>/dev/null", check=True)
    g = gadgets.create_gadget(
        guest,
        "msg",
        [("mass_storage.0", {"lun.0/file": backing, "stall": 1})],
        vid=MS_VID,
        pid=MS_PID,
    )
    _bind(guest, g.busid)
    _wait_exportable(guest, g.busid)
    r = _usbip(
        guest,
        f"-t {PORT} attach -r 127.0.0.1 -b {q(g.busid)}",
    )
    assert r.rc == 0, r.out
    local = gadgets.wait_for_device(guest, MS_VID, MS_PID, "/vhci_hcd.", timeout=60)
    find_disk = (
        f"for b in /sys/bus/usb/devices/{local}:1.0/host*/target*/*/block/*; do "
        '[ -e "$b" ] && echo ${b##*/} && exit 0; done; exit 1'
    )
    r = guest.run(gadgets.poll_sh(f"({find_disk}) >/dev/null", 60) + f"; {find_disk}", timeout=90)
    assert r.rc == 0, r.out + guest.run("dmesg | tail -30").out
    disk = "/dev/" + r.out.split()[-1]
    script = f"""
set -e
[ -b {disk} ] || mknod {disk} b $(cat /sys/class/block/{disk[5:]}/dev | tr : ' ')
dd if=/dev/urandom of=/tmp/cyusbip-libusb/rand.bin bs=64k count=32 2>/dev/null
dd if=/tmp/cyusbip-libusb/rand.bin of={disk} bs=64k oflag=direct conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if={disk} of=/tmp/cyusbip-libusb/back.bin bs=64k count=32 iflag=direct 2>/dev/null
dd if={backing} of=/tmp/cyusbip-libusb/file.bin bs=64k count=32 2>/dev/null
sha256sum /tmp/cyusbip-libusb/rand.bin /tmp/cyusbip-libusb/back.bin /tmp/cyusbip-libusb/file.bin
"""
    r = guest.run(script, timeout=300)
    assert r.rc == 0, r.out
    sums = [line.split()[0] for line in r.out.splitlines() if line.strip()]
    assert len(sums) == 3 and sums[0] == sums[1] == sums[2], r.out
    for p in gadgets.usbip_port(guest):
        gadgets.vhci_detach(guest, p.port)


def test_gadget_unplugged_while_imported(usbipd):
    guest, pid, log = usbipd
    busid = gadgets.sourcesink(guest)
    _bind(guest, busid)
    _wait_exportable(guest, busid)
    port = gadgets.vhci_attach(guest, busid, port=PORT, vid=gadgets.GADGET_ZERO_VID, pid=gadgets.GADGET_ZERO_PID)
    # keep bulk IN traffic going on the vhci side, then pull the gadget off its UDC
    bg_pid, bg_log = guest.start_background(
        f'{guest.python} -c "'
        "import usb1,os,sys;"
        f"d='/sys/bus/usb/devices/{port.local_busid}';"
        "b=int(open(d+'/busnum').read());n=int(open(d+'/devnum').read());"
        "c=usb1.USBContext();c.open();h=c.wrapSysDevice(os.open('/dev/bus/usb/%03d/%03d'%(b,n),os.O_RDWR));"
        "h.kernelDriverActive(0) and h.detachKernelDriver(0);h.claimInterface(0);"
        "print('reading',flush=True)\n"
        'while True: h.bulkRead(0x81, 65536, timeout=10000)"'
    )
    guest.run(gadgets.poll_sh(f"grep -q reading {bg_log}", 60), timeout=90)
    time.sleep(1)
    udc_file = f"{gadgets.CONFIGFS}/sourcesink/UDC"
    udc = guest.run(f"cat {udc_file}").out.strip()
    guest.run(f'echo "" > {udc_file}', check=True)
    # the import ends: the vhci port is freed; usbipd keeps running
    r = guest.run(gadgets.poll_sh(f"! {gadgets.USBIP} port 2>/dev/null | grep -q '^Port'", 30), timeout=60)
    assert r.rc == 0, guest.run(f"{gadgets.USBIP} port; tail -30 {log}").out
    assert guest.run(f"kill -0 {pid}").rc == 0
    guest.run(f"kill {bg_pid}")
    _wait_exportable(guest, busid, present=False)
    # plugged in again: the busid rule exports it again
    guest.run(f"echo {q(udc)} > {udc_file}", check=True)
    gadgets.wait_for_device(guest, gadgets.GADGET_ZERO_VID, gadgets.GADGET_ZERO_PID, "/dummy_hcd.", timeout=30)
    _wait_exportable(guest, busid)
    port = gadgets.vhci_attach(guest, busid, port=PORT, vid=gadgets.GADGET_ZERO_VID, pid=gadgets.GADGET_ZERO_PID)
    gadgets.vhci_detach(guest, port.port)
    out = guest.run(f"cat {log}").out
    assert "gone" in out, out[-3000:]


# ---------------------------------------------------------------- usbtest: ours vs the kernel's stub

#: SourceSink in alt 0 has bulk endpoints only: the interrupt (25, 26) cases are "not supported"
#: whoever exports it; iso needs alt 1 with iso endpoints, which dummy_hcd cannot provide.
#: The unlink cases (11, 12, 24) are left out of the comparison: Debian 6.1's usbip-host takes a
#: general protection fault in stub_rx_loop on usbtest's unlinks (seen here, the guest dies);
#: they run through our export alone (UNLINK_CASES).
USBTEST_CASES = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 17, 18, 19, 20, 21, 25, 26, 27, 28, 29]
UNLINK_CASES = [11, 12, 24]
USBTEST_ARGS = {"iterations": 10, "length": 1024, "vary": 64, "sglen": 8, "timeout": 240}
KERNEL_PORT = 3241


def _usbtest_on(
    guest, busid: str, title: str, cases: list[int] = USBTEST_CASES, args: dict | None = None
) -> dict[int, str]:
    usbtest.wait_bound(guest, busid)
    node = guest.run(usbtest.usbfs_node_script(busid), check=True).out.strip()
    mark = dmesg_mark(guest)
    results = usbtest.run_checked(guest, mark, node, cases, **(args or USBTEST_ARGS))
    print(usbtest.table(title, results))
    usbtest.ran_in_kernel(guest, mark, busid, results)
    assert sorted(results) == sorted(cases), usbtest.table(title, results)
    return {case: usbtest.verdict(res) for case, res in results.items()}


def test_usbtest_same_verdicts_as_kernel_stub(usbipd):
    """usbtest (pattern 1: every IN byte checked, SourceSink checks every OUT byte) on the
    SourceSink gadget: exported by our usbipd through libusb and imported with OUR ``usbip
    attach``, the cases pass/fail exactly as when the kernel's usbip-host exports it."""
    guest, pid, _log = usbipd
    gadgets.modprobe(guest, "usbtest")
    guest.run(f"echo 1 > {usbtest.PARAMS}/pattern", check=True)
    mark = dmesg_mark(guest)
    try:
        busid = gadgets.sourcesink(guest, pattern=1)
        direct = _usbtest_on(guest, busid, "usbtest on dummy_hcd, no USB/IP")

        _bind(guest, busid)
        _wait_exportable(guest, busid)
        local = _our_attach(guest, busid, gadgets.GADGET_ZERO_VID, gadgets.GADGET_ZERO_PID)
        ours = _usbtest_on(guest, local, "usbtest through our usbipd (libusb export)")
        unlinks = _usbtest_on(guest, local, "usbtest unlink cases, our usbipd", UNLINK_CASES)
        assert set(unlinks.values()) == {"pass"}, unlinks
        for p in gadgets.usbip_port(guest):
            gadgets.vhci_detach(guest, p.port)
        assert _usbip(guest, f"unbind -b {q(busid)} --state-file {STATE}").rc == 0
        _wait_exportable(guest, busid, present=False)
        assert guest.run(f"kill -0 {pid}").rc == 0

        gadgets.kernel_export(guest, busid, port=KERNEL_PORT)
        imp = gadgets.vhci_attach(
            guest, busid, port=KERNEL_PORT, vid=gadgets.GADGET_ZERO_VID, pid=gadgets.GADGET_ZERO_PID
        )
        kernel = _usbtest_on(guest, imp.local_busid, "usbtest through the kernel's usbip-host")
        gadgets.vhci_detach(guest, imp.port)
        gadgets.kernel_unexport(guest, busid)
    finally:
        usbtest.defaults(guest)
    assert_no_oops(guest, mark)
    assert ours == kernel, {c: (ours[c], kernel[c]) for c in USBTEST_CASES if ours[c] != kernel[c]}
    # the comparison means something: the data and control cases pass through both exports ...
    passed = {c for c, v in ours.items() if v == "pass"}
    assert passed >= {1, 2, 3, 5, 6, 7, 9, 10, 13, 14, 17, 18, 19, 20, 21, 29}, ours
    # ... and what fails (4 and 8: SourceSink answers a short read with its whole bulk_buflen,
    # -EOVERFLOW) fails on dummy_hcd without USB/IP too
    assert {c for c, v in ours.items() if v == "FAIL"} <= {c for c, v in direct.items() if v == "FAIL"}, direct


# ---------------------------------------------------------------- HID gadget

HID_VID, HID_PID = 0x1209, 0x0003


def _driver(guest, intf: str) -> str:
    return guest.run(f"readlink /sys/bus/usb/devices/{intf}/driver").out.strip().rsplit("/", 1)[-1]


def _char_node(guest, sysfs_class_dir: str) -> str:
    """/dev node of a char device from its sysfs class directory (mknod if devtmpfs lacks it)."""
    name = sysfs_class_dir.rstrip("/").rsplit("/", 1)[-1]
    r = guest.run(
        f'n=/dev/{name}; [ -c "$n" ] || {{ IFS=: read ma mi < {sysfs_class_dir}/dev; mknod "$n" c "$ma" "$mi"; }}; '
        "echo $n",
        check=True,
    )
    return r.out.strip()


def _start_reader(guest, node: str, until: bytes) -> tuple[int, str]:
    """Read from ``node`` in the background until the data ends with ``until`` (30 s bound);
    returns once the node is open."""
    pid, log = guest.start_background(
        f"exec {guest.python} -c "
        + q(
            "import os, select, time\n"
            f"fd = os.open({node!r}, os.O_RDONLY)\n"
            "print('open', flush=True)\n"
            "data, end = b'', time.monotonic() + 30\n"
            f"while not data.endswith({until!r}) and time.monotonic() < end:\n"
            "    if select.select([fd], [], [], 1)[0]:\n"
            "        data += os.read(fd, 64)\n"
            "print('data', data.hex(), flush=True)\n"
        )
    )
    r = guest.run(gadgets.poll_sh(f"grep -q '^open' {log}", 60), timeout=90)
    assert r.rc == 0, guest.run(f"cat {log}").out
    return pid, log


def _reader_result(guest, pid: int, log: str) -> bytes:
    r = guest.run(gadgets.poll_sh(f"grep -q '^data' {log}", 60) + f"; cat {log}", timeout=90)
    lines = [ln for ln in r.out.splitlines() if ln.startswith("data")]
    assert lines, r.out
    return bytes.fromhex(lines[0][4:].strip())


def test_hid_gadget_reports_both_ways(usbipd):
    """A configfs HID keyboard (f_hid) exported through libusb and imported with Debian's
    ``usbip attach``: input reports written to /dev/hidg0 come out of the imported device's
    hidraw node, an output report written to hidraw comes out of /dev/hidg0; the exporting
    side's usbhid is detached for the import and reattached after it."""
    guest, pid, _log = usbipd
    gadgets.modprobe(guest, "usbhid", "hid-generic", "usb_f_hid")
    g = gadgets.create_gadget(
        guest,
        "hid",
        [("hid.usb0", {"protocol": 1, "subclass": 1, "report_length": 8, "report_desc": BOOT_KEYBOARD_REPORT})],
        vid=HID_VID,
        pid=HID_PID,
    )
    intf = f"{g.busid}:1.0"
    assert guest.run(gadgets.poll_sh(f"[ -L /sys/bus/usb/devices/{intf}/driver ]", 30), timeout=60).rc == 0
    assert _driver(guest, intf) == "usbhid"
    _bind(guest, g.busid)
    _wait_exportable(guest, g.busid)
    imp = gadgets.vhci_attach(guest, g.busid, port=PORT, vid=HID_VID, pid=HID_PID)
    # our usbipd took the interface from usbhid (claimed through usbfs)
    assert _driver(guest, intf) == "usbfs"
    r = guest.run(
        gadgets.poll_sh(f"ls -d /sys/bus/usb/devices/{imp.local_busid}:1.0/*/hidraw/hidraw* >/dev/null 2>&1", 30)
        + f"; ls -d /sys/bus/usb/devices/{imp.local_busid}:1.0/*/hidraw/hidraw*",
        timeout=60,
    )
    assert r.rc == 0, r.out
    hidraw = _char_node(guest, r.out.split()[0])
    hidg = _char_node(guest, guest.run("ls -d /sys/class/hidg/hidg*", check=True).out.split()[0])

    # IN: key 'a' down, release, 'b' down (usage ids 4 and 5); hidraw hands out one report per read
    reports = [bytes([0, 0, 4, 0, 0, 0, 0, 0]), bytes(8), bytes([0, 0, 5, 0, 0, 0, 0, 0])]
    reader = _start_reader(guest, hidraw, reports[-1])
    for rep in reports:
        guest.write_file(hidg, rep)
    assert _reader_result(guest, *reader) == b"".join(reports)

    # OUT: LED report 0x05 (num lock + scroll lock); hidraw's first byte is the report id (none: 0).
    # /dev/hidg0 may still hold the LEDs-off report the keyboard handler sent at connect.
    reader = _start_reader(guest, hidg, b"\x05")
    guest.write_file(hidraw, b"\x00\x05")
    got = _reader_result(guest, *reader)
    assert got.endswith(b"\x05") and not got[:-1].strip(b"\x00"), got

    gadgets.vhci_detach(guest, imp.port)
    # released: usbhid drives the gadget's interface again
    r = guest.run(gadgets.poll_sh(f"readlink /sys/bus/usb/devices/{intf}/driver | grep -q /usbhid$", 30), timeout=60)
    assert r.rc == 0, _driver(guest, intf)
    assert guest.run(f"kill -0 {pid}").rc == 0


# ---------------------------------------------------------------- iso: a vhci device exported again

# dummy_hcd offers no iso endpoints (dummy_hcd.c: "we don't provide isochronous endpoints since
# we don't support them"), so no configfs gadget can stream iso there. The guest gets a real USB
# device with iso endpoints another way: our virtual loopback, served from the host and imported
# by the guest's vhci-hcd (hop 1). Our usbipd in the guest exports that device through libusb and
# the guest imports it a second time (hop 2): iso URBs then go vhci -> our server -> libusb ->
# usbfs -> vhci -> our host server and back.
# Hop 2 goes to another vhci controller than hop 1: a controller's hub thread holds its
# bandwidth_mutex while it sends SET_CONFIGURATION (usb_set_configuration), and exporting hop 1
# means doing SET_CONFIGURATION on hop 1 (the kernel stub does the same) -> on one controller
# both wait for each other (seen: the hub thread stuck in usb_kill_urb, our worker in usbfs).
# No comparison with the kernel's usbip-host here: Debian's `usbip bind` refuses a device attached
# to vhci_hcd ("bind loop detected").
ISO_CASES = [15, 16, 22, 23, 1, 2]
ISO_ARGS = {"iterations": 10, "length": 2048, "vary": 64, "sglen": 8, "timeout": 240}


def _free_port_on_second_vhci(guest) -> int:
    """A free high-speed port of vhci_hcd.1 (status.1 lists that controller's ports)."""
    out = guest.run("cat /sys/devices/platform/vhci_hcd.0/status.1", check=True).out
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 3 and f[0] == "hs" and f[2] == "004":
            return int(f[1])
    raise AssertionError("no free high-speed port on vhci_hcd.1:\n" + out)


def test_iso_usbtest_through_libusb_export(usbipd, our_usbipd):
    guest, pid, _log = usbipd
    srv = our_usbipd("loopback")
    vid, pid_ = gadgets.GADGET_ZERO_VID, gadgets.GADGET_ZERO_PID
    gadgets.modprobe(guest, "usbtest")
    mark = dmesg_mark(guest)
    try:
        hop1 = gadgets.vhci_attach(guest, "100-1", HOST_FROM_GUEST, srv.port, vid=vid, pid=pid_, timeout=60)
        _bind(guest, hop1.local_busid)
        _wait_exportable(guest, hop1.local_busid)
        guest.run(f"echo 1 > {usbtest.PARAMS}/alt", check=True)  # usbtest takes the iso altsetting at probe
        hop2 = _our_attach(guest, hop1.local_busid, vid, pid_, vhci_port=_free_port_on_second_vhci(guest))
        assert guest.run(f"cat /sys/bus/usb/devices/{hop2}:1.0/bAlternateSetting").out.strip() == "1"
        ours = _usbtest_on(guest, hop2, "usbtest, iso, through our libusb export", ISO_CASES, ISO_ARGS)
        for p in gadgets.usbip_port(guest):
            if p.remote_busid == hop1.local_busid and p.url.startswith(f"usbip://127.0.0.1:{PORT}/"):
                gadgets.vhci_detach(guest, p.port)
        # released: usbtest drives the hop 1 device again
        intf = f"{hop1.local_busid}:1.0"
        back = gadgets.poll_sh(f"readlink /sys/bus/usb/devices/{intf}/driver | grep -q /usbtest$", 30)
        r = guest.run(back, timeout=60)
        assert r.rc == 0, _driver(guest, intf)
        assert guest.run(f"kill -0 {pid}").rc == 0
    finally:
        usbtest.defaults(guest)
    assert_no_oops(guest, mark)
    assert set(ours.values()) == {"pass"}, ours


@pytest.mark.long  # two hops of iso under TCG; iso through the export stays in CI (usbtest iso cases)
def test_uac2_audio_through_libusb_export(usbipd, our_usbipd):
    """Audio over iso through the libusb export: our virtual UAC2 device (served from the host)
    imported by the guest's vhci-hcd (hop 1), exported by our usbipd through libusb and imported
    again (hop 2): snd-usb-audio on hop 2 captures and plays, checked frame by frame against the
    device; on release snd-usb-audio drives hop 1 again."""
    guest, pid, _log = usbipd
    srv = our_usbipd("audio")
    gadgets.modprobe(guest, "snd-usb-audio")
    mark = dmesg_mark(guest)
    hop1 = gadgets.vhci_attach(guest, "100-1", HOST_FROM_GUEST, srv.port, vid=AUDIO_VID, pid=AUDIO_PID, timeout=60)
    intf = f"{hop1.local_busid}:1.0"
    assert guest.run(gadgets.poll_sh(f"[ -L /sys/bus/usb/devices/{intf}/driver ]", 30), timeout=60).rc == 0
    assert _driver(guest, intf) == "snd-usb-audio"
    _bind(guest, hop1.local_busid)
    _wait_exportable(guest, hop1.local_busid)
    hop2 = _our_attach(guest, hop1.local_busid, AUDIO_VID, AUDIO_PID, vhci_port=_free_port_on_second_vhci(guest))
    assert _driver(guest, intf) == "usbfs"  # all three interfaces taken from snd-usb-audio
    # Two hops under TCG move ~200 one-packet URBs/s, slower than real time (1000/s); ALSA's default
    # 6000-frame periods in a 0.5 s buffer then miss its wait timeout (1.1 buffer times: EIO after
    # 0.55 s, seen). 100 ms periods in a 2 s buffer leave 2.2 s for each 100 URBs.
    capture_and_playback(guest, srv, hop2, alsa_opts="--buffer-time=2000000 --period-time=100000")
    for p in gadgets.usbip_port(guest):
        if p.remote_busid == hop1.local_busid and p.url.startswith(f"usbip://127.0.0.1:{PORT}/"):
            gadgets.vhci_detach(guest, p.port)
    back = gadgets.poll_sh(f"readlink /sys/bus/usb/devices/{intf}/driver | grep -q /snd-usb-audio$", 30)
    assert guest.run(back, timeout=60).rc == 0, _driver(guest, intf)
    assert guest.run(f"kill -0 {pid}").rc == 0
    assert_no_oops(guest, mark)
