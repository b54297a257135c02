"""Talking to a USB/IP server: list its devices, import one.

The kernel's usbipd answers one op request per TCP connection and then closes
it (tools/usb/usbip/src/usbipd.c), so each request opens a connection of its own;
an import keeps its connection for the URB phase.
"""

from __future__ import annotations

import asyncio
import socket
from types import TracebackType

from ..netio import recv_exactly, send_all, set_keepalive, set_nodelay
from ..protocol import ProtocolError
from ..protocol.constants import (
    DEVICE_RECORD_SIZE,
    INTERFACE_RECORD_SIZE,
    OP_HEADER_SIZE,
    OP_REP_DEVLIST,
    OP_REP_IMPORT,
    OP_REQ_DEVLIST,
    ST_OK,
    USBIP_PORT,
)
from ..protocol.records import (
    DeviceRecord,
    pack_import_request,
    pack_op_header,
    unpack_devlist_count,
    unpack_interfaces,
    unpack_op_header,
)
from .errors import ImportRefused, UsbipError
from .remote import RemoteDevice

MAX_INTERFACES = 32  # bNumInterfaces is a u8; USB 2.0 allows 32 interfaces per configuration


async def open_socket(host: str, port: int = USBIP_PORT, timeout: float = 10.0) -> socket.socket:
    """A connected, non-blocking TCP socket with TCP_NODELAY (as usbip's tools set it)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for fam, stype, proto, _canon, addr in infos:
        sock = socket.socket(fam, stype, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, addr), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            last = exc if isinstance(exc, OSError) else OSError(f"connect to {host}:{port} timed out")
            continue
        set_nodelay(sock)
        set_keepalive(sock)
        return sock
    raise last or OSError(f"cannot resolve {host}")


class Connection:
    """A USB/IP server at ``host:port``. Use ``async with usbip.connect(host) as conn``."""

    def __init__(self, host: str, port: int = USBIP_PORT, timeout: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._devices: list[RemoteDevice] = []

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        for dev in self._devices:
            await dev.close()
        self._devices.clear()

    async def list_devices(self) -> list[DeviceRecord]:
        """OP_REQ_DEVLIST: the exported devices with their interface classes."""
        sock = await open_socket(self.host, self.port, self.timeout)
        try:
            t = self.timeout
            await send_all(sock, pack_op_header(OP_REQ_DEVLIST), t)
            head = unpack_op_header(await recv_exactly(sock, OP_HEADER_SIZE, t))
            if head.code != OP_REP_DEVLIST:
                raise ProtocolError(f"expected OP_REP_DEVLIST, got op code 0x{head.code:04x}")
            if head.status != ST_OK:
                raise UsbipError(f"server refused the device list (status {head.status})")
            count = unpack_devlist_count(await recv_exactly(sock, 4, t))
            devices = []
            for _ in range(count):
                raw = await recv_exactly(sock, DEVICE_RECORD_SIZE, t)
                nif = raw[DEVICE_RECORD_SIZE - 1]
                if nif > MAX_INTERFACES:
                    raise ProtocolError(f"device record claims {nif} interfaces (limit {MAX_INTERFACES})")
                ifaces = unpack_interfaces(await recv_exactly(sock, nif * INTERFACE_RECORD_SIZE, t), nif)
                devices.append(DeviceRecord.unpack(raw, ifaces))
            return devices
        finally:
            sock.close()

    async def import_socket(self, busid: str) -> tuple[socket.socket, DeviceRecord]:
        """OP_REQ_IMPORT: the connected socket, ready for the URB phase, and the device record."""
        sock = await open_socket(self.host, self.port, self.timeout)
        try:
            t = self.timeout
            await send_all(sock, pack_import_request(busid), t)
            head = unpack_op_header(await recv_exactly(sock, OP_HEADER_SIZE, t))
            if head.code != OP_REP_IMPORT:
                raise ProtocolError(f"expected OP_REP_IMPORT, got op code 0x{head.code:04x}")
            if head.status != ST_OK:
                raise ImportRefused(busid, head.status)
            record = DeviceRecord.unpack(await recv_exactly(sock, DEVICE_RECORD_SIZE, t))
            if record.busid != busid:
                raise ProtocolError(f"asked for {busid}, server sent {record.busid}")
            return sock, record
        except BaseException:
            sock.close()
            raise

    async def import_device(self, busid: str, read_descriptors: bool = True, configure: bool = True) -> RemoteDevice:
        """Import ``busid`` and drive it from user space (no kernel driver, no root).

        The kernel's usbip-host exports devices unconfigured (unbinding the generic
        USB driver sets configuration 0); with ``configure`` an unconfigured device
        gets SET_CONFIGURATION with its first configuration, as a host would do.
        """
        sock, record = await self.import_socket(busid)
        dev = RemoteDevice(sock, record)
        self._devices.append(dev)
        try:
            if read_descriptors or configure:
                await dev.read_descriptors()
            if configure and record.bConfigurationValue == 0 and dev.configuration_descriptor:
                await dev.set_configuration(dev.configuration_descriptor[5])
        except BaseException:
            await dev.close()
            raise
        return dev


def connect(host: str, port: int = USBIP_PORT, timeout: float = 10.0) -> Connection:
    """``async with usbip.connect(host, port) as conn: ...``"""
    return Connection(host, port, timeout)
