"""The backend's private asyncio loop, in a daemon thread, and bounded waits on it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ..cancelsafe import wait_for

log = logging.getLogger(__name__)

T = TypeVar("T")

#: a wait without a deadline (a PyUSB timeout of 0) checks this often that the loop still runs
POLL = 1.0


def settle(fut: concurrent.futures.Future[Any], result: Any = None, exc: BaseException | None = None) -> bool:
    """Complete ``fut`` unless it is done already (the waiter may have cancelled it meanwhile)."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        return False
    return True


class LoopGone(RuntimeError):
    """The loop was stopped (the backend closed) or its thread died."""


class LoopThread:
    """An event loop running in a daemon thread of its own; :meth:`call` runs a coroutine on it.

    It holds no reference to the backend, so a backend nobody references can be collected
    (and its finalizer stops this).
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            log.debug("%s: loop stopped", self.thread.name)

    @property
    def alive(self) -> bool:
        return not self._stopping and self.thread.is_alive() and not self.loop.is_closed()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def call(self, coro: Coroutine[Any, Any, T], wait: float | None) -> T:
        """Run ``coro`` on the loop and wait for it: at most ``wait`` seconds (then it is cancelled
        and ``concurrent.futures.TimeoutError`` raised), or without a deadline for ``None``, in
        slices that notice a dead loop. An interrupt (KeyboardInterrupt) cancels it too."""
        if not self.alive:
            coro.close()
            raise LoopGone("the backend is closed")
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("a PyUSB call from the backend's own event loop would wait for itself")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return self.wait(fut, wait, fut.cancel)

    def call_soon(
        self, fn: Callable[[concurrent.futures.Future[T]], Any], fut: concurrent.futures.Future[T] | None = None
    ) -> concurrent.futures.Future[T]:
        """Run ``fn(future)`` on the loop; ``fn`` (or what it sets up) completes the future
        (``fut`` if given: a caller that made it first can cancel it whenever an interrupt lands).

        Cheaper than a coroutine (no task, no extra loop iterations): the hot path of transfers.
        """
        if not self.alive:
            raise LoopGone("the backend is closed")
        if self.in_loop_thread():
            raise RuntimeError("a PyUSB call from the backend's own event loop would wait for itself")
        if fut is None:
            fut = concurrent.futures.Future()

        def run() -> None:
            try:
                fn(fut)
            except BaseException as exc:
                settle(fut, exc=exc)

        self.loop.call_soon_threadsafe(run)
        return fut

    def wait(self, fut: concurrent.futures.Future[T], wait: float | None, cancel: Callable[[], Any]) -> T:
        """Wait for ``fut``: at most ``wait`` seconds, or for ``None`` in slices that notice a dead
        loop; ``cancel()`` runs when the wait ends early (timed out, interrupted)."""
        deadline = None if wait is None else time.monotonic() + wait
        try:
            while True:
                left = POLL if deadline is None else min(POLL, max(0.0, deadline - time.monotonic()))
                try:
                    return fut.result(left)
                except concurrent.futures.TimeoutError:
                    if fut.done():  # the operation's own TimeoutError
                        raise
                    if not self.thread.is_alive():
                        raise LoopGone("the backend's event loop thread died") from None
                    if deadline is not None and time.monotonic() >= deadline:
                        raise
        except BaseException:
            if not fut.done():
                cancel()
            raise

    def stop(self, cleanup: Coroutine[Any, Any, None] | None = None, timeout: float = 10.0) -> None:
        """Run ``cleanup`` (bounded), cancel what is left, stop the loop and join the thread."""
        if self._stopping:
            if cleanup is not None:
                cleanup.close()
            return
        self._stopping = True

        async def shutdown() -> None:
            if cleanup is not None:
                try:
                    await wait_for(cleanup, timeout)
                except Exception as exc:  # closing: report, never raise
                    log.warning("closing the USB/IP backend: %s", str(exc) or type(exc).__name__)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=2.0)
            with contextlib.suppress(Exception):
                await wait_for(self.loop.shutdown_asyncgens(), 2.0)

        if not self.thread.is_alive() or self.loop.is_closed():
            if cleanup is not None:
                cleanup.close()
            return
        fut = asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        fut.add_done_callback(lambda _f: self.loop.call_soon_threadsafe(self.loop.stop))
        if self.in_loop_thread():  # finalized from a callback of the loop: it stops once this returns
            return
        with contextlib.suppress(concurrent.futures.TimeoutError, concurrent.futures.CancelledError, RuntimeError):
            fut.result(timeout + 5.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5.0)
        if self.thread.is_alive():
            log.warning("%s: the event loop thread did not stop (it is a daemon thread)", self.thread.name)
        else:
            self.loop.close()
