"""Shared machinery of the end-to-end benchmarks (test_e2e.py, test_gigabit.py, test_tls.py, report.py).

* :class:`ServerProc` starts a USB/IP server (the C ceiling, our usbipd compiled or pure)
  on a free port, learns the port from its banner and stops it cleanly.
* :func:`run_load` runs one load generator (the C ``loadgen`` or our client's
  ``python3 -m usbip.bench``) against one server and samples the server's CPU time
  (utime + stime of the server and its children, from /proc) over the measured window.
* :func:`interleaved` runs a case against several servers in turn (A, B, C, A, B, C, ...)
  and keeps the medians, so that the machine's background load hits every server alike.
* :func:`netns_link` builds the emulated gigabit link (two network namespaces, a shaped veth pair).
* :func:`tls_doc` / :func:`tls_rows`: our usbipd plain against the same usbipd serving TLS.

No wall-clock figure is ever asserted; only the medians' ratios are reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .tools.build import BuildError, build

BENCH_DIR = pathlib.Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

__all__ = ["BuildError", "build"]  # re-exported for the tests

CLK_TCK = os.sysconf("SC_CLK_TCK")
PYTHON = sys.executable

CEILING = "ceiling"
OURS = "ours"
PURE = "ours-pure"
SERVERS = (CEILING, OURS, PURE)

# iso IN: URBs of ISO_PACKETS packets of ISO_SIZE bytes on every server (the loopback's iso maxp;
# the ceiling's iso endpoint has the same wMaxPacketSize), so the servers move the same packets
ISO_PACKETS = 8
ISO_SIZE = 1024
# what each server exports: busid, bulk IN ep, bulk OUT ep, iso IN ep, iso packet size
DEVICE = {
    CEILING: {"busid": "1-1", "bulk_in": 1, "bulk_out": 1, "iso_in": 2, "iso_size": ISO_SIZE},
    OURS: {"busid": "100-1", "bulk_in": 1, "bulk_out": 1, "iso_in": 3, "iso_size": ISO_SIZE},
    PURE: {"busid": "100-1", "bulk_in": 1, "bulk_out": 1, "iso_in": 3, "iso_size": ISO_SIZE},
}
ISO_ALT = "0:1"  # gadget zero's iso endpoints live in alt setting 1 (the ceiling accepts any SET_INTERFACE)

_PORT_RE = {
    CEILING: re.compile(rb"listening on \S+ port (\d+)"),
    OURS: re.compile(rb"listening on \S+:(\d+)"),
}


def env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, "") or default)
    except ValueError:
        return default


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "no", "false")


def run_settings(quick: bool, warmup: float, quick_warmup: float) -> dict[str, float]:
    """Seconds, repeats and warm-up of each loadgen run (env overrides; a short pass when quick)."""
    return {
        "seconds": 0.3 if quick else env_float("USBIP_BENCH_SECONDS", 1.5),
        "repeats": 1 if quick else env_int("USBIP_BENCH_REPEATS", 3),
        "warmup": quick_warmup if quick else env_float("USBIP_BENCH_WARMUP", warmup),
    }


# ---------------------------------------------------------------- CPU accounting
def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # the comm field may contain spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _stat_fields(int(entry))
        if f is not None and int(f[1]) == pid:  # fields[1] is ppid (field 4 of stat)
            out.append(int(entry))
    return out


def cpu_sample(pid: int) -> dict[int, int]:
    """{pid: utime + stime in clock ticks (all threads)} for ``pid`` and its live children.

    The ceiling forks one child per connection, so its children count; they are
    sampled while the connection is alive (inside the measured window).
    """
    out = {}
    for p in [pid, *_children(pid)]:
        f = _stat_fields(p)
        if f is not None:
            out[p] = int(f[11]) + int(f[12])  # utime, stime (fields 14 and 15 of stat)
    return out


def cpu_delta(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds spent between two samples by the processes alive at the second one
    (a process born in between counts from zero; one gone since, such as the child of
    an earlier connection, does not count)."""
    return sum(t - before.get(p, 0) for p, t in after.items()) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live children, in seconds."""
    return sum(cpu_sample(pid).values()) / CLK_TCK


# ---------------------------------------------------------------- servers
@dataclass
class ServerProc:
    """A USB/IP server subprocess; ``prefix`` (e.g. ``ip netns exec NS``) wraps the command."""

    kind: str
    host: str = "127.0.0.1"
    prefix: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    banner: bytes = b""
    log_path: pathlib.Path | None = None
    #: the key of its runs in the results (default: ``kind``), e.g. "plain" and "tls" for two usbipd
    label: str | None = None
    #: extra usbipd options (e.g. ``--tls-cert PEM``)
    server_args: Sequence[str] = ()
    #: extra options our client needs for this server (e.g. ``--tls-ca PEM``); the C loadgen takes none
    client_args: Sequence[str] = ()

    @property
    def key(self) -> str:
        return self.label or self.kind

    @property
    def busid(self) -> str:
        return DEVICE[self.kind]["busid"]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        if self.kind == CEILING:
            return [str(build("ceiling")), "--port", "0", "--host", self.host]
        cmd = [PYTHON, "-m", "usbip.cli.usbipd_main", "--host", self.host, "-t", "0", "--virtual", "loopback"]
        return [*cmd, *self.server_args]

    def start(self, timeout: float = 30.0) -> ServerProc:
        env = dict(os.environ)
        env.pop("USBIP_NO_EXTENSIONS", None)
        if self.kind == PURE:
            env["USBIP_NO_EXTENSIONS"] = "1"
        # ceiling prints its banner on stdout, usbipd logs it on stderr: read both
        self.proc = subprocess.Popen(
            [*self.prefix, *self.command()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO),
        )
        pat = _PORT_RE[CEILING if self.kind == CEILING else OURS]
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        while time.monotonic() < deadline:
            chunk = self.proc.stdout.read()
            if chunk:
                self.banner += chunk
                m = pat.search(self.banner)
                if m:
                    self.port = int(m.group(1))
                    break
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        if not self.port:
            out = self.banner.decode(errors="replace")
            self.stop()
            raise RuntimeError(f"{self.key} server did not start: {out.strip()}")
        return self

    def drain_output(self) -> None:
        """Discard what the server printed since (so a chatty server never blocks on a full pipe)."""
        if self.proc is not None and self.proc.stdout is not None:
            try:
                while self.proc.stdout.read():
                    pass
            except (OSError, ValueError):
                pass

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> ServerProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
        cmd = [PYTHON, "-m", "usbip.bench", "--host", host, "--port", str(server.port), "--busid", server.busid]
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
        ccpu0 = _stat_fields(proc.pid)
        time.sleep(max(0.0, not_yet + warmup + seconds - END_MARGIN - time.monotonic()))
        cpu1 = cpu_sample(server.pid)
        ccpu1 = _stat_fields(proc.pid)
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


# ---------------------------------------------------------------- emulated gigabit link
class LinkUnavailable(Exception):
    """The emulated link cannot be built here (not root, no iproute2, no netns): skip."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _tc(ns: str, dev: str, with_netem: bool) -> str:
    """Shape ``dev`` in ``ns`` to gigabit; returns the qdisc description used."""
    if with_netem:
        spec = ["netem", "delay", "0.1ms", "rate", "1gbit", "24", "limit", "10000"]
        r = subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *spec], capture_output=True, text=True)
        if r.returncode == 0:
            return " ".join(spec)
    spec = ["tbf", "rate", "1gbit", "burst", "32kb", "latency", "10ms", "overhead", "24"]
    subprocess.run(
        ["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *spec], capture_output=True, text=True, check=True
    )
    return " ".join(spec)


@contextlib.contextmanager
def netns_link() -> Iterator[dict[str, str]]:
    """Two network namespaces joined by a veth pair shaped to 1 Gbit/s (see test_gigabit.py).

    Yields {ns_server, ns_client, server, client (addresses), qdisc}; raises LinkUnavailable
    (before yielding) when it cannot be built. Names are unique per call; the namespaces,
    and with them the veth pair, are always removed.
    """
    if os.geteuid() != 0:
        raise LinkUnavailable("needs root (network namespaces, tc)")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        raise LinkUnavailable("needs iproute2 (ip, tc)")
    if _ip("netns", "list", check=False).returncode != 0:
        raise LinkUnavailable("ip netns does not work here")
    tag = f"{os.getpid() % 100000:05d}{random.randrange(16**3):03x}"
    ns_s, ns_c = f"ubench-{tag}-s", f"ubench-{tag}-c"
    dev_s, dev_c = f"ub{tag}s", f"ub{tag}c"  # <= 15 characters
    subnet = random.randrange(256)
    addr_s, addr_c = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
    created: list[str] = []
    try:
        for ns in (ns_s, ns_c):
            r = _ip("netns", "add", ns, check=False)
            if r.returncode != 0:
                raise LinkUnavailable(f"ip netns add failed: {r.stderr.strip()}")
            created.append(ns)
        # both ends are born inside the namespaces: nothing appears in ours
        _ip("link", "add", dev_s, "netns", ns_s, "type", "veth", "peer", "name", dev_c, "netns", ns_c)
        for ns, dev, addr in ((ns_s, dev_s, addr_s), (ns_c, dev_c, addr_c)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        with_netem = not os.environ.get("USBIP_BENCH_NO_NETEM")
        qdisc = _tc(ns_s, dev_s, with_netem)
        _tc(ns_c, dev_c, with_netem)
        yield {"ns_server": ns_s, "ns_client": ns_c, "server": addr_s, "client": addr_c, "qdisc": qdisc}
    finally:
        for ns in reversed(created):
            _ip("netns", "del", ns, check=False)


# ---------------------------------------------------------------- TLS against plain
PLAIN = "plain"
TLS = "tls"
#: the figures compared TLS/plain (higher is better for the first two, lower for the others)
TLS_METRICS = ("urbs_per_s", "mb_per_s", "p50_us", "p99_us", "cpu_us_per_urb", "cpu_s_per_gb", "client_cpu_us_per_urb")


def tls_doc(result: CaseResult, link: str, **extra: Any) -> dict[str, Any]:
    """One TLS case's JSON: medians of the plain and the TLS server, and every TLS/plain ratio."""
    med = result.medians()
    p, t = med.get(PLAIN, {}), med.get(TLS, {})
    ratios = {k: round(t[k] / p[k], 3) for k in TLS_METRICS if p.get(k) and t.get(k) is not None}
    case = result.case
    return {
        "link": link,
        "case": case.name.removeprefix("pyclient "),
        "mode": case.mode,
        "size": case.size,
        "inflight": case.inflight,
        "client": case.client,
        "metric": case.metric,
        "medians": med,
        "ratios": ratios,
        "runs": result.runs,
        **extra,
    }


def tls_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """link | case | metric | plain | TLS | TLS/plain | server CPU us/URB plain, TLS, TLS/plain.

    One row per headline figure: URB/s (small URBs), MB/s (64 KiB), p50 and p99 (control);
    server CPU per URB on each case's first row.
    """
    head = ["link", "case", "metric", "plain", "TLS", "TLS/plain"]
    rows = [[*head, "CPU us/URB plain", "CPU us/URB TLS", "CPU TLS/plain"]]
    for r in results:
        med, rat = r["medians"], r.get("ratios", {})
        metrics = ["p50_us", "p99_us"] if r["metric"] == "p50_us" else [r["metric"]]
        for n, m in enumerate(metrics):
            cpu = [
                fmt_num(med.get(PLAIN, {}).get("cpu_us_per_urb")),
                fmt_num(med.get(TLS, {}).get("cpu_us_per_urb")),
                f"{rat['cpu_us_per_urb']:.2f}" if "cpu_us_per_urb" in rat else "-",
            ]
            rows.append(
                [
                    r["link"] if n == 0 else "",
                    r["case"] if n == 0 else "",
                    metric_label(m),
                    fmt_num(med.get(PLAIN, {}).get(m)),
                    fmt_num(med.get(TLS, {}).get(m)),
                    f"{rat[m]:.2f}" if m in rat else "-",
                    *(cpu if n == 0 else ["", "", ""]),
                ]
            )
    return rows


TLS_NOTE = (
    "Same usbipd (compiled, virtual loopback device) served plain and with --tls-cert, driven by the same "
    "client (our `python -m usbip.bench`, with --tls-ca for TLS); interleaved runs, medians. "
    "TLS/plain < 1 for URB/s and MB/s, > 1 for latency and CPU, is what TLS costs. "
    "CPU: server utime+stime per URB (a 64 KiB URB for the MB/s rows)."
)


def tls_line(results: list[dict[str, Any]]) -> str:
    """The TLS session's parameters (cipher, handshake time) as one line, from the first result that has them."""
    info = next((r["tls"] for r in results if r.get("tls")), None)
    if not info:
        return ""
    parts = [f"{info.get('version')} {info.get('cipher')}"]
    if info.get("handshake_ms") is not None:
        hs, conn = fmt_num(info["handshake_ms"]), fmt_num(info.get("connect_ms"))
        parts.append(f"connect+handshake {hs} ms vs plain connect {conn} ms")
    return "TLS session: " + ", ".join(parts)


# ---------------------------------------------------------------- libusb export against usbip-host
KERNEL = "kernel"
#: the figures compared ours/kernel (test_libusb_vs_kernel.py)
LVK_METRICS = ("urbs_per_s", "mb_per_s", "p50_us", "p99_us", "cpu_us_per_urb")


def lvk_doc(result: CaseResult, **extra: Any) -> dict[str, Any]:
    """One case of test_libusb_vs_kernel.py: medians of the kernel's and our export, ours/kernel ratios."""
    med = result.medians()
    k, o = med.get(KERNEL, {}), med.get(OURS, {})
    ratios = {m: round(o[m] / k[m], 3) for m in LVK_METRICS if k.get(m) and o.get(m) is not None}
    case = result.case
    return {
        "case": case.name,
        "mode": case.mode,
        "size": case.size,
        "inflight": case.inflight,
        "metric": case.metric,
        "medians": med,
        "ratios": ratios,
        "runs": result.runs,
        **extra,
    }


def lvk_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """case | metric | kernel | ours | ours/kernel | server CPU us/URB kernel, ours, ours/kernel."""
    rows = [["case", "metric", "kernel", "ours", "ours/kernel", "CPU us/URB kernel", "CPU ours", "CPU ours/kernel"]]
    for r in results:
        med, rat = r["medians"], r.get("ratios", {})
        metrics = ["p50_us", "p99_us"] if r["metric"] == "p50_us" else [r["metric"]]
        for n, m in enumerate(metrics):
            cpu = [
                fmt_num(med.get(KERNEL, {}).get("cpu_us_per_urb")),
                fmt_num(med.get(OURS, {}).get("cpu_us_per_urb")),
                f"{rat['cpu_us_per_urb']:.2f}" if "cpu_us_per_urb" in rat else "-",
            ]
            rows.append(
                [
                    r["case"] if n == 0 else "",
                    metric_label(m),
                    fmt_num(med.get(KERNEL, {}).get(m)),
                    fmt_num(med.get(OURS, {}).get(m)),
                    f"{rat[m]:.2f}" if m in rat else "-",
                    *(cpu if n == 0 else ["", "", ""]),
                ]
            )
    return rows


def lvk_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for the libusb export against usbip-host (reported, never asserted)."""
    out: list[dict[str, Any]] = []

    def ratio(case: str, metric: str) -> float | None:
        r = _find(results, case)
        return r.get("ratios", {}).get(metric) if r else None

    checks = [
        ("bulk-in 512 B x32", "urbs_per_s", "ours >= 0.5x kernel URB/s", lambda v: v >= 0.5),
        ("bulk-in 16 KiB x8", "mb_per_s", "ours >= 0.8x kernel MB/s", lambda v: v >= 0.8),
        ("bulk-out 16 KiB x8", "mb_per_s", "ours >= 0.8x kernel MB/s", lambda v: v >= 0.8),
        ("control GET_DESCRIPTOR x1", "p50_us", "ours p50 <= 2x kernel", lambda v: v <= 2.0),
        ("bulk-in 512 B x32", "cpu_us_per_urb", "server CPU per URB <= 3x kernel stub", lambda v: v <= 3.0),
    ]
    for case, metric, text, ok in checks:
        v = ratio(case, metric)
        if v is not None:
            out.append({"target": f"{case}: {text}", "value": v, "met": ok(v)})
    return out


LVK_NOTE = (
    "One SourceSink gadget (pattern 0) on dummy_hcd in a QEMU (TCG) guest, exported in turn by the kernel's "
    "usbip-host + Debian's usbipd and by our usbipd through libusb (--libusb-events pollfd), driven by the C "
    "loadgen in the guest over 127.0.0.1; alternating rounds, medians. CPU: utime+stime per URB of the stub's "
    "stub_rx/stub_tx kthreads (kernel) or of the usbipd process (ours) over the measured window."
)


# ---------------------------------------------------------------- machine / output
def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    try:
        from usbip.protocol import IMPLEMENTATION as codec_impl
    except ImportError:
        codec_impl = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "loadavg": [round(x, 2) for x in load] if load else None,
        "codec": codec_impl,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def default_out_paths() -> list[pathlib.Path]:
    paths = [REPO / ".benchmarks" / "latest.json"]
    extra = os.environ.get("USBIP_BENCH_OUT")
    if extra:
        paths.append(pathlib.Path(extra))
    return paths


def fmt_num(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 10000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def metric_label(metric: str) -> str:
    return {"urbs_per_s": "URB/s", "mb_per_s": "MB/s", "p50_us": "p50 us", "p99_us": "p99 us"}.get(metric, metric)


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """case | metric | ceiling | ours | ours-pure | ours/ceiling | ours/pure | server CPU (per unit) of each server.

    Server CPU is in seconds per million URBs (= us per URB) for the URB/s and latency
    cases and in seconds per GB for the MB/s cases.
    """
    rows = [
        [
            "case",
            "metric",
            "ceiling",
            "ours",
            "ours-pure",
            "ours/ceiling",
            "ours/pure",
            "CPU unit",
            "CPU ceiling",
            "CPU ours",
            "CPU pure",
        ]
    ]
    for r in results:
        med = r["medians"]
        # the headline metric, then any extra ones (iso: URB/s after MB/s), a row each
        for metric, rat in [(r["metric"], r.get("ratios", {})), *(r.get("extra_metrics") or {}).items()]:
            vals = [med.get(s, {}).get(metric) for s in SERVERS]
            cpu_key, cpu_unit = ("cpu_s_per_gb", "s/GB") if metric == "mb_per_s" else ("cpu_us_per_urb", "s/MURB")
            rows.append(
                [
                    r["case"],
                    metric_label(metric),
                    *(fmt_num(v) for v in vals),
                    f"{rat['ours_over_ceiling']:.2f}" if "ours_over_ceiling" in rat else "-",
                    f"{rat['ours_over_pure']:.2f}" if "ours_over_pure" in rat else "-",
                    cpu_unit,
                    *(fmt_num(med.get(s, {}).get(cpu_key)) for s in SERVERS),
                ]
            )
    return rows


def format_table(rows: list[list[str]], markdown: bool = False) -> str:
    if markdown:
        out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(out)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        cells = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------- targets and session reporting
def _find(results: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in results if r["case"] == name), None)


def evaluate_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The design's targets, reported (never asserted): [{target, value, met}] for the cases that ran."""
    out: list[dict[str, Any]] = []

    def ratio(case: str, metric: str) -> float | None:
        r = _find(results, case)
        if r is None:
            return None
        c = r["medians"].get(CEILING, {}).get(metric)
        o = r["medians"].get(OURS, {}).get(metric)
        return round(o / c, 3) if o and c else None

    for mode in ("bulk-in", "bulk-out"):
        v = ratio(f"{mode} 512 B x32", "urbs_per_s")
        if v is not None:
            out.append({"target": f"{mode} 512 B x32: ours >= 1/3 of ceiling URB/s", "value": v, "met": v >= 1 / 3})
        v = ratio(f"{mode} 64 KiB x8", "mb_per_s")
        if v is not None:
            out.append({"target": f"{mode} 64 KiB x8: ours >= 0.6x ceiling MB/s", "value": v, "met": v >= 0.6})
        r = _find(results, f"{mode} 512 B x32")
        cpu = r["medians"].get(OURS, {}).get("cpu_us_per_urb") if r else None
        if cpu is not None:
            out.append({"target": f"{mode} 512 B x32: server CPU <= 3 us per URB", "value": cpu, "met": cpu <= 3.0})
    v = ratio("control GET_DESCRIPTOR x1", "p50_us")
    if v is not None:
        out.append({"target": "control p50: ours <= 1.5x ceiling", "value": v, "met": v <= 1.5})
    return out


class E2EReporter:
    """pytest plugin (registered by conftest.py): collects the e2e/gigabit results, prints the
    table at the end of the session and writes the JSON (.benchmarks/latest.json, $USBIP_BENCH_OUT)."""

    name = "usbip-e2e-reporter"

    def __init__(self, config: Any) -> None:
        self.config = config
        self.results: list[dict[str, Any]] = []
        self.gigabit: list[dict[str, Any]] = []
        self.tls: list[dict[str, Any]] = []
        #: test_libusb_vs_kernel.py: one lvk_doc per case
        self.libusb_vs_kernel: list[dict[str, Any]] = []
        self.settings: dict[str, Any] = {}

    @property
    def quick(self) -> bool:
        try:
            return bool(self.config.getoption("benchmark_disable"))
        except ValueError:
            return False

    def add(self, result: dict[str, Any]) -> None:
        self.results.append(result)

    def document(self) -> dict[str, Any]:
        return {
            "machine": machine_info(),
            "settings": {**self.settings, "quick": self.quick},
            "results": self.results,
            "gigabit": self.gigabit,
            "tls": self.tls,
            "libusb_vs_kernel": self.libusb_vs_kernel,
            "targets": evaluate_targets(self.results),
            "libusb_vs_kernel_targets": lvk_targets(self.libusb_vs_kernel),
        }

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.results and not self.gigabit and not self.tls and not self.libusb_vs_kernel:
            return
        tr = terminalreporter
        doc = self.document()
        quick = " (QUICK: not a measurement)" if self.quick else ""
        if self.results or self.gigabit:
            tr.section("USB/IP end to end: medians of interleaved runs" + quick)
        if self.results:
            for line in format_table(table_rows(self.results)).splitlines():
                tr.write_line(line)
            tr.write_line("(control: p50 latency, lower is better, so ours/ceiling > 1 means slower)")
            for t in doc["targets"]:
                tr.write_line(f"target {t['target']}: {t['value']} -> {'met' if t['met'] else 'MISSED'}")
            py = _find(self.results, "pyclient bulk-in 512 B x32")
            c = _find(self.results, "bulk-in 512 B x32")
            if py and c:
                tr.write_line(
                    "our Python client vs C loadgen against ours, bulk-in 512 B x32: "
                    f"{fmt_num(py['medians'].get(OURS, {}).get('urbs_per_s'))} vs "
                    f"{fmt_num(c['medians'].get(OURS, {}).get('urbs_per_s'))} URB/s"
                )
        for g in self.gigabit:
            tr.write_line(gigabit_line(g))
        if self.tls:
            tr.section("USB/IP over TLS against plain TCP: medians of interleaved runs" + quick)
            for line in format_table(tls_rows(self.tls)).splitlines():
                tr.write_line(line)
            tr.write_line("(TLS/plain: < 1 for URB/s, MB/s and > 1 for latency, CPU is the cost of TLS)")
            if self.tls_line():
                tr.write_line(self.tls_line())
            for r in self.tls:
                med = {s: r["medians"].get(s, {}) for s in (PLAIN, TLS)}

                def both(key: str, med: dict[str, dict[str, Any]] = med) -> str:
                    return "/".join(fmt_num(m.get(key)) for m in med.values())

                tr.write_line(
                    f"{r['link']} {r['case']} (plain/TLS): client CPU {both('client_cpu_us_per_urb')} us/URB; "
                    f"busy: server {both('server_cpu_frac')}, client {both('client_cpu_frac')} CPU s/s"
                )
        if self.libusb_vs_kernel:
            tr.section("libusb export vs usbip-host: medians of alternating rounds" + quick)
            for line in format_table(lvk_rows(self.libusb_vs_kernel)).splitlines():
                tr.write_line(line)
            tr.write_line("(ours/kernel: > 1 is better for URB/s and MB/s, worse for latency and CPU)")
            for t in doc["libusb_vs_kernel_targets"]:
                tr.write_line(f"target {t['target']}: {t['value']} -> {'met' if t['met'] else 'MISSED'}")
        paths = default_out_paths()
        if self.quick and not os.environ.get("USBIP_BENCH_OUT"):
            paths = [REPO / ".benchmarks" / "latest-quick.json"]
        elif self.quick:
            paths = paths[1:]
        for path in paths:
            try:
                out = dict(doc)
                # a run of only test_gigabit.py (or only test_e2e.py) keeps the other part of the file
                try:
                    old = json.loads(path.read_text())
                except (OSError, ValueError):
                    old = {}
                for part in ("results", "gigabit", "tls", "libusb_vs_kernel"):
                    if not out[part] and old.get(part):
                        out[part] = old[part]
                out["settings"] = {**old.get("settings", {}), **{k: v for k, v in doc["settings"].items()}}
                out["targets"] = evaluate_targets(out["results"])
                out["libusb_vs_kernel_targets"] = lvk_targets(out["libusb_vs_kernel"])
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(out, indent=1) + "\n")
                tr.write_line(f"wrote {path}")
            except OSError as exc:
                tr.write_line(f"cannot write {path}: {exc}")

    def tls_line(self) -> str:
        return tls_line(self.tls)


def gigabit_line(g: dict[str, Any]) -> str:
    med = g["medians"]
    parts = [f"{s} {fmt_num(med.get(s, {}).get('mb_per_s'))}" for s in g.get("servers", SERVERS) if s in med]
    verdict = ""
    if "target_mb_per_s" in g and med.get(OURS, {}).get("mb_per_s") is not None:
        ok = med[OURS]["mb_per_s"] >= g["target_mb_per_s"]
        verdict = f"  (target ours >= {g['target_mb_per_s']}: {'met' if ok else 'MISSED'})"
    ceiling = f" vs TCP goodput ceiling ~{g.get('tcp_ceiling', 118)}"
    return f"gigabit {g['case']}: MB/s " + ", ".join(parts) + ceiling + verdict


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
