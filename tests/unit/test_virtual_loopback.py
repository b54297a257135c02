"""LoopbackDevice: gadget zero's source/sink, loopback FIFO, iso and control tests."""

from __future__ import annotations

import asyncio
import os

import pytest

from usbip.protocol import IsoPackets
from usbip.protocol.constants import ECONNRESET, EOVERFLOW, EREMOTEIO, URB_SHORT_NOT_OK, Speed
from usbip.virtual import LoopbackDevice
from usbip.virtual.loopback import pattern_bytes
from usbip.virtual.testing import (
    bulk_in,
    bulk_out,
    control,
    in_urb,
    out_urb,
    result,
    set_configuration,
    set_interface,
)


def make(**kw):
    dev = LoopbackDevice(**kw)
    assert set_configuration(dev, 1) == 0
    return dev


@pytest.mark.parametrize("length", [0, 1, 512, 4096, 65536, 3 * 1024 * 1024 + 17])
def test_source_pattern0_zeros(length):
    dev = make()
    urb = bulk_in(dev, 1, length)
    st, data = result(urb)
    assert st == 0 and len(data) == length and data == bytes(length)


@pytest.mark.parametrize("speed,maxp", [(Speed.HIGH, 512), (Speed.SUPER, 1024), (Speed.FULL, 64)])
@pytest.mark.parametrize("length", [100, 512, 5000, 2 * 1024 * 1024 + 3])
def test_source_pattern1(speed, maxp, length):
    dev = make(pattern=1, speed=speed)
    st, data = result(bulk_in(dev, 1, length))
    assert st == 0 and len(data) == length
    assert data == bytes((i % maxp) % 63 for i in range(length))


def test_sink_accepts_and_checks_pattern1():
    dev = make(pattern=1)
    good = pattern_bytes(512, 4096)
    urb = bulk_out(dev, 1, good)
    assert urb.status == 0 and urb.actual_length == 4096 and dev.sink_errors == 0
    bad = bytearray(good)
    bad[1000] ^= 0xFF
    assert bulk_out(dev, 1, bytes(bad)).status == 0
    assert dev.sink_errors == 1
    big = pattern_bytes(512, 2 * 1024 * 1024 + 5)
    assert bulk_out(dev, 1, big).actual_length == len(big) and dev.sink_errors == 1


def test_sink_pattern0_accepts_anything():
    dev = make()
    urb = bulk_out(dev, 1, os.urandom(10000))
    assert urb.status == 0 and urb.actual_length == 10000 and dev.sink_errors == 0


def test_interrupt_source_and_sink():
    dev = make(pattern=1)
    st, data = result(bulk_in(dev, 4, 1024))
    assert st == 0 and data == pattern_bytes(1024, 1024)
    assert bulk_out(dev, 4, pattern_bytes(1024, 1024)).status == 0 and dev.sink_errors == 0


def test_loopback_fifo_order_and_split():
    dev = make()
    for chunk in (b"one", b"two", b"three"):
        assert bulk_out(dev, 2, chunk).status == 0
    assert dev.fifo_bytes == 11
    assert result(bulk_in(dev, 2, 512)) == (0, b"one")
    assert result(bulk_in(dev, 2, 2)) == (0, b"tw")  # a smaller IN takes part of a buffer
    assert result(bulk_in(dev, 2, 512)) == (0, b"o")
    assert result(bulk_in(dev, 2, 512)) == (0, b"three")
    assert dev.fifo_bytes == 0


def test_loopback_in_waits_then_completes():
    async def main():
        dev = make()
        urb = bulk_in(dev, 2, 512)
        assert not urb.done
        await asyncio.sleep(0.01)
        assert not urb.done
        payload = os.urandom(300)
        out = bulk_out(dev, 2, payload)
        assert out.status == 0 and out.actual_length == 300
        await asyncio.wait_for(_until(lambda: urb.done), 1)
        assert result(urb) == (0, payload)
        assert dev.fifo_bytes == 0

    asyncio.run(main())


async def _until(cond):
    while not cond():
        await asyncio.sleep(0.001)


def test_loopback_short_in_with_short_not_ok():
    dev = make()
    bulk_out(dev, 2, b"abc")
    urb = bulk_in(dev, 2, 512, transfer_flags=URB_SHORT_NOT_OK)
    assert urb.status == EREMOTEIO and result(urb)[1] == b"abc"


def test_loopback_fifo_full_parks_out():
    dev = make(fifo_size=1024)
    assert bulk_out(dev, 2, b"a" * 1024).status == 0
    parked = bulk_out(dev, 2, b"b" * 100)
    assert not parked.done  # NAK while the FIFO is full
    assert result(bulk_in(dev, 2, 2048)) == (0, b"a" * 1024)
    assert parked.done and parked.status == 0
    assert result(bulk_in(dev, 2, 2048)) == (0, b"b" * 100)


def test_cancel_waiting_in():
    dev = make()
    urb = bulk_in(dev, 2, 512)
    assert not urb.done and dev.pending_count == 1
    dev.cancel(urb)
    assert urb.done and urb.status == ECONNRESET and dev.pending_count == 0
    bulk_out(dev, 2, b"later")  # must not go to the cancelled URB
    assert result(bulk_in(dev, 2, 512)) == (0, b"later")


def test_iso_in_per_packet_results():
    dev = make(pattern=1)
    set_interface(dev, 0, 1)
    lengths = [1024, 1024, 100, 2000, 0]
    offs = [0, 1024, 2048, 2148, 4148]
    iso = IsoPackets.from_list([(o, n, 0, 0) for o, n in zip(offs, lengths, strict=True)] + [(8000, 1024, 0, 0)])
    urb = in_urb(3, 4148, iso=iso, number_of_packets=6)
    dev.submit(urb)
    assert urb.done and urb.status == 0
    got = [iso[i] for i in range(len(iso))]
    assert [g[2] for g in got] == [1024, 1024, 100, 1024, 0, 0]  # 2000 > maxp: one packet's worth
    assert [g[3] for g in got] == [0, 0, 0, 0, 0, EOVERFLOW]  # last one lies outside the buffer
    assert urb.actual_length == 1024 + 1024 + 100 + 1024 and urb.error_count == 1
    buf = bytes(urb.buffer)
    pat = pattern_bytes(1024)
    assert buf[0:1024] == pat[:1024] and buf[2048:2148] == pat[:100] and buf[2148:3172] == pat[:1024]


def test_iso_out_per_packet_results():
    dev = make(pattern=1)
    set_interface(dev, 0, 1)
    pat = pattern_bytes(1024, 1024)
    data = pat + pat[:500] + b"\xff" * 300
    iso = IsoPackets.from_list([(0, 1024, 0, 0), (1024, 500, 0, 0), (1524, 300, 0, 0), (1824, 10, 0, 0)])
    urb = out_urb(3, data, iso=iso, number_of_packets=4)
    dev.submit(urb)
    assert urb.done and urb.status == 0
    assert [iso[i][2] for i in range(4)] == [1024, 500, 300, 0]
    assert [iso[i][3] for i in range(4)] == [0, 0, 0, EOVERFLOW]
    assert urb.actual_length == 1824 and urb.error_count == 1
    assert dev.sink_errors == 1  # the 0xff packet


def test_vendor_control_write_read():
    dev = make()
    payload = os.urandom(1000)
    assert control(dev, 0x40, 0x5B, 0, 0, 0, payload)[0] == 0
    assert control(dev, 0xC0, 0x5C, 0, 0, 1000) == (0, payload)
    assert control(dev, 0xC0, 0x5C, 0, 0, 10) == (0, payload[:10])
    assert control(dev, 0xC0, 0x5C, 0, 0, 5000)[0] == -32  # > 4096
    assert control(dev, 0xC0, 0x5B, 0, 0, 4)[0] == -32  # wrong direction
    assert control(dev, 0x40, 0x5B, 1, 0, 0, b"x")[0] == -32  # wValue must be 0


def test_reset_clears_fifo():
    dev = make()
    bulk_out(dev, 2, b"stale")
    dev.reset()
    assert dev.fifo_bytes == 0
    assert not bulk_in(dev, 2, 64).done


@pytest.mark.parametrize("pattern", [0, 1])
def test_source_with_server_pool_buffers(pattern):
    from usbip.pool import BufferPool
    from usbip.usb.device import Urb

    dev = make(pattern=pattern)
    pool = BufferPool()
    for n in (512, 20000):
        # the server hands each IN URB a buffer fresh from the pool, zeroed: the zero source
        # leaves it as it is; any other buffer (here one left dirty) is written
        pooled = pool.acquire(n)
        for buf in (pooled, bytearray(b"\xa5" * n)):
            if pattern == 1:
                memoryview(buf)[:n] = b"\xa5" * n
            urb = Urb(1, 1, 1, n, buf)
            dev.submit(urb)
            assert urb.status == 0 and urb.actual_length == n
            assert bytes(memoryview(buf)[:n]) == (bytes(n) if pattern == 0 else pattern_bytes(512, n))
        pool.release(pooled)
