"""What the server is doing, for people and for Prometheus.

Counting costs the URB path nothing new: sessions already count submits,
completions, unlinks and errors by status, and streams count wire bytes. This module
reads those at scrape time. ``usbipd --metrics HOST:PORT`` serves

* ``/metrics``: the Prometheus text format (prometheus-client), per server, per
  device (totals over every import) and per live connection;
* ``/status``: the same as JSON (``usbip status HOST:PORT`` prints it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..cancelsafe import wait_for

if TYPE_CHECKING:
    from ..net.stream import Stream
    from .server import Server
    from .session import UrbSession

log = logging.getLogger(__name__)

MAX_REQUEST = 8192  # bytes of an HTTP request head we read before giving up on the client
REQUEST_TIMEOUT = 5.0


@dataclasses.dataclass
class Import:
    """One live import: who, which device, since when, and its session and stream."""

    peer: str
    client: str
    busid: str
    session: UrbSession
    stream: Stream
    tls: bool
    started: float = dataclasses.field(default_factory=time.time)

    def counters(self) -> dict[str, Any]:
        s = self.session
        return {
            "urbs_submitted": s.submitted,
            "urbs_completed": s.completed,
            "unlinks": s.unlinks,
            "errors": {str(k): v for k, v in sorted(s.errors.items())},
            "bytes_in": self.stream.bytes_in,
            "bytes_out": self.stream.bytes_out,
            "in_flight": len(s.pending),
            "held_bytes": s.held_bytes,
        }

    def snapshot(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "client": self.client,
            "busid": self.busid,
            "tls": self.tls,
            "since": self.started,
            "seconds": round(time.time() - self.started, 3),
            **self.counters(),
        }


@dataclasses.dataclass
class DeviceTotals:
    """Counters of every import of one device that has ended."""

    imports: int = 0
    urbs: int = 0
    unlinks: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, imp: Import) -> None:
        c = imp.counters()
        self.imports += 1
        self.urbs += c["urbs_completed"]
        self.unlinks += c["unlinks"]
        self.bytes_in += c["bytes_in"]
        self.bytes_out += c["bytes_out"]
        for k, v in c["errors"].items():
            self.errors[k] = self.errors.get(k, 0) + v


def snapshot(server: Server) -> dict[str, Any]:
    """The server's state as one JSON-able document."""
    live: dict[str, Import] = {imp.busid: imp for imp in server.imports.values()}
    devices = []
    for dev in server.registry.devices():
        tot = server.device_totals.get(dev.busid, DeviceTotals())
        imp = live.get(dev.busid)
        cur = imp.counters() if imp else {}
        errors = dict(tot.errors)
        for k, v in cur.get("errors", {}).items():
            errors[k] = errors.get(k, 0) + v
        devices.append(
            {
                "busid": dev.busid,
                "type": type(dev).__name__,
                "imported_by": imp.client if imp else None,
                "imports": tot.imports + (1 if imp else 0),
                "urbs": tot.urbs + cur.get("urbs_completed", 0),
                "unlinks": tot.unlinks + cur.get("unlinks", 0),
                "bytes_in": tot.bytes_in + cur.get("bytes_in", 0),
                "bytes_out": tot.bytes_out + cur.get("bytes_out", 0),
                "errors": errors,
                "in_flight": cur.get("in_flight", 0),
            }
        )
    return {
        "server": {**server.stats(), "connections_total": server.connections_total, "port": server.port},
        "devices": devices,
        "connections": [imp.snapshot() for imp in server.imports.values()],
        "capture": None if server.capture is None else server.capture.counters(),
    }


class _Collector:
    """prometheus-client collector reading :func:`snapshot` at scrape time."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        doc = snapshot(self.server)
        srv = doc["server"]
        c = CounterMetricFamily("usbip_connections", "TCP connections accepted")
        c.add_metric([], srv["connections_total"])
        yield c
        c = CounterMetricFamily("usbip_connections_refused", "connections refused (access rules, caps)")
        c.add_metric([], srv["connections_refused"])
        yield c
        c = CounterMetricFamily("usbip_protocol_errors", "connections dropped for breaking the protocol")
        c.add_metric([], srv["protocol_errors"])
        yield c
        g = GaugeMetricFamily("usbip_open_connections", "connections open now (op phase and imports)")
        g.add_metric([], srv["connections"])
        yield g
        labels = ["busid", "type"]
        urbs = CounterMetricFamily("usbip_device_urbs", "URBs completed, all imports", labels=labels)
        unl = CounterMetricFamily("usbip_device_unlinks", "CMD_UNLINKs received", labels=labels)
        byt = CounterMetricFamily("usbip_device_bytes", "bytes on the wire", labels=[*labels, "direction"])
        err = CounterMetricFamily("usbip_device_urb_errors", "URBs completed with an error", labels=[*labels, "status"])
        imps = CounterMetricFamily("usbip_device_imports", "imports of the device", labels=labels)
        infl = GaugeMetricFamily("usbip_device_in_flight", "URBs in flight now", labels=labels)
        busy = GaugeMetricFamily("usbip_device_imported", "1 while a client imports the device", labels=labels)
        for d in doc["devices"]:
            lv = [d["busid"], d["type"]]
            urbs.add_metric(lv, d["urbs"])
            unl.add_metric(lv, d["unlinks"])
            byt.add_metric([*lv, "in"], d["bytes_in"])
            byt.add_metric([*lv, "out"], d["bytes_out"])
            for status, n in d["errors"].items():
                err.add_metric([*lv, status], n)
            imps.add_metric(lv, d["imports"])
            infl.add_metric(lv, d["in_flight"])
            busy.add_metric(lv, 1 if d["imported_by"] else 0)
        yield from (urbs, unl, byt, err, imps, infl, busy)
        cl = ["busid", "client"]
        cu = GaugeMetricFamily("usbip_connection_urbs", "URBs completed on this import", labels=cl)
        cs = GaugeMetricFamily("usbip_connection_seconds", "seconds since the import", labels=cl)
        ci = GaugeMetricFamily("usbip_connection_in_flight", "URBs in flight on this import", labels=cl)
        ch = GaugeMetricFamily("usbip_connection_held_bytes", "memory this import holds", labels=cl)
        for conn in doc["connections"]:
            lv = [conn["busid"], conn["client"]]
            cu.add_metric(lv, conn["urbs_completed"])
            cs.add_metric(lv, conn["seconds"])
            ci.add_metric(lv, conn["in_flight"])
            ch.add_metric(lv, conn["held_bytes"])
        yield from (cu, cs, ci, ch)
        cap = doc["capture"]
        if cap is not None:
            rec = CounterMetricFamily("usbip_capture_records", "URB capture records (--capture)", labels=["outcome"])
            for outcome in ("accepted", "written", "dropped", "lost"):
                rec.add_metric([outcome], cap["records" if outcome == "accepted" else outcome])
            rot = CounterMetricFamily("usbip_capture_rotations", "capture files rotated")
            rot.add_metric([], cap["rotations"])
            werr = CounterMetricFamily("usbip_capture_write_errors", "failed writes of the capture file")
            werr.add_metric([], cap["write_errors"])
            yield from (rec, rot, werr)


class MetricsEndpoint:
    """A minimal HTTP/1.0 endpoint on the server's event loop: GET /metrics and GET /status."""

    def __init__(self, server: Server, host: str, port: int) -> None:
        from prometheus_client import CollectorRegistry

        self.server = server
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(server))
        self._srv: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._srv = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._srv.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics and /status", self.host, self.port)

    async def close(self) -> None:
        if self._srv is not None:
            self._srv.close()
            with contextlib.suppress(Exception):
                await self._srv.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            method, path, *_ = [*head.split(b"\r\n", 1)[0].decode("latin-1").split(" "), "", ""]
            path = path.split("?", 1)[0]
            if method != "GET":
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/metrics":
                from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
            elif path == "/status":
                status, ctype = "200 OK", "application/json"
                body = json.dumps(snapshot(self.server), indent=2).encode() + b"\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"try /metrics or /status\n"
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, OSError, ValueError):
            pass
        finally:
            writer.close()


__all__ = ["DeviceTotals", "Import", "MetricsEndpoint", "snapshot"]
