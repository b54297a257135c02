"""Prove the kernel-test harness and the kernel's usbip chain work."""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest

from . import gadgets
from .harness import GUEST_SHARE, CommandFailed, CommandTimeout

# --------------------------------------------------------------------------
# (a) the harness itself


def test_uname_and_rc(guest):
    r = guest.run("uname -r")
    assert r.rc == 0
    assert r.out.strip() == guest.kernel_version

    r = guest.run("echo to-stderr >&2; exit 3")
    assert r.rc == 3
    assert "to-stderr" in r.out

    assert guest.run("false").rc == 1
    assert guest.run("definitely-not-a-command-xyz").rc == 127
    with pytest.raises(CommandFailed):
        guest.run("exit 5", check=True)


def test_guest_is_not_the_host(guest):
    # the guest sees its own kernel with USB support ...
    assert guest.run("modprobe usbcore && test -d /sys/bus/usb").rc == 0
    # ... and the host's root filesystem (this very file) at the same path
    assert guest.run(f"test -f {__file__}").rc == 0
    # writes in the guest do not leak to the host
    marker = f"/tmp/cyusbip-guest-only-{os.getpid()}"
    guest.run(f"echo x > {marker}", check=True)
    assert not os.path.exists(marker)


def test_command_timeout_and_background(guest):
    with pytest.raises(CommandTimeout) as exc:
        guest.run("echo started; sleep 30", timeout=2)
    assert "started" in exc.value.result.out
    # the guest is still usable afterwards
    assert guest.run("echo alive").out.strip() == "alive"

    pid, log = guest.start_background("echo bg-out; sleep 600")
    try:
        assert guest.run(f"kill -0 {pid}").rc == 0
        out = guest.run(gadgets.poll_sh(f"grep -q bg-out {log}", 20) + f"; cat {log}").out
        assert "bg-out" in out
    finally:
        guest.run(f"kill {pid}")
    # a command that backgrounds a child with '&' returns immediately
    r = guest.run("sleep 600 >/dev/null 2>&1 & echo $!", timeout=20)
    guest.run(f"kill {r.out.strip()}")


def test_run_python(guest):
    r = guest.run_python(
        "import sys, os\nprint(sys.executable, os.getcwd(), *sys.argv[1:])\nsys.exit(7)",
        cwd="/tmp",
        args=["a b", "c"],
    )
    assert r.rc == 7
    assert r.out.split() == [guest.python, "/tmp", "a", "b", "c"]


def test_share_and_file_io(guest):
    (guest.share_dir / "from-host.txt").write_text("hello guest")
    assert guest.run(f"cat {GUEST_SHARE}/from-host.txt").out == "hello guest"
    guest.run(f"echo hello host > {GUEST_SHARE}/from-guest.txt", check=True)
    assert (guest.share_dir / "from-guest.txt").read_text() == "hello host\n"

    guest.write_file("/tmp/blob.bin", bytes(range(256)))
    assert guest.read_file("/tmp/blob.bin") == bytes(range(256))
    assert guest.run("stat -c %s /tmp/blob.bin").out.strip() == "256"


# --------------------------------------------------------------------------
# (b) vhci-hcd


def test_vhci_hcd_sysfs(guest):
    guest.run("modprobe vhci-hcd", check=True)
    files = guest.run("ls /sys/devices/platform/vhci_hcd.0/", check=True).out.split()
    for name in ("attach", "detach", "status", "nports"):
        assert name in files, files
    status = guest.run("cat /sys/devices/platform/vhci_hcd.0/status", check=True).out
    assert status.startswith("hub port sta spd dev"), status


# --------------------------------------------------------------------------
# (c) the full kernel-only cycle: gadget -> usbip-host/usbipd -> vhci


def test_kernel_usbip_cycle(clean_guest):
    g = clean_guest
    vid, pid = gadgets.GADGET_ZERO_VID, gadgets.GADGET_ZERO_PID
    busid = gadgets.sourcesink(g, vid, pid, pattern=1)
    assert busid in gadgets.find_devices(g, vid, pid, "/dummy_hcd.")
    assert g.run(f"cat /sys/bus/usb/devices/{busid}/idVendor").out.strip() == "0525"

    gadgets.kernel_export(g, busid)
    assert gadgets.device_driver(g, busid) == "usbip-host"
    listing = gadgets.exportable(g)
    assert busid in listing and "0525:a4a0" in listing, listing
    assert gadgets.vhci_devices(g, vid, pid) == []

    imported = gadgets.vhci_attach(g, busid, "127.0.0.1", vid=vid, pid=pid)
    local = imported.local_busid
    assert local, imported
    assert "/vhci_hcd." in g.run(f"readlink -f /sys/bus/usb/devices/{local}").out
    assert g.run(f"cat /sys/bus/usb/devices/{local}/idProduct").out.strip() == "a4a0"
    # the imported device answers control requests: its descriptors were read
    assert g.run(f"cat /sys/bus/usb/devices/{local}/bNumConfigurations").out.strip() == "1"
    ports = gadgets.usbip_port(g)
    assert [p.remote_busid for p in ports] == [busid]
    assert ports[0].url == f"usbip://127.0.0.1:3240/{busid}"
    # the exporting side reports the device as in use
    status = g.run(f"cat /sys/bus/usb/devices/{busid}/usbip_status").out.strip()
    assert status == "2", status  # SDEV_ST_USED

    gadgets.vhci_detach(g, imported.port)
    gadgets.wait_gone(g, local)
    assert gadgets.usbip_port(g) == []
    assert gadgets.vhci_devices(g, vid, pid) == []

    gadgets.kernel_unexport(g, busid)
    assert gadgets.device_driver(g, busid) == "usb"
    gadgets.remove_gadget(g, "sourcesink")
    gadgets.wait_gone(g, busid)


# --------------------------------------------------------------------------
# (d) networking


def test_guest_reaches_host_loopback(guest):
    received = []
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(60)
    port = srv.getsockname()[1]

    def serve():
        try:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(30)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                received.append(data)
                conn.sendall(b"pong:" + data)
        except OSError as exc:  # reported through `received`
            received.append(exc)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        r = guest.run(
            'python3 -c "import socket; '
            f"s = socket.create_connection(('10.0.2.2', {port}), 20); "
            "s.sendall(b'hello-from-guest\\n'); print(s.recv(100).decode().strip())\"",
            timeout=60,
        )
        t.join(30)
    finally:
        srv.close()
    assert r.rc == 0, r
    assert received == [b"hello-from-guest\n"]
    assert r.out.strip() == "pong:hello-from-guest"


def test_host_reaches_guest_through_hostfwd(clean_guest):
    """Host -> guest usbipd via the forwarded port: OP_REQ_DEVLIST."""
    gadgets.start_usbipd(clean_guest)
    with socket.create_connection(("127.0.0.1", clean_guest.host_port(3240)), 30) as s:
        s.settimeout(30)
        s.sendall(struct.pack(">HHI", 0x0111, 0x8005, 0))
        hdr = b""
        while len(hdr) < 12:
            chunk = s.recv(12 - len(hdr))
            if not chunk:
                break
            hdr += chunk
    version, code, status, ndev = struct.unpack(">HHII", hdr)
    assert (version, code, status) == (0x0111, 0x0005, 0)
    assert ndev == 0
