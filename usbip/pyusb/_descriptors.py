"""Descriptor objects for PyUSB, parsed the way libusb parses them.

PyUSB reads descriptor fields as attributes of whatever the backend returns. Configuration
blobs are split as ``libusb_get_config_descriptor`` splits them: consecutive interface
descriptors with the same ``bInterfaceNumber`` are the alternate settings of one interface;
descriptors between the configuration header and the first interface are the configuration's
``extra_descriptors``, those after an interface (or endpoint) descriptor up to the next
interface or endpoint are the interface's (endpoint's).
"""

from __future__ import annotations

import re
import struct
from typing import Any

from ..protocol.constants import Speed
from ..protocol.records import DeviceRecord
from ..usb.descriptors import urb_interval as descriptor_urb_interval

DT_DEVICE = 0x01
DT_CONFIG = 0x02
DT_INTERFACE = 0x04
DT_ENDPOINT = 0x05
DT_SS_ENDPOINT_COMP = 0x30
_STOP_EXTRA = (DT_DEVICE, DT_CONFIG, DT_INTERFACE, DT_ENDPOINT)

#: USB/IP speed (enum usb_device_speed) -> libusb_speed, what PyUSB's ``Device.speed`` holds
LIBUSB_SPEED: dict[int, int] = {
    Speed.UNKNOWN: 0,
    Speed.LOW: 1,
    Speed.FULL: 2,
    Speed.HIGH: 3,
    Speed.WIRELESS: 3,
    Speed.SUPER: 4,
    Speed.SUPER_PLUS: 5,
}
_BUSID = re.compile(r"^\d+-(\d+(?:\.\d+)*)$")


class Descriptor:
    """Descriptor fields as attributes (what PyUSB's ``_set_attr`` copies)."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if not isinstance(v, list))
        return f"<{type(self).__name__} {body}>"


class EndpointDesc(Descriptor):
    bEndpointAddress: int
    bmAttributes: int
    wMaxPacketSize: int
    bInterval: int
    extra_descriptors: list[int]


class InterfaceDesc(Descriptor):
    bInterfaceNumber: int
    bAlternateSetting: int
    bNumEndpoints: int
    endpoint: list[EndpointDesc]


class ConfigDesc(Descriptor):
    bConfigurationValue: int
    bNumInterfaces: int
    #: per interface (in order), its alternate settings
    interface: list[list[InterfaceDesc]]


def _walk(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    pos = 0
    while pos + 2 <= len(data):
        length = data[pos]
        if length < 2 or pos + length > len(data):
            break
        out.append((data[pos + 1], data[pos : pos + length]))
        pos += length
    return out


def _extra(items: list[tuple[int, bytes]], i: int) -> tuple[list[int], int]:
    """The descriptors from ``items[i]`` up to the next standard one, as libusb's ``extra`` bytes."""
    extra = bytearray()
    while i < len(items) and items[i][0] not in _STOP_EXTRA:
        extra += items[i][1]
        i += 1
    return list(extra), i


def parse_config(data: bytes) -> ConfigDesc:
    """A configuration descriptor blob (``wTotalLength`` bytes) as libusb presents it."""
    if len(data) < 9 or data[1] != DT_CONFIG:
        raise ValueError(f"not a configuration descriptor: {bytes(data[:9]).hex()}")
    b_length, b_type, total, n_if, value, i_config, attrs, power = struct.unpack_from("<BBHBBBBB", data)
    items = _walk(bytes(data[: max(min(total, len(data)), 9)]))[1:]
    extra, i = _extra(items, 0)
    interfaces: list[list[InterfaceDesc]] = []
    while i < len(items):
        dtype, d = items[i]
        i += 1
        if dtype != DT_INTERFACE or len(d) < 9:
            continue  # a stray endpoint or a device/config descriptor inside the blob: libusb skips it too
        number, alt, n_ep, cls, sub, proto, i_if = struct.unpack_from("<BBBBBBB", d, 2)
        if_extra, i = _extra(items, i)
        eps: list[EndpointDesc] = []
        while i < len(items) and items[i][0] == DT_ENDPOINT and len(eps) < n_ep:
            e = items[i][1]
            i += 1
            if len(e) < 7:
                continue
            addr, ep_attrs, maxp, interval = struct.unpack_from("<BBHB", e, 2)
            ep_extra, i = _extra(items, i)
            eps.append(
                EndpointDesc(
                    bLength=e[0],
                    bDescriptorType=DT_ENDPOINT,
                    bEndpointAddress=addr,
                    bmAttributes=ep_attrs,
                    wMaxPacketSize=maxp,
                    bInterval=interval,
                    bRefresh=e[7] if len(e) >= 9 else 0,
                    bSynchAddress=e[8] if len(e) >= 9 else 0,
                    extra_descriptors=ep_extra,
                )
            )
        desc = InterfaceDesc(
            bLength=d[0],
            bDescriptorType=DT_INTERFACE,
            bInterfaceNumber=number,
            bAlternateSetting=alt,
            bNumEndpoints=len(eps),
            bInterfaceClass=cls,
            bInterfaceSubClass=sub,
            bInterfaceProtocol=proto,
            iInterface=i_if,
            extra_descriptors=if_extra,
            endpoint=eps,
        )
        if interfaces and interfaces[-1][0].bInterfaceNumber == number:
            interfaces[-1].append(desc)
        else:
            interfaces.append([desc])
    return ConfigDesc(
        bLength=b_length,
        bDescriptorType=b_type,
        wTotalLength=total,
        bNumInterfaces=n_if,
        bConfigurationValue=value,
        iConfiguration=i_config,
        bmAttributes=attrs,
        bMaxPower=power,
        extra_descriptors=extra,
        interface=interfaces,
    )


def config_from_record(record: DeviceRecord) -> ConfigDesc:
    """What the device list tells of the configuration: its interfaces' classes, no endpoints."""
    interfaces = [
        [
            InterfaceDesc(
                bLength=9,
                bDescriptorType=DT_INTERFACE,
                bInterfaceNumber=n,
                bAlternateSetting=0,
                bNumEndpoints=0,
                bInterfaceClass=r.bInterfaceClass,
                bInterfaceSubClass=r.bInterfaceSubClass,
                bInterfaceProtocol=r.bInterfaceProtocol,
                iInterface=0,
                extra_descriptors=[],
                endpoint=[],
            )
        ]
        for n, r in enumerate(record.interfaces)
    ]
    return ConfigDesc(
        bLength=9,
        bDescriptorType=DT_CONFIG,
        wTotalLength=9 + 9 * len(interfaces),
        bNumInterfaces=len(interfaces),
        bConfigurationValue=record.bConfigurationValue or 1,
        iConfiguration=0,
        bmAttributes=0x80,
        bMaxPower=0,
        extra_descriptors=[],
        interface=interfaces,
    )


def _ports(busid: str) -> tuple[int, ...] | None:
    m = _BUSID.match(busid)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def device_desc(record: DeviceRecord, raw: bytes | None, bus: int) -> Descriptor:
    """The device descriptor: from GET_DESCRIPTOR (``raw``) or, without one, from the device list.

    The record lacks bcdUSB, bMaxPacketSize0 and the string indexes: those get the values
    typical of the device's speed and 0 (no string).
    """
    speed = record.speed
    ports = _ports(record.busid)
    fields: dict[str, Any] = {
        "bus": bus,
        "address": record.devnum,
        "port_number": ports[-1] if ports else None,
        "port_numbers": ports,
        "speed": LIBUSB_SPEED.get(speed, 0),
    }
    if raw is not None and len(raw) >= 18 and raw[1] == DT_DEVICE:
        names = (
            "bLength bDescriptorType bcdUSB bDeviceClass bDeviceSubClass bDeviceProtocol bMaxPacketSize0 "
            "idVendor idProduct bcdDevice iManufacturer iProduct iSerialNumber bNumConfigurations"
        ).split()
        fields.update(zip(names, struct.unpack_from("<BBHBBBBHHHBBBB", raw), strict=True))
        return Descriptor(**fields)
    if speed >= Speed.SUPER:
        bcd_usb, mps0 = (0x0310 if speed == Speed.SUPER_PLUS else 0x0300), 9
    elif speed in (Speed.LOW, Speed.FULL):
        bcd_usb, mps0 = 0x0110, 8 if speed == Speed.LOW else 64
    else:
        bcd_usb, mps0 = 0x0200, 64
    fields.update(
        bLength=18,
        bDescriptorType=DT_DEVICE,
        bcdUSB=bcd_usb,
        bDeviceClass=record.bDeviceClass,
        bDeviceSubClass=record.bDeviceSubClass,
        bDeviceProtocol=record.bDeviceProtocol,
        bMaxPacketSize0=mps0,
        idVendor=record.idVendor,
        idProduct=record.idProduct,
        bcdDevice=record.bcdDevice,
        iManufacturer=0,
        iProduct=0,
        iSerialNumber=0,
        bNumConfigurations=record.bNumConfigurations,
    )
    return Descriptor(**fields)


def find_endpoint(
    configs: list[ConfigDesc], config_value: int, alts: dict[int, int], address: int
) -> EndpointDesc | None:
    """Endpoint ``address`` in the active configuration: in the selected alternate settings first,
    then in any (as ``libusb_get_max_iso_packet_size`` looks it up)."""
    active = [c for c in configs if c.bConfigurationValue == config_value] or configs[:1]
    for selected_only in (True, False):
        for cfg in active:
            for alt_list in cfg.interface:
                for intf in alt_list:
                    if selected_only and intf.bAlternateSetting != alts.get(intf.bInterfaceNumber, 0):
                        continue
                    for ep in intf.endpoint:
                        if ep.bEndpointAddress == address:
                            return ep
    return None


def max_iso_packet_size(ep: EndpointDesc, speed: int) -> int:
    """``libusb_get_max_iso_packet_size``: bytes per service interval (``speed``: USB/IP's)."""
    w = ep.wMaxPacketSize
    if speed >= Speed.SUPER:
        extra = bytes(ep.extra_descriptors)
        for dtype, d in _walk(extra):
            if dtype == DT_SS_ENDPOINT_COMP and len(d) >= 6:
                return struct.unpack_from("<H", d, 4)[0] or (w & 0x7FF)
        return w & 0x7FF
    if speed in (Speed.HIGH, Speed.WIRELESS):
        return (w & 0x7FF) * (((w >> 11) & 3) + 1)
    return w & 0x7FF


def urb_interval(ep: EndpointDesc | None, speed: int) -> int:
    """``urb->interval`` for the periodic endpoint ``ep`` (1 when it is not described)."""
    return 1 if ep is None else descriptor_urb_interval(ep.bInterval, ep.bmAttributes, speed)


__all__ = [
    "ConfigDesc",
    "Descriptor",
    "EndpointDesc",
    "InterfaceDesc",
    "config_from_record",
    "device_desc",
    "find_endpoint",
    "max_iso_packet_size",
    "parse_config",
    "urb_interval",
]
