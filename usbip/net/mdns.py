"""Finding servers without typing addresses: DNS-SD over mDNS (python-zeroconf).

``usbipd`` announces ``_usbip._tcp.local.`` with TXT records naming what it exports; the
same service type PyPI's pyusb-usbip-backend browses. TXT keys:

* ``proto=0111`` (the wire version), ``impl=cyusbip``, ``tls=0|1``;
* ``devices=N`` and one ``dN=BUSID VID:PID`` per exported device (at most
  :data:`MAX_TXT_DEVICES`; a TXT string is at most 255 bytes, RFC 6763 6.1).

``usbip list --discover`` browses for a few seconds and lists servers and their devices.
An mDNS failure (no multicast route, no interface) is logged and never stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

from ..cancelsafe import cancel_and_wait

log = logging.getLogger(__name__)

SERVICE_TYPE = "_usbip._tcp.local."
MAX_TXT_DEVICES = 32
REFRESH_INTERVAL = 5.0  # seconds between checks for a changed device set


@dataclasses.dataclass(frozen=True)
class Found:
    """A server seen on the network."""

    name: str
    host: str
    addresses: tuple[str, ...]
    port: int
    tls: bool
    devices: tuple[tuple[str, str], ...]  # (busid, "vid:pid")

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "host": self.host,
            "addresses": list(self.addresses),
            "port": self.port,
            "tls": self.tls,
            "devices": [{"busid": b, "usbid": u} for b, u in self.devices],
        }


def txt_records(devices: Iterable[tuple[str, int, int]], tls: bool) -> dict[str, str]:
    """The TXT properties for ``devices`` ((busid, vid, pid) each)."""
    devs = list(devices)
    props = {"proto": "0111", "impl": "cyusbip", "tls": "1" if tls else "0", "devices": str(len(devs))}
    for i, (busid, vid, pid) in enumerate(devs[:MAX_TXT_DEVICES]):
        props[f"d{i}"] = f"{busid[:32]} {vid:04x}:{pid:04x}"
    return props


def parse_txt(props: dict[bytes, bytes | None]) -> tuple[bool, tuple[tuple[str, str], ...]]:
    """(tls, devices) from TXT properties; anything malformed is skipped (it comes off the network)."""

    def get(key: str) -> str:
        value = props.get(key.encode())
        return value.decode("utf-8", "replace") if value else ""

    devices = []
    for i in range(MAX_TXT_DEVICES):
        parts = get(f"d{i}").split()
        if len(parts) == 2 and len(parts[1]) == 9 and parts[1][4] == ":":
            devices.append((parts[0], parts[1]))
    return get("tls") == "1", tuple(devices)


def _own_addresses(host: str | None) -> list[str]:
    """Addresses to announce: the listen address, or every non-loopback address of this host."""
    if host:
        return [host]
    import ifaddr  # zeroconf's own dependency

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            addr = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            if addr.startswith("127.") or addr == "::1" or addr.startswith("fe80"):
                continue
            out.append(addr)
    return out


class Announcer:
    """Announces a server and keeps its TXT records in step with the exported devices."""

    def __init__(
        self,
        port: int,
        devices: Callable[[], list[tuple[str, int, int]]],
        tls: bool = False,
        host: str | None = None,
        name: str | None = None,
    ) -> None:
        self.port = port
        self.devices = devices
        self.tls = tls
        self.host = host
        self.name = name or f"{socket.gethostname()} usbipd"
        self._zc: Any = None
        self._info: Any = None
        self._task: asyncio.Task[None] | None = None
        self._last: list[tuple[str, int, int]] = []

    def _service_info(self, devices: list[tuple[str, int, int]]) -> Any:
        from zeroconf import ServiceInfo

        hostname = socket.gethostname().split(".")[0]
        return ServiceInfo(
            SERVICE_TYPE,
            f"{self.name}.{SERVICE_TYPE}",
            port=self.port,
            properties=txt_records(devices, self.tls),
            server=f"{hostname}.local.",
            parsed_addresses=_own_addresses(self.host),
        )

    async def start(self) -> bool:
        """Announce; False (and a warning) when mDNS cannot be used here."""
        try:
            from zeroconf.asyncio import AsyncZeroconf

            self._last = self.devices()
            self._info = self._service_info(self._last)
            if not self._info.parsed_addresses():
                raise OSError("no non-loopback address to announce")
            self._zc = AsyncZeroconf()
            # the first await starts probing; the task it returns ends once the name is ours (~2 s)
            registered = await self._zc.async_register_service(self._info, allow_name_change=True)
        except Exception as exc:  # ImportError, OSError, zeroconf's errors: never fatal
            log.warning("not announcing over mDNS: %s", exc or type(exc).__name__)
            await self.close()
            return False
        registered.add_done_callback(self._registered)
        self._task = asyncio.create_task(self._refresh())
        return True

    def _registered(self, task: asyncio.Future[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.warning("mDNS announcement failed: %s", exc or type(exc).__name__)
        elif self._info is not None:
            log.info("announcing %s on mDNS as %r", SERVICE_TYPE, self._info.name)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_INTERVAL)
            try:
                devices = self.devices()
                if devices != self._last:
                    self._last = devices
                    info = self._service_info(devices)
                    info.name = self._info.name  # keep a name zeroconf may have changed
                    self._info = info
                    await self._zc.async_update_service(info)
            except Exception as exc:
                log.warning("mDNS update failed: %s", exc)

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if self._zc is not None:
            with contextlib.suppress(Exception):
                if self._info is not None:
                    await self._zc.async_unregister_service(self._info)
                await self._zc.async_close()
            self._zc = None


async def discover(seconds: float = 3.0) -> list[Found]:
    """Browse for ``seconds`` and return the servers seen, sorted by name."""
    from zeroconf import ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    names: set[str] = set()

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            names.add(name)

    azc = AsyncZeroconf()
    browser = AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE, handlers=[on_change])
    found: dict[str, Found] = {}
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            await asyncio.sleep(min(0.25, max(0.0, end - loop.time())))
            for name in list(names - found.keys()):
                info = AsyncServiceInfo(SERVICE_TYPE, name)
                if not await info.async_request(azc.zeroconf, 1000):
                    continue
                tls, devices = parse_txt(info.properties or {})
                found[name] = Found(
                    name=name.removesuffix("." + SERVICE_TYPE),
                    host=(info.server or "").rstrip("."),
                    addresses=tuple(info.parsed_addresses()),
                    port=info.port or 0,
                    tls=tls,
                    devices=devices,
                )
    finally:
        await browser.async_cancel()
        await azc.async_close()
    return sorted(found.values(), key=lambda f: f.name)


__all__ = ["SERVICE_TYPE", "Announcer", "Found", "discover", "parse_txt", "txt_records"]
