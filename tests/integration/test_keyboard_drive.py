"""A keyboard you can drive: typing after SET_CONFIGURATION and a settle delay, text fed
through a FIFO while the server runs, bad characters skipped, the queue bounded.

Everything goes through an in-process server and our client (no kernel). Delays are tiny
(0.05 s); the tests assert the order of events, never how long anything took. Absence
("nothing typed yet") is checked after waiting several settle delays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from usbip.cli.device_spec import make_device
from usbip.client import RemoteDevice, connect
from usbip.server import Server
from usbip.virtual import KeyboardDevice
from usbip.virtual.keyboard import decode_reports

from .conftest import bounded, exported
from .helpers import run, wait_until

BUSID = "100-1"
DELAY = 0.05
LONGER_THAN_DELAY = 4 * DELAY
LOGGER = "usbip.virtual.keyboard"


class RecordingKeyboard(KeyboardDevice):
    """Notes, at every SET_CONFIGURATION, whether the device was already typing."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.events: list[str] = []

    def on_configure(self, value: int) -> None:
        super().on_configure(value)
        self.events.append(f"configure {value} ready={self.ready}")


async def imported(srv: Server) -> tuple[Any, RemoteDevice]:
    conn = connect("127.0.0.1", srv.port, timeout=5)
    return conn, await conn.import_device(BUSID)


async def read_text(dev: RemoteDevice, chars: int) -> str:
    reports = [await dev.interrupt_transfer(0x81, 8, timeout=5) for _ in range(2 * chars)]
    assert all(r == bytes(8) for r in reports[1::2]), reports  # each press is followed by a release
    return decode_reports(reports)  # type: ignore[arg-type]


def write_fifo(path: Path, data: bytes) -> None:
    """One writer: open (the server holds the read end, so this does not block), write, close."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def test_typed_only_after_set_configuration_and_the_delay() -> None:
    async def body() -> None:
        kb = RecordingKeyboard("Hi!", delay=DELAY)
        async with exported(kb) as srv:
            conn, dev = await imported(srv)
            # the device is listed configured, so the client sends no SET_CONFIGURATION: nothing is typed
            poll = dev.submit(0x81, 8)
            await asyncio.sleep(LONGER_THAN_DELAY)
            assert not poll.future.done() and not kb.ready and kb.pending_reports == 6
            await dev.set_configuration(1)
            res = await poll.wait(5)
            # typing started after the configuration, not at it: the delay ran in between
            assert kb.events == ["configure 1 ready=False"]
            assert res.status == 0 and kb.ready
            assert decode_reports([bytes(res.data)]) == "H"  # type: ignore[arg-type]
            assert await dev.interrupt_transfer(0x81, 8) == bytes(8)
            assert await read_text(dev, 2) == "i!"
            await bounded(kb.typed())
            # type_text once typing runs: typed at once
            kb.type_text("ok")
            assert await read_text(dev, 2) == "ok"
            await conn.close()

    run(body)


def test_a_new_import_restarts_the_wait() -> None:
    async def body() -> None:
        kb = RecordingKeyboard("abcd", delay=DELAY)
        async with exported(kb) as srv:
            conn, dev = await imported(srv)
            await dev.set_configuration(1)
            assert await read_text(dev, 2) == "ab"
            await conn.close()
            assert await wait_until(lambda: not srv.registry.is_busy(BUSID))
            assert not kb.ready and kb.pending_reports == 4  # the client left: "cd" waits
            conn, dev = await imported(srv)
            poll = dev.submit(0x81, 8)
            await asyncio.sleep(LONGER_THAN_DELAY)
            assert not poll.future.done()  # the new importer has not configured the device yet
            await dev.set_configuration(1)
            res = await poll.wait(5)
            assert decode_reports([bytes(res.data)]) == "c"  # type: ignore[arg-type]
            assert await dev.interrupt_transfer(0x81, 8) == bytes(8)
            assert await read_text(dev, 1) == "d"
            assert kb.events == ["configure 1 ready=False", "configure 1 ready=False"]
            # SET_CONFIGURATION again while typing: the wait restarts for what is not typed yet
            kb.type_text("ef")
            await dev.set_configuration(1)
            assert kb.events[-1] == "configure 1 ready=False"
            assert await read_text(dev, 2) == "ef"
            await conn.close()

    run(body)


def test_fifo_types_while_the_server_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fifo = tmp_path / "kbd"

    async def body() -> None:
        kb = make_device(f"keyboard:go:delay={DELAY}:fifo={fifo}")
        assert isinstance(kb, KeyboardDevice)
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # created by the device
        assert f"FIFO {fifo}" in kb.describe()
        async with exported(kb) as srv:
            write_fifo(fifo, b"before\n")  # before any import: queued behind the start text
            assert await wait_until(lambda: kb.pending_reports == 2 * len("gobefore\n"))
            conn, dev = await imported(srv)
            await dev.set_configuration(1)
            assert await read_text(dev, len("gobefore\n")) == "gobefore\n"
            # every writer ends with EOF; the device opens the FIFO again and reads the next one
            for n in range(3):
                write_fifo(fifo, f"line {n}\n".encode())
                assert await read_text(dev, 7) == f"line {n}\n"
            # a UTF-8 character cut between two writes of one writer, and an unknown one: skipped
            fd = os.open(fifo, os.O_WRONLY)
            try:
                os.write(fd, b"x\xe2\x82")
                await asyncio.sleep(0.05)
                os.write(fd, b"\xacy")
            finally:
                os.close(fd)
            assert await read_text(dev, 2) == "xy"
            assert kb.skipped == 1
            # a cut sequence at EOF is skipped too
            write_fifo(fifo, b"z\xc3")
            assert await read_text(dev, 1) == "z"
            assert await wait_until(lambda: kb.skipped == 2)
            await bounded(kb.typed())
            await conn.close()
        assert not fifo.exists()  # the server released the device: the FIFO it made is gone

    run(body)
    skipped = [r.getMessage() for r in caplog.records if "without a key" in r.getMessage()]
    assert len(skipped) == 2 and "'€'" in skipped[0], skipped


def test_fifo_queue_cap_drops_with_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fifo = tmp_path / "kbd"

    async def body() -> None:
        kb = KeyboardDevice(delay=DELAY, fifo=fifo, max_pending=10)
        async with exported(kb) as srv:
            conn, dev = await imported(srv)
            write_fifo(fifo, b"0123456789abcdefghij")  # nobody configured the device: all of it waits
            assert await wait_until(lambda: kb.dropped == 10)
            assert kb.pending_reports == 20
            write_fifo(fifo, b"more")
            assert await wait_until(lambda: kb.dropped == 14)
            await dev.set_configuration(1)
            assert await read_text(dev, 10) == "0123456789"
            write_fifo(fifo, b"ok")  # room again
            assert await read_text(dev, 2) == "ok"
            await conn.close()

    run(body)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("dropping input" in m for m in messages) == 1, messages  # one line per overflow, not per write
    assert any("room again" in m and "14 characters dropped" in m for m in messages), messages


def test_fifo_garbage_never_hurts_the_server(tmp_path: Path) -> None:
    fifo = tmp_path / "kbd"

    async def body() -> None:
        kb = KeyboardDevice(delay=0, fifo=fifo)
        async with exported(kb) as srv:
            conn, dev = await imported(srv)
            await dev.set_configuration(1)
            write_fifo(fifo, bytes(range(256)) + b"!")
            printable = "".join(chr(c) for c in range(256) if chr(c) in "\t\n\r\b\x1b" or 32 <= c < 127)
            got = await read_text(dev, len(printable) + 1)
            assert got == printable.replace("\r", "\n") + "!"
            assert kb.skipped == 256 - len(printable)
            await conn.close()

    run(body)
