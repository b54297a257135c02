"""Device and interface records of OP_REP_DEVLIST / OP_REP_IMPORT, and op headers.

Layouts: ``struct usbip_usb_device`` (312 bytes) and ``struct usbip_usb_interface``
(4 bytes) in ``tools/usb/usbip/libsrc/usbip_common.h``; op header ``struct
op_common`` in ``tools/usb/usbip/src/usbip_network.h``. All integers big-endian.
These messages happen once per connection, so one implementation serves both
codec paths.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .constants import (
    BUSID_SIZE,
    DEVICE_RECORD_SIZE,
    INTERFACE_RECORD_SIZE,
    MAX_DEVICES,
    OP_HEADER_SIZE,
    OP_REP_DEVLIST,
    OP_REP_IMPORT,
    OP_REQ_IMPORT,
    PATH_SIZE,
    USBIP_VERSION,
)
from .errors import ProtocolError

_OP = struct.Struct(">HHI")
_DEV = struct.Struct(f">{PATH_SIZE}s{BUSID_SIZE}sIIIHHHBBBBBB")
_IFACE = struct.Struct(">BBBx")
_U32 = struct.Struct(">I")
assert _DEV.size == DEVICE_RECORD_SIZE and _IFACE.size == INTERFACE_RECORD_SIZE


def _cstring(raw: bytes, what: str) -> str:
    end = raw.find(b"\0")
    if end < 0:
        raise ProtocolError(f"{what} is not NUL-terminated within {len(raw)} bytes")
    try:
        return raw[:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not valid UTF-8") from exc


def _fixed(text: str, size: int, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) >= size:
        raise ValueError(f"{what} {text!r} does not fit in {size - 1} bytes")
    return raw


@dataclass(frozen=True)
class OpHeader:
    version: int
    code: int
    status: int

    def pack(self) -> bytes:
        return _OP.pack(self.version, self.code, self.status)


def pack_op_header(code: int, status: int = 0, version: int = USBIP_VERSION) -> bytes:
    return _OP.pack(version, code, status)


def unpack_op_header(data: bytes | memoryview, expect_version: bool = True) -> OpHeader:
    if len(data) < OP_HEADER_SIZE:
        raise ProtocolError(f"op header needs {OP_HEADER_SIZE} bytes, got {len(data)}")
    version, code, status = _OP.unpack_from(data)
    if expect_version and version != USBIP_VERSION:
        raise ProtocolError(f"unsupported protocol version 0x{version:04x} (want 0x{USBIP_VERSION:04x})")
    return OpHeader(version, code, status)


@dataclass(frozen=True)
class InterfaceRecord:
    bInterfaceClass: int
    bInterfaceSubClass: int
    bInterfaceProtocol: int

    def pack(self) -> bytes:
        return _IFACE.pack(self.bInterfaceClass, self.bInterfaceSubClass, self.bInterfaceProtocol)


@dataclass(frozen=True)
class DeviceRecord:
    """One exported device as ``usbip list`` and the import reply describe it."""

    path: str
    busid: str
    busnum: int
    devnum: int
    speed: int
    idVendor: int
    idProduct: int
    bcdDevice: int
    bDeviceClass: int
    bDeviceSubClass: int
    bDeviceProtocol: int
    bConfigurationValue: int
    bNumConfigurations: int
    bNumInterfaces: int
    interfaces: tuple[InterfaceRecord, ...] = field(default=())

    @property
    def devid(self) -> int:
        """busnum << 16 | devnum, as the kernel stub names the device in URB headers."""
        return (self.busnum << 16) | self.devnum

    def pack(self, with_interfaces: bool = False) -> bytes:
        head = _DEV.pack(
            _fixed(self.path, PATH_SIZE, "path"),
            _fixed(self.busid, BUSID_SIZE, "busid"),
            self.busnum,
            self.devnum,
            self.speed,
            self.idVendor,
            self.idProduct,
            self.bcdDevice,
            self.bDeviceClass,
            self.bDeviceSubClass,
            self.bDeviceProtocol,
            self.bConfigurationValue,
            self.bNumConfigurations,
            self.bNumInterfaces,
        )
        if not with_interfaces:
            return head
        if len(self.interfaces) != self.bNumInterfaces:
            raise ValueError("bNumInterfaces does not match the interface records")
        return head + b"".join(i.pack() for i in self.interfaces)

    @classmethod
    def unpack(cls, data: bytes | memoryview, interfaces: tuple[InterfaceRecord, ...] = ()) -> DeviceRecord:
        if len(data) < DEVICE_RECORD_SIZE:
            raise ProtocolError(f"device record needs {DEVICE_RECORD_SIZE} bytes, got {len(data)}")
        f = _DEV.unpack_from(data)
        # mypy cannot count the struct's fields into the dataclass' positional ones
        return cls(_cstring(f[0], "path"), _cstring(f[1], "busid"), *f[2:], interfaces=interfaces)  # type: ignore[misc]

    def as_dict(self) -> dict[str, object]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "interfaces"}
        d["devid"] = self.devid
        d["interfaces"] = [vars(i).copy() for i in self.interfaces]
        return d


def pack_devlist_reply(devices: list[DeviceRecord]) -> bytes:
    parts = [pack_op_header(OP_REP_DEVLIST), _U32.pack(len(devices))]
    parts += [d.pack(with_interfaces=True) for d in devices]
    return b"".join(parts)


def pack_import_request(busid: str) -> bytes:
    return pack_op_header(OP_REQ_IMPORT) + _fixed(busid, BUSID_SIZE, "busid").ljust(BUSID_SIZE, b"\0")


def unpack_import_busid(data: bytes | memoryview) -> str:
    if len(data) < BUSID_SIZE:
        raise ProtocolError(f"import request needs a {BUSID_SIZE}-byte busid, got {len(data)}")
    return _cstring(bytes(data[:BUSID_SIZE]), "busid")


def pack_import_reply(status: int, device: DeviceRecord | None = None) -> bytes:
    """The kernel's usbipd sends only the op header when status != 0."""
    head = pack_op_header(OP_REP_IMPORT, status)
    if status != 0 or device is None:
        return head
    return head + device.pack()


def unpack_devlist_count(data: bytes | memoryview, max_devices: int = MAX_DEVICES) -> int:
    if len(data) < 4:
        raise ProtocolError(f"device count needs 4 bytes, got {len(data)}")
    (n,) = _U32.unpack_from(data)
    if n > max_devices:
        raise ProtocolError(f"device list claims {n} devices (limit {max_devices})")
    return int(n)


def unpack_interfaces(data: bytes | memoryview, count: int) -> tuple[InterfaceRecord, ...]:
    if len(data) < count * INTERFACE_RECORD_SIZE:
        raise ProtocolError("interface records truncated")
    return tuple(InterfaceRecord(*_IFACE.unpack_from(data, i * INTERFACE_RECORD_SIZE)) for i in range(count))
