"""Encrypted vhci imports against the real kernel (QEMU guest): ``usbip attach --tls``.

OUR ``usbip attach --tls-ca ... --tls-cert ...`` runs in the guest. It imports the device over
TLS 1.3, gives vhci-hcd one end of a local socket pair, and forks a relay process
(usbip/vhci/relay.py) that carries the other end through the TLS session. These tests check
what the kernel does with that:

* ``test_tls_storage_ext4_roundtrip``: OUR usbipd on the host (``--tls-cert`` with a trustme
  certificate for 10.0.2.2, ``--tls-client-ca``, an ``--allow-device`` rule on the client
  certificate's name) exports a virtual storage device. The guest makes an ext4 file system
  on it, copies a payload, drops caches, reads the payload back and runs fsck. The TCP
  connection belongs to the relay, and ``usbip port`` shows it. ``usbip detach`` ends the
  relay and the server releases the device.
* ``test_tls_wrong_certificate_refused``: a client certificate from another CA, no client
  certificate, and a server the client does not trust. Each attach exits 4 and names the
  reason on stderr; the server log names the handshake failure; no vhci port or relay is
  left behind.
* ``test_tls_server_gone_ends_relay``: the server is killed under a TLS import. The relay
  exits and vhci frees the port by itself; the stale relay record does not make a later
  plain import on that port look like a TLS one.
* ``test_tls_through_stunnel_to_kernel_usbipd``: stunnel (TLS server, in the guest) in front
  of Debian's usbipd and the kernel's usbip-host exporting a dummy_hcd SourceSink gadget.
  usbtest runs its data cases (pattern 1, every byte checked) through vhci, the relay,
  stunnel and usbip-host. A refused client certificate gives exit 4 with stunnel's alert as
  the reason: stunnel resets the connection right after its alert.

The certificates come from ``trustme``. They are written to the guest share
(``Guest.share_dir``/tls), where the host's usbipd reads them too. stunnel4 comes from
scripts/install-test-deps; the guest runs the host's root file system.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from . import gadgets, usbtest
from .gadgets import assert_no_oops, block_device_of, dmesg_mark
from .harness import GUEST_SHARE, Guest
from .ourserver import (
    HOST_FROM_GUEST,
    REPO,
    UsbipdProcess,
    our_usbipd_fixture,  # noqa: F401  (the our_usbipd fixture)
)

trustme = pytest.importorskip("trustme")

STORAGE_VID, STORAGE_PID = 0x0525, 0xA4A5
LOOPBACK_VID, LOOPBACK_PID = 0x0525, 0xA4A0
VHCI = "/sys/devices/platform/vhci_hcd.0"
RECORD_DIR = "/var/run/vhci_hcd"
RELAY_LOG = f"{RECORD_DIR}/relay.log"
CLIENT_NAME = "guest.cyusbip.test"
#: stunnel's TLS port in the guest (in front of Debian's usbipd on gadgets.USBIP_PORT)
STUNNEL_PORT = 3250
STUNNEL = "/usr/bin/stunnel4"


# ---------------------------------------------------------------- certificates


class Pki:
    """Test certificates in the guest share: ``host(name)`` is the host's path,
    ``guest(name)`` the guest's."""

    def __init__(self, guest: Guest) -> None:
        self.dir = guest.share_dir / "tls"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.guest_dir = f"{GUEST_SHARE}/tls"
        server_ca = trustme.CA(organization_name="cyusbip test server CA")
        client_ca = trustme.CA(organization_name="cyusbip test client CA")
        other_ca = trustme.CA(organization_name="cyusbip test other CA")
        server_ca.cert_pem.write_to_path(str(self.dir / "ca.pem"))
        client_ca.cert_pem.write_to_path(str(self.dir / "client-ca.pem"))
        other_ca.cert_pem.write_to_path(str(self.dir / "other-ca.pem"))
        # the addresses the guest dials: our usbipd on the host (10.0.2.2), stunnel in the guest
        server = server_ca.issue_cert(HOST_FROM_GUEST, "127.0.0.1")
        server.private_key_and_cert_chain_pem.write_to_path(str(self.dir / "server.pem"))
        client = client_ca.issue_cert(CLIENT_NAME, common_name=CLIENT_NAME)
        client.private_key_and_cert_chain_pem.write_to_path(str(self.dir / "client.pem"))
        # the same name, signed by a CA the servers do not trust
        stranger = other_ca.issue_cert(CLIENT_NAME, common_name=CLIENT_NAME)
        stranger.private_key_and_cert_chain_pem.write_to_path(str(self.dir / "other-client.pem"))
        for f in self.dir.iterdir():
            f.chmod(0o600)  # stunnel warns about private keys others can read

    def host(self, name: str) -> str:
        return str(self.dir / name)

    def guest(self, name: str) -> str:
        return f"{self.guest_dir}/{name}"

    def client_args(self, ca: str = "ca.pem", cert: str | None = "client.pem") -> str:
        args = f"--tls-ca {self.guest(ca)}"
        if cert:
            args += f" --tls-cert {self.guest(cert)}"
        return args

    def server_args(self, allow_device: str | None = None) -> list[str]:
        args = ["--tls-cert", self.host("server.pem"), "--tls-client-ca", self.host("client-ca.pem")]
        if allow_device:
            args += ["--allow-device", allow_device]
        return args


@pytest.fixture(scope="module")
def pki(guest) -> Pki:
    return Pki(guest)


# ---------------------------------------------------------------- guest helpers


@pytest.fixture
def g(clean_guest):
    """The clean shared guest with vhci-hcd loaded."""
    clean_guest.run("modprobe vhci-hcd", timeout=120, check=True)
    usbtest.defaults(clean_guest)
    yield clean_guest
    if clean_guest.alive:
        usbtest.defaults(clean_guest)
        # a relay a failing test left behind (gadgets.reset detaches with Debian's tool,
        # which does not know about relays; they end with the detach by themselves)
        clean_guest.run(
            f"for f in {RECORD_DIR}/port*.relay; do [ -e $f ] || continue; "
            'read p < $f; kill "$p" 2>/dev/null; rm -f $f; done; true'
        )


def our_usbip(guest: Guest, args: str, timeout: float = 120, stderr_only: bool = False):
    """OUR usbip tool in the guest (``stderr_only``: the output is its stderr alone)."""
    redirect = " 2>&1 >/dev/null" if stderr_only else ""
    return guest.run(
        f"{shlex.quote(guest.python)} -m usbip.cli.usbip_main {args}{redirect}", timeout=timeout, cwd=str(REPO)
    )


def vhci_ports(guest: Guest) -> dict[int, int]:
    """{vhci port: status} from every vhci_hcd.0 status file (4 = VDEV_ST_NULL, free)."""
    out = guest.run(f"cat {VHCI}/status*", check=True).out
    ports = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 7 and f[0] in ("hs", "ss") and f[1].isdigit():
            ports[int(f[1])] = int(f[2])
    return ports


def relay_files(guest: Guest) -> list[str]:
    return guest.run(f"ls {RECORD_DIR}/ 2>/dev/null | grep '\\.relay$'").out.split()


def relay_processes(guest: Guest) -> list[int]:
    """Processes running OUR usbip tool (a relay is a fork of ``usbip attach``)."""
    # one grep (forks are slow under TCG); its pattern does not match its own command line
    out = guest.run("grep -al 'usbip[.]cli[.]usbip_main' /proc/[0-9]*/cmdline 2>/dev/null; true").out
    return sorted(int(m) for m in re.findall(r"^/proc/(\d+)/cmdline$", out, re.M))


def alive(guest: Guest, pid: int) -> bool:
    """``pid`` runs in the guest (a zombie does not count: PID 1 reaps orphans)."""
    r = guest.run(f"[ -d /proc/{pid} ] && awk '{{print $3}}' /proc/{pid}/stat")
    return r.rc == 0 and r.out.strip() not in ("", "Z")


def wait_dead(guest: Guest, pid: int, timeout: float = 30) -> None:
    r = guest.run(
        gadgets.poll_sh(f"! [ -d /proc/{pid} ] || awk '$3 == \"Z\" {{f=1}} END {{exit !f}}' /proc/{pid}/stat", timeout),
        timeout=timeout + 30,
    )
    assert r.rc == 0, (
        f"relay {pid} still runs {timeout}s after the detach:\n" + guest.run(f"ps -o pid,args -p {pid}").out
    )


def tcp_owner(guest: Guest, dst: str) -> str:
    """``ss`` lines of established TCP connections to ``dst`` (host:port), with their processes."""
    return guest.run(f"ss -Htnp state established dst {dst}").out


def attach_tls(guest: Guest, pki: Pki, host: str, port: int, busid: str, vid: int, pid: int) -> tuple[int, str, int]:
    """OUR ``usbip attach`` over TLS; returns (vhci port, local busid, relay pid)."""
    before = gadgets.vhci_devices(guest, vid, pid)
    t0 = time.monotonic()
    r = our_usbip(guest, f"--json {pki.client_args()} --tcp-port {port} attach -r {host} -b {busid}")
    assert r.rc == 0, r
    vport = json.loads(r.out.strip().splitlines()[-1])["port"]
    local = gadgets.wait_for_device(guest, vid, pid, "/vhci_hcd.", timeout=60, exclude=before)
    print(f"TLS attach of {busid} from {host}:{port}: vhci port {vport}, {local}, {time.monotonic() - t0:.1f}s")
    relay_pid = int(guest.read_file(f"{RECORD_DIR}/port{vport}.relay").decode().strip())
    assert alive(guest, relay_pid), guest.run(f"cat {RELAY_LOG}").out
    assert guest.read_file(f"/proc/{relay_pid}/comm").decode().strip() == "usbip-relay"
    return vport, local, relay_pid


def check_port_shows_relay(
    guest: Guest, vport: int, relay_pid: int, url: str, local: str, as_json: bool = True
) -> None:
    """OUR ``usbip port`` (text, and --json) shows the import with its relay; Debian's shows the import."""
    r = our_usbip(guest, "port")
    assert r.rc == 0, r
    assert f"{local} -> {url} (TLS, relay pid {relay_pid})" in r.out, r.out
    if as_json:
        r = our_usbip(guest, "--json port")
        assert r.rc == 0, r
        entries = [p for p in json.loads(r.out[r.out.index("{") :])["ports"] if p["port"] == vport]
        assert len(entries) == 1 and entries[0]["tls_relay"] == relay_pid, r.out
        assert entries[0]["local_busid"] == local, entries
    theirs = gadgets.usbip_port(guest)
    assert [(p.port, p.url) for p in theirs] == [(vport, url)], theirs


def detach_and_check_relay(guest: Guest, vport: int, local: str, relay_pid: int, log_from: int) -> str:
    """OUR ``usbip detach``: the device goes, the port is free, the relay exits by itself
    (no "stopping it" warning: it saw vhci close its end). Returns the relay's log lines."""
    t0 = time.monotonic()
    r = our_usbip(guest, f"detach -p {vport}")
    assert r.rc == 0, r
    assert f"port {vport} is now detached" in r.out, r
    assert "did not end with the detach" not in r.out, r
    gadgets.wait_gone(guest, local, timeout=60)
    wait_dead(guest, relay_pid)
    took = time.monotonic() - t0
    assert vhci_ports(guest)[vport] == 4
    assert guest.run(f"test -e {RECORD_DIR}/port{vport}.relay").rc == 1
    assert guest.run(f"test -e {RECORD_DIR}/port{vport}").rc == 1
    log = guest.read_file(RELAY_LOG).decode(errors="replace")[log_from:]
    mine = [ln for ln in log.splitlines() if f"relay[{relay_pid}]" in ln]
    assert any("vhci closed its end (detached)" in ln for ln in mine), log
    assert "Traceback" not in log, log
    print(f"detach + relay exit: {took:.1f}s; relay log: {mine}")
    return "\n".join(mine)


def relay_log_size(guest: Guest) -> int:
    r = guest.run(f"stat -c %s {RELAY_LOG} 2>/dev/null || echo 0")
    return int(r.out.split()[-1])


def wait_host_log(srv: UsbipdProcess, pattern: str, timeout: float = 30, count: int = 1) -> str:
    """The server's log once ``pattern`` matches in it ``count`` times."""
    deadline = time.monotonic() + timeout
    while True:
        log = srv.log()
        if len(re.findall(pattern, log)) >= count:
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not in the server log after {timeout}s:\n{srv.log_tail()}")
        time.sleep(0.2)


# ---------------------------------------------------------------- 1. storage over TLS, our server


def test_tls_storage_ext4_roundtrip(g, our_usbipd, pki, tmp_path):
    t_start = time.monotonic()
    image = tmp_path / "disk.img"
    srv = our_usbipd(
        f"storage:{image}:32M",
        args=pki.server_args(allow_device=f"{STORAGE_VID:04x}:{STORAGE_PID:04x}=cn:{CLIENT_NAME}"),
    )
    g.run("modprobe usb-storage; modprobe sd_mod; modprobe ext4", timeout=120, check=True)
    mark = dmesg_mark(g)
    payload = os.urandom(3 * 1024 * 1024 + 1234)
    digest = hashlib.sha256(payload).hexdigest()
    (g.share_dir / "tls-payload.bin").write_bytes(payload)
    log_from = relay_log_size(g)

    vport, local, relay_pid = attach_tls(g, pki, HOST_FROM_GUEST, srv.port, "100-1", STORAGE_VID, STORAGE_PID)
    # the server verified the guest's certificate and let its name import the device
    log = wait_host_log(srv, r"imported 100-1 \(")
    assert CLIENT_NAME in log.split("imported 100-1", 1)[1].splitlines()[0], srv.log_tail()
    # the TCP connection to the server is the relay's (vhci-hcd holds a local socket)
    conns = tcp_owner(g, f"{HOST_FROM_GUEST}:{srv.port}")
    assert len(conns.splitlines()) == 1 and f"pid={relay_pid}," in conns, conns
    check_port_shows_relay(g, vport, relay_pid, f"usbip://{HOST_FROM_GUEST}:{srv.port}/100-1", local)

    dev = "/dev/" + block_device_of(g, local)
    mnt = "/mnt/cyusbip-tls-storage"
    script = f"""
set -e
mkfs.ext4 -q -F -L cyusbip-tls {dev}
mkdir -p {mnt}
mount {dev} {mnt}
cp {GUEST_SHARE}/tls-payload.bin {mnt}/payload.bin
sync
umount {mnt}
blockdev --flushbufs {dev}
echo 3 > /proc/sys/vm/drop_caches
mount {dev} {mnt}
sha256sum {mnt}/payload.bin
umount {mnt}
fsck.ext4 -fn {dev}
echo fsck-rc=$?
"""
    t0 = time.monotonic()
    r = g.run(script, timeout=300)
    t_fs = time.monotonic() - t0
    assert r.rc == 0, r
    assert f"{digest}  {mnt}/payload.bin" in r.out, r
    assert "fsck-rc=0" in r.out, r
    assert alive(g, relay_pid)

    relay_lines = detach_and_check_relay(g, vport, local, relay_pid, log_from)
    m = re.search(r"\((\d+) bytes up, (\d+) down\)", relay_lines)
    assert m and int(m.group(1)) > len(payload) and int(m.group(2)) > len(payload), relay_lines
    # the server saw the TLS stream end and gave the device back
    wait_host_log(srv, r"released 100-1")
    assert srv.proc.poll() is None
    assert tcp_owner(g, f"{HOST_FROM_GUEST}:{srv.port}") == ""
    assert_no_oops(g, mark)

    # the host's image file holds that file system, with the same file
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /payload.bin", str(image)], capture_output=True, timeout=120)
    assert cat.returncode == 0, cat.stderr
    assert hashlib.sha256(cat.stdout).hexdigest() == digest, f"{len(cat.stdout)} bytes read back on the host"
    print(f"mkfs + copy + read back + fsck over TLS: {t_fs:.1f}s; whole test {time.monotonic() - t_start:.1f}s")


# ---------------------------------------------------------------- 2. refused certificates


#: (what, client TLS options, words our usbip must print, words in our usbipd's log)
REFUSALS = [
    (
        "client certificate from another CA",
        {"cert": "other-client.pem"},
        "the peer does not trust the CA of our certificate",
        "TLS handshake failed: certificate verify failed",
    ),
    (
        "no client certificate",
        {"cert": None},
        "the peer requires a client certificate (--tls-cert)",
        "TLS handshake failed: PEER_DID_NOT_RETURN_A_CERTIFICATE",
    ),
    (
        "server certificate from a CA the client does not trust",
        {"ca": "other-ca.pem"},
        "TLS handshake failed: certificate verify failed",
        "TLS handshake failed: the peer does not trust the CA of our certificate",
    ),
]


#: a failed handshake in our usbipd's log; not the TCP probes of UsbipdProcess.wait_ready,
#: which close without a byte ("TLS handshake failed: UNEXPECTED_EOF_WHILE_READING")
HANDSHAKE_FAILED = r"TLS handshake failed: (?!UNEXPECTED_EOF_WHILE_READING)"


def handshake_failures(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if re.search(HANDSHAKE_FAILED, ln)]


def test_tls_wrong_certificate_refused(g, our_usbipd, pki):
    t_start = time.monotonic()
    srv = our_usbipd("loopback", args=pki.server_args())
    mark = dmesg_mark(g)
    log_from = relay_log_size(g)
    for what, opts, client_says, server_says in REFUSALS:
        before = len(handshake_failures(srv.log()))
        t0 = time.monotonic()
        r = our_usbip(
            g,
            f"{pki.client_args(**opts)} --tcp-port {srv.port} attach -r {HOST_FROM_GUEST} -b 100-1",
            stderr_only=True,
        )
        assert r.rc == 4, f"{what}: {r}"
        assert client_says in r.out and "Traceback" not in r.out, f"{what}: {r}"
        assert r.out.startswith("usbip: error: ") and len(r.out.strip().splitlines()) == 1, f"{what}: {r}"
        log = wait_host_log(srv, HANDSHAKE_FAILED, count=before + 1)
        failures = handshake_failures(log)
        assert len(failures) == before + 1 and server_says in failures[-1], f"{what}:\n{srv.log_tail()}"
        # nothing imported, nothing attached, no relay
        assert "imported" not in srv.log(), srv.log_tail()
        assert set(vhci_ports(g).values()) == {4}, g.run(f"cat {VHCI}/status*").out
        assert relay_files(g) == [] and relay_processes(g) == []
        print(f"{what}: refused in {time.monotonic() - t0:.1f}s: {r.out.strip()}")
    assert relay_log_size(g) == log_from  # no relay was started
    # the server still serves the right certificate
    r = our_usbip(g, f"{pki.client_args()} --tcp-port {srv.port} list -r {HOST_FROM_GUEST}")
    assert r.rc == 0 and "100-1:" in r.out, r
    assert_no_oops(g, mark)
    print(f"whole test {time.monotonic() - t_start:.1f}s")


# ---------------------------------------------------------------- 2b. the server goes away


def wait_port_free(guest: Guest, port: int, timeout: float) -> None:
    """Wait until vhci port ``port`` is back to VDEV_ST_NULL (4)."""
    script = gadgets.poll_sh(
        f'awk \'$2 == "{port:04d}" && $3 == "004" {{f=1}} END {{exit !f}}\' {VHCI}/status*', timeout, 0.2
    )
    r = guest.run(script, timeout=timeout + 30)
    assert r.rc == 0, f"vhci port {port} still in use after {timeout}s:\n" + guest.run(f"cat {VHCI}/status*").out


@pytest.mark.long
def test_tls_server_gone_ends_relay(g, our_usbipd, pki):
    """The server dies under a TLS import: the relay sees the connection end, shuts vhci's end
    down and exits, and vhci gives the port up by itself, as on a network loss. The relay's
    record outlives it; a plain import that Debian's tool makes on that port afterwards is not
    shown as a TLS one."""
    t_start = time.monotonic()
    srv = our_usbipd("loopback", args=pki.server_args())
    mark = dmesg_mark(g)
    log_from = relay_log_size(g)
    vport, local, relay_pid = attach_tls(g, pki, HOST_FROM_GUEST, srv.port, "100-1", LOOPBACK_VID, LOOPBACK_PID)
    wait_host_log(srv, r"imported 100-1")

    t0 = time.monotonic()
    srv.kill()
    wait_port_free(g, vport, 60)
    wait_dead(g, relay_pid)
    took = time.monotonic() - t0
    gadgets.wait_gone(g, local, timeout=30)
    log = g.read_file(RELAY_LOG).decode(errors="replace")[log_from:]
    mine = [ln for ln in log.splitlines() if f"relay[{relay_pid}]" in ln]
    assert len(mine) == 1 and re.search(r"server closed|connection error", mine[0]), log
    assert "Traceback" not in log, log
    print(f"server killed: vhci port free and relay gone after {took:.1f}s; relay log: {mine}")

    plain = our_usbipd("loopback")
    imp = gadgets.vhci_attach(g, "100-1", HOST_FROM_GUEST, plain.port, LOOPBACK_VID, LOOPBACK_PID, timeout=60)
    assert imp.port == vport, imp  # the first free port: the one the TLS import had
    r = our_usbip(g, "port")
    assert r.rc == 0 and f"usbip://{HOST_FROM_GUEST}:{plain.port}/100-1" in r.out, r
    assert "TLS" not in r.out, r.out
    gadgets.vhci_detach(g, imp.port)
    gadgets.wait_gone(g, imp.local_busid, timeout=60)
    assert_no_oops(g, mark)
    print(f"whole test {time.monotonic() - t_start:.1f}s")


# ---------------------------------------------------------------- 3. stunnel + the kernel's usbipd

#: usbtest cases that pass through the kernel's usbip-host on the SourceSink gadget (pattern 1:
#: usbtest checks every IN byte, SourceSink every OUT byte); see test_libusb_export. Not the
#: unlink cases (11, 12, 24): Debian 6.1's usbip-host oopses on them.
STUNNEL_CASES = [1, 2, 3, 5, 6, 7, 9, 10, 13, 14, 17, 18, 19, 20, 21, 29]
STUNNEL_ARGS = {"iterations": 10, "length": 1024, "vary": 64, "sglen": 8, "timeout": 300}

STUNNEL_CONF = """\
foreground = yes
pid =
syslog = no
debug = info
[usbip]
accept = 127.0.0.1:{port}
connect = 127.0.0.1:{backend}
cert = {cert}
CAfile = {client_ca}
verifyChain = yes
requireCert = yes
sslVersionMin = TLSv1.3
"""


def _stunnel_missing() -> str | None:
    if not os.path.exists(STUNNEL) and shutil.which("stunnel4") is None:
        return "stunnel4 is not installed (scripts/install-test-deps installs it; the guest runs the host's root)"
    return None


@pytest.fixture
def stunnel(g, pki):
    """stunnel in the guest: TLS on 127.0.0.1:STUNNEL_PORT (client certificates required),
    plain to Debian's usbipd on 127.0.0.1:3240. Yields its log path."""
    conf = Path(pki.dir) / "stunnel.conf"
    conf.write_text(
        STUNNEL_CONF.format(
            port=STUNNEL_PORT,
            backend=gadgets.USBIP_PORT,
            cert=pki.guest("server.pem"),
            client_ca=pki.guest("client-ca.pem"),
        )
    )
    log = "/run/cyusbip/stunnel.log"
    g.run(f"rm -f {log}")
    pid, log = g.start_background(f"exec {STUNNEL} {pki.guest('stunnel.conf')}", log=log)
    listening = f"awk '$2 ~ /:{STUNNEL_PORT:04X}$/ && $4 == \"0A\" {{f=1}} END {{exit !f}}' /proc/net/tcp"
    r = g.run(gadgets.poll_sh(listening, 60), timeout=90)
    if r.rc != 0:
        pytest.fail("stunnel did not start:\n" + g.run(f"cat {log}").out)
    yield log
    g.run(f"kill {pid}; " + gadgets.poll_sh(f"! kill -0 {pid} 2>/dev/null", 10) + f" || kill -9 {pid}", timeout=40)


@pytest.mark.long
@pytest.mark.skipif(_stunnel_missing() is not None, reason=_stunnel_missing() or "")
def test_tls_through_stunnel_to_kernel_usbipd(g, pki, stunnel):
    t_start = time.monotonic()
    gadgets.modprobe(g, "usbtest")
    g.run(f"echo 1 > {usbtest.PARAMS}/pattern", check=True)
    mark = dmesg_mark(g)
    busid = gadgets.sourcesink(g, pattern=1)
    gadgets.kernel_export(g, busid)
    log_from = relay_log_size(g)
    stunnel_log = stunnel

    vport, local, relay_pid = attach_tls(g, pki, "127.0.0.1", STUNNEL_PORT, busid, LOOPBACK_VID, LOOPBACK_PID)
    assert g.run(f"cat /sys/bus/usb/devices/{busid}/usbip_status").out.strip() == "2"  # SDEV_ST_USED
    conns = tcp_owner(g, f"127.0.0.1:{STUNNEL_PORT}")
    assert len(conns.splitlines()) == 1 and f"pid={relay_pid}," in conns, conns
    slog = g.run(f"cat {stunnel_log}").out
    assert "Certificate accepted at depth=0: " in slog and f"CN={CLIENT_NAME}" in slog, slog
    assert "TLSv1.3 ciphersuite" in slog and "connected remote server" in slog, slog
    check_port_shows_relay(g, vport, relay_pid, f"usbip://127.0.0.1:{STUNNEL_PORT}/{busid}", local, as_json=False)

    # data through vhci -> relay -> TLS -> stunnel -> usbip-host -> dummy_hcd -> SourceSink
    usbtest.wait_bound(g, local)
    node = g.run(usbtest.usbfs_node_script(local), check=True).out.strip()
    m = dmesg_mark(g)
    t0 = time.monotonic()
    results = usbtest.run_checked(g, m, node, STUNNEL_CASES, **STUNNEL_ARGS)
    t_usbtest = time.monotonic() - t0
    usbtest.check(results, STUNNEL_CASES, set(STUNNEL_CASES), "usbtest over TLS via stunnel (kernel usbip-host)")
    usbtest.ran_in_kernel(g, m, local, results)

    relay_lines = detach_and_check_relay(g, vport, local, relay_pid, log_from)
    assert re.search(r"\(\d{6,} bytes up, \d{6,} down\)", relay_lines), relay_lines
    # stunnel saw the TLS stream end, closed its side to usbipd: usbip-host takes the device back
    r = g.run(
        gadgets.poll_sh(f'[ "$(cat /sys/bus/usb/devices/{busid}/usbip_status)" = 1 ]', 30)
        + f"; grep -c 'Connection closed' {stunnel_log}",
        timeout=60,
    )
    assert r.rc == 0, "usbip-host still has the device:\n" + g.run(f"cat {stunnel_log}; dmesg | tail -20").out

    # a refused client certificate: stunnel sends its alert and resets the connection
    r = our_usbip(
        g,
        f"{pki.client_args(cert='other-client.pem')} --tcp-port {STUNNEL_PORT} attach -r 127.0.0.1 -b {busid}",
        stderr_only=True,
    )
    assert r.rc == 4 and "the peer does not trust the CA of our certificate" in r.out, r
    assert "Rejected by CERT" in g.run(f"cat {stunnel_log}").out
    assert set(vhci_ports(g).values()) == {4} and relay_files(g) == []
    assert g.run(f"cat /sys/bus/usb/devices/{busid}/usbip_status").out.strip() == "1"

    gadgets.kernel_unexport(g, busid)
    assert_no_oops(g, mark)
    total = time.monotonic() - t_start
    print(f"usbtest {len(STUNNEL_CASES)} cases over TLS via stunnel: {t_usbtest:.1f}s; whole test {total:.1f}s")
