"""``usbipd``: the USB/IP server, with the Linux usbipd's options plus virtual devices."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
import tempfile
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ..backends.discovery import resolve as resolve_enumeration
from ..backends.sources import MODES
from ..net.tls import server_context
from ..protocol.constants import USBIP_PORT
from ..server.access import AccessPolicy
from ..server.limits import MiB, ServerLimits
from . import config, exitcodes, sdnotify
from .capture import add_capture_options, capture_from_args
from .logs import setup_logging
from .parsing import ArgumentParser, VersionAction

if TYPE_CHECKING:
    from ..capture import CaptureFile
    from ..server import Server
    from ..server.metrics import MetricsEndpoint

log = logging.getLogger("usbipd")
DEFAULT_PID_FILE = "/var/run/usbipd.pid"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="usbipd",
        description="USB/IP server: exports USB devices (virtual ones, and host devices bound with `usbip bind`).",
    )
    fam = p.add_mutually_exclusive_group()
    fam.add_argument("-4", "--ipv4", action="store_true", help="listen on IPv4 only")
    fam.add_argument("-6", "--ipv6", action="store_true", help="listen on IPv6 only")
    p.add_argument("-D", "--daemon", action="store_true", help="run in the background")
    p.add_argument(
        "-P",
        "--pid",
        nargs="?",
        const=DEFAULT_PID_FILE,
        metavar="FILE",
        help=f"write a pid file (default {DEFAULT_PID_FILE})",
    )
    p.add_argument("-t", "--tcp-port", type=int, default=USBIP_PORT, metavar="PORT", help="TCP port (default 3240)")
    p.add_argument("--host", default=None, help="listen address (default: all addresses)")
    p.add_argument("-d", "--debug", action="store_true", help="print debugging information")
    p.add_argument("-v", "--version", action=VersionAction)
    p.add_argument(
        "--config",
        metavar="FILE",
        help="read options from a TOML file: every long option without its dashes (the command line wins)",
    )
    p.add_argument(
        "--virtual",
        action="append",
        default=[],
        metavar="SPEC",
        help="export a virtual device: loopback, loopback:ss, storage:PATH:SIZE[:ro], keyboard:TEXT, serial, audio",
    )
    p.add_argument("--demo", action="store_true", help="export one virtual device of each kind")
    p.add_argument("--demo-dir", default=None, help="where --demo keeps its disk image (default: a temp dir)")
    p.add_argument(
        "--state-file",
        default=None,
        metavar="FILE",
        help="bind rules written by `usbip bind` (default $USBIP_STATE_FILE or /var/lib/cyusbip/exported.json)",
    )
    p.add_argument("--no-libusb", action="store_true", help="do not export host devices (libusb backend off)")
    p.add_argument(
        "--libusb-events",
        choices=("pollfd", "thread"),
        default="pollfd",
        help="how libusb events reach the event loop (default: pollfd, libusb's fds on the loop)",
    )
    p.add_argument(
        "--rescan-interval", type=float, default=1.0, metavar="SECONDS", help="hotplug/state-file poll period"
    )
    p.add_argument(
        "--enumerate",
        choices=MODES,
        default=None,
        metavar="{" + ",".join(MODES) + "}",
        help="how host devices are found: sysfs (/sys/bus/usb/devices), libusb (its own device list: containers "
        "without /sys, other systems) or auto, sysfs when it exists (default: $USBIP_ENUMERATE or auto)",
    )
    acc = p.add_argument_group("access (see README: Securing usbipd)")
    acc.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="CIDR",
        help="client network allowed to connect (repeatable; default: any address)",
    )
    acc.add_argument(
        "--allow-device",
        action="append",
        default=[],
        metavar="DEVICE=CLIENT[,CLIENT...]",
        help="only these clients may list and import DEVICE (busid or vid:pid); CLIENT is an address, "
        "a CIDR or cn:NAME of a TLS client certificate (repeatable)",
    )
    acc.add_argument("--tls-cert", metavar="PEM", help="serve TLS 1.3 with this certificate (chain)")
    acc.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert (default: in the same file)")
    acc.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="require client certificates signed by this CA (mutual TLS authenticates the client)",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics (/metrics) and a JSON status (/status) over HTTP there "
        "(needs prometheus-client: pip install 'cyusbip[metrics]')",
    )
    p.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the event loop: asyncio's own (default) or uvloop, which costs less CPU per control round trip "
        "(needs uvloop: pip install 'cyusbip[uvloop]')",
    )
    p.add_argument(
        "--no-announce", action="store_true", help="do not announce the server on the LAN (mDNS _usbip._tcp)"
    )
    add_capture_options(p.add_argument_group("capture (see README: Capturing traffic)"))
    lim = p.add_argument_group("limits (what one client may cost; see usbip/server/limits.py)")
    d = ServerLimits()
    lim.add_argument(
        "--connection-budget",
        type=float,
        default=d.connection_budget / MiB,
        metavar="MIB",
        help="memory one import may hold: URBs in flight and unsent replies; above it the server stops reading "
        f"that client (default {d.connection_budget // MiB})",
    )
    lim.add_argument(
        "--max-transfer",
        type=float,
        default=d.max_transfer / MiB,
        metavar="MIB",
        help=f"largest URB accepted (default {d.max_transfer // MiB}, usbfs' limit)",
    )
    lim.add_argument(
        "--dead-peer-timeout",
        type=float,
        default=d.dead_peer_timeout,
        metavar="SECONDS",
        help="a client silent this long (TCP keepalive, TCP_USER_TIMEOUT) is dropped and its device freed "
        f"(default {d.dead_peer_timeout:g})",
    )
    lim.add_argument(
        "--write-stall-timeout",
        type=float,
        default=d.write_stall_timeout,
        metavar="SECONDS",
        help=f"a client that leaves its replies unread this long is dropped (default {d.write_stall_timeout:g})",
    )
    lim.add_argument(
        "--op-timeout",
        type=float,
        default=d.op_timeout,
        metavar="SECONDS",
        help=f"time a client has to send its request after connecting (default {d.op_timeout:g})",
    )
    lim.add_argument(
        "--max-connections",
        type=int,
        default=None,
        metavar="N",
        help="concurrent connections (default: from the open-file limit, at most 1024)",
    )
    lim.add_argument(
        "--max-op-per-address",
        type=int,
        default=d.max_op_per_address,
        metavar="N",
        help=f"connections from one address not yet importing (default {d.max_op_per_address})",
    )
    return p


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    """The ServerLimits the options ask for (ValueError for values out of range)."""
    return ServerLimits(
        connection_budget=int(args.connection_budget * MiB),
        max_transfer=int(args.max_transfer * MiB),
        dead_peer_timeout=args.dead_peer_timeout,
        write_stall_timeout=args.write_stall_timeout,
        op_timeout=args.op_timeout,
        max_connections=args.max_connections,
        max_op_per_address=args.max_op_per_address,
    )


def _daemonize() -> None:
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)


def _host_port(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--metrics {spec}: expected HOST:PORT (e.g. 127.0.0.1:9240)")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _start_metrics(server: Server, host: str, port: int) -> MetricsEndpoint:
    from ..server.metrics import MetricsEndpoint

    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ImportError("prometheus-client is not installed (pip install 'cyusbip[metrics]')") from None
    endpoint = MetricsEndpoint(server, host, port)
    await endpoint.start()
    return endpoint


def _loopback_only(host: str | None) -> bool:
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def stop_on_signal(stop: asyncio.Event, exit_now: Callable[[int], object] = os._exit) -> Callable[[int], None]:
    """The SIGTERM/SIGINT handler: the first signal shuts down cleanly (connections closed,
    devices released, libusb handles given back, which may take a device's CLOSE_TIMEOUT);
    a second one while that is still going on exits at once (a second Ctrl-C, a service
    manager's or an admin's repeated SIGTERM)."""

    def on_signal(sig: int) -> None:
        if not stop.is_set():
            stop.set()
            return
        log.warning("%s again while shutting down: exiting now", signal.Signals(sig).name)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):  # a closed stream: the exit matters more
                handler.flush()
        exit_now(exitcodes.FAILURE)

    return on_signal


async def _run(args: argparse.Namespace) -> int:
    try:
        capture = capture_from_args(args, "usbipd")
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return exitcodes.USAGE
    try:
        return await _run_server(args, capture)
    finally:
        if capture is not None:
            capture.close()  # what is buffered reaches the file


async def _run_server(args: argparse.Namespace, capture: CaptureFile | None) -> int:
    from ..server import Server
    from ..virtual import demo_devices
    from .device_spec import make_device

    # from the start: a SIGTERM while starting up ends the server cleanly once it is up
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    on_signal = stop_on_signal(stop)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    devices = []
    try:
        limits = limits_from_args(args)
        access = AccessPolicy.from_specs(args.allow, args.allow_device)
        metrics_addr = _host_port(args.metrics) if args.metrics else None
        if (args.tls_key or args.tls_client_ca) and not args.tls_cert:
            raise ValueError("--tls-key and --tls-client-ca need --tls-cert")
        tls = None
        if args.tls_cert:
            try:
                tls = server_context(args.tls_cert, args.tls_key, args.tls_client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load the TLS certificate, key or CA: {exc}") from exc
        for spec in args.virtual:
            devices.append(make_device(spec))
        if args.demo:
            demo_dir = args.demo_dir or tempfile.mkdtemp(prefix="usbipd-demo-")
            devices.extend(demo_devices(demo_dir))
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return exitcodes.USAGE
    if not args.no_libusb:
        try:
            resolve_enumeration(args.enumerate)  # an unknown $USBIP_ENUMERATE is a usage error too
        except ValueError as exc:
            log.error("%s", exc)
            return exitcodes.USAGE
    family = socket.AF_INET if args.ipv4 else socket.AF_INET6 if args.ipv6 else socket.AF_UNSPEC
    server = Server(
        devices,
        host=args.host,
        port=args.tcp_port,
        family=family,
        limits=limits,
        access=access,
        tls=tls,
        capture=capture,
    )
    if not _loopback_only(args.host) and not access.restricted and tls is None:
        log.warning(
            "listening beyond loopback with no --allow rule and no TLS: any host that reaches port %d can "
            "import the exported devices",
            args.tcp_port,
        )
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot listen on port %d: %s", args.tcp_port, exc)
        return exitcodes.FAILURE
    metrics: MetricsEndpoint | None = None
    if metrics_addr is not None:
        try:
            metrics = await _start_metrics(server, *metrics_addr)
        except (ImportError, ValueError, OSError) as exc:
            log.error("--metrics %s: %s", args.metrics, exc)
            await server.close()
            return exitcodes.USAGE if isinstance(exc, (ImportError, ValueError)) else exitcodes.FAILURE
    backend = None
    if not args.no_libusb:
        from ..backends.libusb.backend import LibusbBackend

        backend = LibusbBackend(
            server.registry,
            args.state_file,
            poll_interval=args.rescan_interval,
            events_mode=args.libusb_events,
            enumeration=args.enumerate,
        )
        try:
            backend.start()
        except Exception as exc:  # never fatal: virtual devices still work
            log.error("libusb backend not started: %s", exc)
            backend = None
    for dev in server.registry.devices():
        extra = getattr(dev, "describe", lambda: "")()
        log.info("exporting %s: %s%s", dev.busid, type(dev).__name__, f" ({extra})" if extra else "")
    announcer = None
    if not args.no_announce and not _loopback_only(args.host):
        from ..net.mdns import Announcer

        def announced() -> list[tuple[str, int, int]]:
            out = []
            for dev in server.registry.devices():
                rec = dev.record()
                if not any(r.names_device(dev.busid, rec.idVendor, rec.idProduct) for r in access.rules):
                    out.append((dev.busid, rec.idVendor, rec.idProduct))  # restricted devices stay unnamed
            return out

        announcer = Announcer(server.port, announced, tls=tls is not None, host=args.host)
        if not await announcer.start():
            announcer = None
    sdnotify.notify(f"READY=1\nSTATUS=listening on port {server.port}\nMAINPID={os.getpid()}")
    await stop.wait()
    log.info("shutting down")
    sdnotify.notify("STOPPING=1")
    if announcer is not None:
        await announcer.close()
    if metrics is not None:
        await metrics.close()
    await server.close()
    if backend is not None:
        await backend.close()
    return exitcodes.OK


def main(argv: list[str] | None = None) -> int:
    args = config.parse_args(build_parser(), argv)
    setup_logging(args.debug, "usbipd")
    # `kill -USR1 <pid>`: every thread's Python stack on stderr (a stuck libusb call, a hang)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if args.capture:
        args.capture = os.path.abspath(args.capture)  # --daemon changes to /
    if args.daemon:
        _daemonize()
    if args.pid:
        try:
            with open(args.pid, "w") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as exc:
            log.error("cannot write pid file %s: %s", args.pid, exc)
            return exitcodes.FAILURE
    run: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.error("--loop uvloop needs uvloop: pip install 'cyusbip[uvloop]'")
            return exitcodes.USAGE
        run = uvloop.run
    try:
        return run(_run(args))
    finally:
        if args.pid:
            try:
                os.unlink(args.pid)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
