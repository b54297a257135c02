"""Test scaffolding: a minimal device with a never-completing endpoint, a raw protocol client."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from usbip.protocol import HEADER_SIZE, Decoder, pack_cmd_submit, pack_cmd_unlink
from usbip.protocol.constants import ECONNRESET, EPIPE, Speed
from usbip.protocol.records import pack_import_request, unpack_op_header
from usbip.usb.device import Device, Urb

T = TypeVar("T")

DEVICE = struct.pack("<BBHBBBBHHHBBBB", 18, 1, 0x200, 0xFF, 0, 0, 64, 0x1D6B, 0x0104, 0x100, 0, 0, 0, 1)
_IFACE = bytes([9, 4, 0, 0, 3, 0xFF, 0, 0, 0])
_EPS = bytes([7, 5, 0x81, 2, 0, 2, 0]) + bytes([7, 5, 0x01, 2, 0, 2, 0]) + bytes([7, 5, 0x82, 2, 0, 2, 0])
CONFIG = struct.pack("<BBHBBBBB", 9, 2, 9 + len(_IFACE) + len(_EPS), 1, 1, 0, 0x80, 50) + _IFACE + _EPS


class ProbeDevice(Device):
    """ep1 IN: returns seqnum-stamped data at once; ep1 OUT: sink; ep2 IN: pends until cancelled."""

    speed = Speed.HIGH

    def __init__(self) -> None:
        self.busid = ""
        self.waiting: list[Urb] = []
        self.cancelled: list[int] = []
        self.opened = 0
        self.closed = 0
        self.received = bytearray()

    @property
    def device_descriptor(self) -> bytes:
        return DEVICE

    def configuration_descriptor(self, index: int = 0) -> bytes:
        return CONFIG

    async def open(self) -> None:
        self.opened += 1

    async def close(self) -> None:
        self.closed += 1

    def submit(self, urb: Urb) -> None:
        if urb.ep == 0:
            s = urb.setup
            if s[0] == 0x80 and s[1] == 6 and s[3] in (1, 2):
                d = DEVICE if s[3] == 1 else CONFIG
                n = min(len(d), urb.transfer_buffer_length)
                memoryview(urb.buffer)[:n] = d[:n]
                urb.complete(0, n)
            elif s[0] == 0x00 and s[1] == 9:
                urb.complete(0, 0)
            else:
                urb.complete(EPIPE, 0)
        elif urb.ep == 1 and urb.is_in:
            n = urb.transfer_buffer_length
            pattern = (urb.seqnum.to_bytes(4, "big") * (n // 4 + 1))[:n]
            memoryview(urb.buffer)[:n] = pattern
            urb.complete(0, n)
        elif urb.ep == 1:
            self.received += urb.buffer
            urb.complete(0, urb.transfer_buffer_length)
        else:
            self.waiting.append(urb)

    def cancel(self, urb: Urb) -> None:
        self.cancelled.append(urb.seqnum)
        if urb in self.waiting:
            self.waiting.remove(urb)
            urb.complete(ECONNRESET, 0)

    def finish_waiting(self, data: bytes = b"done") -> None:
        for urb in self.waiting:
            memoryview(urb.buffer)[: len(data)] = data
            urb.complete(0, len(data))
        self.waiting.clear()


def run(coro_fn: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """Run an async test body with a bound on its duration."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)  # type: ignore[arg-type]

    return asyncio.run(bounded())


class RawClient:
    """Speaks the wire directly, to send what a well-behaved client never would."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.sock: socket.socket | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.decoder = Decoder("client")
        self.devid = 0
        self.seq = 0

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    async def read_exactly(self, n: int) -> bytes:
        assert self.reader is not None
        return await asyncio.wait_for(self.reader.readexactly(n), 10)

    async def import_device(self, busid: str) -> int:
        await self.connect()
        await self.send(pack_import_request(busid))
        head = unpack_op_header(await self.read_exactly(8))
        if head.status == 0:
            rec = await self.read_exactly(312)
            busnum, devnum = struct.unpack_from(">II", rec, 288)
            self.devid = busnum << 16 | devnum
        return head.status

    def submit_bytes(
        self,
        ep: int,
        is_in: bool,
        length: int,
        data: bytes = b"",
        seqnum: int | None = None,
        setup: bytes = bytes(8),
        devid: int | None = None,
    ) -> tuple[int, bytes]:
        if seqnum is None:
            self.seq += 1
            seqnum = self.seq
        hdr = bytearray(HEADER_SIZE)
        pack_cmd_submit(
            hdr, 0, seqnum, self.devid if devid is None else devid, int(is_in), ep, 0, length, 0, 0, 0, setup
        )
        self.decoder.expect(seqnum, length if is_in else -1)
        return seqnum, bytes(hdr) + (b"" if is_in else data)

    def unlink_bytes(self, target: int) -> tuple[int, bytes]:
        self.seq += 1
        hdr = bytearray(HEADER_SIZE)
        pack_cmd_unlink(hdr, 0, self.seq, self.devid, 0, 0, target)
        return self.seq, bytes(hdr)

    async def replies(self, count: int) -> list[Any]:
        out: list[Any] = []
        assert self.reader is not None
        while len(out) < count:
            chunk = await asyncio.wait_for(self.reader.read(65536), 10)
            if not chunk:
                raise ConnectionError("server closed the connection")
            out.extend(self.decoder.feed(chunk))
        return out

    async def closed_by_server(self) -> bool:
        """True when the server closes the connection (EOF or reset) within 10 s, False otherwise."""
        assert self.reader is not None
        try:
            while await asyncio.wait_for(self.reader.read(65536), 10):
                pass
        except ConnectionResetError:
            return True
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``pred`` (bounded) — for state the server settles asynchronously."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.01)
    return True


def idle(srv: Any) -> bool:
    """Nothing alive on the server: connections, sessions, URBs, claimed devices, pool buffers."""
    s = srv.stats()
    return (
        s["connections"] == 0
        and s["sessions"] == 0
        and s["pending_urbs"] == 0
        and s["busy_devices"] == 0
        and s["pool_outstanding"] == 0
    )
