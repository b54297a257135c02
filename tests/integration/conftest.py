"""Shared pieces of the end-to-end tests: an idle check for the server and a Bulk-Only host over the client."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

from usbip.client import RemoteDevice, Stall
from usbip.server import Server
from usbip.usb.device import Device

from .helpers import idle, wait_until


@contextlib.asynccontextmanager
async def exported(*devices: Device) -> AsyncIterator[Server]:
    """A server on an ephemeral port exporting ``devices`` (busids 100-1, 100-2, ...).

    When the body ends without error, the server must become idle (bounded wait).
    """
    async with Server(devices, host="127.0.0.1", port=0) as srv:
        yield srv
        ok = await wait_until(lambda: idle(srv), 5.0)
        assert ok, f"server not idle after the test: {srv.stats()}"


# ---------------------------------------------------------------- Bulk-Only Transport over the client
CBW = struct.Struct("<IIIBBB16s")
CSW = struct.Struct("<IIIB")
CBW_SIG = 0x43425355
CSW_SIG = 0x53425355
CSW_GOOD, CSW_FAILED, CSW_PHASE = 0, 1, 2


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


INQUIRY = bytes((0x12, 0, 0, 0, 36, 0))
READ_CAPACITY10 = bytes((0x25,)) + bytes(9)
REQUEST_SENSE = bytes((0x03, 0, 0, 0, 18, 0))
TEST_UNIT_READY = bytes(6)


class Bot:
    """A small Bulk-Only Transport host on a :class:`RemoteDevice`: CBW, data stage, CSW.

    A stalled data stage is cleared with CLEAR_FEATURE(ENDPOINT_HALT) before the CSW is read,
    as usb-storage does.
    """

    def __init__(self, dev: RemoteDevice, ep_in: int = 0x81, ep_out: int = 0x02, chunk: int = 16384) -> None:
        self.dev = dev
        self.ep_in = ep_in
        self.ep_out = ep_out
        self.chunk = chunk
        self.tag = 0x1000
        self.stalls: list[int] = []

    async def command(
        self, cdb: bytes, data_in: int = 0, data_out: bytes | None = None, timeout: float = 5.0
    ) -> tuple[int, int, bytes]:
        """(CSW status, residue, data read)."""
        self.tag += 1
        length = len(data_out) if data_out is not None else data_in
        flags = 0x80 if data_out is None and data_in else 0
        cbw = CBW.pack(CBW_SIG, self.tag, length, flags, 0, len(cdb), cdb.ljust(16, b"\0"))
        assert await self.dev.bulk_transfer(self.ep_out, cbw, timeout) == 31
        got = bytearray()
        try:
            if data_out:
                pos = 0
                while pos < len(data_out):
                    n = await self.dev.bulk_transfer(self.ep_out, data_out[pos : pos + self.chunk], timeout)
                    assert isinstance(n, int) and n > 0
                    pos += n
            elif data_in:
                while len(got) < data_in:
                    want = min(self.chunk, data_in - len(got))
                    part = await self.dev.bulk_transfer(self.ep_in, want, timeout)
                    assert isinstance(part, bytes)
                    got += part
                    if len(part) < want:
                        break
        except Stall:
            ep = self.ep_out if data_out else self.ep_in
            self.stalls.append(ep)
            await self.dev.clear_halt(ep)
        try:
            csw = await self.dev.bulk_transfer(self.ep_in, 13, timeout)
        except Stall:  # short data (Hi > Di) ends with a halted bulk IN: clear it, read the CSW again
            self.stalls.append(self.ep_in)
            await self.dev.clear_halt(self.ep_in)
            csw = await self.dev.bulk_transfer(self.ep_in, 13, timeout)
        assert isinstance(csw, bytes) and len(csw) == 13, csw
        sig, tag, residue, status = CSW.unpack(csw)
        assert (sig, tag) == (CSW_SIG, self.tag)
        return status, residue, bytes(got)

    async def sense(self) -> tuple[int, int, int]:
        """REQUEST SENSE: (sense key, ASC, ASCQ)."""
        status, _res, data = await self.command(REQUEST_SENSE, 18)
        assert status == CSW_GOOD and data[0] == 0x70, (status, data)
        return data[2] & 0x0F, data[12], data[13]


async def bounded(aw, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    """Await ``aw`` with a bound (a hang is a failure, not a stuck test run)."""
    return await asyncio.wait_for(aw, timeout)
