"""``usbip attach --persist`` against the real vhci-hcd (QEMU guest, OUR usbip in the guest).

OUR usbipd on the host exports a virtual storage device on a 32 MiB image whose known
blocks the host wrote first; the guest imports it with ``--persist``, so a supervisor
process (usbip/vhci/persist.py) watches the vhci port.

* ``test_persist_storage_survives_server_restart``: the guest reads the host's blocks and
  writes its own (O_DIRECT, fsync), then the host's usbipd is SIGKILLed and started again on
  the same port with the same image. vhci drops the port, the supervisor re-imports (backoff,
  connection refused until the server listens) and vhci gets the device back; the guest
  reads both patterns from the new block device. ``usbip port`` shows the import as
  persistent with the same supervisor; ``usbip detach`` stops the supervisor and nothing
  comes back afterwards (the server keeps running).
* ``test_persist_tls_server_restart``: the same over TLS (OUR usbipd with a certificate and
  client certificates, as tests/kernel/test_tls.py): each import has its relay process; the
  re-import gets a new one, recorded beside the port, and the detach ends it.
* ``test_persist_rides_out_a_stalled_server``: the server is SIGSTOPped for a few seconds
  (its kernel still acknowledges TCP: to the guest the link stalls, nothing breaks). A read
  stalls and completes after SIGCONT; the supervisor does not re-import.
* ``test_persist_link_down``: the guest drops every TCP segment from the server (a tc ingress
  filter; QEMU's user networking offers no link to pull, and the server's end of the
  connection is slirp's socket on the host, which never goes silent): the guest's connection
  dies by its dead-peer timeout (keepalive + TCP_USER_TIMEOUT, 45 s), vhci frees the port,
  re-imports time out while the filter is on, and once it is gone the supervisor brings the
  device back. The guest's keepalive ends with a reset, which slirp passes on to the server:
  that frees the device there (with a real link the server's own dead-peer timeout does).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import time
from pathlib import Path

import pytest

from . import gadgets
from .gadgets import assert_no_oops, block_device_of, dmesg_mark
from .harness import GUEST_SHARE, Guest
from .ourserver import (
    HOST_FROM_GUEST,
    REPO,
    UsbipdProcess,
    our_usbipd_fixture,  # noqa: F401  (the our_usbipd fixture)
)

STORAGE_VID, STORAGE_PID = 0x0525, 0xA4A5
VHCI = "/sys/devices/platform/vhci_hcd.0"
RECORD_DIR = "/var/run/vhci_hcd"
PERSIST_LOG = f"{RECORD_DIR}/persist.log"
BLOCK = 4096
HOST_AT, GUEST_AT, COUNT = 256, 1024, 16  # 4 KiB blocks: the host's pattern, the guest's, how many


# ---------------------------------------------------------------- fixtures and helpers


def stop_supervisors(guest: Guest) -> None:
    """Kill every persist supervisor (and TLS relay) a test left: gadgets.reset detaches with
    Debian's usbip, which knows nothing of them, and a supervisor would attach again."""
    guest.run(
        f"for f in {RECORD_DIR}/port*.persist {RECORD_DIR}/port*.relay; do [ -e $f ] || continue; "
        'read p < $f; kill -9 "$p" 2>/dev/null; rm -f $f; done; true'
    )


@pytest.fixture
def g(clean_guest):
    """The clean shared guest with vhci-hcd and the storage drivers loaded."""
    stop_supervisors(clean_guest)
    clean_guest.run("modprobe vhci-hcd; modprobe usb-storage; modprobe sd_mod", timeout=120, check=True)
    clean_guest.run(f"rm -f {PERSIST_LOG}")
    yield clean_guest
    if clean_guest.alive:
        clean_guest.run("tc qdisc del dev eth0 ingress 2>/dev/null; true")
        stop_supervisors(clean_guest)


@pytest.fixture
def restarted():
    """Servers started again by the test (the our_usbipd fixture only knows the first one)."""
    servers: list[UsbipdProcess] = []
    yield servers
    for srv in servers:
        with contextlib.suppress(OSError):
            srv.resume()  # in case a test left it stopped
        srv.stop()


def our_usbip(guest: Guest, args: str, timeout: float = 120):
    return guest.run(f"{shlex.quote(guest.python)} -m usbip.cli.usbip_main {args}", timeout=timeout, cwd=str(REPO))


def persist_log(guest: Guest) -> str:
    return guest.run(f"cat {PERSIST_LOG} 2>&1").out


def make_image(path: Path) -> bytes:
    """A sparse 32 MiB image with random blocks at HOST_AT; returns them."""
    pattern = os.urandom(COUNT * BLOCK)
    with open(path, "wb") as f:
        f.truncate(32 << 20)
        f.seek(HOST_AT * BLOCK)
        f.write(pattern)
    return pattern


def read_sha(guest: Guest, disk: str, at: int, timeout: float = 120) -> str:
    r = guest.run(
        f"dd if=/dev/{disk} bs={BLOCK} skip={at} count={COUNT} iflag=direct status=none | sha256sum", timeout=timeout
    )
    assert r.rc == 0, r
    return r.out.split()[0]


def ports_json(guest: Guest) -> list[dict]:
    r = our_usbip(guest, "--json port")
    assert r.rc == 0, r
    return json.loads(r.out[r.out.index("{") :])["ports"]


def persistent_port(guest: Guest, supervisor: int) -> dict:
    mine = [p for p in ports_json(guest) if (p.get("persist") or {}).get("pid") == supervisor]
    assert len(mine) == 1, ports_json(guest)
    return mine[0]


def attach_persist(guest: Guest, tcp_port: int, options: str = "") -> tuple[int, int, str, str]:
    """OUR ``usbip attach --persist``; returns (vhci port, supervisor pid, local busid, disk)."""
    before = gadgets.vhci_devices(guest, STORAGE_VID, STORAGE_PID)
    r = our_usbip(guest, f"--json {options} --tcp-port {tcp_port} attach -r {HOST_FROM_GUEST} -b 100-1 --persist")
    assert r.rc == 0, r
    doc = json.loads(r.out.strip().splitlines()[-1])
    port, supervisor = doc["port"], doc["persist"]
    assert guest.run(f'[ "$(cat /proc/{supervisor}/comm)" = usbip-persist ]').rc == 0, persist_log(guest)
    local = gadgets.wait_for_device(guest, STORAGE_VID, STORAGE_PID, "/vhci_hcd.", timeout=60, exclude=before)
    return port, supervisor, local, block_device_of(guest, local)


def wait_back(guest: Guest, timeout: float) -> tuple[str, str]:
    """Wait until the device is back under vhci (after the test saw the old one go);
    returns (local busid, disk). On the same vhci port it has the same local busid."""
    try:
        local = gadgets.wait_for_device(guest, STORAGE_VID, STORAGE_PID, "/vhci_hcd.", timeout=timeout)
    except Exception as exc:
        raise AssertionError(f"{exc}\n--- persist.log ---\n{persist_log(guest)}") from None
    return local, block_device_of(guest, local)


def detach_for_good(guest: Guest, supervisor: int, local: str) -> None:
    """OUR detach of the persistent import: the supervisor ends and nothing comes back."""
    port = persistent_port(guest, supervisor)["port"]
    r = our_usbip(guest, f"detach -p {port}")
    assert r.rc == 0 and f"port {port} is now detached!" in r.out, r
    gadgets.wait_gone(guest, local, timeout=60)
    r = guest.run(gadgets.poll_sh(f"! [ -d /proc/{supervisor} ]", 20), timeout=60)
    assert r.rc == 0, "the supervisor outlived the detach:\n" + persist_log(guest)
    assert guest.run(f"ls {RECORD_DIR}/port{port}* 2>/dev/null").out.strip() == ""
    time.sleep(5)  # a few of its poll intervals: the server is up, a supervisor would have re-attached
    assert gadgets.vhci_devices(guest, STORAGE_VID, STORAGE_PID) == []
    assert ports_json(guest) == []
    assert "supervisor ends" in persist_log(guest)


# ---------------------------------------------------------------- tests


def test_persist_storage_survives_server_restart(g, our_usbipd, restarted, tmp_path):
    image = tmp_path / "disk.img"
    host_pattern = make_image(image)
    guest_pattern = os.urandom(COUNT * BLOCK)
    (g.share_dir / "guest-pattern.bin").write_bytes(guest_pattern)
    srv = our_usbipd(f"storage:{image}:32M")
    mark = dmesg_mark(g)

    port, supervisor, local, disk = attach_persist(g, srv.port)
    assert read_sha(g, disk, HOST_AT) == hashlib.sha256(host_pattern).hexdigest()
    r = g.run(
        f"dd if={GUEST_SHARE}/guest-pattern.bin of=/dev/{disk} bs={BLOCK} seek={GUEST_AT} "
        "oflag=direct conv=fsync status=none",
        timeout=120,
    )
    assert r.rc == 0, r
    shown = persistent_port(g, supervisor)
    assert shown["port"] == port and shown["persist"]["running"] and shown["remote"]["busid"] == "100-1", shown
    text = our_usbip(g, "port").out
    assert f"persistent, supervisor pid {supervisor}" in text, text

    # the server dies and comes back on the same port with the same image
    t0 = time.monotonic()
    srv.kill()
    with open(image, "rb") as f:  # what the guest wrote reached the image before the crash
        f.seek(GUEST_AT * BLOCK)
        assert f.read(COUNT * BLOCK) == guest_pattern
    gadgets.wait_gone(g, local, timeout=60)
    time.sleep(2)  # a re-import or two is refused meanwhile
    srv2 = UsbipdProcess([f"storage:{image}:32M"], tmp_path / "usbipd-2.log", port=srv.port)
    restarted.append(srv2)
    srv2.wait_ready()
    local2, disk2 = wait_back(g, timeout=120)
    took = time.monotonic() - t0
    assert read_sha(g, disk2, HOST_AT) == hashlib.sha256(host_pattern).hexdigest()
    assert read_sha(g, disk2, GUEST_AT) == hashlib.sha256(guest_pattern).hexdigest()
    log = persist_log(g)
    assert "the import ended" in log and "re-import failed" in log and "re-attached after" in log, log
    shown = persistent_port(g, supervisor)  # the same supervisor, the records followed
    assert shown["local_busid"] == local2 and shown["persist"]["running"], shown
    print(f"device back {took:.1f}s after SIGKILL (vhci port {port} -> {shown['port']}, /dev/{disk} -> /dev/{disk2})")
    print(log)

    detach_for_good(g, supervisor, local2)
    assert_no_oops(g, mark)


@pytest.mark.long
def test_persist_tls_server_restart(g, our_usbipd, restarted, tmp_path):
    pytest.importorskip("trustme")
    from .test_tls import Pki, alive

    pki = Pki(g)
    image = tmp_path / "disk.img"
    host_pattern = make_image(image)
    srv = our_usbipd(f"storage:{image}:32M", args=pki.server_args())
    port, supervisor, local, disk = attach_persist(g, srv.port, pki.client_args())
    relay1 = int(g.read_file(f"{RECORD_DIR}/port{port}.relay").decode())
    assert alive(g, relay1)
    assert read_sha(g, disk, HOST_AT) == hashlib.sha256(host_pattern).hexdigest()

    srv.kill()  # the relay sees the TLS connection end and closes vhci's end
    gadgets.wait_gone(g, local, timeout=60)
    srv2 = UsbipdProcess([f"storage:{image}:32M"], tmp_path / "usbipd-2.log", port=srv.port, args=pki.server_args())
    restarted.append(srv2)
    srv2.wait_ready()
    local2, disk2 = wait_back(g, timeout=120)
    assert read_sha(g, disk2, HOST_AT) == hashlib.sha256(host_pattern).hexdigest()
    shown = persistent_port(g, supervisor)
    relay2 = shown["tls_relay"]
    assert relay2 and relay2 != relay1 and alive(g, relay2) and not alive(g, relay1), shown
    assert "(TLS)" in persist_log(g)
    detach_for_good(g, supervisor, local2)
    r = g.run(gadgets.poll_sh(f"! [ -d /proc/{relay2} ]", 20), timeout=60)
    assert r.rc == 0, "the relay outlived the detach"


@pytest.mark.long
def test_persist_rides_out_a_stalled_server(g, our_usbipd, tmp_path):
    image = tmp_path / "disk.img"
    host_pattern = make_image(image)
    srv = our_usbipd(f"storage:{image}:32M")
    _port, supervisor, local, disk = attach_persist(g, srv.port)
    done = "/run/cyusbip/stall-read.done"
    g.run(f"rm -f {done}")
    srv.pause()
    try:
        g.start_background(
            f"dd if=/dev/{disk} bs={BLOCK} skip={HOST_AT} count={COUNT} iflag=direct status=none | sha256sum "
            f"> {done}.tmp; mv {done}.tmp {done}"
        )
        time.sleep(6)
        assert g.run(f"[ -e {done} ]").rc != 0, "the read did not stall"
    finally:
        srv.resume()
    r = g.run(gadgets.poll_sh(f"[ -e {done} ]", 60) + f"; cat {done}", timeout=90)
    assert r.rc == 0, r
    assert r.out.split()[0] == hashlib.sha256(host_pattern).hexdigest()
    log = persist_log(g)
    assert "the import ended" not in log, log
    assert persistent_port(g, supervisor)["local_busid"] == local
    detach_for_good(g, supervisor, local)


@pytest.mark.long  # the 45 s dead-peer timeout, then the backoff
def test_persist_link_down(g, our_usbipd, tmp_path):
    if g.run("modprobe sch_ingress cls_u32 act_gact && command -v tc").rc != 0:
        pytest.skip("no tc ingress filter in the guest")
    image = tmp_path / "disk.img"
    host_pattern = make_image(image)
    srv = our_usbipd(f"storage:{image}:32M")
    _port, supervisor, local, disk = attach_persist(g, srv.port)
    assert read_sha(g, disk, HOST_AT) == hashlib.sha256(host_pattern).hexdigest()

    t0 = time.monotonic()
    # every TCP segment from the server's port is dropped; ARP and the guest's own packets pass, so
    # the guest's keepalive gives up with a reset (which slirp passes on: the server frees the device)
    g.run(
        "tc qdisc add dev eth0 ingress && tc filter add dev eth0 parent ffff: protocol ip u32 "
        f"match ip src {HOST_FROM_GUEST}/32 match ip sport {srv.port} 0xffff action drop",
        timeout=60,
        check=True,
    )
    try:
        # the guest's TCP gives up on the silent server (keepalive + TCP_USER_TIMEOUT: 45 s)
        gadgets.wait_gone(g, local, timeout=120)
        lost = time.monotonic() - t0
        r = g.run(gadgets.poll_sh(f"grep -q 're-import failed' {PERSIST_LOG}", 60), timeout=90)
        assert r.rc == 0, persist_log(g)
    finally:
        g.run("tc qdisc del dev eth0 ingress", timeout=60)
    t1 = time.monotonic()
    local2, disk2 = wait_back(g, timeout=150)
    assert read_sha(g, disk2, HOST_AT) == hashlib.sha256(host_pattern).hexdigest()
    print(f"link down: vhci dropped the import after {lost:.1f}s; back {time.monotonic() - t1:.1f}s after the link")
    print(persist_log(g))
    detach_for_good(g, supervisor, local2)
