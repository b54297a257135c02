"""``usbip bench`` (usbip/client/bench.py, usbip/cli/bench.py): our client's matrix against a server,
JSON shape and exit codes."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from usbip.cli import exitcodes
from usbip.client.bench import first_bulk_endpoints, plan

from .harness import CEILING, OURS, PYTHON, REPO, BuildError, ServerProc, build

RESULT_KEYS = {
    "name",
    "mode",
    "endpoint",
    "size",
    "inflight",
    "seconds",
    "urbs",
    "urbs_per_s",
    "mb_per_s",
    "p50_us",
    "p99_us",
    "errors",
}


@pytest.fixture(scope="module")
def ours():
    with ServerProc(OURS) as srv:
        yield srv


def usbip(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "usbip.cli.usbip_main", *args], capture_output=True, text=True, timeout=timeout, cwd=str(REPO)
    )


def check_doc(doc: dict, busid: str, bulk_in: int, bulk_out: int) -> None:
    assert doc["busid"] == busid
    assert doc["bulk_in"] == bulk_in and doc["bulk_out"] == bulk_out
    assert doc["quick"] is True
    names = [r["name"] for r in doc["results"]]
    assert len(names) == 1 + 2 * 3 * 3, names
    assert names[0].startswith("control")
    for r in doc["results"]:
        assert set(r) == RESULT_KEYS, r
        assert r["errors"] == 0, r
        if r["urbs"]:
            assert r["urbs_per_s"] > 0 and r["p99_us"] >= r["p50_us"] > 0, r
    # 0.1 s windows on a loaded machine: a descheduled case may complete nothing inside its window
    assert sum(1 for r in doc["results"] if r["urbs"] > 0) >= len(names) - 3, doc["results"]
    modes = {(r["mode"], r["size"], r["inflight"]) for r in doc["results"]}
    assert ("bulk-out", 65536, 32) in modes and ("bulk-in", 512, 1) in modes


def test_bench_json_against_ours(ours):
    r = usbip("-t", str(ours.port), "--json", "bench", "-r", "127.0.0.1", "-b", ours.busid, "--quick")
    assert r.returncode == exitcodes.OK, r.stderr
    check_doc(json.loads(r.stdout), ours.busid, 0x81, 0x01)
    assert "[19/19]" in r.stderr  # the progress indicator


def test_bench_table_against_ceiling():
    try:
        build("ceiling")
    except BuildError as exc:
        pytest.skip(f"cannot build the ceiling: {exc}")
    with ServerProc(CEILING) as srv:
        r = usbip("-t", str(srv.port), "--json", "bench", "-r", "127.0.0.1", "-b", srv.busid, "--quick")
        assert r.returncode == exitcodes.OK, r.stderr
        check_doc(json.loads(r.stdout), srv.busid, 0x81, 0x01)
        r = usbip("-t", str(srv.port), "bench", "-r", "127.0.0.1", "-b", srv.busid, "--seconds", "0.05")
        assert r.returncode == exitcodes.OK, r.stderr
        assert "control GET_DESCRIPTOR x1" in r.stdout and "URB/s" in r.stdout


def test_bench_exit_codes(ours):
    r = usbip("-t", str(ours.port), "bench", "-r", "127.0.0.1", "-b", "9-9", "--quick")
    assert r.returncode == exitcodes.REFUSED, r.stderr
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = usbip("-t", str(port), "bench", "-r", "127.0.0.1", "-b", "1-1", "--quick")
    assert r.returncode == exitcodes.UNREACHABLE, r.stderr
    r = usbip("bench", "-r", "127.0.0.1")
    assert r.returncode == exitcodes.USAGE


def test_plan_and_endpoints():
    eps = [
        {"bEndpointAddress": 0x83, "bmAttributes": 1, "wMaxPacketSize": 1024, "bInterval": 4},
        {"bEndpointAddress": 0x02, "bmAttributes": 2, "wMaxPacketSize": 512, "bInterval": 0},
        {"bEndpointAddress": 0x86, "bmAttributes": 2, "wMaxPacketSize": 512, "bInterval": 0},
        {"bEndpointAddress": 0x81, "bmAttributes": 2, "wMaxPacketSize": 512, "bInterval": 0},
    ]
    assert first_bulk_endpoints(eps) == (0x86, 0x02)
    assert first_bulk_endpoints([]) == (None, None)
    assert len(plan(0x81, None)) == 1 + 9
    assert len(plan(None, None)) == 1
