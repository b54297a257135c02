"""Host-side servers for the interop tests: OUR ``usbipd`` as a subprocess, and a
hostile USB/IP server that answers the import properly and then sends garbage.

The guest (QEMU user networking) reaches the host's 127.0.0.1 as ``10.0.2.2``, so a
server listening on 127.0.0.1:PORT on the host is imported in the guest with
``usbip --tcp-port PORT attach -r 10.0.2.2 -b BUSID``.

* :class:`UsbipdProcess`: ``python3 -m usbip.cli.usbipd_main --host 127.0.0.1 -t
  PORT -d --virtual ...`` with its log in a file; :meth:`~UsbipdProcess.stop` sends
  SIGTERM and returns the exit status (bounded wait).
* fixture ``our_usbipd``: a factory ``start(*specs) -> UsbipdProcess``; at teardown
  every server not killed on purpose is stopped with SIGTERM and must exit 0 within
  a bound. The servers' logs are attached to the report of a failing test.
* :class:`GarbageServer`: a thread serving one import of a loopback-like device
  (descriptors from :class:`usbip.virtual.LoopbackDevice`); it answers endpoint 0
  properly and replies to the first data URB (or the N-th URB) with garbage.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: the host as seen from the guest (QEMU user networking)
HOST_FROM_GUEST = "10.0.2.2"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pdeathsig() -> None:  # in the child between fork and exec: die with the test runner
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class UsbipdProcess:
    """OUR usbipd running on the host (127.0.0.1:port), with a log file."""

    def __init__(self, specs: list[str], log_path: Path, port: int | None = None, args: Sequence[str] = ()) -> None:
        self.specs = list(specs)
        self.args = list(args)  # more usbipd options (--tls-cert PEM, --allow-device ...)
        self.port = port or free_port()
        self.log_path = Path(log_path)
        self.killed = False  # set by kill(): teardown then does not expect exit status 0
        cmd = [sys.executable, "-m", "usbip.cli.usbipd_main", "--host", "127.0.0.1", "-t", str(self.port), "-d"]
        for s in self.specs:
            cmd += ["--virtual", s]
        cmd += self.args
        self.cmd = cmd
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=str(REPO),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_pdeathsig,
                close_fds=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"<cannot read {self.log_path}: {exc}>"

    def log_tail(self, lines: int = 120) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> UsbipdProcess:
        """Wait until the server accepts TCP connections (and said which devices it exports)."""
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise RuntimeError(f"usbipd exited with {rc} before listening:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                    pass
                if self.log().count("exporting ") >= len(self.specs):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"usbipd not listening on 127.0.0.1:{self.port} after {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait (bounded); returns the exit status, or None if it had to be killed."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None

    def kill(self) -> None:
        """SIGKILL (a crash, as far as the client can tell)."""
        self.killed = True
        self.proc.kill()
        self.proc.wait(10)

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def __repr__(self) -> str:
        return f"<usbipd pid={self.pid} 127.0.0.1:{self.port} {self.specs}>"


class _LogAttacher:
    """pytest plugin (registered at run time by the fixture): on a failing report,
    append the logs of the servers the test started."""

    def __init__(self) -> None:
        self.by_item: dict[str, list[UsbipdProcess]] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        if report.failed:
            for srv in self.by_item.get(item.nodeid, []):
                report.sections.append((f"our usbipd log ({srv.log_path}, {srv!r})", srv.log_tail(200)))


_PLUGIN_NAME = "cyusbip-ourserver-logs"


@pytest.fixture(name="our_usbipd")
def our_usbipd_fixture(request, tmp_path):
    """Factory: ``srv = our_usbipd("loopback", "keyboard:hi")`` starts OUR usbipd on
    127.0.0.1:<free port> and waits until it listens; ``args=[...]`` adds usbipd options
    (``--tls-cert PEM``, ...). Teardown: SIGTERM, exit 0."""
    pm = request.config.pluginmanager
    attacher = pm.get_plugin(_PLUGIN_NAME)
    if attacher is None:
        attacher = _LogAttacher()
        pm.register(attacher, _PLUGIN_NAME)
    started: list[UsbipdProcess] = attacher.by_item.setdefault(request.node.nodeid, [])

    def start(*specs: str, args: Sequence[str] = ()) -> UsbipdProcess:
        srv = UsbipdProcess(list(specs), tmp_path / f"usbipd-{len(started) + 1}.log", args=args)
        started.append(srv)
        return srv.wait_ready()

    yield start
    bad = []
    for srv in started:
        if srv.killed:
            continue
        with contextlib.suppress(OSError):
            srv.resume()  # in case a test left it stopped
        rc = srv.stop()
        if rc != 0:
            bad.append(f"{srv!r} exit status {rc} after SIGTERM (None: still running after {STOP_TIMEOUT}s)")
    attacher.by_item.pop(request.node.nodeid, None)
    if bad:
        logs = "\n\n".join(f"--- {s.log_path} ---\n{s.log_tail(80)}" for s in started)
        pytest.fail("\n".join(bad) + "\n" + logs)


# ---------------------------------------------------------------- a hostile server

OP_REQ_IMPORT = 0x8003
OP_REP_IMPORT = 0x0003
USBIP_VERSION = 0x0111
CMD_SUBMIT, CMD_UNLINK, RET_SUBMIT, RET_UNLINK = 1, 2, 3, 4
EPIPE = 32
GARBAGE = bytes.fromhex("deadbeef") * 32  # not a valid command: vhci must drop the connection


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class GarbageServer:
    """Serves one OP_REQ_IMPORT of ``busid`` (a high-speed 0525:a4a0 loopback-like
    device) on 127.0.0.1:port, answers control requests on endpoint 0 from the
    loopback's descriptors, and answers the first URB to another endpoint (or the
    ``garbage_after``-th URB, if given) with garbage bytes instead of a RET_SUBMIT.

    ``events`` records what happened; ``closed_by_peer`` is set when the client
    closed the connection after the garbage."""

    def __init__(self, busid: str = "1-1", garbage_after: int | None = None, timeout: float = 120) -> None:
        from usbip.virtual import LoopbackDevice

        dev = LoopbackDevice()
        self.device = dev
        self.busid = busid
        self.busnum, self.devnum = 1, 2
        self.garbage_after = garbage_after
        self.timeout = timeout
        self.descriptors: dict[tuple[int, int], bytes] = {
            (1, 0): dev.device_descriptor,
            (2, 0): dev.configuration_descriptor(0),
            (3, 0): bytes((4, 3, 0x09, 0x04)),
        }
        for i, text in enumerate([dev.manufacturer, dev.product, dev.serial], start=1):
            data = str(text).encode("utf-16-le")
            self.descriptors[(3, i)] = bytes((2 + len(data), 3)) + data
        self.events: list[str] = []
        self.urbs = 0
        self.garbage_sent = threading.Event()
        self.closed_by_peer = threading.Event()
        self.error: BaseException | None = None
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(timeout)
        self.port = self.lsock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, name="garbage-usbip-server", daemon=True)

    def __enter__(self) -> GarbageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.lsock.close()
        self.thread.join(10)

    def record(self) -> bytes:
        d = self.device.device_descriptor
        path = f"/sys/devices/cyusbip-garbage/{self.busid}".encode()
        return struct.pack(
            ">256s32sIIIHHHBBBBBB",
            path,
            self.busid.encode(),
            self.busnum,
            self.devnum,
            3,  # high speed
            self.device.vendor_id,
            self.device.product_id,
            self.device.bcd_device,
            d[4],
            d[5],
            d[6],
            1,
            1,
            1,
        )

    def _run(self) -> None:
        try:
            conn, _ = self.lsock.accept()
        except OSError as exc:
            self.error = exc
            return
        with conn:
            conn.settimeout(self.timeout)
            try:
                self._serve(conn)
            except (ConnectionError, OSError) as exc:
                self.events.append(f"connection ended: {exc!r}")
                if self.garbage_sent.is_set():
                    self.closed_by_peer.set()
            except BaseException as exc:  # reported by the test
                self.error = exc

    def _serve(self, conn: socket.socket) -> None:
        version, code, _status = struct.unpack(">HHI", _recv_exactly(conn, 8))
        busid = _recv_exactly(conn, 32).split(b"\0", 1)[0].decode()
        self.events.append(f"op 0x{code:04x} version 0x{version:04x} busid {busid}")
        if code != OP_REQ_IMPORT or busid != self.busid:
            conn.sendall(struct.pack(">HHI", USBIP_VERSION, OP_REP_IMPORT, 1))
            return
        conn.sendall(struct.pack(">HHI", USBIP_VERSION, OP_REP_IMPORT, 0) + self.record())
        while True:  # RET_* headers carry devid 0, like the kernel stub's
            hdr = _recv_exactly(conn, 48)
            command, seqnum, _devid, direction, ep = struct.unpack_from(">5I", hdr, 0)
            if command == CMD_UNLINK:
                conn.sendall(struct.pack(">5Ii24x", RET_UNLINK, seqnum, 0, 0, 0, 0))
                continue
            if command != CMD_SUBMIT:
                raise ConnectionError(f"unexpected command {command}")
            _flags, length, _start, npackets, _interval = struct.unpack_from(">IIIiI", hdr, 20)
            setup = hdr[40:48]
            if direction == 0 and length:
                _recv_exactly(conn, length)
            if npackets > 0:
                _recv_exactly(conn, 16 * npackets)
            self.urbs += 1
            if (self.garbage_after is not None and self.urbs > self.garbage_after) or (
                self.garbage_after is None and ep != 0
            ):
                self.events.append(f"URB {self.urbs} (seqnum {seqnum}, ep {ep}): sending garbage")
                conn.sendall(GARBAGE)
                self.garbage_sent.set()
                # keep reading until vhci drops the connection
                while conn.recv(65536):
                    pass
                self.events.append("client closed the connection after the garbage")
                self.closed_by_peer.set()
                return
            status, data = 0, b""
            if ep == 0:
                rt, req, value, _index, wlength = struct.unpack("<BBHHH", setup)
                if rt & 0x80:
                    if req == 6 and (value >> 8, value & 0xFF) in self.descriptors:
                        data = self.descriptors[(value >> 8, value & 0xFF)][: min(wlength, length)]
                    elif req == 0:  # GET_STATUS
                        data = b"\0\0"[: min(wlength, length)]
                    elif req == 8:  # GET_CONFIGURATION
                        data = b"\1"[: min(wlength, length)]
                    else:
                        status = -EPIPE
                self.events.append(f"URB {self.urbs}: control {setup.hex()} -> {status} {len(data)} bytes")
            elif direction == 1:
                data = bytes(length)
            actual = len(data) if direction == 1 else (length if status == 0 else 0)
            conn.sendall(struct.pack(">5IiIIII8x", RET_SUBMIT, seqnum, 0, 0, 0, status, actual, 0, 0, 0) + data)
