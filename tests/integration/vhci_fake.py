"""A fake vhci-hcd for tests without the kernel: a sysfs tree whose ``attach`` and ``detach``
are methods of :class:`FakeVhci`.

An attached port stays in use until its connection ends (the server closed it: a thread
reads the socket as vhci_rx does, and frees the port at EOF) or it is detached. The
status file is shared through the file system, so a forked supervisor and the test agree
on what is attached (updates take an flock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from usbip.protocol.constants import Speed
from usbip.vhci.driver import VDEV_ST_NULL, VDEV_ST_USED, VhciDriver, VhciError, parse_status

HEAD = "hub port sta spd dev      sockfd local_busid\n"
HUBS = ("hs", "hs", "ss", "ss")  # ports 0, 1 high speed; 2, 3 super speed
_tokens = itertools.count(1)


def make_tree(root: Path) -> tuple[str, str]:
    """A vhci_hcd.0 with four free ports under ``root``; returns (platform dir, record dir)."""
    d = root / "platform" / "vhci_hcd.0"
    d.mkdir(parents=True)
    (d / "status").write_text(HEAD + "".join(_line(h, i, VDEV_ST_NULL, 0, 0, 0, "0-0") for i, h in enumerate(HUBS)))
    (d / "nports").write_text(f"{len(HUBS)}\n")
    (d / "attach").write_text("")
    (d / "detach").write_text("")
    return str(root / "platform"), str(root / "run")


def _line(hub: str, port: int, status: int, speed: int, devid: int, sockfd: int, busid: str) -> str:
    return f"{hub}  {port:04d} {status:03d} {speed:03d} {devid:08x} {sockfd:06d} {busid}\n"


class FakeVhci(VhciDriver):
    def __init__(self, platform_dir: str, record_dir: str) -> None:
        super().__init__(platform_dir, record_dir)
        self.socks: dict[int, tuple[int, socket.socket]] = {}  # port -> (token, socket) in this process
        self.attaches: list[tuple[int, int, int]] = []  # (port, devid, speed) in this process

    @contextlib.contextmanager
    def _status_lock(self) -> Iterator[None]:
        fd = os.open(os.path.join(self.path, "status.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _set(self, port: int, status: int, speed: int, devid: int, token: int, busid: str) -> None:
        path = os.path.join(self.path, "status")
        ports = parse_status(open(path).read())
        lines = [
            _line(p.hub, p.port, status, speed, devid, token, busid)
            if p.port == port
            else _line(p.hub, p.port, p.status, p.speed, p.devid, p.sockfd, p.local_busid)
            for p in ports
        ]
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(HEAD + "".join(lines))
        os.replace(tmp, path)

    def attach(self, port: int, sockfd: int, devid: int, speed: int) -> None:
        sock = socket.socket(fileno=os.dup(sockfd))
        token = (os.getpid() * 1000 + next(_tokens)) % 1000000
        with self._status_lock():
            p = next(p for p in self.ports() if p.port == port)
            if p.status != VDEV_ST_NULL:
                sock.close()
                raise VhciError(errno.EBUSY, f"vhci-hcd refused attach '{port}': Device or resource busy")
            if (p.hub == "ss") != (speed >= Speed.SUPER):
                sock.close()
                raise VhciError(errno.EINVAL, f"vhci-hcd refused attach '{port}': Invalid argument")
            self._set(port, VDEV_ST_USED, speed, devid, token, f"9-{port + 1}")
        self.socks[port] = (token, sock)
        self.attaches.append((port, devid, speed))
        threading.Thread(target=self._rx, args=(port, token, sock), daemon=True).start()

    def _rx(self, port: int, token: int, sock: socket.socket) -> None:
        """vhci_rx: read until the connection ends, then the port is free again."""
        sock.settimeout(None)
        with contextlib.suppress(OSError):
            while sock.recv(65536):
                pass
        self.free(port, token)
        with contextlib.suppress(OSError):
            sock.close()

    def free(self, port: int, token: int | None = None) -> None:
        with self._status_lock():
            p = next(p for p in self.ports() if p.port == port)
            if token is None or p.sockfd == token:
                self._set(port, VDEV_ST_NULL, 0, 0, 0, "0-0")

    def detach(self, port: int) -> None:
        p = next(p for p in self.ports() if p.port == port)
        if not p.in_use:
            raise VhciError(errno.EINVAL, f"vhci-hcd refused detach '{port}': Invalid argument")
        self.free(port)
        held = self.socks.pop(port, None)
        if held is not None:
            with contextlib.suppress(OSError):
                held[1].shutdown(socket.SHUT_RDWR)

    def take(self, port: int, devid: int = 0x00090009) -> None:
        """Another program attaches ``port`` (a socket pair nobody closes until :meth:`detach`)."""
        a, b = socket.socketpair()
        try:
            self.attach(port, a.fileno(), devid, Speed.HIGH)
        finally:
            a.close()
        self.socks[port] = (self.socks[port][0], b)

    def state(self, port: int) -> tuple[int, int]:
        """(status, devid) of ``port``."""
        p = next(p for p in self.ports() if p.port == port)
        return p.status, p.devid
