"""usbipd as a service: readiness through sd_notify, the shipped systemd unit, a config file."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from .test_e2e_processes import USBIPD, Daemon, free_port


def test_ready_and_stopping_are_notified_with_a_config_file(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(15)
    conf = tmp_path / "usbipd.toml"
    conf.write_text('virtual = ["loopback"]\nno-libusb = true\n')
    port = free_port()
    old = os.environ.get("NOTIFY_SOCKET")
    os.environ["NOTIFY_SOCKET"] = path
    try:
        daemon = Daemon(["--config", str(conf)], port, tmp_path / "usbipd.log")
    finally:
        if old is None:
            del os.environ["NOTIFY_SOCKET"]
        else:
            os.environ["NOTIFY_SOCKET"] = old
    try:
        ready = listener.recv(4096).decode()
        assert "READY=1" in ready and f"MAINPID={daemon.proc.pid}" in ready, ready
        assert "exporting 100-1: LoopbackDevice" in daemon.log
        assert daemon.stop() == 0
        assert "STOPPING=1" in listener.recv(4096).decode()
    finally:
        daemon.kill()
        listener.close()


def test_a_bad_config_file_exits_2(tmp_path: Path) -> None:
    conf = tmp_path / "usbipd.toml"
    conf.write_text('virtual = ["loopback"]\nlisten = "0.0.0.0"\n')
    res = subprocess.run([*USBIPD, "--config", str(conf)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and f"{conf}, line 2: listen: unknown key" in res.stderr, res.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize(
    ("unit", "tool", "instance"), [("usbipd.service", "usbipd", ""), ("usbip-attach@.service", "usbip", "demo")]
)
def test_the_shipped_units_verify(tmp_path: Path, unit: str, tool: str, instance: str) -> None:
    text = resources.files("usbip").joinpath(f"data/systemd/{unit}").read_text()
    path = shutil.which(tool) or str(Path(sys.executable).with_name(tool))
    assert Path(path).exists(), path
    assert f"/usr/local/bin/{tool} " in text
    (tmp_path / unit).write_text(text.replace(f"/usr/local/bin/{tool} ", f"{path} "))
    name = unit.replace("@.", f"@{instance}.")
    if instance:  # the instance's file, as the unit's comment describes it
        (tmp_path / f"attach-{instance}.conf").write_text("HOST=127.0.0.1\nBUSID=1-1\n")
        (tmp_path / unit).write_text((tmp_path / unit).read_text().replace("/etc/cyusbip/", f"{tmp_path}/"))
    res = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"{tmp_path / unit}:{name}" if instance else str(tmp_path / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [line for line in (res.stdout + res.stderr).splitlines() if unit.split("@")[0] in line]
    assert res.returncode == 0 and not problems, res.stdout + res.stderr
