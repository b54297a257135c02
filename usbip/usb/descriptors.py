"""Parsing of standard USB descriptors (USB 2.0 spec chapter 9.6), bounds-checked."""

from __future__ import annotations

import struct
from collections.abc import Iterator

from ..protocol.constants import Speed
from .ch9 import DT_DEVICE, DT_ENDPOINT, DT_INTERFACE, XFER_ISOC, XFER_MASK

_DEVICE = struct.Struct("<BBHBBBBHHHBBBB")
_DEVICE_FIELDS = (
    "bLength",
    "bDescriptorType",
    "bcdUSB",
    "bDeviceClass",
    "bDeviceSubClass",
    "bDeviceProtocol",
    "bMaxPacketSize0",
    "idVendor",
    "idProduct",
    "bcdDevice",
    "iManufacturer",
    "iProduct",
    "iSerialNumber",
    "bNumConfigurations",
)


def parse_device_descriptor(data: bytes) -> dict[str, int]:
    if len(data) < _DEVICE.size or data[1] != DT_DEVICE:
        raise ValueError("not an 18-byte device descriptor")
    return dict(zip(_DEVICE_FIELDS, _DEVICE.unpack_from(data), strict=True))


def walk(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Yield (bDescriptorType, descriptor bytes) for each descriptor in a blob."""
    pos = 0
    while pos + 2 <= len(data):
        length = data[pos]
        if length < 2 or pos + length > len(data):
            break
        yield data[pos + 1], data[pos : pos + length]
        pos += length


def interface_classes(config: bytes) -> list[tuple[int, int, int]]:
    """(class, subclass, protocol) of each interface (alternate setting 0)."""
    out = []
    for dtype, d in walk(config):
        if dtype == DT_INTERFACE and len(d) >= 9 and d[3] == 0:
            out.append((d[5], d[6], d[7]))
    return out


def endpoint_types(config: bytes) -> dict[tuple[int, int], int]:
    """{(endpoint number, direction 1=IN/0=OUT): transfer type} over all alt settings."""
    out: dict[tuple[int, int], int] = {}
    for dtype, d in walk(config):
        if dtype == DT_ENDPOINT and len(d) >= 7:
            addr = d[2]
            out[(addr & 0x0F, 1 if addr & 0x80 else 0)] = d[3] & 0x03
    return out


def endpoints(config: bytes) -> list[dict[str, int]]:
    """Every endpoint descriptor of a configuration blob, decoded."""
    out = []
    for dtype, d in walk(config):
        if dtype == DT_ENDPOINT and len(d) >= 7:
            addr, attrs, maxp, interval = struct.unpack_from("<BBHB", d, 2)
            out.append(
                {
                    "bEndpointAddress": addr,
                    "bmAttributes": attrs,
                    "wMaxPacketSize": maxp,
                    "bInterval": interval,
                }
            )
    return out


def urb_interval(b_interval: int, attributes: int, speed: int) -> int:
    """``urb->interval`` for a periodic endpoint, as a host sets it (usb_fill_int_urb): frames
    at low and full speed for interrupt endpoints, else 2**(bInterval-1) (micro)frames. The
    kernel's ``usb_submit_urb`` (usbip-host submits what the wire says) refuses a periodic URB
    whose interval is 0."""
    b = b_interval or 1
    if speed >= Speed.HIGH or attributes & XFER_MASK == XFER_ISOC:
        return 1 << (min(max(b, 1), 16) - 1)
    return b
