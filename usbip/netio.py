"""Bounded async reads and writes on a non-blocking socket (the op phase)."""

from __future__ import annotations

import asyncio
import socket


class PeerClosed(ConnectionError):
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

    await asyncio.wait_for(_read(), timeout)
    return bytes(buf)


async def send_all(sock: socket.socket, data: bytes, timeout: float | None = 30.0) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_sendall(sock, data), timeout)


def set_nodelay(sock: socket.socket) -> None:
    """usbipd sets TCP_NODELAY on every connection (usbip_network.c: usbip_net_set_nodelay)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def set_keepalive(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
