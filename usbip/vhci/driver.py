"""The Linux vhci-hcd driver through sysfs, as ``tools/usb/usbip/libsrc/vhci_driver.c`` drives it.

Facts from ``drivers/usb/usbip/vhci_sysfs.c`` (and ``vhci.h``):

* every file lives on the first controller, ``/sys/devices/platform/vhci_hcd.0``:
  ``nports`` (ports of all controllers), ``status`` / ``status.N`` (one table per
  controller), ``attach`` and ``detach``;
* each controller has VHCI_HC_PORTS high-speed ports then as many super-speed
  ports; port numbers in ``status`` and ``attach``/``detach`` are global;
* a status line is ``hub port sta spd dev sockfd local_busid`` with hub "hs"/"ss",
  port %04u, status %03u (4 free, 5 not assigned, 6 used, 7 error), speed %03u,
  devid %08x, sockfd %06u and the local busid (``0-0`` when free);
* ``attach`` takes "port sockfd devid speed", ``detach`` takes "port";
* the tool records each import in /var/run/vhci_hcd/port<N> as "host port busid".

Ours adds, beside that record, ``port<N>.relay`` (the pid of a TLS import's relay) and
``port<N>.persist`` (the pid of the supervisor of ``usbip attach --persist``); the
supervisor and ``usbip detach`` change these under ``persist.lock`` (:meth:`VhciDriver.lock`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from ..errors import CyusbipError
from ..protocol.constants import Speed

SYSFS_PLATFORM = "/sys/devices/platform"
RECORD_DIR = "/var/run/vhci_hcd"

VDEV_ST_NULL = 4
VDEV_ST_NOTASSIGNED = 5
VDEV_ST_USED = 6
VDEV_ST_ERROR = 7

STATUS_TEXT = {
    VDEV_ST_NULL: "Port Available",
    VDEV_ST_NOTASSIGNED: "Port Initializing",
    VDEV_ST_USED: "Port in Use",
    VDEV_ST_ERROR: "Port Error",
}
SPEED_TEXT: dict[int, str] = {  # keyed by Speed (an IntEnum), looked up with the status line's number
    Speed.UNKNOWN: "Unknown Speed",
    Speed.LOW: "Low Speed(1.5Mbps)",
    Speed.FULL: "Full Speed(12Mbps)",
    Speed.HIGH: "High Speed(480Mbps)",
    Speed.WIRELESS: "Wireless",
    Speed.SUPER: "Super Speed(5000Mbps)",
    Speed.SUPER_PLUS: "Super Speed Plus(10000Mbps)",
}

_LINE = re.compile(r"^(hs|ss)\s+(\d+)\s+(\d+)\s+(\d+)\s+([0-9a-fA-F]+)\s+(\d+)\s+(\S+)")


class VhciError(CyusbipError, OSError):
    """vhci-hcd missing, no free port, or the kernel refused a request."""


@dataclass(frozen=True)
class VhciPort:
    hub: str  # "hs" or "ss"
    port: int  # global port number
    status: int
    speed: int
    devid: int
    sockfd: int
    local_busid: str

    @property
    def in_use(self) -> bool:
        return self.status not in (VDEV_ST_NULL, VDEV_ST_NOTASSIGNED)

    @property
    def busnum(self) -> int:
        return self.devid >> 16

    @property
    def devnum(self) -> int:
        return self.devid & 0xFFFF


@dataclass(frozen=True)
class ImportRecord:
    host: str
    port: str
    busid: str


def parse_status(text: str) -> list[VhciPort]:
    """Parse one ``status`` file (the header line is skipped)."""
    ports = []
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m:
            ports.append(VhciPort(m[1], int(m[2]), int(m[3]), int(m[4]), int(m[5], 16), int(m[6]), m[7]))
    return ports


class VhciDriver:
    """Reads and drives vhci-hcd under ``sysfs_root`` (a fake tree in unit tests)."""

    def __init__(self, platform_dir: str = SYSFS_PLATFORM, record_dir: str = RECORD_DIR) -> None:
        self.path = os.path.join(platform_dir, "vhci_hcd.0")
        self.record_dir = record_dir
        if not os.path.isdir(self.path):
            raise VhciError(
                errno.ENODEV, "vhci-hcd is not loaded (no vhci_hcd.0 in sysfs): run `modprobe vhci-hcd` as root"
            )

    def _read(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as f:
            return f.read()

    @property
    def nports(self) -> int:
        return int(self._read("nports").strip())

    def status_files(self) -> list[str]:
        names = [n for n in os.listdir(self.path) if n == "status" or re.fullmatch(r"status\.\d+", n)]
        return sorted(names, key=lambda n: int(n.split(".")[1]) if "." in n else 0)

    def ports(self) -> list[VhciPort]:
        out: list[VhciPort] = []
        for name in self.status_files():
            out.extend(parse_status(self._read(name)))
        return sorted(out, key=lambda p: p.port)

    def free_port(self, speed: int, avoid: Collection[int] = ()) -> int:
        """A free port on the hub for ``speed``: super-speed hub for USB 3, high-speed hub otherwise.
        Ports in ``avoid`` (kept for a persistent import being re-attached) only when no other is free."""
        hub = "ss" if speed >= Speed.SUPER else "hs"
        free = [p.port for p in self.ports() if p.hub == hub and p.status == VDEV_ST_NULL]
        free.sort(key=lambda n: n in avoid)  # stable: the lowest port not avoided, else the lowest avoided
        if free:
            return free[0]
        raise VhciError(errno.EBUSY, f"no free {'super' if hub == 'ss' else 'high'}-speed vhci port")

    def check_port(self, port: int, speed: int | None = None) -> int:
        """``port`` if it is free (and on the hub for ``speed``, if given): a caller's choice of port."""
        hub = None if speed is None else "ss" if speed >= Speed.SUPER else "hs"
        for p in self.ports():
            if p.port != port:
                continue
            if hub is not None and p.hub != hub:
                raise VhciError(errno.EINVAL, f"vhci port {port} is a {p.hub} port; this device needs an {hub} port")
            if p.status != VDEV_ST_NULL:
                raise VhciError(errno.EBUSY, f"vhci port {port} is in use")
            return port
        raise VhciError(errno.EINVAL, f"no vhci port {port} (ports 0-{len(self.ports()) - 1})")

    def attach(self, port: int, sockfd: int, devid: int, speed: int) -> None:
        self._write("attach", f"{port} {sockfd} {devid} {speed}")

    def detach(self, port: int) -> None:
        self._write("detach", f"{port}")

    def _write(self, name: str, value: str) -> None:
        try:
            with open(os.path.join(self.path, name), "w") as f:
                f.write(value)
        except PermissionError as exc:
            raise VhciError(errno.EACCES, f"no permission to write {name} of vhci-hcd: run as root") from exc
        except OSError as exc:
            raise VhciError(exc.errno or errno.EIO, f"vhci-hcd refused {name} '{value}': {exc.strerror}") from exc

    # ---------------------------------------------------------- /var/run/vhci_hcd records
    def record_path(self, port: int) -> str:
        return os.path.join(self.record_dir, f"port{port}")

    def write_record(self, port: int, host: str, tcp_port: int | str, busid: str) -> None:
        os.makedirs(self.record_dir, mode=0o700, exist_ok=True)
        with open(self.record_path(port), "w") as f:
            f.write(f"{host} {tcp_port} {busid}\n")

    def read_record(self, port: int) -> ImportRecord | None:
        try:
            with open(self.record_path(port)) as f:
                parts = f.read().split()
        except OSError:
            return None
        if len(parts) != 3:
            return None
        return ImportRecord(*parts)

    def remove_record(self, port: int) -> None:
        for path in (self.record_path(port), self.relay_path(port), self.persist_path(port)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # a TLS import's relay process (usbip.vhci.relay): "<pid>" in port<N>.relay beside the record
    def relay_path(self, port: int) -> str:
        return os.path.join(self.record_dir, f"port{port}.relay")

    def write_relay(self, port: int, pid: int) -> None:
        os.makedirs(self.record_dir, mode=0o700, exist_ok=True)
        with open(self.relay_path(port), "w") as f:
            f.write(f"{pid}\n")

    def read_relay(self, port: int) -> int | None:
        try:
            with open(self.relay_path(port)) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def remove_relay(self, port: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.relay_path(port))

    # ``usbip attach --persist``: "<pid>" of its supervisor (usbip.vhci.persist) in port<N>.persist
    def persist_path(self, port: int) -> str:
        return os.path.join(self.record_dir, f"port{port}.persist")

    def write_persist(self, port: int, pid: int) -> None:
        os.makedirs(self.record_dir, mode=0o700, exist_ok=True)
        tmp = self.persist_path(port) + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{pid}\n")
        os.replace(tmp, self.persist_path(port))

    def read_persist(self, port: int) -> int | None:
        try:
            with open(self.persist_path(port)) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def remove_persist(self, port: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.persist_path(port))

    def persist_ports(self) -> dict[int, int]:
        """{vhci port: supervisor pid} of every persist record."""
        try:
            names = os.listdir(self.record_dir)
        except OSError:
            return {}
        out = {}
        for name in names:
            m = re.fullmatch(r"port(\d+)\.persist", name)
            if m:
                pid = self.read_persist(int(m[1]))
                if pid is not None:
                    out[int(m[1])] = pid
        return out

    @contextlib.contextmanager
    def lock(self, timeout: float = 10.0) -> Iterator[None]:
        """Hold ``persist.lock`` (flock) for at most ``timeout`` seconds of waiting: a supervisor
        re-attaching and ``usbip detach`` never interleave their changes to a port and its records."""
        try:
            os.makedirs(self.record_dir, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(self.record_dir, "persist.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise VhciError(exc.errno or errno.EACCES, f"cannot open the lock in {self.record_dir}: {exc}") from exc
        try:
            end = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= end:
                        held = f"{self.record_dir}/persist.lock held for {timeout} s"
                        raise VhciError(errno.ETIMEDOUT, held) from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)
