"""UrbSession against a hostile client, sans I/O: no data crosses URBs, memory stays within the budget."""

from __future__ import annotations

import importlib
import struct
from typing import Any

import pytest

from usbip.protocol import HEADER_SIZE, Decoder, pack_cmd_submit, pack_cmd_unlink
from usbip.protocol.constants import (
    EBADR,
    ECONNRESET,
    EINVAL,
    USBIP_RET_SUBMIT,
    USBIP_RET_UNLINK,
    Speed,
)
from usbip.server.limits import MiB, ServerLimits
from usbip.server.session import UrbSession
from usbip.usb.device import Device, Urb
from usbip.virtual import LoopbackDevice
from usbip.virtual.testing import set_configuration

DEVID = (100 << 16) | 1
SECRET = 0xA7


def _pools() -> list[Any]:
    out = [importlib.import_module("usbip.pool.buffers").BufferPool]
    try:
        out.append(importlib.import_module("usbip.pool._buffers").BufferPool)
    except ImportError:  # pragma: no cover - pure-Python build
        pass
    return out


POOLS = pytest.mark.parametrize("pool_cls", _pools(), ids=lambda c: c.__module__)


class Harness:
    """A session whose replies are decoded as a client would decode them."""

    def __init__(self, device: Device, pool: Any, **kw: Any) -> None:
        self.client = Decoder("client")
        self.replies: list[Any] = []
        self.queued = 0
        self.paused: list[bool] = []
        self.session = UrbSession(
            device,
            self._send,
            pool,
            devid=DEVID,
            queued=lambda: self.queued,
            pause_input=self.paused.append,
            **kw,
        )
        self.server = Decoder("server")
        self.seq = 0

    def _send(self, buffers: list[Any], nbytes: int) -> None:
        data = b"".join(bytes(b) for b in buffers)
        assert len(data) == nbytes
        self.replies.extend(self.client.feed(data))

    def submit(self, ep: int, is_in: bool, length: int, data: bytes = b"", setup: bytes = bytes(8)) -> int:
        self.seq += 1
        hdr = bytearray(HEADER_SIZE)
        pack_cmd_submit(hdr, 0, self.seq, DEVID, int(is_in), ep, 0, length, 0, 0, 0, setup)
        self.client.expect(self.seq, length if is_in else -1)
        self.session.handle(self.server.feed(bytes(hdr) + (b"" if is_in else data)))
        return self.seq

    def unlink(self, target: int) -> int:
        self.seq += 1
        hdr = bytearray(HEADER_SIZE)
        pack_cmd_unlink(hdr, 0, self.seq, DEVID, 0, 0, target)
        self.session.handle(self.server.feed(bytes(hdr)))
        return self.seq

    def reply(self, seqnum: int) -> Any:
        found = [r for r in self.replies if r.seqnum == seqnum]
        assert len(found) == 1, f"{len(found)} replies for seqnum {seqnum}"
        return found[0]


def dirty(pool: Any, size: int) -> None:
    """Leave a secret in the pool, as an earlier URB of another client would."""
    buf = pool.acquire(size)
    memoryview(buf)[:] = bytes([SECRET]) * size
    pool.release(buf)


def setup(request_type: int, request: int, value: int = 0, index: int = 0, length: int = 0) -> bytes:
    return struct.pack("<BBHHH", request_type, request, value, index, length)


def loopback() -> LoopbackDevice:
    dev = LoopbackDevice()
    dev.busid = "100-1"
    assert set_configuration(dev, 1) == 0
    return dev


# ---------------------------------------------------------------- control transfers


@POOLS
@pytest.mark.parametrize(
    "name,setup_packet",
    [
        ("vendor write 0x5b", setup(0x40, 0x5B, 0, 0, 4096)),
        ("SET_FEATURE with a data stage", setup(0x00, 3, 0, 0, 4096)),
    ],
)
def test_out_request_in_an_in_urb_returns_no_data(pool_cls: Any, name: str, setup_packet: bytes) -> None:
    pool = pool_cls()
    dirty(pool, 4096)
    h = Harness(loopback(), pool)
    seq = h.submit(0, True, 4096, setup=setup_packet)
    rep = h.reply(seq)
    assert rep.command == USBIP_RET_SUBMIT
    assert rep.status == EINVAL and rep.actual_length == 0 and not bytes(rep.data)


@POOLS
def test_in_request_in_an_out_urb_is_refused(pool_cls: Any) -> None:
    h = Harness(loopback(), pool_cls())
    seq = h.submit(0, False, 18, data=bytes(18), setup=setup(0x80, 6, 0x0100, 0, 18))
    assert h.reply(seq).status == EINVAL


@POOLS
@pytest.mark.parametrize("wlength,tbl", [(18, 4096), (4096, 18), (0, 64)])
def test_wlength_must_equal_transfer_length(pool_cls: Any, wlength: int, tbl: int) -> None:
    pool = pool_cls()
    dirty(pool, 4096)
    h = Harness(loopback(), pool)
    seq = h.submit(0, True, tbl, setup=setup(0x80, 6, 0x0100, 0, wlength))
    rep = h.reply(seq)
    assert rep.status == EBADR and rep.actual_length == 0


@POOLS
def test_consistent_control_requests_still_work(pool_cls: Any) -> None:
    h = Harness(loopback(), pool_cls())
    seq = h.submit(0, True, 18, setup=setup(0x80, 6, 0x0100, 0, 18))
    rep = h.reply(seq)
    assert rep.status == 0 and bytes(rep.data) == loopback().device_descriptor
    data = bytes(range(256)) * 2
    w = h.submit(0, False, 512, data=data, setup=setup(0x40, 0x5B, 0, 0, 512))
    r = h.submit(0, True, 512, setup=setup(0xC0, 0x5C, 0, 0, 512))
    assert h.reply(w).status == 0 and bytes(h.reply(r).data) == data
    # no data stage: either direction is accepted (drivers send IN requests with wLength 0)
    z = h.submit(0, True, 0, setup=setup(0x00, 9, 1))
    assert h.reply(z).status == 0


class Overreporter(Device):
    """Completes every IN URB with actual_length = its length without writing a byte."""

    busid = "100-9"
    busnum = 100
    devnum = 9
    speed = Speed.HIGH

    @property
    def device_descriptor(self) -> bytes:
        return struct.pack("<BBHBBBBHHHBBBB", 18, 1, 0x200, 0xFF, 0, 0, 64, 0x1D6B, 0x0104, 0x100, 0, 0, 0, 1)

    def configuration_descriptor(self, index: int = 0) -> bytes:
        iface = bytes([9, 4, 0, 0, 1, 0xFF, 0, 0, 0]) + bytes([7, 5, 0x81, 2, 0, 2, 0])
        return struct.pack("<BBHBBBBB", 9, 2, 9 + len(iface), 1, 1, 0, 0x80, 50) + iface

    def submit(self, urb: Urb) -> None:
        urb.complete(0, urb.transfer_buffer_length)

    def cancel(self, urb: Urb) -> None:
        urb.complete(ECONNRESET, 0)


@POOLS
@pytest.mark.parametrize("size", [1, 512, 4096, 100_000])
def test_pool_buffers_never_carry_earlier_bytes(pool_cls: Any, size: int) -> None:
    pool = pool_cls()
    dirty(pool, size)
    h = Harness(Overreporter(), pool)
    seq = h.submit(1, True, size)
    rep = h.reply(seq)
    assert rep.status == 0 and rep.actual_length == size
    assert bytes(rep.data) == bytes(size)


@POOLS
def test_pool_keeps_a_bounded_cache(pool_cls: Any) -> None:
    pool = pool_cls(max_cached_bytes=1 * MiB)
    bufs = [pool.acquire(256 * 1024) for _ in range(16)]
    for b in bufs:
        pool.release(b)
    assert pool.cached_bytes <= 1 * MiB and pool.cached == 4


# ---------------------------------------------------------------- the memory budget


class Parking(Device):
    """Parks every URB until the test completes it."""

    busid = "100-8"
    busnum = 100
    devnum = 8
    speed = Speed.HIGH

    def __init__(self) -> None:
        self.parked: dict[int, Urb] = {}

    @property
    def device_descriptor(self) -> bytes:
        return Overreporter().device_descriptor

    def configuration_descriptor(self, index: int = 0) -> bytes:
        eps = bytes([7, 5, 0x81, 2, 0, 2, 0]) + bytes([7, 5, 0x01, 2, 0, 2, 0])
        iface = bytes([9, 4, 0, 0, 2, 0xFF, 0, 0, 0]) + eps
        return struct.pack("<BBHBBBBB", 9, 2, 9 + len(iface), 1, 1, 0, 0x80, 50) + iface

    def submit(self, urb: Urb) -> None:
        self.parked[urb.seqnum] = urb

    def cancel(self, urb: Urb) -> None:
        self.parked.pop(urb.seqnum).complete(ECONNRESET, 0)

    def finish(self, seqnum: int) -> None:
        urb = self.parked.pop(seqnum)
        urb.complete(0, urb.transfer_buffer_length)


LIMITS = ServerLimits(connection_budget=4 * MiB)


@POOLS
def test_in_urbs_beyond_the_budget_wait_and_then_run(pool_cls: Any) -> None:
    dev = Parking()
    pool = pool_cls()
    h = Harness(dev, pool, limits=LIMITS)
    seqs = [h.submit(1, True, 1 * MiB) for _ in range(40)]
    assert len(dev.parked) == 4 and pool.outstanding == 4
    assert h.session.pending_bytes <= LIMITS.connection_budget
    assert len(h.session.backlog) == 36
    # completing frees budget: the next ones in arrival order reach the device
    dev.finish(seqs[0])
    assert sorted(dev.parked) == seqs[1:5]
    # replies queued for a client that does not read count as well
    h.queued = 3 * MiB
    dev.finish(seqs[1])
    assert sorted(dev.parked) == seqs[2:5]
    h.queued = 0
    h.session.drain()
    assert sorted(dev.parked) == seqs[2:6]


@POOLS
def test_a_full_backlog_pauses_reading_and_resumes(pool_cls: Any) -> None:
    dev = Parking()
    h = Harness(dev, pool_cls(), limits=LIMITS)
    seqs = [h.submit(1, False, 256 * 1024, data=bytes(256 * 1024)) for _ in range(16)]
    assert len(dev.parked) == 16 and not h.paused
    more = [h.submit(1, False, 256 * 1024, data=bytes(256 * 1024)) for _ in range(5)]
    assert h.paused == [True] and len(dev.parked) == 16
    for s in seqs[:8]:
        dev.finish(s)
    assert h.paused == [True, False]
    assert all(s in dev.parked for s in more)


@POOLS
def test_an_urb_larger_than_the_budget_runs_once_half_is_free(pool_cls: Any) -> None:
    dev = Parking()
    h = Harness(dev, pool_cls(), limits=LIMITS)
    first = [h.submit(1, True, 1 * MiB) for _ in range(3)]
    big = h.submit(1, True, 6 * MiB)
    small = h.submit(1, True, 512)
    assert sorted(dev.parked) == first
    dev.finish(first[0])  # 2 MiB held: half the budget
    assert sorted(dev.parked) == [*first[1:], big]
    assert small not in dev.parked
    for s in first[1:]:
        dev.finish(s)
    assert small not in dev.parked
    dev.finish(big)
    assert list(dev.parked) == [small]


def test_large_out_bodies_are_admitted_before_they_are_read() -> None:
    dev = Parking()
    readmits: list[int] = []
    h = Harness(dev, _pools()[0](), limits=LIMITS, readmit=lambda: readmits.append(1))
    first = [h.submit(1, True, 1 * MiB) for _ in range(3)]
    assert h.session.admit(512 * 1024)
    assert not h.session.admit(2 * MiB) and h.session.admission_waiting
    dev.finish(first[0])
    assert readmits == [1]
    assert h.session.admit(2 * MiB) and not h.session.admission_waiting


@POOLS
def test_unlink_reaches_a_backlogged_urb(pool_cls: Any) -> None:
    dev = Parking()
    h = Harness(dev, pool_cls(), limits=LIMITS)
    seqs = [h.submit(1, True, 1 * MiB) for _ in range(6)]
    unlink = h.unlink(seqs[5])
    rep = h.reply(unlink)
    assert rep.command == USBIP_RET_UNLINK and rep.status == ECONNRESET
    assert not [r for r in h.replies if r.seqnum == seqs[5]]
    for s in seqs[:5]:
        if s in dev.parked:
            dev.finish(s)
    assert seqs[5] not in dev.parked and not h.session.backlog
    assert h.session.pending_bytes == 0 or seqs[4] in dev.parked


def test_small_out_payloads_do_not_pin_the_receive_chunk() -> None:
    dev = Parking()
    h = Harness(dev, _pools()[0](), limits=LIMITS)
    seq = h.submit(1, False, 100, data=b"x" * 100)
    buf = dev.parked[seq].buffer
    assert not isinstance(buf, memoryview) and bytes(buf) == b"x" * 100


@POOLS
def test_shutdown_forgets_the_backlog(pool_cls: Any) -> None:
    import asyncio

    dev = Parking()
    pool = pool_cls()
    h = Harness(dev, pool, limits=LIMITS)
    for _ in range(10):
        h.submit(1, True, 1 * MiB)
    asyncio.run(h.session.shutdown(1.0))
    assert not h.session.pending and not h.session.backlog and pool.outstanding == 0


class Stuck(Parking):
    """Ignores cancels: its transfers end when the hardware says so (here: never)."""

    def cancel(self, urb: Urb) -> None:
        pass


@POOLS
def test_buffers_of_urbs_given_up_on_are_never_reused(pool_cls: Any) -> None:
    import asyncio

    dev = Stuck()
    pool = pool_cls()
    h = Harness(dev, pool, limits=LIMITS)
    seq = h.submit(1, True, 4096)
    stuck = dev.parked[seq].buffer
    asyncio.run(h.session.shutdown(0.05))
    assert not h.session.pending and pool.outstanding == 0
    # the device may still write into it: no later URB (of any client) gets that memory
    assert all(pool.acquire(4096) is not stuck for _ in range(4))
