"""The client facing a server that lies, stalls or stops: every failure is one of the client's errors.

A fake server on 127.0.0.1 writes bytes crafted with the codec's own encoders. Whatever it
sends, the client must answer with a :class:`~usbip.client.UsbipError` (BadReply, Timeout,
Disconnected, TransferError, ImportRefused, Overloaded) in bounded time and bounded memory,
never with OverflowError, KeyError, AssertionError or struct.error, and every pending URB
must resolve when the connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from usbip.client import Disconnected, ImportRefused, RemoteDevice, TransferError, UsbipError, connect
from usbip.client import remote as remote_mod
from usbip.client.errors import BadReply, Overloaded, Timeout, status_text
from usbip.protocol import (
    HEADER_SIZE,
    Decoder,
    DeviceRecord,
    IsoPackets,
    ProtocolError,
    pack_ret_submit,
    pack_ret_unlink,
)
from usbip.protocol.constants import (
    BUSID_SIZE,
    DEVICE_RECORD_SIZE,
    OP_HEADER_SIZE,
    OP_REP_DEVLIST,
    OP_REP_IMPORT,
    USBIP_CMD_SUBMIT,
)
from usbip.protocol.records import pack_devlist_reply, pack_import_reply, pack_op_header

from .helpers import run

INT_MIN = -(2**31)
BUSID = "1-1"
RECORD = DeviceRecord(
    path="/sys/devices/fake/usb1/1-1",
    busid=BUSID,
    busnum=1,
    devnum=2,
    speed=3,
    idVendor=0x1234,
    idProduct=0x5678,
    bcdDevice=0x0100,
    bDeviceClass=0,
    bDeviceSubClass=0,
    bDeviceProtocol=0,
    bConfigurationValue=1,
    bNumConfigurations=1,
    bNumInterfaces=0,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def hostile(handler: Handler) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 running ``handler`` per connection; yields its port."""
    tasks: set[asyncio.Task[Any]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            tasks.discard(task)
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def record_bytes(**changes: Any) -> bytes:
    """A 312-byte device record, fields overridden (bypassing pack's own checks where needed)."""
    raw = bytearray(RECORD.pack())
    fields = {"busnum": 288, "devnum": 292, "speed": 296}
    for name, value in changes.items():
        if name == "busid":
            raw[256:288] = value.ljust(BUSID_SIZE, b"\0")
        elif name == "nif":
            raw[DEVICE_RECORD_SIZE - 1] = value
        else:
            struct.pack_into(">I", raw, fields[name], value)
    return bytes(raw)


async def read_import(reader: asyncio.StreamReader) -> str:
    req = await reader.readexactly(OP_HEADER_SIZE + BUSID_SIZE)
    return req[OP_HEADER_SIZE:].split(b"\0", 1)[0].decode()


class Peer:
    """The server side of an imported connection: decodes the client's commands."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = Decoder("server")
        self.queue: list[Any] = []

    async def command(self) -> Any:
        while not self.queue:
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionError("client closed")
            self.queue.extend(self.decoder.feed(chunk))
        return self.queue.pop(0)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


def ret_submit(seqnum: int, status: int = 0, actual_length: int = 0, data: bytes = b"", iso: bytes = b"", np: int = 0):
    hdr = bytearray(HEADER_SIZE)
    pack_ret_submit(hdr, 0, seqnum, status, actual_length, 0, np, 0)
    return bytes(hdr) + data + iso


def ret_unlink(seqnum: int, status: int) -> bytes:
    hdr = bytearray(HEADER_SIZE)
    pack_ret_unlink(hdr, 0, seqnum, status)
    return bytes(hdr)


def urb_server(script: Callable[[Peer], Awaitable[None]], record: bytes | None = None) -> Handler:
    """A handler that answers the import properly and then runs ``script``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_import(reader)
        writer.write(pack_op_header(OP_REP_IMPORT) + (record or RECORD.pack()))
        await writer.drain()
        await script(Peer(reader, writer))

    return handler


async def imported(port: int, **kw: Any) -> tuple[Any, RemoteDevice]:
    conn = connect("127.0.0.1", port, timeout=kw.pop("timeout", 2.0))
    dev = await conn.import_device(BUSID, read_descriptors=False, configure=False)
    return conn, dev


async def forever(peer: Peer) -> None:
    """Read and never answer."""
    while True:
        await peer.command()


def client_error(exc: BaseException) -> None:
    """The exception is the client's own, with a message a human can read."""
    assert isinstance(exc, UsbipError), f"{type(exc).__name__}: {exc}"
    assert not isinstance(exc, (OverflowError, KeyError, AssertionError, struct.error))
    assert str(exc)


# ================================================================ status values
@pytest.mark.parametrize("status", [INT_MIN, INT_MIN + 1, -9999, 5, 2**31 - 1, -errno.EPROTO])
def test_status_text_any_value(status: int) -> None:
    exc = remote_mod.transfer_error(status, 0, None)
    client_error(exc)
    assert exc.status == status
    assert str(status) in str(exc) or status == -errno.EPROTO
    assert isinstance(status_text(status), str)


def test_known_errno_keeps_name() -> None:
    exc = remote_mod.transfer_error(-errno.EPIPE)
    assert exc.errno == errno.EPIPE and "EPIPE" in str(exc)


# ================================================================ op phase
def test_devlist_absurd_device_count() -> None:
    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        await reader.readexactly(OP_HEADER_SIZE)
        writer.write(pack_op_header(OP_REP_DEVLIST) + struct.pack(">I", 0xFFFFFFFF))
        await writer.drain()
        await reader.read()

    async def body() -> None:
        async with hostile(handler) as port, connect("127.0.0.1", port, timeout=2) as conn:
            with pytest.raises(BadReply, match="4294967295 devices") as info:
                await conn.list_devices()
            client_error(info.value)
            assert isinstance(info.value, ProtocolError)  # still the package-level protocol error

    run(body)


def test_devlist_absurd_interface_count() -> None:
    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        await reader.readexactly(OP_HEADER_SIZE)
        writer.write(pack_op_header(OP_REP_DEVLIST) + struct.pack(">I", 1) + record_bytes(nif=255))
        await writer.drain()
        await reader.read()

    async def body() -> None:
        async with hostile(handler) as port, connect("127.0.0.1", port, timeout=2) as conn:
            with pytest.raises(BadReply, match="255 interfaces"):
                await conn.list_devices()

    run(body)


def test_devlist_truncated() -> None:
    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        await reader.readexactly(OP_HEADER_SIZE)
        full = pack_devlist_reply([RECORD, RECORD, RECORD])
        writer.write(full[: len(full) - 100])  # the third record is cut short, then EOF

    async def body() -> None:
        async with hostile(handler) as port, connect("127.0.0.1", port, timeout=2) as conn:
            with pytest.raises(Disconnected) as info:
                await conn.list_devices()
            client_error(info.value)

    run(body)


def test_devlist_bad_strings() -> None:
    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        await reader.readexactly(OP_HEADER_SIZE)
        writer.write(pack_op_header(OP_REP_DEVLIST) + struct.pack(">I", 1) + record_bytes(busid=b"\xff" * 32))
        await writer.drain()
        await reader.read()

    async def body() -> None:
        async with hostile(handler) as port, connect("127.0.0.1", port, timeout=2) as conn:
            with pytest.raises(BadReply, match="busid"):
                await conn.list_devices()

    run(body)


def test_devlist_trickled_within_each_read_timeout_is_bounded_overall() -> None:
    """Each piece arrives just inside one read's timeout; the whole request still ends on time."""

    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        await reader.readexactly(OP_HEADER_SIZE)
        writer.write(pack_op_header(OP_REP_DEVLIST) + struct.pack(">I", 50))
        for _ in range(50):
            await asyncio.sleep(0.3)
            writer.write(RECORD.pack(with_interfaces=True))
            await writer.drain()

    async def body() -> None:
        async with hostile(handler) as port, connect("127.0.0.1", port, timeout=1.0) as conn:
            t0 = time.monotonic()
            with pytest.raises(Timeout) as info:
                await conn.list_devices()
            assert time.monotonic() - t0 < 2.0
            assert isinstance(info.value, asyncio.TimeoutError)
            client_error(info.value)

    run(body)


def test_server_that_never_answers_the_op_request() -> None:
    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        await reader.read()

    async def body() -> None:
        async with hostile(handler) as port, connect("127.0.0.1", port, timeout=0.5) as conn:
            t0 = time.monotonic()
            with pytest.raises(Timeout):
                await conn.list_devices()
            with pytest.raises(Timeout):
                await conn.import_device(BUSID)
            assert time.monotonic() - t0 < 2.0

    run(body)


@pytest.mark.parametrize(
    ("reply", "error", "match"),
    [
        (pack_op_header(OP_REP_IMPORT) + record_bytes(busid=b"9-9"), BadReply, "server sent '9-9'"),
        (pack_op_header(OP_REP_IMPORT) + record_bytes(busnum=0x10000), BadReply, "32-bit devid"),
        (pack_op_header(OP_REP_IMPORT) + record_bytes(devnum=0xFFFFFFFF), BadReply, "32-bit devid"),
        (pack_op_header(OP_REP_DEVLIST) + RECORD.pack(), BadReply, "expected OP_REP_IMPORT"),
        (struct.pack(">HHI", 0x0106, OP_REP_IMPORT, 0) + RECORD.pack(), BadReply, "version"),
        (pack_import_reply(0xFFFFFFFF), ImportRefused, "status 4294967295"),
        (pack_import_reply(2), ImportRefused, "busy"),
        (pack_op_header(OP_REP_IMPORT) + RECORD.pack()[:100], Disconnected, "connection closed"),
        (b"\x01\x11", Disconnected, "connection closed"),
    ],
)
def test_bad_import_replies(reply: bytes, error: type[BaseException], match: str) -> None:
    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        await read_import(reader)
        writer.write(reply)
        await writer.drain()

    async def body() -> None:
        async with hostile(handler) as port, connect("127.0.0.1", port, timeout=2) as conn:
            with pytest.raises(error, match=match) as info:
                await conn.import_device(BUSID)
            client_error(info.value)

    run(body)


# ================================================================ URB phase
@pytest.mark.parametrize("status", [INT_MIN, -(2**31) + 1, -9999, 5, 2**31 - 1])
def test_ret_submit_with_any_status_is_a_transfer_error(status: int) -> None:
    """RET_SUBMIT status INT_MIN made the client raise OverflowError (os.strerror)."""

    async def script(peer: Peer) -> None:
        while True:
            cmd = await peer.command()
            await peer.send(ret_submit(cmd.seqnum, status))

    async def body() -> None:
        async with hostile(urb_server(script)) as port:
            conn, dev = await imported(port)
            async with conn:
                with pytest.raises(TransferError) as info:
                    await dev.bulk_transfer(0x81, 64, timeout=2)
                client_error(info.value)
                assert info.value.status == status
                assert str(status) in str(info.value)
                with pytest.raises(TransferError):
                    await dev.control_transfer(0x80, 6, 0x100, 0, 18, timeout=2)

    run(body)


def test_ret_unlink_with_int_min_status() -> None:
    async def script(peer: Peer) -> None:
        while True:
            cmd = await peer.command()
            if cmd.command != USBIP_CMD_SUBMIT:
                await peer.send(ret_unlink(cmd.seqnum, INT_MIN))

    async def body() -> None:
        async with hostile(urb_server(script)) as port:
            conn, dev = await imported(port)
            async with conn:
                with pytest.raises(TransferError) as info:
                    await dev.bulk_transfer(0x81, 64, timeout=0.2)
                client_error(info.value)
                assert info.value.status == INT_MIN

    run(body)


async def expect_dropped(dev: RemoteDevice, urb: Any, match: str) -> None:
    with pytest.raises(Disconnected) as info:
        await asyncio.wait_for(urb.wait(), 5)
    client_error(info.value)
    assert dev.closed
    assert isinstance(dev.close_reason, BadReply), dev.close_reason
    assert match in str(dev.close_reason), dev.close_reason
    with pytest.raises(Disconnected):
        dev.submit(0x81, 8)


def test_ret_submit_for_unknown_seqnum() -> None:
    async def script(peer: Peer) -> None:
        cmd = await peer.command()
        await peer.send(ret_submit(cmd.seqnum + 1000, 0, 4, b"abcd"))
        await forever(peer)

    async def body() -> None:
        async with hostile(urb_server(script)) as port:
            conn, dev = await imported(port)
            async with conn:
                await expect_dropped(dev, dev.submit(0x81, 64), "unknown seqnum")

    run(body)


def test_in_actual_length_larger_than_asked() -> None:
    async def script(peer: Peer) -> None:
        cmd = await peer.command()
        await peer.send(ret_submit(cmd.seqnum, 0, 1 << 30))  # and no data: the client must not wait for 1 GiB
        await forever(peer)

    async def body() -> None:
        async with hostile(urb_server(script)) as port:
            conn, dev = await imported(port)
            async with conn:
                await expect_dropped(dev, dev.submit(0x81, 64), "actual_length 1073741824")

    run(body)


def test_out_actual_length_larger_than_sent() -> None:
    async def script(peer: Peer) -> None:
        cmd = await peer.command()
        await peer.send(ret_submit(cmd.seqnum, 0, 4096))
        await forever(peer)

    async def body() -> None:
        async with hostile(urb_server(script)) as port:
            conn, dev = await imported(port)
            async with conn:
                await expect_dropped(dev, dev.submit(0x01, b"x" * 16), "actual_length 4096 > the 16 bytes sent")

    run(body)


def iso_bytes(packets: list[tuple[int, int, int, int]]) -> bytes:
    return IsoPackets.from_list(packets).to_bytes()


@pytest.mark.parametrize(
    ("packets", "actual", "match"),
    [
        # one descriptor for a two-packet URB
        ([(0, 32, 4, 0)], 4, "1 iso descriptors in the reply, 2 sent"),
        # packet 1 claims more than the 32 bytes the URB gave it (the server moved and inflated it,
        # still inside the buffer, so only the client's own layout shows the lie)
        ([(0, 16, 0, 0), (16, 48, 40, 0)], 40, "actual_length 40 > length 32"),
        # a packet outside the buffer
        ([(0, 32, 0, 0), (32, 64, 40, 0)], 40, "overruns the 64-byte buffer"),
        # descriptors that disagree with actual_length
        ([(0, 32, 4, 0), (32, 32, 4, 0)], 4, "sum to 8"),
    ],
)
def test_inconsistent_iso_descriptors(packets: list[tuple[int, int, int, int]], actual: int, match: str) -> None:
    async def script(peer: Peer) -> None:
        cmd = await peer.command()
        data = bytes(sum(p[2] for p in packets))[:actual]
        await peer.send(ret_submit(cmd.seqnum, 0, actual, data, iso_bytes(packets), len(packets)))
        await forever(peer)

    async def body() -> None:
        async with hostile(urb_server(script)) as port:
            conn, dev = await imported(port)
            async with conn:
                await expect_dropped(dev, dev.submit(0x81, 64, iso_packets=[32, 32]), match)

    run(body)


def test_iso_descriptors_for_a_non_iso_urb() -> None:
    async def script(peer: Peer) -> None:
        cmd = await peer.command()
        await peer.send(ret_submit(cmd.seqnum, 0, 4, b"abcd", iso_bytes([(0, 8, 4, 0)]), 1))
        await forever(peer)

    async def body() -> None:
        async with hostile(urb_server(script)) as port:
            conn, dev = await imported(port)
            async with conn:
                await expect_dropped(dev, dev.submit(0x81, 8), "1 iso descriptors in the reply, 0 sent")

    run(body)


def test_iso_result_keeps_the_urbs_own_layout() -> None:
    """Offsets and lengths in the reply are the server's word; only actual_length/status are taken."""

    async def script(peer: Peer) -> None:
        cmd = await peer.command()
        # both packets claim offset 0 and the whole buffer; 3 + 2 bytes travel back to back
        await peer.send(ret_submit(cmd.seqnum, 0, 5, b"abcde", iso_bytes([(0, 16, 3, 0), (0, 16, 2, -18)]), 2))
        await forever(peer)

    async def body() -> None:
        async with hostile(urb_server(script)) as port:
            conn, dev = await imported(port)
            async with conn:
                res = await dev.submit(0x81, 16, iso_packets=[8, 8]).wait(2)
                assert res.iso is not None and res.iso.tolist() == [(0, 8, 3, 0), (8, 8, 2, -18)]
                assert res.packets() == [(0, 3, b"abc"), (-18, 2, b"de")]

    run(body)


def test_ret_unlink_for_unknown_seqnums_is_ignored() -> None:
    async def script(peer: Peer) -> None:
        cmd = await peer.command()
        for s in (0, 0xFFFFFFFF, cmd.seqnum, 12345):
            await peer.send(ret_unlink(s, INT_MIN))
        await peer.send(ret_submit(cmd.seqnum, 0, 4, b"abcd"))
        await forever(peer)

    async def body() -> None:
        async with hostile(urb_server(script)) as port:
            conn, dev = await imported(port)
            async with conn:
                assert await dev.bulk_transfer(0x81, 8, timeout=2) == b"abcd"
                assert not dev.closed

    run(body)


def test_pending_urbs_resolve_when_the_client_closes() -> None:
    async def body() -> None:
        async with hostile(urb_server(forever)) as port:
            conn, dev = await imported(port)
            urbs = [dev.submit(0x81, 64) for _ in range(20)] + [dev.submit(0x01, b"x" * 100)]
            waiter = asyncio.ensure_future(urbs[0].wait())
            await asyncio.sleep(0.05)
            await conn.close()
            for urb in urbs:
                assert urb.future.done()
                with pytest.raises(Disconnected):
                    urb.future.result()
            with pytest.raises(Disconnected):
                await asyncio.wait_for(waiter, 1)
            assert dev.in_flight == 0

    run(body)


def test_pending_urbs_resolve_when_the_server_vanishes() -> None:
    async def script(peer: Peer) -> None:
        for _ in range(5):
            await peer.command()
        peer.writer.transport.abort()  # RST

    async def body() -> None:
        async with hostile(urb_server(script)) as port:
            conn, dev = await imported(port)
            async with conn:
                urbs = [dev.submit(0x81, 64) for _ in range(5)]
                for urb in urbs:
                    with pytest.raises(Disconnected):
                        await asyncio.wait_for(urb.wait(), 5)

    run(body)


def test_server_that_never_answers_an_unlink(monkeypatch: pytest.MonkeyPatch) -> None:
    """A transfer timeout whose unlink goes unanswered ends in bounded time with Timeout."""
    monkeypatch.setattr(remote_mod, "UNLINK_TIMEOUT", 0.3)

    async def body() -> None:
        async with hostile(urb_server(forever)) as port:
            conn, dev = await imported(port)
            async with conn:
                t0 = time.monotonic()
                with pytest.raises(Timeout) as info:
                    await dev.bulk_transfer(0x81, 64, timeout=0.2)
                assert time.monotonic() - t0 < 2.0
                assert isinstance(info.value, asyncio.TimeoutError)  # what callers caught before
                client_error(info.value)

    run(body)


def test_in_flight_urbs_are_bounded() -> None:
    async def body() -> None:
        async with hostile(urb_server(forever)) as port:
            conn, dev = await imported(port)
            async with conn:
                assert dev.max_in_flight == remote_mod.MAX_IN_FLIGHT
                dev.max_in_flight = 50
                for _ in range(50):
                    dev.submit(0x81, 8)
                with pytest.raises(Overloaded) as info:
                    dev.submit(0x81, 8)
                client_error(info.value)

    run(body)


def test_server_that_stops_reading_bounds_the_send_queue() -> None:
    stop = asyncio.Event()

    async def script(peer: Peer) -> None:
        await stop.wait()  # reads nothing: the socket buffers fill, then the client's queue

    async def body() -> None:
        async with hostile(urb_server(script)) as port:
            conn, dev = await imported(port)
            async with conn:
                dev.max_queued = 4 << 20
                chunk = bytes(1 << 20)
                raised = None
                for _ in range(400):  # 400 MiB if nothing stopped it
                    try:
                        dev.submit(0x01, chunk)
                    except Overloaded as exc:
                        raised = exc
                        break
                    await asyncio.sleep(0)
                assert raised is not None, f"{dev._stream.queued} bytes queued, no Overloaded"
                client_error(raised)
                assert dev._stream.queued <= dev.max_queued + len(chunk) + HEADER_SIZE
                stop.set()

    run(body)


def test_unlink_bookkeeping_stays_bounded_when_ret_unlinks_never_come() -> None:
    """The server completes every URB but never answers CMD_UNLINK."""

    async def script(peer: Peer) -> None:
        held: list[int] = []
        while True:
            cmd = await peer.command()
            if cmd.command == USBIP_CMD_SUBMIT:
                held.append(cmd.seqnum)
            else:  # answer the target only once it was cancelled, with data, and no RET_UNLINK
                for seq in held:
                    await peer.send(ret_submit(seq, 0, 4, b"late"))
                held.clear()

    async def body() -> None:
        async with hostile(urb_server(script)) as port:
            conn, dev = await imported(port)
            async with conn:
                for _ in range(400):
                    urb = dev.submit(0x81, 4)
                    urb.cancel()
                    res = await urb.wait(2)
                    assert bytes(res.data) == b"late"
                assert len(dev._unlinks) <= 2 * dev.in_flight + 65
                assert dev.in_flight == 0

    run(body)


def test_descriptors_that_are_not_descriptors() -> None:
    """read_descriptors on garbage: BadReply, not struct.error / IndexError."""

    async def script(peer: Peer) -> None:
        while True:
            cmd = await peer.command()
            dtype = cmd.setup[3]
            if dtype == 1:  # a well-formed device descriptor
                d = struct.pack("<BBHBBBBHHHBBBB", 18, 1, 0x200, 0, 0, 0, 64, 0x1234, 0x5678, 0x100, 0, 0, 0, 1)
                await peer.send(ret_submit(cmd.seqnum, 0, 18, d))
            else:  # a 2-byte "configuration descriptor"
                await peer.send(ret_submit(cmd.seqnum, 0, 2, b"\x09\x02"))

    async def body() -> None:
        async with hostile(urb_server(script)) as port, connect("127.0.0.1", port, timeout=2) as conn:
            with pytest.raises(BadReply, match="configuration descriptor") as info:
                await conn.import_device(BUSID)
            client_error(info.value)

    run(body)


def test_long_lived_connection_forgets_closed_devices() -> None:
    async def script(peer: Peer) -> None:
        await forever(peer)

    async def body() -> None:
        async with hostile(urb_server(script)) as port, connect("127.0.0.1", port, timeout=2) as conn:
            for _ in range(20):
                dev = await conn.import_device(BUSID, read_descriptors=False, configure=False)
                await dev.close()
            assert len(conn._devices) <= 1

    run(body)


def test_client_socket_is_closed_after_every_bad_reply() -> None:
    """No socket of a failed op request is left open (they would pile up in a retry loop)."""
    closed: list[bool] = []

    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        await read_import(reader)
        writer.write(pack_import_reply(4))
        await writer.drain()
        closed.append(await reader.read() == b"")

    async def body() -> None:
        async with hostile(handler) as port, connect("127.0.0.1", port, timeout=2) as conn:
            for _ in range(5):
                with pytest.raises(ImportRefused):
                    await conn.import_device(BUSID)
            for _ in range(100):
                if len(closed) == 5:
                    break
                await asyncio.sleep(0.01)
            assert closed == [True] * 5

    run(body)


def test_connect_errors_stay_os_errors() -> None:
    async def body() -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nobody listens there
        async with connect("127.0.0.1", port, timeout=2) as conn:
            with pytest.raises(ConnectionRefusedError):
                await conn.list_devices()

    run(body)
