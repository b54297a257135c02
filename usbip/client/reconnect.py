"""When and how often to import a device again after its connection dropped.

One policy serves both clients that keep an import alive: the user-space client
(``Connection.import_device(busid, reconnect=ReconnectPolicy())``: URBs in flight fail with
:class:`~usbip.client.Disconnected`, later ones wait for the re-import) and the vhci supervisor
of ``usbip attach --persist`` (usbip/vhci/persist.py), which re-imports into a vhci port.

Attempts are spaced by a bounded exponential backoff: ``initial_delay`` doubling (``factor``)
up to ``max_delay``, each delay drawn at random from ``[d * (1 - jitter), d]`` so that many
clients of one restarted server do not come back in lockstep. An import that lived for
``stable_after`` seconds starts the next outage from ``initial_delay`` again; one that keeps
dropping at once does not make the client hammer the server every ``initial_delay``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ReconnectPolicy:
    """How a dropped import is re-imported.

    ``max_attempts``: re-imports tried per outage before giving up (None: until closed).
    ``wait_timeout``: user-space client only; how long an URB submitted while the device is
    away waits for the re-import before it fails with Disconnected (its own transfer timeout,
    if shorter, still applies).
    """

    initial_delay: float = 1.0
    max_delay: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5
    max_attempts: int | None = None
    wait_timeout: float = 60.0
    stable_after: float = 30.0

    def __post_init__(self) -> None:
        for name in ("initial_delay", "max_delay", "wait_timeout", "stable_after"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
        if self.max_delay < self.initial_delay:
            raise ValueError(f"max_delay {self.max_delay} < initial_delay {self.initial_delay}")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"factor must be >= 1, not {self.factor!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within 0..1, not {self.jitter!r}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 or None, not {self.max_attempts!r}")

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before re-import ``attempt`` (0 for the first) of an outage."""
        base = self.initial_delay * self.factor ** min(attempt, 64)  # 2**64 s is past any max_delay
        base = min(self.max_delay, base)
        return base * (1.0 - self.jitter * rand())


class Backoff:
    """The attempts of one policy: :meth:`next_delay` until it says stop, :meth:`reset` after a
    successful (and stable) import."""

    def __init__(self, policy: ReconnectPolicy, rand: Callable[[], float] = random.random) -> None:
        self.policy = policy
        self.rand = rand
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    @property
    def exhausted(self) -> bool:
        limit = self.policy.max_attempts
        return limit is not None and self.attempt >= limit

    def next_delay(self) -> float | None:
        """The wait before the next attempt, or None when ``max_attempts`` are used up."""
        if self.exhausted:
            return None
        d = self.policy.delay(self.attempt, self.rand)
        self.attempt += 1
        return d


__all__ = ["Backoff", "ReconnectPolicy"]
