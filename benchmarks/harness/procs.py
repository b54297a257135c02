"""Server processes (the C ceiling, our usbipd compiled or pure) and their CPU time from /proc."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..tools.build import build
from .settings import CEILING, CLK_TCK, DEVICE, OURS, PORT_RE, PURE, PYTHON, REPO


# ---------------------------------------------------------------- CPU accounting
def stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # the comm field may contain spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = stat_fields(int(entry))
        if f is not None and int(f[1]) == pid:  # fields[1] is ppid (field 4 of stat)
            out.append(int(entry))
    return out


def cpu_sample(pid: int) -> dict[int, int]:
    """{pid: utime + stime in clock ticks (all threads)} for ``pid`` and its live children.

    The ceiling forks one child per connection, so its children count; they are
    sampled while the connection is alive (inside the measured window).
    """
    out = {}
    for p in [pid, *_children(pid)]:
        f = stat_fields(p)
        if f is not None:
            out[p] = int(f[11]) + int(f[12])  # utime, stime (fields 14 and 15 of stat)
    return out


def cpu_delta(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds spent between two samples by the processes alive at the second one
    (a process born in between counts from zero; one gone since, such as the child of
    an earlier connection, does not count)."""
    return sum(t - before.get(p, 0) for p, t in after.items()) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live children, in seconds."""
    return sum(cpu_sample(pid).values()) / CLK_TCK


# ---------------------------------------------------------------- servers
@dataclass
class ServerProc:
    """A USB/IP server subprocess; ``prefix`` (e.g. ``ip netns exec NS``) wraps the command."""

    kind: str
    host: str = "127.0.0.1"
    prefix: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    banner: bytes = b""
    log_path: pathlib.Path | None = None
    #: the key of its runs in the results (default: ``kind``), e.g. "plain" and "tls" for two usbipd
    label: str | None = None
    #: extra usbipd options (e.g. ``--tls-cert PEM``)
    server_args: Sequence[str] = ()
    #: extra options our client needs for this server (e.g. ``--tls-ca PEM``); the C loadgen takes none
    client_args: Sequence[str] = ()

    @property
    def key(self) -> str:
        return self.label or self.kind

    @property
    def busid(self) -> str:
        return DEVICE[self.kind]["busid"]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        if self.kind == CEILING:
            return [str(build("ceiling")), "--port", "0", "--host", self.host]
        cmd = [PYTHON, "-m", "usbip.cli.usbipd_main", "--host", self.host, "-t", "0", "--virtual", "loopback"]
        return [*cmd, *self.server_args]

    def start(self, timeout: float = 30.0) -> ServerProc:
        env = dict(os.environ)
        env.pop("USBIP_NO_EXTENSIONS", None)
        if self.kind == PURE:
            env["USBIP_NO_EXTENSIONS"] = "1"
        # ceiling prints its banner on stdout, usbipd logs it on stderr: read both
        self.proc = subprocess.Popen(
            [*self.prefix, *self.command()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO),
        )
        pat = PORT_RE[CEILING if self.kind == CEILING else OURS]
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        while time.monotonic() < deadline:
            chunk = self.proc.stdout.read()
            if chunk:
                self.banner += chunk
                m = pat.search(self.banner)
                if m:
                    self.port = int(m.group(1))
                    break
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        if not self.port:
            out = self.banner.decode(errors="replace")
            self.stop()
            raise RuntimeError(f"{self.key} server did not start: {out.strip()}")
        return self

    def drain_output(self) -> None:
        """Discard what the server printed since (so a chatty server never blocks on a full pipe)."""
        if self.proc is not None and self.proc.stdout is not None:
            try:
                while self.proc.stdout.read():
                    pass
            except (OSError, ValueError):
                pass

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> ServerProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
