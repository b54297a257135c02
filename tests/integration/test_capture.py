"""URB capture read back by Wireshark (tshark): the server's and the client's view of known transfers,
the size bound (rotation, stop), a full disk; usbipd --capture and usbip bench --capture end to end."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from usbip.capture import EV_COMPLETE, EV_SUBMIT, MON_BULK, CaptureFile, read_records
from usbip.client import connect
from usbip.protocol.constants import ECONNRESET, ENOENT
from usbip.server import Server
from usbip.virtual import LoopbackDevice

from .helpers import run
from .test_e2e_processes import USBIP, Daemon, cli, free_port

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(
    TSHARK is None, reason="tshark is not installed (apt-get install tshark; scripts/install-test-deps installs it)"
)

FIELDS = [
    "frame.number",
    "usb.urb_id",
    "usb.urb_type",
    "usb.transfer_type",
    "usb.endpoint_address",
    "usb.device_address",
    "usb.bus_id",
    "usb.urb_status",
    "usb.urb_len",
    "usb.data_len",
    "usb.bmRequestType",
    "usb.setup.bRequest",
    "usb.setup.wLength",
    "usb.bDescriptorType",
    "usb.idVendor",
    "usb.idProduct",
    "usb.capdata",
    "usb.iso.numdesc",
    "usb.iso.iso_status",
    "usb.iso.iso_off",
    "usb.iso.iso_len",
    "usb.iso.data",
]
OUT_PAYLOAD = b"captured bulk OUT payload"
ISO_OUT = [bytes([1]) * 100, bytes([2]) * 50]


def tshark(path: str | Path, *extra: str) -> list[dict[str, str]]:
    """One dict per frame: field -> value as tshark prints it (occurrences joined by ',')."""
    assert TSHARK is not None
    cmd = [TSHARK, "-r", str(path), "-T", "fields", "-E", "separator=/t", "-E", "occurrence=a"]
    cmd += ["-E", "aggregator=,", *extra]
    for f in FIELDS:
        cmd += ["-e", f]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    for bad in ("cut short", "isn't a capture file", "appears to be damaged", "Malformed"):
        assert bad not in res.stderr and bad not in res.stdout
    rows = []
    for line in res.stdout.splitlines():
        values = line.split("\t")
        row = dict(zip(FIELDS, values + [""] * (len(FIELDS) - len(values)), strict=True))
        row["usb.urb_type"] = row["usb.urb_type"].strip("'")
        rows.append(row)
    return rows


def first(values: str) -> str:
    return values.split(",")[0]


async def _traffic(srv: Server, client_capture: CaptureFile | None) -> dict[str, Any]:
    """Known transfers on the loopback device: descriptors (import), bulk OUT then IN through its
    FIFO, iso IN and OUT (alt setting 1), a cancelled bulk IN, an URB for an endpoint it lacks."""
    got: dict[str, Any] = {}
    async with connect("127.0.0.1", srv.port, capture=client_capture) as conn:
        dev = await conn.import_device("100-1")
        assert await dev.bulk_transfer(0x02, OUT_PAYLOAD) == len(OUT_PAYLOAD)
        got["bulk_in"] = await dev.bulk_transfer(0x82, 512)
        await dev.set_interface(0, 1)
        res = await dev.iso_transfer(0x83, [1024, 1024, 512])
        got["iso_in"] = res.packets()
        res = await dev.iso_transfer(0x03, ISO_OUT)
        assert res.status == 0
        pending = dev.submit(0x82, 512)  # the FIFO is empty: it waits until cancelled
        await asyncio.sleep(0.05)
        pending.cancel()
        got["unlinked"] = (await pending.wait(5)).status
        got["refused"] = (await dev.submit(0x8F, 64).wait(5)).status
        await dev.close()
    return got


def _by_id(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        out.setdefault(r["usb.urb_id"], []).append(r)
    return out


def _check_view(rows: list[dict[str, str]], side: str) -> None:
    """What both captures must show (server: ``side="server"``, client: ``"client"``)."""
    urbs = _by_id(rows)
    # every URB: one submit, then one completion (or error)
    for urb_id, events in urbs.items():
        types = [e["usb.urb_type"] for e in events]
        assert types in (["S", "C"], ["S", "E"]), (urb_id, types)
        assert int(urb_id, 16) >> 32 >= 1
    for r in rows:
        assert r["usb.device_address"] == "2" and r["usb.bus_id"] == "100"  # busid 100-1: busnum 100, devnum 2

    # GET_DESCRIPTOR(DEVICE): setup packet in the submit, the descriptor decoded in the completion
    s, c = next(ev for ev in urbs.values() if ev[0]["usb.setup.bRequest"] == "6" and ev[0]["usb.setup.wLength"] == "18")
    assert (s["usb.transfer_type"], s["usb.endpoint_address"]) == ("0x02", "0x80")
    assert s["usb.bmRequestType"] == "0x80" and s["usb.bDescriptorType"] == "0x01"  # wValue: DEVICE, index 0
    assert s["usb.urb_len"] == "18" and s["usb.data_len"] == "0"
    assert c["usb.urb_type"] == "C" and c["usb.urb_status"] == "0" and c["usb.data_len"] == "18"
    assert first(c["usb.bDescriptorType"]) == "0x01"
    assert c["usb.idVendor"] == "0x0525" and c["usb.idProduct"] == "0xa4a0"

    # bulk OUT: the payload in the submit; bulk IN: the same bytes in the completion
    out = [ev for ev in urbs.values() if ev[0]["usb.endpoint_address"] == "0x02"]
    assert len(out) == 1
    s, c = out[0]
    assert s["usb.transfer_type"] == "0x03" and s["usb.capdata"] == OUT_PAYLOAD.hex()
    assert c["usb.capdata"] == "" and c["usb.urb_len"] == str(len(OUT_PAYLOAD))
    bulk_in = [ev for ev in urbs.values() if ev[0]["usb.endpoint_address"] == "0x82"]
    assert len(bulk_in) == 2
    s, c = bulk_in[0]
    assert s["usb.capdata"] == "" and s["usb.urb_len"] == "512"
    assert c["usb.capdata"] == OUT_PAYLOAD.hex() and c["usb.urb_status"] == "0"

    # the cancelled one: completed with -ECONNRESET, no data
    s, c = bulk_in[1]
    assert c["usb.urb_type"] == "C" and c["usb.urb_status"] == str(ECONNRESET) and c["usb.capdata"] == ""

    # iso IN: descriptors with actual lengths and the packets' data; iso OUT: the data in the submit
    (s, c) = next(ev for ev in urbs.values() if ev[0]["usb.endpoint_address"] == "0x83")
    assert s["usb.transfer_type"] == "0x00" and first(s["usb.iso.numdesc"]) == "3"
    assert s["usb.iso.iso_off"] == "0,1024,2048" and s["usb.iso.iso_len"] == "1024,1024,512"
    assert first(c["usb.iso.numdesc"]) == "3" and c["usb.iso.iso_status"] == "0,0,0"
    assert c["usb.iso.iso_len"] == "1024,1024,512" and c["usb.urb_len"] == "2560"
    pattern = bytes((i % 1024) % 63 for i in range(512))  # gadget zero pattern 1
    assert c["usb.iso.data"].split(",")[2] == pattern.hex()
    (s, c) = next(ev for ev in urbs.values() if ev[0]["usb.endpoint_address"] == "0x03")
    assert s["usb.iso.iso_len"] == "100,50" and s["usb.iso.data"] == ",".join(p.hex() for p in ISO_OUT)
    assert c["usb.iso.iso_len"] == "100,50" and c["usb.iso.data"] == ""

    # the endpoint the device lacks: the server refuses it (E), the client sees it complete with -ENOENT
    (s, e) = next(ev for ev in urbs.values() if ev[0]["usb.endpoint_address"] == "0x8f")
    assert e["usb.urb_status"] == str(ENOENT)
    assert e["usb.urb_type"] == ("E" if side == "server" else "C")


@needs_tshark
def test_server_and_client_captures_decode_as_usb(tmp_path: Path) -> None:
    server_cap = CaptureFile(str(tmp_path / "server.pcapng"))
    client_cap = CaptureFile(str(tmp_path / "client.pcapng"))

    async def body() -> dict[str, Any]:
        async with Server([LoopbackDevice(pattern=1)], host="127.0.0.1", port=0, capture=server_cap) as srv:
            return await _traffic(srv, client_cap)

    try:
        got = run(body)
    finally:
        server_cap.close()
        client_cap.close()
    assert got["bulk_in"] == OUT_PAYLOAD and got["unlinked"] == ECONNRESET and got["refused"] == ENOENT
    server = tshark(server_cap.path)
    client = tshark(client_cap.path)
    _check_view(server, "server")
    _check_view(client, "client")
    # the two views of one import line up: same URBs (seqnums), same events
    assert [(r["usb.urb_id"][-8:], r["usb.endpoint_address"]) for r in server] == [
        (r["usb.urb_id"][-8:], r["usb.endpoint_address"]) for r in client
    ]
    assert server_cap.dropped == server_cap.lost == client_cap.dropped == client_cap.lost == 0


def test_capture_to_a_full_disk_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "usbip.capture")
    cap = CaptureFile("/dev/full")

    async def body() -> dict[str, Any]:
        async with Server([LoopbackDevice(pattern=1)], host="127.0.0.1", port=0, capture=cap) as srv:
            first = await _traffic(srv, None)
            await asyncio.get_running_loop().run_in_executor(None, cap.flush)
            second = await _traffic(srv, None)  # still serving after the write errors
            return {"first": first, "second": second}

    try:
        got = run(body)
    finally:
        cap.close()
    assert got["first"] == got["second"] and got["second"]["bulk_in"] == OUT_PAYLOAD
    assert cap.lost > 0 and cap.written == 0
    assert "capture /dev/full: cannot write: No space left on device" in caplog.text


# ---------------------------------------------------------------- the command-line tools
async def _bulk_load(port: int, rounds: int, size: int = 4096) -> None:
    async with connect("127.0.0.1", port) as conn:
        dev = await conn.import_device("100-1")
        for _ in range(rounds):
            assert await dev.bulk_transfer(0x01, bytes(size)) == size
        await dev.close()


@needs_tshark
def test_usbipd_capture_rotates(tmp_path: Path) -> None:
    path = tmp_path / "usbipd.pcapng"
    port = free_port()
    d = Daemon(
        ["--virtual", "loopback", "--capture", str(path), "--capture-max-mb", "0.05", "--capture-files", "3"],
        port,
        tmp_path / "usbipd.log",
    )
    try:
        run(lambda: _bulk_load(port, 60))
    finally:
        rc = d.stop()
    assert rc == 0, d.log
    assert "rotated" in d.log
    assert not Path(f"{path}.3").exists()
    for p in (path, Path(f"{path}.1"), Path(f"{path}.2")):
        assert 0 < p.stat().st_size <= 0.05 * 1024 * 1024
        rows = tshark(p)
        assert rows and all(r["usb.bus_id"] == "100" for r in rows)
        assert oct(p.stat().st_mode & 0o777) == oct(0o600)  # URB payloads are nobody else's business
    newest = tshark(path)
    assert newest[-1]["usb.urb_type"] in ("C", "S")


@needs_tshark
def test_usbipd_capture_stops_at_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "stop.pcapng"
    port = free_port()
    d = Daemon(
        ["--virtual", "loopback", "--capture", str(path), "--capture-max-mb", "0.05"], port, tmp_path / "usbipd.log"
    )
    try:
        run(lambda: _bulk_load(port, 60))
        run(lambda: _bulk_load(port, 5))  # serving goes on after capturing stopped
    finally:
        rc = d.stop()
    assert rc == 0, d.log
    assert "reached its size bound" in d.log and "capturing stopped" in d.log
    assert not Path(f"{path}.1").exists()
    assert path.stat().st_size <= 0.05 * 1024 * 1024
    assert tshark(path)


def test_usbipd_capture_on_a_full_disk(tmp_path: Path) -> None:
    port = free_port()
    d = Daemon(["--virtual", "loopback", "--capture", "/dev/full"], port, tmp_path / "usbipd.log")
    try:
        run(lambda: _bulk_load(port, 20))
        time.sleep(1.0)  # a writer pass (every 0.5 s) at least
        run(lambda: _bulk_load(port, 20))
        assert d.proc.poll() is None
    finally:
        rc = d.stop()
    assert rc == 0, d.log
    assert "capture /dev/full: cannot write: No space left on device" in d.log


def test_usbipd_capture_bad_path_is_a_usage_error(tmp_path: Path) -> None:
    res = cli(
        *USBIP[:2],
        "usbip.cli.usbipd_main",
        "--virtual",
        "loopback",
        "-t",
        str(free_port()),
        "--capture",
        str(tmp_path / "no" / "dir" / "c.pcapng"),
    )
    assert res.returncode == 2, res.stderr
    assert "--capture" in res.stderr and "No such file or directory" in res.stderr


@needs_tshark
def test_usbip_bench_capture(tmp_path: Path) -> None:
    path = tmp_path / "bench.pcapng"
    port = free_port()
    d = Daemon(["--virtual", "loopback"], port, tmp_path / "usbipd.log")
    try:
        res = cli(
            *USBIP,
            "-t",
            str(port),
            "bench",
            "-r",
            "127.0.0.1",
            "-b",
            "100-1",
            "--quick",
            "--seconds",
            "0.02",
            "--capture",
            str(path),
            "--capture-max-mb",
            "20",
            timeout=120,
        )
    finally:
        d.stop()
    assert res.returncode == 0, res.stderr
    assert os.path.getsize(path) <= 20 * 1024 * 1024
    rows = tshark(path, "-c", "200")  # the start: descriptors, then the control latency case
    kinds = {(r["usb.transfer_type"], r["usb.endpoint_address"], r["usb.urb_type"]) for r in rows}
    assert ("0x02", "0x80", "S") in kinds and ("0x02", "0x80", "C") in kinds
    recs = read_records(path.read_bytes())  # all of it (tshark takes long on big files)
    bulk = {(r["epnum"], r["type"]) for r in recs if r["xfer_type"] == MON_BULK}
    assert {(0x81, EV_SUBMIT), (0x81, EV_COMPLETE)} <= bulk, (bulk, res.stderr)
    bulk_in = [r for r in recs if r["epnum"] == 0x81 and r["type"] == EV_COMPLETE]
    bad = [r for r in bulk_in if not len(r["data"]) == r["length"] > 0 or r["status"] != 0]
    assert not bad, (bad[:3], res.stderr)
