"""``usbip attach --persist`` without the kernel: the supervisor (usbip/vhci/persist.py) against a
fake vhci-hcd (tests/integration/vhci_fake.py) and our in-process server, closed and started
again on the same TCP port. The real kernel is in tests/kernel/test_persist.py."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from usbip.cli.vhci import attach_command, detach_command, format_ports
from usbip.client import ReconnectPolicy
from usbip.server import Server
from usbip.vhci import persist, supervisors
from usbip.vhci.driver import VDEV_ST_NULL, VDEV_ST_USED, VhciError
from usbip.vhci.imports import attach_device, imported_ports
from usbip.virtual import LoopbackDevice

from .helpers import run, wait_until
from .vhci_fake import FakeVhci, make_tree

FAST = ReconnectPolicy(initial_delay=0.05, max_delay=0.2, jitter=0.0, stable_after=0.5)
POLL = 0.05
BUSID = "100-1"


@pytest.fixture
def drv(tmp_path: Path) -> FakeVhci:
    return FakeVhci(*make_tree(tmp_path))


def free(drv: FakeVhci, port: int) -> bool:
    return drv.state(port)[0] == VDEV_ST_NULL


def used(drv: FakeVhci, port: int) -> bool:
    return drv.state(port)[0] == VDEV_ST_USED


@contextlib.contextmanager
def dummy_supervisor() -> Iterator[subprocess.Popen[bytes]]:
    """A process that looks like a supervisor to ``usbip detach`` (it has the supervisor's name)."""
    name = supervisors.PROCESS_NAME.encode()
    code = f"import ctypes, time; ctypes.CDLL(None).prctl(15, {name!r}, 0, 0, 0); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    end = time.monotonic() + 10
    while not supervisors._is_ours(proc.pid) and time.monotonic() < end:
        time.sleep(0.01)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


async def start_supervisor(
    drv: FakeVhci, port: int, devid: int, tcp_port: int, pid: int | None = None, policy: ReconnectPolicy = FAST
) -> tuple[persist.Supervisor, asyncio.Task[str]]:
    pid = os.getpid() if pid is None else pid
    drv.write_persist(port, pid)
    sup = persist.Supervisor(drv, persist.Target("127.0.0.1", tcp_port, BUSID), port, devid, policy, POLL, pid)
    task = asyncio.create_task(sup.run())
    await asyncio.sleep(0)
    return sup, task


def test_reattach_after_server_restart(drv: FakeVhci, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "usbip.persist")

    async def body() -> None:
        srv = Server([LoopbackDevice()], host="127.0.0.1", port=0)
        await srv.start()
        tcp_port = srv.port
        port, rec = await attach_device("127.0.0.1", tcp_port, BUSID, drv)
        assert port == 0 and used(drv, 0)
        sup, task = await start_supervisor(drv, port, rec.devid, tcp_port)
        await asyncio.sleep(3 * POLL)
        assert sup.reattached == 0 and not task.done()  # a healthy import is left alone

        await srv.close()  # the server goes away: vhci frees the port
        assert await wait_until(lambda: free(drv, 0), 5)
        await asyncio.sleep(0.5)  # attempts fail meanwhile (connection refused), spaced by the backoff
        assert sup.reattached == 0 and free(drv, 0)
        srv = Server([LoopbackDevice()], host="127.0.0.1", port=tcp_port)
        await srv.start()
        try:
            assert await wait_until(lambda: sup.reattached == 1, 5)
            assert sup.port == 0 and used(drv, 0)
            assert drv.read_record(0) is not None and drv.read_record(0).busid == BUSID
            assert drv.read_persist(0) == os.getpid()
            assert await wait_until(lambda: srv.stats()["sessions"] == 1, 5)
            # twice: the backoff starts over once an import has been stable
            await asyncio.sleep(FAST.stable_after + 2 * POLL)
            await srv.close()
            assert await wait_until(lambda: free(drv, 0), 5)
            srv = Server([LoopbackDevice()], host="127.0.0.1", port=tcp_port)
            await srv.start()
            assert await wait_until(lambda: sup.reattached == 2, 5)
            assert sup.backoff.attempt <= 2
        finally:
            sup.stop()
            assert await asyncio.wait_for(task, 5) == "stopped"
            drv.detach(sup.port)
            await srv.close()

    run(body)
    text = caplog.text
    assert "the import ended" in text and "re-import failed" in text and "re-attached after" in text


def test_records_follow_a_taken_port_and_attach_avoids_a_kept_one(drv: FakeVhci) -> None:
    async def body() -> None:
        srv = Server([LoopbackDevice()], host="127.0.0.1", port=0)
        other = Server([LoopbackDevice()], host="127.0.0.1", port=0)
        await srv.start()
        await other.start()
        tcp_port = srv.port
        port, rec = await attach_device("127.0.0.1", tcp_port, BUSID, drv)
        sup, task = await start_supervisor(drv, port, rec.devid, tcp_port)
        try:
            await srv.close()
            assert await wait_until(lambda: free(drv, 0), 5)
            # port 0 is free but kept for the supervisor: our attach refuses it, or goes elsewhere
            with pytest.raises(VhciError, match="kept for a persistent import") as kept:
                await attach_device("127.0.0.1", other.port, BUSID, drv, port=0)
            assert kept.value.errno == errno.EBUSY
            assert (await attach_device("127.0.0.1", other.port, BUSID, drv))[0] == 1
            drv.detach(1)
            # another tool takes port 0 anyway (it does not know the records)
            drv.take(0)
            drv.write_record(0, "elsewhere", 3240, "7-7")
            srv = Server([LoopbackDevice()], host="127.0.0.1", port=tcp_port)
            await srv.start()
            assert await wait_until(lambda: sup.reattached == 1, 5)
            assert sup.port == 1 and used(drv, 1)
            rec1 = drv.read_record(1)
            assert rec1 is not None and (rec1.host, rec1.port, rec1.busid) == ("127.0.0.1", str(tcp_port), BUSID)
            assert drv.read_persist(1) == os.getpid() and drv.read_persist(0) is None
            other_rec = drv.read_record(0)
            assert other_rec is not None and other_rec.host == "elsewhere"  # not ours: left alone
            ports = {d.port: d.to_json() for d in imported_ports(drv)}
            assert ports[1]["persist"] == {"pid": os.getpid(), "running": True} and ports[0]["persist"] is None
        finally:
            sup.stop()
            await asyncio.wait_for(task, 5)
            for p in (0, 1):
                with contextlib.suppress(VhciError):
                    drv.detach(p)
            await srv.close()
            await other.close()

    run(body)


def test_detach_stops_the_supervisor_attached_or_not(drv: FakeVhci, capsys: pytest.CaptureFixture[str]) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        srv = Server([LoopbackDevice()], host="127.0.0.1", port=0)
        await srv.start()
        try:
            # attached: detach ends the supervisor (SIGTERM) and nothing comes back
            port, rec = await attach_device("127.0.0.1", srv.port, BUSID, drv)
            with dummy_supervisor() as proc:
                sup, task = await start_supervisor(drv, port, rec.devid, srv.port, pid=proc.pid)
                text = format_ports(imported_ports(drv))
                assert f"(persistent, supervisor pid {proc.pid})" in text
                rc = await loop.run_in_executor(None, detach_command, port, True, drv)
                assert rc == 0 and proc.wait(5) == -signal.SIGTERM
                assert await asyncio.wait_for(task, 5) == "the persist record is gone (usbip detach)"
            assert json.loads(capsys.readouterr().out) == {"port": 0, "detached": True, "persist_stopped": proc.pid}
            assert free(drv, 0) and drv.read_record(0) is None and drv.read_persist(0) is None
            await asyncio.sleep(5 * POLL)
            assert free(drv, 0) and sup.reattached == 0
            assert await wait_until(lambda: srv.stats()["sessions"] == 0, 5)

            # away (the server closed it, the supervisor is backing off): detach ends it too
            port, rec = await attach_device("127.0.0.1", srv.port, BUSID, drv)
            slow = ReconnectPolicy(initial_delay=0.5, max_delay=0.5, jitter=0.0)
            with dummy_supervisor() as proc:
                sup, task = await start_supervisor(drv, port, rec.devid, srv.port, pid=proc.pid, policy=slow)
                drv.detach(port)  # the connection ends (as far as the supervisor can tell)
                assert await wait_until(lambda: sup.backoff.attempt == 1, 5)
                ports = imported_ports(drv)
                assert [(d.port, d.status_text) for d in ports] == [(0, "Re-attaching (persistent import)")]
                assert "Port 00: <Re-attaching (persistent import)>" in format_ports(ports)
                rc = await loop.run_in_executor(None, detach_command, port, False, drv)
                assert rc == 0 and proc.wait(5) == -signal.SIGTERM
                assert await asyncio.wait_for(task, 5) == "the persist record is gone (usbip detach)"
            assert "port 0 is now detached!" in capsys.readouterr().out
            await asyncio.sleep(0.6)
            assert free(drv, 0) and sup.reattached == 0 and imported_ports(drv) == []
        finally:
            await srv.close()

    run(body)


def test_gives_up_after_max_attempts(drv: FakeVhci) -> None:
    async def body() -> None:
        srv = Server([LoopbackDevice()], host="127.0.0.1", port=0)
        await srv.start()
        port, rec = await attach_device("127.0.0.1", srv.port, BUSID, drv)
        policy = ReconnectPolicy(initial_delay=0.01, max_delay=0.02, max_attempts=3)
        sup, task = await start_supervisor(drv, port, rec.devid, srv.port, policy=policy)
        await srv.close()
        assert await asyncio.wait_for(task, 5) == "gave up after 3 attempts"
        sup.forget()
        assert drv.read_persist(0) is None

    run(body)


def test_a_device_that_comes_back_elsewhere_is_refused_until_it_is_back(drv: FakeVhci) -> None:
    """Unplugged on the server: the busid is unknown (refused) until it is plugged back."""

    async def body() -> None:
        srv = Server([LoopbackDevice()], host="127.0.0.1", port=0)
        await srv.start()
        tcp_port = srv.port
        port, rec = await attach_device("127.0.0.1", tcp_port, BUSID, drv)
        sup, task = await start_supervisor(drv, port, rec.devid, tcp_port)
        await srv.close()
        srv = Server([], host="127.0.0.1", port=tcp_port)  # up, but without the device
        await srv.start()
        try:
            assert await wait_until(lambda: sup.backoff.attempt >= 3, 5)
            assert sup.reattached == 0
            await srv.close()
            srv = Server([LoopbackDevice()], host="127.0.0.1", port=tcp_port)
            await srv.start()
            assert await wait_until(lambda: sup.reattached == 1, 5)
        finally:
            sup.stop()
            await asyncio.wait_for(task, 5)
            drv.detach(sup.port)
            await srv.close()

    run(body)


# ---------------------------------------------------------------- the forked process


class ServerThread:
    """Our server on its own event loop in a thread (the test's main thread forks the supervisor,
    which must not happen inside a running loop)."""

    def __init__(self, port: int = 0) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.srv = Server([LoopbackDevice()], host="127.0.0.1", port=port)
        self.call(self.srv.start())
        self.port = self.srv.port

    def call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def sessions(self) -> int:
        return self.call(_stats(self.srv))["sessions"]

    def close(self) -> None:
        self.call(self.srv.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


async def _stats(srv: Server) -> dict[str, int]:
    return srv.stats()


def poll(pred, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def test_spawned_supervisor_reattaches_logs_and_ends_with_detach(drv: FakeVhci, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(persist, "POLL_INTERVAL", POLL)
    srv = ServerThread()
    tcp_port = srv.port
    port, rec = asyncio.run(attach_device("127.0.0.1", tcp_port, BUSID, drv))
    pid = persist.spawn(drv, persist.Target("127.0.0.1", tcp_port, BUSID), port, rec.devid, FAST)
    try:
        assert drv.read_persist(port) == pid and supervisors._is_ours(pid)
        assert os.getsid(pid) != os.getsid(0)  # in a session of its own, away from the terminal
        srv.close()
        assert poll(lambda: free(drv, 0), 5)
        srv = ServerThread(tcp_port)
        assert poll(lambda: used(drv, 0), 10), Path(drv.record_dir, "persist.log").read_text()
        assert poll(lambda: srv.sessions() == 1, 5)
        assert detach_command(0, driver=drv) == 0
        assert poll(lambda: not supervisors._is_ours(pid) or _zombie(pid), 5)
        time.sleep(0.3)
        assert free(drv, 0) and drv.read_persist(0) is None
        assert poll(lambda: srv.sessions() == 0, 5)  # its socket went with it
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        srv.close()
    text = Path(drv.record_dir, "persist.log").read_text()
    assert f"usbip persist[{pid}]" in text
    for step in ("supervising", "the import ended", "re-attached after", "supervisor ends: stopped"):
        assert step in text, text


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_tls_import_comes_back_with_a_new_relay(drv: FakeVhci, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    from usbip.net.tls import client_context, server_context
    from usbip.vhci import relay

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    client = client_context(str(tmp_path / "ca.pem"))

    def server(port: int) -> Server:
        return Server([LoopbackDevice()], host="127.0.0.1", port=port, tls=server_context(str(tmp_path / "server.pem")))

    async def body() -> None:
        srv = server(0)
        await srv.start()
        tcp_port = srv.port
        port, rec = await attach_device("127.0.0.1", tcp_port, BUSID, drv, tls=client, server_hostname="localhost")
        first = drv.read_relay(port)
        assert first is not None and supervisors.pid_alive(first)
        drv.write_persist(port, os.getpid())
        target = persist.Target("127.0.0.1", tcp_port, BUSID, client, "localhost")
        sup = persist.Supervisor(drv, target, port, rec.devid, FAST, POLL)
        task = asyncio.create_task(sup.run())
        second = None
        try:
            await srv.close()  # the relay sees the TLS connection end and closes vhci's end
            assert await wait_until(lambda: free(drv, 0), 5)
            assert await wait_until(lambda: not supervisors.pid_alive(first), 5)
            srv = server(tcp_port)
            await srv.start()
            assert await wait_until(lambda: sup.reattached == 1, 10)
            second = drv.read_relay(0)
            assert second is not None and second != first and supervisors.pid_alive(second)
            assert await wait_until(lambda: srv.stats()["sessions"] == 1, 5)
        finally:
            sup.stop()
            await asyncio.wait_for(task, 5)
            with contextlib.suppress(VhciError):
                drv.detach(0)
            if second is not None:
                assert await wait_until(lambda: not supervisors.pid_alive(second), 5)  # ended with the detach
                relay.stop(second)
            await srv.close()

    run(body)


@pytest.mark.parametrize("ending", ["signal", "detach"])
def test_foreground_supervisor_ends_with_a_signal_or_detach(drv: FakeVhci, monkeypatch, ending: str) -> None:  # type: ignore[no-untyped-def]
    """``usbip attach --persist --foreground`` (the systemd unit's command): this process supervises;
    SIGTERM (``systemctl stop``) detaches the device, ``usbip detach`` ends the supervision."""
    monkeypatch.setattr(persist, "POLL_INTERVAL", POLL)
    # `usbip detach` runs in this process here: it must not signal (or kill) the test itself;
    # a supervisor in another process gets its SIGTERM (the spawned-supervisor test)
    stopped: list[int] = []
    monkeypatch.setattr(supervisors, "stop", lambda pid, timeout=0: stopped.append(pid) or True)
    srv = ServerThread()
    seen: dict[str, object] = {}

    def act() -> None:
        seen["attached"] = poll(lambda: used(drv, 0), 5)
        seen["record"] = drv.read_persist(0)
        seen["named"] = supervisors._is_ours(os.getpid())
        if ending == "signal":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            seen["detach"] = detach_command(0, driver=drv)

    def ready() -> None:
        threading.Thread(target=act, daemon=True).start()

    with open("/proc/self/comm") as f:
        name = f.read()
    try:
        rc = attach_command("127.0.0.1", srv.port, BUSID, persist=True, foreground=True, on_ready=ready, driver=drv)
    finally:
        srv.close()
    assert rc == 0
    assert seen["attached"] and seen["record"] == os.getpid() and seen["named"], seen
    assert seen.get("detach", 0) == 0 and stopped == ([os.getpid()] if ending == "detach" else [])
    assert free(drv, 0) and drv.read_persist(0) is None and drv.read_record(0) is None
    with open("/proc/self/comm") as f:
        assert f.read() == name  # the process name the supervisor took is given back
