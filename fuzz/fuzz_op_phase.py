"""Fuzz target: the op phase (OP_REQ_* / OP_REP_* records) as server and client parse it.

Input: one mode byte, then the bytes a peer sent.

* mode 0 - a request as the server reads it: ``unpack_op_header`` (8 bytes), then for
  OP_REQ_IMPORT ``unpack_import_busid`` (32 bytes), as ``Server._handle`` does;
* mode 1 - an OP_REP_DEVLIST reply read by the real ``Connection.list_devices``;
* mode 2 - an OP_REP_IMPORT reply read by the real ``Connection.import_socket``;
* mode 3 - ``DeviceRecord.unpack`` + ``unpack_interfaces`` on raw bytes;
* mode 4 - ``unpack_devlist_count`` with a limit taken from the input.

The client code runs unchanged on one event loop and real sockets: only
``usbip.client.connection.open_socket`` is replaced, by one returning an end of a
``socketpair`` whose other end has already sent the input and shut down (so a short reply
ends in ``PeerClosed``, reported by the client as ``Disconnected``).

Allowed outcomes: success, ``ProtocolError``, the client's documented ``UsbipError``
(``ImportRefused``) and ``PeerClosed`` (truncated reply). Anything else is a finding, and so
is a parsed record that does not survive ``pack`` -> ``unpack`` unchanged.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

try:
    from fuzz import _common
except ModuleNotFoundError:  # started as a script: python fuzz/fuzz_op_phase.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fuzz import _common

import atheris

with atheris.instrument_imports(include=["usbip"]):
    from usbip.client import connection
    from usbip.client.errors import UsbipError
    from usbip.net.netio import PeerClosed
    from usbip.protocol.constants import (
        BUSID_SIZE,
        DEVICE_RECORD_SIZE,
        MAX_DEVICES,
        OP_HEADER_SIZE,
        OP_REQ_DEVLIST,
        OP_REQ_IMPORT,
    )
    from usbip.protocol.errors import ProtocolError
    from usbip.protocol.records import (
        DeviceRecord,
        pack_op_header,
        unpack_devlist_count,
        unpack_import_busid,
        unpack_interfaces,
        unpack_op_header,
    )

MODES = 5
BUSIDS = ("1-1", "100-1", "3-2.1.4")  # what mode 2 asks for (second input byte picks one)
ALLOWED = (ProtocolError, UsbipError, PeerClosed)


class Peer:
    """A server that has sent ``reply`` and closed its side: one end of a real socketpair."""

    def __init__(self, reply: bytes) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.theirs.setblocking(False)
        self.ours.sendall(reply)  # an AF_UNIX pair buffers far more than the 4 KiB inputs
        self.ours.shutdown(socket.SHUT_WR)  # after the reply: EOF, recv_exactly raises PeerClosed

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


_peer: Peer | None = None


async def _open_socket(host: str, port: int = 0, timeout: float | None = 10.0) -> socket.socket:
    """Stands in for ``usbip.client.connection.open_socket`` (the only thing replaced)."""
    assert _peer is not None
    return _peer.theirs


connection.open_socket = _open_socket  # type: ignore[assignment]
_loop = asyncio.new_event_loop()  # one per process: the client reads the loop's clock for its deadlines


def drive(reply: bytes, coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run one client request against a peer that answers ``reply``; the sockets are closed after."""
    global _peer
    _peer = Peer(reply)
    try:
        return _loop.run_until_complete(coro_fn())
    finally:
        _peer.close()
        _peer = None


def check_record(rec: DeviceRecord) -> None:
    again = DeviceRecord.unpack(rec.pack(), rec.interfaces)
    if again != rec:
        raise AssertionError(f"record does not survive pack/unpack: {rec!r} -> {again!r}")
    if len(rec.interfaces) != rec.bNumInterfaces and rec.interfaces:
        raise AssertionError(f"{len(rec.interfaces)} interface records for bNumInterfaces {rec.bNumInterfaces}")
    rec.as_dict()


def server_request(data: bytes) -> None:
    head = unpack_op_header(data[:OP_HEADER_SIZE])
    if pack_op_header(head.code, head.status, head.version) != data[:OP_HEADER_SIZE]:
        raise AssertionError("op header does not survive unpack/pack")
    if head.code == OP_REQ_IMPORT:
        busid = unpack_import_busid(data[OP_HEADER_SIZE : OP_HEADER_SIZE + BUSID_SIZE])
        if len(busid.encode()) >= BUSID_SIZE or "\0" in busid:
            raise AssertionError(f"busid {busid!r} escaped its field")
    elif head.code != OP_REQ_DEVLIST:
        raise ProtocolError(f"unknown op code 0x{head.code:04x}")  # what the server answers


def client_devlist(data: bytes) -> None:
    devices = drive(data, connection.Connection("127.0.0.1", 3240).list_devices)
    if len(devices) > MAX_DEVICES:
        raise AssertionError(f"{len(devices)} devices accepted")
    for rec in devices:
        if len(rec.interfaces) > connection.MAX_INTERFACES:
            raise AssertionError(f"{len(rec.interfaces)} interfaces accepted")
        check_record(rec)


def client_import(data: bytes) -> None:
    busid = BUSIDS[data[0] % len(BUSIDS)] if data else BUSIDS[0]
    _sock, rec = drive(data[1:], lambda: connection.Connection("127.0.0.1", 3240).import_socket(busid))
    if rec.busid != busid:
        raise AssertionError(f"import of {busid} returned {rec.busid}")
    check_record(rec)


def raw_record(data: bytes) -> None:
    rec = DeviceRecord.unpack(data)
    n = rec.bNumInterfaces
    ifaces = unpack_interfaces(data[DEVICE_RECORD_SIZE:], n)
    if len(ifaces) != n:
        raise AssertionError(f"{len(ifaces)} interface records for {n}")
    check_record(DeviceRecord.unpack(data, ifaces))


def devlist_count(data: bytes) -> None:
    limit = data[0] * 17 if data else MAX_DEVICES
    n = unpack_devlist_count(data[1:], limit)
    if not 0 <= n <= limit:
        raise AssertionError(f"count {n} accepted with limit {limit}")


HANDLERS = (server_request, client_devlist, client_import, raw_record, devlist_count)
assert len(HANDLERS) == MODES


def test_one_input(data: bytes) -> None:
    if not data:
        return
    try:
        HANDLERS[data[0] % MODES](data[1:])
    except ALLOWED:
        pass


def main() -> None:
    _common.run_fuzzer(test_one_input)


if __name__ == "__main__":
    main()
