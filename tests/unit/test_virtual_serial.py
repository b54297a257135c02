"""SerialDevice: CDC-ACM descriptors and class requests, bridged to a PTY."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from usbip.protocol.constants import ECONNRESET, EPIPE
from usbip.usb.descriptors import endpoints, interface_classes, walk
from usbip.virtual import SerialDevice
from usbip.virtual.testing import bulk_in, bulk_out, control, result, set_configuration


@pytest.fixture
def dev():
    d = SerialDevice()
    assert set_configuration(d, 1) == 0
    yield d
    d.release()


async def until(cond, timeout=2.0):
    async def poll():
        while not cond():
            await asyncio.sleep(0.002)

    await asyncio.wait_for(poll(), timeout)


def test_descriptors(dev):
    cfg = dev.configuration_descriptor(0)
    assert interface_classes(cfg) == [(2, 2, 1), (0x0A, 0, 0)]
    functional = [d for t, d in walk(cfg) if t == 0x24]
    assert [d[2] for d in functional] == [0x00, 0x01, 0x02, 0x06]  # header, call mgmt, ACM, union
    assert functional[3][3:] == b"\x00\x01"
    eps = {e["bEndpointAddress"]: e["bmAttributes"] & 3 for e in endpoints(cfg)}
    assert eps == {0x82: 3, 0x81: 2, 0x01: 2}
    assert dev.device_descriptor[4] == 0x02
    assert os.path.exists(dev.pty_path) and dev.pty_path.startswith("/dev/")


def test_class_requests(dev):
    assert control(dev, 0xA1, 0x21, 0, 0, 7) == (0, struct.pack("<IBBB", 115200, 0, 0, 8))
    coding = struct.pack("<IBBB", 9600, 2, 1, 7)
    assert control(dev, 0x21, 0x20, 0, 0, 0, coding)[0] == 0
    assert control(dev, 0xA1, 0x21, 0, 0, 7) == (0, coding) and dev.baudrate == 9600
    assert control(dev, 0x21, 0x22, 0x03, 0, 0)[0] == 0 and dev.dtr and dev.control_lines == 3
    assert control(dev, 0x21, 0x23, 0xFFFF, 0, 0)[0] == 0 and dev.breaks == 1
    assert control(dev, 0x21, 0x20, 0, 0, 0, b"\x00")[0] == EPIPE  # short line coding
    assert control(dev, 0x21, 0x42, 0, 0, 0)[0] == EPIPE


def test_pty_to_bulk_in(dev):
    async def main():
        urb = bulk_in(dev, 1, 512)
        await asyncio.sleep(0.01)
        assert not urb.done  # nothing written yet: waits
        os.write(dev.slave, b"hello from the pty")
        await until(lambda: urb.done)
        assert result(urb) == (0, b"hello from the pty")
        # data already there: completes at once
        os.write(dev.slave, b"more")
        await asyncio.sleep(0.01)
        urb2 = bulk_in(dev, 1, 512)
        await until(lambda: urb2.done)
        assert result(urb2) == (0, b"more")

    asyncio.run(main())


def test_bulk_out_to_pty(dev):
    async def main():
        payload = bytes(range(256)) * 4  # raw mode: every byte value passes unchanged
        urb = bulk_out(dev, 1, payload)
        await until(lambda: urb.done)
        assert urb.status == 0 and urb.actual_length == len(payload)
        got = b""
        loop = asyncio.get_running_loop()
        while len(got) < len(payload):
            got += await asyncio.wait_for(loop.run_in_executor(None, os.read, dev.slave, 4096), 2)
        assert got == payload

    asyncio.run(main())


def test_opened_slave_path_round_trip(dev):
    async def main():
        fd = os.open(dev.pty_path, os.O_RDWR | os.O_NOCTTY)
        try:
            urb = bulk_out(dev, 1, b"ping\n")
            await until(lambda: urb.done)
            loop = asyncio.get_running_loop()
            assert await asyncio.wait_for(loop.run_in_executor(None, os.read, fd, 100), 2) == b"ping\n"
            inn = bulk_in(dev, 1, 64)
            os.write(fd, b"pong\n")
            await until(lambda: inn.done)
            assert result(inn) == (0, b"pong\n")
        finally:
            os.close(fd)

    asyncio.run(main())


def test_cancel_waiting_urbs(dev):
    async def main():
        urb = bulk_in(dev, 1, 512)
        note = bulk_in(dev, 2, 16)  # notification endpoint: nothing ever comes
        await asyncio.sleep(0.01)
        assert not urb.done and not note.done
        dev.cancel(urb)
        dev.cancel(note)
        assert urb.status == ECONNRESET and note.status == ECONNRESET
        os.write(dev.slave, b"after")
        nxt = bulk_in(dev, 1, 512)
        await until(lambda: nxt.done)
        assert result(nxt) == (0, b"after")
        await dev.close()

    asyncio.run(main())


def test_out_flow_control_when_pty_full(dev):
    async def main():
        chunk = b"z" * 65536
        urbs = [bulk_out(dev, 1, chunk) for _ in range(8)]  # more than the PTY buffers
        await asyncio.sleep(0.05)
        assert not all(u.done for u in urbs)  # some wait for room
        total = 0
        loop = asyncio.get_running_loop()
        while total < len(chunk) * len(urbs):
            total += len(await asyncio.wait_for(loop.run_in_executor(None, os.read, dev.slave, 65536), 2))
        await until(lambda: all(u.done for u in urbs))
        assert all(u.status == 0 and u.actual_length == len(chunk) for u in urbs)

    asyncio.run(main())
