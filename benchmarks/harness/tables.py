"""Results as tables and lines: the e2e table, TLS against plain, libusb against usbip-host, targets, machine info."""

from __future__ import annotations

import os
import pathlib
import platform
import time
from typing import Any

from .runner import CaseResult
from .settings import CEILING, OURS, REPO, SERVERS

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
    "client (our `python -m usbip.client.bench`, with --tls-ca for TLS); interleaved runs, medians. "
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
        r = find_result(results, case)
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
def find_result(results: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in results if r["case"] == name), None)


def evaluate_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The design's targets, reported (never asserted): [{target, value, met}] for the cases that ran."""
    out: list[dict[str, Any]] = []

    def ratio(case: str, metric: str) -> float | None:
        r = find_result(results, case)
        if r is None:
            return None
        c = r["medians"].get(CEILING, {}).get(metric)
        o = r["medians"].get(OURS, {}).get(metric)
        return round(o / c, 3) if o and c else None

    # issue 15's targets: small URBs at >= 1/3 of the ceiling (stretch 1/2), <= 1.5 us of server CPU
    # per small URB, control p50 <= 1.3x, iso at equal packet size >= 0.5x, 64 KiB bulk >= 0.8x
    for mode in ("bulk-in", "bulk-out"):
        v = ratio(f"{mode} 512 B x32", "urbs_per_s")
        if v is not None:
            out.append({"target": f"{mode} 512 B x32: ours >= 1/3 of ceiling URB/s", "value": v, "met": v >= 1 / 3})
            out.append({"target": f"{mode} 512 B x32 (stretch): ours >= 1/2", "value": v, "met": v >= 1 / 2})
        v = ratio(f"{mode} 64 KiB x8", "mb_per_s")
        if v is not None:
            out.append({"target": f"{mode} 64 KiB x8: ours >= 0.8x ceiling MB/s", "value": v, "met": v >= 0.8})
        r = find_result(results, f"{mode} 512 B x32")
        cpu = r["medians"].get(OURS, {}).get("cpu_us_per_urb") if r else None
        if cpu is not None:
            out.append({"target": f"{mode} 512 B x32: server CPU <= 1.5 us per URB", "value": cpu, "met": cpu <= 1.5})
    v = ratio("control GET_DESCRIPTOR x1", "p50_us")
    if v is not None:
        out.append({"target": "control p50: ours <= 1.3x ceiling", "value": v, "met": v <= 1.3})
    iso = next((r["case"] for r in results if r["case"].startswith("iso-in")), None)
    v = ratio(iso, "urbs_per_s") if iso else None
    if v is not None:
        out.append({"target": f"{iso}: ours >= 0.5x ceiling URB/s", "value": v, "met": v >= 0.5})
    return out


def gigabit_line(g: dict[str, Any]) -> str:
    med = g["medians"]
    parts = [f"{s} {fmt_num(med.get(s, {}).get('mb_per_s'))}" for s in g.get("servers", SERVERS) if s in med]
    verdict = ""
    if "target_mb_per_s" in g and med.get(OURS, {}).get("mb_per_s") is not None:
        ok = med[OURS]["mb_per_s"] >= g["target_mb_per_s"]
        verdict = f"  (target ours >= {g['target_mb_per_s']}: {'met' if ok else 'MISSED'})"
    ceiling = f" vs TCP goodput ceiling ~{g.get('tcp_ceiling', 118)}"
    return f"gigabit {g['case']}: MB/s " + ", ".join(parts) + ceiling + verdict
