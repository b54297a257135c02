"""Load generators against servers: one case, one run, the runs interleaved across servers and their medians."""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..tools.build import build
from .procs import ServerProc, cpu_delta, cpu_sample, stat_fields
from .settings import CLK_TCK, DEVICE, ISO_ALT, ISO_PACKETS, ISO_SIZE, PYTHON, REPO, SERVERS

# ---------------------------------------------------------------- load generators
IMPORT_SLACK = 0.04  # seconds from the connect to the end of the import (TLS: the handshake too)
END_MARGIN = 0.04  # our window closes this long before the generator's (its end sample needs the server's
# connection child, for the ceiling, still alive)


def _established(pid: int, port: int) -> bool:
    """Whether the network namespace of ``pid`` holds an established TCP connection on local ``port``
    (the server's end of a client's connection: /proc/PID/net/tcp{,6}, state 01)."""
    want = f":{port:04X}"
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f, None)
                for line in f:
                    fields = line.split(None, 4)
                    if len(fields) > 3 and fields[3] == "01" and fields[1].endswith(want):
                        return True
        except OSError:
            continue
    return False


def wait_connected(proc: subprocess.Popen[bytes], server: ServerProc, timeout: float = 30.0) -> tuple[float, float]:
    """When the load generator ``proc`` connected to ``server``, polled: (the last time it was not
    connected yet, the first time it was). Gives up when it exited or ``timeout`` passed. The
    previous run's connection is gone by then: its generator has exited."""
    before = time.monotonic()
    deadline = before + timeout
    while proc.poll() is None:
        now = time.monotonic()
        if _established(server.pid, server.port) or now >= deadline:
            return before, time.monotonic()
        before = now
        time.sleep(0.005)
    return before, time.monotonic()


@dataclass(frozen=True)
class Case:
    """One benchmark case. ``mode``: control, bulk-in, bulk-out, iso-in. ``client``: c or py."""

    mode: str
    size: int = 512
    inflight: int = 1
    client: str = "c"

    @property
    def name(self) -> str:
        prefix = "pyclient " if self.client == "py" else ""
        if self.mode == "control":
            return f"{prefix}control GET_DESCRIPTOR x{self.inflight}"
        if self.mode == "iso-in":
            return f"{prefix}iso-in {ISO_PACKETS} x {fmt_size(ISO_SIZE)} packets x{self.inflight}"
        return f"{prefix}{self.mode} {fmt_size(self.size)} x{self.inflight}"

    @property
    def metric(self) -> str:
        """The headline figure of the case: p50_us for latency, mb_per_s for big transfers, else urbs_per_s."""
        if self.mode == "control":
            return "p50_us"
        if self.mode == "iso-in" or self.size >= 16384:
            return "mb_per_s"
        return "urbs_per_s"

    @property
    def extra_metrics(self) -> tuple[str, ...]:
        """Figures reported in rows of their own after the headline: iso's URB rate besides its MB/s."""
        return ("urbs_per_s",) if self.mode == "iso-in" else ()


def fmt_size(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10} KiB"
    return f"{n} B"


def load_command(case: Case, server: ServerProc, seconds: float, warmup: float, host: str | None = None) -> list[str]:
    dev = DEVICE[server.kind]
    host = host or server.host
    if case.client == "py":
        cmd = [PYTHON, "-m", "usbip.client.bench", "--host", host, "--port", str(server.port), "--busid", server.busid]
        cmd += server.client_args
    elif server.client_args:
        raise ValueError(f"the C loadgen cannot talk to {server.key} (needs {' '.join(server.client_args)})")
    else:
        cmd = [str(build("loadgen")), "--host", host, "--port", str(server.port), "--busid", server.busid]
    cmd += ["--mode", case.mode, "--inflight", str(case.inflight)]
    cmd += ["--seconds", f"{seconds:g}", "--warmup", f"{warmup:g}"]
    if case.mode == "bulk-in":
        cmd += ["--ep", str(dev["bulk_in"]), "--size", str(case.size)]
    elif case.mode == "bulk-out":
        cmd += ["--ep", str(dev["bulk_out"]), "--size", str(case.size)]
    elif case.mode == "iso-in":
        cmd += ["--ep", str(dev["iso_in"]), "--size", str(dev["iso_size"]), "--iso-packets", str(ISO_PACKETS)]
        cmd += ["--set-alt", ISO_ALT]
    return cmd


def run_load(
    case: Case,
    server: ServerProc,
    seconds: float,
    warmup: float,
    prefix: Sequence[str] = (),
    host: str | None = None,
) -> dict[str, Any]:
    """One run: the generator's JSON plus ``server_cpu_s`` and ``cpu_us_per_urb`` / ``cpu_s_per_gb``.

    The server's CPU time is sampled at the start and the end of the generator's
    measured window (by our clock, from the moment the generator's connection shows
    up at the server: our Python client takes a good part of a second to start, the C
    one a few ms; the import after the connect takes a few ms), then scaled by the
    generator's own rates, so start-up, warm-up and drain do not count.
    The generator's own CPU is sampled alike (``client_cpu_frac``, ``client_cpu_us_per_urb``):
    it tells which side a run was bound by.
    """
    cmd = [*prefix, *load_command(case, server, seconds, warmup, host)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO))
    cpu0 = cpu1 = ccpu0 = ccpu1 = None
    try:
        # the connect happened between not_yet and seen: start after the latest, end before the earliest
        # possible end of the generator's window (its clock starts after the connect and the import)
        not_yet, seen = wait_connected(proc, server)
        time.sleep(max(0.0, seen + warmup + IMPORT_SLACK - time.monotonic()))
        ta = time.monotonic()
        cpu0 = cpu_sample(server.pid)
        ccpu0 = stat_fields(proc.pid)
        time.sleep(max(0.0, not_yet + warmup + seconds - END_MARGIN - time.monotonic()))
        cpu1 = cpu_sample(server.pid)
        ccpu1 = stat_fields(proc.pid)
        tb = time.monotonic()
        out, err = proc.communicate(timeout=seconds + warmup + 60)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        server.drain_output()
    text = out.decode(errors="replace").strip()
    try:
        res: dict[str, Any] = json.loads(text.splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode} without JSON: {err.decode(errors='replace').strip()}"
        ) from None
    res["rc"] = proc.returncode
    if proc.returncode != 0:
        res["stderr"] = err.decode(errors="replace").strip()[-500:]
    window = tb - ta
    cpu = cpu_delta(cpu0, cpu1) if cpu0 is not None and cpu1 is not None else 0.0
    res["server_cpu_s"] = round(cpu, 4)
    res["server_cpu_frac"] = round(cpu / window, 3) if window > 0 else None
    urbs = res.get("urbs_per_s", 0) * window
    gb = res.get("mb_per_s", 0) * window / 1000.0
    # CPU per URB (us) == CPU seconds per million URBs
    res["cpu_us_per_urb"] = round(cpu / urbs * 1e6, 3) if urbs > 0 else None
    res["cpu_s_per_gb"] = round(cpu / gb, 3) if gb > 0.001 else None
    if ccpu0 is not None and ccpu1 is not None and window > 0:
        # the generator's pid: utime + stime (``ip netns exec`` execs it, so the pid is the same)
        ccpu = (int(ccpu1[11]) + int(ccpu1[12]) - int(ccpu0[11]) - int(ccpu0[12])) / CLK_TCK
        res["client_cpu_frac"] = round(ccpu / window, 3)
        res["client_cpu_us_per_urb"] = round(ccpu / urbs * 1e6, 3) if urbs > 0 else None
    return res


METRICS = (
    "urbs_per_s",
    "mb_per_s",
    "p50_us",
    "p99_us",
    "cpu_us_per_urb",
    "cpu_s_per_gb",
    "server_cpu_frac",
    "client_cpu_us_per_urb",
    "client_cpu_frac",
)


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


@dataclass
class CaseResult:
    case: Case
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def medians(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for srv, runs in self.runs.items():
            m: dict[str, Any] = {k: median_of(runs, k) for k in METRICS}
            m["errors"] = sum(int(r.get("errors", 0) or 0) for r in runs)
            m["runs"] = len(runs)
            out[srv] = m
        return out

    def to_json(self) -> dict[str, Any]:
        med = self.medians()
        metric = self.case.metric
        return {
            "case": self.case.name,
            "mode": self.case.mode,
            "size": self.case.size,
            "inflight": self.case.inflight,
            "client": self.case.client,
            "metric": metric,
            "medians": med,
            "ratios": server_ratios(med, metric),
            "extra_metrics": {m: server_ratios(med, m) for m in self.case.extra_metrics},
            "runs": self.runs,
        }


def server_ratios(med: dict[str, dict[str, Any]], metric: str) -> dict[str, float]:
    """ours/ceiling and ours/pure of ``metric`` from the per-server medians (where both are there)."""
    ratios = {}
    c, o, p = (med.get(s, {}).get(metric) for s in SERVERS)
    if o and c:
        ratios["ours_over_ceiling"] = round(o / c, 3)
    if o and p:
        ratios["ours_over_pure"] = round(o / p, 3)
    return ratios


def interleaved(
    case: Case,
    servers: Sequence[ServerProc],
    repeats: int,
    seconds: float,
    warmup: float,
    prefix: Sequence[str] = (),
    host: str | None = None,
    alternate: bool = False,
) -> CaseResult:
    """``repeats`` rounds, each running the case once against every server in turn
    (in reverse order every other round with ``alternate``: A B, B A, A B, ...)."""
    result = CaseResult(case)
    for n in range(repeats):
        for srv in reversed(servers) if alternate and n % 2 else servers:
            if not srv.alive():
                raise RuntimeError(f"{srv.key} server died: {srv.banner.decode(errors='replace')[-500:]}")
            result.runs.setdefault(srv.key, []).append(run_load(case, srv, seconds, warmup, prefix, host))
    return result


@contextlib.contextmanager
def started_servers(kinds: Sequence[str | ServerProc], **kw: Any) -> Iterator[list[ServerProc]]:
    """Start one server of each kind (in order; or the ServerProc given) and stop them all, whatever happens."""
    started: list[ServerProc] = []
    try:
        for kind in kinds:
            started.append((kind if isinstance(kind, ServerProc) else ServerProc(kind, **kw)).start())
        yield started
    finally:
        for srv in reversed(started):
            srv.stop()
