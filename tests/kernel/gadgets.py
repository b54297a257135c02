"""USB gadget / usbip helpers that act inside the kernel-test guest.

Everything here drives a :class:`harness.Guest` through ``guest.run``:

* configfs gadgets on ``dummy_hcd`` (the gadget's device shows up on
  dummy_hcd's own host side, e.g. busid ``1-1`` under
  ``/sys/devices/platform/dummy_hcd.0/usb1/``);
* exporting such a device with the kernel's ``usbip-host`` + Debian's
  ``usbipd`` and importing it with ``usbip attach`` through ``vhci-hcd``;
* :func:`reset` to bring a shared guest back to a clean state.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence

try:  # imported as tests.kernel.gadgets or as a top-level module (rootdir/conftest)
    from .harness import Guest, GuestError
except ImportError:  # pragma: no cover
    from harness import Guest, GuestError  # type: ignore

CONFIGFS = "/sys/kernel/config/usb_gadget"
USBIP_PORT = 3240
GADGET_ZERO_VID = 0x0525
GADGET_ZERO_PID = 0xA4A0
#: Debian's tools, by absolute path: the project installs its own ``usbip`` /
#: ``usbipd`` entry points that may come first in some PATHs.
USBIP = "/usr/sbin/usbip"
USBIPD = "/usr/sbin/usbipd"


def q(s: object) -> str:
    return shlex.quote(str(s))


def poll_sh(cond: str, timeout: float, interval: float = 0.1) -> str:
    """Shell snippet: wait until ``cond`` succeeds, ``exit 1`` after
    ``timeout`` seconds of wall time (process spawning is slow under TCG, so
    loops are bounded by time, not by iteration count)."""
    return (
        f"_end=$(( $(date +%s) + {int(timeout + 0.999)} )); "
        f"until {cond}; do [ $(date +%s) -ge $_end ] && exit 1; sleep {interval}; done"
    )


def modprobe(guest: Guest, *modules: str, params: str = "") -> None:
    """modprobe each module (params apply to a single module)."""
    for m in modules:
        guest.run(f"modprobe {q(m)} {params}", timeout=120, check=True)


def ensure_dummy_hcd(guest: Guest, num: int = 2) -> list[str]:
    """Load dummy_hcd (``num`` UDC/HCD pairs, only honoured on first load),
    libcomposite and configfs; return the UDC names (``dummy_udc.N``)."""
    guest.run(
        f"grep -q '^dummy_hcd ' /proc/modules || modprobe dummy_hcd num={int(num)}; "
        "modprobe libcomposite; modprobe configfs; "
        "mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config",
        timeout=120,
        check=True,
    )
    return udcs(guest)


def udcs(guest: Guest) -> list[str]:
    """All UDC names in /sys/class/udc."""
    out = guest.run("ls /sys/class/udc 2>/dev/null", check=False).out
    return sorted(out.split(), key=_natural)


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def used_udcs(guest: Guest) -> set[str]:
    out = guest.run(f"cat {CONFIGFS}/*/UDC 2>/dev/null", check=False).out
    return {line.strip() for line in out.splitlines() if line.strip()}


def free_udc(guest: Guest) -> str:
    """First dummy UDC that no configfs gadget is bound to."""
    used = used_udcs(guest)
    for u in ensure_dummy_hcd(guest):
        if u.startswith("dummy_udc.") and u not in used:
            return u
    raise GuestError(f"no free dummy UDC (in use: {sorted(used)})")


def hcd_for_udc(udc: str) -> str:
    """``dummy_udc.N`` -> ``dummy_hcd.N`` (the host side of the same pair)."""
    m = re.fullmatch(r"dummy_udc\.(\d+)", udc)
    if not m:
        raise GuestError(f"not a dummy_hcd UDC: {udc}")
    return f"dummy_hcd.{m.group(1)}"


def _find_device_script(vid: int, pid: int, path_filter: str) -> str:
    return (
        # shell builtins only (read), forks are slow under TCG
        "for d in /sys/bus/usb/devices/*; do "
        "  [ -f $d/idVendor ] || continue; read v < $d/idVendor; "
        f'  [ "$v" = {vid:04x} ] || continue; '
        "  read p < $d/idProduct; "
        f'  [ "$p" = {pid:04x} ] || continue; '
        f'  case "$(readlink -f $d)" in *{path_filter}*) echo ${{d##*/}};; esac; '
        "done"
    )


def find_devices(guest: Guest, vid: int, pid: int, path_filter: str = "/") -> list[str]:
    """Busids of USB devices vid:pid whose sysfs path contains path_filter
    (e.g. ``/dummy_hcd.0/`` or ``/vhci_hcd.``)."""
    out = guest.run(_find_device_script(vid, pid, path_filter), check=True).out
    return sorted(out.split(), key=_natural)


def wait_for_device(
    guest: Guest, vid: int, pid: int, path_filter: str = "/", timeout: float = 30, exclude: Iterable[str] = ()
) -> str:
    """Wait (polling inside the guest) until a matching device appears."""
    excl = " ".join(q(e) for e in exclude)
    script = (
        f"_end=$(( $(date +%s) + {int(timeout + 0.999)} )); while :; do "
        f"  for b in $({_find_device_script(vid, pid, path_filter)}); do "
        f'    case " {excl} " in *" $b "*) ;; *) echo $b; exit 0;; esac; '
        "  done; [ $(date +%s) -ge $_end ] && exit 1; sleep 0.1; "
        "done"
    )
    r = guest.run(script, timeout=timeout + 30)
    if r.rc != 0 or not r.out.strip():
        raise GuestError(
            f"no USB device {vid:04x}:{pid:04x} under {path_filter!r} after {timeout}s\n"
            + guest.run("ls -l /sys/bus/usb/devices/; dmesg | tail -30").out
        )
    return r.out.split()[0]


def wait_gone(guest: Guest, busid: str, timeout: float = 30) -> None:
    r = guest.run(
        poll_sh(f"[ ! -e /sys/bus/usb/devices/{q(busid)} ]", timeout),
        timeout=timeout + 30,
    )
    if r.rc != 0:
        raise GuestError(f"USB device {busid} still present after {timeout}s")


def dmesg_mark(guest: Guest) -> str:
    """Put a unique marker line into the kernel log; :func:`dmesg_since` returns what came after.
    (Counting lines breaks once the ring buffer is full and old lines drop out.)"""
    token = f"cyusbip-mark-{uuid.uuid4().hex}"
    guest.run(f"echo {token} > /dev/kmsg", check=True)
    return token


def dmesg_since_sh(mark: str) -> str:
    """Shell snippet printing the kernel log after ``mark`` (all of it if the marker dropped out)."""
    f = "/tmp/.dmesg.$$"
    return f"dmesg > {f}; if grep -q {mark} {f}; then sed '1,/{mark}/d' {f}; else cat {f}; fi; rm -f {f}"


def dmesg_since(guest: Guest, mark: str) -> str:
    return guest.run(dmesg_since_sh(mark)).out


def assert_no_oops(guest: Guest, mark: str) -> None:
    """No oops, BUG, GPF, panic or hung task in dmesg since ``mark``."""
    new = dmesg_since(guest, mark)
    bad = [ln for ln in new.splitlines() if re.search(r"Oops|BUG:|general protection|Kernel panic|hung_task", ln)]
    assert not bad, "kernel trouble in dmesg:\n" + new[-6000:]


# --------------------------------------------------------------------------
# configfs gadgets


@dataclasses.dataclass
class Gadget:
    name: str  # configfs directory name under /sys/kernel/config/usb_gadget
    udc: str  # e.g. dummy_udc.0
    vid: int
    pid: int
    busid: str  # the device on dummy_hcd's host side, e.g. "1-1"

    @property
    def path(self) -> str:
        return f"{CONFIGFS}/{self.name}"

    def remove(self, guest: Guest) -> None:
        remove_gadget(guest, self.name)


def create_gadget(
    guest: Guest,
    name: str,
    functions: Sequence[tuple[str, Mapping[str, object]]],
    *,
    vid: int = GADGET_ZERO_VID,
    pid: int = GADGET_ZERO_PID,
    udc: str | None = None,
    bcd_usb: int = 0x0200,
    bcd_device: int = 0x0100,
    device_class: int | None = None,
    manufacturer: str = "cyusbip",
    product: str = "cyusbip test gadget",
    serial: str | None = None,
    max_power: int = 100,
    modules: Sequence[str] = (),
    timeout: float = 30,
) -> Gadget:
    """Create configfs gadget ``name`` with ``functions`` (e.g.
    ``[("SourceSink.0", {"pattern": 1})]``; attribute values are written with
    echo, ``bytes`` values byte for byte), bind it to ``udc`` (default: a free dummy UDC) and wait for the
    device to enumerate on the matching dummy_hcd; return a :class:`Gadget`."""
    ensure_dummy_hcd(guest)
    if modules:
        modprobe(guest, *modules)
    udc = udc or free_udc(guest)
    hcd = hcd_for_udc(udc)
    before = find_devices(guest, vid, pid, f"/{hcd}/")
    g = f"{CONFIGFS}/{name}"
    serial = serial or f"{name}-{int(time.time())}"
    lines = [
        "set -e",
        f"mkdir {q(g)}",
        f"cd {q(g)}",
        f"echo 0x{vid:04x} > idVendor",
        f"echo 0x{pid:04x} > idProduct",
        f"echo 0x{bcd_usb:04x} > bcdUSB",
        f"echo 0x{bcd_device:04x} > bcdDevice",
    ]
    if device_class is not None:
        lines.append(f"echo 0x{device_class:02x} > bDeviceClass")
    lines += [
        "mkdir strings/0x409",
        f"echo {q(manufacturer)} > strings/0x409/manufacturer",
        f"echo {q(product)} > strings/0x409/product",
        f"echo {q(serial)} > strings/0x409/serialnumber",
        "mkdir configs/c.1",
        "mkdir configs/c.1/strings/0x409",
        "echo 'cyusbip config' > configs/c.1/strings/0x409/configuration",
        f"echo {int(max_power)} > configs/c.1/MaxPower",
    ]
    for fname, attrs in functions:
        lines.append(f"mkdir functions/{q(fname)}")
        for attr, value in attrs.items():
            target = f"functions/{q(fname)}/{q(attr)}"
            if isinstance(value, bytes):  # binary attribute (e.g. a HID report_desc): octal escapes
                lines.append("printf '" + "".join(f"\\{b:03o}" for b in value) + f"' > {target}")
            else:
                lines.append(f"echo {q(value)} > {target}")
        lines.append(f"ln -s functions/{q(fname)} configs/c.1/")
    lines.append(f"echo {q(udc)} > UDC")
    r = guest.run("\n".join(lines), timeout=60)
    if r.rc != 0:
        detail = guest.run("dmesg | tail -20").out
        remove_gadget(guest, name)
        raise GuestError(f"creating gadget {name} failed (rc={r.rc}):\n{r.out}\n--- dmesg ---\n{detail}")
    try:
        busid = wait_for_device(guest, vid, pid, f"/{hcd}/", timeout=timeout, exclude=before)
    except GuestError:
        remove_gadget(guest, name)
        raise
    return Gadget(name=name, udc=udc, vid=vid, pid=pid, busid=busid)


def sourcesink(
    guest: Guest,
    vid: int = GADGET_ZERO_VID,
    pid: int = GADGET_ZERO_PID,
    isoc: bool = False,
    pattern: int = 1,
    *,
    name: str = "sourcesink",
    udc: str | None = None,
    bulk_buflen: int | None = None,
    isoc_maxpacket: int = 1024,
    isoc_interval: int = 4,
    timeout: float = 30,
) -> str:
    """Gadget-zero style SourceSink gadget on dummy_hcd; returns its busid.

    ``pattern``: 0 zeros, 1 mod63, 2 none.  ``isoc=False`` sets
    ``isoc_maxpacket=0`` (alt setting 1 then has zero-bandwidth iso
    endpoints); ``isoc=True`` gives alt 1 real iso endpoints.
    Remove with ``remove_gadget(guest, name)``."""
    attrs: dict[str, object] = {"pattern": pattern}
    if isoc:
        attrs.update(isoc_maxpacket=isoc_maxpacket, isoc_interval=isoc_interval)
    else:
        attrs.update(isoc_maxpacket=0)
    if bulk_buflen is not None:
        attrs["bulk_buflen"] = bulk_buflen
    g = create_gadget(
        guest,
        name,
        [("SourceSink.0", attrs)],
        vid=vid,
        pid=pid,
        udc=udc,
        product="Gadget Zero (cyusbip SourceSink)",
        modules=("usb_f_ss_lb",),
        timeout=timeout,
    )
    return g.busid


def remove_gadget(guest: Guest, name: str) -> None:
    """Unbind and delete configfs gadget ``name`` (no error if absent)."""
    g = f"{CONFIGFS}/{name}"
    script = f"""
g={q(g)}
[ -d "$g" ] || exit 0
echo "" > "$g/UDC" 2>/dev/null
for c in "$g"/configs/*; do
    [ -d "$c" ] || continue
    for l in "$c"/*; do [ -L "$l" ] && rm -f "$l"; done
    for s in "$c"/strings/*; do [ -d "$s" ] && rmdir "$s"; done
    rmdir "$c"
done
for f in "$g"/functions/*; do [ -d "$f" ] && rmdir "$f"; done
for s in "$g"/strings/*; do [ -d "$s" ] && rmdir "$s"; done
for o in "$g"/os_desc/*; do [ -L "$o" ] && rm -f "$o"; done
rmdir "$g"
"""
    r = guest.run(script, timeout=60)
    if r.rc != 0:
        raise GuestError(f"removing gadget {name} failed:\n{r.out}")


def gadget_names(guest: Guest) -> list[str]:
    out = guest.run(f"ls {CONFIGFS} 2>/dev/null").out
    return out.split()


def remove_all_gadgets(guest: Guest) -> None:
    for name in gadget_names(guest):
        remove_gadget(guest, name)


# --------------------------------------------------------------------------
# kernel usbip (usbip-host / usbipd / vhci-hcd)


def start_usbipd(guest: Guest, port: int = USBIP_PORT, timeout: float = 30) -> None:
    """Start Debian's ``usbipd -D`` (if not running) and wait until it listens."""
    hexport = f"{port:04X}"
    guest.run(
        "modprobe usbip-host; "
        f"pidof usbipd >/dev/null || {USBIPD} -D --tcp-port {port} || exit; "
        + poll_sh(
            f"awk '$2 ~ /:{hexport}$/ && $4 == \"0A\" {{f=1}} END {{exit !f}}' /proc/net/tcp /proc/net/tcp6", timeout
        ),
        timeout=timeout + 60,
        check=True,
    )


#: stop Debian's usbipd (SIGTERM, SIGKILL after 10 s); a snippet that other commands can go on after
_STOP_USBIPD = (
    "if pids=$(pidof usbipd); then kill $pids; "
    "(" + poll_sh("! pidof usbipd >/dev/null", 10) + "); "
    "pids=$(pidof usbipd) && kill -9 $pids; fi"
)


def stop_usbipd(guest: Guest) -> None:
    guest.run(f"{_STOP_USBIPD}; true", timeout=60)


def device_driver(guest: Guest, busid: str) -> str | None:
    """Driver of the USB *device* busid (``usb``, ``usbip-host``), or None."""
    out = guest.run(f"readlink /sys/bus/usb/devices/{q(busid)}/driver").out.strip()
    return out.rsplit("/", 1)[-1] if out else None


def unbind_interface_drivers(guest: Guest, busid: str, drivers: Iterable[str] = ("usbtest",)) -> None:
    """Unbind ``drivers`` (default usbtest) from busid's interfaces."""
    names = " ".join(q(d) for d in drivers)
    guest.run(
        f"for i in /sys/bus/usb/devices/{q(busid)}:*; do "
        "  [ -L $i/driver ] || continue; drv=$(basename $(readlink $i/driver)); "
        f'  for d in {names}; do [ "$drv" = "$d" ] && '
        "echo ${i##*/} > /sys/bus/usb/drivers/$drv/unbind; done; "
        "done; true",
        check=True,
    )


def kernel_export(guest: Guest, busid: str, port: int = USBIP_PORT) -> None:
    """Export busid with the kernel's usbip-host and Debian's usbipd:
    modprobe usbip-host, ``usbipd -D``, unbind usbtest, ``usbip bind -b``."""
    start_usbipd(guest, port)
    unbind_interface_drivers(guest, busid)
    if device_driver(guest, busid) == "usbip-host":
        return
    guest.run(f"{USBIP} bind -b {q(busid)}", timeout=60, check=True)
    drv = device_driver(guest, busid)
    if drv != "usbip-host":
        raise GuestError(f"usbip bind -b {busid}: device driver is {drv!r}, not usbip-host")


def kernel_unexport(guest: Guest, busid: str) -> None:
    """``usbip unbind -b busid`` (if bound to usbip-host)."""
    if device_driver(guest, busid) == "usbip-host":
        guest.run(f"{USBIP} unbind -b {q(busid)}", timeout=60, check=True)


def exportable(guest: Guest, host: str = "127.0.0.1", port: int = USBIP_PORT) -> str:
    """Output of ``usbip list -r host``."""
    return guest.run(f"{USBIP} --tcp-port {port} list -r {q(host)}", timeout=60).out


@dataclasses.dataclass
class ImportedPort:
    port: int  # vhci port number (for usbip detach -p)
    remote_busid: str  # busid on the exporting side
    url: str  # usbip://host:port/busid
    local_busid: str  # busid of the device under vhci_hcd, "" if not yet known


_PORT_RE = re.compile(r"^Port (\d+):")
_URL_RE = re.compile(r"(\S+) -> (usbip://\S+/(\S+))")


def usbip_port(guest: Guest) -> list[ImportedPort]:
    """Parse ``usbip port`` (imported devices)."""
    out = guest.run(f"{USBIP} port", timeout=60).out
    ports: list[ImportedPort] = []
    cur: int | None = None
    for line in out.splitlines():
        m = _PORT_RE.match(line.strip())
        if m:
            cur = int(m.group(1))
            continue
        m = _URL_RE.search(line)
        if m and cur is not None:
            ports.append(ImportedPort(cur, m.group(3), m.group(2), m.group(1)))
            cur = None
    return ports


def vhci_devices(guest: Guest, vid: int | None = None, pid: int | None = None) -> list[str]:
    """Busids of USB devices attached under any vhci_hcd."""
    if vid is None or pid is None:
        out = guest.run(
            "for d in /sys/bus/usb/devices/*; do [ -f $d/idVendor ] || continue; "
            'case "$(readlink -f $d)" in */vhci_hcd.*/usb*/*) '
            '[ -f $d/busnum ] && [ "$(cat $d/devnum)" != 1 ] && echo ${d##*/};; esac; done'
        ).out
        return sorted(out.split(), key=_natural)
    return find_devices(guest, vid, pid, "/vhci_hcd.")


def vhci_attach(
    guest: Guest,
    busid: str,
    host: str = "127.0.0.1",
    port: int = USBIP_PORT,
    vid: int | None = None,
    pid: int | None = None,
    timeout: float = 30,
) -> ImportedPort:
    """``usbip attach -r host -b busid`` and wait for the vhci device
    (matched by vid:pid if given); returns the imported port."""
    modprobe(guest, "vhci-hcd")
    before = vhci_devices(guest, vid, pid) if vid is not None else vhci_devices(guest)
    guest.run(f"{USBIP} --tcp-port {port} attach -r {q(host)} -b {q(busid)}", timeout=60, check=True)
    if vid is not None and pid is not None:
        local = wait_for_device(guest, vid, pid, "/vhci_hcd.", timeout=timeout, exclude=before)
    else:
        local = ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = [d for d in vhci_devices(guest) if d not in before]
            if new:
                local = new[0]
                break
            time.sleep(0.2)
    for p in usbip_port(guest):
        if p.remote_busid == busid and f"{host}:{port}" in p.url:
            p.local_busid = local
            return p
    raise GuestError(f"usbip port does not list {busid} after attach:\n" + guest.run(f"{USBIP} port").out)


def vhci_detach(guest: Guest, port: int) -> None:
    guest.run(f"{USBIP} detach -p {int(port)}", timeout=60, check=True)


#: shell test: some port of vhci_hcd.0's controllers is in a state Debian's ``usbip port`` lists
#: (not VDEV_ST_NULL 004 nor VDEV_ST_NOTASSIGNED 005; the first line of each status file is its header)
_VHCI_IN_USE = (
    "[ -d /sys/devices/platform/vhci_hcd.0 ] && "
    'awk \'FNR > 1 && $3 != "004" && $3 != "005" {f=1} END {exit !f}\' /sys/devices/platform/vhci_hcd.0/status*'
)
_GADGETS_FOLLOW = "cyusbip-reset: gadgets"


def reset(guest: Guest) -> None:
    """Best-effort cleanup of a shared guest: detach all vhci ports, unbind
    all usbip-host devices, stop usbipd, remove all configfs gadgets.

    One guest command when there is nothing to undo (the usual case: a test cleans up after
    itself and every test resets before and after): Debian's ``usbip port`` (seconds under TCG)
    runs only when vhci's status shows a port in use."""
    out = guest.run(
        f"u={USBIP}; "
        f"if {_VHCI_IN_USE}; then "
        "  for p in $($u port 2>/dev/null | sed -n 's/^Port 0*\\([0-9][0-9]*\\):.*/\\1/p'); do "
        "    $u detach -p $p; done; fi; "
        'for d in /sys/bus/usb/drivers/usbip-host/*-*; do [ -e "$d" ] || continue; '
        "  $u unbind -b ${d##*/}; done; "
        f"{_STOP_USBIPD}; "
        f"echo {_GADGETS_FOLLOW}; ls {CONFIGFS} 2>/dev/null; true",
        timeout=120,
    ).out
    names = out.split(_GADGETS_FOLLOW, 1)[1].split() if _GADGETS_FOLLOW in out else gadget_names(guest)
    for name in names:
        remove_gadget(guest, name)


def block_device_of(guest: Guest, local_busid: str, timeout: float = 90) -> str:
    """Name (``sdX``) of the disk behind the vhci device ``local_busid``, once it has a size."""
    script = (
        f"_end=$(( $(date +%s) + {int(timeout)} )); while :; do "
        "  for b in /sys/block/sd*; do [ -e $b ] || continue; "
        f'    case "$(readlink -f $b)" in */vhci_hcd.*/{local_busid}/*) '
        '      read s < $b/size; [ "$s" != 0 ] && [ -b /dev/${b##*/} ] && { echo ${b##*/}; exit 0; };; esac; '
        "  done; [ $(date +%s) -ge $_end ] && exit 1; sleep 0.2; "
        "done"
    )
    r = guest.run(script, timeout=timeout + 30)
    assert r.rc == 0 and r.out.strip(), "no block device under vhci:\n" + guest.run("dmesg | tail -30").out
    return r.out.split()[0]
