"""End to end, in one process: the server exporting every virtual device, driven by our async client."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from usbip.client import Cancelled, Disconnected, ImportRefused, RemoteDevice, connect
from usbip.client import blocking as blocking_client
from usbip.protocol.constants import ST_DEV_BUSY, USBIP_RET_SUBMIT, USBIP_RET_UNLINK, Speed
from usbip.server import Server
from usbip.usb.ch9 import DT_CONFIG, DT_INTERFACE
from usbip.usb.descriptors import parse_device_descriptor, walk
from usbip.usb.device import Urb
from usbip.virtual import AudioDevice, KeyboardDevice, LoopbackDevice, SerialDevice, StorageDevice, VirtualDevice

from .conftest import (
    CSW_FAILED,
    CSW_GOOD,
    INQUIRY,
    READ_CAPACITY10,
    TEST_UNIT_READY,
    Bot,
    bounded,
    exported,
    idle,
    read10,
    write10,
)
from .helpers import run, wait_until

ECONNRESET = -errno.ECONNRESET
ENOENT = -errno.ENOENT
EOVERFLOW = -errno.EOVERFLOW
BUSID = "100-1"


def pattern1(max_packet: int, n: int) -> bytes:
    """Gadget zero's pattern 1, computed here independently: byte i is (i % max_packet) % 63."""
    return bytes((i % max_packet) % 63 for i in range(n))


async def imported(srv: Server, busid: str = BUSID) -> tuple[Any, RemoteDevice]:
    conn = connect("127.0.0.1", srv.port, timeout=5)
    dev = await conn.import_device(busid)
    return conn, dev


def session_of(srv: Server) -> Any:
    (session,) = srv.sessions
    return session


# ---------------------------------------------------------------- descriptors, every device

DEVICES: dict[str, Callable[[Path], VirtualDevice]] = {
    "loopback": lambda tmp: LoopbackDevice(),
    "loopback-ss": lambda tmp: LoopbackDevice(speed=Speed.SUPER),
    "loopback-fs": lambda tmp: LoopbackDevice(speed=Speed.FULL),
    "storage": lambda tmp: StorageDevice(tmp / "disk.img", size=1 << 20),
    "keyboard": lambda tmp: KeyboardDevice("hi"),
    "serial": lambda tmp: SerialDevice(),
    "audio": lambda tmp: AudioDevice(),
}


@pytest.mark.parametrize("kind", list(DEVICES))
def test_descriptors(kind: str, tmp_path: Path) -> None:
    async def body() -> None:
        vdev = DEVICES[kind](tmp_path)
        declared = parse_device_descriptor(vdev.device_descriptor)
        async with exported(vdev) as srv, connect("127.0.0.1", srv.port, timeout=5) as conn:
            (rec,) = await conn.list_devices()
            assert (rec.busid, rec.idVendor, rec.idProduct) == (BUSID, vdev.vendor_id, vdev.product_id)
            assert rec.speed == int(vdev.speed)
            assert rec.bConfigurationValue == 1 and rec.bNumConfigurations == 1
            dev = await conn.import_device(BUSID)
            # device descriptor: what the device declares, field by field
            assert dev.device_descriptor == declared
            assert declared["idVendor"] == vdev.vendor_id and declared["idProduct"] == vdev.product_id
            assert declared["bcdUSB"] == (0x0320 if vdev.speed >= Speed.SUPER else 0x0200)
            # configuration descriptor: the whole blob, and it parses
            cfg = dev.configuration_descriptor
            assert cfg == vdev.configuration_descriptor(0)
            assert cfg is not None
            assert cfg[1] == DT_CONFIG and struct.unpack_from("<H", cfg, 2)[0] == len(cfg)
            parsed = list(walk(cfg))
            assert sum(len(d) for _t, d in parsed) == len(cfg)
            ifaces = [d for t, d in parsed if t == DT_INTERFACE]
            declared_ifaces = [i for c in vdev.configurations for i in c.interfaces]
            assert [(d[2], d[3], d[5], d[6], d[7]) for d in ifaces] == [
                (i.number, i.alternate, i.cls, i.subclass, i.protocol) for i in declared_ifaces
            ]
            assert [(i.bInterfaceClass, i.bInterfaceSubClass, i.bInterfaceProtocol) for i in rec.interfaces] == [
                (i.cls, i.subclass, i.protocol) for i in declared_ifaces if i.alternate == 0
            ]
            declared_eps = sorted(e.address for i in declared_ifaces for e in i.endpoints)
            assert sorted(e["bEndpointAddress"] for e in dev.endpoints()) == declared_eps
            # strings: the language table, then every string the descriptors point at
            assert await dev.get_descriptor(3, 0, 255) == bytes((4, 3, 0x09, 0x04))
            for field, text in (
                ("iManufacturer", vdev.manufacturer),
                ("iProduct", vdev.product),
                ("iSerialNumber", vdev.serial),
            ):
                if text:
                    assert declared[field] != 0
                    assert await dev.get_string(declared[field]) == text
                else:
                    assert declared[field] == 0
            for d, i in zip(ifaces, declared_ifaces, strict=True):
                if i.name:
                    assert await dev.get_string(d[8]) == i.name
            if cfg[6]:
                assert await dev.get_string(cfg[6]) == vdev.configurations[0].name
            # a short read of the config descriptor is truncated, not an error
            assert await dev.get_descriptor(DT_CONFIG, 0, 9) == cfg[:9]
            # GET_CONFIGURATION: virtual devices come configured, as usbip-host exports them
            assert await dev.control_transfer(0x80, 8, 0, 0, 1) == b"\x01"
            await dev.close()

    run(body)


# ---------------------------------------------------------------- loopback (gadget zero)

SIZES = [0, 1, 2, 62, 63, 64, 511, 512, 513, 1023, 1024, 1025, 4096, 65535, 65536, 100_001]


def random_sizes(rng: random.Random, count: int, top: int = 70_000) -> list[int]:
    return SIZES + [rng.choice((rng.randrange(0, 600), rng.randrange(0, top))) for _ in range(count)]


def test_loopback_bulk_source_and_sink_pattern1() -> None:
    async def body() -> None:
        rng = random.Random(1)
        lb = LoopbackDevice(pattern=1)
        async with exported(lb) as srv:
            conn, dev = await imported(srv)
            mp = lb.bulk_max_packet
            for n in random_sizes(rng, 30):
                data = await dev.bulk_transfer(0x81, n)
                assert data == pattern1(mp, n), n
            for n in random_sizes(rng, 30):
                assert await dev.bulk_transfer(0x01, pattern1(mp, n)) == n
            assert lb.sink_errors == 0
            # the sink checks: a wrong byte is counted (and still accepted, as f_sourcesink does)
            bad = bytearray(pattern1(mp, 700))
            bad[600] ^= 0xFF
            assert await dev.bulk_transfer(0x01, bytes(bad)) == 700
            assert lb.sink_errors == 1
            await conn.close()

    run(body)


def test_loopback_pair_integrity() -> None:
    async def body() -> None:
        rng = random.Random(2)
        lb = LoopbackDevice()
        async with exported(lb) as srv:
            conn, dev = await imported(srv)
            # one at a time: OUT, then IN with a bigger buffer (a short packet back), sizes include 0
            for n in random_sizes(rng, 40, top=20_000):
                payload = rng.randbytes(n)
                assert await dev.bulk_transfer(0x02, payload) == n
                assert lb.fifo_bytes == n
                assert await dev.bulk_transfer(0x82, n + rng.randrange(0, 3000)) == payload
            # an IN smaller than the data takes it in pieces, in order
            payload = rng.randbytes(5000)
            assert await dev.bulk_transfer(0x02, payload) == 5000
            got = b"".join([await dev.bulk_transfer(0x82, 512) for _ in range(10)])
            assert got == payload and lb.fifo_bytes == 0
            # several in flight: OUTs queued, then INs queued, all at once
            payloads = [rng.randbytes(rng.randrange(0, 4096)) for _ in range(24)]
            outs = [dev.submit(0x02, p) for p in payloads]
            ins = [dev.submit(0x82, 4096) for _ in payloads]
            results = await bounded(asyncio.gather(*(u.wait() for u in outs + ins)))
            assert [r.status for r in results] == [0] * 48
            assert [r.actual_length for r in results[:24]] == [len(p) for p in payloads]
            assert [bytes(r.data or b"") for r in results[24:]] == payloads
            # INs first (they wait on the empty FIFO), then the OUTs complete them in order
            ins = [dev.submit(0x82, 4096) for _ in range(8)]
            await asyncio.sleep(0.05)
            assert not any(u.future.done() for u in ins)
            payloads = [rng.randbytes(rng.randrange(1, 4096)) for _ in range(8)]
            outs = [dev.submit(0x02, p) for p in payloads]
            results = await bounded(asyncio.gather(*(u.wait() for u in ins + outs)))
            assert [bytes(r.data or b"") for r in results[:8]] == payloads
            assert lb.fifo_bytes == 0
            await conn.close()

    run(body)


def test_loopback_interrupt_in_out() -> None:
    async def body() -> None:
        rng = random.Random(3)
        lb = LoopbackDevice(pattern=1)
        async with exported(lb) as srv:
            conn, dev = await imported(srv)
            mp = {e["bEndpointAddress"]: e["wMaxPacketSize"] for e in dev.endpoints()}
            assert mp[0x84] == mp[0x04] == 1024
            for n in [0, 1, 8, 63, 64, 1023, 1024, 1025, 3072] + [rng.randrange(0, 5000) for _ in range(10)]:
                assert await dev.interrupt_transfer(0x84, n) == pattern1(1024, n)
                assert await dev.interrupt_transfer(0x04, pattern1(1024, n)) == n
            assert lb.sink_errors == 0
            await conn.close()

    run(body)


def test_loopback_iso_in_out_after_set_interface() -> None:
    async def body() -> None:
        lb = LoopbackDevice(pattern=1)
        async with exported(lb) as srv:
            conn, dev = await imported(srv)
            # alt 0 has no iso endpoints: the URB fails -ENOENT, as usb_submit_urb() answers
            res = await dev.iso_transfer(0x83, [1024, 1024])
            assert res.status == ENOENT
            await dev.set_interface(0, 1)
            assert await dev.control_transfer(0x81, 0x0A, 0, 0, 1) == b"\x01"  # GET_INTERFACE
            sizes = [1024, 1024, 512, 0, 3, 1024, 2000, 1]
            res = await dev.iso_transfer(0x83, sizes)
            assert res.status == 0 and res.error_count == 0
            expect = [min(s, 1024) for s in sizes]
            assert res.actual_length == sum(expect)
            packets = res.packets()
            assert [(st, act) for st, act, _d in packets] == [(0, n) for n in expect]
            assert [d for _st, _act, d in packets] == [pattern1(1024, n) for n in expect]
            offsets = [o for o, _ln, _a, _s in res.iso.tolist()]  # type: ignore[union-attr]
            assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]
            # iso OUT: every packet accepted, except the one larger than wMaxPacketSize
            out = [pattern1(1024, n) for n in (1024, 10, 0, 1023, 1500, 7)]
            res = await dev.iso_transfer(0x03, out)
            per = [(s, a) for _o, _ln, a, s in res.iso.tolist()]  # type: ignore[union-attr]
            assert per == [(0, 1024), (0, 10), (0, 0), (0, 1023), (EOVERFLOW, 0), (0, 7)]
            assert res.error_count == 1 and res.actual_length == 1024 + 10 + 1023 + 7
            assert lb.sink_errors == 0
            # many iso URBs in flight
            urbs = [dev.submit(0x83, 3 * 1024, iso_packets=[1024] * 3, interval=1) for _ in range(16)]
            for r in await bounded(asyncio.gather(*(u.wait() for u in urbs))):
                assert r.status == 0 and r.actual_length == 3072
                assert bytes(r.data) == pattern1(1024, 1024) * 3
            # back to alt 0: the iso endpoints are gone again
            await dev.set_interface(0, 0)
            assert (await dev.iso_transfer(0x03, [b"x"])).status == ENOENT
            await conn.close()

    run(body)


def test_many_urbs_in_flight() -> None:
    async def body() -> None:
        rng = random.Random(4)
        lb = LoopbackDevice(pattern=1)
        async with exported(lb) as srv:
            conn, dev = await imported(srv)
            sizes = [rng.randrange(0, 40_000) for _ in range(64)]
            urbs = [dev.submit(0x81, n) for n in sizes]
            assert dev.in_flight == 64
            results = await bounded(asyncio.gather(*(u.wait() for u in urbs)))
            for n, r in zip(sizes, results, strict=True):
                assert r.status == 0 and r.actual_length == n and bytes(r.data or b"") == pattern1(512, n)
            # 64 loopback pairs, interleaved OUT/IN on the wire
            payloads = [rng.randbytes(rng.randrange(0, 3000)) for _ in range(64)]
            urbs = []
            for p in payloads:
                urbs.append(dev.submit(0x02, p))
                urbs.append(dev.submit(0x82, 3000))
            assert dev.in_flight == 128
            results = await bounded(asyncio.gather(*(u.wait() for u in urbs)))
            assert [bytes(r.data or b"") for r in results[1::2]] == payloads
            assert dev.in_flight == 0 and srv.stats()["pending_urbs"] == 0
            session = session_of(srv)
            assert session.submitted == session.completed
            await conn.close()

    run(body)


def test_vendor_control_write_read() -> None:
    async def body() -> None:
        async with exported(LoopbackDevice()) as srv:
            conn, dev = await imported(srv)
            for n in (0, 1, 64, 100, 4096):
                data = os.urandom(n)
                await dev.control_transfer(0x40, 0x5B, 0, 0, data)
                assert await dev.control_transfer(0xC0, 0x5C, 0, 0, n) == data
            await conn.close()

    run(body)


# ---------------------------------------------------------------- storage over SCSI / Bulk-Only


def test_storage_scsi(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    blocks = 2048

    async def body() -> None:
        rng = random.Random(5)
        st = StorageDevice(image, size=blocks * 512)
        fd = os.open(image, os.O_RDWR)
        try:
            async with exported(st) as srv:
                conn, dev = await imported(srv)
                bot = Bot(dev)
                assert await bot.command(TEST_UNIT_READY) == (CSW_GOOD, 0, b"")
                status, residue, data = await bot.command(INQUIRY, 36)
                assert (status, residue, len(data)) == (CSW_GOOD, 0, 36)
                assert data[0] == 0x00 and data[1] == 0x80  # direct access, removable
                assert data[8:16] == b"cyusbip " and data[16:32] == b"Virtual Disk    " and data[32:36] == b"1.00"
                status, residue, data = await bot.command(READ_CAPACITY10, 8)
                assert status == CSW_GOOD and struct.unpack(">II", data) == (blocks - 1, 512)
                # random writes, checked in the image file, then read back over USB
                for _ in range(12):
                    count = rng.choice((1, 2, 7, 32, 33, 80))
                    lba = rng.randrange(0, blocks - count + 1)
                    payload = rng.randbytes(count * 512)
                    assert await bot.command(write10(lba, count), data_out=payload) == (CSW_GOOD, 0, b"")
                    assert os.pread(fd, len(payload), lba * 512) == payload
                    assert await bot.command(read10(lba, count), count * 512) == (CSW_GOOD, 0, payload)
                # the last block, and data put into the file behind the device's back
                tail = rng.randbytes(512)
                os.pwrite(fd, tail, (blocks - 1) * 512)
                assert await bot.command(read10(blocks - 1, 1), 512) == (CSW_GOOD, 0, tail)
                assert await bot.command(read10(0, 0)) == (CSW_GOOD, 0, b"")
                # out of range: CHECK CONDITION, the data stage stalls, the sense says LBA OUT OF RANGE
                for lba, count in ((blocks - 1, 2), (blocks, 1), (0xFFFFFFF0, 1)):
                    status, residue, data = await bot.command(read10(lba, count), count * 512)
                    assert (status, residue, data) == (CSW_FAILED, count * 512, b"")
                    assert bot.stalls[-1] == 0x81
                    assert await bot.sense() == (0x05, 0x21, 0x00)
                # the sense is consumed, and the device keeps working
                assert await bot.sense() == (0, 0, 0)
                status, _r, _d = await bot.command(read10(0, 1), 512)
                assert status == CSW_GOOD
                await conn.close()
            assert os.path.getsize(image) == blocks * 512
        finally:
            os.close(fd)

    run(body)


def test_storage_readonly_refuses_writes(tmp_path: Path) -> None:
    image = tmp_path / "ro.img"
    content = os.urandom(256 * 512)
    image.write_bytes(content)

    async def body() -> None:
        st = StorageDevice(image, readonly=True)
        async with exported(st) as srv:
            conn, dev = await imported(srv)
            bot = Bot(dev)
            assert await bot.command(read10(3, 2), 1024) == (CSW_GOOD, 0, content[3 * 512 : 5 * 512])
            status, residue, _ = await bot.command(write10(3, 2), data_out=os.urandom(1024))
            assert (status, residue) == (CSW_FAILED, 1024)
            assert bot.stalls == [0x02]
            assert await bot.sense() == (0x07, 0x27, 0x00)  # DATA PROTECT, WRITE PROTECTED
            # MODE SENSE(6) reports write protection (WP bit of the header)
            status, _r, data = await bot.command(bytes((0x1A, 0, 0x3F, 0, 64, 0)), 64)
            assert status == CSW_GOOD and data[2] & 0x80
            assert await bot.command(read10(3, 2), 1024) == (CSW_GOOD, 0, content[3 * 512 : 5 * 512])
            await conn.close()
        assert image.read_bytes() == content

    run(body)


# ---------------------------------------------------------------- keyboard

USAGE = {**{0x04 + i: chr(ord("a") + i) for i in range(26)}, 0x2C: " ", 0x28: "\n", 0x36: ","}
USAGE.update({0x1E + i: c for i, c in enumerate("1234567890")})
SHIFTED = {0x1E: "!", 0x36: "<"}


def decode(report: bytes) -> str:
    mod, usage = report[0], report[2]
    shift = bool(mod & 0x22)
    if shift and usage in SHIFTED:
        return SHIFTED[usage]
    ch = USAGE[usage]
    return ch.upper() if shift else ch


def test_interrupt_urbs_carry_the_endpoint_interval() -> None:
    """The client fills urb->interval from the endpoint descriptor, as a host does: the kernel's
    usbip-host refuses an interrupt URB with interval 0 (usb_submit_urb: -EINVAL)."""
    intervals: list[int] = []

    class Recording(KeyboardDevice):
        def submit(self, urb: Urb) -> None:
            if urb.ep == 1:
                intervals.append(urb.interval)
            super().submit(urb)

    async def body() -> None:
        async with exported(Recording("a", delay=0)) as srv:
            _conn, dev = await imported(srv)  # reads the descriptors
            await dev.set_configuration(1)
            assert len(await dev.interrupt_transfer(0x81, 8)) == 8
            await dev.interrupt_transfer(0x81, 8, interval=3)
            await dev.close()

    run(body)
    assert intervals == [10, 3]  # bInterval 10 at full speed: 10 frames


def test_keyboard_types_text() -> None:
    text = "Hello, World! 42\n"

    async def body() -> None:
        kb = KeyboardDevice(text, delay=0)
        async with exported(kb) as srv:
            conn, dev = await imported(srv)
            await dev.set_configuration(1)  # the keyboard types once the host configured it
            typed = []
            for _ in text:
                down = await dev.interrupt_transfer(0x81, 8)
                up = await dev.interrupt_transfer(0x81, 8)
                assert len(down) == 8 and down[1] == 0 and down[3:] == bytes(5) and down[2] != 0
                assert up == bytes(8)
                typed.append(decode(down))
            assert "".join(typed) == text
            # nothing left: the next report waits; the timeout unlinks it
            with pytest.raises(Cancelled):
                await dev.interrupt_transfer(0x81, 8, timeout=0.2)
            assert await wait_until(lambda: srv.stats()["pending_urbs"] == 0)
            # a report requested first, typed afterwards
            urb = dev.submit(0x81, 8)
            await asyncio.sleep(0.02)
            kb.type_text("Z")
            res = await urb.wait(5)
            assert decode(bytes(res.data)) == "Z"  # type: ignore[arg-type]
            assert await dev.interrupt_transfer(0x81, 8) == bytes(8)
            # HID class requests: the report descriptor and SET_REPORT (LEDs)
            hid_report = await dev.control_transfer(0x81, 6, 0x2200, 0, 63)
            assert len(hid_report) == 63 and hid_report[:4] == bytes.fromhex("05010906")
            await dev.control_transfer(0x21, 0x09, 0x0200, 0, b"\x02")
            assert kb.leds == 2
            await conn.close()

    run(body)


# ---------------------------------------------------------------- serial (CDC-ACM bridged to a PTY)


async def read_fd(fd: int, n: int, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    got = bytearray()
    while len(got) < n:
        try:
            chunk = os.read(fd, n - len(got))
        except BlockingIOError:
            chunk = b""
        got += chunk
        if not chunk:
            if loop.time() > end:
                raise AssertionError(f"only {len(got)} of {n} bytes arrived on the PTY")
            await asyncio.sleep(0.005)
    return bytes(got)


async def read_bulk(dev: RemoteDevice, ep: int, n: int, timeout: float = 5.0) -> bytes:
    got = bytearray()
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while len(got) < n:
        part = await dev.bulk_transfer(ep, 512, timeout=max(0.05, end - loop.time()))
        assert isinstance(part, bytes)
        got += part
    return bytes(got)


def test_serial_pty_bridge() -> None:
    async def body() -> None:
        rng = random.Random(6)
        ser = SerialDevice()
        fd = os.open(ser.pty_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            async with exported(ser) as srv:
                conn, dev = await imported(srv)
                # PTY -> bulk IN (raw mode: every byte value passes)
                data = b"hello from the pty\n" + bytes(range(256)) + rng.randbytes(1500)
                assert os.write(fd, data) == len(data)
                assert await read_bulk(dev, 0x81, len(data)) == data
                # an IN that waits for data written later
                urb = dev.submit(0x81, 512)
                await asyncio.sleep(0.05)
                assert not urb.future.done()
                os.write(fd, b"late")
                res = await urb.wait(5)
                assert res.status == 0 and bytes(res.data) == b"late"  # type: ignore[arg-type]
                # bulk OUT -> PTY
                for n in (1, 100, 512, 2000):
                    payload = rng.randbytes(n)
                    assert await dev.bulk_transfer(0x01, payload) == n
                    assert await read_fd(fd, n) == payload
                # ACM class requests
                line = struct.pack("<IBBB", 9600, 0, 0, 8)
                await dev.control_transfer(0x21, 0x20, 0, 0, line)
                assert await dev.control_transfer(0xA1, 0x21, 0, 0, 7) == line
                assert ser.baudrate == 9600
                await dev.control_transfer(0x21, 0x22, 1, 0)
                assert ser.dtr
                # an IN left waiting when the client leaves is cancelled by the server
                dev.submit(0x81, 512)
                await asyncio.sleep(0.02)
                await conn.close()
        finally:
            os.close(fd)

    run(body)


# ---------------------------------------------------------------- unlink


def record_replies(dev: RemoteDevice) -> list[tuple[int, int, int]]:
    """Record (command, seqnum, status) of every reply the client receives."""
    log: list[tuple[int, int, int]] = []
    original = dev._stream.on_messages

    def recorder(msgs: list[Any]) -> None:
        log.extend((m.command, m.seqnum, m.status) for m in msgs)
        original(msgs)

    dev._stream.on_messages = recorder
    return log


def test_unlink_before_completion() -> None:
    async def body() -> None:
        lb = LoopbackDevice()
        async with exported(lb) as srv:
            conn, dev = await imported(srv)
            replies = record_replies(dev)
            # the FIFO is empty: the loopback IN waits; the timeout sends CMD_UNLINK
            with pytest.raises(Cancelled) as info:
                await dev.bulk_transfer(0x82, 512, timeout=0.2)
            assert info.value.status == ECONNRESET
            assert [c for c, _s, _st in replies] == [USBIP_RET_UNLINK]
            assert replies[0][2] == ECONNRESET
            assert lb.pending_count == 0 and srv.stats()["pending_urbs"] == 0
            # cancel() by hand: the URB completes with -ECONNRESET, no RET_SUBMIT
            urb = dev.submit(0x82, 64)
            assert await wait_until(lambda: lb.pending_count == 1)
            urb.cancel()
            res = await urb.wait(5)
            assert res.status == ECONNRESET and res.actual_length == 0
            # a cancelled task unlinks its URB too
            task = asyncio.ensure_future(dev.bulk_transfer(0x82, 64, timeout=None))
            assert await wait_until(lambda: lb.pending_count == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await wait_until(lambda: srv.stats()["pending_urbs"] == 0 and lb.pending_count == 0)
            assert [c for c, _s, _st in replies] == [USBIP_RET_UNLINK] * 3
            assert dev.in_flight == 0
            # nothing was lost: the pair still works
            assert await dev.bulk_transfer(0x02, b"after") == 5
            assert await dev.bulk_transfer(0x82, 64) == b"after"
            await conn.close()

    run(body)


def test_unlink_racing_completion() -> None:
    async def body() -> None:
        rng = random.Random(7)
        lb = LoopbackDevice(pattern=1)
        async with exported(lb) as srv:
            conn, dev = await imported(srv)
            replies = record_replies(dev)
            cases: list[tuple[Any, int, int]] = []  # (urb, unlink seqnum, endpoint)
            sent = bytearray()

            async def one(i: int) -> None:
                kind = i % 3
                if kind == 0:  # completes at once on the server; the unlink follows on the wire
                    urb = dev.submit(0x81, rng.randrange(0, 2000))
                    ep = 0x81
                else:  # waits for an OUT that may come before or after the unlink
                    urb = dev.submit(0x82, 64)
                    ep = 0x82
                    data = rng.randbytes(rng.randrange(1, 65))
                    if kind == 1:
                        dev.submit(0x02, data)
                        sent.extend(data)
                for _ in range(rng.randrange(0, 3)):
                    await asyncio.sleep(0)
                urb.cancel()
                cases.append((urb, dev._seq, ep))
                if kind == 2:
                    dev.submit(0x02, data)
                    sent.extend(data)

            for batch in range(6):
                await bounded(asyncio.gather(*(one(batch * 50 + i) for i in range(50))))
            results = await bounded(asyncio.gather(*(u.wait() for u, _q, _e in cases)), 10)
            taken: list[tuple[int, bytes]] = []  # (IN seqnum, data): the FIFO serves INs in wire order
            completed = cancelled = 0
            submits = {s for c, s, _st in replies if c == USBIP_RET_SUBMIT}
            unlinks = {s: st for c, s, st in replies if c == USBIP_RET_UNLINK}
            for (urb, unlink_seq, ep), res in zip(cases, results, strict=True):
                got_submit = urb.seqnum in submits
                # exactly one answer for every unlink; RET_UNLINK -ECONNRESET only when no RET_SUBMIT
                assert unlink_seq in unlinks
                if unlinks[unlink_seq] == ECONNRESET:
                    assert not got_submit and res.status == ECONNRESET and res.actual_length == 0
                    cancelled += 1
                else:
                    assert unlinks[unlink_seq] == 0 and got_submit and res.status == 0
                    completed += 1
                    if ep == 0x82:
                        taken.append((urb.seqnum, bytes(res.data or b"")))
                    else:
                        assert bytes(res.data or b"") == pattern1(512, res.actual_length)
            assert completed + cancelled == len(cases) == 300
            assert cancelled > 0 and completed > 0
            # what the loopback INs did not take is still in the FIFO, in order
            received = bytearray(b"".join(d for _s, d in sorted(taken)))
            while lb.fifo_bytes:
                received += await dev.bulk_transfer(0x82, 65536)  # type: ignore[operator]
            assert bytes(received) == bytes(sent)
            assert await wait_until(lambda: srv.stats()["pending_urbs"] == 0)
            assert dev.in_flight == 0 and not dev._unlinks
            session = session_of(srv)
            assert session.submitted == session.completed
            # one reply per URB and per unlink, no more
            seqs = [s for _c, s, _st in replies]
            assert len(seqs) == len(set(seqs))
            await conn.close()

    run(body)


def test_unlink_after_completion() -> None:
    async def body() -> None:
        async with exported(LoopbackDevice()) as srv:
            conn, dev = await imported(srv)
            replies = record_replies(dev)
            urb = dev.submit(0x81, 100)
            res = await urb.wait(5)
            assert res.status == 0 and res.actual_length == 100
            urb.cancel()  # already done: nothing is sent
            dev._send_unlink(urb)  # a late unlink on the wire: RET_UNLINK status 0
            unlink_seq = dev._seq
            assert await wait_until(lambda: len(replies) == 2)
            assert replies == [(USBIP_RET_SUBMIT, urb.seqnum, 0), (USBIP_RET_UNLINK, unlink_seq, 0)]
            assert not dev._unlinks
            assert await dev.bulk_transfer(0x81, 10) == bytes(10)
            await conn.close()

    run(body)


# ---------------------------------------------------------------- connections


def test_disconnect_mid_urb_frees_device() -> None:
    async def body() -> None:
        lb = LoopbackDevice()
        async with exported(lb) as srv:
            conn, dev = await imported(srv)
            urbs = [dev.submit(0x82, 512) for _ in range(3)]
            assert await wait_until(lambda: lb.pending_count == 3)
            assert srv.registry.is_busy(BUSID)
            await conn.close()
            for u in urbs:
                with pytest.raises(Disconnected):
                    await u.wait(5)
            assert await wait_until(lambda: idle(srv))
            assert lb.pending_count == 0 and not srv.registry.is_busy(BUSID)
            with pytest.raises(Disconnected):
                dev.submit(0x81, 8)
            # import again: the device works
            conn, dev = await imported(srv)
            assert await dev.bulk_transfer(0x02, b"again") == 5
            assert await dev.bulk_transfer(0x82, 512) == b"again"
            await conn.close()

    run(body)


def test_second_client_is_refused_until_first_leaves() -> None:
    async def body() -> None:
        async with exported(LoopbackDevice(), KeyboardDevice()) as srv:
            first, _dev = await imported(srv)
            second = connect("127.0.0.1", srv.port, timeout=5)
            with pytest.raises(ImportRefused) as info:
                await second.import_device(BUSID)
            assert info.value.status == ST_DEV_BUSY and info.value.busid == BUSID
            # another device of the same server is free
            kbd = await second.import_device("100-2")
            assert srv.stats()["busy_devices"] == 2
            await kbd.close()
            await first.close()
            assert await wait_until(lambda: not srv.registry.is_busy(BUSID))
            dev2 = await second.import_device(BUSID)
            assert await dev2.bulk_transfer(0x81, 16) == bytes(16)
            await second.close()

    run(body)


def test_blocking_wrapper_round_trip() -> None:
    def blocking_body(port: int) -> None:
        with blocking_client.connect("127.0.0.1", port, timeout=5) as conn:
            (rec,) = conn.list_devices()
            assert rec.busid == BUSID and (rec.idVendor, rec.idProduct) == (0x0525, 0xA4A0)
            dev = conn.import_device(BUSID)
            assert dev.device_descriptor is not None and dev.device_descriptor["idProduct"] == 0xA4A0
            payload = os.urandom(3000)
            assert dev.bulk_transfer(0x02, payload) == 3000
            assert dev.bulk_transfer(0x82, 4096) == payload
            assert dev.control_transfer(0x80, 6, 0x0100, 0, 18)[:4] == bytes((18, 1, 0, 2))
            assert dev.bulk_transfer(0x81, 1000) == pattern1(512, 1000)

    async def body() -> None:
        async with exported(LoopbackDevice(pattern=1)) as srv:
            await asyncio.to_thread(blocking_body, srv.port)

    run(body)
