"""Regenerate the README's results table (markdown) and a PNG plot from the e2e JSON.

    python3 -m benchmarks.report [JSON] [--png PATH] [--readme README.md]

JSON defaults to .benchmarks/latest.json (written by ``pytest benchmarks/test_e2e.py
--benchmark-only``, test_gigabit.py and test_tls.py; each keeps the others' part). The
PNG (default: next to the JSON, same name) needs matplotlib (``pip install cyusbip[plot]``)
and is skipped with a message without it. The markdown goes to stdout, to be pasted into
README.md; the TLS vs plain table (test_tls.py) follows the gigabit lines.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

from .harness import (
    CEILING,
    OURS,
    PURE,
    REPO,
    TLS_NOTE,
    format_table,
    gigabit_line,
    machine_info,
    metric_label,
    table_rows,
    tls_line,
    tls_rows,
)


def machine_note(m: dict[str, Any]) -> str:
    load = m.get("loadavg")
    return (
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, Linux {m.get('kernel')}, "
        f"Python {m.get('python')} ({m.get('implementation', 'CPython')})"
        + (f", load average {load[0]} at the time" if load else "")
        + (f"; measured {m['time']}" if m.get("time") else "")
        + "."
    )


def markdown(doc: dict[str, Any]) -> str:
    s = doc.get("settings", {})
    out: list[str] = []
    if doc.get("results"):
        out.append(format_table(table_rows(doc["results"]), markdown=True))
        out.append("")
        out.append(
            f"Medians of {s.get('repeats', '?')} interleaved runs of {s.get('seconds', '?')} s per server "
            "(C `loadgen` unless the case says pyclient: our asyncio client). Control: p50 latency "
            "(lower is better). CPU: server utime+stime over the measured window, in seconds per "
            "million URBs (s/MURB = us per URB) or per GB. Iso: 8 packets of 1024 B per URB "
            "(the loopback's iso maxp; the ceiling's iso endpoint has the same) on every server, "
            "reported as MB/s and as URB/s." + (" QUICK RUN: not a measurement." if s.get("quick") else "")
        )
    targets = doc.get("targets") or []
    if targets:
        out.append("")
        out.append("Targets (reported, not asserted):")
        out.append("")
        for t in targets:
            out.append(f"- {t['target']}: {t['value']} ({'met' if t['met'] else 'missed'})")
    if doc.get("gigabit"):
        out.append("")
        out.append("Gigabit (veth between two network namespaces, " + doc["gigabit"][0].get("qdisc", "tc") + "):")
        out.append("")
        for g in doc["gigabit"]:
            out.append("- " + gigabit_line(g).removeprefix("gigabit "))
    if doc.get("tls"):
        ts = s.get("tls") or {}
        out.append("")
        out.append("TLS vs plain:")
        out.append("")
        out.append(format_table(tls_rows(doc["tls"]), markdown=True))
        out.append("")
        line = tls_line(doc["tls"])
        out.append(
            TLS_NOTE
            + f" Medians of {ts.get('repeats', '?')} runs of {ts.get('seconds', '?')} s per server."
            + (f" {line}." if line else "")
            + (" QUICK RUN: not a measurement." if ts.get("quick", s.get("quick")) else "")
        )
    out.append("")
    out.append(machine_note(doc.get("machine") or machine_info()))
    return "\n".join(out)


def plot(doc: dict[str, Any], path: pathlib.Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"report.py: matplotlib is not installed (pip install cyusbip[plot]): no {path}", file=sys.stderr)
        return False
    results = doc.get("results") or []
    if not results:
        return False
    labels, ours, pure = [], [], []
    for r in results:
        med = r["medians"]
        c = med.get(CEILING, {}).get(r["metric"])
        o = med.get(OURS, {}).get(r["metric"])
        p = med.get(PURE, {}).get(r["metric"])
        if not c:
            continue
        inv = r["metric"] == "p50_us"  # latency: show ceiling/ours so that higher is better everywhere
        labels.append(f"{r['case']}\n({metric_label(r['metric'])})")
        ours.append((c / o if inv else o / c) if o else 0)
        pure.append((c / p if inv else p / c) if p else 0)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(labels)), 5))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], ours, 0.4, label="ours (compiled)")
    ax.bar([i + 0.2 for i in x], pure, 0.4, label="ours (pure Python)")
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="C ceiling")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("relative to the C ceiling (higher is better)")
    ax.set_yscale("log")
    ax.set_title(machine_note(doc.get("machine") or {}), fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"report.py: wrote {path}", file=sys.stderr)
    return True


README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="?", default=str(REPO / ".benchmarks" / "latest.json"))
    ap.add_argument("--png", default=None, help="where to write the plot (default: the JSON's name with .png)")
    ap.add_argument("--readme", default=None, help="replace the table between the bench markers in this file")
    args = ap.parse_args(argv)
    path = pathlib.Path(args.json)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(
            f"report.py: cannot read {path}: {exc} (run pytest benchmarks/test_e2e.py --benchmark-only)",
            file=sys.stderr,
        )
        return 1
    table = markdown(doc)
    print(table)
    plot(doc, pathlib.Path(args.png) if args.png else path.with_suffix(".png"))
    if args.readme:
        readme = pathlib.Path(args.readme)
        text = readme.read_text()
        start, end = text.find(README_START), text.find(README_END)
        if start < 0 or end < start:
            print(f"report.py: no {README_START} ... {README_END} markers in {readme}", file=sys.stderr)
            return 1
        readme.write_text(text[: start + len(README_START)] + "\n" + table.rstrip() + "\n" + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
