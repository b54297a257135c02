"""Readiness for systemd (``Type=notify``): sd_notify's datagram, without libsystemd.

The protocol is a datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (an abstract socket when it starts with ``@``); see sd_notify(3).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; False when not run under systemd or it failed."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


__all__ = ["notify"]
