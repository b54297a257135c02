"""Drive our server's URB path in-process, for instruction counts (not part of the benchmark run).

``python -m benchmarks.tools.profile_urbs CASE [--batches N] [--inflight K]`` builds what usbipd
builds for one connection (the virtual loopback device, the buffer pool, the server decoder, the
socket pump and the URB session) on one end of a loopback TCP connection, and plays the C
loadgen's part on the other end from this thread: ``K`` CMD_SUBMITs per batch, every reply read
back before the next batch. The server's work of a batch is one call of ``Stream._on_readable``
(read, decode, submit, device, RET_SUBMIT, sendmsg), the function to count instructions in::

    valgrind --tool=callgrind --toggle-collect='__pyx_f_5usbip_3net_5_pump_6Stream__on_readable' \\
        python -m benchmarks.tools.profile_urbs iso-in --batches 2000

(the compiled pump's C function: memset/memcpy count about one instruction per byte there).
CASE: ``iso-in`` (8 packets x 1 KiB, the e2e benchmark's iso case), ``bulk-in:SIZE`` or
``bulk-out:SIZE``. The event loop's wake-ups are not part of it (a real server adds one per read).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time

from usbip.pool import BufferPool
from usbip.protocol import HEADER_SIZE, ISO_DESC_SIZE, Decoder, IsoPackets, pack_cmd_submit
from usbip.protocol.constants import URB_ISO_ASAP, USBIP_DIR_IN, USBIP_DIR_OUT
from usbip.server.session import UrbSession
from usbip.usb.ch9 import RECIP_INTERFACE, SET_INTERFACE, SETUP_STRUCT, TYPE_STANDARD
from usbip.virtual.loopback import LoopbackDevice

from ..harness.settings import ISO_PACKETS, ISO_SIZE

ISO_EP = 3  # the loopback's iso source (0x83), alt setting 1
BULK_EP = 1  # source 0x81, sink 0x01


def _batch(case: str, inflight: int, seq0: int, devid: int) -> tuple[bytes, int]:
    """The client's bytes of one batch and the reply bytes it expects."""
    out = bytearray()
    reply = 0
    for i in range(inflight):
        seq = seq0 + i
        hdr = bytearray(HEADER_SIZE)
        if case == "iso-in":
            size = ISO_PACKETS * ISO_SIZE
            pack_cmd_submit(hdr, 0, seq, devid, USBIP_DIR_IN, ISO_EP, URB_ISO_ASAP, size, 0, ISO_PACKETS, 1)
            descs = bytearray(ISO_PACKETS * ISO_DESC_SIZE)
            IsoPackets.layout(ISO_PACKETS, ISO_SIZE).pack_into(descs, 0)
            out += hdr + descs
            reply += HEADER_SIZE + size + len(descs)
            continue
        mode, _, size_s = case.partition(":")
        size = int(size_s)
        if mode == "bulk-in":
            pack_cmd_submit(hdr, 0, seq, devid, USBIP_DIR_IN, BULK_EP, 0, size)
            out += hdr
            reply += HEADER_SIZE + size
        elif mode == "bulk-out":
            pack_cmd_submit(hdr, 0, seq, devid, USBIP_DIR_OUT, BULK_EP, 0, size)
            out += hdr + bytes(size)
            reply += HEADER_SIZE
        else:
            raise SystemExit(f"unknown case {case!r}")
    return bytes(out), reply


def run(case: str, batches: int, inflight: int) -> float:
    loop = asyncio.new_event_loop()
    device = LoopbackDevice()
    if case == "iso-in":
        setup = SETUP_STRUCT.pack(TYPE_STANDARD | RECIP_INTERFACE, SET_INTERFACE, 1, 0, 0)
        from usbip.protocol import Urb

        device.submit(Urb(0, 0, USBIP_DIR_OUT, 0, b"", setup=setup, on_complete=lambda u: None))
    lsock = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(lsock.getsockname())
    server, _ = lsock.accept()
    lsock.close()
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    from usbip.net.stream import Stream

    closed: list[BaseException | None] = []
    stream = Stream(server, Decoder("server"), lambda msgs: session.handle(msgs), closed.append, loop)
    session = UrbSession(device, stream.write, BufferPool(), devid=device.devid, queued=stream.queued_bytes)
    client.setblocking(False)
    sink = bytearray(4 << 20)
    seq = 1
    t0 = time.perf_counter()
    for _ in range(batches):
        data, want = _batch(case, inflight, seq, device.devid)
        seq += inflight
        view = memoryview(data)
        got = 0
        while got < want or len(view):
            if len(view):
                try:
                    view = view[client.send(view) :]
                except BlockingIOError:
                    pass
            stream._on_readable()
            if closed:
                raise SystemExit(f"stream closed: {closed[0]!r}")
            try:
                got += client.recv_into(sink)
            except BlockingIOError:
                pass
    elapsed = time.perf_counter() - t0
    stream.close()
    client.close()
    loop.close()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case")
    ap.add_argument("--batches", type=int, default=1000)
    ap.add_argument("--inflight", type=int, default=8)
    args = ap.parse_args()
    elapsed = run(args.case, args.batches, args.inflight)
    urbs = args.batches * args.inflight
    print(f"{args.case}: {urbs} URBs in {elapsed:.3f} s, {elapsed / urbs * 1e6:.2f} us per URB (wall, incl. client)")


if __name__ == "__main__":
    main()
