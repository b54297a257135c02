"""What guest commands return (:class:`Result`) and what the kernel-test harness raises."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Result:
    rc: int
    out: str  # stdout + stderr, combined, decoded (errors replaced)
    cmd: str = ""
    raw: bytes = b""
    duration: float = 0.0
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def check(self) -> Result:
        if self.rc != 0:
            raise CommandFailed(self)
        return self

    def __str__(self) -> str:  # handy in assertion messages
        return f"[rc={self.rc}] {self.cmd}\n{self.out}"


class GuestError(RuntimeError):
    """Base class for everything that goes wrong with the guest."""


class GuestDied(GuestError):
    """QEMU exited (kernel panic, init died, crash)."""


class GuestTimeout(GuestError):
    """The guest did not answer in time (boot or agent channel)."""


class CommandTimeout(GuestError):
    """A command exceeded its timeout in the guest (it was killed)."""

    def __init__(self, msg: str, result: Result):
        super().__init__(msg)
        self.result = result


class CommandFailed(GuestError):
    """``run(..., check=True)`` and the command returned rc != 0."""

    def __init__(self, result: Result):
        super().__init__(f"guest command failed with rc={result.rc}: {result.cmd!r}\n--- output ---\n{result.out}")
        self.result = result
