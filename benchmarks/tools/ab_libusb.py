"""A/B of our libusb export in one guest (not part of the benchmark run): our usbipd with one
environment setting against another, and the kernel's export, alternating round by round.

``python -m benchmarks.tools.ab_libusb [--rounds N] [--seconds S] [--var NAME] [--a 0] [--b 1]
[--no-kernel]`` boots the kernel-test guest and uses test_libusb_vs_kernel.py's setup (one
SourceSink gadget, the C loadgen, its sampler): every round runs every case against A (our
usbipd with ``NAME=a``), B (``NAME=b``) and the kernel's usbip-host, in a rotating order; prints
per-run figures, then medians and the B/A and X/kernel ratios per case. Default: the usbfs
regions for OUT data off (A) and on (B). The machine is shared and noisy: it is the alternation
within one guest that makes the comparison. (Used to measure a submit thread per device against
the in-line submit: it halved the throughput, README "libusb vs the kernel".)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from benchmarks import test_libusb_vs_kernel as lvk
from benchmarks.harness import KERNEL, OURS
from tests.kernel.harness import Guest

METRICS = ("urbs_per_s", "mb_per_s", "p50_us", "p99_us", "cpu_us_per_urb")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--var", default="USBIP_LIBUSB_NO_DEVMEM")
    ap.add_argument("--a", default="1")
    ap.add_argument("--b", default="")  # empty: unset as far as usbipd is concerned
    ap.add_argument("--no-kernel", action="store_true")
    ap.add_argument("--out", default=".benchmarks/ab_libusb.json")
    args = ap.parse_args(argv)
    s = {"seconds": args.seconds, "warmup": args.warmup}
    cases = lvk.CASES
    variants = [f"A:{args.var}={args.a}", f"B:{args.var}={args.b}"] + ([] if args.no_kernel else [KERNEL])
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {c.name: {v: [] for v in variants} for c in cases}
    if args.var not in lvk.OURS_ENV:
        lvk.OURS_ENV = (*lvk.OURS_ENV, args.var)
    g = Guest()
    g.start()
    print(g.run(f"{g.python} -c 'import usbip; print(usbip.__file__)'").out, flush=True)  # which tree the guest runs
    bench = lvk.Bench(g)
    try:
        os.environ[args.var] = args.a
        bench.setup()  # starts our usbipd ahead, with A's setting: A's first round uses it
        for n in range(args.rounds):
            order = variants[n % len(variants) :] + variants[: n % len(variants)]
            for v in order:
                t0 = time.monotonic()
                if v == KERNEL:
                    lvk.gadgets.kernel_export(g, bench.busid, lvk.KERNEL_PORT)
                    try:
                        res = lvk._measure(bench, KERNEL, 0, cases, s)
                    finally:
                        lvk.gadgets.kernel_unexport(g, bench.busid)
                else:
                    value = args.a if v.startswith("A:") else args.b
                    started, bench.ours_started = bench.ours_started, None
                    if started is not None and value != args.a:
                        lvk._ours_down(g, started[0])
                        started = None
                    os.environ[args.var] = value
                    pid, log = started or lvk._ours_start(g, bench.busid, bench.state)
                    try:
                        lvk._ours_wait(g, bench.busid, pid, log)
                        res = lvk._measure(bench, OURS, pid, cases, s)
                    finally:
                        lvk._ours_down(g, pid)
                for case, r in zip(cases, res, strict=True):
                    runs[case.name][v].append(r)
                    figs = ", ".join(f"{k}={r.get(k)}" for k in METRICS if r.get(k) is not None)
                    print(f"round {n} {v:<32} {case.name:<28} {figs}", flush=True)
                print(f"   ({time.monotonic() - t0:.0f} s)", flush=True)
    finally:
        bench.teardown()
        g.shutdown()
    summary = {}
    print("\nmedians (runs) and ratios")
    for case in cases:
        med = {v: {k: _median(runs[case.name][v], k) for k in METRICS} for v in variants}
        summary[case.name] = {"medians": med, "runs": runs[case.name]}
        a, b = med[variants[0]], med[variants[1]]
        k = med.get(KERNEL, {})
        print(f"{case.name}:")
        for m in METRICS:
            if a.get(m) is None and b.get(m) is None:
                continue
            line = f"  {m:<15} A {a.get(m)}  B {b.get(m)}"
            if a.get(m) and b.get(m) is not None:
                line += f"  B/A {b[m] / a[m]:.3f}"
            if k.get(m):
                line += f"  kernel {k[m]}  A/k {_ratio(a.get(m), k[m])}  B/k {_ratio(b.get(m), k[m])}"
            print(line)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"variants": variants, "settings": vars(args), "cases": summary}, f, indent=1)
    return 0


def _median(rs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rs if r.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


def _ratio(x: float | None, k: float) -> str:
    return "-" if x is None else f"{x / k:.3f}"


if __name__ == "__main__":
    sys.exit(main())
