"""Boot a real Linux kernel (with the USB stack) in QEMU and run commands in it.

The host kernel of the CI machine has no USB support, so kernel-level tests
(vhci-hcd, usbip-host, dummy_hcd gadgets, ...) run inside a small VM:

* ``-kernel /boot/vmlinuz-<ver>`` plus a tiny busybox initramfs that initramfs.py builds
  (cached, keyed by kernel version and by the content of the init
  script and modules);
* the initramfs loads virtio/9p/overlay modules, mounts the host's ``/``
  read-only over 9p as the lower dir of an overlayfs with a tmpfs upper dir and
  ``switch_root``s into it - the guest therefore runs the host's own binaries,
  Python, venvs and this checkout at the same paths (writes stay in the VM);
* a second, writable 9p share (``Guest.share_dir`` on the host,
  ``GUEST_SHARE`` in the guest) exchanges files;
* PID 1 of the guest is a small stdlib-only Python agent (``AGENT_SOURCE``)
  that talks JSON lines over a virtio-serial port connected to a unix socket
  on the host.  ``Guest.run()`` sends a shell command and gets rc + output.

Everything is stdlib only.  Environment overrides:

* ``USBIP_QEMU_ACCEL``            (default ``tcg``; KVM hangs at boot here)
* ``USBIP_QEMU``                  (qemu binary, default ``qemu-system-x86_64``)
* ``USBIP_KERNEL_VERSION``        (default: newest kernel with usbip modules)
* ``USBIP_KERNEL_CACHE``          (default ``~/.cache/cyusbip-kernel``)
* ``USBIP_KERNEL_BOOT_TIMEOUT``   (seconds, default 180)
* ``USBIP_KERNEL_MEMORY``         (MiB, default 1536)
* ``USBIP_KERNEL_SMP``            (default 2)
* ``USBIP_GUEST_CMD_LOG``         (off by default) a host file to which every ``Guest.run``
  appends ``seconds<TAB>test<TAB>command`` (the guest's duration of the command, pytest's
  current test id or ``-``, the command on one line): where a kernel test's time goes
"""

from __future__ import annotations

import base64
import compileall
import ctypes
import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import CommandFailed, CommandTimeout, GuestDied, GuestError, GuestTimeout, Result
from .initramfs import GUEST_SHARE, build_initramfs, cache_dir, find_kernel, qemu_binary, skip_reason

__all__ = [
    "GUEST_SHARE",
    "CommandFailed",
    "CommandTimeout",
    "Guest",
    "GuestDied",
    "GuestError",
    "GuestTimeout",
    "Result",
    "build_initramfs",
    "find_kernel",
    "skip_reason",
]

#: guest PATH: system directories only, so ``usbip``/``usbipd``/``python3``
#: are Debian's; the Python running the tests is ``Guest.python`` (also
#: ``$CYUSBIP_PYTHON`` in the guest).
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
AGENT_PORT_NAME = "cyusbip.agent"


# --------------------------------------------------------------------------
# the guest runs the host's Python and package


def compile_package() -> None:
    """Write the bytecode of the ``usbip`` package next to its sources. The tests run with
    PYTHONDONTWRITEBYTECODE=1 (here and in the guest), so without this every Python process
    compiles every module it imports again: about half of a command's start-up natively, and
    seconds of every guest ``usbip`` call under TCG (the guest reads the host's files over 9p,
    these .pyc files included)."""
    import usbip

    for root in usbip.__path__:
        compileall.compile_dir(root, quiet=1)


# --------------------------------------------------------------------------
# errors / results


# --------------------------------------------------------------------------
# guest agent (runs as PID 1 inside the guest; stdlib only)


AGENT_SOURCE = (Path(__file__).parent / "guest_agent.py").read_text()  # PID 1 of the guest


def _setup_script(extra: str = "") -> str:
    return f"""
set +e
modprobe configfs 2>/dev/null
mkdir -p /dev/pts /dev/shm /run/lock /run/cyusbip
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr
hostname cyusbip-guest 2>/dev/null
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
{extra}
true
"""


# --------------------------------------------------------------------------
# host side


_counter = itertools.count(1)
_CMD_LOG = os.environ.get("USBIP_GUEST_CMD_LOG", "")


def _log_command(seconds: float, cmd: str) -> None:
    """One line per guest command in ``$USBIP_GUEST_CMD_LOG`` (see the module docstring)."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "-").split(" ")[0]
    line = " ".join(cmd.split())[:400]
    with open(_CMD_LOG, "a") as fh:
        fh.write(f"{seconds:.2f}\t{test}\t{line}\n")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _kill_proc(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.kill()
        proc.wait(timeout=10)
    except Exception:
        pass


class Guest:
    """A QEMU VM running the host's root filesystem on a USB-capable kernel.

    Use as a context manager (boots on enter, always kills QEMU on exit)::

        with Guest() as g:
            assert g.run("uname -r").out.strip() == g.kernel_version
    """

    def __init__(
        self,
        *,
        kernel_version: str | None = None,
        memory: int | None = None,
        smp: int | None = None,
        boot_timeout: float | None = None,
        hostfwd: Sequence[int | tuple[int, int]] = (),
        accel: str | None = None,
        extra_setup: str = "",
        extra_qemu_args: Sequence[str] = (),
        python: str | None = None,
        run_dir: str | os.PathLike | None = None,
    ) -> None:
        """
        hostfwd: guest TCP ports to forward from the host's 127.0.0.1; an int
            G picks a free host port, a tuple (H, G) uses host port H.  See
            :meth:`host_port`.
        extra_setup: shell snippet run in the guest at the end of its setup.
        run_dir: host directory for console.log, qemu.log and share/
            (default: a new directory under the cache dir, last 5 kept).
        """
        if kernel_version is None:
            kernel_version, image = find_kernel()
        else:
            image = f"/boot/vmlinuz-{kernel_version}"
        self.kernel_version = kernel_version
        self.kernel_image = image
        self.memory = int(memory or os.environ.get("USBIP_KERNEL_MEMORY", 1536))
        self.smp = int(smp or os.environ.get("USBIP_KERNEL_SMP", 2))
        self.boot_timeout = float(boot_timeout or os.environ.get("USBIP_KERNEL_BOOT_TIMEOUT", 180))
        self.accel = accel or os.environ.get("USBIP_QEMU_ACCEL", "tcg")
        self.extra_setup = extra_setup
        self.extra_qemu_args = list(extra_qemu_args)
        # the interpreter running the tests (venv-aware: not realpath'ed, so
        # a venv's site-packages are used); the agent uses the same one
        self.python = python or sys.executable
        self.forwards: dict[int, int] = {}
        for fwd in hostfwd:
            if isinstance(fwd, int):
                self.forwards[fwd] = _free_port()
            else:
                h, g = fwd
                self.forwards[int(g)] = int(h) or _free_port()

        if run_dir is None:
            runs = cache_dir() / "runs"
            runs.mkdir(parents=True, exist_ok=True)
            self._prune_runs(runs, keep=10)
            run_dir = runs / time.strftime(f"%Y%m%d-%H%M%S-{os.getpid()}-{next(_counter)}")
        self.run_dir = Path(run_dir)
        self.share_dir = self.run_dir / "share"
        self.console_log = self.run_dir / "console.log"
        self.qemu_log = self.run_dir / "qemu.log"
        self.boot_time: float | None = None

        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._sockdir: str | None = None
        self._buf = b""
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._finalizer = None

    # -- lifecycle ---------------------------------------------------------

    @staticmethod
    def _prune_runs(runs: Path, keep: int, min_age: float = 6 * 3600) -> None:
        """Delete old run dirs beyond the newest ``keep`` (never recent ones:
        a concurrent session may still be using its share)."""
        try:
            dirs = sorted((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        except OSError:
            return
        now = time.time()
        for old in dirs[:-keep] if keep else dirs:
            try:
                if now - old.stat().st_mtime > min_age:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass

    def __enter__(self) -> Guest:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def qemu_command(self, initrd: Path, sock_path: str) -> list[str]:
        qemu = qemu_binary()
        if qemu is None:
            raise GuestError("qemu-system-x86_64 not found")
        netdev = "user,id=n0"
        for g, h in self.forwards.items():
            netdev += f",hostfwd=tcp:127.0.0.1:{h}-:{g}"
        append = " ".join(
            [
                "console=ttyS0",
                "panic=-1",
                "quiet",
                "loglevel=4",
                "log_buf_len=8M",  # the shared guest's tests read dmesg since their own marker
                "rdinit=/init",
                "8250.nr_uarts=1",
                "tsc=reliable",
                "no_timer_check",
                f"cyusbip_python={self.python}",
            ]
        )
        return [
            qemu,
            "-nodefaults",
            "-no-user-config",
            "-accel",
            self.accel,
            "-m",
            str(self.memory),
            "-smp",
            str(self.smp),
            "-display",
            "none",
            "-vga",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-kernel",
            self.kernel_image,
            "-initrd",
            str(initrd),
            "-append",
            append,
            "-chardev",
            f"file,id=con0,path={self.console_log}",
            "-serial",
            "chardev:con0",
            "-fsdev",
            "local,id=root,path=/,readonly=on,security_model=none,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=root,mount_tag=hostroot",
            "-fsdev",
            f"local,id=share,path={self.share_dir},security_model=none,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=share,mount_tag=share",
            "-netdev",
            netdev,
            "-device",
            "virtio-net-pci,netdev=n0",
            "-chardev",
            f"socket,id=agent0,path={sock_path}",
            "-device",
            "virtio-serial-pci",
            "-device",
            f"virtserialport,chardev=agent0,name={AGENT_PORT_NAME}",
            *self.extra_qemu_args,
        ]

    def start(self) -> Guest:
        if self._proc is not None:
            raise GuestError("guest already started")
        t0 = time.monotonic()
        compile_package()
        initrd = build_initramfs(self.kernel_version)
        self.share_dir.mkdir(parents=True, exist_ok=True)
        (self.share_dir / "agent.py").write_text(AGENT_SOURCE)
        env = {
            "PATH": GUEST_PATH,
            "CYUSBIP_PYTHON": self.python,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        if os.environ.get("PYTHONPATH"):
            # the guest imports what the host does (a worktree run with PYTHONPATH, while the venv's
            # editable install points at another checkout; the guest's commands run from /)
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        config = {
            "env": env,
            "port": AGENT_PORT_NAME,
            "setup": _setup_script(self.extra_setup),
        }
        (self.share_dir / "config.json").write_text(json.dumps(config))

        self._sockdir = tempfile.mkdtemp(prefix="cyusbip-vm-")
        sock_path = os.path.join(self._sockdir, "agent.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(sock_path)
        self._listener.listen(1)

        cmd = self.qemu_command(initrd, sock_path)
        (self.run_dir / "qemu.cmd").write_text(" ".join(cmd) + "\n")
        self.console_log.touch()
        with open(self.qemu_log, "wb") as qlog:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=qlog,
                stderr=subprocess.STDOUT,
                preexec_fn=_set_pdeathsig,
                close_fds=True,
            )
        self._finalizer = weakref.finalize(self, _kill_proc, self._proc)
        try:
            self._accept(t0 + self.boot_timeout)
            hello = self._recv(t0 + self.boot_timeout, what="boot")
        except BaseException:
            self.shutdown(graceful=False)
            raise
        if not hello.get("hello"):
            self.shutdown(graceful=False)
            raise GuestError(f"unexpected first message from guest agent: {hello!r}")
        self.boot_time = time.monotonic() - t0
        return self

    def _accept(self, deadline: float) -> None:
        assert self._listener is not None
        self._listener.settimeout(0.5)
        while True:
            self._check_alive("boot")
            if time.monotonic() > deadline:
                raise GuestTimeout(self._msg("QEMU did not connect to the agent socket"))
            try:
                conn, _ = self._listener.accept()
                break
            except TimeoutError:
                continue
        self._listener.close()
        self._listener = None
        conn.settimeout(0.5)
        self._sock = conn

    def shutdown(self, timeout: float = 20.0, graceful: bool = True) -> None:
        """Power the guest off (best effort), always making sure QEMU is dead."""
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None and graceful and self._sock:
                try:
                    self._request({"op": "poweroff"}, timeout=10)
                except GuestError:
                    pass
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
            _kill_proc(proc)
            for s in (self._sock, self._listener):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass
            self._sock = self._listener = None
            if self._sockdir:
                shutil.rmtree(self._sockdir, ignore_errors=True)
                self._sockdir = None
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None

    # -- diagnostics -------------------------------------------------------

    def console_tail(self, lines: int = 40) -> str:
        try:
            data = self.console_log.read_bytes()[-65536:]
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    def _msg(self, what: str) -> str:
        qlog = ""
        try:
            qlog = self.qemu_log.read_text(errors="replace")[-2000:]
        except OSError:
            pass
        rc = self._proc.poll() if self._proc else None
        return (
            f"{what} (qemu rc={rc}, run dir {self.run_dir})\n"
            f"--- last console lines ({self.console_log}) ---\n{self.console_tail()}"
            + (f"\n--- qemu output ---\n{qlog}" if qlog.strip() else "")
        )

    def _check_alive(self, what: str) -> None:
        if self._proc is None:
            raise GuestError("guest not started")
        if self._proc.poll() is not None:
            # give the console file a moment to be flushed
            time.sleep(0.2)
            raise GuestDied(self._msg(f"guest died during {what}"))

    # -- channel -----------------------------------------------------------

    def _recv(self, deadline: float, what: str) -> dict:
        while b"\n" not in self._buf:
            self._check_alive(what)
            if time.monotonic() > deadline:
                raise GuestTimeout(self._msg(f"timeout waiting for the guest ({what})"))
            if self._sock is None:
                raise GuestError("guest channel closed")
            try:
                chunk = self._sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as exc:
                raise GuestDied(self._msg(f"guest channel error during {what}: {exc}")) from exc
            if not chunk:
                self._sock.close()
                self._sock = None
                time.sleep(0.5)
                self._check_alive(what)
                raise GuestDied(self._msg(f"guest channel closed during {what}"))
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _request(self, req: dict, timeout: float) -> dict:
        with self._lock:
            if self._sock is None:
                self._check_alive("request")
                raise GuestError("guest channel is closed")
            req = dict(req, id=next(self._ids))
            self._check_alive(req["op"])
            self._sock.sendall((json.dumps(req) + "\n").encode())
            deadline = time.monotonic() + timeout
            while True:
                resp = self._recv(deadline, what=f"{req['op']} {req.get('cmd', '')!r}")
                if resp.get("id") == req["id"]:
                    break
            if not resp.get("ok", False):
                raise GuestError(f"guest agent error for {req['op']}: {resp.get('error')}")
            return resp

    # -- public API ----------------------------------------------------------

    def run(
        self,
        cmd: str,
        timeout: float = 60,
        *,
        check: bool = False,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Result:
        """Run ``cmd`` with /bin/sh -c as root in the guest; stdout+stderr combined.

        On timeout the command's process group is killed and CommandTimeout
        is raised (``exc.result`` has the partial output).  ``check=True``
        raises CommandFailed on rc != 0.
        """
        resp = self._request(
            {"op": "run", "cmd": cmd, "timeout": timeout, "cwd": cwd, "env": dict(env or {})},
            timeout=timeout + 30 + 5 * (self.smp == 1),
        )
        raw = base64.b64decode(resp["out"])
        if _CMD_LOG:
            _log_command(resp.get("duration", 0.0), cmd)
        result = Result(
            rc=resp["rc"],
            out=raw.decode(errors="replace"),
            cmd=cmd,
            raw=raw,
            duration=resp.get("duration", 0.0),
            timed_out=resp.get("timed_out", False),
        )
        if result.timed_out:
            raise CommandTimeout(
                f"guest command timed out after {timeout}s: {cmd!r}\n--- partial output ---\n{result.out}", result
            )
        if check:
            result.check()
        return result

    def check(self, cmd: str, timeout: float = 60, **kw) -> str:
        """``run(cmd, check=True)`` and return the output."""
        return self.run(cmd, timeout, check=True, **kw).out

    def start_background(
        self,
        cmd: str,
        log: str | None = None,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> tuple[int, str]:
        """Start ``cmd`` in its own session in the guest; returns (pid, log path).

        Output goes (appended) to ``log`` (default /run/cyusbip/bg-<n>.log in
        the guest).  Stop it with ``guest.run(f"kill {pid}")``.
        """
        resp = self._request(
            {"op": "bg", "cmd": cmd, "log": log, "cwd": cwd, "env": dict(env or {})},
            timeout=60,
        )
        return resp["pid"], resp["log"]

    def write_file(self, path: str, data: bytes | str, mode: int | None = None, append: bool = False) -> None:
        """Write a file in the guest (e.g. a sysfs/configfs attribute)."""
        if isinstance(data, str):
            data = data.encode()
        self._request(
            {"op": "write", "path": path, "mode": mode, "append": append, "data": base64.b64encode(data).decode()},
            timeout=60,
        )

    def read_file(self, path: str) -> bytes:
        """Read a file in the guest."""
        resp = self._request({"op": "read", "path": path}, timeout=60)
        return base64.b64decode(resp["data"])

    def run_python(
        self,
        code: str,
        timeout: float = 60,
        *,
        check: bool = False,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> Result:
        """Run ``code`` with the host's Python (``self.python``, the one
        running the tests: same venv/site-packages) in the guest.  The code
        goes through a file in the share, so no quoting is needed."""
        name = f"snippet-{next(_counter)}.py"
        (self.share_dir / name).write_text(code)
        argv = " ".join(shlex.quote(a) for a in args)
        try:
            return self.run(
                f"{shlex.quote(self.python)} {GUEST_SHARE}/{name} {argv}", timeout, check=check, cwd=cwd, env=env
            )
        finally:
            try:
                (self.share_dir / name).unlink()
            except OSError:
                pass

    def ping(self, timeout: float = 30) -> float:
        """Round-trip time of a no-op request."""
        t0 = time.monotonic()
        self._request({"op": "ping"}, timeout=timeout)
        return time.monotonic() - t0

    def host_port(self, guest_port: int) -> int:
        """Host port (on 127.0.0.1) forwarded to ``guest_port`` in the guest."""
        try:
            return self.forwards[guest_port]
        except KeyError:
            raise GuestError(f"guest port {guest_port} is not forwarded (Guest(hostfwd=[...]))") from None

    def guest_path(self, host_share_path: str | os.PathLike) -> str:
        """Translate a path inside ``share_dir`` to the guest's path."""
        rel = Path(host_share_path).resolve().relative_to(self.share_dir.resolve())
        return f"{GUEST_SHARE}/{rel}"


if __name__ == "__main__":  # manual smoke test: python3 tests/kernel/harness.py [cmd]
    reason = skip_reason()
    if reason:
        print("cannot run:", reason)
        sys.exit(2)
    t = time.monotonic()
    with Guest() as g:
        print(f"booted {g.kernel_version} in {g.boot_time:.1f}s; run dir {g.run_dir}")
        r = g.run(" ".join(sys.argv[1:]) or "uname -a; mount | head -20; ip addr")
        print(r)
    print(f"total {time.monotonic() - t:.1f}s")
