"""DaemonWorker: calls in order on one daemon thread; a stuck call does not keep the process alive."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import pytest

from usbip.backends.worker import DaemonWorker


def test_calls_run_in_order_on_one_daemon_thread() -> None:
    w = DaemonWorker("t-worker")
    seen: list[tuple[int, str]] = []
    futs = [w.submit(lambda i=i: seen.append((i, threading.current_thread().name)) or i * i) for i in range(5)]
    assert [f.result(timeout=5) for f in futs] == [0, 1, 4, 9, 16]
    assert seen == [(i, "t-worker") for i in range(5)]
    assert w._thread.daemon
    w.shutdown()
    with pytest.raises(RuntimeError):
        w.submit(print)


def test_exceptions_reach_the_caller_and_run_in_executor_works() -> None:
    w = DaemonWorker("t-worker")

    async def main() -> int:
        loop = asyncio.get_running_loop()
        with pytest.raises(ZeroDivisionError):
            await loop.run_in_executor(w, lambda: 1 // 0)
        return await loop.run_in_executor(w, int, "42")

    assert asyncio.run(main()) == 42
    w.shutdown()


def test_shutdown_cancels_queued_calls() -> None:
    w = DaemonWorker("t-worker")
    gate, started = threading.Event(), threading.Event()
    first = w.submit(lambda: started.set() or gate.wait(5))
    assert started.wait(5)
    queued = w.submit(int, "1")
    w.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    gate.set()
    assert first.result(timeout=5) is True


def test_a_stuck_call_does_not_keep_the_interpreter_alive() -> None:
    code = (
        "import threading\n"
        "from usbip.backends.worker import DaemonWorker\n"
        "w = DaemonWorker('stuck')\n"
        "w.submit(threading.Event().wait)\n"  # never returns
        "w.shutdown(wait=False)\n"
        "print('exiting')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "exiting", r
