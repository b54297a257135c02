"""Fuzz target: the server's URB phase (``UrbSession``) against every virtual device type.

Input: byte 0 picks the device (``SPECS``), byte 1 how many event-loop iterations run after
each message (0-3, so completions interleave with later submits and unlinks), the rest is
what a client sent after the import. The bytes are decoded by the server decoder in
256-byte reads, each read's messages go to ``session.handle`` one at a time, as the server's
stream would hand them over; a ProtocolError (from the decoder or the session) ends the
input like it ends a connection. Then the loop runs a few more iterations, and the session
and device are shut down as the server does (``await session.shutdown()``, ``await
device.close()``).

Findings (anything raised here but ProtocolError ends the run):

* an exception other than ProtocolError out of the decoder or ``handle``;
* a reply through ``send`` whose byte count is not ``nbytes``, that a client decoder
  (told about every submit with ``expect``) rejects, or a RET_SUBMIT whose actual_length
  exceeds that URB's transfer_buffer_length, or a RET_UNLINK for no CMD_UNLINK (found once:
  iso packets that overlap, now refused; tests/unit/test_fuzz_finding_iso_overlap.py);
* after shutdown: ``session.pending`` not empty, the buffer pool's ``outstanding`` not 0;
* an ERROR log record from ``usbip`` (a device raising in submit/cancel, a bad actual_length,
  URBs left pending at shutdown, a handler crashing) other than ``ALLOWED_LOG_ERRORS``.

Each input gets a fresh device (cheap: well under a millisecond; the audio device with
``realtime=False``, so its iso URBs complete at once rather than on the wall clock) so a
finding reproduces from its input alone; the event loop, the buffer pool and the storage image (1 MiB, in
/dev/shm when there is one) are made once per process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
from typing import Any

try:
    from fuzz import _common
except ModuleNotFoundError:  # started as a script: python fuzz/fuzz_session.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fuzz import _common

import atheris

with atheris.instrument_imports(include=["usbip"]):
    from usbip.cli.device_spec import make_device
    from usbip.pool import BufferPool
    from usbip.protocol import Decoder, ProtocolError
    from usbip.protocol.constants import USBIP_CMD_SUBMIT, USBIP_DIR_IN, USBIP_RET_SUBMIT
    from usbip.server.session import UrbSession

BUSNUM, DEVNUM = 1, 2
DEVID = BUSNUM << 16 | DEVNUM  # every device is given this devid (the seed corpus uses it)
MAX_TRANSFER = 1 << 20  # the decoder's bound: keeps one input's IN buffers small
READ_SIZE = 256  # bytes per decoder feed (one "recv")
SETTLE_ITERATIONS = 16  # loop iterations after the last message, before shutdown
ALLOWED_LOG_ERRORS: tuple[str, ...] = ()  # substrings of ERROR messages that are not findings

_shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
_tmpdir = tempfile.TemporaryDirectory(prefix="usbip-fuzz-", dir=_shm)
IMAGE = os.path.join(_tmpdir.name, "disk.img")
SPECS = (
    "loopback",
    "loopback:ss",
    f"storage:{IMAGE}:1M",
    "keyboard:Hi\\n",
    "serial",
    "audio",
)
SPEC_NAMES = ("loopback", "loopback:ss", "storage", "keyboard", "serial", "audio")

LOOP = asyncio.new_event_loop()
POOL = BufferPool()
_pool_leaked = 0  # POOL.outstanding already reported (it is read-only in the compiled pool)


class _ErrorLog(logging.Handler):
    """Collects ERROR records of the ``usbip`` loggers during one input."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if not any(s in msg for s in ALLOWED_LOG_ERRORS):
            self.records.append(record)


ERRORS = _ErrorLog()
_usbip_log = logging.getLogger("usbip")
_usbip_log.addHandler(ERRORS)
_usbip_log.propagate = False  # findings are raised, not printed for every input
LOOP.set_exception_handler(lambda loop, ctx: ERRORS.records.append(_loop_record(ctx)))


def _loop_record(ctx: dict[str, Any]) -> logging.LogRecord:
    """An unhandled exception in a callback or task (asyncio's handler) as an ERROR record."""
    rec = logging.LogRecord("asyncio", logging.ERROR, __file__, 0, "%s", (ctx.get("message"),), None)
    exc = ctx.get("exception")
    if exc is not None:
        rec.exc_info = (type(exc), exc, exc.__traceback__)
    return rec


class Replies:
    """The client's side of the connection: checks every reply the session sends."""

    def __init__(self) -> None:
        self.decoder = Decoder("client", max_transfer=MAX_TRANSFER)
        self.lengths: dict[int, int] = {}  # seqnum -> transfer_buffer_length of its CMD_SUBMIT
        self.unlinks: set[int] = set()  # seqnums of CMD_UNLINKs sent
        self.count = 0

    def submitted(self, msg: Any) -> None:
        tbl = msg.transfer_buffer_length
        self.lengths[msg.seqnum] = tbl
        self.decoder.expect(msg.seqnum, tbl if msg.direction == USBIP_DIR_IN else -1)

    def send(self, buffers: list[Any], nbytes: int) -> None:
        views = [memoryview(b).cast("B") for b in buffers]
        total = sum(v.nbytes for v in views)
        if total != nbytes:
            raise AssertionError(f"send(): buffers hold {total} bytes, nbytes says {nbytes}")
        data = b"".join(bytes(v) for v in views)  # copy now: pool buffers are reused after this
        try:
            msgs: list[Any] = self.decoder.feed(data)
        except ProtocolError as exc:
            raise AssertionError(f"the session sent a reply a client rejects: {exc}") from exc
        for m in msgs:
            self.count += 1
            if m.command == USBIP_RET_SUBMIT:
                tbl = self.lengths.get(m.seqnum)
                if tbl is None or not 0 <= m.actual_length <= tbl:
                    raise AssertionError(f"RET_SUBMIT seqnum {m.seqnum}: actual_length {m.actual_length} > {tbl}")
            elif m.seqnum not in self.unlinks:
                raise AssertionError(f"RET_UNLINK seqnum {m.seqnum} answers no CMD_UNLINK")


def new_device(index: int) -> Any:
    dev = make_device(SPECS[index])
    dev.busnum, dev.devnum, dev.busid = BUSNUM, DEVNUM, f"{BUSNUM}-{DEVNUM}"
    if hasattr(dev, "realtime"):
        # audio: complete iso URBs at once instead of when their (real-time) slots pass, so a
        # finding does not depend on how fast the input ran (and reproduces from its bytes)
        dev.realtime = False
    return dev


async def settle(iterations: int) -> None:
    for _ in range(iterations):
        await asyncio.sleep(0)


async def one_input(index: int, spin: int, wire: bytes) -> None:
    dev = new_device(index)
    replies = Replies()
    decoder = Decoder("server", max_transfer=MAX_TRANSFER)
    try:
        await dev.open()
        session = UrbSession(dev, replies.send, POOL)
        try:
            for pos in range(0, len(wire), READ_SIZE):
                for msg in decoder.feed(wire[pos : pos + READ_SIZE]):
                    if msg.command == USBIP_CMD_SUBMIT:
                        replies.submitted(msg)
                    else:
                        replies.unlinks.add(msg.seqnum)
                    session.handle([msg])
                    await settle(spin)
        except ProtocolError:
            pass  # the server drops the connection: what follows is its teardown
        await settle(SETTLE_ITERATIONS)
        await session.shutdown()
        if session.pending:
            raise AssertionError(f"{len(session.pending)} URBs pending after shutdown: {list(session.pending)[:8]}")
        await dev.close()
    finally:
        dev.release()
    await settle(2)  # let cancelled device tasks finish before the pool is checked
    global _pool_leaked
    if POOL.outstanding != _pool_leaked:
        n = POOL.outstanding - _pool_leaked
        _pool_leaked = POOL.outstanding  # report a leak once, not again on every later input
        raise AssertionError(f"buffer pool: {n} buffers still outstanding after shutdown")


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    ERRORS.records.clear()
    LOOP.run_until_complete(one_input(data[0] % len(SPECS), data[1] & 3, data[2:]))
    if ERRORS.records:
        rec = ERRORS.records[0]
        text = logging.Formatter().format(rec)
        raise AssertionError(f"{len(ERRORS.records)} error(s) logged, first: {text}")


def main() -> None:
    _common.run_fuzzer(test_one_input)


if __name__ == "__main__":
    main()
