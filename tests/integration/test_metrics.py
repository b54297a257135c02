"""usbipd --metrics: Prometheus text and a JSON status that follow real traffic."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from usbip.client import TransferError, connect

from .helpers import run
from .test_e2e_processes import USBIP, Daemon, free_port

pytest.importorskip("prometheus_client")


def get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return resp.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in:\n{text}")


def test_metrics_and_status_follow_traffic(tmp_path: Path) -> None:
    port, mport = free_port(), free_port()
    daemon = Daemon(
        [
            *("--virtual", "loopback", "--virtual", "keyboard:x", "--no-libusb"),
            *("--metrics", f"127.0.0.1:{mport}", "--capture", str(tmp_path / "usb.pcapng")),
        ],
        port,
        tmp_path / "usbipd.log",
    )
    try:

        async def traffic() -> None:
            async with connect("127.0.0.1", port) as conn:
                dev = await conn.import_device("100-1")
                for _ in range(10):
                    await dev.bulk_transfer(0x81, 512)
                with pytest.raises(TransferError):  # an endpoint the device does not have: -ENOENT
                    await dev.bulk_transfer(0x8F, 64)
                live = json.loads(get(mport, "/status"))
                (c,) = live["connections"]
                assert c["busid"] == "100-1" and c["client"].startswith("127.0.0.1") and c["urbs_completed"] >= 11
                await dev.close()

        run(traffic)
        text = get(mport, "/metrics")
        assert metric(text, "usbip_device_urbs_total", busid="100-1") >= 11
        assert metric(text, "usbip_device_urb_errors_total", busid="100-1", status="-2") == 1
        assert metric(text, "usbip_device_imports_total", busid="100-1") == 1
        assert metric(text, "usbip_device_bytes_total", busid="100-1", direction="out") >= 10 * 512
        assert metric(text, "usbip_device_imported", busid="100-2") == 0
        assert metric(text, "usbip_connections_total") >= 2
        # the capture's records: submit + completion of the 11 URBs, at least
        assert metric(text, "usbip_capture_records_total", outcome="accepted") >= 22
        assert metric(text, "usbip_capture_records_total", outcome="dropped") == 0
        res = subprocess.run(
            [*USBIP, "--json", "status", f"127.0.0.1:{mport}"], capture_output=True, text=True, timeout=30
        )
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert [d["busid"] for d in doc["devices"]] == ["100-1", "100-2"] and doc["connections"] == []
        text_out = subprocess.run([*USBIP, "status", f"127.0.0.1:{mport}"], capture_output=True, text=True, timeout=30)
        assert "LoopbackDevice" in text_out.stdout
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_metrics_port_in_use_and_bad_address(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        usbipd = [sys.executable, "-m", "usbip.cli.usbipd_main", "--no-libusb", "--virtual", "loopback"]
        res = subprocess.run(
            [*usbipd, "--host", "127.0.0.1", "-t", str(free_port()), "--metrics", f"127.0.0.1:{taken}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 1 and f"--metrics 127.0.0.1:{taken}" in res.stderr, res.stderr
    res = subprocess.run(
        [*usbipd, "--host", "127.0.0.1", "--metrics", "nonsense"], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 2 and "expected HOST:PORT" in res.stderr
    res = subprocess.run([*USBIP, "status", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 3
