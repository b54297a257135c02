"""Talking to a USB/IP server: list its devices, import one.

The kernel's usbipd answers one op request per TCP connection and then closes
it (tools/usb/usbip/src/usbipd.c), so each request opens a connection of its own;
an import keeps its connection for the URB phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING

from ..cancelsafe import wait_for
from ..net.netio import DEAD_PEER_TIMEOUT, PlainChannel, apply_dead_peer_timeout, set_nodelay
from ..net.tls import TlsChannel, TlsError
from ..protocol import ProtocolError
from ..protocol.constants import (
    DEVICE_RECORD_SIZE,
    INTERFACE_RECORD_SIZE,
    MAX_DEVICES,
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
from .errors import BadReply, Disconnected, ImportRefused, Timeout, TlsFailed, UsbipError
from .reconnect import ReconnectPolicy
from .remote import RemoteDevice

if TYPE_CHECKING:
    from ..capture import CaptureFile


async def open_socket(host: str, port: int = USBIP_PORT, timeout: float | None = 10.0) -> socket.socket:
    """A connected, non-blocking TCP socket with TCP_NODELAY (as usbip's tools set it)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for fam, stype, proto, _canon, addr in infos:
        sock = socket.socket(fam, stype, proto)
        sock.setblocking(False)
        try:
            await wait_for(loop.sock_connect(sock, addr), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            last = exc if isinstance(exc, OSError) else Timeout(f"connect to {host}:{port} timed out")
            continue
        except BaseException:
            sock.close()
            raise
        set_nodelay(sock)
        # keepalive and TCP_USER_TIMEOUT stay with the socket, also once vhci-hcd has it: a server
        # that vanished without FIN/RST ends the import within DEAD_PEER_TIMEOUT, not ~2 h
        apply_dead_peer_timeout(sock, DEAD_PEER_TIMEOUT)
        return sock
    raise last or OSError(f"cannot resolve {host}")


MAX_INTERFACES = 32  # bNumInterfaces is a u8; USB 2.0 allows 32 interfaces per configuration


class _Deadline:
    """One time budget for a whole op request (connect, request, every part of the reply).

    Each read has its own timeout in ``recv_exactly``; without a budget over all of them a
    server trickling a long device list one record at a time could hold the caller for
    ``count * timeout``.
    """

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.end = None if timeout is None else asyncio.get_running_loop().time() + timeout

    def left(self) -> float | None:
        if self.end is None:
            return None
        left = self.end - asyncio.get_running_loop().time()
        if left <= 0:
            raise Timeout(f"no answer within {self.timeout} s")
        return left


@contextlib.contextmanager
def _op_errors(host: str, port: int, what: str, timeout: float | None) -> Iterator[None]:
    """Report what the server did (or failed to do) during an op request as client errors."""
    try:
        yield
    except UsbipError:
        raise
    except TlsError as exc:
        raise TlsFailed(f"{host}:{port}: {exc}") from exc
    except ProtocolError as exc:
        raise BadReply(f"{what} from {host}:{port}: {exc}") from exc
    except asyncio.TimeoutError as exc:
        raise Timeout(f"{what} from {host}:{port}: no answer within {timeout} s") from exc
    except (ConnectionError, EOFError) as exc:  # netio.PeerClosed is a ConnectionError
        raise Disconnected(f"{what} from {host}:{port}: {exc or type(exc).__name__}") from exc


Channel = PlainChannel | TlsChannel


class Connection:
    """A USB/IP server at ``host:port``. Use ``async with usbip.connect(host) as conn``.

    With ``tls`` (a client ``ssl.SSLContext``, see ``usbip.net.tls.client_context``) every
    connection is TLS, checked against ``server_hostname`` (default: ``host``). With ``capture``
    (a :class:`usbip.capture.CaptureFile`, which the caller closes) the URBs of every device
    imported are written to it.
    """

    def __init__(
        self,
        host: str,
        port: int = USBIP_PORT,
        timeout: float = 10.0,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        capture: CaptureFile | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.tls = tls
        self.server_hostname = server_hostname or host
        self._devices: list[RemoteDevice] = []
        self.capture = capture

    async def _open(self, deadline: _Deadline) -> Channel:
        """Connect (errors stay OSErrors) and, with TLS, run the handshake."""
        sock = await open_socket(self.host, self.port, deadline.left())
        if self.tls is None:
            return PlainChannel(sock)
        channel = TlsChannel(sock, self.tls, server_side=False, server_hostname=self.server_hostname)
        try:
            with _op_errors(self.host, self.port, "TLS handshake", self.timeout):
                await channel.handshake(deadline.left())
        except BaseException:
            sock.close()
            raise
        return channel

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        devices, self._devices = self._devices, []
        for dev in devices:
            await dev.close()

    async def list_devices(self) -> list[DeviceRecord]:
        """OP_REQ_DEVLIST: the exported devices with their interface classes.

        The whole exchange (connect included) gets ``timeout`` seconds; every count in the
        reply is bounded before anything is read for it (at most MAX_DEVICES devices of at most
        MAX_INTERFACES interfaces, about 1.8 MB).
        """
        deadline = _Deadline(self.timeout)
        ch = await self._open(deadline)
        with _op_errors(self.host, self.port, "device list", self.timeout):
            try:
                await ch.send_all(pack_op_header(OP_REQ_DEVLIST), deadline.left())
                head = unpack_op_header(await ch.recv_exactly(OP_HEADER_SIZE, deadline.left()))
                if head.code != OP_REP_DEVLIST:
                    raise BadReply(f"expected OP_REP_DEVLIST, got op code 0x{head.code:04x}")
                if head.status != ST_OK:
                    raise UsbipError(f"server refused the device list (status {head.status})")
                count = unpack_devlist_count(await ch.recv_exactly(4, deadline.left()), MAX_DEVICES)
                devices = []
                for _ in range(count):
                    raw = await ch.recv_exactly(DEVICE_RECORD_SIZE, deadline.left())
                    nif = raw[DEVICE_RECORD_SIZE - 1]
                    if nif > MAX_INTERFACES:
                        raise BadReply(f"device record claims {nif} interfaces (limit {MAX_INTERFACES})")
                    data = await ch.recv_exactly(nif * INTERFACE_RECORD_SIZE, deadline.left()) if nif else b""
                    devices.append(DeviceRecord.unpack(raw, unpack_interfaces(data, nif)))
                return devices
            finally:
                ch.sock.close()

    async def import_socket(self, busid: str) -> tuple[socket.socket, DeviceRecord]:
        """OP_REQ_IMPORT over plain TCP: the socket, ready for the URB phase (or for vhci-hcd)."""
        if self.tls is not None:
            raise ValueError("a TLS import has no plain socket: use import_channel")
        ch, record = await self.import_channel(busid)
        return ch.sock, record

    async def import_channel(self, busid: str) -> tuple[Channel, DeviceRecord]:
        """OP_REQ_IMPORT: the channel (its socket, and the TLS session if any) ready for the
        URB phase, and the device record.

        The reply must name the device asked for, with a devid (busnum << 16 | devnum) that
        fits the 32-bit field of every URB header; the exchange gets ``timeout`` seconds.
        """
        deadline = _Deadline(self.timeout)
        ch = await self._open(deadline)
        sock = ch.sock
        with _op_errors(self.host, self.port, f"import of {busid}", self.timeout):
            try:
                await ch.send_all(pack_import_request(busid), deadline.left())
                head = unpack_op_header(await ch.recv_exactly(OP_HEADER_SIZE, deadline.left()))
                if head.code != OP_REP_IMPORT:
                    raise BadReply(f"expected OP_REP_IMPORT, got op code 0x{head.code:04x}")
                if head.status != ST_OK:
                    raise ImportRefused(busid, head.status)
                record = DeviceRecord.unpack(await ch.recv_exactly(DEVICE_RECORD_SIZE, deadline.left()))
                if record.busid != busid:
                    raise BadReply(f"asked for {busid}, server sent {record.busid!r}")
                if record.busnum > 0xFFFF or record.devnum > 0xFFFF:
                    raise BadReply(
                        f"device {busid}: busnum {record.busnum} / devnum {record.devnum} do not make a 32-bit devid"
                    )
                return ch, record
            except BaseException:
                sock.close()
                raise

    async def import_device(
        self,
        busid: str,
        read_descriptors: bool = True,
        configure: bool = True,
        reconnect: ReconnectPolicy | None = None,
    ) -> RemoteDevice:
        """Import ``busid`` and drive it from user space (no kernel driver, no root).

        The kernel's usbip-host exports devices unconfigured (unbinding the generic
        USB driver sets configuration 0); with ``configure`` an unconfigured device
        gets SET_CONFIGURATION with its first configuration, as a host would do.
        With ``reconnect`` the device is imported again whenever the connection drops
        (see :meth:`RemoteDevice.enable_reconnect`).
        """
        ch, record = await self.import_channel(busid)
        dev = RemoteDevice(ch.sock, record, tls=ch if isinstance(ch, TlsChannel) else None, capture=self.capture)
        # a long-lived Connection keeps only the devices still open (each holds its receive buffer)
        self._devices = [d for d in self._devices if not d.closed]
        self._devices.append(dev)
        if reconnect is not None:
            dev.enable_reconnect(reconnect, lambda: self._reimport(busid))
        try:
            if read_descriptors or configure:
                await dev.read_descriptors()
            if configure and record.bConfigurationValue == 0 and dev.configuration_descriptor:
                await dev.set_configuration(dev.configuration_descriptor[5])
        except BaseException:
            await dev.close()
            raise
        return dev

    async def _reimport(self, busid: str) -> tuple[socket.socket, DeviceRecord, TlsChannel | None]:
        ch, record = await self.import_channel(busid)
        return ch.sock, record, ch if isinstance(ch, TlsChannel) else None


def connect(
    host: str,
    port: int = USBIP_PORT,
    timeout: float = 10.0,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    capture: CaptureFile | None = None,
) -> Connection:
    """``async with usbip.connect(host, port) as conn: ...`` (``tls``, ``capture``: see :class:`Connection`)."""
    return Connection(host, port, timeout, tls, server_hostname, capture)
