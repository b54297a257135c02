"""Where the benchmarks live, the servers they compare, and how long each run lasts (environment overrides)."""

from __future__ import annotations

import os
import pathlib
import re
import sys

BENCH_DIR = pathlib.Path(__file__).resolve().parents[1]
REPO = BENCH_DIR.parent

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

PORT_RE = {
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
