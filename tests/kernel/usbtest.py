"""Drive the kernel's ``usbtest`` driver (drivers/usb/misc/usbtest.c) through usbfs.

This file is both

* a stdlib-only script run *inside the guest* with the test interpreter
  (``guest.python tests/kernel/usbtest.py /dev/bus/usb/BBB/DDD --cases 0,1,2``),
  printing one JSON line per case, and
* a host-side helper (:func:`run_cases`) that runs that script in a guest and
  parses the results.

The ioctl path is ``tools/usb/testusb.c``'s: ``USBDEVFS_IOCTL`` on the usbfs node
of the device, carrying ``struct usbdevfs_ioctl`` whose ``ioctl_code`` is
``USBTEST_REQUEST`` and whose ``data`` points to a ``struct usbtest_param_64``.
usbfs hands the request to the driver bound to interface ``ifno`` (usbtest's
``usbtest_ioctl``), which returns 0 or a negative errno; the syscall then fails
with that errno.

ioctl numbers (``_IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr``,
``_IOC_READ|_IOC_WRITE`` = 3, type ``'U'`` = 0x55, x86_64 layouts)::

    struct usbdevfs_ioctl   { int ifno; int ioctl_code; void *data; }       16 bytes
    USBDEVFS_IOCTL   = _IOWR('U', 18, struct usbdevfs_ioctl)   = 0xC0105512

    struct usbtest_param_64 { __u32 test_num, iterations, length, vary, sglen;
                              (4 bytes padding) s64 duration_sec, duration_nsec; }  40 bytes
    USBTEST_REQUEST  = _IOWR('U', 100, struct usbtest_param_64) = 0xC0285564

(usbtest also accepts the 28-byte ``usbtest_param_32`` under 0xC01C5564; we use
the 64-bit layout, as testusb does on 64-bit kernels.)

usbtest answers -EOPNOTSUPP (95) for a case the device/parameters do not allow
(e.g. iso cases without iso endpoints in the chosen altsetting, cases 3/4/7/8
with ``vary == 0``).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import struct
import sys
import time

_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (typ << 8) | nr


def _iowr(typ: str, nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, ord(typ), nr, size)


#: struct usbdevfs_ioctl: int ifno, int ioctl_code, void *data
USBDEVFS_IOCTL_STRUCT = struct.Struct("=iIQ")  # 16 bytes on x86_64
#: struct usbtest_param_64: 5 x u32, 4 bytes padding, 2 x s64
USBTEST_PARAM_64 = struct.Struct("=5I4xqq")  # 40 bytes
USBDEVFS_IOCTL = _iowr("U", 18, USBDEVFS_IOCTL_STRUCT.size)
USBTEST_REQUEST = _iowr("U", 100, USBTEST_PARAM_64.size)
assert USBDEVFS_IOCTL == 0xC0105512, hex(USBDEVFS_IOCTL)
assert USBTEST_REQUEST == 0xC0285564, hex(USBTEST_REQUEST)

#: usbtest's case titles (drivers/usb/misc/usbtest.c, Linux 6.1)
CASES = {
    0: "NOP",
    1: "bulk write",
    2: "bulk read",
    3: "bulk write, varying sizes",
    4: "bulk read, varying sizes",
    5: "bulk write scatterlist",
    6: "bulk read scatterlist",
    7: "bulk write scatterlist, varying sizes",
    8: "bulk read scatterlist, varying sizes",
    9: "ch9 (subset) control tests",
    10: "queued control messaging",
    11: "unlink reads",
    12: "unlink writes",
    13: "set/clear halt",
    14: "vendor control writes/reads (ctrl_out)",
    15: "iso write (queued)",
    16: "iso read (queued)",
    17: "bulk write, unaligned buffer (no DMA map)",
    18: "bulk read, unaligned buffer (no DMA map)",
    19: "bulk write, DMA-mapped buffer",
    20: "bulk read, DMA-mapped buffer",
    21: "vendor control writes/reads, unaligned",
    22: "iso write, unaligned",
    23: "iso read, unaligned",
    24: "unlink from a queue of bulk writes",
    25: "interrupt write",
    26: "interrupt read",
    27: "bulk write performance (sglen x length)",
    28: "bulk read performance",
    29: "toggle sync on bulk endpoint clear-halt",
}

EOPNOTSUPP = errno.EOPNOTSUPP

_libc = None


def _ioctl(fd: int, request: int, arg: ctypes.Array) -> int:
    """ioctl(2) with a pointer argument; returns 0 or the errno."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
        _libc.ioctl.restype = ctypes.c_int
    rc = _libc.ioctl(fd, request, ctypes.addressof(arg))
    return ctypes.get_errno() if rc < 0 else 0


def usbtest_request(
    fd: int, case: int, iterations: int, length: int, vary: int = 0, sglen: int = 0, ifno: int = 0
) -> tuple[int, float]:
    """One USBTEST_REQUEST on the open usbfs node ``fd``: (errno or 0, duration in seconds)."""
    param = ctypes.create_string_buffer(USBTEST_PARAM_64.pack(case, iterations, length, vary, sglen, 0, 0))
    req = ctypes.create_string_buffer(
        USBDEVFS_IOCTL_STRUCT.pack(ifno, USBTEST_REQUEST, ctypes.addressof(param)), USBDEVFS_IOCTL_STRUCT.size
    )
    err = _ioctl(fd, USBDEVFS_IOCTL, req)
    *_inputs, sec, usec = USBTEST_PARAM_64.unpack(param.raw[: USBTEST_PARAM_64.size])
    return err, sec + usec / 1e6


def main(argv: list[str] | None = None) -> int:
    import argparse

    # a fixed help width: argparse would import shutil (bz2, lzma, ...) for the terminal's, a second
    # of every run of this script under TCG
    p = argparse.ArgumentParser(
        description="run usbtest cases through usbfs (like tools/usb/testusb)",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, width=100),
    )
    p.add_argument("node", help="usbfs node, /dev/bus/usb/BBB/DDD")
    p.add_argument("--cases", required=True, help="comma-separated case numbers")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--vary", type=int, default=512)
    p.add_argument("--sglen", type=int, default=32)
    p.add_argument("--ifno", type=int, default=0)
    a = p.parse_args(argv)
    fd = os.open(a.node, os.O_RDWR)
    try:
        for case in (int(c) for c in a.cases.split(",") if c.strip()):
            t0 = time.monotonic()
            err, duration = usbtest_request(fd, case, a.iterations, a.length, a.vary, a.sglen, a.ifno)
            res = {
                "case": case,
                "errno": err,
                "error": os.strerror(err) if err else "",
                "duration": duration,
                "wall": round(time.monotonic() - t0, 3),
            }
            print(json.dumps(res), flush=True)
    finally:
        os.close(fd)
    return 0


# ---------------------------------------------------------------- host side


def usbfs_node_script(busid: str) -> str:
    """Shell snippet printing the usbfs node of USB device ``busid`` (made with
    mknod from sysfs ``dev`` if devtmpfs has not created it)."""
    d = f"/sys/bus/usb/devices/{busid}"
    return (
        f"read b < {d}/busnum; read n < {d}/devnum; "
        'node=$(printf /dev/bus/usb/%03d/%03d "$b" "$n"); '
        'if [ ! -c "$node" ]; then mkdir -p "${node%/*}"; '
        f'IFS=: read ma mi < {d}/dev; mknod "$node" c "$ma" "$mi"; fi; echo "$node"'
    )


def run_cases(
    guest,
    node: str,
    cases,
    *,
    iterations: int = 10,
    length: int = 512,
    vary: int = 512,
    sglen: int = 32,
    ifno: int = 0,
    timeout: float = 300,
) -> dict[int, dict]:
    """Run usbtest ``cases`` on ``node`` in ``guest``; {case: result dict}.

    A case missing from the result did not finish (the script died or timed out:
    the exception carries the partial output)."""
    cmd = (
        f"{guest.python} {os.path.abspath(__file__)} {node} --cases {','.join(str(c) for c in cases)} "
        f"--iterations {iterations} --length {length} --vary {vary} --sglen {sglen} --ifno {ifno}"
    )
    r = guest.run(cmd, timeout=timeout)
    results = {}
    for line in r.out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            res = json.loads(line)
            results[res["case"]] = res
    if r.rc != 0:
        raise RuntimeError(f"usbtest runner failed:\n{r}")
    return results


#: usbtest's module parameters (alt: altsetting chosen at probe, -1 = the driver's choice;
#: pattern: 0 zeros, 1 (i % maxpacket) % 63 checked on every IN byte)
PARAMS = "/sys/module/usbtest/parameters"


def _dmesg_since_sh(mark: str) -> str:
    from .gadgets import dmesg_since_sh  # host side only: this file also runs in the guest as a script

    return dmesg_since_sh(mark)


def defaults(guest) -> None:
    """usbtest's parameters back to alt=-1, pattern=0 (no-op if the module is not loaded)."""
    guest.run(f"[ -d {PARAMS} ] && echo -1 > {PARAMS}/alt && echo 0 > {PARAMS}/pattern; true")


def verdict(res: dict) -> str:
    return "pass" if res["errno"] == 0 else "not supported" if res["errno"] == EOPNOTSUPP else "FAIL"


def table(title: str, results: dict[int, dict]) -> str:
    lines = [title]
    for case, res in sorted(results.items()):
        lines.append(
            f"  {case:2d} {CASES.get(case, '?'):45s} {verdict(res):13s} errno={res['errno']} {res['duration']:.3f}s"
        )
    return "\n".join(lines)


def check(results: dict[int, dict], cases: list[int], required: set[int], title: str) -> None:
    """Every case ran; those in ``required`` passed, the others passed or were not supported."""
    text = table(title, results)
    print(text)
    missing = [c for c in cases if c not in results]
    failed = [c for c, res in results.items() if res["errno"] and (c in required or res["errno"] != EOPNOTSUPP)]
    assert not missing and not failed, f"missing {missing}, failed {failed}\n{text}"


def ran_in_kernel(guest, mark: str, local_busid: str, results: dict[int, dict]) -> None:
    """usbtest logs "TEST n: ..." for every case it runs: each passing case did run on this device."""
    log = _kernel_logs.pop(mark, None)  # what run_checked read at the end of the run
    if log is None:
        log = guest.run(_dmesg_since_sh(mark)).out
    ran = {int(n) for n in re.findall(rf"usbtest {re.escape(local_busid)}:1\.0: TEST (\d+):", log)}
    passed = {c for c, res in results.items() if res["errno"] == 0 and c != 0}
    assert passed <= ran, f"cases {sorted(passed - ran)} passed without running on {local_busid}:\n{log[-3000:]}"


#: the kernel log since a mark, as run_checked read it; ran_in_kernel (called next with that mark) uses it
_kernel_logs: dict[str, str] = {}
_VHCI_WORDS = re.compile("vhci|usbip|fail|error", re.IGNORECASE)


def run_checked(guest, mark: str, node: str, cases: list[int], **kw) -> dict[int, dict]:
    """:func:`run_cases` with a bounded wait; on trouble, fail with vhci's own words from dmesg
    (e.g. "cannot find a urb of seqnum N": vhci got a reply it cannot match and dropped the link)."""
    try:
        results = run_cases(guest, node, cases, timeout=kw.pop("timeout", 120), **kw)
        err = None
    except Exception as exc:  # CommandTimeout (a case hung), runner crash
        results, err = {}, exc
    full = guest.run(_dmesg_since_sh(mark)).out  # one read of a long kernel log: seconds under TCG
    _kernel_logs[mark] = full
    log = "".join(ln for ln in full.splitlines(keepends=True) if "unlink retry" not in ln and _VHCI_WORDS.search(ln))
    dropped = [ln for ln in log.splitlines() if "cannot find a urb" in ln or "connection" in ln.lower()]
    assert err is None and not dropped, f"usbtest cases {cases}: {err}\n--- vhci/usbtest dmesg ---\n{log[-4000:]}"
    return results


def wait_bound(guest, busid: str, timeout: float = 30) -> None:
    """Wait until usbtest drives interface 0 of USB device ``busid``."""
    intf = f"/sys/bus/usb/devices/{busid}:1.0"
    end = time.monotonic() + timeout
    while True:
        r = guest.run(f"readlink {intf}/driver")
        if r.out.strip().endswith("/usbtest") or time.monotonic() > end:
            break
        time.sleep(0.3)
    assert r.out.strip().endswith("/usbtest"), f"{intf} driver: {r.out.strip() or 'none'}"


if __name__ == "__main__":
    sys.exit(main())
