from __future__ import annotations

import asyncio
import time

import usbip

from . import gadgets
from .guest_usbipd import PORT, STATE
from .guest_usbipd import bind as _bind
from .guest_usbipd import start as _start_usbipd
from .guest_usbipd import stop as _stop_usbipd
from .guest_usbipd import wait_exportable as _wait_exportable


def _cpu_window(guest, pid, secs=3):
    sh = (f"snap() {{ for t in /proc/{pid}/task/*; do echo ${{t##*/}} $(cat $t/comm) $(cut -d' ' -f14,15 $t/stat); done; }}; "
          f"snap; s=$(date +%s.%N); cut -d' ' -f14,15 /proc/{pid}/stat; sleep {secs}; cut -d' ' -f14,15 /proc/{pid}/stat; e=$(date +%s.%N); snap; echo $s $e")
    return guest.run(sh, timeout=120).out


def _fds(guest, pid):
    return int(guest.run(f"ls /proc/{pid}/fd | wc -l").out.strip())


def test_explore(clean_guest):
    guest = clean_guest
    gadgets.modprobe(guest, "vhci-hcd")
    guest.run(f"rm -f {STATE}", check=True)
    import os
    mode = os.environ.get("EXPLORE_MODE", "pollfd")
    prof = os.environ.get("EXPLORE_PROF")
    wrap = (lambda c: c.replace("-m usbip.cli.usbipd_main", "-m cProfile -o /tmp/usbipd.prof -m usbip.cli.usbipd_main")) if prof else None
    pid, log = _start_usbipd(guest, f"--host 0.0.0.0 --rescan-interval 60 --libusb-events {mode}", wrap=wrap)
    try:
        g = gadgets.create_gadget(guest, "sslb", [("SourceSink.0", {"pattern": 1, "isoc_maxpacket": 0}), ("Loopback.0", {})], modules=("usb_f_ss_lb",))
        busid = g.busid
        _bind(guest, busid)
        _wait_exportable(guest, busid)
        port = guest.host_port(PORT)
        print("fds at start", _fds(guest, pid))

        async def cycle():
            async with usbip.connect("127.0.0.1", port, timeout=60) as conn:
                dev = await conn.import_device(busid)
                data = await dev.bulk_transfer(0x81, 512, timeout=30)
                print("ss in", len(data))
                print("IDLE", await asyncio.to_thread(_cpu_window, guest, pid))
                u = dev.submit(0x86, 512)
                await asyncio.sleep(1)
                print("PENDING", await asyncio.to_thread(_cpu_window, guest, pid))
                stop = False
                k = 0
                async def trickle():
                    nonlocal k
                    while not stop:
                        await dev.control_transfer(0x80, 6, 0x0100, 0, 18, timeout=30)
                        k += 1
                t = asyncio.ensure_future(trickle())
                await asyncio.sleep(1)
                k0 = k
                print("TRICKLE", await asyncio.to_thread(_cpu_window, guest, pid))
                print("requests", k - k0)
                stop = True
                await t
                await dev.close()
            await asyncio.sleep(2)
            print("fds after", _fds(guest, pid))

        asyncio.run(cycle())
        print(guest.run(f"grep -c 'closing the libusb handle failed' {log}; grep -v 'done seq\\|submit' {log} | tail -15").out)
    finally:
        print(_stop_usbipd(guest, pid))
        if prof:
            print(guest.run(f"{guest.python} -c \"import pstats; s=pstats.Stats('/tmp/usbipd.prof'); s.sort_stats('tottime').print_stats(35); s.sort_stats('cumtime').print_stats(40)\"", timeout=120).out)
