"""libusb event handling in usbipd: libusb's pollfds on the asyncio loop (``--libusb-events
pollfd``) against an event thread handing completions over (``thread``).

The host has no USB devices, so this runs in the kernel-test QEMU guest: the SourceSink gadget on
dummy_hcd, exported by our usbipd through libusb in one mode or the other, driven by the C
loadgen (benchmarks/tools/loadgen.c) in the guest over loopback, no vhci in between. The modes alternate
(pollfd, thread, pollfd, thread) in the same guest. Reported per case: URB/s, MB/s, usbipd CPU
per URB; at the end the thread/pollfd ratios. Under TCG emulation the absolute numbers mean
little: the ratio between the modes in one run is the measurement.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict

import pytest

from tests.kernel import gadgets
from tests.kernel.harness import Guest

from .harness import build, env_int, run_settings

MODES = ("pollfd", "thread")
PORT = 3240
STATE = "/tmp/cyusbip-bench/exported.json"
#: (name, bench mode, endpoint, size, in flight): SourceSink's bulk IN is 0x81, OUT 0x02 on dummy_hcd
CASES = [
    ("control x1", "control", 0, 18, 1),
    ("bulk-in 512 B x8", "bulk-in", 1, 512, 8),
    ("bulk-in 16 KiB x8", "bulk-in", 1, 16384, 8),
    ("bulk-out 16 KiB x8", "bulk-out", 2, 16384, 8),
]
_results: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))


@pytest.fixture(scope="module")
def busid(guest):  # guest: benchmarks/conftest.py
    guest.run(f"mkdir -p {STATE.rsplit('/', 1)[0]}; rm -f {STATE}", check=True)
    bid = gadgets.sourcesink(guest, pattern=0)
    r = guest.run(f"{guest.python} -m usbip.cli.usbip_main bind -b {bid} --state-file {STATE}", timeout=120)
    assert r.rc == 0, r
    return bid


@pytest.fixture(scope="module")
def settings(request):
    quick = bool(request.config.getoption("benchmark_disable"))
    s = run_settings(quick, warmup=0.5, quick_warmup=0.2)
    s["rounds"] = 1 if quick else env_int("USBIP_BENCH_ROUNDS", 2)
    s["quick"] = quick
    return s


def _cases(settings: dict) -> list[tuple[str, str, int, int, int]]:
    """Every case; the smoke (quick) only one: each is a client process, seconds under TCG."""
    return CASES[1:2] if settings.get("quick") else CASES


def _cpu_ticks(guest: Guest, pid: int) -> int:
    fields = guest.run(f"cat /proc/{pid}/stat", check=True).out.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15 of stat)


def _serve(guest: Guest, mode: str, busid: str) -> tuple[int, str]:
    pid, log = guest.start_background(
        f"exec {guest.python} -m usbip.cli.usbipd_main --host 127.0.0.1 -t {PORT} --state-file {STATE} "
        f"--libusb-events {mode} --rescan-interval 5"
    )
    # exported (its log says so) and listening; no client process per poll (a Python start costs
    # seconds under TCG)
    listening = f"awk '$2 ~ /:{PORT:04X}$/ && $4 == \"0A\" {{f=1}} END {{exit !f}}' /proc/net/tcp"
    up = f"grep -q 'exporting {busid}:' {log} && {listening}"
    r = guest.run(gadgets.poll_sh(up, 90), timeout=120)
    assert r.rc == 0, guest.run(f"cat {log}").out
    return pid, log


def _stop(guest: Guest, pid: int) -> None:
    guest.run(f"kill {pid}; " + gadgets.poll_sh(f"! kill -0 {pid} 2>/dev/null", 20) + f" || kill -9 {pid}", timeout=60)


def _run_round(guest: Guest, mode: str, busid: str, s: dict) -> None:
    pid, log = _serve(guest, mode, busid)
    hz = int(guest.run("getconf CLK_TCK").out.strip() or 100)
    try:
        for name, bmode, ep, size, inflight in _cases(s):
            before = _cpu_ticks(guest, pid)
            # the C loadgen (built on the host, seen by the guest over 9p): no Python start per case,
            # and the client takes little of the guest's CPU from the server; zeros out: pattern 0
            r = guest.run(
                f"{build('loadgen')} --host 127.0.0.1 --port {PORT} --busid {busid} --mode {bmode} --out-byte 0 "
                f"--ep {ep} --size {size} --inflight {inflight} --seconds {s['seconds']} --warmup {s['warmup']}",
                timeout=120,
            )
            cpu = (_cpu_ticks(guest, pid) - before) / hz
            assert r.rc == 0, f"{name}, {mode}: {r}\n--- usbipd ---\n" + guest.run(f"tail -30 {log}").out
            res = json.loads(r.out.strip().splitlines()[-1])
            assert res["urbs"] > 0 and res["errors"] == 0, res
            # CPU over the whole client run (import, warm-up, window): per URB of the window, an upper bound
            res["server_cpu_us_per_urb"] = cpu / res["urbs"] * 1e6
            _results[name][mode].append(res)
    finally:
        _stop(guest, pid)


@pytest.mark.long  # a usbipd start per mode under TCG: scripts/bench runs it (CI: test_libusb_vs_kernel)
def test_event_modes(benchmark, guest, busid, settings):
    """Both modes, alternating, every case; the thread/pollfd ratios land in extra_info."""
    benchmark.group = "libusb events"

    def run() -> None:
        for _ in range(int(settings["rounds"])):
            for mode in MODES:
                _run_round(guest, mode, busid, settings)

    t0 = time.monotonic()
    benchmark.pedantic(run, rounds=1, iterations=1)
    lines = [f"libusb event modes ({time.monotonic() - t0:.0f} s, medians of {settings['rounds']} rounds):"]
    for name, by_mode in _results.items():
        med = {
            m: {k: statistics.median(r[k] for r in runs) for k in ("urbs_per_s", "mb_per_s", "server_cpu_us_per_urb")}
            for m, runs in by_mode.items()
        }
        ratio = med["thread"]["urbs_per_s"] / med["pollfd"]["urbs_per_s"]
        cpu_ratio = med["thread"]["server_cpu_us_per_urb"] / med["pollfd"]["server_cpu_us_per_urb"]
        benchmark.extra_info[name] = {
            "pollfd": med["pollfd"],
            "thread": med["thread"],
            "thread_over_pollfd_urbs": ratio,
            "thread_over_pollfd_cpu": cpu_ratio,
        }
        p, t = med["pollfd"], med["thread"]
        lines.append(
            f"  {name:20s} pollfd {p['urbs_per_s']:9.0f} URB/s {p['server_cpu_us_per_urb']:7.0f} us CPU/URB"
            f" | thread {t['urbs_per_s']:9.0f} URB/s {t['server_cpu_us_per_urb']:7.0f} us CPU/URB"
            f" | thread/pollfd {ratio:.2f}x rate, {cpu_ratio:.2f}x CPU"
        )
    print("\n".join(lines))
    assert set(_results) == {c[0] for c in _cases(settings)}
