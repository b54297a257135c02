"""Our usbipd's libusb handles over many imports (issue 16): every release closes the handle and
its usbfs fd, and nothing spins while URBs wait.

* python-libusb1 3.4's ``USBDeviceHandle.close()`` of a ``wrapSysDevice`` handle failed its own
  finalizer bookkeeping before ``libusb_close`` ("closing the libusb handle failed:
  AssertionError()"), and usbipd kept the fd open (closing it under libusb poisons libusb's
  poll set): one fd leaked per import. Here a client on the host (through the forwarded port)
  imports a SourceSink + Loopback gadget ``USBIP_LIBUSB_HANDLE_CYCLES`` times (default 100;
  thousands for a soak): closed after its traffic, closed with bulk URBs in flight (one of them
  a Loopback IN that never completes), the socket dropped (RST) with URBs in flight, closed
  right after the import. usbipd's fd count must come back to where it was, the log must not
  show a failed close or transfers left in flight, and a last import must still move data.
* CPU: with one URB pending that never completes usbipd must sleep (a spin detector with a
  generous bound, not a speed test; under TCG a busy loop shows as a whole second per second).

Both libusb event modes (the loop's pollfds, an event thread) and both ways of opening the
device (its usbfs node wrapped, the leaking one; libusb_open) are covered, the second pair
with the long kernel tests (scripts/kernel-long).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time

import pytest

from usbip.client import ImportRefused, connect
from usbip.protocol.codec import pack_cmd_submit
from usbip.protocol.constants import USBIP_DIR_IN
from usbip.usb.descriptors import walk

from . import gadgets
from .guest_usbipd import PORT, STATE
from .guest_usbipd import bind as _bind
from .guest_usbipd import start as _start_usbipd
from .guest_usbipd import stop as _stop_usbipd
from .guest_usbipd import wait_exportable as _wait_exportable

CYCLES = int(os.environ.get("USBIP_LIBUSB_HANDLE_CYCLES", "100"))
#: fds usbipd may hold after the cycles beyond its count after the warm-up imports
FD_SLACK = 2
#: CPU seconds usbipd may use in SPIN_WINDOW seconds with one URB pending (a spin uses ~all of it)
SPIN_WINDOW = 3.0
SPIN_CPU = 0.3
#: what SourceSink (pattern=1) sends and wants to get: mod 63, restarting every 512-byte packet
PATTERN = bytes(j % 512 % 63 for j in range(4096))
FAILURES = ("closing the libusb handle failed", "transfers still in flight at close", "reap failed")


@pytest.fixture(
    params=[
        pytest.param(("pollfd", "sysfs"), id="pollfd-sysfs"),
        pytest.param(("thread", "libusb"), id="thread-libusb", marks=pytest.mark.long),  # scripts/kernel-long
    ]
)
def exported(clean_guest, request):
    """Our usbipd in the guest (listening for the host: the client runs there) exporting a
    SourceSink + Loopback gadget, with libusb's events on the loop's pollfds and the device
    wrapped from its usbfs node (the default), or with an event thread and the device opened
    with libusb_open; yields (guest, usbipd pid, its log, busid, cycles to run)."""
    guest = clean_guest
    events, enumerate_ = request.param
    guest.run(f"rm -f {STATE}", check=True)
    # plugged in before usbipd starts: in libusb's device list from the start (libusb_open)
    g = gadgets.create_gadget(
        guest,
        "sslb",
        [("SourceSink.0", {"pattern": 1, "isoc_maxpacket": 0}), ("Loopback.0", {})],
        modules=("usb_f_ss_lb",),
    )
    # no periodic rescans in the way of the CPU measurements (a bind or a device list rescans)
    args = f"--host 0.0.0.0 --rescan-interval 60 --libusb-events {events} --enumerate {enumerate_}"
    pid, log = _start_usbipd(guest, args)
    try:
        _bind(guest, g.busid)
        _wait_exportable(guest, g.busid)
        # the leak was the wrapped handles' (the first variant): the second one gets fewer cycles
        yield guest, pid, log, g.busid, CYCLES if events == "pollfd" else max(8, CYCLES // 5)
    finally:
        hung = _stop_usbipd(guest, pid) if guest.run(f"kill -0 {pid}").rc == 0 else ""
        print(guest.run(f"grep -m3 'devices found\\|exporting\\|events via' {log}; tail -5 {log}").out)
        assert not hung, hung


class Endpoints:
    """The gadget's bulk endpoints, from its configuration descriptor: SourceSink (interface 0)
    and Loopback (interface 1), whose IN completes only with data written to its OUT first (so
    an URB there stays pending)."""

    def __init__(self, config: bytes) -> None:
        found: dict[tuple[int, bool], int] = {}
        intf = None
        for dtype, d in walk(config):
            if dtype == 4 and len(d) >= 9:
                intf = d[2]
            elif dtype == 5 and len(d) >= 7 and intf is not None:
                found.setdefault((intf, bool(d[2] & 0x80)), d[2])
        try:
            self.ss_in, self.ss_out = found[0, True], found[0, False]
            self.lb_in = found[1, True]
        except KeyError:
            raise AssertionError(f"not a SourceSink + Loopback configuration: {config.hex()}") from None


def _fds(guest, pid: int) -> tuple[int, int]:
    """(open fds of usbipd, of which usbfs nodes)."""
    out = guest.run(f"ls -l /proc/{pid}/fd | grep -c -- '->'; ls -l /proc/{pid}/fd | grep -c /dev/bus/usb").out
    total, usbfs = (int(x) for x in out.split())
    return total, usbfs


def _cpu_window(guest, pid: int, seconds: float) -> tuple[float, float]:
    """(CPU seconds usbipd used, seconds elapsed) over ``seconds`` (both measured in the guest)."""
    cpu = f"sed 's/.*) //' /proc/{pid}/stat | cut -d' ' -f12,13"  # utime stime, in USER_HZ (100)
    out = guest.run(f"cut -d' ' -f1 /proc/uptime; {cpu}; sleep {seconds}; cut -d' ' -f1 /proc/uptime; {cpu}").out
    t0, u0, s0, t1, u1, s1 = out.split()
    return (int(u1) + int(s1) - int(u0) - int(s0)) / 100, float(t1) - float(t0)


async def _retry_refused(make, timeout: float = 30.0):
    """An import refused while usbipd still releases the previous one is tried again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await make()
        except ImportRefused:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def _drop_with_urbs(conn, busid: str, ep: Endpoints) -> None:
    """Import, submit a pending Loopback IN and SourceSink bulk URBs, then reset the connection."""
    sock, rec = await _retry_refused(lambda: conn.import_socket(busid))
    try:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        msgs = []
        urbs = [(ep.lb_in, 512), (ep.ss_in, 4096), (ep.ss_in, 4096), (ep.ss_out, 4096)]
        for seq, (address, length) in enumerate(urbs, 1):
            hdr = bytearray(48)
            direction = USBIP_DIR_IN if address & 0x80 else 0
            pack_cmd_submit(hdr, 0, seq, rec.devid, direction, address & 0x0F, 0, length)
            msgs.append(bytes(hdr) + (PATTERN[:length] if not direction else b""))
        await loop.sock_sendall(sock, b"".join(msgs))
        await asyncio.sleep(0.05)
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
        sock.close()


async def _cycle(conn, busid: str, ep: Endpoints, kind: int) -> None:
    if kind == 0:  # traffic, done, closed
        dev = await _retry_refused(lambda: conn.import_device(busid))
        assert len(await dev.bulk_transfer(ep.ss_in, 512, timeout=30)) == 512
        await dev.bulk_transfer(ep.ss_out, PATTERN[:512], timeout=30)
        await dev.close()
    elif kind == 1:  # closed with URBs in flight, one of them never completes
        dev = await _retry_refused(lambda: conn.import_device(busid, read_descriptors=False, configure=False))
        dev.submit(ep.lb_in, 512)
        first = [dev.submit(ep.ss_in, 4096), dev.submit(ep.ss_out, PATTERN)]
        await first[0].wait(30)  # usbipd has the Loopback IN (URBs are taken in order)
        for _ in range(3):
            dev.submit(ep.ss_in, 4096)
            dev.submit(ep.ss_out, PATTERN)
        await dev.close()
    elif kind == 2:
        await _drop_with_urbs(conn, busid, ep)
    else:  # imported, closed at once
        dev = await _retry_refused(lambda: conn.import_device(busid, read_descriptors=False, configure=False))
        await dev.close()


def _wait_released(guest, pid: int, timeout: float = 60) -> tuple[int, int]:
    """usbipd's fds once it holds no usbfs node any more (the last release is done)."""
    deadline = time.monotonic() + timeout
    while True:
        total, usbfs = _fds(guest, pid)
        if usbfs == 0 or time.monotonic() > deadline:
            return total, usbfs
        time.sleep(0.5)


def test_import_cycles_release_every_handle_and_nothing_spins(exported):
    guest, pid, log, busid, cycles = exported
    port = guest.host_port(PORT)

    async def main():
        async with connect("127.0.0.1", port, timeout=60) as conn:
            dev = await _retry_refused(lambda: conn.import_device(busid))
            ep = Endpoints(dev.configuration_descriptor)
            await dev.close()
            for kind in (1, 2):  # warm-up: whatever usbipd opens once (and keeps) is open now
                await _cycle(conn, busid, ep, kind)
            base = await asyncio.to_thread(_wait_released, guest, pid)
            assert base[1] == 0, base
            t0 = time.monotonic()
            for i in range(cycles):
                await _cycle(conn, busid, ep, i % 4)
            took = time.monotonic() - t0
            after = await asyncio.to_thread(_wait_released, guest, pid)
            print(f"{cycles} import cycles in {took:.1f} s; usbipd fds {base[0]} -> {after[0]}")
            assert after[1] == 0, f"usbfs nodes still open after the last release: {after}"
            assert after[0] <= base[0] + FD_SLACK, f"fds leaked: {base[0]} before, {after[0]} after {cycles} imports"

            # the device still works; then one URB pending that never completes: usbipd sleeps
            dev = await _retry_refused(lambda: conn.import_device(busid))
            data = await dev.bulk_transfer(ep.ss_in, 4096, timeout=30)
            assert bytes(data) == PATTERN, bytes(data[:64]).hex()
            await dev.bulk_transfer(ep.ss_out, PATTERN, timeout=30)
            pending = dev.submit(ep.lb_in, 512)
            await dev.bulk_transfer(ep.ss_in, 512, timeout=30)  # taken after the pending one
            await asyncio.sleep(0.5)
            cpu, elapsed = await asyncio.to_thread(_cpu_window, guest, pid, SPIN_WINDOW)
            print(f"one URB pending: usbipd used {cpu:.2f} s of CPU in {elapsed:.1f} s")
            assert not pending.future.done(), pending.future  # still pending: nothing completed it
            assert cpu < SPIN_CPU, f"usbipd used {cpu:.2f} s of CPU in {elapsed:.1f} s with one URB pending"

            # a trickle of GET_DESCRIPTOR (one in flight) next to it: reported, not asserted (CPU per request)
            stop, count = asyncio.Event(), [0]

            async def trickle():
                while not stop.is_set():
                    await dev.control_transfer(0x80, 6, 0x0100, 0, 18, timeout=30)
                    count[0] += 1

            task = asyncio.ensure_future(trickle())
            cpu, elapsed = await asyncio.to_thread(_cpu_window, guest, pid, SPIN_WINDOW)
            stop.set()
            await task
            print(f"GET_DESCRIPTOR trickle: {count[0]} requests, usbipd {cpu:.2f} s of CPU in {elapsed:.1f} s")
            await dev.close()
        return await asyncio.to_thread(_wait_released, guest, pid)

    final = asyncio.run(main())
    assert final[1] == 0, final
    text = guest.run(f"cat {log}").out
    bad = [line for line in text.splitlines() if any(f in line for f in FAILURES)]
    assert not bad, "\n".join(bad[:10])
    assert guest.run(f"kill -0 {pid}").rc == 0
