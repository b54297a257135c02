"""Floods from hostile clients: the server's memory stays within the per-connection budget,
a client that does not read its replies is dropped, and everyone else keeps being served."""

from __future__ import annotations

import asyncio
import socket
import struct

from usbip.protocol import HEADER_SIZE, pack_cmd_submit
from usbip.protocol.constants import USBIP_RET_SUBMIT
from usbip.server import Server
from usbip.server.limits import MiB, ServerLimits
from usbip.virtual import LoopbackDevice

from .helpers import RawClient, idle, run, wait_until

MAX_TRANSFER = 16 * MiB
LIMITS = ServerLimits(connection_budget=8 * MiB, write_stall_timeout=2.0)
# what one import may hold: half the budget and one URB larger than it, a backlog of a quarter budget
HELD_BOUND = LIMITS.connection_budget // 2 + MAX_TRANSFER + LIMITS.connection_budget // 4


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def devices() -> list[LoopbackDevice]:
    return [LoopbackDevice(), LoopbackDevice()]


async def raw_import(port: int, busid: str) -> tuple[socket.socket, int]:
    """A plain non-blocking socket with the device imported (the flooders never read)."""
    c = RawClient(port)
    assert await c.import_device(busid) == 0
    assert c.writer is not None
    sock = c.writer.get_extra_info("socket").dup()
    c.writer.transport.pause_reading()
    sock.setblocking(False)
    return sock, c.devid


def submits(devid: int, count: int, ep: int, is_in: bool, length: int, first: int = 1) -> bytes:
    out = bytearray(HEADER_SIZE * count)
    for i in range(count):
        pack_cmd_submit(out, i * HEADER_SIZE, first + i, devid, int(is_in), ep, 0, length, 0, 0, 0, bytes(8))
    return bytes(out)


async def push(sock: socket.socket, data: bytes | memoryview, seconds: float) -> int:
    """Send as much of ``data`` as the server accepts within ``seconds`` (it may stop reading)."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    sent = 0
    end = loop.time() + seconds
    while sent < len(view) and loop.time() < end:
        try:
            sent += sock.send(view[sent : sent + 1024 * 1024])
        except BlockingIOError:
            await asyncio.sleep(0.01)
        except OSError:
            break
    return sent


async def still_serves(srv: Server, busid: str) -> None:
    """Another client imports another device and runs control and bulk round trips."""
    c = RawClient(srv.port)
    assert await c.import_device(busid) == 0
    seq, raw = c.submit_bytes(0, True, 18, setup=struct.pack("<BBHHH", 0x80, 6, 0x0100, 0, 18))
    seq2, raw2 = c.submit_bytes(1, True, 4096)
    await c.send(raw + raw2)
    reps = {r.seqnum: r for r in await c.replies(2)}
    assert reps[seq].command == USBIP_RET_SUBMIT and reps[seq].status == 0 and len(bytes(reps[seq].data)) == 18
    assert reps[seq2].status == 0 and bytes(reps[seq2].data) == bytes(4096)
    await c.close()


def test_in_flood_from_a_client_that_never_reads() -> None:
    """4000 bulk IN CMD_SUBMITs of 16 MiB in one ~190 KB burst (64 GB of replies asked for)."""

    async def body() -> None:
        async with Server(devices(), host="127.0.0.1", port=0, limits=LIMITS) as srv:
            before = rss()
            sock, devid = await raw_import(srv.port, "100-1")
            burst = submits(devid, 4000, 1, True, MAX_TRANSFER)
            assert await push(sock, burst, 5.0) == len(burst)
            peak_held = 0
            peak_rss = 0
            for _ in range(20):
                await asyncio.sleep(0.05)
                peak_held = max(peak_held, srv.stats()["held_bytes"])
                peak_rss = max(peak_rss, rss())
            await still_serves(srv, "100-2")
            assert peak_held <= HELD_BOUND, peak_held
            assert peak_rss - before < 160 * MiB, (peak_rss - before) // MiB
            # it never reads: dropped once its replies stayed unread for write_stall_timeout
            assert await wait_until(lambda: srv.stats()["sessions"] == 0, 3 * LIMITS.write_stall_timeout + 5)
            sock.close()
            assert await wait_until(lambda: idle(srv), 5.0), srv.stats()
            await still_serves(srv, "100-1")

    run(body, 60)


def test_out_flood_is_held_back_not_buffered() -> None:
    """100 bulk OUT URBs of 16 MiB to an endpoint that parks them (the loopback FIFO is full)."""

    async def body() -> None:
        async with Server(devices(), host="127.0.0.1", port=0, limits=LIMITS) as srv:
            before = rss()
            sock, devid = await raw_import(srv.port, "100-1")
            payload = memoryview(bytes(MAX_TRANSFER))
            sent = 0
            peak_held = 0
            for i in range(100):
                hdr = submits(devid, 1, 2, False, MAX_TRANSFER, first=i + 1)
                n = await push(sock, hdr, 1.0)
                if n < len(hdr):
                    break
                n = await push(sock, payload, 1.0)
                sent += n
                peak_held = max(peak_held, srv.stats()["held_bytes"])
                if n < len(payload):
                    break  # the server stopped reading: backpressure
            assert sent < 10 * MAX_TRANSFER, "the server kept reading 16 MiB OUT URBs without bound"
            peak_held = max(peak_held, srv.stats()["held_bytes"])
            assert peak_held <= HELD_BOUND, peak_held
            assert rss() - before < 160 * MiB
            # held back, not dropped: a client that sends is not one that stalls
            assert srv.stats()["sessions"] == 2 or srv.stats()["sessions"] == 1
            await still_serves(srv, "100-2")
            sock.close()
            assert await wait_until(lambda: idle(srv), 10.0), srv.stats()

    run(body, 60)
