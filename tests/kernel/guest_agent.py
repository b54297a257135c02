"""The kernel-test guest's PID 1 (tests/kernel/harness.py writes this file to the guest's share):
stdlib only, run by the host's Python inside the guest."""

import base64
import ctypes
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "config.json")) as fh:
    CFG = json.load(fh)
ENV = dict(CFG["env"])
RUNDIR = "/run/cyusbip"


def log(msg):
    try:
        with open("/dev/console", "w") as c:
            with open("/proc/uptime") as u:
                up = u.read().split()[0]
            c.write(f"[{up}] cyusbip-agent: {msg}\n")
    except OSError:
        pass


def setup():
    log("agent started")
    os.makedirs(RUNDIR, exist_ok=True)
    with open("/dev/console", "w") as con:
        p = subprocess.run(
            ["/bin/sh", "-c", CFG["setup"]],
            stdin=subprocess.DEVNULL,
            stdout=con,
            stderr=con,
            env=ENV,
            cwd="/",
            timeout=120,
        )
    log(f"setup rc={p.returncode}")


def find_port():
    deadline = time.time() + 60
    while time.time() < deadline:
        base = "/sys/class/virtio-ports"
        if os.path.isdir(base):
            for d in sorted(os.listdir(base)):
                try:
                    with open(os.path.join(base, d, "name")) as fh:
                        if fh.read().strip() == CFG["port"]:
                            dev = "/dev/" + d
                            if os.path.exists(dev):
                                return dev
                except OSError:
                    pass
        time.sleep(0.1)
    raise SystemExit("virtio port {} not found".format(CFG["port"]))


class Chan:
    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR)
        self.buf = b""

    def send(self, obj):
        data = (json.dumps(obj) + "\n").encode()
        while data:
            n = os.write(self.fd, data)
            data = data[n:]

    def recv(self):
        while b"\n" not in self.buf:
            chunk = os.read(self.fd, 65536)
            if not chunk:  # host not connected
                time.sleep(0.05)
                continue
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


def do_run(req):
    t0 = time.time()
    outpath = os.path.join(RUNDIR, "cmd-{}.out".format(req["id"]))
    env = dict(ENV)
    env.update(req.get("env") or {})
    timed_out = False
    with open(outpath, "wb") as out:
        p = subprocess.Popen(
            ["/bin/sh", "-c", req["cmd"]],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=req.get("cwd") or "/",
            start_new_session=True,
        )
        try:
            rc = p.wait(timeout=req.get("timeout") or None)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            rc = p.wait()
    with open(outpath, "rb") as fh:
        data = fh.read(int(CFG.get("max_output", 16 << 20)))
    os.unlink(outpath)
    return {"rc": rc, "out": base64.b64encode(data).decode(), "timed_out": timed_out, "duration": time.time() - t0}


def do_bg(req):
    logpath = req.get("log") or os.path.join(RUNDIR, "bg-{}.log".format(req["id"]))
    env = dict(ENV)
    env.update(req.get("env") or {})
    with open(logpath, "ab") as out:
        p = subprocess.Popen(
            ["/bin/sh", "-c", req["cmd"]],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=req.get("cwd") or "/",
            start_new_session=True,
        )
    BG[p.pid] = p
    return {"pid": p.pid, "log": logpath}


def do_write(req):
    data = base64.b64decode(req["data"])
    with open(req["path"], "ab" if req.get("append") else "wb") as fh:
        fh.write(data)
    if req.get("mode") is not None:
        os.chmod(req["path"], req["mode"])
    return {}


def do_read(req):
    with open(req["path"], "rb") as fh:
        return {"data": base64.b64encode(fh.read()).decode()}


BG = {}


def agent():
    setup()
    chan = Chan(find_port())
    chan.send({"hello": True, "uname": os.uname().release, "pid": os.getpid()})
    log("ready")
    ops = {"run": do_run, "bg": do_bg, "write": do_write, "read": do_read, "ping": lambda r: {}}
    while True:
        req = chan.recv()
        # reap finished background jobs started by us
        for pid, p in list(BG.items()):
            if p.poll() is not None:
                del BG[pid]
        op = req.get("op")
        if op == "poweroff":
            chan.send({"id": req.get("id"), "ok": True})
            return 0
        try:
            res = ops[op](req)
            res["ok"] = True
        except Exception as exc:  # report, keep serving
            res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        res["id"] = req.get("id")
        chan.send(res)


def poweroff():
    try:
        os.sync()
    except OSError:
        pass
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(0x4321FEDC)  # RB_POWER_OFF
    time.sleep(5)
    os._exit(1)


def main():
    if os.getpid() != 1:
        sys.exit(agent())
    # PID 1: fork the agent, reap every orphan, power off when the agent ends
    child = os.fork()
    if child == 0:
        rc = 1
        try:
            rc = agent()
        except BaseException as exc:
            log(f"agent crashed: {exc!r}")
            import traceback

            try:
                with open("/dev/console", "w") as c:
                    traceback.print_exc(file=c)
            except OSError:
                pass
        os._exit(rc or 0)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == child:
            log(f"agent exited with status {status}, powering off")
            break
    poweroff()


main()
