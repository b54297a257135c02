"""Benchmarks driven by our own client library against any USB/IP server.

* ``usbip [-t PORT] [--json] bench -r HOST -b BUSID [--seconds S] [--quick]`` runs a
  matrix: control GET_DESCRIPTOR latency (1 in flight), then bulk IN and OUT on the
  first bulk endpoints of the configuration descriptor at 512 B / 16 KiB / 64 KiB with
  1 / 8 / 32 URBs in flight. Progress goes to stderr, a table (or JSON) to stdout.
* ``python3 -m usbip.client.bench --host H --port P --busid B --mode M ...`` runs one case
  with the options and the one-line JSON output of ``benchmarks/tools/loadgen``, so
  the end-to-end benchmarks can put our client beside the C load generator.

Every figure is measured after a warm-up, over a fixed window; only URBs completing
inside the window count (as the C generator does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..cancelsafe import wait_for

GET_DEVICE_DESCRIPTOR = bytes([0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x12, 0x00])
SIZES = (512, 16384, 65536)
INFLIGHT = (1, 8, 32)
DRAIN_TIMEOUT = 10.0


@dataclass
class CaseResult:
    name: str
    mode: str
    endpoint: int
    size: int
    inflight: int
    seconds: float
    urbs: int
    urbs_per_s: float
    mb_per_s: float
    p50_us: float | None
    p99_us: float | None
    errors: int

    def loadgen_json(self) -> dict[str, Any]:
        """The keys (and order) the C ``loadgen`` prints."""
        d = asdict(self)
        return {
            k: d[k]
            for k in (
                "mode",
                "size",
                "inflight",
                "seconds",
                "urbs",
                "urbs_per_s",
                "mb_per_s",
                "p50_us",
                "p99_us",
                "errors",
            )
        }


def _quantile(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, int(q * len(sorted_vals)))
    return sorted_vals[i]


async def run_case(
    dev: Any,
    mode: str,
    endpoint: int,
    size: int,
    inflight: int,
    seconds: float,
    warmup: float = 0.5,
    iso_packets: int = 0,
    name: str | None = None,
) -> CaseResult:
    """Keep ``inflight`` URBs queued on ``endpoint`` of the imported ``dev`` for ``seconds``.

    ``mode``: ``control`` (GET_DESCRIPTOR(device), 18 bytes, ``endpoint`` 0), ``bulk-in``,
    ``bulk-out`` or ``iso-in`` (``iso_packets`` packets of ``size`` bytes). Completions
    resubmit from the future's callback, so no task per URB is created.
    """
    loop = asyncio.get_running_loop()
    clock = time.perf_counter
    setup = bytes(8)
    iso: list[int] | None = None
    arg: int | bytes
    if mode == "control":
        ep, arg, setup, size = 0x80, 18, GET_DEVICE_DESCRIPTOR, 18
    elif mode == "bulk-in":
        ep, arg = endpoint | 0x80, size
    elif mode == "bulk-out":
        ep, arg = endpoint & 0x0F, bytes(size)
    elif mode == "iso-in":
        iso = [size] * max(1, iso_packets)
        ep, arg = endpoint | 0x80, sum(iso)
    else:
        raise ValueError(f"unknown mode {mode!r}")

    t_meas = clock() + warmup
    t_end = t_meas + seconds
    lat: list[float] = []
    state = {"urbs": 0, "bytes": 0, "errors": 0, "outstanding": 0, "stopped": False}
    finished: asyncio.Future[None] = loop.create_future()

    def submit() -> None:
        try:
            urb = dev.submit(ep, arg, setup, iso_packets=iso, interval=1 if iso else 0)
        except Exception as exc:  # the connection went away
            state["errors"] += 1
            state["stopped"] = True
            if not finished.done() and state["outstanding"] == 0:
                finished.set_exception(exc)
            return
        state["outstanding"] += 1
        t_sub = clock()
        urb.future.add_done_callback(lambda f: done(f, t_sub))

    def done(fut: asyncio.Future[Any], t_sub: float) -> None:
        now = clock()
        state["outstanding"] -= 1
        if fut.cancelled() or fut.exception() is not None:
            state["errors"] += 1
            state["stopped"] = True
        else:
            res = fut.result()
            if res.status != 0:
                state["errors"] += 1
            elif t_meas <= now < t_end:
                state["urbs"] += 1
                state["bytes"] += res.actual_length
                lat.append(now - t_sub)
        if now < t_end and not state["stopped"]:
            submit()
        elif state["outstanding"] == 0 and not finished.done():
            finished.set_result(None)

    for _ in range(inflight):
        submit()
    if state["outstanding"] == 0 and not finished.done():
        finished.set_result(None)
    try:
        await wait_for(asyncio.shield(finished), warmup + seconds + DRAIN_TIMEOUT)
    except asyncio.TimeoutError:
        state["errors"] += state["outstanding"]
    except Exception:
        state["errors"] += 1
    meas = seconds
    lat.sort()
    p50, p99 = _quantile(lat, 0.50), _quantile(lat, 0.99)
    return CaseResult(
        name=name or f"{mode} {size} B x{inflight}",
        mode=mode,
        endpoint=ep,
        size=size,
        inflight=inflight,
        seconds=round(meas, 3),
        urbs=state["urbs"],
        urbs_per_s=round(state["urbs"] / meas, 1),
        mb_per_s=round(state["bytes"] / 1e6 / meas, 3),
        p50_us=round(p50 * 1e6, 3) if p50 is not None else None,
        p99_us=round(p99 * 1e6, 3) if p99 is not None else None,
        errors=state["errors"],
    )


def first_bulk_endpoints(eps: list[dict[str, int]]) -> tuple[int | None, int | None]:
    """The first bulk IN and bulk OUT endpoint addresses of a configuration's endpoint list."""
    bulk_in = bulk_out = None
    for e in eps:
        if e["bmAttributes"] & 0x03 != 0x02:
            continue
        addr = e["bEndpointAddress"]
        if addr & 0x80 and bulk_in is None:
            bulk_in = addr
        elif not addr & 0x80 and bulk_out is None:
            bulk_out = addr
    return bulk_in, bulk_out


def fmt_size(n: int) -> str:
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10} KiB"
    return f"{n} B"


def plan(bulk_in: int | None, bulk_out: int | None, quick: bool = False) -> list[tuple[str, str, int, int, int]]:
    """(name, mode, endpoint, size, inflight) of every case of the matrix."""
    cases = [("control GET_DESCRIPTOR x1", "control", 0, 18, 1)]
    for mode, ep in (("bulk-in", bulk_in), ("bulk-out", bulk_out)):
        if ep is None:
            continue
        for size in SIZES:
            for k in INFLIGHT:
                cases.append((f"{mode} {fmt_size(size)} x{k} (ep 0x{ep:02x})", mode, ep, size, k))
    return cases


class Progress:
    """``[3/19] bulk-in 512 B x8 ...`` on stderr; rewrites one line on a terminal."""

    def __init__(self, total: int, stream: Any = None, enabled: bool = True) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.n = 0

    def step(self, label: str) -> None:
        self.n += 1
        if not self.enabled:
            return
        msg = f"[{self.n}/{self.total}] {label} ..."
        if self.tty:
            self.stream.write("\r\x1b[K" + msg)
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


async def run_matrix(
    host: str,
    port: int,
    busid: str,
    seconds: float = 1.0,
    warmup: float = 0.3,
    quick: bool = False,
    progress: bool = True,
    tls: ssl.SSLContext | None = None,
    capture: Any = None,
) -> dict[str, Any]:
    """Import ``busid`` from ``host:port`` and run the matrix; returns the JSON document.

    With ``capture`` (a :class:`usbip.capture.CaptureFile`) every URB is written to it."""
    from ..protocol import IMPLEMENTATION
    from . import connect

    async with connect(host, port, tls=tls, capture=capture) as conn:
        dev = await conn.import_device(busid)
        bulk_in, bulk_out = first_bulk_endpoints(dev.endpoints())
        cases = plan(bulk_in, bulk_out, quick)
        prog = Progress(len(cases), enabled=progress)
        results = []
        try:
            for name, mode, ep, size, k in cases:
                prog.step(name)
                res = await run_case(dev, mode, ep, size, k, seconds, warmup, name=name)
                results.append(asdict(res))
                if dev.closed:
                    break
        finally:
            prog.done()
        dd = dev.device_descriptor or {}
    return {
        "host": host,
        "port": port,
        "busid": busid,
        "device": {k: dd.get(k) for k in ("idVendor", "idProduct") if k in dd},
        "bulk_in": bulk_in,
        "bulk_out": bulk_out,
        "seconds": seconds,
        "warmup": warmup,
        "quick": quick,
        "codec": IMPLEMENTATION,
        "python": sys.version.split()[0],
        "results": results,
    }


# ---------------------------------------------------------------- python3 -m usbip.client.bench
async def _one(args: argparse.Namespace) -> CaseResult:
    from . import connect

    tls = None
    if args.tls_ca:
        from ..net.tls import client_context

        tls = client_context(args.tls_ca, args.tls_cert, check_hostname=False)
    async with connect(args.host, args.port, tls=tls) as conn:
        dev = await conn.import_device(args.busid, read_descriptors=False)
        if args.set_alt:
            iface, _, alt = args.set_alt.partition(":")
            await dev.set_interface(int(iface), int(alt))
        size = args.size if args.size is not None else (3072 if args.mode == "iso-in" else 512)
        ep = args.ep if args.ep is not None else (0 if args.mode == "control" else 2 if args.mode == "iso-in" else 1)
        return await run_case(dev, args.mode, ep, size, args.inflight, args.seconds, args.warmup, args.iso_packets)


def main(argv: list[str] | None = None) -> int:
    """One case, loadgen-compatible: one JSON line; exit 0 ok, 1 errors, 2 usage/connect/import failure."""
    p = argparse.ArgumentParser(prog="python3 -m usbip.client.bench", description=main.__doc__)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--busid", required=True)
    p.add_argument("--mode", required=True, choices=("bulk-in", "bulk-out", "control", "iso-in"))
    p.add_argument("--ep", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--inflight", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--iso-packets", type=int, default=8)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--set-alt", metavar="IFACE:ALT")
    p.add_argument("--tls-ca", metavar="PEM", help="TLS, trusting this CA (the server name is not checked)")
    p.add_argument("--tls-cert", metavar="PEM", help="TLS client certificate and key")
    args = p.parse_args(argv)
    try:
        res = asyncio.run(_one(args))
    except Exception as exc:
        print(f"usbip.client.bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res.loadgen_json(), separators=(",", ":")))
    return 1 if res.errors or not res.urbs else 0


if __name__ == "__main__":
    sys.exit(main())
