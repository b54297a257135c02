"""Bulk over an emulated gigabit link: two network namespaces joined by a veth pair
shaped to 1 Gbit/s with tc, server (ceiling, ours) in one, the C load generator in
the other (``ip netns exec``).

The link: ``tbf rate 1gbit burst 32kb latency 10ms overhead 24`` on both veth ends
(24 = preamble, inter-frame gap and FCS of every Ethernet frame; veth's 1500 MTU).
netem is not used because this kernel may lack ``sch_netem`` (it is used, for a 0.1 ms
delay, when present). A raw TCP stream over the same link measures the achievable
goodput (~118 MB/s on real gigabit Ethernet: 125 MB/s x 1448/1538) beside which the
USB/IP figures are reported; the target is ours >= 112 MB/s each way (reported, not
asserted).

Root only; skipped when ``ip netns`` does not work. Names are unique per run; the
namespaces (and with them the veth pair) are always removed. Only addresses inside the
two namespaces (10.213.N.1/30 and 10.213.N.2/30) are used. The link is built by
``harness.netns_link`` (the ``link`` fixture in conftest.py, test_tls.py uses it too).
"""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from .harness import (
    CEILING,
    OURS,
    PYTHON,
    BuildError,
    Case,
    build,
    interleaved,
    run_settings,
    started_servers,
)

TCP_GOODPUT_CEILING = 118.0  # MB/s of TCP payload on gigabit Ethernet (1500 MTU, timestamps)
TARGET = 112.0
CASES = [Case("bulk-in", 65536, 8), Case("bulk-out", 65536, 8)]


@pytest.fixture(scope="module")
def netns_servers(link):
    try:
        build("ceiling")
        build("loadgen")
    except BuildError as exc:
        pytest.skip(f"cannot build the C tools: {exc}")
    prefix = ("ip", "netns", "exec", link["ns_server"])
    with started_servers((CEILING, OURS), host=link["server"], prefix=prefix) as started:
        yield started


@pytest.fixture(scope="module")
def gsettings(request, e2e_reporter):
    quick = bool(request.config.getoption("benchmark_disable"))
    s = run_settings(quick, warmup=0.5, quick_warmup=0.2)
    e2e_reporter.settings["gigabit"] = s
    return s


_SINK = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], 0)); s.listen(1)
    print(s.getsockname()[1], flush=True)
    c, _ = s.accept(); warm, secs = float(sys.argv[2]), float(sys.argv[3])
    buf = bytearray(1 << 20); n = 0; t0 = time.monotonic(); ta = t0 + warm; tb = ta + secs
    while True:
        k = c.recv_into(buf)
        t = time.monotonic()
        if not k or t >= tb: break
        if t >= ta: n += k
    print(round(n / 1e6 / secs, 3), flush=True)
    """
)
_SOURCE = textwrap.dedent(
    """
    import socket, sys, time
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    data = bytes(1 << 20); end = time.monotonic() + float(sys.argv[3])
    try:
        while time.monotonic() < end: c.sendall(data)
    except OSError: pass
    """
)


def tcp_goodput(link, seconds: float, warmup: float, reverse: bool = False) -> float:
    """MB/s of one TCP stream client -> server namespace (server -> client with ``reverse``)."""
    rx_ns, tx_ns, rx_addr = (link["ns_server"], link["ns_client"], link["server"])
    if reverse:
        rx_ns, tx_ns, rx_addr = (link["ns_client"], link["ns_server"], link["client"])
    sink = subprocess.Popen(
        ["ip", "netns", "exec", rx_ns, PYTHON, "-c", _SINK, rx_addr, str(warmup), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.stdout is not None
        port = sink.stdout.readline().strip()
        subprocess.run(
            ["ip", "netns", "exec", tx_ns, PYTHON, "-c", _SOURCE, rx_addr, port, str(warmup + seconds + 1)],
            timeout=warmup + seconds + 30,
            check=False,
        )
        out, _ = sink.communicate(timeout=30)
        return float(out.strip().splitlines()[-1])
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()


def test_tcp_goodput(benchmark, link, gsettings, e2e_reporter):
    """The shaped link's raw TCP goodput, each way (what the USB/IP runs compare to)."""
    benchmark.group = "gigabit"
    box = {}

    def run():
        box["fwd"] = tcp_goodput(link, gsettings["seconds"], gsettings["warmup"])
        box["rev"] = tcp_goodput(link, gsettings["seconds"], gsettings["warmup"], reverse=True)

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update({"tcp_out_mb_per_s": box["fwd"], "tcp_in_mb_per_s": box["rev"], "qdisc": link["qdisc"]})
    e2e_reporter.gigabit.append(
        {
            "case": "raw TCP client->server / server->client",
            "servers": ["tcp-out", "tcp-in"],
            "medians": {"tcp-out": {"mb_per_s": box["fwd"]}, "tcp-in": {"mb_per_s": box["rev"]}},
            "qdisc": link["qdisc"],
            "tcp_ceiling": TCP_GOODPUT_CEILING,
        }
    )
    assert box["fwd"] > 0 and box["rev"] > 0


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.replace(" ", "-"))
def test_gigabit(benchmark, case, link, netns_servers, gsettings, e2e_reporter):
    benchmark.group = "gigabit"
    box = {}
    client = ("ip", "netns", "exec", link["ns_client"])

    def run():
        box["r"] = interleaved(
            case, netns_servers, gsettings["repeats"], gsettings["seconds"], gsettings["warmup"], prefix=client
        )

    benchmark.pedantic(run, rounds=1, iterations=1)
    doc = box["r"].to_json()
    doc.update(
        {
            "servers": [CEILING, OURS],
            "qdisc": link["qdisc"],
            "tcp_ceiling": TCP_GOODPUT_CEILING,
            "target_mb_per_s": TARGET,
        }
    )
    e2e_reporter.gigabit.append(doc)
    med = doc["medians"]
    benchmark.extra_info.update({f"{s}_mb_per_s": m["mb_per_s"] for s, m in med.items()})
    benchmark.extra_info["qdisc"] = link["qdisc"]
    for srv, runs in doc["runs"].items():
        for r in runs:
            assert r["rc"] == 0 and r["errors"] == 0 and r["urbs"] > 0, f"{srv}: {r}"
