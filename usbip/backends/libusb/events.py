"""Running libusb's event handling from asyncio.

Two ways, same interface (``start()``, ``stop()``, ``dispatch(fn, *args)``):

* :class:`PollFdEvents` (default): libusb's pollfds (its eventfd, timerfd and
  every open usbfs node, which signals URB completion with POLLOUT) are watched
  by the event loop itself (``add_reader``/``add_writer``), kept in sync through
  ``setPollFDNotifiers``; when one fires, ``handleEventsTimeout(0)`` reaps the
  completions and the transfer callbacks run right there, in the loop thread.
  No thread hop, no lock, no wake-up pipe.
* :class:`ThreadEvents` (fallback when libusb has no pollfds, or on request):
  a thread blocks in ``handleEventsTimeout`` and callbacks hop to the loop with
  ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class PollFdEvents:
    mode = "pollfd"

    def __init__(self, context: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.context = context
        self.loop = loop
        self._fds: dict[int, int] = {}  # fd -> events registered
        self._timer: asyncio.TimerHandle | None = None
        self._running = False
        self._thread_id = threading.get_ident()
        self.wakeups = 0

    # ------------------------------------------------------------ fds
    def _add(self, fd: int, events: int) -> None:
        self._remove(fd)
        if events & select.POLLIN:
            self.loop.add_reader(fd, self._handle)
        if events & select.POLLOUT:
            self.loop.add_writer(fd, self._handle)
        self._fds[fd] = events

    def _remove(self, fd: int) -> None:
        events = self._fds.pop(fd, None)
        if events is None:
            return
        if events & select.POLLIN:
            self.loop.remove_reader(fd)
        if events & select.POLLOUT:
            self.loop.remove_writer(fd)

    def _on_added(self, fd: int, events: int, _user_data: Any = None) -> None:
        if threading.get_ident() == self._thread_id:
            self._add(fd, events)
        else:  # libusb called us from one of its own threads
            self.loop.call_soon_threadsafe(self._add, fd, events)

    def _on_removed(self, fd: int, _user_data: Any = None) -> None:
        if threading.get_ident() == self._thread_id:
            self._remove(fd)
        else:
            self.loop.call_soon_threadsafe(self._remove, fd)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        fds = self.context.getPollFDList()  # NotImplementedError: no pollfds on this platform
        self._thread_id = threading.get_ident()
        self.context.setPollFDNotifiers(self._on_added, self._on_removed)
        for fd, events in fds:
            self._add(fd, events)
        self._running = True
        self._schedule_timeout()

    def stop(self) -> None:
        self._running = False
        with contextlib.suppress(Exception):
            self.context.setPollFDNotifiers(None, None)
        for fd in list(self._fds):
            self._remove(fd)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule_timeout(self) -> None:
        # Linux libusb uses a timerfd (one of the pollfds); this only matters elsewhere.
        try:
            timeout = self.context.getNextTimeout()
        except Exception:
            timeout = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if timeout is not None and self._running:
            self._timer = self.loop.call_later(max(timeout, 0.0), self._handle)

    def _handle(self) -> None:
        if not self._running:
            return
        self.wakeups += 1
        try:
            self.context.handleEventsTimeout(0)
        except Exception as exc:  # USBErrorInterrupted and friends: try again on the next wake-up
            log.debug("libusb handle events: %s", exc)
        if self._timer is not None:
            self._schedule_timeout()

    def dispatch(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a transfer completion: already in the loop thread here."""
        fn(*args)


class ThreadEvents:
    mode = "thread"

    def __init__(self, context: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.context = context
        self.loop = loop
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wakeups = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="libusb-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.context.handleEventsTimeout(0.5)
            except Exception as exc:
                log.debug("libusb handle events: %s", exc)
            self.wakeups += 1

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self.context.interruptEventHandler()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None

    def dispatch(self, fn: Callable[..., None], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)


def make_events(context: Any, loop: asyncio.AbstractEventLoop, mode: str = "pollfd") -> PollFdEvents | ThreadEvents:
    """Start event handling for ``context``: pollfds on the loop when possible, else a thread."""
    if mode == "pollfd":
        ev = PollFdEvents(context, loop)
        try:
            ev.start()
            return ev
        except (NotImplementedError, OSError) as exc:
            log.info("libusb pollfds unavailable (%s): using an event thread", exc)
            ev.stop()
    th = ThreadEvents(context, loop)
    th.start()
    return th
