"""What one client may cost the server: memory, time, descriptors.

Every number a hostile or dead peer could push up has a bound here, in one place, so
``usbipd`` options, the server and the tests agree. The defaults keep a server with 32
imports well under 1 GiB (each import holds at most half its ``connection_budget``
plus one URB of at most ``max_transfer``, or the whole budget, plus a backlog of a
quarter budget: 22 MiB) and free a device whose client vanished without FIN/RST
within ``dead_peer_timeout`` seconds.
"""

from __future__ import annotations

import dataclasses
import resource

from ..net.netio import DEAD_PEER_TIMEOUT, keepalive_params
from ..protocol.constants import DEFAULT_MAX_TRANSFER

MiB = 1024 * 1024

#: Descriptors kept free for what is not a client connection (listeners, devices, libusb, logs).
FD_RESERVE = 64


def default_max_connections() -> int:
    """Connections the fd limit allows, less a reserve (at least 8, at most 1024)."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover - no rlimit on this platform
        return 1024
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(8, min(1024, soft - FD_RESERVE))


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Bounds the server applies to every connection (see the module docstring)."""

    #: Bytes one import may hold: IN buffers and OUT payloads of URBs in flight plus replies
    #: queued for the socket. Above it the server stops reading that socket until it drains.
    #: An URB larger than half the budget runs once at most half of it is held.
    connection_budget: int = 8 * MiB
    #: Largest transfer_buffer_length accepted in a CMD_SUBMIT (usbfs' default, 16 MiB).
    max_transfer: int = DEFAULT_MAX_TRANSFER
    #: URBs in flight per import before the peer is treated as hostile.
    max_pending_urbs: int = 4096
    #: Seconds a client may leave replies unread (no byte of queued output sent) before it is dropped.
    write_stall_timeout: float = 60.0
    #: Seconds after which a silent peer is declared dead: TCP keepalive probes (idle, interval,
    #: count derived from it) and TCP_USER_TIMEOUT for unacknowledged data.
    dead_peer_timeout: float = DEAD_PEER_TIMEOUT
    #: Seconds a client may take to send its op request (OP_REQ_DEVLIST / OP_REQ_IMPORT).
    op_timeout: float = 10.0
    #: Concurrent connections in all (None: derived from RLIMIT_NOFILE).
    max_connections: int | None = None
    #: Concurrent connections from one address still in the op phase (not yet importing).
    max_op_per_address: int = 8

    def __post_init__(self) -> None:
        if self.connection_budget < 64 * 1024:
            raise ValueError("connection_budget must be at least 64 KiB")
        if not 0 <= self.max_transfer <= 1 << 31:
            raise ValueError("max_transfer must be within 0..2 GiB")
        if self.max_pending_urbs < 1:
            raise ValueError("max_pending_urbs must be at least 1")
        for name in ("write_stall_timeout", "dead_peer_timeout", "op_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.max_op_per_address < 1:
            raise ValueError("max_op_per_address must be at least 1")

    @property
    def connections(self) -> int:
        return self.max_connections if self.max_connections is not None else default_max_connections()

    def keepalive(self) -> tuple[int, int, int]:
        """(idle, interval, count) seconds for TCP keepalive so a dead peer is found in dead_peer_timeout."""
        return keepalive_params(self.dead_peer_timeout)


__all__ = ["FD_RESERVE", "ServerLimits", "default_max_connections"]
