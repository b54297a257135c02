"""Our libusb export against the kernel's: usbipd exporting a real USB device through libusb
(``--libusb-events pollfd``) against usbip-host (the kernel's stub driver) + Debian's usbipd.

The host has no USB devices, so this runs in the kernel-test QEMU guest (the session's shared
guest of tests/kernel when that one is up, else one of its own): ONE SourceSink gadget (pattern 0)
on dummy_hcd, exported in turn by (a) ``usbip bind`` to usbip-host, Debian's usbipd listening, and
(b) our usbipd with a bind rule for it in its state file. The client is the C loadgen
(benchmarks/tools/loadgen.c, built on the host, run in the guest over 127.0.0.1, sending
SET_CONFIGURATION(1) first: usbip-host exports the device unconfigured; OUT payload all zeros,
what a pattern-0 sink accepts). The exporters alternate (ours, kernel, kernel, ours, ...), every
case per round, each exporter alone (our usbipd runs only in its rounds); medians over rounds,
ours/kernel ratios.

Cases: bulk IN 512 B x32 (URB/s), bulk IN and OUT 16 KiB x8 (MB/s), control GET_DESCRIPTOR x1
(p50/p99 latency). Server CPU per URB: utime+stime over the measured window of the usbipd
process (ours) or of the stub's ``stub_rx``/``stub_tx`` kthreads (kernel), from /proc/PID/stat,
divided by the URBs completed in that window (loadgen's rate x window). A sampler in the guest
(SAMPLER, one process for the whole module: every Python start costs seconds under TCG) runs the
loadgens and reads /proc. Under TCG the absolute figures mean little: the ratio between the
exporters in one guest is the measurement. The table lands in the session summary and in
``.benchmarks/latest.json`` ("libusb_vs_kernel").

Environment: USBIP_BENCH_SECONDS (default 3 here), USBIP_BENCH_ROUNDS (default 3),
USBIP_BENCH_WARMUP (default 0.5); USBIP_LIBUSB_NO_DEVMEM and USBIP_NO_EXTENSIONS, when set, reach
our usbipd (A/B runs). With ``--benchmark-disable`` (the smoke): one round of 0.8 s, two cases,
the kernel's runs while our usbipd is still starting (not a measurement).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

from tests.kernel import gadgets
from tests.kernel.harness import Guest
from usbip.backends.state import BindState, make_rule

from .harness import KERNEL, OURS, Case, CaseResult, build, env_float, env_int, lvk_doc

#: passed on to our usbipd in the guest when set here (A/B runs: USBIP_LIBUSB_NO_DEVMEM=1 turns the
#: usbfs regions for OUT data off)
OURS_ENV = ("USBIP_LIBUSB_NO_DEVMEM", "USBIP_NO_EXTENSIONS")
#: Debian's usbipd (kernel export) and ours listen on different ports: Debian's stays up all along
KERNEL_PORT = 3240
OUR_PORT = 3241
#: SourceSink on dummy_hcd: bulk IN 0x81, bulk OUT 0x02
EP = {"bulk-in": 1, "bulk-out": 2, "control": 0}
CASES = [
    Case("bulk-in", 512, 32),
    Case("bulk-in", 16384, 8),
    Case("bulk-out", 16384, 8),
    Case("control", 18, 1),
]
QUICK_CASES = [Case("bulk-in", 512, 32), Case("bulk-out", 16384, 8)]
#: the loadgen's window opens after its import + SET_CONFIGURATION + warm-up; the CPU samples are taken
#: SLACK after the connection + warm-up and MARGIN before the window's end (a slower import only moves
#: the first sample into the warm-up, when the URBs already flow)
SLACK = 0.15
MARGIN = 0.1
#: shorter sampled windows (the sampler woke late) give no CPU figure: CPU times come in 10 ms ticks
MIN_WINDOW = 0.15
#: an unrecorded short control run first in each round: a fresh usbipd's first import loads code
#: (seconds under TCG) that would eat into the first case's warm-up
PRIME = {"seconds": 0.2, "warmup": 0.1}

#: The sampler, in the guest: ``python -I -S sampler.py DIR`` takes DIR/job-N.json (a round: the
#: loadgen argv of each case, the exporter), runs every case in turn with the loadgen as a child,
#: samples the server's CPU (utime + stime, /proc/PID/stat) SLACK after the loadgen's window can
#: have opened (its connection seen on the server's port + warm-up) and MARGIN before it closes,
#: and writes DIR/result-N.json (one object per case). Process starts are slow under TCG: timing
#: from the connection, not from the start. The stub's kthreads exist from the import on.
SAMPLER = r"""
import json, os, subprocess, sys, time

JOBS = sys.argv[1]
HZ = os.sysconf("SC_CLK_TCK")
now = time.monotonic
try:  # wake up on time in a busy guest (it sleeps nearly all along); the loadgens run as usual
    os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(10))
except (AttributeError, OSError):
    pass


def established(port):
    want = ":%04X" % port
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f, None)
                for line in f:
                    x = line.split()
                    if len(x) > 3 and x[3] == "01" and x[1].endswith(want):
                        return True
        except OSError:
            pass
    return False


def kthreads():
    try:  # kthreadd's children: a short list (a scan of /proc is slow under TCG)
        with open("/proc/2/task/2/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def stub_threads():
    out = []
    for p in kthreads():
        try:
            with open("/proc/%d/comm" % p) as f:
                if f.read().strip() in ("stub_rx", "stub_tx"):
                    out.append(p)
        except OSError:
            pass
    return out


def ticks(pids):
    out = {}
    for p in pids:
        try:
            with open("/proc/%d/stat" % p) as f:
                x = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[p] = int(x[11]) + int(x[12])
    return out


def available(busid, timeout):
    end = now() + timeout
    while now() < end:
        with open("/sys/bus/usb/devices/%s/usbip_status" % busid) as f:
            if f.read().strip() == "1":
                return True
        time.sleep(0.02)
    return False


def run_case(cfg, case):
    res = {"case": case["name"]}
    if cfg["kernel"] and not available(cfg["busid"], 30):
        res["fail"] = "usbip-host did not make the device available again (usbip_status != 1)"
        return res
    proc = subprocess.Popen(case["cmd"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = None
    deadline = now() + 60
    while proc.poll() is None and now() < deadline:
        if established(cfg["port"]):
            seen = now()
            break
        time.sleep(0.005)
    c0 = c1 = l0 = l1 = None
    if seen is not None:
        pids = [cfg["pid"]]
        while cfg["kernel"] and proc.poll() is None and now() < deadline:
            pids = stub_threads()  # before the window
            if len(pids) >= 2:
                break
            time.sleep(0.01)
        time.sleep(max(0.0, seen + case["warmup"] + cfg["slack"] - now()))
        ta = now()
        c0, l0 = ticks(pids), ticks([proc.pid])
        time.sleep(max(0.0, seen + case["warmup"] + case["seconds"] - cfg["margin"] - now()))
        c1, l1 = ticks(pids), ticks([proc.pid])
        tb = now()
        res["late"] = proc.poll() is not None  # the loadgen already done: the window overshot
    try:
        out, err = proc.communicate(timeout=case["seconds"] + case["warmup"] + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    res["rc"] = proc.returncode
    res["stderr"] = err.decode(errors="replace")[-500:]
    try:
        res["loadgen"] = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        res["loadgen"] = None
    if c0 is not None and c1 is not None:
        # threads alive at both samples (the stub's pair, usbipd)
        res["window_s"] = tb - ta
        res["server_threads"] = len([p for p in c1 if p in c0])
        res["server_cpu_s"] = sum(t - c0[p] for p, t in c1.items() if p in c0) / HZ
        res["client_cpu_s"] = sum(t - l0[p] for p, t in l1.items() if p in l0) / HZ
    return res


idle_until = now() + 1800
while now() < idle_until and not os.path.exists(os.path.join(JOBS, "stop")):
    jobs = sorted(n for n in os.listdir(JOBS) if n.startswith("job-") and n.endswith(".json"))
    if not jobs:
        time.sleep(0.05)
        continue
    path = os.path.join(JOBS, jobs[0])
    with open(path) as f:
        cfg = json.load(f)
    os.unlink(path)
    results = [run_case(cfg, case) for case in cfg["cases"]]
    out = os.path.join(JOBS, "result-" + jobs[0][4:])
    with open(out + ".tmp", "w") as f:
        json.dump(results, f)
    os.rename(out + ".tmp", out)
    idle_until = now() + 1800
"""


class Bench:
    """The module's setup in the guest: the gadget, our state file, the sampler, Debian's usbipd."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.loadgen = str(build("loadgen"))
        self.dir = guest.share_dir / "libusb-vs-kernel"
        self.busid = ""
        self.state = ""
        self.sampler_pid = 0
        self.sampler_log = ""
        self.jobs = 0
        #: our usbipd started ahead (during the setup) for the first round: (pid, log)
        self.ours_started: tuple[int, str] | None = None

    def setup(self) -> None:
        g = self.guest
        gadgets.reset(g)
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.iterdir():
            old.unlink()
        (self.dir / "sampler.py").write_text(SAMPLER)
        self.sampler_pid, self.sampler_log = g.start_background(
            f"exec {g.python} -I -S {g.guest_path(self.dir / 'sampler.py')} {g.guest_path(self.dir)}"
        )
        self.busid = gadgets.sourcesink(g, pattern=0)
        # what `usbip bind --state-file` writes (read by usbipd only): written here, no CLI start in the guest
        state = BindState(str(self.dir / "exported.json"))
        state.add(make_rule(busid=self.busid))
        state.save()
        self.state = g.guest_path(self.dir / "exported.json")
        self.ours_started = _ours_start(g, self.busid, self.state)  # its imports take a while under TCG
        gadgets.start_usbipd(g, KERNEL_PORT)

    def teardown(self) -> None:
        g = self.guest
        if not g.alive:
            return
        if self.ours_started is not None:
            _ours_down(g, self.ours_started[0])
        (self.dir / "stop").touch()
        if self.sampler_pid:
            g.run(f"kill {self.sampler_pid} 2>/dev/null; true")
        gadgets.reset(g)

    def measure(self, cfg: dict[str, Any], timeout: float) -> tuple[list[dict[str, Any]], str]:
        """Hand one round to the sampler and wait for its results (and the sampler's log on failure)."""
        self.jobs += 1
        name = f"{self.jobs:04d}.json"
        tmp = self.dir / f"tmp-{name}"
        tmp.write_text(json.dumps(cfg))
        tmp.replace(self.dir / f"job-{name}")
        result = self.dir / f"result-{name}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not result.exists():
            if not self.guest.alive:
                break
            time.sleep(0.1)
        if not result.exists():
            state = f"kill -0 {self.sampler_pid} 2>/dev/null && echo sampler alive || echo sampler gone"
            return [], self.guest.run(f"{state}; tail -20 {self.sampler_log}").out
        return json.loads(result.read_text()), ""


@pytest.fixture(scope="module")
def bench(guest):
    b = Bench(guest)
    try:
        b.setup()
        yield b
    finally:
        b.teardown()


@pytest.fixture(scope="module")
def settings(request, e2e_reporter) -> dict[str, Any]:
    quick = bool(request.config.getoption("benchmark_disable"))
    s = {
        "seconds": 0.8 if quick else env_float("USBIP_BENCH_SECONDS", 3.0),
        "warmup": 0.3 if quick else env_float("USBIP_BENCH_WARMUP", 0.5),
        "rounds": 1 if quick else env_int("USBIP_BENCH_ROUNDS", 3),
        "cases": [c.name for c in (QUICK_CASES if quick else CASES)],
        # a measurement starts with ours (its usbipd, started during the setup, is up before any run);
        # the smoke with the kernel, while our usbipd still starts (Python imports: ~20 s under TCG)
        "first": [KERNEL, OURS] if quick else [OURS, KERNEL],
    }
    e2e_reporter.settings["libusb_vs_kernel"] = {**s, "quick": quick}
    return s


# ---------------------------------------------------------------- exporters
def _ours_start(guest: Guest, busid: str, state: str) -> tuple[int, str]:
    gadgets.unbind_interface_drivers(guest, busid)  # usbtest, if an earlier test loaded it
    return guest.start_background(
        f"exec {guest.python} -m usbip.cli.usbipd_main --host 127.0.0.1 -t {OUR_PORT} --state-file {state} "
        "--libusb-events pollfd --rescan-interval 5 --no-announce",
        env={k: os.environ[k] for k in OURS_ENV if k in os.environ},
    )


def _ours_wait(guest: Guest, busid: str, pid: int, log: str) -> None:
    # its log, read through the agent (every process started in the guest costs ~0.2 s under TCG)
    deadline = time.monotonic() + 120
    text = b""
    while time.monotonic() < deadline and f"exporting {busid}:".encode() not in text:
        time.sleep(0.3)
        text = guest.read_file(log)
    listed = f"{gadgets.USBIP} --tcp-port {OUR_PORT} list -r 127.0.0.1 2>/dev/null | grep -q ' {busid}:'"
    r = guest.run(gadgets.poll_sh(listed, 30), timeout=60)
    assert r.rc == 0, "our usbipd does not list the gadget:\n" + guest.run(f"cat {log}").out


def _ours_down(guest: Guest, pid: int) -> None:
    gone = f"! [ -d /proc/{pid} ] || grep -q '^State:.*Z' /proc/{pid}/status"
    r = guest.run(f"kill -- -{pid}; " + gadgets.poll_sh(gone, 20), timeout=60)
    if r.rc != 0:
        guest.run(f"kill -9 -- -{pid}", timeout=30)


# ---------------------------------------------------------------- the runs of one round
def _cmd(loadgen: str, case: Case, busid: str, port: int, s: dict[str, Any]) -> list[str]:
    """The loadgen's argv: SET_CONFIGURATION(1) first (usbip-host exports the device unconfigured),
    OUT payload zeros (what a pattern-0 sink accepts)."""
    cmd = [loadgen, "--host", "127.0.0.1", "--port", str(port), "--busid", busid, "--mode", case.mode]
    cmd += ["--ep", str(EP[case.mode]), "--size", str(case.size), "--inflight", str(case.inflight)]
    cmd += ["--seconds", f"{s['seconds']:g}", "--warmup", f"{s['warmup']:g}", "--set-config", "1", "--out-byte", "0"]
    return cmd


def _result(doc: dict[str, Any]) -> dict[str, Any]:
    """The loadgen's JSON plus server CPU per URB (URBs in the sampled window: the loadgen's rate x window)."""
    res = dict(doc["loadgen"])
    window = doc["window_s"]
    urbs = res.get("urbs_per_s", 0) * window
    res["window_s"] = round(window, 3)
    res["server_threads"] = doc["server_threads"]
    res["server_cpu_s"] = round(doc["server_cpu_s"], 4)
    # a sampler woken too late (a loaded host: the guest's vCPUs wait their turn) leaves too short a
    # window for clock-tick CPU times, or one reaching past the loadgen's: no CPU figure then
    if window >= MIN_WINDOW and not doc.get("late") and urbs > 0:
        res["server_cpu_frac"] = round(doc["server_cpu_s"] / window, 3)
        res["cpu_us_per_urb"] = round(doc["server_cpu_s"] / urbs * 1e6, 3)
        res["client_cpu_frac"] = round(doc["client_cpu_s"] / window, 3)
    return res


def _measure(bench: Bench, exporter: str, pid: int, cases: list[Case], s: dict) -> list[dict[str, Any]]:
    """Every case once against the exporter that is up; returns the results in order (fails on any error)."""
    kernel = exporter == KERNEL
    port = KERNEL_PORT if kernel else OUR_PORT
    jobs = [("prime", Case("control", 18, 1), PRIME)] + [(c.name, c, s) for c in cases]
    cfg = {
        "cases": [
            {"name": n, "cmd": _cmd(bench.loadgen, c, bench.busid, port, t), **{k: t[k] for k in ("seconds", "warmup")}}
            for n, c, t in jobs
        ],
        "kernel": kernel,
        "busid": bench.busid,
        "port": port,
        "pid": pid,
        "slack": SLACK,
        "margin": MARGIN,
    }
    docs, trouble = bench.measure(cfg, timeout=60 + (s["seconds"] + s["warmup"] + 60) * len(jobs))
    out = []
    for case in cases:
        doc = next((d for d in docs if d.get("case") == case.name), None)
        lg = (doc or {}).get("loadgen") or {}
        ok = doc is not None and not doc.get("fail") and doc.get("rc") == 0 and "window_s" in doc
        ok = ok and lg.get("errors") == 0 and lg.get("urbs", 0) > 0
        # the kernel: both of the stub's threads sampled
        ok = ok and (not kernel or doc["server_threads"] == 2)
        assert ok, (
            f"{case.name}, {exporter}: {doc}\n{trouble}\n--- dmesg ---\n" + bench.guest.run("dmesg | tail -20").out
        )
        out.append(_result(doc))
    return out


def _round(bench: Bench, exporter: str, cases: list[Case], s: dict, results: dict, spent: dict) -> None:
    """Export the device by ``exporter``, run every case, take the export down; ``spent``: seconds per phase."""
    g = bench.guest
    t0 = time.monotonic()
    if exporter == KERNEL:
        gadgets.kernel_export(g, bench.busid, KERNEL_PORT)
        t1 = time.monotonic()
        try:
            runs = _measure(bench, KERNEL, 0, cases, s)
        finally:
            t2 = time.monotonic()
            gadgets.kernel_unexport(g, bench.busid)
    else:
        started, bench.ours_started = bench.ours_started, None
        pid, log = started or _ours_start(g, bench.busid, bench.state)
        try:
            _ours_wait(g, bench.busid, pid, log)
            t1 = time.monotonic()
            try:
                runs = _measure(bench, OURS, pid, cases, s)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n--- our usbipd ---\n" + g.run(f"tail -30 {log}").out) from None
        finally:
            t2 = time.monotonic()
            _ours_down(g, pid)
    for case, res in zip(cases, runs, strict=True):
        results[case.name].runs.setdefault(exporter, []).append(res)
    for phase, secs in ((f"{exporter} up", t1 - t0), ("runs", t2 - t1), (f"{exporter} down", time.monotonic() - t2)):
        spent[phase] = spent.get(phase, 0.0) + secs


def test_libusb_vs_kernel(benchmark, bench, settings, e2e_reporter):
    """Our export and the kernel's alternating, every case per round; medians and ratios to the reporter."""
    benchmark.group = "libusb vs usbip-host"
    cases = [c for c in CASES if c.name in settings["cases"]]
    results = {c.name: CaseResult(c) for c in cases}
    spent: dict[str, float] = {}

    def run() -> None:
        for n in range(int(settings["rounds"])):
            for exporter in settings["first"] if n % 2 == 0 else settings["first"][::-1]:
                _round(bench, exporter, cases, settings, results, spent)

    t0 = time.monotonic()
    benchmark.pedantic(run, rounds=1, iterations=1)
    wall = time.monotonic() - t0
    docs = [lvk_doc(results[c.name], rounds=settings["rounds"], seconds=settings["seconds"]) for c in cases]
    e2e_reporter.libusb_vs_kernel.extend(docs)
    benchmark.extra_info["wall_s"] = round(wall, 1)
    benchmark.extra_info["phases_s"] = {k: round(v, 1) for k, v in spent.items()}
    for d in docs:
        benchmark.extra_info[d["case"]] = {"ratios": d["ratios"], "medians": d["medians"]}
    print(f"\nlibusb vs usbip-host: {wall:.0f} s, " + ", ".join(f"{k} {v:.0f} s" for k, v in spent.items()))
