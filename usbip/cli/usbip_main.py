"""``usbip``: the client tool, with the Linux tool's commands (list, attach, detach, port, bind, unbind)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from ..protocol.constants import USBIP_PORT
from . import exitcodes, sdnotify
from .capture import add_capture_options
from .logs import setup_logging
from .parsing import ArgumentParser, VersionAction

if TYPE_CHECKING:
    import ssl

# asyncio, ssl and the client are imported by the commands that use them: `usbip port`, `detach`,
# `bind` and `list -l` start without them (each start of the tool in the kernel-test guest runs
# under emulation, where every imported module costs)
log = logging.getLogger("usbip")
ENUMERATE_HELP = (
    "how local devices are found: sysfs (/sys/bus/usb/devices), libusb (its device list: no sysfs needed) "
    "or auto, sysfs when it exists (default: $USBIP_ENUMERATE or auto)"
)


def _add_enumerate(p: argparse.ArgumentParser) -> None:
    from ..backends.sources import MODES

    p.add_argument("--enumerate", choices=MODES, default=None, metavar="{" + ",".join(MODES) + "}", help=ENUMERATE_HELP)


def add_tls_options(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("TLS (a usbipd started with --tls-cert; see README: Securing usbipd)")
    t.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    t.add_argument("--tls-ca", metavar="PEM", help="connect with TLS, trusting this CA (implies --tls)")
    t.add_argument("--tls-cert", metavar="PEM", help="client certificate (chain) to present (implies --tls)")
    t.add_argument("--tls-key", metavar="PEM", help="its private key (default: in the same file)")
    t.add_argument("--tls-server-name", metavar="NAME", help="name the server certificate must carry (default: HOST)")


def tls_from_args(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client TLS context the options ask for; ValueError when a file cannot be used."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    if args.tls_key and not args.tls_cert:
        raise ValueError("--tls-key needs --tls-cert")
    import ssl

    from ..net.tls import client_context

    try:
        return client_context(args.tls_ca, args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the TLS CA, certificate or key: {exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="usbip", description="USB/IP client and device binding tool (cyusbip).")
    p.add_argument("-d", "--debug", action="store_true", help="print debugging information")
    p.add_argument("-l", "--log", action="store_true", help="log to syslog as well (accepted for compatibility)")
    p.add_argument("-t", "--tcp-port", type=int, default=USBIP_PORT, metavar="PORT", help="TCP port (default 3240)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--version", action=VersionAction)
    add_tls_options(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    ls = sub.add_parser("list", help="list exportable (-r) or local (-l) USB devices")
    g = ls.add_mutually_exclusive_group(required=True)
    g.add_argument("-r", "--remote", metavar="HOST", help="list the devices exported by HOST")
    g.add_argument("-l", "--local", action="store_true", help="list the local USB devices")
    g.add_argument("--discover", action="store_true", help="list the servers announced on the LAN (mDNS)")
    g.add_argument("-d", "--device", action="store_true", help="list the local usbip-vudc devices (not supported)")
    ls.add_argument("-p", "--parsable", action="store_true", help="parsable list format")
    ls.add_argument("--seconds", type=float, default=3.0, metavar="S", help="how long --discover listens (default 3)")
    _add_enumerate(ls)

    at = sub.add_parser("attach", help="import a remote device through vhci-hcd")
    at.add_argument("-r", "--remote", metavar="HOST", required=True)
    at.add_argument("-b", "--busid", required=True)
    at.add_argument(
        "-p",
        "--port",
        type=int,
        default=None,
        help="the vhci port to use (must be free; `usbip port` numbering); default: the first free one",
    )
    at.add_argument(
        "--persist",
        action="store_true",
        help="keep the import alive: a supervisor process re-imports the device whenever the connection "
        "drops (backoff 1 s to 30 s; log in /var/run/vhci_hcd/persist.log) until `usbip detach`",
    )
    at.add_argument(
        "--foreground",
        action="store_true",
        help="with --persist: supervise from this process, logging to stderr, until `usbip detach` or a "
        "signal (SIGTERM, Ctrl-C), which also detaches the device; tells systemd when the import is "
        "attached (the unit usbip-attach@.service runs this)",
    )

    de = sub.add_parser("detach", help="detach an imported device from a vhci-hcd port")
    de.add_argument("-p", "--port", type=int, required=True)

    sub.add_parser("port", help="show the vhci-hcd ports in use")

    for name, text in (("bind", "export a local device through usbipd"), ("unbind", "stop exporting a local device")):
        bp = sub.add_parser(name, help=text)
        rg = bp.add_mutually_exclusive_group(required=True)
        rg.add_argument("-b", "--busid")
        rg.add_argument("--vidpid", metavar="VID:PID", help="rule: every device with these ids")
        rg.add_argument("--serial", metavar="S", help="rule: the device with this serial number")
        bp.add_argument(
            "--state-file",
            metavar="FILE",
            help="bind state file (default $USBIP_STATE_FILE or /var/lib/cyusbip/exported.json)",
        )
        _add_enumerate(bp)

    st = sub.add_parser("status", help="what a running usbipd is doing (its --metrics address)")
    st.add_argument("address", metavar="HOST:PORT", help="the address usbipd --metrics serves")
    be = sub.add_parser("bench", help="benchmark a remote device with this client (control latency, bulk IN/OUT)")
    be.add_argument("-r", "--remote", metavar="HOST", required=True)
    be.add_argument("-b", "--busid", required=True)
    be.add_argument("--seconds", type=float, default=None, metavar="S", help="measured seconds per case (default 1)")
    be.add_argument("--quick", action="store_true", help="0.1 s per case: a smoke test, not a measurement")
    add_capture_options(be, "every URB of the benchmark")

    sub.add_parser("version", help="print the version")
    return p


# ---------------------------------------------------------------- list -r
def format_remote_list(host: str, records: list[Any]) -> str:
    """What tools/usb/usbip/src/usbip_list.c (list_exported_devices) prints."""
    from ..usb.names import usb_ids

    ids = usb_ids()
    out = ["Exportable USB devices", "======================", f" - {host}"]
    for r in records:
        out.append(f"{r.busid:>11}: {ids.product(r.idVendor, r.idProduct)}")
        out.append(f"{'':>11}: {r.path}")
        out.append(f"{'':>11}: {ids.klass(r.bDeviceClass, r.bDeviceSubClass, r.bDeviceProtocol)}")
        for j, i in enumerate(r.interfaces):
            cls = ids.klass(i.bInterfaceClass, i.bInterfaceSubClass, i.bInterfaceProtocol)
            out.append(f"{'':>11}: {j:2d} - {cls}")
        out.append("")
    return "\n".join(out)


def record_json(r: Any) -> dict[str, Any]:
    from ..usb.names import usb_ids

    ids = usb_ids()
    d = r.as_dict()
    d["vendor"] = ids.vendors.get(r.idVendor)
    d["product"] = ids.products.get((r.idVendor, r.idProduct))
    d["idVendor"] = f"{r.idVendor:04x}"
    d["idProduct"] = f"{r.idProduct:04x}"
    return d


async def _list_remote(
    host: str, port: int, tls: ssl.SSLContext | None = None, server_hostname: str | None = None
) -> list[Any]:
    from ..client import connect

    async with connect(host, port, tls=tls, server_hostname=server_hostname) as conn:
        return await conn.list_devices()


def _list_discovered(args: argparse.Namespace) -> int:
    try:
        from ..net.mdns import discover
    except ImportError as exc:  # pragma: no cover - zeroconf is a dependency
        log.error("discovery needs python-zeroconf: %s", exc)
        return exitcodes.FAILURE
    if not 0 < args.seconds <= 60:
        log.error("--seconds must be within 0..60")
        return exitcodes.USAGE
    import asyncio

    try:
        found = asyncio.run(discover(args.seconds))
    except OSError as exc:
        log.error("cannot browse mDNS: %s", exc)
        return exitcodes.UNREACHABLE
    if args.json:
        print(json.dumps({"servers": [f.as_json() for f in found]}, indent=2))
        return exitcodes.OK
    if not found:
        log.info("no USB/IP servers announced themselves within %g s", args.seconds)
        return exitcodes.OK
    for f in found:
        where = ", ".join(f.addresses) or f.host
        print(f"{f.name}: {where} port {f.port}{' (TLS)' if f.tls else ''}")
        for busid, usbid in f.devices:
            print(f"    {busid:>10}: {usbid}")
    return exitcodes.OK


def cmd_list(args: argparse.Namespace) -> int:
    if args.discover:
        return _list_discovered(args)
    if args.remote:
        import asyncio

        from ..client import Disconnected, TlsFailed, UsbipError
        from ..client.errors import Timeout
        from ..protocol import ProtocolError

        try:
            records = asyncio.run(_list_remote(args.remote, args.tcp_port, args.tls_context, args.tls_server_name))
        except TlsFailed as exc:
            log.error("%s", exc)
            return exitcodes.REFUSED
        except ProtocolError as exc:
            log.error("%s: %s", args.remote, exc)
            return exitcodes.FAILURE
        except (Timeout, Disconnected) as exc:  # no answer / hung up: as unreachable as a failed connect
            log.error("could not connect to %s:%d: %s", args.remote, args.tcp_port, exc)
            return exitcodes.UNREACHABLE
        except UsbipError as exc:
            log.error("%s: %s", args.remote, exc)
            return exitcodes.REFUSED
        except (OSError, asyncio.TimeoutError) as exc:
            log.error("could not connect to %s:%d: %s", args.remote, args.tcp_port, exc or "timed out")
            return exitcodes.UNREACHABLE
        if args.json:
            print(json.dumps({"host": args.remote, "devices": [record_json(r) for r in records]}, indent=2))
        elif args.parsable:
            for r in records:
                print(f"busid={r.busid}#usbid={r.idVendor:04x}:{r.idProduct:04x}#")
        elif not records:
            log.info("no exportable devices found on %s", args.remote)
        else:
            print(format_remote_list(args.remote, records))
        return exitcodes.OK
    if args.local:
        from ..backends.usbdev import EnumerationError
        from .local import format_local_list, list_local

        try:
            devices = list_local(enumeration=args.enumerate)
        except (ValueError, EnumerationError) as exc:
            log.error("list: %s", exc)
            return exitcodes.FAILURE
        if args.json:
            print(json.dumps({"devices": devices}, indent=2))
        else:
            print(format_local_list(devices, parsable=args.parsable), end="")
        return exitcodes.OK
    log.error("usbip-vudc devices are not supported")
    return exitcodes.FAILURE


# ---------------------------------------------------------------- vhci commands (usbip/cli/vhci.py)
def cmd_attach(args: argparse.Namespace) -> int:
    from .vhci import attach_command

    if args.foreground and not args.persist:
        log.error("--foreground goes with --persist")
        return exitcodes.USAGE

    return attach_command(
        args.remote,
        args.tcp_port,
        args.busid,
        as_json=args.json,
        port=args.port,
        tls=args.tls_context,
        server_hostname=args.tls_server_name,
        persist=args.persist,
        foreground=args.foreground,
        on_ready=lambda: sdnotify.notify(f"READY=1\nMAINPID={os.getpid()}"),
    )


def cmd_detach(args: argparse.Namespace) -> int:
    from .vhci import detach_command

    return detach_command(args.port, as_json=args.json)


def cmd_port(args: argparse.Namespace) -> int:
    from .vhci import port_command

    return port_command(as_json=args.json)


def cmd_bind(args: argparse.Namespace) -> int:
    from .local import bind_command

    return bind_command(
        args.busid,
        bind=args.command == "bind",
        as_json=args.json,
        vidpid=args.vidpid,
        serial=args.serial,
        state_file=args.state_file,
        enumeration=args.enumerate,
    )


def format_status(doc: dict[str, Any]) -> str:
    srv = doc["server"]
    lines = [
        f"usbipd on port {srv['port']}: {srv['connections']} connections open, {srv['sessions']} imports, "
        f"{srv['connections_total']} accepted, {srv['connections_refused']} refused, "
        f"{srv['protocol_errors']} protocol errors",
        "",
        f"{'busid':<10} {'device':<16} {'imported by':<28} {'URBs':>10} {'errors':>7} {'in flight':>9}",
    ]
    for d in doc["devices"]:
        lines.append(
            f"{d['busid']:<10} {d['type']:<16} {d['imported_by'] or '-':<28} {d['urbs']:>10} "
            f"{sum(d['errors'].values()):>7} {d['in_flight']:>9}"
        )
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    url = f"http://{args.address}/status"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            doc = json.loads(resp.read(16 * 1024 * 1024))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.error("cannot read %s: %s", url, getattr(exc, "reason", exc))
        return exitcodes.UNREACHABLE
    print(json.dumps(doc, indent=2) if args.json else format_status(doc))
    return exitcodes.OK


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_command
    from .capture import capture_from_args

    try:
        capture = capture_from_args(args, "usbip bench")
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return exitcodes.USAGE
    try:
        return bench_command(
            args.remote, args.tcp_port, args.busid, args.seconds, args.quick, args.json, args.tls_context, capture
        )
    finally:
        if capture is not None:
            capture.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.debug, "usbip")
    if args.command is None:
        parser.print_help(sys.stderr)
        return exitcodes.USAGE
    if args.command == "version":
        from .version import version_string

        print(version_string("usbip"))
        return exitcodes.OK
    try:
        args.tls_context = tls_from_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        return exitcodes.USAGE
    handler = {
        "list": cmd_list,
        "attach": cmd_attach,
        "detach": cmd_detach,
        "port": cmd_port,
        "bind": cmd_bind,
        "unbind": cmd_bind,
        "bench": cmd_bench,
        "status": cmd_status,
    }[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return exitcodes.FAILURE


if __name__ == "__main__":
    sys.exit(main())
