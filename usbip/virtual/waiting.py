"""URBs a virtual device parks until it can complete them (:class:`WaitQueue`), and the small
completion helpers the devices share."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from ..protocol.constants import (
    ECONNRESET,
    ENOENT,
    EPIPE,
    EREMOTEIO,
    URB_SHORT_NOT_OK,
)
from ..usb.device import Urb

if TYPE_CHECKING:
    from .framework import VirtualDevice


class WaitQueue:
    """A FIFO of URBs parked until the device has something for them (a NAKing endpoint).

    Parked URBs stay cancellable: :meth:`VirtualDevice.cancel` takes them out and
    completes them with ``-ECONNRESET``.
    """

    __slots__ = ("_device", "_q")

    def __init__(self, device: VirtualDevice) -> None:
        self._device = device
        self._q: deque[Urb] = deque()
        # registered so abort_all() empties it too (also of URBs taken out of _waiting); a subclass
        # may create its queues before VirtualDevice.__init__ has run
        device.__dict__.setdefault("_queues", []).append(self)

    def park(self, urb: Urb) -> None:
        self._q.append(urb)
        self._device._waiting[urb] = self._abort

    def pop(self) -> Urb | None:
        """The oldest parked URB (no longer cancellable through this queue), or None."""
        q = self._q
        while q:
            urb = q.popleft()
            self._device._waiting.pop(urb, None)
            if not urb.done:
                return urb
        return None

    def peek(self) -> Urb | None:
        q = self._q
        while q and q[0].done:
            self._device._waiting.pop(q.popleft(), None)
        return q[0] if q else None

    def push_front(self, urb: Urb) -> None:
        """Put back an URB taken with :meth:`pop` that could not be finished."""
        self._q.appendleft(urb)
        self._device._waiting[urb] = self._abort

    def _abort(self, urb: Urb, status: int) -> None:
        try:
            self._q.remove(urb)
        except ValueError:
            pass
        urb.complete(status, 0)

    def abort_all(self, status: int = ECONNRESET) -> None:
        while self._q:
            urb = self._q.popleft()
            self._device._waiting.pop(urb, None)
            urb.complete(status, 0)

    def __len__(self) -> int:
        return len(self._q)

    def __bool__(self) -> bool:
        return self.peek() is not None


def complete_in(urb: Urb, n: int) -> None:
    """Complete an IN URB with ``n`` bytes; a short one fails -EREMOTEIO under URB_SHORT_NOT_OK."""
    if n < urb.transfer_buffer_length and urb.transfer_flags & URB_SHORT_NOT_OK:
        urb.complete(EREMOTEIO, n)
    else:
        urb.complete(0, n)


def no_endpoint(urb: Urb) -> None:
    urb.complete(ENOENT, 0)


def stall(urb: Urb) -> None:
    urb.complete(EPIPE, 0)
