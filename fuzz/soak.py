"""Soak test: a server with every virtual device type, 8 clients keeping 32 URBs in flight on each.

``python -m fuzz.soak [--minutes M | --seconds S] [--clients N] [--in-flight K]`` (``scripts/soak``).

The server runs in a child process (``--serve``) on 127.0.0.1 with, per client, one device of
each type (a device serves one importer at a time): loopback, loopback:ss, storage (a sparse
16 MiB image), keyboard, serial (its PTY echoed back by the server process) and audio. This
process runs the clients (``usbip.client``, one ``Connection`` each importing its six devices)
on one event loop, so the server's memory is measured alone: ``VmRSS`` of the child, sampled
after a warm-up and at the end of the run.

Every byte is checked:

* loopback (both speeds): random data written to bulk OUT 0x02 must come back, in order,
  from bulk IN 0x82 (16 OUT + 16 IN in flight);
* storage: Bulk-Only WRITE(10)/READ(10) of 32 blocks, each data block its own URB (34 in
  flight with CBW and CSW), blocks stamped with (client, LBA, generation, CRC) and read back;
  reads of other ranges must find the last generation written there (or zeros);
* keyboard: GET_DESCRIPTOR on ep 0 (31 in flight) must return the descriptors read at import;
  the interrupt IN reports must spell the device's text (press, release, press, ...);
* serial: like loopback through bulk 0x01 / 0x81 and the PTY (the server echoes the slave);
* audio: capture (iso IN 0x81) frames must be the frame counter 0, 1, 2, ... without a gap,
  playback (iso OUT 0x01) packets must all be accepted (16 URBs of 8 packets each way).

A URB with no answer within ``URB_TIMEOUT`` or lost with the connection counts as lost, wrong
data or a wrong CSW as mismatched, a non-zero status where none is expected as an error; all
three must be 0. The server's RSS must not grow by more than ``max(20 %, 50 MiB)`` between the
warm-up sample and the end, and after the clients leave it must hold no session, pending URB
or pool buffer and count no protocol error. Loops are bounded by the deadline; only loopback
addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, cast

KINDS = ("loopback", "loopback:ss", "storage", "keyboard", "serial", "audio")
TEXT = "The quick brown fox jumps over the lazy dog 0123456789. "
URB_TIMEOUT = 15.0  # seconds without an answer before a URB counts as lost
RSS_GROWTH_FRACTION = 0.20
RSS_GROWTH_BYTES = 50 * 1024 * 1024
STORAGE_SIZE = 16 * 1024 * 1024
BLOCK = 512


# ====================================================================== server (child process)
async def serve(clients: int, tmpdir: str) -> None:
    from usbip.cli.device_spec import make_device
    from usbip.server import Server

    specs = {
        "loopback": lambda c: "loopback",
        "loopback:ss": lambda c: "loopback:ss",
        "storage": lambda c: f"storage:{tmpdir}/disk{c}.img:{STORAGE_SIZE}",
        "keyboard": lambda c: "keyboard:" + TEXT,
        "serial": lambda c: "serial",
        "audio": lambda c: "audio",
    }
    table = [(c, kind, make_device(specs[kind](c))) for c in range(clients) for kind in KINDS]
    loop = asyncio.get_running_loop()
    server = Server([dev for _c, _k, dev in table], host="127.0.0.1", port=0)
    await server.start()
    echoes = [_PtyEcho(loop, cast(Any, dev).slave) for _c, kind, dev in table if kind == "serial"]
    print(json.dumps({"port": server.port, "devices": [[dev.busid, kind, c] for c, kind, dev in table]}), flush=True)

    stop = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), stop.set)  # the parent closes our stdin to stop us
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    loop.remove_reader(sys.stdin.fileno())
    for _ in range(100):  # the clients have closed: let the server tear the sessions down (bounded)
        if not server.stats()["sessions"]:
            break
        await asyncio.sleep(0.05)
    stats = dict(server.stats())
    stats["loopback_sink_errors"] = sum(getattr(dev, "sink_errors", 0) for _c, k, dev in table if "loopback" in k)
    stats["pty_echoed"] = sum(e.echoed for e in echoes)
    for e in echoes:
        e.close()
    await server.close()
    print(json.dumps({"stats": stats}), flush=True)


class _PtyEcho:
    """Writes back whatever arrives on a PTY slave (the serial device's host side)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop = loop
        self.fd = fd
        self.backlog = bytearray()
        self.echoed = 0
        self.writing = False
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        self.backlog += data
        self._write()

    def _write(self) -> None:
        while self.backlog:
            try:
                n = os.write(self.fd, self.backlog)
            except BlockingIOError:
                break
            self.echoed += n
            del self.backlog[:n]
        if self.backlog and not self.writing:
            self.loop.add_writer(self.fd, self._write)
            self.writing = True
        elif not self.backlog and self.writing:
            self.loop.remove_writer(self.fd)
            self.writing = False

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        if self.writing:
            self.loop.remove_writer(self.fd)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ====================================================================== clients
@dataclasses.dataclass
class Counts:
    urbs: int = 0
    bytes: int = 0
    lost: int = 0
    mismatched: int = 0
    errors: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.notes) < 5:
            self.notes.append(text)

    def add(self, other: Counts) -> None:
        self.urbs += other.urbs
        self.bytes += other.bytes
        self.lost += other.lost
        self.mismatched += other.mismatched
        self.errors += other.errors
        for n in other.notes:
            self.note(n)


class Worker:
    """One imported device: keeps URBs in flight until the deadline, checks every answer."""

    def __init__(self, dev: Any, kind: str, client: int, deadline: float, in_flight: int, counts: Counts) -> None:
        self.dev = dev
        self.kind = kind
        self.client = client
        self.deadline = deadline
        self.in_flight = in_flight
        self.counts = counts
        self.rng = random.Random(client * 1000 + KINDS.index(kind))

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    async def result(self, urb: Any, expect_status: tuple[int, ...] = (0,)) -> Any | None:
        """The URB's result, or None when it was lost (no answer in time, connection gone)."""
        from usbip.client.errors import UsbipError

        try:
            res = await urb.wait(URB_TIMEOUT)
        except (asyncio.TimeoutError, UsbipError, ConnectionError) as exc:
            self.counts.lost += 1
            self.counts.note(f"{self.kind} client {self.client}: URB {urb.seqnum} lost: {exc!r}")
            return None
        self.counts.urbs += 1
        if res.status not in expect_status:
            self.counts.errors += 1
            self.counts.note(f"{self.kind} client {self.client}: URB {urb.seqnum} status {res.status}")
        return res

    def mismatch(self, what: str) -> None:
        self.counts.mismatched += 1
        self.counts.note(f"{self.kind} client {self.client}: {what}")

    async def run(self) -> None:
        run: Callable[[], Awaitable[None]] = {
            "loopback": self.loopback,
            "loopback:ss": self.loopback,
            "storage": self.storage,
            "keyboard": self.keyboard,
            "serial": self.serial,
            "audio": self.audio,
        }[self.kind]
        await run()

    # ------------------------------------------------------------ byte streams (loopback, serial)
    async def stream(self, ep_out: int, ep_in: int, sizes: tuple[int, ...], in_length: int) -> None:
        """OUT data must come back on IN, in order; half the window each way."""
        from usbip.protocol.constants import ECONNRESET

        half = max(1, self.in_flight // 2)
        expected = bytearray()
        outs: collections.deque[Any] = collections.deque()
        ins: collections.deque[Any] = collections.deque()

        def check(res: Any) -> None:
            data = bytes(res.data or b"")
            if not data:
                return
            if expected[: len(data)] != data:
                self.mismatch(f"read {len(data)} bytes that were not written next")
                expected.clear()
                return
            del expected[: len(data)]
            self.counts.bytes += len(data)

        while self.running():
            while len(outs) < half:
                data = self.rng.randbytes(self.rng.choice(sizes))
                expected += data
                outs.append(self.dev.submit(ep_out, data))
            while len(ins) < half:
                ins.append(self.dev.submit(ep_in, in_length))
            # the oldest OUT first: it completes once the device took the data
            res = await self.result(outs.popleft())
            if res is not None and res.status == 0:
                self.counts.bytes += res.actual_length
            while ins and ins[0].future.done():
                res = await self.result(ins.popleft())
                if res is not None:
                    check(res)
        for urb in outs:
            await self.result(urb)
        while ins and expected:
            res = await self.result(ins.popleft())
            if res is None:
                break
            check(res)
        if expected:
            self.mismatch(f"{len(expected)} bytes written never came back")
        for urb in ins:  # nothing left to read: these wait until unlinked
            urb.cancel()
        for urb in ins:
            res = await self.result(urb, expect_status=(ECONNRESET, 0))
            if res is not None and res.status == 0 and res.actual_length:
                self.mismatch(f"{res.actual_length} bytes read after the stream ended")

    async def loopback(self) -> None:
        await self.stream(0x02, 0x82, (64, 512, 1000, 4096, 16384), 16384)

    async def serial(self) -> None:
        await self.stream(0x01, 0x81, (1, 64, 300, 1024), 4096)

    # ------------------------------------------------------------ storage (Bulk-Only Transport)
    async def storage(self) -> None:
        blocks = STORAGE_SIZE // BLOCK
        span = max(1, self.in_flight)  # data URBs (one block each) per command
        generations: dict[int, int] = {}
        tag = 0
        gen = 0

        def stamp(lba: int, g: int) -> bytes:
            body = random.Random(lba * 7919 + g).randbytes(BLOCK - 24)
            return struct.pack("<IIQII", 0x534F414B, self.client, lba, g, zlib.crc32(body)) + body

        async def command(cdb: bytes, length: int, out: list[bytes] | None) -> list[bytes] | None:
            nonlocal tag
            tag += 1
            flags = 0 if out is not None else 0x80
            cbw = struct.pack("<IIIBBB16s", 0x43425355, tag, length, flags, 0, len(cdb), cdb.ljust(16, b"\0"))
            urbs = [self.dev.submit(0x02, cbw)]
            if out is not None:
                urbs += [self.dev.submit(0x02, b) for b in out]
            else:
                urbs += [self.dev.submit(0x81, BLOCK) for _ in range(length // BLOCK)]
            csw_urb = self.dev.submit(0x81, 13)
            results = [await self.result(u) for u in urbs]
            csw = await self.result(csw_urb)
            done = [r for r in results if r is not None]
            if csw is None or len(done) != len(results):
                return None
            if bytes(csw.data or b"") != struct.pack("<IIIB", 0x53425355, tag, 0, 0):
                self.mismatch(f"CSW {bytes(csw.data or b'').hex()} for tag {tag}")
                return None
            return [bytes(r.data or b"") for r in done[1:]]

        def rw10(op: int, lba: int, n: int) -> bytes:
            return struct.pack(">BBIBHB", op, 0, lba, 0, n, 0)

        while self.running():
            lba = self.rng.randrange(0, blocks - span)
            gen += 1
            data = [stamp(lba + i, gen) for i in range(span)]
            if await command(rw10(0x2A, lba, span), span * BLOCK, data) is None:
                continue
            self.counts.bytes += span * BLOCK
            for i in range(span):
                generations[lba + i] = gen
            # read back what was written, and now and then another range
            for first in (lba, self.rng.randrange(0, blocks - span)):
                got = await command(rw10(0x28, first, span), span * BLOCK, None)
                if got is None:
                    continue
                for i, blk in enumerate(got):
                    g = generations.get(first + i)
                    want = stamp(first + i, g) if g is not None else bytes(BLOCK)
                    if blk != want:
                        self.mismatch(f"LBA {first + i}: read back {blk[:24].hex()} (generation {g})")
                    self.counts.bytes += len(blk)

    # ------------------------------------------------------------ keyboard
    async def keyboard(self) -> None:
        from usbip.protocol.constants import ECONNRESET
        from usbip.virtual.keyboard import RELEASE, key_report

        expected = [r for ch in TEXT for r in (key_report(ch), RELEASE)]
        reports = 0
        device = await self.dev.get_descriptor(1, 0, 18)
        config = self.dev.configuration_descriptor or b""
        requests = [(0x0100, 18, device), (0x0200, len(config), config)]
        window: collections.deque[tuple[Any, bytes]] = collections.deque()
        interrupt = self.dev.submit(0x81, 8)
        while self.running():
            while len(window) < max(1, self.in_flight - 1):
                value, length, want = requests[self.rng.randrange(2)]
                setup = struct.pack("<BBHHH", 0x80, 6, value, 0, length)
                window.append((self.dev.submit(0x80, length, setup), want))
            urb, want = window.popleft()
            res = await self.result(urb)
            if res is not None:
                if bytes(res.data or b"") != want:
                    self.mismatch(f"descriptor {bytes(res.data or b'')[:8].hex()}... differs")
                self.counts.bytes += res.actual_length
            if interrupt.future.done() and reports < len(expected):
                res = await self.result(interrupt)
                if res is not None:
                    got = bytes(res.data or b"")
                    if got != expected[reports]:
                        self.mismatch(f"report {reports}: {got.hex()} != {expected[reports].hex()}")
                    reports += 1
                    self.counts.bytes += len(got)
                interrupt = self.dev.submit(0x81, 8)
        for urb, want in window:
            res = await self.result(urb)
            if res is not None and bytes(res.data or b"") != want:
                self.mismatch("descriptor differs")
        interrupt.cancel()  # waits for text that will not come
        res = await self.result(interrupt, expect_status=(ECONNRESET, 0))
        if res is not None and res.status == 0:
            reports += 1
        if reports < len(expected) and self.counts.lost == 0:
            self.counts.note(f"keyboard client {self.client}: only {reports} of {len(expected)} reports (slow run)")

    # ------------------------------------------------------------ audio
    async def audio(self) -> None:
        eps = {e["bEndpointAddress"]: e for e in self.dev.endpoints()}
        cap_mp = eps[0x81]["wMaxPacketSize"] & 0x7FF
        play_mp = eps[0x01]["wMaxPacketSize"] & 0x7FF
        packets = 8
        half = max(1, self.in_flight // 2)
        await self.dev.set_interface(1, 1)
        await self.dev.set_interface(2, 1)
        frame = 0
        capture: collections.deque[Any] = collections.deque()
        playback: collections.deque[Any] = collections.deque()
        silence_and_ramp = bytes(range(256)) * (play_mp // 256 + 1)
        play_packet = silence_and_ramp[: (play_mp // 4 - 1) * 4]  # whole frames, under the max packet
        while self.running():
            while len(capture) < half:
                capture.append(self.dev.submit(0x81, cap_mp * packets, iso_packets=[cap_mp] * packets, interval=1))
            while len(playback) < half:
                chunks = play_packet * packets
                sizes = [len(play_packet)] * packets
                playback.append(self.dev.submit(0x01, chunks, iso_packets=sizes, interval=1))
            res = await self.result(capture.popleft())
            if res is not None:
                frame = self.check_capture(res, frame)
            res = await self.result(playback.popleft())
            if res is not None:
                self.check_playback(res, len(play_packet))
        for urb in capture:
            res = await self.result(urb)
            if res is not None:
                frame = self.check_capture(res, frame)
        for urb in playback:
            res = await self.result(urb)
            if res is not None:
                self.check_playback(res, len(play_packet))
        await self.dev.set_interface(1, 0)
        await self.dev.set_interface(2, 0)

    def check_capture(self, res: Any, frame: int) -> int:
        for status, actual, data in res.packets():
            if status != 0 or actual % 4:
                self.mismatch(f"capture packet status {status}, {actual} bytes")
                continue
            for (n,) in struct.iter_unpack("<I", data):
                if n != frame:
                    self.mismatch(f"capture frame {n}, expected {frame}")
                    frame = n
                frame += 1
            self.counts.bytes += actual
        return frame

    def check_playback(self, res: Any, size: int) -> None:
        for _off, _length, actual, status in res.iso.tolist():
            if status != 0 or actual != size:
                self.mismatch(f"playback packet status {status}, {actual} of {size} bytes")
        self.counts.bytes += res.actual_length


async def client(
    port: int, index: int, busids: dict[str, str], deadline: float, in_flight: int, counts: dict[str, Counts]
) -> None:
    from usbip.client import connect

    async with connect("127.0.0.1", port) as conn:
        workers = []
        for kind in KINDS:
            dev = await conn.import_device(busids[kind])
            workers.append(Worker(dev, kind, index, deadline, in_flight, counts[kind]).run())
        results = await asyncio.gather(*workers, return_exceptions=True)
        for kind, r in zip(KINDS, results, strict=True):
            if isinstance(r, BaseException):
                counts[kind].errors += 1
                counts[kind].note(f"{kind} client {index}: worker failed: {r!r}")


async def drive(port: int, table: list[list[Any]], clients: int, seconds: float, in_flight: int, pid: int) -> dict:
    deadline = time.monotonic() + seconds
    counts = {kind: Counts() for kind in KINDS}
    per_client: dict[int, dict[str, str]] = collections.defaultdict(dict)
    for busid, kind, c in table:
        per_client[c][kind] = busid
    tasks = [asyncio.create_task(client(port, c, per_client[c], deadline, in_flight, counts)) for c in range(clients)]
    warmup = min(60.0, max(2.0, seconds * 0.2))
    samples: list[tuple[float, int]] = []
    start = time.monotonic()
    rss_warm = rss_end = 0
    step = max(1.0, seconds / 10)
    next_sample = start + warmup
    while not all(t.done() for t in tasks):
        now = time.monotonic()
        if now >= next_sample and now < deadline:
            rss = rss_bytes(pid)
            samples.append((now - start, rss))
            if not rss_warm:
                rss_warm = rss
            next_sample = now + step
        if now >= deadline and not rss_end:
            rss_end = rss_bytes(pid)  # before the clients drain and leave
            samples.append((now - start, rss_end))
        await asyncio.wait(tasks, timeout=0.2)
    for t in tasks:
        if t.exception() is not None:
            counts[KINDS[0]].errors += 1
            counts[KINDS[0]].note(f"client failed: {t.exception()!r}")
    if not rss_end:
        rss_end = rss_bytes(pid)
    if not rss_warm:
        rss_warm = rss_end
    return {"counts": counts, "rss_warm": rss_warm, "rss_end": rss_end, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--minutes", type=float, default=10.0, help="how long the clients run (default 10)")
    g.add_argument("--seconds", type=float, help="the same in seconds (smoke runs)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--in-flight", type=int, default=32, help="URBs each client keeps in flight per device")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tmpdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        asyncio.run(serve(args.clients, args.tmpdir))
        return 0
    seconds = args.seconds if args.seconds is not None else args.minutes * 60

    with tempfile.TemporaryDirectory(prefix="usbip-soak-") as tmp:
        cmd = [sys.executable, "-m", "fuzz.soak", "--serve", "--clients", str(args.clients), "--tmpdir", tmp]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=root, text=True)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            hello = json.loads(proc.stdout.readline() or "{}")
            if "port" not in hello:
                print("soak: the server did not start", file=sys.stderr)
                return 1
            print(
                f"soak: server pid {proc.pid} on 127.0.0.1:{hello['port']}, {len(hello['devices'])} devices; "
                f"{args.clients} clients x {args.in_flight} URBs in flight per device for {seconds:.0f} s"
            )
            out = asyncio.run(drive(hello["port"], hello["devices"], args.clients, seconds, args.in_flight, proc.pid))
            proc.stdin.close()
            bye = json.loads(proc.stdout.readline() or "{}")
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return report(out, bye.get("stats"), seconds)


def report(out: dict, stats: dict | None, seconds: float) -> int:
    total = Counts()

    def row(name: str, c: Counts) -> str:
        return f"{name:<12} {c.urbs:>10} {c.bytes / 2**20:>12.1f} {c.lost:>5} {c.mismatched:>10} {c.errors:>6}"

    print(f"{'device':<12} {'URBs':>10} {'MiB checked':>12} {'lost':>5} {'mismatched':>10} {'errors':>6}")
    for kind, c in out["counts"].items():
        print(row(kind, c))
        total.add(c)
    print(row("all", total))
    print(f"soak: {total.urbs / max(seconds, 1e-9):.0f} URBs/s")
    for note in total.notes:
        print(f"  note: {note}")
    warm, end = out["rss_warm"], out["rss_end"]
    growth = end - warm
    limit = max(RSS_GROWTH_FRACTION * warm, RSS_GROWTH_BYTES)
    trend = ", ".join(f"{t:.0f}s {r / 2**20:.0f}" for t, r in out["samples"])
    print(f"soak: server RSS after warm-up {warm / 2**20:.1f} MiB, at the end {end / 2**20:.1f} MiB ({trend})")
    print(f"soak: server after the clients left: {stats}")
    failures = []
    if total.lost or total.mismatched or total.errors:
        failures.append(f"{total.lost} lost, {total.mismatched} mismatched, {total.errors} failed URBs")
    if total.urbs == 0:
        failures.append("no URB completed")
    if growth > limit:
        failures.append(f"server RSS grew {growth / 2**20:.1f} MiB (limit {limit / 2**20:.1f} MiB)")
    if stats is None:
        failures.append("the server did not report its state at exit")
    else:
        for key in ("sessions", "pending_urbs", "pool_outstanding", "protocol_errors", "loopback_sink_errors"):
            if stats.get(key, 0):
                failures.append(f"server {key} = {stats[key]} after the clients left")
    if failures:
        print("soak: FAILED: " + "; ".join(failures))
        return 1
    print("soak: passed")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
