"""Awaits that never lose a cancellation: ``wait_for`` (bounded) and ``cancel_and_wait``.

Python 3.10 and 3.11's ``asyncio.wait_for`` loses the caller's cancellation when the awaited
thing finishes in the same loop iteration as the ``cancel()``: it returns the result instead
of raising ``CancelledError`` (CPython gh-86296, fixed in 3.12 by re-implementing it over
``asyncio.timeout``). A ``while True`` loop around it then never ends: usbipd hung at
shutdown when a device released by the closing server woke the libusb backend's rescan
poller just as ``backend.close()`` cancelled it. Every bounded await in the package goes
through here (ruff's banned-api rule keeps it so).

``with suppress(CancelledError): await task`` after ``task.cancel()``, the usual way to stop a
helper task, swallows the *caller's* cancellation as well when it arrives during that await;
``cancel_and_wait`` does not.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["cancel_and_wait", "wait_for"]


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has ended. Raises what the task raised other than its
    cancellation, and ``CancelledError`` if the caller is cancelled meanwhile (the task has been
    told to stop already)."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


if sys.version_info >= (3, 12):
    wait_for = asyncio.wait_for  # noqa: TID251  (fixed in 3.12)

elif sys.version_info >= (3, 11):

    async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
        """``asyncio.wait_for`` that raises ``CancelledError`` when cancelled, whatever ``aw`` did."""
        async with asyncio.timeout(timeout):
            return await aw

else:  # 3.10: no asyncio.timeout, no Task.uncancel

    async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
        """``asyncio.wait_for`` that raises ``CancelledError`` when cancelled, whatever ``aw`` did.
        (A cancellation arriving in the very iteration the timeout fires is reported as the
        timeout: 3.10 cannot tell the two apart.)"""
        if timeout is None:
            return await aw
        task = asyncio.current_task()
        assert task is not None, "wait_for needs a running task"
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        handle = asyncio.get_running_loop().call_later(max(0.0, timeout), expire)
        try:
            return await aw
        except asyncio.CancelledError:
            if expired:
                raise asyncio.TimeoutError from None
            raise
        finally:
            handle.cancel()
