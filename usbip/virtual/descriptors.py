"""Descriptors as data: endpoints, interfaces, associations and configurations a virtual device
declares, and the bytes the host reads (device, configuration, other-speed, BOS, string)."""

from __future__ import annotations

import hashlib
import itertools
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..protocol.constants import (
    XFER_BULK,
    XFER_INT,
    XFER_ISOC,
    Speed,
)
from ..usb.ch9 import (
    DT_BOS,
    DT_CONFIG,
    DT_DEVICE,
    DT_DEVICE_CAPABILITY,
    DT_ENDPOINT,
    DT_INTERFACE,
    DT_INTERFACE_ASSOCIATION,
    DT_SS_ENDPOINT_COMP,
    DT_STRING,
)

_serial_counters: dict[str, itertools.count[int]] = {}


def instance_serial(tag: str) -> str:
    """A serial number unique to this device instance: ``TAG`` + a tag of this host + a counter.

    Stable across restarts for the same host and order of devices (udev rules and Windows keep
    per-serial settings), different between two devices of one kind (the kernel and Windows tell
    identical vid:pid devices apart by it).
    """
    host = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6].upper()
    n = next(_serial_counters.setdefault(tag, itertools.count(1)))
    return f"{tag}{host}{n:04d}"


@dataclass
class Endpoint:
    address: int  # bEndpointAddress: number | 0x80 for IN
    type: int  # XFER_BULK / XFER_INT / XFER_ISOC
    max_packet: int
    interval: int = 0
    max_burst: int = 0  # SuperSpeed companion bMaxBurst
    ss_attributes: int = 0  # companion bmAttributes (streams / iso Mult)
    bytes_per_interval: int | None = None  # companion wBytesPerInterval (periodic)
    attributes: int = 0  # extra bmAttributes bits (iso sync/usage)
    extra: bytes = b""

    @property
    def number(self) -> int:
        return self.address & 0x0F

    @property
    def direction(self) -> int:
        return 1 if self.address & 0x80 else 0

    @property
    def key(self) -> tuple[int, int]:
        return (self.address & 0x0F, 1 if self.address & 0x80 else 0)


@dataclass
class Interface:
    number: int
    alternate: int = 0
    cls: int = 0xFF
    subclass: int = 0
    protocol: int = 0
    endpoints: Sequence[Endpoint] = ()
    name: str | None = None
    extra: bytes = b""  # class-specific descriptors between interface and endpoints
    class_descriptors: dict[int, bytes] = field(default_factory=dict)  # GET_DESCRIPTOR(interface)


@dataclass
class Association:
    """An Interface Association Descriptor (USB 2.0 ECN "IAD"): ``count`` interfaces from
    ``first`` form one function (UAC2 requires one around its AudioControl and AudioStreaming
    interfaces). It is emitted right before the first interface's alternate setting 0."""

    first: int
    count: int
    cls: int
    subclass: int = 0
    protocol: int = 0
    name: str | None = None


@dataclass
class Configuration:
    interfaces: Sequence[Interface]
    value: int = 1
    attributes: int = 0x80  # bus powered; 0x40 self powered, 0x20 remote wakeup
    max_power_ma: int = 100
    name: str | None = None
    associations: Sequence[Association] = ()

    def interface_numbers(self) -> list[int]:
        return sorted({i.number for i in self.interfaces})

    def find(self, number: int, alternate: int) -> Interface | None:
        for i in self.interfaces:
            if i.number == number and i.alternate == alternate:
                return i
        return None


def endpoint(address: int, type: int, max_packet: int, interval: int = 0, **kw: Any) -> Endpoint:
    """An endpoint: ``endpoint(0x81, XFER_BULK, 512)``."""
    return Endpoint(address, type, max_packet, interval, **kw)


def interface(
    number: int,
    alternate: int = 0,
    cls: int = 0xFF,
    subclass: int = 0,
    protocol: int = 0,
    endpoints: Iterable[Endpoint] = (),
    **kw: Any,
) -> Interface:
    return Interface(number, alternate, cls, subclass, protocol, tuple(endpoints), **kw)


def configuration(interfaces: Iterable[Interface], value: int = 1, **kw: Any) -> Configuration:
    return Configuration(tuple(interfaces), value, **kw)


def bulk_max_packet(speed: Speed) -> int:
    """The bulk wMaxPacketSize a device of ``speed`` uses."""
    if speed >= Speed.SUPER:
        return 1024
    if speed == Speed.HIGH:
        return 512
    return 64


def string_descriptor(text: str) -> bytes:
    data = text[:126].encode("utf-16-le")
    return bytes((2 + len(data), DT_STRING)) + data


def device_descriptor(
    *,
    bcd_usb: int,
    device_class: int,
    device_subclass: int,
    device_protocol: int,
    max_packet0: int,
    vendor_id: int,
    product_id: int,
    bcd_device: int,
    i_manufacturer: int,
    i_product: int,
    i_serial: int,
    num_configurations: int,
) -> bytes:
    return struct.pack(
        "<BBHBBBBHHHBBBB",
        18,
        DT_DEVICE,
        bcd_usb,
        device_class,
        device_subclass,
        device_protocol,
        max_packet0,
        vendor_id,
        product_id,
        bcd_device,
        i_manufacturer,
        i_product,
        i_serial,
        num_configurations,
    )


def full_speed(ep: Endpoint) -> Endpoint:
    """The full-speed twin of a high-speed endpoint (for OTHER_SPEED_CONFIGURATION)."""
    if ep.type == XFER_BULK:
        return Endpoint(ep.address, ep.type, 64, 0, attributes=ep.attributes, extra=ep.extra)
    if ep.type == XFER_INT:
        ms = max(1, min(255, (1 << max(0, ep.interval - 1)) // 8))
        return Endpoint(ep.address, ep.type, min(ep.max_packet & 0x7FF, 64), ms, extra=ep.extra)
    interval = max(1, ep.interval - 3)
    mp = min(ep.max_packet & 0x7FF, 1023)
    return Endpoint(ep.address, ep.type, mp, interval, attributes=ep.attributes, extra=ep.extra)


def config_descriptor(
    config: Configuration,
    speed: Speed,
    strings: Callable[[str | None], int],
    dtype: int = DT_CONFIG,
    endpoint_map: Callable[[Endpoint], Endpoint] | None = None,
) -> bytes:
    """The full configuration descriptor blob of ``config`` at ``speed``."""
    body = bytearray()
    for intf in config.interfaces:
        for a in config.associations:
            if a.first == intf.number and intf.alternate == 0:
                body += struct.pack(
                    "<BBBBBBBB",
                    8,
                    DT_INTERFACE_ASSOCIATION,
                    a.first,
                    a.count,
                    a.cls,
                    a.subclass,
                    a.protocol,
                    strings(a.name),
                )
        body += struct.pack(
            "<BBBBBBBBB",
            9,
            DT_INTERFACE,
            intf.number,
            intf.alternate,
            len(intf.endpoints),
            intf.cls,
            intf.subclass,
            intf.protocol,
            strings(intf.name),
        )
        body += intf.extra
        for ep in intf.endpoints:
            if endpoint_map is not None:
                ep = endpoint_map(ep)
            body += struct.pack(
                "<BBBBHB", 7, DT_ENDPOINT, ep.address, (ep.type & 3) | ep.attributes, ep.max_packet, ep.interval
            )
            if speed >= Speed.SUPER:
                bpi = ep.bytes_per_interval
                if bpi is None:
                    if ep.type in (XFER_INT, XFER_ISOC):
                        mult = (ep.ss_attributes & 3) + 1 if ep.type == XFER_ISOC else 1
                        bpi = ep.max_packet * (ep.max_burst + 1) * mult
                    else:
                        bpi = 0
                body += struct.pack("<BBBBH", 6, DT_SS_ENDPOINT_COMP, ep.max_burst, ep.ss_attributes, bpi)
            body += ep.extra
    head = struct.pack(
        "<BBHBBBBB",
        9,
        dtype,
        9 + len(body),
        len(config.interface_numbers()),
        config.value,
        strings(config.name),
        config.attributes | 0x80,
        min(255, config.max_power_ma // (8 if speed >= Speed.SUPER else 2)),
    )
    return head + bytes(body)


def bos_descriptor(speed: Speed) -> bytes:
    """BOS with a USB 2.0 extension (LPM) and, for USB 3 devices, a SuperSpeed capability."""
    caps = [struct.pack("<BBBI", 7, DT_DEVICE_CAPABILITY, 0x02, 0x06)]  # LPM | BESL
    if speed >= Speed.SUPER:
        # bmAttributes 0, speeds FS|HS|SS, lowest full-function speed FS, U1 1us, U2 500us
        caps.append(struct.pack("<BBBBHBBH", 10, DT_DEVICE_CAPABILITY, 0x03, 0, 0x000E, 1, 0x01, 0x01F4))
    body = b"".join(caps)
    return struct.pack("<BBHB", 5, DT_BOS, 5 + len(body), len(caps)) + body
