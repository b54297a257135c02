"""Profile our libusb export under load, in the kernel-test guest (not part of the benchmark run).

``python -m benchmarks.tools.profile_libusb --py-spy PATH [--seconds S] [CASE ...]`` boots a guest,
exports one SourceSink gadget (pattern 0) through our usbipd (``--libusb-events pollfd``, no
debug logging: what benchmarks/test_libusb_vs_kernel.py measures), runs the C loadgen's cases
against it from inside the guest and samples usbipd with py-spy (``record --format raw``, folded
stacks) meanwhile. Writes one folded-stack file per case to ``--out`` (default
``.benchmarks/profile``) and prints the top functions by own and by inclusive samples.

CASE: ``mode:size:inflight`` (default ``bulk-in:512:32 bulk-in:16384:8 bulk-out:16384:8 control:18:1``).
py-spy: a static binary (``pip download py-spy``, the wheel's ``*.data/scripts/py-spy``); the guest
sees the host's files at the same paths.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import shlex
import sys
import time

from tests.kernel import gadgets
from tests.kernel.harness import Guest
from usbip.backends.state import BindState, make_rule

from .build import build

PORT = 3241
EP = {"bulk-in": 1, "bulk-out": 2, "control": 0}
DEFAULT_CASES = ["bulk-in:512:32", "bulk-in:16384:8", "bulk-out:16384:8", "control:18:1"]


def summarize(folded: str, top: int = 25) -> str:
    """Own and inclusive sample counts per function from py-spy's folded stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    out = [f"{total} samples", "-- own --"]
    out += [f"{100 * n / max(total, 1):5.1f}% {f}" for f, n in own.most_common(top)]
    out += ["-- inclusive --"]
    out += [f"{100 * n / max(total, 1):5.1f}% {f}" for f, n in incl.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--py-spy", required=True, help="the py-spy binary (host path, seen by the guest)")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rate", type=int, default=97, help="py-spy samples per second")
    ap.add_argument("--out", default=".benchmarks/profile")
    ap.add_argument(
        "--native",
        action="store_true",
        help="py-spy --native (C frames too; py-spy then stops usbipd for each sample: no --nonblocking)",
    )
    ap.add_argument("cases", nargs="*", default=DEFAULT_CASES)
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loadgen = str(build("loadgen"))
    g = Guest()
    g.start()
    try:
        gadgets.reset(g)
        busid = gadgets.sourcesink(g, pattern=0)
        sdir = g.share_dir / "profile"
        sdir.mkdir(parents=True, exist_ok=True)
        state = BindState(str(sdir / "exported.json"))
        state.add(make_rule(busid=busid))
        state.save()
        pid, logf = g.start_background(
            f"exec {g.python} -m usbip.cli.usbipd_main --host 127.0.0.1 -t {PORT} "
            f"--state-file {g.guest_path(sdir / 'exported.json')} --libusb-events pollfd "
            "--rescan-interval 5 --no-announce"
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and f"exporting {busid}:".encode() not in g.read_file(logf):
            time.sleep(0.5)
        print(g.run(f"grep -m1 usbip {logf}; head -c 300 {logf}").out)
        for spec in args.cases:
            mode, size, inflight = spec.split(":")
            warm = 1.0
            cmd = [loadgen, "--host", "127.0.0.1", "--port", str(PORT), "--busid", busid, "--mode", mode]
            cmd += ["--ep", str(EP[mode]), "--size", size, "--inflight", inflight, "--seconds", f"{args.seconds + 1:g}"]
            cmd += ["--warmup", f"{warm:g}", "--set-config", "1", "--out-byte", "0"]
            name = spec.replace(":", "-")
            raw = g.guest_path(sdir / f"{name}.folded")
            spy = [args.py_spy, "record", "--pid", str(pid), "--duration", f"{args.seconds:g}"]
            spy += ["--rate", str(args.rate)]
            # py-spy refuses --native with --nonblocking ("Can't get native stack traces"): no samples at all
            spy += ["--format", "raw", "--output", raw] + (["--native"] if args.native else ["--nonblocking"])
            script = (
                f"{shlex.join(cmd)} > {g.guest_path(sdir / (name + '.json'))} 2>&1 & LG=$!; "
                f"sleep {warm + 1.5:g}; {shlex.join(spy)} > /dev/null 2>&1; wait $LG; "
                f"tail -1 {g.guest_path(sdir / (name + '.json'))}"
            )
            r = g.run(script, timeout=args.seconds * 4 + 120)
            print(f"== {spec}: {r.out.strip()}", flush=True)
            folded = (sdir / f"{name}.folded").read_text() if (sdir / f"{name}.folded").exists() else ""
            (out / f"{name}.folded").write_text(folded)
            summary = summarize(folded)
            (out / f"{name}.txt").write_text(r.out + "\n" + summary + "\n")
            print(summary, flush=True)
        g.run(f"kill {pid}; true")
    finally:
        g.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
