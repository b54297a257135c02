"""The supervisors of persistent imports as processes: their name, their log, alive or not, stop.

What ``usbip port`` and ``usbip detach`` need to know about a supervisor (persist.py runs it), kept
apart from the supervisor itself so those commands start without asyncio and the client.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .driver import VhciDriver

log = logging.getLogger("usbip.persist")

LOCK_TIMEOUT = 10.0  # the longest wait for persist.lock
STOP_WAIT = 5.0  # seconds ``usbip detach`` gives a supervisor to exit after SIGTERM
LOG_NAME = "persist.log"
PROCESS_NAME = "usbip-persist"  # the supervisor's /proc/PID/comm (what ps shows)
PR_SET_NAME = 15  # <linux/prctl.h>


def log_path(drv: VhciDriver) -> str | None:
    try:
        os.makedirs(drv.record_dir, mode=0o700, exist_ok=True)
    except OSError:
        return None
    return os.path.join(drv.record_dir, LOG_NAME)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_ours(pid: int) -> bool:
    """A guard against a stale record naming a pid reused by another program: the supervisor
    names itself :data:`PROCESS_NAME` (``/proc/PID/comm``), where /proc tells."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip() == PROCESS_NAME.encode()
    except FileNotFoundError:
        return False
    except OSError:
        return True


def _set_name(name: bytes = PROCESS_NAME.encode()) -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name, 0, 0, 0)


def stop(pid: int, timeout: float = STOP_WAIT) -> bool:
    """SIGTERM a supervisor and wait (bounded) for it to end; SIGKILL it past ``timeout``.
    True when it is gone."""
    if not _is_ours(pid):
        log.warning("pid %d is not a usbip supervisor (a stale record); not signalling it", pid)
        return True
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    log.warning("persist supervisor %d did not end after SIGTERM; killing it", pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    return not pid_alive(pid)
