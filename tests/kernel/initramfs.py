"""What the kernel-test VM boots: the host's QEMU and Debian kernel found (or the reason the
tests are skipped), and a tiny busybox initramfs built from the kernel's own modules (cached,
keyed by kernel version, init script and modules). See harness.py for the VM itself."""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from .errors import GuestError

#: where the writable host share is mounted inside the guest
GUEST_SHARE = "/mnt/cyusbip-share"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
#: modules the initramfs loads (dependencies are resolved from modules.dep)
INITRAMFS_MODULES = (
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "virtio_console",
    "virtio_net",
)


# --------------------------------------------------------------------------
# discovery / skip


def qemu_binary() -> str | None:
    name = os.environ.get("USBIP_QEMU", "qemu-system-x86_64")
    return shutil.which(name)


def _kernel_versions() -> list[str]:
    """Kernel versions that have a /boot image and usbip modules, newest first."""
    found = []
    for image in glob.glob("/boot/vmlinuz-*"):
        ver = os.path.basename(image)[len("vmlinuz-") :]
        if os.path.isdir(f"/lib/modules/{ver}/kernel/drivers/usb/usbip"):
            found.append(ver)

    def key(v: str):
        parts = []
        for chunk in v.replace("-", ".").split("."):
            parts.append((0, int(chunk), "") if chunk.isdigit() else (1, 0, chunk))
        return parts

    return sorted(found, key=key, reverse=True)


def find_kernel() -> tuple[str, str]:
    """Return (version, path of vmlinuz) of the kernel to boot."""
    ver = os.environ.get("USBIP_KERNEL_VERSION")
    if not ver:
        versions = _kernel_versions()
        if not versions:
            raise GuestError(
                "no /boot/vmlinuz-* with /lib/modules/<ver>/kernel/drivers/usb/usbip "
                "(apt-get install linux-image-amd64)"
            )
        ver = versions[0]
    image = f"/boot/vmlinuz-{ver}"
    if not os.path.exists(image):
        raise GuestError(f"{image} does not exist")
    return ver, image


def _is_static_elf(path: str) -> bool:
    """True for an ELF executable without a PT_INTERP (dynamic loader) header."""
    import struct

    try:
        with open(path, "rb") as fh:
            hdr = fh.read(64)
            if hdr[:4] != b"\x7fELF" or hdr[4] != 2:  # ELF64 only
                return False
            end = "<" if hdr[5] == 1 else ">"
            (phoff,) = struct.unpack_from(end + "Q", hdr, 0x20)
            phentsize, phnum = struct.unpack_from(end + "HH", hdr, 0x36)
            fh.seek(phoff)
            table = fh.read(phentsize * phnum)
    except (OSError, struct.error):
        return False
    for i in range(phnum):
        (p_type,) = struct.unpack_from(end + "I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def _busybox() -> str | None:
    for cand in BUSYBOX_CANDIDATES:
        if os.path.exists(cand) and _is_static_elf(cand):
            return cand
    return None


def skip_reason() -> str | None:
    """Why the kernel harness cannot run here, or None if it can."""
    if sys.platform != "linux":
        return "kernel tests need a Linux host"
    if os.geteuid() != 0:
        return "kernel tests need root (QEMU 9p export of / and guest root)"
    if qemu_binary() is None:
        return "qemu-system-x86_64 not installed (scripts/install-test-deps)"
    try:
        _ver, image = find_kernel()
    except GuestError as exc:
        return str(exc)
    if not os.access(image, os.R_OK):
        return f"{image} is not readable"
    if _busybox() is None:
        return "static busybox not found (apt-get install busybox-static)"
    for tool in ("usbip", "usbipd"):
        # not shutil.which: the project installs its own usbip/usbipd scripts
        if not os.path.exists(f"/usr/sbin/{tool}"):
            return f"/usr/sbin/{tool} not installed (apt-get install usbip)"
    if not (shutil.which("modprobe") or os.path.exists("/usr/sbin/modprobe") or os.path.exists("/sbin/modprobe")):
        return "modprobe not installed (apt-get install kmod)"
    return None


# --------------------------------------------------------------------------
# initramfs


INIT_SCRIPT = r"""#!/bin/busybox sh
# cyusbip kernel-test initramfs: mount host / (9p, ro) + tmpfs as overlay root.
/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin /lower /upper /newroot
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

ts() { read up _ </proc/uptime 2>/dev/null; echo "[$up] cyusbip-init: $*"; }

fail() {
    echo "CYUSBIP-INIT-FAILED: $*"
    sleep 1
    poweroff -f
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mount -t tmpfs tmpfs /dev
ts "loading modules"
for m in $(cat /modules.order); do
    insmod "/lib/modules/$m" || echo "cyusbip-init: insmod $m failed"
done

PY=
for w in $(cat /proc/cmdline); do
    case "$w" in
        cyusbip_python=*) PY="${w#cyusbip_python=}" ;;
    esac
done
[ -n "$PY" ] || fail "no cyusbip_python= on the kernel command line"
ts "mounting root"

mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /lower \
    || fail "cannot mount host root over 9p"
mount -t tmpfs -o mode=0755 tmpfs /upper || fail "tmpfs upper"
mkdir -p /upper/upper /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/upper,workdir=/upper/work overlay /newroot \
    || fail "cannot mount overlay root"
mount -t tmpfs -o mode=0755 tmpfs /newroot/run || fail "tmpfs /run"
mkdir -p /newroot/run/cyusbip /newroot{GUEST_SHARE}
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share /newroot{GUEST_SHARE} \
    || fail "cannot mount the writable share"
[ -f "/newroot{GUEST_SHARE}/agent.py" ] || fail "agent.py missing in share"
# a venv's python is a symlink to an absolute path: resolve it inside the new root
chroot /newroot /bin/sh -c "[ -x '$PY' ]" || fail "python $PY not executable in the guest root"
ts "moving mounts"
mount --move /proc /newroot/proc || fail "move /proc"
mount --move /sys /newroot/sys || fail "move /sys"
mount --move /dev /newroot/dev || fail "move /dev"
echo "cyusbip-init: switch_root, starting agent with $PY"
exec switch_root /newroot "$PY" -I -S {GUEST_SHARE}/agent.py
fail "switch_root failed"
""".replace("{GUEST_SHARE}", GUEST_SHARE)


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _module_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".xz", ".gz", ".zst"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    if base.endswith(".ko"):
        base = base[:-3]
    return _norm(base)


def _resolve_modules(ver: str, wanted: Iterable[str]) -> list[str]:
    """Module file paths (relative to /lib/modules/ver) in load order."""
    moddir = f"/lib/modules/{ver}"
    deps: dict[str, tuple[str, list[str]]] = {}
    with open(f"{moddir}/modules.dep") as fh:
        for line in fh:
            if ":" not in line:
                continue
            path, rest = line.split(":", 1)
            deps[_module_name(path)] = (path, [_module_name(p) for p in rest.split()])
    builtin = set()
    try:
        with open(f"{moddir}/modules.builtin") as fh:
            builtin = {_module_name(line.strip()) for line in fh if line.strip()}
    except OSError:
        pass

    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = _norm(name)
        if name in seen:
            return
        seen.add(name)
        if name not in deps:
            if name in builtin:
                return
            raise GuestError(f"kernel {ver}: module {name} not found in modules.dep")
        path, ds = deps[name]
        for d in ds:
            visit(d)
        order.append(path)

    for w in wanted:
        visit(w)
    return order


def _read_module(path: str) -> bytes:
    if path.endswith(".xz"):
        with lzma.open(path) as fh:
            return fh.read()
    if path.endswith(".gz"):
        with gzip.open(path) as fh:
            return fh.read()
    if path.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", path], check=True, capture_output=True, timeout=60).stdout
    with open(path, "rb") as fh:
        return fh.read()


class _Cpio:
    """Minimal cpio "newc" writer (lets us create /dev/console without mknod)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0)) -> None:
        namebytes = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}"
            for v in (
                self.ino,
                mode,
                0,
                0,
                1,
                0,
                len(data),
                0,
                0,
                rdev[0],
                rdev[1],
                len(namebytes),
                0,
            )
        )
        self.ino += 1
        self.buf.write(hdr.encode() + namebytes)
        self.buf.write(b"\0" * ((4 - (110 + len(namebytes)) % 4) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * ((4 - len(data) % 4) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def cache_dir() -> Path:
    base = os.environ.get("USBIP_KERNEL_CACHE")
    if base:
        return Path(base)
    return Path(os.path.expanduser("~")) / ".cache" / "cyusbip-kernel"


def build_initramfs(ver: str, *, force: bool = False) -> Path:
    """Build (once, cached) the busybox initramfs for kernel ``ver``."""
    busybox = _busybox()
    if busybox is None:
        raise GuestError("static busybox not found (apt-get install busybox-static)")
    modules = _resolve_modules(ver, INITRAMFS_MODULES)
    h = hashlib.sha256()
    h.update(INIT_SCRIPT.encode())
    h.update("\n".join(modules).encode())
    for p in [busybox] + [f"/lib/modules/{ver}/{m}" for m in modules]:
        st = os.stat(p)
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    out = cache_dir() / ver / f"initramfs-{h.hexdigest()[:16]}.cpio.gz"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)

    cpio = _Cpio()
    for d in (
        "bin",
        "sbin",
        "dev",
        "proc",
        "sys",
        "lib",
        "lib/modules",
        "lower",
        "upper",
        "newroot",
        "usr",
        "usr/bin",
        "usr/sbin",
    ):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    with open(busybox, "rb") as fh:
        cpio.file("bin/busybox", fh.read(), 0o755)
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    names = []
    for m in modules:
        name = _module_name(m) + ".ko"
        cpio.file(f"lib/modules/{name}", _read_module(f"/lib/modules/{ver}/{m}"))
        names.append(name)
    cpio.file("modules.order", ("\n".join(names) + "\n").encode())
    data = gzip.compress(cpio.finish(), compresslevel=6)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    # drop stale images for this kernel (not fresh ones: another session
    # with a different harness version may be about to boot one)
    for old in out.parent.glob("initramfs-*.cpio.gz"):
        try:
            if old != out and time.time() - old.stat().st_mtime > 3600:
                old.unlink()
        except OSError:
            pass
    return out
