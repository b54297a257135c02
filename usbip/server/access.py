"""Who may connect, and which clients may list or import which device.

Two layers, both optional:

* ``allow``: client networks (CIDR) that may connect at all; anyone else is disconnected
  right after accept, before a byte is read. Empty: every address.
* device rules: ``DEVICE=CLIENT[,CLIENT...]`` where DEVICE is a busid (``1-1.2``, ``100-1``)
  or ``vid:pid`` in hex (``0525:a4a0``, ``*`` for either half), and CLIENT an address or
  network (``192.0.2.7``, ``10.0.0.0/8``) or a certificate name (``cn:alice``: the commonName or
  a DNS/email subjectAltName of a verified TLS client certificate). A device named by any rule
  is listed to, and imported by, only the clients one of its rules names; a device no rule
  names follows ``allow`` alone.

A device a client may not import is answered as the kernel's usbipd answers a busid it does
not export (ST_NODEV, tools/usb/usbip/src/usbipd.c: recv_request_import) and is left out of
that client's device list, so a refused client learns nothing about it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable, Sequence

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_BUSID = re.compile(r"^\d+-[\d.]+$")
_VIDPID = re.compile(r"^([0-9a-fA-F]{1,4}|\*):([0-9a-fA-F]{1,4}|\*)$")


def parse_network(text: str) -> IPNetwork:
    """``10.0.0.0/8``, ``192.0.2.7`` (one host), ``::1``; ValueError otherwise."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not an address or network: {text!r}") from None


def _address(host: str) -> IPAddress | None:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # an IPv4 client on a dual-stack socket
    return addr


@dataclasses.dataclass(frozen=True)
class Client:
    """Who a connection is: its address and, with TLS client certificates, their names."""

    host: str
    names: tuple[str, ...] = ()

    @property
    def address(self) -> IPAddress | None:
        return _address(self.host)

    def __str__(self) -> str:
        return f"{self.host} ({', '.join(self.names)})" if self.names else self.host


@dataclasses.dataclass(frozen=True)
class DeviceRule:
    """One ``DEVICE=CLIENT[,CLIENT...]`` rule."""

    busid: str | None
    vid: int | None
    pid: int | None
    networks: tuple[IPNetwork, ...]
    names: tuple[str, ...]
    text: str

    @classmethod
    def parse(cls, text: str) -> DeviceRule:
        device, sep, clients = text.partition("=")
        device = device.strip()
        if not sep or not device or not clients.strip():
            raise ValueError(f"device rule {text!r}: expected DEVICE=CLIENT[,CLIENT...]")
        busid: str | None = None
        vid = pid = None
        m = _VIDPID.match(device)
        if m:
            vid = None if m.group(1) == "*" else int(m.group(1), 16)
            pid = None if m.group(2) == "*" else int(m.group(2), 16)
        elif _BUSID.match(device):
            busid = device
        else:
            raise ValueError(f"device rule {text!r}: {device!r} is neither a busid (1-1.2) nor vid:pid (0525:a4a0)")
        networks: list[IPNetwork] = []
        names: list[str] = []
        for item in clients.split(","):
            item = item.strip()
            if item.startswith("cn:"):
                if not item[3:]:
                    raise ValueError(f"device rule {text!r}: empty certificate name")
                names.append(item[3:])
            else:
                networks.append(parse_network(item))
        return cls(busid, vid, pid, tuple(networks), tuple(names), text)

    def names_device(self, busid: str, vid: int, pid: int) -> bool:
        if self.busid is not None:
            return self.busid == busid
        return (self.vid is None or self.vid == vid) and (self.pid is None or self.pid == pid)

    def admits(self, client: Client) -> bool:
        addr = client.address
        if addr is not None and any(addr in net for net in self.networks):
            return True
        return any(name in client.names for name in self.names)


@dataclasses.dataclass(frozen=True)
class AccessPolicy:
    allow: tuple[IPNetwork, ...] = ()
    rules: tuple[DeviceRule, ...] = ()

    @classmethod
    def from_specs(cls, allow: Iterable[str] = (), rules: Iterable[str] = ()) -> AccessPolicy:
        return cls(tuple(parse_network(a) for a in allow), tuple(DeviceRule.parse(r) for r in rules))

    @property
    def restricted(self) -> bool:
        return bool(self.allow or self.rules)

    def may_connect(self, host: str) -> bool:
        if not self.allow:
            return True
        addr = _address(host)
        return addr is not None and any(addr in net for net in self.allow)

    def may_use(self, client: Client, busid: str, vid: int, pid: int) -> bool:
        """May ``client`` see and import the device (busid, vid, pid)?"""
        named: Sequence[DeviceRule] = [r for r in self.rules if r.names_device(busid, vid, pid)]
        return not named or any(r.admits(client) for r in named)


__all__ = ["AccessPolicy", "Client", "DeviceRule", "parse_network"]
