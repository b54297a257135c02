"""Bounded async reads and writes on a non-blocking socket (the op phase)."""

from __future__ import annotations

import asyncio
import math
import socket

from ..cancelsafe import wait_for
from ..errors import CyusbipError


class PeerClosed(CyusbipError, ConnectionError):
    """The peer closed the connection before a whole message arrived."""


async def recv_exactly(sock: socket.socket, n: int, timeout: float | None = 30.0) -> bytes:
    """Read exactly ``n`` bytes (``n`` is always a size the caller bounded)."""
    loop = asyncio.get_running_loop()
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0

    async def _read() -> None:
        nonlocal got
        while got < n:
            r = await loop.sock_recv_into(sock, view[got:])
            if r == 0:
                raise PeerClosed(f"connection closed after {got} of {n} bytes")
            got += r

    await wait_for(_read(), timeout)
    return bytes(buf)


async def send_all(sock: socket.socket, data: bytes, timeout: float | None = 30.0) -> None:
    loop = asyncio.get_running_loop()
    await wait_for(loop.sock_sendall(sock, data), timeout)


def set_nodelay(sock: socket.socket) -> None:
    """usbipd sets TCP_NODELAY on every connection (usbip_network.c: usbip_net_set_nodelay)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# TCP options for finding a dead peer (man 7 tcp). Read from the socket module when they are
# used, so a platform without one is tolerated (the option is then not set); on Linux they are
# TCP_KEEPIDLE 4, TCP_KEEPINTVL 5, TCP_KEEPCNT 6 and TCP_USER_TIMEOUT 18 (<netinet/tcp.h>).
#: Kernel bounds (include/net/tcp.h): MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL, MAX_TCP_KEEPCNT.
MAX_KEEPIDLE = 32767
MAX_KEEPINTVL = 32767
MAX_KEEPCNT = 127
#: TCP_USER_TIMEOUT is an int of milliseconds.
MAX_USER_TIMEOUT_MS = 2**31 - 1
#: Seconds after which a silent peer is dropped by default, on both ends (a vanished client frees
#: its device on the server; a vanished server detaches the vhci port or fails the client's URBs).
DEAD_PEER_TIMEOUT = 45.0
#: Keepalive probes sent before a silent peer is declared dead (see :func:`keepalive_params`).
KEEPALIVE_COUNT = 3


def _tcp_option(name: str) -> int | None:
    value = getattr(socket, name, None)
    return value if isinstance(value, int) else None


def keepalive_params(timeout: float) -> tuple[int, int, int]:
    """(idle, interval, count) in whole seconds so keepalive declares a silent peer dead in ``timeout``.

    Half the time idle, the rest split over :data:`KEEPALIVE_COUNT` probes: 45 s gives
    (22, 7, 3), 43 s in all; 6 s gives (3, 1, 3). From 5 s up the sum never exceeds ``timeout``;
    below, the 1-second floor of the kernel's options makes it 4 or 5 s (TCP_USER_TIMEOUT, which
    :func:`apply_dead_peer_timeout` also sets, still ends the connection at ``timeout`` once a
    probe has gone unanswered). Values are clamped to the kernel's maxima, so a huge or
    infinite timeout is accepted.
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, not {timeout!r}")
    total = max(3, int(min(timeout, 2 * MAX_KEEPIDLE)))
    count = KEEPALIVE_COUNT
    idle = max(1, total // 2)
    interval = max(1, (total - idle) // count)
    return min(idle, MAX_KEEPIDLE), min(interval, MAX_KEEPINTVL), count


def set_keepalive(
    sock: socket.socket,
    idle: int | None = None,
    interval: int | None = None,
    count: int | None = None,
    user_timeout: float | None = None,
) -> None:
    """SO_KEEPALIVE, plus the per-socket TCP options that are given (``None``: system default).

    ``idle``: seconds without traffic before the first probe (TCP_KEEPIDLE); ``interval``:
    seconds between probes (TCP_KEEPINTVL); ``count``: unanswered probes before the
    connection is dropped (TCP_KEEPCNT). ``user_timeout``: seconds transmitted data may stay
    unacknowledged before the connection is dropped (TCP_USER_TIMEOUT, set in milliseconds).
    Keepalive only probes an idle connection: with data in flight (a reply the peer never
    acknowledges) the retransmission timeout applies, ~15 min by default (tcp_retries2);
    TCP_USER_TIMEOUT bounds that and, with keepalive on, also replaces TCP_KEEPCNT: the
    connection ends once a probe is unanswered and ``user_timeout`` has passed since the
    peer was last heard (man 7 tcp). Only AF_INET/AF_INET6 sockets are touched; an option
    this platform's socket module lacks is skipped.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value, high in (
        ("TCP_KEEPIDLE", idle, MAX_KEEPIDLE),
        ("TCP_KEEPINTVL", interval, MAX_KEEPINTVL),
        ("TCP_KEEPCNT", count, MAX_KEEPCNT),
    ):
        if value is None:
            continue
        if not 1 <= value <= high:
            raise ValueError(f"{name.lower()} must be within 1..{high}, not {value!r}")
        opt = _tcp_option(name)
        if opt is not None:
            sock.setsockopt(socket.IPPROTO_TCP, opt, int(value))
    if user_timeout is not None:
        if not user_timeout >= 0:
            raise ValueError(f"user_timeout must be >= 0, not {user_timeout!r}")
        opt = _tcp_option("TCP_USER_TIMEOUT")
        if opt is not None:  # 0 is the system default; a positive timeout is at least 1 ms
            ms = min(MAX_USER_TIMEOUT_MS, max(1, math.ceil(user_timeout * 1000))) if user_timeout else 0
            sock.setsockopt(socket.IPPROTO_TCP, opt, ms)


def apply_dead_peer_timeout(sock: socket.socket, timeout: float) -> None:
    """Drop the connection when its peer is silent for ``timeout`` seconds, idle or not.

    Keepalive (:func:`keepalive_params`) finds a peer that vanished while the connection was
    idle (say, an interrupt IN URB pending); TCP_USER_TIMEOUT = ``timeout`` finds one that
    vanished while data to it was unacknowledged. Either way the socket then fails with
    ETIMEDOUT instead of lingering ~2 h 11 min (or ~15 min with data in flight) on the
    system defaults.
    """
    idle, interval, count = keepalive_params(timeout)
    set_keepalive(sock, idle, interval, count, user_timeout=timeout)


class PlainChannel:
    """The op phase over plain TCP (the TLS twin is ``usbip.net.tls.TlsChannel``)."""

    peer_names: tuple[str, ...] = ()

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def recv_exactly(self, n: int, timeout: float | None = 30.0) -> bytes:
        return await recv_exactly(self.sock, n, timeout)

    async def send_all(self, data: bytes, timeout: float | None = 30.0) -> None:
        await send_all(self.sock, data, timeout)
