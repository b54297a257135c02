"""Descriptor exhaustion: a cap on connections, a cap per address in the op phase, quiet accept errors."""

from __future__ import annotations

import asyncio
import resource
import socket
import subprocess
import time
from pathlib import Path

from usbip.protocol.constants import OP_REP_DEVLIST
from usbip.protocol.records import pack_op_header, unpack_op_header
from usbip.server import Server
from usbip.server.limits import ServerLimits, default_max_connections
from usbip.virtual import LoopbackDevice

from .helpers import idle, run, wait_until
from .test_e2e_processes import Daemon, free_port

DEVLIST_REQUEST = pack_op_header(0x8005, 0)


def connect_from(source: str, port: int) -> socket.socket:
    """A connection to 127.0.0.1:port from another loopback address (another 'host')."""
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


def devlist(s: socket.socket) -> bool:
    """True when the server answers OP_REQ_DEVLIST on ``s``."""
    try:
        s.sendall(DEVLIST_REQUEST)
        head = s.recv(8)
    except OSError:
        return False
    return len(head) == 8 and unpack_op_header(head).code == OP_REP_DEVLIST


def closed_by_server(s: socket.socket, timeout: float = 2.0) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_per_address_cap_in_the_op_phase() -> None:
    async def body() -> None:
        limits = ServerLimits(max_op_per_address=3)
        async with Server([LoopbackDevice()], host="127.0.0.1", port=0, limits=limits) as srv:
            loop = asyncio.get_running_loop()
            idle_conns = [await loop.run_in_executor(None, connect_from, "127.0.0.3", srv.port) for _ in range(3)]
            assert await wait_until(lambda: srv.stats()["connections"] == 3)
            extra = await loop.run_in_executor(None, connect_from, "127.0.0.3", srv.port)
            assert await loop.run_in_executor(None, closed_by_server, extra)
            assert srv.stats()["connections_refused"] == 1
            # another address is not affected, and the idle ones are still served
            other = await loop.run_in_executor(None, connect_from, "127.0.0.4", srv.port)
            assert await loop.run_in_executor(None, devlist, other)
            assert await loop.run_in_executor(None, devlist, idle_conns[0])
            for s in [*idle_conns, extra, other]:
                s.close()
            assert await wait_until(lambda: idle(srv), 5.0)

    run(body)


def test_connection_cap_waits_instead_of_failing() -> None:
    async def body() -> None:
        limits = ServerLimits(max_connections=4, max_op_per_address=8)
        async with Server([LoopbackDevice()], host="127.0.0.1", port=0, limits=limits) as srv:
            loop = asyncio.get_running_loop()
            held = [await loop.run_in_executor(None, connect_from, "127.0.0.5", srv.port) for _ in range(4)]
            assert await wait_until(lambda: srv.stats()["connections"] == 4)
            waiting = await loop.run_in_executor(None, connect_from, "127.0.0.6", srv.port)  # in the listen backlog
            await asyncio.sleep(0.3)
            assert srv.stats()["connections"] == 4
            held.pop().close()
            assert await loop.run_in_executor(None, devlist, waiting)
            for s in [*held, waiting]:
                s.close()
            assert await wait_until(lambda: idle(srv), 5.0)

    run(body)


def test_default_cap_follows_the_fd_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = default_max_connections()
    assert 8 <= n <= 1024 and (soft == resource.RLIM_INFINITY or n <= max(8, soft - 64))


def test_low_fd_limit_idle_flood_keeps_serving_and_the_log_quiet(tmp_path: Path) -> None:
    """usbipd with 96 descriptors; 300 idle connections from one address, then a list from another."""

    def low_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))

    port = free_port()
    original = subprocess.Popen
    try:
        subprocess.Popen = lambda *a, **kw: original(*a, preexec_fn=low_nofile, **kw)  # type: ignore[misc]
        daemon = Daemon(["--virtual", "loopback", "--no-libusb", "--op-timeout", "3"], port, tmp_path / "usbipd.log")
    finally:
        subprocess.Popen = original  # type: ignore[misc]
    socks: list[socket.socket] = []
    try:
        for _ in range(300):
            try:
                socks.append(connect_from("127.0.0.7", port))
            except OSError:
                break
        time.sleep(0.5)
        other = connect_from("127.0.0.8", port)
        assert devlist(other), daemon.log
        other.close()
        for s in socks:
            s.close()
        time.sleep(0.5)
        log = daemon.log
        assert "accept failed" not in log, log[-2000:]
        assert 1 <= log.count("still in the op phase") <= 3, log[-2000:]  # refusals are logged, throttled
        assert daemon.stop() == 0, log
    finally:
        for s in socks:
            s.close()
        daemon.kill()
