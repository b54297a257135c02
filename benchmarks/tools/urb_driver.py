"""Drive our server in-process with a fixed number of URBs, for instruction counts (callgrind).

``python -m benchmarks.tools.urb_driver CASE ROUNDS`` starts a :class:`usbip.server.Server`
with the virtual loopback device on 127.0.0.1, imports it over a raw socket in the same event
loop and runs ROUNDS rounds of CASE, each round one batch of CMD_SUBMITs sent at once and
all its replies read back (the same pre-packed batch every round: seqnums are free again once
their URBs completed). CASE: ``bulk-in:SIZE:INFLIGHT``, ``bulk-out:SIZE:INFLIGHT``,
``iso-in:INFLIGHT`` (the e2e benchmark's iso URB, 8 packets x 1 KiB, after SET_INTERFACE to the
loopback's iso alt setting) or ``control`` (GET_DESCRIPTOR(device), 18 bytes, one in flight).

The client side costs a few calls per round, so the difference of two runs' instruction
counts divided by the URBs in between is the server's cost per URB, event loop included::

    for n in 1000 3000; do
        valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$n \\
            python -m benchmarks.tools.urb_driver bulk-in:512:32 $n
    done   # (Ir(3000) - Ir(1000)) / (2000 * 32)

To count the server's read -> decode -> device -> reply -> sendmsg path alone (no event loop),
collect only inside the compiled pump's read handler:
``--toggle-collect='__pyx_f_5usbip_3net_5_pump_6Stream__on_readable'`` (memset and memcpy count
about one instruction per byte there).

``--strace``-style counts come from running it under ``strace -c -f`` the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import socket

from usbip.protocol import (
    DEVICE_RECORD_SIZE,
    HEADER_SIZE,
    ISO_DESC_SIZE,
    OP_HEADER_SIZE,
    USBIP_DIR_IN,
    USBIP_DIR_OUT,
    DeviceRecord,
    IsoPackets,
    pack_cmd_submit,
)
from usbip.protocol.constants import URB_ISO_ASAP
from usbip.protocol.records import pack_import_request
from usbip.server import Server
from usbip.usb.ch9 import DIR_IN, DT_DEVICE, GET_DESCRIPTOR, RECIP_INTERFACE, SET_INTERFACE, SETUP_STRUCT, TYPE_STANDARD
from usbip.virtual.loopback import LoopbackDevice

from ..harness.settings import ISO_PACKETS, ISO_SIZE

BULK_IN_EP = 1
BULK_OUT_EP = 1
ISO_IN_EP = 3  # the loopback's iso source (0x83), in alt setting 1
ISO_ALT = 1
DEVICE_DESCRIPTOR_SIZE = 18


def batch(case: str, devid: int) -> tuple[bytes, int, int]:
    """(the CMD_SUBMITs of one round, URBs in it, reply bytes expected back)."""
    if case == "control":
        setup = SETUP_STRUCT.pack(DIR_IN, GET_DESCRIPTOR, DT_DEVICE << 8, 0, DEVICE_DESCRIPTOR_SIZE)
        buf = bytearray(HEADER_SIZE)
        pack_cmd_submit(buf, 0, 1, devid, USBIP_DIR_IN, 0, 0, DEVICE_DESCRIPTOR_SIZE, setup=setup)
        return bytes(buf), 1, HEADER_SIZE + DEVICE_DESCRIPTOR_SIZE
    if case.startswith("iso-in:"):
        inflight = int(case.split(":")[1])
        size = ISO_PACKETS * ISO_SIZE
        descs = bytearray(ISO_PACKETS * ISO_DESC_SIZE)
        IsoPackets.layout(ISO_PACKETS, ISO_SIZE).pack_into(descs, 0)
        out = bytearray()
        for i in range(inflight):
            hdr = bytearray(HEADER_SIZE)
            pack_cmd_submit(hdr, 0, i + 1, devid, USBIP_DIR_IN, ISO_IN_EP, URB_ISO_ASAP, size, 0, ISO_PACKETS, 1)
            out += hdr + descs
        return bytes(out), inflight, inflight * (HEADER_SIZE + size + len(descs))
    mode, size_s, inflight_s = case.split(":")
    size, inflight = int(size_s), int(inflight_s)
    out = bytearray()
    for i in range(inflight):
        hdr = bytearray(HEADER_SIZE)
        if mode == "bulk-in":
            pack_cmd_submit(hdr, 0, i + 1, devid, USBIP_DIR_IN, BULK_IN_EP, 0, size)
            out += hdr
        elif mode == "bulk-out":
            pack_cmd_submit(hdr, 0, i + 1, devid, USBIP_DIR_OUT, BULK_OUT_EP, 0, size)
            out += hdr + bytes(size)
        else:
            raise SystemExit(f"unknown case {case!r}")
    reply = HEADER_SIZE + (size if mode == "bulk-in" else 0)
    return bytes(out), inflight, inflight * reply


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("server closed")
        data += chunk
    return data


async def run(case: str, rounds: int) -> int:
    loop = asyncio.get_running_loop()
    async with Server([LoopbackDevice()], host="127.0.0.1", port=0) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_sendall(sock, pack_import_request("100-1"))
        sock.setblocking(False)
        reply = b""
        while len(reply) < OP_HEADER_SIZE + DEVICE_RECORD_SIZE:
            reply += await loop.sock_recv(sock, OP_HEADER_SIZE + DEVICE_RECORD_SIZE - len(reply))
        devid = DeviceRecord.unpack(reply[OP_HEADER_SIZE:]).devid
        if case.startswith("iso-in:"):  # the iso endpoints live in alt setting 1 of interface 0
            setup = SETUP_STRUCT.pack(TYPE_STANDARD | RECIP_INTERFACE, SET_INTERFACE, ISO_ALT, 0, 0)
            hdr = bytearray(HEADER_SIZE)
            pack_cmd_submit(hdr, 0, 1, devid, USBIP_DIR_OUT, 0, 0, 0, setup=setup)
            await loop.sock_sendall(sock, bytes(hdr))
            answer = b""
            while len(answer) < HEADER_SIZE:
                answer += await loop.sock_recv(sock, HEADER_SIZE - len(answer))
        data, urbs, expect = batch(case, devid)
        buf = bytearray(max(expect, 1 << 16))
        done = loop.create_future()
        state = {"left": rounds, "got": 0}

        def readable() -> None:
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                return
            if n == 0:
                done.set_exception(ConnectionError("server closed"))
                return
            state["got"] += n
            if state["got"] >= expect:
                state["got"] -= expect
                state["left"] -= 1
                if state["left"] == 0:
                    done.set_result(None)
                else:
                    sock.sendall(data)

        sock.setblocking(True)
        loop.add_reader(sock.fileno(), readable)
        sock.sendall(data)
        await done
        loop.remove_reader(sock.fileno())
        sock.close()
        return rounds * urbs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", help="bulk-in:SIZE:INFLIGHT, bulk-out:SIZE:INFLIGHT, iso-in:INFLIGHT or control")
    ap.add_argument("rounds", type=int)
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the event loop")
    args = ap.parse_args()
    if args.loop == "uvloop":
        import uvloop  # not a dependency: installed by hand for the comparison

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    print(asyncio.run(run(args.case, args.rounds)), "URBs")


if __name__ == "__main__":
    main()
