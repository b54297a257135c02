"""PyUSB through the usbip.pyusb backend against our asyncio client, on the same server.

One usbipd (compiled, ``--virtual loopback``) on loopback; in this process, alternately, a PyUSB
program (``usb.core.find(backend=usbip.pyusb.get_backend(...))``) and our asyncio client
(``usbip.connect``). Cases:

* bulk IN 512 B on gadget zero's source (0x81): URB/s. PyUSB is synchronous, one URB at a time;
  the asyncio client runs it the same way (x1) and pipelined (x32, what the synchronous API
  gives up);
* control GET_DESCRIPTOR (device, 18 bytes): p50 and p99 latency, one at a time.

Each figure is the median of ``USBIP_BENCH_REPEATS`` interleaved runs of ``USBIP_BENCH_SECONDS``
(after ``USBIP_BENCH_WARMUP``); the figures and the PyUSB/asyncio ratios go to ``extra_info``
and the output. Nothing here asserts a speed. With ``--benchmark-disable`` each case runs once
for 0.3 s, to prove it works.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest

from .harness import OURS, ServerProc, run_settings

pytest.importorskip("usb")
import usb.core

import usbip
import usbip.pyusb
from usbip.client import RemoteDevice

BULK_IN = 0x81
SIZE = 512
INFLIGHT = 32
GZ = {"idVendor": 0x0525, "idProduct": 0xA4A0}


@pytest.fixture(scope="module")
def server():
    with ServerProc(OURS) as srv:
        yield srv


@pytest.fixture(scope="module")
def settings(request):
    quick = bool(request.config.getoption("benchmark_disable"))
    return run_settings(quick, warmup=0.3, quick_warmup=0.1)


# ---------------------------------------------------------------- PyUSB
def _timed_loop(op: Callable[[], Any], seconds: float, warmup: float) -> tuple[int, float, list[float]]:
    """Run ``op`` back to back: (calls, elapsed seconds, per-call latencies) of the measured window."""
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        op()
    lat: list[float] = []
    t0 = time.perf_counter()
    end = t0 + seconds
    now = t0
    while now < end:
        op()
        t = time.perf_counter()
        lat.append(t - now)
        now = t
    return len(lat), now - t0, lat


def pyusb_runs(server: ServerProc, seconds: float, warmup: float) -> dict[str, float]:
    with usbip.pyusb.get_backend(f"{server.host}:{server.port}") as be:
        dev = usb.core.find(backend=be, **GZ)
        assert dev is not None
        dev.set_configuration()
        n, elapsed, _ = _timed_loop(lambda: dev.read(BULK_IN, SIZE, timeout=5000), seconds, warmup)
        _, _, lat = _timed_loop(lambda: dev.ctrl_transfer(0x80, 6, 0x0100, 0, 18, timeout=5000), seconds, warmup)
        usb.util.dispose_resources(dev)
    return {"bulk_urbs_per_s": n / elapsed, **_percentiles(lat)}


# ---------------------------------------------------------------- the asyncio client
async def _bulk(dev: RemoteDevice, inflight: int, seconds: float, warmup: float) -> float:
    loop = asyncio.get_running_loop()
    window: deque[Any] = deque(dev.submit(BULK_IN, SIZE) for _ in range(inflight))
    t0 = loop.time() + warmup
    end = t0 + seconds
    n = 0
    while True:
        res = await window.popleft().wait(5.0)
        assert res.status == 0 and res.actual_length == SIZE
        now = loop.time()
        if now >= end:
            break
        if now >= t0:
            n += 1
        window.append(dev.submit(BULK_IN, SIZE))
    for urb in window:
        await urb.wait(5.0)
    return n / seconds


async def _control(dev: RemoteDevice, seconds: float, warmup: float) -> list[float]:
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        await dev.get_descriptor(1, 0, 18)
    lat: list[float] = []
    now = time.perf_counter()
    end = now + seconds
    while now < end:
        await dev.get_descriptor(1, 0, 18)
        t = time.perf_counter()
        lat.append(t - now)
        now = t
    return lat


def asyncio_runs(server: ServerProc, seconds: float, warmup: float) -> dict[str, float]:
    async def main() -> dict[str, float]:
        async with usbip.connect(server.host, server.port) as conn:
            dev = await conn.import_device(server.busid)
            x1 = await _bulk(dev, 1, seconds, warmup)
            xn = await _bulk(dev, INFLIGHT, seconds, warmup)
            lat = await _control(dev, seconds, warmup)
        return {"bulk_urbs_per_s": x1, f"bulk_x{INFLIGHT}_urbs_per_s": xn, **_percentiles(lat)}

    return asyncio.run(main())


def _percentiles(lat: list[float]) -> dict[str, float]:
    lat = sorted(lat)
    return {
        "ctrl_p50_us": lat[len(lat) // 2] * 1e6,
        "ctrl_p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6,
        "ctrl_calls": float(len(lat)),
    }


def test_pyusb_vs_asyncio(benchmark, server, settings):
    benchmark.group = "pyusb"
    runs: dict[str, list[dict[str, float]]] = {"pyusb": [], "asyncio": []}

    def run() -> None:
        for _ in range(int(settings["repeats"])):
            runs["pyusb"].append(pyusb_runs(server, settings["seconds"], settings["warmup"]))
            runs["asyncio"].append(asyncio_runs(server, settings["seconds"], settings["warmup"]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    med = {who: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for who, rs in runs.items()}
    p, a = med["pyusb"], med["asyncio"]
    ratios = {
        "bulk_pyusb_over_asyncio_x1": p["bulk_urbs_per_s"] / a["bulk_urbs_per_s"],
        f"bulk_pyusb_over_asyncio_x{INFLIGHT}": p["bulk_urbs_per_s"] / a[f"bulk_x{INFLIGHT}_urbs_per_s"],
        "ctrl_p50_pyusb_over_asyncio": p["ctrl_p50_us"] / a["ctrl_p50_us"],
    }
    benchmark.extra_info.update({"pyusb": p, "asyncio": a, **{k: round(v, 3) for k, v in ratios.items()}})
    quick = " (QUICK: not a measurement)" if settings["repeats"] == 1 and settings["seconds"] < 1 else ""
    print(
        f"\nPyUSB over usbip.pyusb vs the asyncio client, our usbipd on loopback{quick}:\n"
        f"  bulk-in {SIZE} B  PyUSB {p['bulk_urbs_per_s']:8.0f} URB/s | asyncio x1 {a['bulk_urbs_per_s']:8.0f}"
        f" | asyncio x{INFLIGHT} {a[f'bulk_x{INFLIGHT}_urbs_per_s']:8.0f}"
        f"  (PyUSB/x1 {ratios['bulk_pyusb_over_asyncio_x1']:.2f})\n"
        f"  GET_DESCRIPTOR  PyUSB p50 {p['ctrl_p50_us']:6.0f} us p99 {p['ctrl_p99_us']:6.0f} us"
        f" | asyncio p50 {a['ctrl_p50_us']:6.0f} us p99 {a['ctrl_p99_us']:6.0f} us"
        f"  (PyUSB/asyncio {ratios['ctrl_p50_pyusb_over_asyncio']:.2f})"
    )
    for who, m in med.items():  # it ran and moved data (no wall-clock assertion)
        assert m["bulk_urbs_per_s"] > 0 and m["ctrl_calls"] > 0, (who, m)
