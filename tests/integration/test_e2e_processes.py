"""End to end across processes: ``usbipd`` as a subprocess, the ``usbip`` tool and our client library."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from usbip.client import Cancelled, connect
from usbip.usb.names import usb_ids

from .conftest import CSW_GOOD, READ_CAPACITY10, Bot, read10, write10
from .helpers import run

PY = sys.executable
USBIPD = [PY, "-m", "usbip.cli.usbipd_main"]
USBIP = [PY, "-m", "usbip.cli.usbip_main"]
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
DISK_SIZE = 8 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(pred: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Daemon:
    """A ``usbipd`` subprocess whose log goes to a file."""

    def __init__(self, args: list[str], port: int, log: Path) -> None:
        self.port = port
        self.log_path = log
        self._log = open(log, "wb")  # closed in kill()
        self.proc = subprocess.Popen(
            [*USBIPD, "--host", "127.0.0.1", "-t", str(port), *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        end = time.monotonic() + START_TIMEOUT
        while not accepts(port):
            if self.proc.poll() is not None:
                self.stop()
                raise AssertionError(f"usbipd exited with {self.proc.returncode}:\n{self.log}")
            if time.monotonic() > end:
                self.kill()
                raise AssertionError(f"usbipd did not accept connections within {START_TIMEOUT}s:\n{self.log}")
            time.sleep(0.02)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then the exit status (bounded)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


def cli(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def usbipd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("usbipd")
    port = free_port()
    daemon = Daemon(
        [
            "--virtual",
            "loopback",
            "--virtual",
            f"storage:{tmp}/disk.img:8M",
            "--virtual",
            "keyboard:abc",
            "--virtual",
            "serial",
        ],
        port,
        tmp / "usbipd.log",
    )
    daemon.disk = tmp / "disk.img"  # type: ignore[attr-defined]
    try:
        yield daemon
    finally:
        rc = daemon.stop()
    assert rc == 0, f"usbipd exited with {rc} on SIGTERM:\n{daemon.log}"


# ---------------------------------------------------------------- the usbip tool


def test_list_remote_has_the_linux_format(usbipd: Daemon) -> None:
    res = cli(*USBIP, "--tcp-port", str(usbipd.port), "list", "-r", "127.0.0.1")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[:3] == ["Exportable USB devices", "======================", " - 127.0.0.1"]
    ids = usb_ids()
    expect = {
        "100-1": ((0x0525, 0xA4A0), "(00/00/00)", ["(ff/00/00)"]),
        "100-2": ((0x0525, 0xA4A5), "(00/00/00)", ["(08/06/50)"]),
        "100-3": ((0x1209, 0x0001), "(00/00/00)", ["(03/01/01)"]),
        "100-4": ((0x0525, 0xA4A7), "(02/00/00)", ["(02/02/01)", "(0a/00/00)"]),
    }
    pos = 3
    for busid, ((vid, pid), dev_class, if_classes) in expect.items():
        head = f"{busid:>11}: "
        assert lines[pos].startswith(head) and lines[pos].endswith(f" ({vid:04x}:{pid:04x})"), lines[pos]
        assert " : " in lines[pos][len(head) :], lines[pos]
        assert lines[pos + 1] == f"{'':11}: /sys/devices/usbip/{busid}"
        assert lines[pos + 2].startswith(f"{'':11}: ") and lines[pos + 2].endswith(dev_class), lines[pos + 2]
        for j, cls in enumerate(if_classes):
            line = lines[pos + 3 + j]
            assert line.startswith(f"{'':11}: {j:2d} - ") and line.endswith(cls), line
        pos += 3 + len(if_classes)
        assert lines[pos] == ""
        pos += 1
    assert pos == len(lines)
    if 0x0525 in ids.vendors and (0x0525, 0xA4A0) in ids.products:
        assert lines[3] == '      100-1: Netchip Technology, Inc. : Linux-USB "Gadget Zero" (0525:a4a0)'
        assert lines[5] == "           : (Defined at Interface level) (00/00/00)"
    # the parsable format
    res = cli(*USBIP, "--tcp-port", str(usbipd.port), "list", "-r", "127.0.0.1", "-p")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "busid=100-1#usbid=0525:a4a0#",
        "busid=100-2#usbid=0525:a4a5#",
        "busid=100-3#usbid=1209:0001#",
        "busid=100-4#usbid=0525:a4a7#",
    ]


def test_list_remote_json(usbipd: Daemon) -> None:
    res = cli(*USBIP, "--json", "--tcp-port", str(usbipd.port), "list", "-r", "127.0.0.1")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["host"] == "127.0.0.1"
    devices = doc["devices"]
    assert [(d["busid"], d["idVendor"], d["idProduct"]) for d in devices] == [
        ("100-1", "0525", "a4a0"),
        ("100-2", "0525", "a4a5"),
        ("100-3", "1209", "0001"),
        ("100-4", "0525", "a4a7"),
    ]
    assert [d["busnum"] for d in devices] == [100] * 4
    assert [d["devid"] for d in devices] == [(100 << 16) | d["devnum"] for d in devices]
    assert [[i["bInterfaceClass"] for i in d["interfaces"]] for d in devices] == [[0xFF], [8], [3], [2, 0x0A]]


def test_unreachable_server_exits_3() -> None:
    port = free_port()  # nothing listens there
    res = cli(*USBIP, "--tcp-port", str(port), "list", "-r", "127.0.0.1")
    assert res.returncode == 3, (res.returncode, res.stderr)
    assert "could not connect" in res.stderr
    res = cli(*USBIP, "--json", "--tcp-port", str(port), "list", "-r", "127.0.0.1")
    assert res.returncode == 3 and res.stdout == ""


def test_versions_and_usage_errors() -> None:
    for tool, name in ((USBIP, "usbip"), (USBIPD, "usbipd")):
        res = cli(*tool, "--version")
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"{name} (cyusbip) ")
    assert cli(*USBIP, "version").returncode == 0
    assert cli(*USBIP).returncode == 2  # no command
    assert cli(*USBIP, "list").returncode == 2  # neither -r nor -l


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bogus", "unknown virtual device"),
        ("loopback:xx", "bad loopback option"),
        ("storage:", "bad storage spec"),
        ("storage:/nonexistent/dir/disk.img", "does not exist"),
        ("storage:{tmp}/x.img:12Q", "bad size"),
        ("serial:fast", "takes no options"),
    ],
)
def test_bad_virtual_spec_exits_2(spec: str, message: str, tmp_path: Path) -> None:
    port = free_port()
    res = cli(*USBIPD, "--host", "127.0.0.1", "-t", str(port), "--virtual", spec.format(tmp=tmp_path), timeout=20)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert message in res.stderr and res.stderr.startswith("usbipd: error: "), res.stderr
    assert not accepts(port)


# ---------------------------------------------------------------- our client against the subprocess


def test_client_library_against_subprocess(usbipd: Daemon) -> None:
    disk: Path = usbipd.disk  # type: ignore[attr-defined]

    async def body() -> None:
        rng = random.Random(11)
        async with connect("127.0.0.1", usbipd.port, timeout=5) as conn:
            records = await conn.list_devices()
            assert [r.busid for r in records] == ["100-1", "100-2", "100-3", "100-4"]
            # loopback: the pair, one at a time and many in flight
            lb = await conn.import_device("100-1")
            for n in (0, 1, 511, 512, 513, 20_000):
                payload = rng.randbytes(n)
                assert await lb.bulk_transfer(0x02, payload) == n
                assert await lb.bulk_transfer(0x82, n + 100) == payload
            payloads = [rng.randbytes(rng.randrange(0, 4096)) for _ in range(32)]
            urbs = [lb.submit(0x02, p) for p in payloads] + [lb.submit(0x82, 4096) for _ in payloads]
            results = await asyncio.wait_for(asyncio.gather(*(u.wait() for u in urbs)), 10)
            assert [bytes(r.data or b"") for r in results[32:]] == payloads
            with pytest.raises(Cancelled):
                await lb.bulk_transfer(0x82, 64, timeout=0.2)
            # storage: SCSI over Bulk-Only, checked against the image file of the other process
            st = await conn.import_device("100-2")
            bot = Bot(st)
            status, _res, cap = await bot.command(READ_CAPACITY10, 8)
            assert status == CSW_GOOD and struct.unpack(">II", cap) == (DISK_SIZE // 512 - 1, 512)
            fd = os.open(disk, os.O_RDONLY)
            try:
                for _ in range(5):
                    count = rng.choice((1, 8, 40))
                    lba = rng.randrange(0, DISK_SIZE // 512 - count)
                    payload = rng.randbytes(count * 512)
                    assert await bot.command(write10(lba, count), data_out=payload) == (CSW_GOOD, 0, b"")
                    assert os.pread(fd, len(payload), lba * 512) == payload
                    assert await bot.command(read10(lba, count), count * 512) == (CSW_GOOD, 0, payload)
            finally:
                os.close(fd)
            # keyboard:abc types "abc"
            kb = await conn.import_device("100-3")
            await kb.set_configuration(1)  # typing starts once configured (and a settle delay)
            reports = [await kb.interrupt_transfer(0x81, 8) for _ in range(6)]
            assert reports == [
                bytes((0, 0, u, 0, 0, 0, 0, 0)) if i % 2 == 0 else bytes(8) for i, u in enumerate((4, 4, 5, 5, 6, 6))
            ]
            # serial: the server logged its PTY; bytes go both ways through it
            m = re.search(r"exporting 100-4: SerialDevice \(PTY (\S+)\)", usbipd.log)
            assert m, usbipd.log
            ser = await conn.import_device("100-4")
            pty = os.open(m.group(1), os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            try:
                os.write(pty, b"ping from the pty")
                got = b""
                while len(got) < 17:
                    got += await ser.bulk_transfer(0x81, 512, timeout=5)  # type: ignore[operator]
                assert got == b"ping from the pty"
                assert await ser.bulk_transfer(0x01, b"pong") == 4
                loop = asyncio.get_running_loop()
                end = loop.time() + 5
                back = b""
                while len(back) < 4 and loop.time() < end:
                    try:
                        back += os.read(pty, 4 - len(back))
                    except BlockingIOError:
                        await asyncio.sleep(0.01)
                assert back == b"pong"
            finally:
                os.close(pty)

    run(body)
    # the server logged the imports and released every device
    end = time.monotonic() + 5
    while usbipd.log.count("released") < 4 and time.monotonic() < end:
        time.sleep(0.02)
    assert usbipd.log.count("released") == 4, usbipd.log


# ---------------------------------------------------------------- usbipd modes


def test_demo_lists_its_devices_and_sigterm_exits_0(tmp_path: Path) -> None:
    port = free_port()
    daemon = Daemon(["--demo", "--demo-dir", str(tmp_path)], port, tmp_path / "demo.log")
    try:
        res = cli(*USBIP, "--json", "--tcp-port", str(port), "list", "-r", "127.0.0.1")
        assert res.returncode == 0, res.stderr
        devices = json.loads(res.stdout)["devices"]
        assert [(d["busid"], d["idVendor"], d["idProduct"]) for d in devices] == [
            ("100-1", "0525", "a4a0"),
            ("100-2", "0525", "a4a5"),
            ("100-3", "1209", "0001"),
            ("100-4", "0525", "a4a7"),
            ("100-5", "1d6b", "0101"),
        ]
        assert (tmp_path / "cyusbip-demo-disk.img").stat().st_size == 64 * 1024 * 1024
        t0 = time.monotonic()
        rc = daemon.stop()
        assert rc == 0, daemon.log
        assert time.monotonic() - t0 < 5
        assert "shutting down" in daemon.log
        assert not accepts(port)
    finally:
        daemon.kill()


def test_sigterm_with_a_client_attached_exits_0(tmp_path: Path) -> None:
    port = free_port()
    daemon = Daemon(["--virtual", "loopback"], port, tmp_path / "d.log")
    try:

        async def hold() -> None:
            async with connect("127.0.0.1", port, timeout=5) as conn:
                dev = await conn.import_device("100-1")
                urb = dev.submit(0x82, 64)  # waits on the empty FIFO
                await asyncio.sleep(0.1)
                await asyncio.get_running_loop().run_in_executor(None, daemon.proc.send_signal, signal.SIGTERM)
                with pytest.raises(ConnectionError):  # Disconnected: the server went away
                    await urb.wait(STOP_TIMEOUT)

        run(hold)
        # already shutting down: wait for it (a second SIGTERM after asyncio.run returned would kill it)
        assert daemon.proc.wait(STOP_TIMEOUT) == 0, daemon.log
    finally:
        daemon.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def test_daemonize_writes_pid_file(tmp_path: Path) -> None:
    port = free_port()
    pidfile = tmp_path / "usbipd.pid"
    res = cli(
        *USBIPD, "-D", "-P", str(pidfile), "--host", "127.0.0.1", "-t", str(port), "--virtual", "loopback", timeout=20
    )
    assert res.returncode == 0, res.stderr
    pid = 0
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip().isdigit(), START_TIMEOUT, "the pid file")
        pid = int(pidfile.read_text())
        assert pid != os.getpid() and _alive(pid)
        assert os.getsid(pid) != os.getsid(0)  # detached into a session of its own
        wait_for(lambda: accepts(port), START_TIMEOUT, "the daemon to accept connections")
        res = cli(*USBIP, "--tcp-port", str(port), "list", "-r", "127.0.0.1", "-p")
        assert res.stdout.splitlines() == ["busid=100-1#usbid=0525:a4a0#"]
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not _alive(pid), STOP_TIMEOUT, "the daemon to exit")
        wait_for(lambda: not pidfile.exists(), 2, "the pid file to be removed")
    finally:
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_uvloop_serves_the_loopback(tmp_path: Path) -> None:
    pytest.importorskip("uvloop")
    port = free_port()
    daemon = Daemon(["--loop", "uvloop", "--no-libusb", "--virtual", "loopback"], port, tmp_path / "usbipd.log")
    try:

        async def body() -> None:
            async with connect("127.0.0.1", port, timeout=5) as conn:
                lb = await conn.import_device("100-1")
                payloads = [bytes([i]) * (i * 37) for i in range(32)]
                for p in payloads:
                    assert await lb.bulk_transfer(0x02, p) == len(p)
                urbs = [lb.submit(0x82, 4096) for _ in payloads] + [lb.submit(0x81, 512) for _ in range(32)]
                results = await asyncio.wait_for(asyncio.gather(*(u.wait() for u in urbs)), 10)
                assert [bytes(r.data or b"") for r in results[:32]] == payloads
                assert all(bytes(r.data or b"") == bytes(512) for r in results[32:])
                assert len(await lb.control_transfer(0x80, 6, 0x0100, 0, 18)) == 18
                await lb.close()

        run(body)
    finally:
        rc = daemon.stop()
    assert rc == 0, f"usbipd exited with {rc} on SIGTERM:\n{daemon.log}"
