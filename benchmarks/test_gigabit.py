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
two namespaces (10.213.N.1/30 and 10.213.N.2/30) are used.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import textwrap

import pytest
from _harness import (
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


@pytest.fixture(scope="module")
def link():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, tc)")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("needs iproute2 (ip, tc)")
    if _ip("netns", "list", check=False).returncode != 0:
        pytest.skip("ip netns does not work here")
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
                pytest.skip(f"ip netns add failed: {r.stderr.strip()}")
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
