"""TLS against plain TCP: what ``usbipd --tls-cert`` costs.

The same usbipd (compiled, ``--virtual loopback``) runs twice, plain and with ``--tls-cert``;
the same client, ours (``python -m usbip.client.bench``, with ``--tls-ca`` for TLS: the C loadgen speaks
plain TCP only), drives both, interleaved (plain, TLS, TLS, plain, ...), medians. Cases: bulk IN
512 B x32 (URB/s), bulk IN and OUT 64 KiB x8 (MB/s), control GET_DESCRIPTOR x1 (p50 and p99
latency), each with the server's CPU per URB from /proc. On loopback, and over the emulated
gigabit link of test_gigabit.py (root with network namespaces; skipped otherwise). The TLS/plain
ratios go to the session summary, ``.benchmarks/latest.json`` ("tls") and, through report.py, the
README. Nothing here asserts a speed.

Certificates: trustme (a throwaway CA and a server certificate; the client trusts the CA and,
as ``usbip.client.bench`` does, does not check the name). Beside the cases, the TLS version and cipher
the session ran with and the time of a connect + handshake against a plain connect (loopback).

Environment: USBIP_BENCH_SECONDS (default 1.5), USBIP_BENCH_REPEATS (default 5 here: the ratio
is the figure, and each side runs that many times), USBIP_BENCH_WARMUP (default 0.3). With
``--benchmark-disable`` each loopback case runs once for 0.3 s against each server, and one
gigabit case when root, just to prove it works (most of its time is our client starting up).
"""

from __future__ import annotations

import socket
import statistics
import time
from typing import Any

import pytest

from .harness import (
    OURS,
    PLAIN,
    TLS,
    Case,
    ServerProc,
    env_int,
    interleaved,
    run_settings,
    started_servers,
    tls_doc,
)

trustme = pytest.importorskip("trustme")

CASES = [
    Case("bulk-in", 512, 32, client="py"),
    Case("bulk-in", 65536, 8, client="py"),
    Case("bulk-out", 65536, 8, client="py"),
    Case("control", 18, 1, client="py"),
]
QUICK_GIGABIT = Case("bulk-in", 65536, 8, client="py")  # the one gigabit case of a quick run
HANDSHAKES = 10


def case_id(case: Case) -> str:
    return case.name.removeprefix("pyclient ").replace(" ", "-")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tls-bench")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    return {"ca": str(d / "ca.pem"), "cert": str(d / "server.pem")}


def server_pair(pki: dict[str, str], **kw: Any) -> list[ServerProc]:
    """Our usbipd plain, and the same serving TLS (our client gets --tls-ca for it)."""
    return [
        ServerProc(OURS, label=PLAIN, **kw),
        ServerProc(OURS, label=TLS, server_args=("--tls-cert", pki["cert"]), client_args=("--tls-ca", pki["ca"]), **kw),
    ]


@pytest.fixture(scope="module")
def servers(pki):
    with started_servers(server_pair(pki)) as started:
        yield started


@pytest.fixture(scope="module")
def netns_servers(link, pki):
    prefix = ("ip", "netns", "exec", link["ns_server"])
    with started_servers(server_pair(pki, host=link["server"], prefix=prefix)) as started:
        yield started


@pytest.fixture(scope="module")
def tsettings(request, e2e_reporter) -> dict[str, float]:
    quick = bool(request.config.getoption("benchmark_disable"))
    # quick: 0.2 s warm-up, 0.3 s window (a shorter one may see no URB at all on a loaded machine)
    s = run_settings(quick, warmup=0.3, quick_warmup=0.2)
    if not quick:
        s["repeats"] = env_int("USBIP_BENCH_REPEATS", 5)
    e2e_reporter.settings["tls"] = {**s, "quick": quick}
    return s


def session_info(servers: list[ServerProc], ca: str, n: int = HANDSHAKES) -> dict[str, Any]:
    """The TLS session the server negotiates (version, cipher) and the median time of a TCP connect
    plus TLS handshake against that of a plain TCP connect (ms), from this process."""
    from usbip.net.tls import client_context

    plain, tls = (next(s for s in servers if s.key == k) for k in (PLAIN, TLS))
    ctx = client_context(ca, check_hostname=False)
    connect, handshake = [], []
    version = cipher = None
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.create_connection((plain.host, plain.port), timeout=10):
            connect.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with socket.create_connection((tls.host, tls.port), timeout=10) as sock, ctx.wrap_socket(sock) as conn:
            handshake.append(time.perf_counter() - t0)
            version, cipher = conn.version(), (conn.cipher() or (None,))[0]
    plain.drain_output()
    tls.drain_output()
    return {
        "version": version,
        "cipher": cipher,
        "connect_ms": round(statistics.median(connect) * 1e3, 3),
        "handshake_ms": round(statistics.median(handshake) * 1e3, 3),
    }


@pytest.fixture(scope="module")
def tls_info(servers, pki) -> dict[str, Any]:
    return session_info(servers, pki["ca"])


def run_tls_case(benchmark, case, servers, settings, reporter, link_name, prefix=(), info=None) -> dict[str, Any]:
    benchmark.group = f"tls-{link_name}"
    box = {}

    def run():
        box["r"] = interleaved(
            case, servers, settings["repeats"], settings["seconds"], settings["warmup"], prefix=prefix, alternate=True
        )

    benchmark.pedantic(run, rounds=1, iterations=1)
    doc = tls_doc(box["r"], link_name, tls=info)
    reporter.tls.append(doc)
    benchmark.extra_info.update(
        {
            "case": doc["case"],
            "link": link_name,
            "metric": doc["metric"],
            **{f"{srv}_{k}": v for srv, m in doc["medians"].items() for k, v in m.items() if k != "runs"},
            **{f"tls_over_plain_{k}": v for k, v in doc["ratios"].items()},
        }
    )
    # the runs must have worked (no wall-clock assertion): both servers answered, without errors
    assert set(doc["runs"]) == {PLAIN, TLS}
    for srv, runs in doc["runs"].items():
        for r in runs:
            assert r["rc"] == 0 and r["errors"] == 0 and r["urbs"] > 0, f"{srv}: {r}"
    return doc


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_tls_loopback(benchmark, case, servers, tls_info, tsettings, e2e_reporter):
    assert tls_info["version"] == "TLSv1.3"
    run_tls_case(benchmark, case, servers, tsettings, e2e_reporter, "loopback", info=tls_info)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_tls_gigabit(benchmark, case, request, link, netns_servers, tsettings, e2e_reporter):
    if request.config.getoption("benchmark_disable") and case != QUICK_GIGABIT:
        pytest.skip("quick run: one gigabit case shows the link works")
    client = ("ip", "netns", "exec", link["ns_client"])
    doc = run_tls_case(benchmark, case, netns_servers, tsettings, e2e_reporter, "gigabit", prefix=client)
    doc["qdisc"] = link["qdisc"]
