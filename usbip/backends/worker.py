"""A one-thread executor whose thread never keeps the process alive.

libusb/usbfs calls and sysfs reads can sleep in the kernel for as long as a device (or a
USB device lock) makes them: a SET_CONFIGURATION that waits for a vhci controller's
bandwidth_mutex, a hub thread holding a device lock. ``concurrent.futures.ThreadPoolExecutor``
threads are joined when the interpreter exits, so one such call kept usbipd from exiting
after SIGTERM. :class:`DaemonWorker` runs its calls in order on one daemon thread; usbipd
exits whatever that thread is doing.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class DaemonWorker(concurrent.futures.Executor):
    """Runs submitted calls one after another on a daemon thread (usable with
    ``loop.run_in_executor``)."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        with self._lock:
            if self._closed:
                raise RuntimeError("worker is shut down")
            fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
            self._queue.put((fut, fn, args, kwargs))
            return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    item[0].cancel()
            self._queue.put(_STOP)
        if wait:
            self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fut, fn, args, kwargs = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the waiter, as ThreadPoolExecutor does
                fut.set_exception(exc)
            else:
                fut.set_result(result)
            del item, fut, fn, args, kwargs
