"""The pytest plugin that collects the results, prints the tables and writes the JSON."""

from __future__ import annotations

import json
import os
from typing import Any

from .settings import OURS, REPO
from .tables import (
    PLAIN,
    TLS,
    default_out_paths,
    evaluate_targets,
    find_result,
    fmt_num,
    format_table,
    gigabit_line,
    lvk_rows,
    lvk_targets,
    machine_info,
    table_rows,
    tls_line,
    tls_rows,
)


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
            py = find_result(self.results, "pyclient bulk-in 512 B x32")
            c = find_result(self.results, "bulk-in 512 B x32")
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
