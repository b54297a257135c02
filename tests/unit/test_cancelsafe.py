"""usbip.cancelsafe: awaits that never lose a cancellation (CPython gh-86296 and the suppress idiom)."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest

from usbip.cancelsafe import cancel_and_wait, wait_for

STDLIB_LOSES_IT = pytest.mark.xfail(
    sys.version_info < (3, 12), strict=True, reason="gh-86296: 3.10/3.11's wait_for returns the result instead"
)


async def _cancel_as_it_finishes(bounded) -> str:
    """A poller looping on bounded(event.wait(), 5), cancelled in the loop iteration in which its
    event's waiter has finished but the poller has not resumed yet: 'cancelled' or 'lost'."""
    wake = asyncio.Event()
    rounds = 0

    async def poll() -> None:
        nonlocal rounds
        while rounds < 10:  # bounded: a lost cancellation ends here instead of hanging the test
            with contextlib.suppress(asyncio.TimeoutError):
                await bounded(wake.wait(), 5)
            wake.clear()
            rounds += 1

    task = asyncio.create_task(poll())
    await asyncio.sleep(0.01)
    for _ in range(10):
        wake.set()
        await asyncio.sleep(0)  # the inner wait completes, the poller is only scheduled
        task.cancel()
        await asyncio.sleep(0.01)
        if task.done():
            break
    if not task.done():
        task.cancel()  # the stdlib's lost it every time: stop the poller for good
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 1)
        return "lost"
    return "cancelled" if task.cancelled() else "lost"


@pytest.mark.parametrize(
    "bounded", [wait_for, pytest.param(asyncio.wait_for, marks=STDLIB_LOSES_IT)], ids=["ours", "stdlib"]
)
def test_cancellation_racing_the_result_is_not_lost(bounded):
    assert asyncio.run(_cancel_as_it_finishes(bounded)) == "cancelled"


def test_result_timeout_and_no_timeout():
    async def body():
        async def value():
            await asyncio.sleep(0)
            return 7

        assert await wait_for(value(), 1) == 7
        assert await wait_for(value(), None) == 7
        with pytest.raises(asyncio.TimeoutError):
            await wait_for(asyncio.sleep(10), 0.01)
        fut = asyncio.get_running_loop().create_future()
        with pytest.raises(asyncio.TimeoutError):
            await wait_for(asyncio.shield(fut), 0)
        assert not fut.cancelled()  # shielded: still there for whoever else waits on it
        fut.set_result(None)
        plain = asyncio.get_running_loop().create_future()
        with pytest.raises(asyncio.TimeoutError):
            await wait_for(plain, 0.01)
        assert plain.cancelled()  # as asyncio.wait_for: what timed out is cancelled

    asyncio.run(body())


def test_libusb_backend_close_ends_a_poller_woken_as_it_is_cancelled(tmp_path):
    """The CI hang: the closing server released a device, whose refresh hook woke the backend's
    rescan poller in the same iteration as backend.close() cancelled it; the poller swallowed the
    cancellation and close() (and usbipd's shutdown) waited for it for ever."""
    from usbip.backends.libusb.backend import LibusbBackend

    class Registry:
        refresh_hooks: list = []

    async def body():
        be = LibusbBackend(Registry(), str(tmp_path / "exported.json"), sysfs_root=str(tmp_path), poll_interval=60)
        be.start()
        for _ in range(200):  # first scan (no rules: nothing to export) done, poller waits again
            await asyncio.sleep(0.005)
            if be._scan_future is not None and be._scan_future.done():
                break
        await asyncio.sleep(0.05)
        be.refresh()  # a released device wakes the poller ...
        await asyncio.sleep(0)
        poller = be._task
        closing = asyncio.create_task(be.close())  # ... as close() cancels it
        done, _ = await asyncio.wait([closing], timeout=5)
        hung = closing not in done
        if hung:  # the poller lost its cancellation: stop it for good so the test ends
            be.poll_interval = 0
            poller.cancel()
            await asyncio.wait([closing], timeout=5)
        assert not hung, "backend.close() still waiting for its rescan poller"
        assert poller is not None and poller.done()

    asyncio.run(body())


async def _suppress_idiom(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.mark.parametrize(
    "stop",
    [cancel_and_wait, pytest.param(_suppress_idiom, marks=pytest.mark.xfail(strict=True))],
    ids=["ours", "suppress"],
)
def test_cancel_and_wait_keeps_the_callers_cancellation(stop):
    """A closer cancelled while its helper task is still winding down is cancelled itself."""

    async def body() -> str:
        async def helper() -> None:
            try:
                await asyncio.sleep(10)
            finally:
                await asyncio.sleep(0.05)  # winding down takes a while

        task = asyncio.create_task(helper())
        await asyncio.sleep(0)

        async def close() -> str:
            await stop(task)
            return "went on"

        closer = asyncio.create_task(close())
        await asyncio.sleep(0.01)
        closer.cancel()
        done, _ = await asyncio.wait([closer], timeout=5)
        assert done
        await asyncio.wait([task], timeout=5)  # told to stop either way: it ends
        assert task.cancelled()
        return "cancelled" if closer.cancelled() else closer.result()

    assert asyncio.run(body()) == "cancelled"


def test_cancel_and_wait_raises_what_the_task_raised():
    async def body():
        async def helper():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                raise RuntimeError("cleanup failed") from None

        task = asyncio.create_task(helper())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="cleanup failed"):
            await cancel_and_wait(task)
        done = asyncio.create_task(asyncio.sleep(0))
        await done
        await cancel_and_wait(done)  # already finished: nothing to do, nothing raised

    asyncio.run(body())
