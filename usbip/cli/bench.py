"""``usbip bench``: the URB rate, throughput and latency of a remote device, printed as a table
or JSON (the measuring is usbip.client.bench's)."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from typing import Any

from ..client.bench import run_matrix
from . import exitcodes

log = logging.getLogger("usbip")


def format_results(doc: dict[str, Any]) -> str:
    rows = [["case", "URB/s", "MB/s", "p50 us", "p99 us", "errors"]]
    for r in doc["results"]:
        rows.append(
            [
                r["name"],
                f"{r['urbs_per_s']:.0f}",
                f"{r['mb_per_s']:.1f}",
                "-" if r["p50_us"] is None else f"{r['p50_us']:.1f}",
                "-" if r["p99_us"] is None else f"{r['p99_us']:.1f}",
                str(r["errors"]),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = [
        f"USB/IP client benchmark: {doc['busid']} on {doc['host']}:{doc['port']} "
        f"({doc['seconds']:g} s per case, codec {doc['codec']})"
    ]
    for n, row in enumerate(rows):
        out.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def bench_command(
    host: str,
    port: int,
    busid: str,
    seconds: float | None,
    quick: bool,
    as_json: bool,
    tls: ssl.SSLContext | None = None,
    capture: Any = None,
) -> int:
    """``usbip bench``: the exit code (see :mod:`usbip.cli.exitcodes`)."""
    if seconds is None:
        seconds = 0.1 if quick else 1.0
    if seconds <= 0:
        log.error("--seconds must be positive")
        return exitcodes.USAGE
    warmup = 0.02 if quick else min(0.3, seconds)
    try:
        doc = asyncio.run(run_matrix(host, port, busid, seconds, warmup, quick, tls=tls, capture=capture))
    except Exception as exc:
        return exitcodes.report(log, exc, host, port)
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        print(format_results(doc))
    errors = sum(r["errors"] for r in doc["results"])
    if errors:
        log.error("%d URBs failed", errors)
        return exitcodes.FAILURE
    return exitcodes.OK
