"""OUR usbipd run *inside* the kernel-test guest, exporting host devices through libusb
(test_libusb_export, test_libusb_nosysfs): start it, stop it, bind a device, wait until
Debian's ``usbip list -r`` shows (or no longer shows) it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from . import gadgets
from .gadgets import q

STATE = "/tmp/cyusbip-libusb/exported.json"
PORT = 3240


def _listening(up: bool) -> str:
    """Shell test: something listens on PORT (``up``), or nothing does."""
    return f"awk '$2 ~ /:{PORT:04X}$/ && $4 == \"0A\" {{f=1}} END {{exit {'!f' if up else 'f'}}}' /proc/net/tcp"


def usbip(guest, args: str, timeout: float = 60):
    """OUR usbip tool in the guest."""
    return guest.run(f"{guest.python} -m usbip.cli.usbip_main {args}", timeout=timeout)


def start(guest, args: str = "", wrap: Callable[[str], str] | None = None) -> tuple[int, str]:
    """usbipd with debug logs on 127.0.0.1:PORT and the state file STATE (kept: clear it first
    for a fresh start); ``wrap`` turns the command into another one (a namespace without sysfs)."""
    guest.run(f"mkdir -p {os.path.dirname(STATE)}", check=True)
    cmd = (
        f"USBIP_LIBUSB_DEBUG=1 exec {guest.python} -m usbip.cli.usbipd_main -d --host 127.0.0.1 -t {PORT}"
        f" --state-file {STATE} --rescan-interval {os.environ.get('USBIP_LIBUSB_RESCAN', '0.5')} {args}"
    )
    pid, log = guest.start_background(wrap(cmd) if wrap else cmd)
    r = guest.run(gadgets.poll_sh(_listening(True), 60), timeout=90)
    if r.rc != 0 or guest.run(f"kill -0 {pid} && ! grep -q 'cannot listen' {log}").rc != 0:
        pytest.fail("our usbipd did not start:\n" + guest.run(f"cat {log}").out)
    return pid, log


def stop(guest, pid: int, timeout: float = 30) -> str:
    """SIGTERM usbipd (its own session, start_background: the whole group) and wait for the process
    to end. Returns "" when it exited by itself; otherwise its Python stacks (faulthandler on
    SIGUSR1, written to its log) and kernel stacks, and it is killed with SIGKILL."""
    exited = f"! [ -d /proc/{pid} ] || grep -q '^State:.*Z' /proc/{pid}/status"
    r = guest.run(f"kill -- -{pid}; {gadgets.poll_sh(exited, timeout)}", timeout=timeout + 30)
    if r.rc == 0:
        return ""
    state = guest.run(
        f"grep State /proc/{pid}/status; for t in /proc/{pid}/task/*; do echo $t $(cat $t/comm) $(cat $t/wchan); "
        f"cat $t/stack; done; kill -USR1 {pid}; sleep 2",
        timeout=60,
    ).out
    guest.run(f"kill -9 -- -{pid}", timeout=30)
    return f"usbipd did not exit {timeout:.0f} s after SIGTERM:\n{state}"


def bind(guest, busid: str) -> None:
    r = usbip(guest, f"bind -b {q(busid)} --state-file {STATE}")
    assert r.rc == 0, r.out


def wait_exportable(guest, busid: str, present: bool = True, timeout: float = 30) -> str:
    """Debian's ``usbip list -r`` output once it lists ``busid`` (or no longer does)."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = gadgets.exportable(guest, port=PORT)
        if (f" {busid}:" in out) == present:
            return out
        time.sleep(0.5)
    raise AssertionError(f"{busid} {'not ' if present else ''}listed by usbipd:\n{out}")
