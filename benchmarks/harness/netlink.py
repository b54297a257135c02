"""The emulated gigabit link: two network namespaces joined by a shaped veth pair."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator


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
