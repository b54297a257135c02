"""An imported device driven from user space: URBs over the USB/IP connection, no kernel driver."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

from ..cancelsafe import cancel_and_wait, wait_for
from ..net.stream import Stream, TlsSession
from ..protocol import (
    HEADER_SIZE,
    USBIP_DIR_IN,
    USBIP_DIR_OUT,
    Decoder,
    DeviceRecord,
    IsoPackets,
    ProtocolError,
    RetSubmit,
    RetUnlink,
    pack_cmd_submit,
    pack_cmd_unlink,
)
from ..protocol.constants import DEFAULT_MAX_TRANSFER, ECONNRESET, URB_ISO_ASAP
from ..usb.ch9 import DT_CONFIG, DT_DEVICE
from ..usb.descriptors import endpoints, parse_device_descriptor, urb_interval
from .errors import BadReply, Disconnected, Overloaded, Timeout, UsbipError, transfer_error
from .reconnect import Backoff, ReconnectPolicy

if TYPE_CHECKING:
    from ..capture import CaptureFile

log = logging.getLogger(__name__)

UNLINK_TIMEOUT = 5.0  # how long a cancelled URB waits for the server's RET_UNLINK / RET_SUBMIT
# What one connection may have outstanding. A server that stops answering or reading must not
# make the client grow without bound: past these, submit() raises Overloaded. The server side
# drops a connection with more than 4096 URBs in flight (usbip/server/session.py), so no working
# exchange needs more.
MAX_IN_FLIGHT = 4096
MAX_QUEUED = 64 * 1024 * 1024  # bytes written but not yet taken by the socket
MAX_TRANSFER_LENGTH = 0x7FFFFFFF  # transfer_buffer_length is a signed 32-bit field
#: the device a task is restoring after a re-import: its URBs go out while the device's users wait
_RESTORING: contextvars.ContextVar[RemoteDevice | None] = contextvars.ContextVar("usbip_restoring", default=None)
Reimport = Callable[[], Awaitable[tuple[socket.socket, DeviceRecord, TlsSession | None]]]


class UrbResult:
    """What an URB came back with."""

    __slots__ = ("actual_length", "data", "error_count", "iso", "start_frame", "status")

    def __init__(
        self,
        status: int,
        actual_length: int,
        data: memoryview | bytes | bytearray | None,
        iso: IsoPackets | None = None,
        start_frame: int = 0,
        error_count: int = 0,
    ) -> None:
        self.status = status
        self.actual_length = actual_length
        self.data = data
        self.iso = iso
        self.start_frame = start_frame
        self.error_count = error_count

    def packets(self) -> list[tuple[int, int, bytes]]:
        """Iso IN results as (status, actual_length, data) per packet."""
        if self.iso is None or self.data is None:
            raise ValueError("not the result of an isochronous IN transfer")
        mv = memoryview(self.data)
        return [(st, act, bytes(mv[off : off + act])) for off, _ln, act, st in self.iso.tolist()]

    def __repr__(self) -> str:
        return f"<UrbResult status={self.status} actual_length={self.actual_length}>"


class PendingUrb:
    """An URB in flight: await it for its :class:`UrbResult` (cancelling it sends CMD_UNLINK)."""

    __slots__ = ("device", "direction", "future", "in_buffer", "iso", "length", "seqnum", "unlinked")

    def __init__(self, device: RemoteDevice, seqnum: int, direction: int, length: int, iso: IsoPackets | None):
        self.device = device
        self.seqnum = seqnum
        self.direction = direction
        self.length = length
        self.iso = iso
        self.unlinked = False
        self.future: asyncio.Future[UrbResult] = device.loop.create_future()
        self.in_buffer: bytearray | None = None

    def __await__(self) -> Generator[Any, None, UrbResult]:
        return self.wait().__await__()

    async def wait(self, timeout: float | None = None) -> UrbResult:
        try:
            return await wait_for(asyncio.shield(self.future), timeout)
        except asyncio.TimeoutError:
            if not self.future.done():
                await self.device._unlink(self)
            if not self.future.done():  # the server never answered the unlink
                raise Timeout(
                    f"{self.device.busid}: seqnum {self.seqnum} timed out and the server did not answer its unlink"
                ) from None
            res = self.future.result()  # raises Disconnected if the connection ended meanwhile
            if res.status == 0:  # it completed before the unlink reached the server: keep the data
                return res
            raise transfer_error(res.status, res.actual_length, res.data) from None  # Cancelled (-ECONNRESET)
        except asyncio.CancelledError:
            if not self.future.done():
                await self.device._unlink(self)
            raise

    def cancel(self) -> None:
        """Send CMD_UNLINK now (the URB still completes, normally with -ECONNRESET)."""
        if not self.future.done() and not self.unlinked:
            self.device._send_unlink(self)


class RemoteDevice:
    """A device imported over USB/IP. Create it with ``Connection.import_device``."""

    def __init__(
        self,
        sock: socket.socket,
        record: DeviceRecord,
        max_transfer: int = DEFAULT_MAX_TRANSFER,
        loop: asyncio.AbstractEventLoop | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_queued: int = MAX_QUEUED,
        tls: TlsSession | None = None,
        capture: CaptureFile | None = None,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.record = record
        self.busid = record.busid
        self.devid = record.devid
        self.speed = record.speed
        self._intervals: tuple[bytes | None, dict[int, int]] | None = None  # see _urb_interval
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self._seq = 0
        self._pending: dict[int, PendingUrb] = {}
        self._unlinks: dict[int, int] = {}  # seqnum of a CMD_UNLINK -> seqnum of the URB it targets
        self._unknown_unlink_replies = 0
        self._decoder = Decoder("client", max_transfer=max_transfer)
        self._stream = Stream(sock, self._decoder, self._on_messages, self._on_close, self.loop, tls=tls)
        self._stream.start()
        self.closed = False
        self.close_reason: BaseException | None = None
        self.device_descriptor: dict[str, int] | None = None
        self.configuration_descriptor: bytes | None = None
        # what a re-import restores (set_configuration / set_interface keep these)
        self.configuration = record.bConfigurationValue
        self._alt_settings: dict[int, int] = {}
        # reconnecting (enable_reconnect): URBs submitted while the device is away wait in _parked
        self._max_transfer = max_transfer
        self.reconnect_policy: ReconnectPolicy | None = None
        self.reconnects = 0  # re-imports that brought the device back
        self._reimport: Reimport | None = None
        self._backoff: Backoff | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._closing = False
        self._away = False
        self._back = asyncio.Event()
        self._back.set()
        self._connected_at = self.loop.time()
        self._parked: dict[PendingUrb, tuple[tuple[Any, ...], int, asyncio.TimerHandle]] = {}
        self._parked_bytes = 0
        self._unparking: PendingUrb | None = None
        # with a capture (usbip.capture) every URB submitted and its completion are recorded
        self._capture = None if capture is None else capture.client_session(record.busnum, record.devnum)

    # ------------------------------------------------------------ context
    async def __aenter__(self) -> RemoteDevice:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closing = True
        task = self._reconnect_task
        if task is not None and not task.done():
            await cancel_and_wait(task)
        self._stream.close(None)
        self.closed = True  # also when the connection was down already
        self._fail_parked(Disconnected(f"{self.busid}: closed while away"))
        self._back.set()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------ submitting
    def _next_seqnum(self) -> int:
        self._seq = (self._seq % 0xFFFFFFFF) + 1
        return self._seq

    def submit(
        self,
        endpoint: int,
        data_or_length: bytes | bytearray | memoryview | int,
        setup: bytes = bytes(8),
        transfer_flags: int = 0,
        iso_packets: Sequence[int] | None = None,
        interval: int = 0,
        start_frame: int = 0,
    ) -> PendingUrb:
        """Queue one URB on ``endpoint`` (an address: bit 7 set for IN) and return it unawaited.

        For IN pass the buffer length, for OUT the data. ``iso_packets`` lists the
        packet sizes of an isochronous URB (laid out back to back).
        """
        if self.closed:
            raise Disconnected(f"connection to {self.busid} is closed: {self.close_reason}")
        if len(self._pending) + len(self._parked) >= self.max_in_flight:
            n = len(self._pending) + len(self._parked)
            raise Overloaded(f"{self.busid}: {n} URBs in flight (limit {self.max_in_flight})")
        ep = endpoint & 0x0F
        direction = USBIP_DIR_IN if endpoint & 0x80 else USBIP_DIR_OUT
        if ep == 0 and len(setup) == 8:
            direction = USBIP_DIR_IN if setup[0] & 0x80 else USBIP_DIR_OUT
        payload: bytes | bytearray | memoryview | None
        if direction == USBIP_DIR_IN:
            if not isinstance(data_or_length, int):
                raise TypeError("an IN transfer takes a length")
            length = data_or_length
            payload = None
        else:
            if isinstance(data_or_length, int):
                payload = bytes(data_or_length)
            else:
                payload = data_or_length
            length = memoryview(payload).nbytes
        if not 0 <= length <= MAX_TRANSFER_LENGTH:
            raise ValueError(f"transfer length {length} outside 0..{MAX_TRANSFER_LENGTH}")
        iso = None
        np = 0
        if iso_packets is not None:
            offsets = []
            pos = 0
            for size in iso_packets:
                offsets.append((pos, size, 0, 0))
                pos += size
            if pos != length:
                raise ValueError(f"iso packets add up to {pos}, transfer is {length} bytes")
            iso = IsoPackets.from_list(offsets)
            np = len(iso)
            transfer_flags |= URB_ISO_ASAP
        nbytes = HEADER_SIZE + (length if payload is not None else 0) + np * 16
        if self._away and _RESTORING.get() is not self:  # sent once the device is back (or failed)
            args = (endpoint, data_or_length, setup, transfer_flags, iso_packets, interval, start_frame)
            return self._park(PendingUrb(self, 0, direction, length, iso), args, nbytes)
        queued = self._stream.queued
        if queued and queued + nbytes > self.max_queued:
            # the server is not reading (or far slower than we write): do not pile up more
            raise Overloaded(f"{self.busid}: {queued} bytes wait to be sent (limit {self.max_queued})")
        seqnum = self._next_seqnum()
        urb = self._unparking or PendingUrb(self, seqnum, direction, length, iso)
        urb.seqnum = seqnum
        hdr = bytearray(HEADER_SIZE)
        pack_cmd_submit(
            hdr, 0, seqnum, self.devid, direction, ep, transfer_flags, length, start_frame, np, interval, setup
        )
        parts: list[Any] = [hdr]
        if payload is not None and length:
            parts.append(payload)
        if iso is not None:
            parts.append(iso.to_bytes())
        self._pending[seqnum] = urb
        self._decoder.expect(seqnum, length if direction == USBIP_DIR_IN else -1)
        if self._capture is not None:
            self._capture.submit(
                seqnum,
                ep | (0x80 if direction == USBIP_DIR_IN else 0),
                setup,
                transfer_flags,
                length,
                payload,
                iso,
                interval,
                start_frame,
                self.configuration_descriptor,
            )
        self._stream.write(parts, nbytes)
        return urb

    async def _transfer(self, urb: PendingUrb, timeout: float | None) -> UrbResult:
        res = await urb.wait(timeout)
        if res.status != 0:
            raise transfer_error(res.status, res.actual_length, res.data)
        return res

    async def control_transfer(
        self,
        bmRequestType: int,
        bRequest: int,
        wValue: int,
        wIndex: int,
        data_or_length: bytes | int = 0,
        timeout: float | None = 5.0,
    ) -> bytes:
        """A control transfer on ep 0; returns the data read (IN) or b"" (OUT)."""
        is_in = bool(bmRequestType & 0x80)
        if is_in:
            assert isinstance(data_or_length, int)
            length = data_or_length
        else:
            length = len(data_or_length) if not isinstance(data_or_length, int) else 0
        setup = struct.pack("<BBHHH", bmRequestType, bRequest, wValue, wIndex, length)
        urb = self.submit(0x80 if is_in else 0x00, length if is_in else (data_or_length or b""), setup)
        res = await self._transfer(urb, timeout)
        return bytes(res.data) if is_in and res.data is not None else b""

    async def bulk_transfer(
        self,
        endpoint: int,
        data_or_length: bytes | bytearray | memoryview | int,
        timeout: float | None = 5.0,
        transfer_flags: int = 0,
    ) -> bytes | int:
        """Bulk IN returns the bytes read; bulk OUT returns the number of bytes written."""
        urb = self.submit(endpoint, data_or_length, transfer_flags=transfer_flags)
        res = await self._transfer(urb, timeout)
        if endpoint & 0x80:
            return bytes(res.data) if res.data is not None else b""
        return res.actual_length

    async def interrupt_transfer(
        self,
        endpoint: int,
        data_or_length: bytes | bytearray | memoryview | int,
        timeout: float | None = 5.0,
        transfer_flags: int = 0,
        interval: int | None = None,
    ) -> bytes | int:
        """Interrupt IN returns the bytes read, OUT the number written. ``interval`` defaults to the
        endpoint descriptor's (usbip.usb.descriptors.urb_interval; the kernel's usbip-host refuses
        an interrupt URB with interval 0), 1 when the descriptors were not read."""
        if interval is None:
            interval = self._urb_interval(endpoint)
        urb = self.submit(endpoint, data_or_length, transfer_flags=transfer_flags, interval=interval)
        res = await self._transfer(urb, timeout)
        if endpoint & 0x80:
            return bytes(res.data) if res.data is not None else b""
        return res.actual_length

    def _urb_interval(self, endpoint: int) -> int:
        # per configuration descriptor, not per URB: parsing it is not free
        config = self.configuration_descriptor
        cached = self._intervals
        if cached is None or cached[0] is not config:
            table = {
                ep["bEndpointAddress"]: urb_interval(ep["bInterval"], ep["bmAttributes"], self.speed)
                for ep in self.endpoints()
            }
            cached = self._intervals = (config, table)
        return cached[1].get(endpoint, 1)

    async def iso_transfer(
        self,
        endpoint: int,
        packets: Sequence[int] | Sequence[bytes],
        timeout: float | None = 5.0,
        interval: int = 1,
    ) -> UrbResult:
        """An isochronous URB: for IN ``packets`` are sizes, for OUT the packets' bytes.

        Returns the result; per-packet statuses are in ``result.iso`` / ``result.packets()``.
        """
        if endpoint & 0x80:
            sizes = [int(p) for p in packets]
            urb = self.submit(endpoint, sum(sizes), iso_packets=sizes, interval=interval)
        else:
            chunks = [bytes(p) for p in packets]
            urb = self.submit(endpoint, b"".join(chunks), iso_packets=[len(c) for c in chunks], interval=interval)
        return await urb.wait(timeout)

    # ------------------------------------------------------------ descriptors
    async def get_descriptor(self, dtype: int, index: int = 0, length: int = 255, lang: int = 0) -> bytes:
        return await self.control_transfer(0x80, 6, (dtype << 8) | index, lang, length)

    async def read_descriptors(self) -> None:
        """Fetch and parse the device and (first) configuration descriptors.

        Raises BadReply when the device answers with something that is not one.
        """
        dd = await self.get_descriptor(DT_DEVICE, 0, 18)
        try:
            self.device_descriptor = parse_device_descriptor(dd)
        except ValueError as exc:
            raise BadReply(f"{self.busid}: device descriptor {dd.hex()}: {exc}") from None
        head = await self.get_descriptor(DT_CONFIG, 0, 9)
        if len(head) < 9 or head[1] != DT_CONFIG:
            raise BadReply(f"{self.busid}: configuration descriptor header {head.hex()} is not one")
        total = struct.unpack_from("<H", head, 2)[0]
        if total < 9:
            raise BadReply(f"{self.busid}: configuration descriptor wTotalLength {total} < 9")
        config = await self.get_descriptor(DT_CONFIG, 0, total)
        if len(config) < 9:
            raise BadReply(f"{self.busid}: configuration descriptor of {len(config)} bytes")
        self.configuration_descriptor = config

    async def get_string(self, index: int, lang: int = 0x0409) -> str:
        raw = await self.get_descriptor(3, index, 255, lang)
        if len(raw) < 2:
            return ""
        return raw[2 : raw[0]].decode("utf-16-le", errors="replace")

    def endpoints(self) -> list[dict[str, int]]:
        return endpoints(self.configuration_descriptor or b"")

    async def set_configuration(self, value: int) -> None:
        await self.control_transfer(0x00, 9, value, 0)
        self.configuration = value
        self._alt_settings.clear()

    async def set_interface(self, interface: int, alt: int) -> None:
        await self.control_transfer(0x01, 11, alt, interface)
        self._alt_settings[interface] = alt

    async def clear_halt(self, endpoint: int) -> None:
        await self.control_transfer(0x02, 1, 0, endpoint)

    # ------------------------------------------------------------ unlink
    def _send_unlink(self, urb: PendingUrb) -> None:
        if self._unpark_cancelled(urb):
            return
        urb.unlinked = True
        unlinks = self._unlinks
        if len(unlinks) > 2 * len(self._pending) + 64:
            # unlinks of URBs that completed meanwhile: the server owes a RET_UNLINK (status 0) for
            # each, which a hostile one never sends; forget them so the table stays bounded
            for useq in [u for u, target in unlinks.items() if target not in self._pending]:
                del unlinks[useq]
        seqnum = self._next_seqnum()
        unlinks[seqnum] = urb.seqnum
        hdr = bytearray(HEADER_SIZE)
        pack_cmd_unlink(hdr, 0, seqnum, self.devid, urb.direction, 0, urb.seqnum)
        self._stream.write([hdr], HEADER_SIZE)

    async def _unlink(self, urb: PendingUrb) -> None:
        if self._unpark_cancelled(urb) or self.closed:
            return
        if not urb.unlinked:
            self._send_unlink(urb)
        try:
            await wait_for(asyncio.shield(urb.future), UNLINK_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            log.warning("%s: no answer to the unlink of seqnum %d", self.busid, urb.seqnum)
        except Exception:  # the URB's own error; the caller reports the cancellation
            pass

    # ------------------------------------------------------------ replies
    def _violation(self, urb: PendingUrb, text: str) -> None:
        """The server broke the protocol: drop the connection (``urb`` and every other pending URB
        get Disconnected, caused by a BadReply)."""
        self._pending[urb.seqnum] = urb
        self._stream.close(BadReply(f"{self.busid}: seqnum {urb.seqnum}: {text}"))

    def _on_messages(self, msgs: list[RetSubmit | RetUnlink]) -> None:
        capture = self._capture
        for msg in msgs:
            if self.closed:
                return
            if isinstance(msg, RetUnlink):
                self._on_ret_unlink(msg)
                continue
            urb = self._pending.pop(msg.seqnum, None)
            if urb is None:  # the decoder only passes seqnums we expect
                continue
            res = self._result(urb, msg)
            if res is None:
                return
            if capture is not None:
                capture.complete(msg.seqnum, res)
            if not urb.future.done():
                urb.future.set_result(res)

    def _on_ret_unlink(self, msg: RetUnlink) -> None:
        target_seq = self._unlinks.pop(msg.seqnum, None)
        if target_seq is None:
            # vhci ignores these too (vhci_recv_ret_unlink); say so once, not once per message
            self._unknown_unlink_replies += 1
            level = logging.WARNING if self._unknown_unlink_replies == 1 else logging.DEBUG
            log.log(level, "%s: RET_UNLINK for unknown unlink seqnum %d", self.busid, msg.seqnum)
            return
        target = self._pending.pop(target_seq, None)
        if target is not None:
            # cancelled before it completed: no RET_SUBMIT will follow
            self._decoder.forget(target_seq)
            if self._capture is not None:
                self._capture.ended(target_seq, msg.status or ECONNRESET)
            if not target.future.done():
                target.future.set_result(UrbResult(msg.status or ECONNRESET, 0, None, target.iso))

    def _result(self, urb: PendingUrb, msg: RetSubmit) -> UrbResult | None:
        """The result of ``urb`` from its RET_SUBMIT, or None after a violation dropped the connection.

        The decoder already bounded actual_length by the IN buffer length, number_of_packets by
        1024 and each iso descriptor by the buffer; what it cannot know is checked here: an OUT
        URB cannot have moved more than it sent, and iso descriptors must be the URB's own
        (same count; only actual_length and status are taken from the server).
        """
        al = msg.actual_length
        data: memoryview | bytes | bytearray | None = msg.data
        if urb.direction != USBIP_DIR_IN and al > urb.length:
            self._violation(urb, f"actual_length {al} > the {urb.length} bytes sent")
            return None
        got = msg.iso
        if got is None:
            if urb.iso is not None and al and urb.direction == USBIP_DIR_IN:
                # no descriptors to place the packets with: usbip_recv_iso fails the same way
                self._violation(urb, "iso IN data without packet descriptors")
                return None
            return UrbResult(msg.status, al, data, None, msg.start_frame, msg.error_count)
        sent = urb.iso
        if sent is None or len(got) != len(sent):
            have = 0 if sent is None else len(sent)
            self._violation(urb, f"{len(got)} iso descriptors in the reply, {have} sent")
            return None
        packets = []
        pairs = zip(sent.tolist(), got.tolist(), strict=True)
        for i, ((off, length, _a, _s), (_o, _l, actual, status)) in enumerate(pairs):
            if actual > length:
                self._violation(urb, f"iso packet {i} actual_length {actual} > length {length}")
                return None
            packets.append((off, length, actual, status))
        iso = IsoPackets.from_list(packets)
        if urb.direction == USBIP_DIR_IN:
            buf = bytearray(urb.length)
            if al and data is not None:
                buf[:al] = data
            try:
                iso.spread(buf, al)
            except (ProtocolError, ValueError) as exc:
                self._violation(urb, str(exc))
                return None
            data = buf
        return UrbResult(msg.status, al, data, iso, msg.start_frame, msg.error_count)

    def _on_close(self, exc: BaseException | None) -> None:
        if isinstance(exc, ProtocolError) and not isinstance(exc, BadReply):  # from the decoder
            bad = BadReply(f"{self.busid}: {exc}")
            bad.__cause__ = exc
            exc = bad
        reconnect = self.reconnect_policy is not None and not self._closing
        self.closed = not reconnect
        self.close_reason = exc
        if exc is not None or reconnect:
            log.warning("%s: connection ended: %s", self.busid, exc or "closed by the server")
        err = Disconnected(f"connection to {self.busid} ended" + (f": {exc}" if exc else ""))
        err.__cause__ = exc
        pending = list(self._pending.values())
        if self._capture is not None:
            self._capture.disconnected()
        self._pending.clear()
        self._unlinks.clear()
        for urb in pending:
            if not urb.future.done():
                urb.future.set_exception(err)
                urb.future.exception()  # mark retrieved: nobody may be awaiting it
        if reconnect:
            self._went_away()
        else:
            self._fail_parked(err)

    # ------------------------------------------------------------ reconnecting
    def enable_reconnect(self, policy: ReconnectPolicy, reimport: Reimport) -> None:
        """Import the device again with ``reimport`` whenever its connection drops, as ``policy`` says.

        ``Connection.import_device(busid, reconnect=policy)`` sets this up. When the connection
        drops, the URBs in flight fail with :class:`Disconnected`; URBs submitted while the
        device is away wait (at most ``policy.wait_timeout``, or their own timeout) and go out
        once it is back: re-imported, descriptors read again, configuration and alternate
        settings restored (those set with :meth:`set_configuration` / :meth:`set_interface`).
        After ``policy.max_attempts`` failed re-imports the device is closed for good.
        """
        self.reconnect_policy = policy
        self._reimport = reimport
        self._backoff = Backoff(policy)

    @property
    def connected(self) -> bool:
        """Not closed, and not away (being re-imported)."""
        return not self.closed and not self._away

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` seconds) until the device is back; False when it is not, or is closed."""
        if not self.closed and self._away:
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_for(self._back.wait(), timeout)
        return self.connected

    def _went_away(self) -> None:
        self._away = True
        self._back.clear()
        if self._reconnect_task is None or self._reconnect_task.done():  # else: it failed while restoring
            self._reconnect_task = self.loop.create_task(self._reconnect())

    def _park(self, urb: PendingUrb, args: tuple[Any, ...], nbytes: int) -> PendingUrb:
        if self._parked_bytes + nbytes > self.max_queued:
            waiting = self._parked_bytes
            raise Overloaded(f"{self.busid}: {waiting} bytes wait for the re-import (limit {self.max_queued})")
        assert self.reconnect_policy is not None
        timer = self.loop.call_later(self.reconnect_policy.wait_timeout, self._park_expired, urb)
        self._parked[urb] = (args, nbytes, timer)
        self._parked_bytes += nbytes
        return urb

    def _unpark(self, urb: PendingUrb) -> tuple[Any, ...] | None:
        entry = self._parked.pop(urb, None)
        if entry is None:
            return None
        args, nbytes, timer = entry
        timer.cancel()
        self._parked_bytes -= nbytes
        return args

    def _unpark_cancelled(self, urb: PendingUrb) -> bool:
        """An URB cancelled (or timed out) before it was sent completes with -ECONNRESET."""
        if self._unpark(urb) is None:
            return False
        if not urb.future.done():
            urb.future.set_result(UrbResult(ECONNRESET, 0, None, urb.iso))
        return True

    def _park_expired(self, urb: PendingUrb) -> None:
        if self._unpark(urb) is not None and not urb.future.done():
            assert self.reconnect_policy is not None
            wait = self.reconnect_policy.wait_timeout
            urb.future.set_exception(Disconnected(f"{self.busid}: not back within {wait} s"))
            urb.future.exception()

    def _fail_parked(self, err: BaseException) -> None:
        for urb in list(self._parked):
            self._unpark(urb)
            if not urb.future.done():
                urb.future.set_exception(err)
                urb.future.exception()

    def _flush_parked(self) -> None:
        """Send what waited for the re-import, in the order it was submitted."""
        for urb in list(self._parked):
            args = self._unpark(urb)
            if args is None or urb.future.done():
                continue
            self._unparking = urb
            try:
                self.submit(*args)
            except UsbipError as exc:
                urb.future.set_exception(exc)
                urb.future.exception()
            finally:
                self._unparking = None

    async def _reconnect(self) -> None:
        assert self.reconnect_policy is not None and self._backoff is not None and self._reimport is not None
        if self.loop.time() - self._connected_at >= self.reconnect_policy.stable_after:
            self._backoff.reset()
        while True:
            delay = self._backoff.next_delay()
            if delay is None:
                self._give_up(f"not back after {self._backoff.attempt} re-import attempts")
                return
            log.info("%s: re-import attempt %d in %.1f s", self.busid, self._backoff.attempt, delay)
            await asyncio.sleep(delay)
            try:
                sock, record, tls = await self._reimport()
            except Exception as exc:  # refused, unreachable, timed out, TLS: all worth another try
                log.warning("%s: re-import failed: %s", self.busid, str(exc) or type(exc).__name__)
                continue
            try:
                await self._restore(sock, record, tls)
            except Exception as exc:
                log.warning("%s: re-imported, but restoring the device failed: %s", self.busid, exc)
                self._stream.close(exc if isinstance(exc, UsbipError) else None)
                continue
            break
        self._away = False
        self.closed = False
        self.close_reason = None
        self.reconnects += 1
        self._connected_at = self.loop.time()
        log.info("%s: back after %d re-import attempt(s)", self.busid, self._backoff.attempt)
        self._back.set()
        self._flush_parked()

    async def _restore(self, sock: socket.socket, record: DeviceRecord, tls: TlsSession | None) -> None:
        """Take the new connection and bring the device back to the state its users left it in."""
        old = self.record
        if (record.idVendor, record.idProduct) != (old.idVendor, old.idProduct):
            sock.close()
            raise UsbipError(
                f"{self.busid} is now {record.idVendor:04x}:{record.idProduct:04x}, "
                f"not {old.idVendor:04x}:{old.idProduct:04x}"
            )
        self.record = record
        self.devid = record.devid
        self.speed = record.speed
        self._intervals = None  # the speed may differ after a re-import
        if self._capture is not None:  # a new connection: its own URB ids, the new bus and device numbers
            self._capture = self._capture.file.client_session(record.busnum, record.devnum)
        self._decoder = Decoder("client", max_transfer=self._max_transfer)
        self._stream = Stream(sock, self._decoder, self._on_messages, self._on_close, self.loop, tls=tls)
        self._stream.start()
        config, alts = self.configuration, dict(self._alt_settings)
        token = _RESTORING.set(self)
        try:
            if self.device_descriptor is not None or self.configuration_descriptor is not None:
                await self.read_descriptors()
            if config and record.bConfigurationValue != config:
                await self.set_configuration(config)
            for interface, alt in alts.items():
                if alt:
                    await self.set_interface(interface, alt)
        finally:
            _RESTORING.reset(token)
        self.configuration, self._alt_settings = config, alts
        if self._stream.closed:
            raise Disconnected(f"{self.busid}: the connection dropped again while restoring")

    def _give_up(self, why: str) -> None:
        err = Disconnected(f"{self.busid}: {why}")
        log.warning("%s", err)
        self.closed = True
        self.close_reason = err
        self._fail_parked(err)
        self._back.set()


__all__ = ["PendingUrb", "RemoteDevice", "UrbResult"]
