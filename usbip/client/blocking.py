"""A blocking wrapper around the asyncio client, for scripts.

    from usbip.client.blocking import connect
    with connect("localhost") as conn:
        dev = conn.import_device("100-1")
        data = dev.bulk_transfer(0x81, 512)

An event loop runs in a background thread; every call waits for its result.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from ..protocol.constants import USBIP_PORT
from ..protocol.records import DeviceRecord
from .connection import Connection
from .reconnect import ReconnectPolicy
from .remote import RemoteDevice, UrbResult

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="usbip-client", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


class BlockingDevice:
    """Blocking twin of :class:`RemoteDevice`."""

    def __init__(self, runner: _LoopThread, dev: RemoteDevice) -> None:
        self._run = runner
        self.device = dev
        self.record = dev.record
        self.busid = dev.busid

    @property
    def device_descriptor(self) -> dict[str, int] | None:
        return self.device.device_descriptor

    @property
    def configuration_descriptor(self) -> bytes | None:
        return self.device.configuration_descriptor

    def control_transfer(
        self,
        bmRequestType: int,
        bRequest: int,
        wValue: int,
        wIndex: int,
        data_or_length: bytes | int = 0,
        timeout: float | None = 5.0,
    ) -> bytes:
        return self._run.call(
            self.device.control_transfer(bmRequestType, bRequest, wValue, wIndex, data_or_length, timeout)
        )

    def bulk_transfer(self, endpoint: int, data_or_length: bytes | int, timeout: float | None = 5.0) -> bytes | int:
        return self._run.call(self.device.bulk_transfer(endpoint, data_or_length, timeout))

    interrupt_transfer = bulk_transfer

    def iso_transfer(
        self, endpoint: int, packets: Sequence[int] | Sequence[bytes], timeout: float | None = 5.0
    ) -> UrbResult:
        return self._run.call(self.device.iso_transfer(endpoint, packets, timeout))

    def close(self) -> None:
        self._run.call(self.device.close())

    def __enter__(self) -> BlockingDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlockingConnection:
    def __init__(self, host: str, port: int = USBIP_PORT, timeout: float = 10.0) -> None:
        self._run = _LoopThread()
        self._conn = Connection(host, port, timeout)

    def list_devices(self) -> list[DeviceRecord]:
        return self._run.call(self._conn.list_devices())

    def import_device(self, busid: str, reconnect: ReconnectPolicy | None = None) -> BlockingDevice:
        """``reconnect``: see :meth:`Connection.import_device`."""

        async def imp() -> RemoteDevice:
            return await self._conn.import_device(busid, reconnect=reconnect)

        return BlockingDevice(self._run, self._run.call(imp()))

    def close(self) -> None:
        try:
            self._run.call(self._conn.close(), 10)
        finally:
            self._run.stop()

    def __enter__(self) -> BlockingConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(host: str, port: int = USBIP_PORT, timeout: float = 10.0) -> BlockingConnection:
    return BlockingConnection(host, port, timeout)
