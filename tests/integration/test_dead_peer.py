"""A client that vanishes without FIN/RST frees its device within the dead-peer timeout.

The netns tests run ``usbipd --dead-peer-timeout 6`` in network namespace A and the client
in namespace B, joined by a veth pair. Once the client holds the device, everything B
sends towards A is made to vanish (a blackhole route in B, or B's end of the link taken
down) and the client is SIGKILLed there, so no FIN, RST or ACK ever reaches the server: to the server
the client is simply silent. A probe in namespace A then tries to import the device
every PROBE_INTERVAL seconds: it must still be refused (busy) shortly before the
timeout and succeed soon after it. Two situations:

* interrupt: a keyboard with an interrupt IN URB pending, the connection idle. Only
  keepalive can find the dead peer (TCP_KEEPIDLE/INTVL/CNT, capped by TCP_USER_TIMEOUT).
* bulk: the loopback device's source endpoint answering a 4 MiB bulk IN over a link
  shaped to 4 Mbit/s (tbf in A), so server data is in flight, unacknowledged, when the
  client vanishes. Keepalive never probes then; TCP_USER_TIMEOUT must end it (without it
  the retransmissions last ~15 min, tcp_retries2).

The default (no option) is checked without waiting 45 s: the options of an accepted
connection are read back with getsockopt in-process over loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import usbip
from usbip.cli.device_spec import make_device
from usbip.client import connect
from usbip.server import Server
from usbip.server.limits import ServerLimits

REPO = Path(usbip.__file__).resolve().parent.parent
SERVER_IP = "10.213.0.1"  # namespace A (private to the namespaces: the host's tables are never touched)
CLIENT_IP = "10.213.0.2"  # namespace B
PORT = 3240
KEYBOARD, LOOPBACK = "100-1", "100-2"  # busids of the server's virtual devices, in order
TIMEOUT = 6.0  # dead_peer_timeout the netns server runs with
EARLY = 2.0  # the device must still be busy at TIMEOUT - EARLY after the client vanished
SLACK = 6.0  # ... and free by TIMEOUT + SLACK
PROBE_INTERVAL = 0.2
BULK_LENGTH = 4 << 20
SHAPED_RATE = "4mbit"  # 4 MiB takes ~8 s: the reply is still being sent when the client vanishes

# ---------------------------------------------------------------- scripts run inside the namespaces
CLIENT_SCRIPT = """
import asyncio, sys
from usbip.client import connect

async def main(host, port, busid, mode, length):
    dev = await asyncio.wait_for(connect(host, port, timeout=5).import_device(busid), 10)
    if mode == "interrupt":
        dev.submit(0x81, 8)  # keyboard interrupt IN: pends until a key is typed
    else:
        dev.submit(0x81, length)  # loopback source: one big bulk IN reply
    print("READY", flush=True)
    await asyncio.sleep(120)  # SIGKILLed long before

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])))
"""

PROBE_SCRIPT = """
import asyncio, sys, time
from usbip.client import ImportRefused, connect

async def main(host, port, busid, interval, limit):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            dev = await asyncio.wait_for(
                connect(host, port, timeout=2).import_device(busid, read_descriptors=False, configure=False), 3
            )
        except ImportRefused as exc:
            print("BUSY", exc.status, flush=True)
        except (OSError, asyncio.TimeoutError) as exc:
            print("ERR", repr(exc), flush=True)
        else:
            print("FREE", flush=True)
            await dev.close()
            return
        await asyncio.sleep(interval)
    print("GAVEUP", flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5])))
"""


def _env() -> dict[str, str]:
    """The subprocesses import the same ``usbip`` as this test."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Lines:
    """Lines of a subprocess's stdout, each with the monotonic time it arrived (a reader thread)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.q: queue.Queue[tuple[float, str | None]] = queue.Queue()
        self.seen: list[tuple[float, str]] = []  # consumed by wait_for
        self.transcript: list[str] = []  # every line, as it arrives
        assert proc.stdout is not None
        out = proc.stdout

        def pump() -> None:
            for line in out:
                self.transcript.append(line.rstrip("\n"))
                self.q.put((time.monotonic(), line.rstrip("\n")))
            self.q.put((time.monotonic(), None))

        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, needle: str, deadline: float) -> float | None:
        """Time of the next line containing ``needle`` before ``deadline`` (monotonic), else None."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                t, line = self.q.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:  # EOF
                return None
            self.seen.append((t, line))
            if needle in line:
                return t


class Namespaces:
    """Network namespaces A (server) and B (client) joined by a veth pair; removed in a finalizer."""

    def __init__(self) -> None:
        tag = f"{os.getpid()}-{time.monotonic_ns() % 10**6}"
        self.a = f"usbip-dp-a-{tag}"
        self.b = f"usbip-dp-b-{tag}"
        short = f"{os.getpid() % 10**6}"
        self.veth_a = f"dp{short}a"  # <= 15 characters (IFNAMSIZ)
        self.veth_b = f"dp{short}b"
        self.created: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []
        self.logs: list[Path] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="usbip-dead-peer-"))

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)
        if check and res.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
        return res

    def exec(self, ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.ip("netns", "exec", ns, *cmd, check=check)

    def setup(self) -> None:
        for ns in (self.a, self.b):
            res = self.ip("netns", "add", ns, check=False)
            if res.returncode != 0:
                raise NamespacesUnavailable(f"`ip netns add` failed: {res.stderr.strip()}")
            self.created.append(ns)
        self.ip(
            "link", "add", self.veth_a, "netns", self.a, "type", "veth", "peer", "name", self.veth_b, "netns", self.b
        )
        self.ip("-n", self.a, "addr", "add", f"{SERVER_IP}/30", "dev", self.veth_a)
        self.ip("-n", self.b, "addr", "add", f"{CLIENT_IP}/30", "dev", self.veth_b)
        for ns, dev in ((self.a, self.veth_a), (self.b, self.veth_b)):
            self.ip("-n", ns, "link", "set", "lo", "up")
            self.ip("-n", ns, "link", "set", dev, "up")

    def spawn(self, ns: str, name: str, *argv: str, merge: bool = False) -> tuple[subprocess.Popen[str], Lines]:
        """``ip netns exec NS python ARGV`` (ip execs python: the pid is python's).

        stderr goes to a log file shown when a test fails, or with ``merge`` to stdout.
        """
        log = self.tmp / f"{name}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if merge else err,
                text=True,
                env=_env(),
                cwd=str(REPO),
            )
        self.procs.append(proc)
        self.logs.append(log)
        return proc, Lines(proc)

    def sockets(self) -> str:
        """The server's TCP connections to the client, with timers and unacked counts (ss -tino)."""
        res = self.exec(self.a, "ss", "-tinoH", "state", "established", "dst", CLIENT_IP, check=False)
        return res.stdout.strip() or res.stderr.strip()

    def cleanup(self) -> None:
        for proc in self.procs:  # a process inside a namespace keeps it alive: end them first
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
        for ns in reversed(self.created):  # the veth pair goes with its namespaces
            self.ip("netns", "del", ns, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


class NamespacesUnavailable(Exception):
    pass


@pytest.fixture
def netns(request: pytest.FixtureRequest) -> Iterator[Namespaces]:
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces are Linux-only")
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces with `ip netns`")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (`ip netns`)")
    ns = Namespaces()
    request.addfinalizer(ns.cleanup)  # registered first: a half-built setup is removed too
    try:
        ns.setup()
    except NamespacesUnavailable as exc:
        pytest.skip(f"network namespaces unavailable: {exc}")
    yield ns


def _vanish(ns: Namespaces, how: str) -> None:
    """From now on nothing B sends reaches A: no ACK, FIN or RST of the client's connection."""
    if how == "blackhole":
        ns.ip("-n", ns.b, "route", "add", "blackhole", f"{SERVER_IP}/32")
    else:
        ns.ip("-n", ns.b, "link", "set", ns.veth_b, "down")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "how"),
    [("interrupt", "blackhole"), ("bulk", "blackhole"), ("interrupt", "linkdown")],
    ids=["interrupt-pending-blackhole", "bulk-unacked-blackhole", "interrupt-pending-linkdown"],
)
def test_vanished_client_frees_device(netns: Namespaces, mode: str, how: str) -> None:
    busid = KEYBOARD if mode == "interrupt" else LOOPBACK
    server, server_out = netns.spawn(
        netns.a,
        "usbipd",
        *("-m", "usbip.cli.usbipd_main", "--no-libusb", "--virtual", "keyboard", "--virtual", "loopback"),
        *("--host", SERVER_IP, "--tcp-port", str(PORT), "--dead-peer-timeout", str(TIMEOUT), "--no-announce"),
        merge=True,
    )

    def context() -> str:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in netns.logs if p.exists())
        usbipd = "\n".join(server_out.transcript[-60:])
        return f"\nsockets:\n{snapshots}\nprobe: {probe_out.seen if probe_out else None}\n{logs}\n{usbipd}"

    snapshots: list[str] = []
    probe_out: Lines | None = None
    assert server_out.wait_for("listening on", time.monotonic() + 15), "usbipd did not start" + context()
    if mode == "bulk":  # shape A -> B so the 4 MiB reply is still in flight when the client vanishes
        tbf = ("rate", SHAPED_RATE, "burst", "16kb", "latency", "100ms")
        netns.exec(netns.a, "tc", "qdisc", "add", "dev", netns.veth_a, "root", "tbf", *tbf)

    client, client_out = netns.spawn(
        netns.b, "client", "-c", CLIENT_SCRIPT, SERVER_IP, str(PORT), busid, mode, str(BULK_LENGTH)
    )
    assert client_out.wait_for("READY", time.monotonic() + 15), "client did not import" + context()
    probe, probe_out = netns.spawn(
        netns.a,
        "probe",
        "-c",
        PROBE_SCRIPT,
        SERVER_IP,
        str(PORT),
        busid,
        str(PROBE_INTERVAL),
        str(TIMEOUT + SLACK + 15),
    )
    assert probe_out.wait_for("BUSY", time.monotonic() + 15), "the probe did not see the device busy" + context()
    if mode == "bulk":
        time.sleep(0.5)  # the reply is streaming now
    before = netns.sockets()
    snapshots.append(f"before: {before}")
    if mode == "bulk":
        assert "unacked:" in before, "no unacknowledged data in flight: the case tests nothing" + context()

    _vanish(netns, how)
    t0 = time.monotonic()
    client.send_signal(signal.SIGKILL)  # its kernel's FIN/RST cannot leave B any more
    client.wait(timeout=5)

    time.sleep(2.5)
    during = netns.sockets()
    snapshots.append(f"t0+2.5s: {during}")
    # the server still holds the connection, and is finding out the right way
    assert during, "the server's connection is gone already" + context()
    expected_timer = "timer:(on," if mode == "bulk" else "timer:(keepalive,"
    assert expected_timer in during, f"expected {expected_timer}" + context()

    freed = probe_out.wait_for("FREE", t0 + TIMEOUT + SLACK)
    busy_times = [t - t0 for t, line in probe_out.seen if line.startswith("BUSY")]
    assert freed is not None, (
        f"device still busy {TIMEOUT + SLACK:.0f} s after its client vanished "
        f"(dead_peer_timeout {TIMEOUT:.0f} s)" + context()
    )
    elapsed = freed - t0
    print(f"{mode}/{how}: device free {elapsed:.2f} s after the client vanished (timeout {TIMEOUT} s)")
    last_busy = max((t for t in busy_times if t < elapsed), default=-1.0)
    assert last_busy >= TIMEOUT - EARLY, (
        f"device free at {elapsed:.2f} s but last seen busy at {last_busy:.2f} s: freed before the "
        f"dead-peer timeout, by something else" + context()
    )
    ended = [ln for ln in server_out.transcript if f"{CLIENT_IP}:" in ln and "timed out" in ln]
    assert ended, "usbipd did not end the client's connection on ETIMEDOUT" + context()
    assert server.poll() is None, "server died" + context()
    probe.wait(timeout=10)


# ---------------------------------------------------------------- default, read back in-process
def _server_side_socket(local: tuple[str, int], peer: tuple[str, int]) -> socket.socket | None:
    """A duplicate of this process's socket connected ``local`` <-> ``peer`` (the server's end)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            dup = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if dup.type == socket.SOCK_STREAM and dup.getsockname()[:2] == local and dup.getpeername()[:2] == peer:
                return dup
        except OSError:
            pass
        dup.close()
    return None


async def _accepted_options(limits: ServerLimits | None) -> dict[str, int]:
    """Import a device from an in-process server; read the options of the connection it accepted."""
    async with Server([make_device("keyboard")], host="127.0.0.1", port=0, limits=limits) as srv:
        client_sock, _record = await asyncio.wait_for(connect("127.0.0.1", srv.port).import_socket(KEYBOARD), 10)
        with client_sock:  # the import succeeded: the server has set up its end
            srv_sock = _server_side_socket(("127.0.0.1", srv.port), client_sock.getsockname()[:2])
            assert srv_sock is not None, "the server's end of the connection was not found"
            with srv_sock:
                return {
                    "SO_KEEPALIVE": srv_sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    **{
                        name: srv_sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
                        for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT", "TCP_USER_TIMEOUT")
                    },
                }


needs_proc_and_options = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd")
    or not all(hasattr(socket, n) for n in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT", "TCP_USER_TIMEOUT")),
    reason="needs /proc/self/fd and the Linux TCP keepalive/user-timeout options",
)


@needs_proc_and_options
def test_default_dead_peer_timeout_within_a_minute() -> None:
    """No option: an accepted connection declares a silent peer dead in at most 60 s."""
    opts = asyncio.run(asyncio.wait_for(_accepted_options(None), 30))
    assert opts["SO_KEEPALIVE"] == 1
    keepalive = opts["TCP_KEEPIDLE"] + opts["TCP_KEEPINTVL"] * opts["TCP_KEEPCNT"]
    assert keepalive <= 60, f"idle connection: dead after {keepalive} s ({opts})"
    assert 0 < opts["TCP_USER_TIMEOUT"] <= 60_000, f"unacknowledged data: {opts['TCP_USER_TIMEOUT']} ms ({opts})"
    default = ServerLimits().dead_peer_timeout
    assert (opts["TCP_KEEPIDLE"], opts["TCP_KEEPINTVL"], opts["TCP_KEEPCNT"]) == ServerLimits().keepalive()
    assert opts["TCP_USER_TIMEOUT"] == round(default * 1000)


@needs_proc_and_options
def test_dead_peer_timeout_option_reaches_the_socket() -> None:
    opts = asyncio.run(asyncio.wait_for(_accepted_options(ServerLimits(dead_peer_timeout=TIMEOUT)), 30))
    assert opts["SO_KEEPALIVE"] == 1
    assert (opts["TCP_KEEPIDLE"], opts["TCP_KEEPINTVL"], opts["TCP_KEEPCNT"]) == (3, 1, 3)
    assert opts["TCP_USER_TIMEOUT"] == 6000
