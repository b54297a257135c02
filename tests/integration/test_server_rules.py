"""The server's URB-phase rules (stub_rx.c / stub_tx.c) and its handling of bad peers."""

from __future__ import annotations

import logging
import struct

import pytest

from usbip.protocol.constants import ECONNRESET, ENOENT, ST_DEV_BUSY, ST_NODEV, USBIP_RET_SUBMIT, USBIP_RET_UNLINK
from usbip.protocol.records import pack_op_header
from usbip.server import Server

from .helpers import ProbeDevice, RawClient, idle, run, wait_until

BUSID = "100-1"


async def still_serves(srv: Server) -> None:
    """Another client can import and run an URB: the server survived whatever happened before."""
    c = RawClient(srv.port)
    assert await c.import_device(BUSID) == 0
    seq, raw = c.submit_bytes(1, True, 16)
    await c.send(raw)
    (rep,) = await c.replies(1)
    assert rep.seqnum == seq and rep.status == 0 and bytes(rep.data) == seq.to_bytes(4, "big") * 4
    await c.close()


def test_import_statuses() -> None:
    async def body() -> None:
        dev = ProbeDevice()
        async with Server([dev], host="127.0.0.1", port=0) as srv:
            assert await RawClient(srv.port).import_device("9-9") == ST_NODEV
            first = RawClient(srv.port)
            assert await first.import_device(BUSID) == 0
            assert dev.opened == 1
            assert await RawClient(srv.port).import_device(BUSID) == ST_DEV_BUSY
            await first.close()
            assert await wait_until(lambda: idle(srv))
            assert dev.closed == 1
            await still_serves(srv)

    run(body)


def test_out_of_order_completion_and_unlink_rules() -> None:
    async def body() -> None:
        dev = ProbeDevice()
        async with Server([dev], host="127.0.0.1", port=0) as srv:
            c = RawClient(srv.port)
            assert await c.import_device(BUSID) == 0
            # ep2 pends; ep1 completes at once: the later URB's reply comes first
            slow, raw1 = c.submit_bytes(2, True, 64)
            fast, raw2 = c.submit_bytes(1, True, 8)
            await c.send(raw1 + raw2)
            (r,) = await c.replies(1)
            assert (r.command, r.seqnum) == (USBIP_RET_SUBMIT, fast)
            # the kernel stub fills only command and seqnum in RET_SUBMIT's basic header
            assert (r.devid, r.direction, r.ep) == (0, 0, 0)
            # unlink of a pending URB: RET_UNLINK(-ECONNRESET) with the unlink's seqnum, no RET_SUBMIT
            un, raw = c.unlink_bytes(slow)
            await c.send(raw)
            (r,) = await c.replies(1)
            assert (r.command, r.seqnum, r.status) == (USBIP_RET_UNLINK, un, ECONNRESET)
            assert dev.cancelled == [slow]
            c.decoder.forget(slow)
            # unlink after completion: status 0 at once
            un, raw = c.unlink_bytes(fast)
            await c.send(raw)
            (r,) = await c.replies(1)
            assert (r.command, r.seqnum, r.status) == (USBIP_RET_UNLINK, un, 0)
            # unlink of an earlier seqnum that is not pending: also 0
            un, raw = c.unlink_bytes(1)
            await c.send(raw)
            (r,) = await c.replies(1)
            assert (r.seqnum, r.status) == (un, 0)
            # an unlink that arrives before its submit (vhci_tx can send them in that order): held,
            # then answered -ECONNRESET when the submit comes, which is never run nor answered
            early = c.seq + 2
            un, raw = c.unlink_bytes(early)
            await c.send(raw)
            seq, raw = c.submit_bytes(1, True, 8)
            assert seq == early
            await c.send(raw)
            (r,) = await c.replies(1)
            assert (r.command, r.seqnum, r.status) == (USBIP_RET_UNLINK, un, ECONNRESET)
            c.decoder.forget(early)
            # a held unlink whose submit never comes is answered 0 once a later submit passes it
            un, raw = c.unlink_bytes(c.seq + 2)
            await c.send(raw)
            c.seq += 2
            seq, raw = c.submit_bytes(1, True, 8)
            await c.send(raw)
            r1, r2 = await c.replies(2)
            assert (r1.command, r1.seqnum, r1.status) == (USBIP_RET_UNLINK, un, 0)
            assert (r2.command, r2.seqnum, r2.status) == (USBIP_RET_SUBMIT, seq, 0)
            # a pending URB completed by the device after all: RET_SUBMIT with the data
            slow2, raw = c.submit_bytes(2, True, 64)
            await c.send(raw)
            assert await wait_until(lambda: len(dev.waiting) == 1)
            dev.finish_waiting(b"late")
            (r,) = await c.replies(1)
            assert (r.seqnum, r.status, bytes(r.data)) == (slow2, 0, b"late")
            # an endpoint the device does not have: -ENOENT, connection kept
            bad, raw = c.submit_bytes(7, True, 8)
            await c.send(raw)
            (r,) = await c.replies(1)
            assert (r.seqnum, r.status, r.actual_length) == (bad, ENOENT, 0)
            await c.close()
            assert await wait_until(lambda: idle(srv))

    run(body)


def test_pipelined_out_and_in() -> None:
    async def body() -> None:
        dev = ProbeDevice()
        async with Server([dev], host="127.0.0.1", port=0) as srv:
            c = RawClient(srv.port)
            assert await c.import_device(BUSID) == 0
            raws = []
            sent = bytearray()
            for i in range(200):
                payload = bytes([i % 251]) * (i * 7 % 1500)
                sent += payload
                raws.append(c.submit_bytes(1, False, len(payload), payload)[1])
                raws.append(c.submit_bytes(1, True, i % 600)[1])
            await c.send(b"".join(raws))
            reps = await c.replies(400)
            assert [r.seqnum for r in reps] == list(range(1, 401))
            for r in reps:
                assert r.status == 0
                if r.seqnum % 2 == 0:
                    n = ((r.seqnum // 2) - 1) % 600
                    assert bytes(r.data) == (r.seqnum.to_bytes(4, "big") * (n // 4 + 1))[:n]
            assert bytes(dev.received) == bytes(sent)
            await c.close()

    run(body)


def test_disconnect_with_pending_urbs_cancels_and_frees() -> None:
    async def body() -> None:
        dev = ProbeDevice()
        async with Server([dev], host="127.0.0.1", port=0) as srv:
            c = RawClient(srv.port)
            assert await c.import_device(BUSID) == 0
            seqs = []
            for _ in range(5):
                s, raw = c.submit_bytes(2, True, 4096)
                seqs.append(s)
                await c.send(raw)
            assert await wait_until(lambda: len(dev.waiting) == 5)
            await c.close()
            assert await wait_until(lambda: idle(srv))
            assert sorted(dev.cancelled) == seqs
            assert dev.closed == 1
            await still_serves(srv)

    run(body)


BAD_INPUTS = {
    "garbage": b"\xde\xad\xbe\xef" * 16,
    "wrong version": struct.pack(">HHI", 0x0106, 0x8005, 0),
    "unknown op code": struct.pack(">HHI", 0x0111, 0x8123, 0),
    "closed mid op header": b"\x01\x11\x80",
    "closed mid busid": pack_op_header(0x8003) + b"1-1",
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_op_phase_loses_only_that_connection(name: str, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with Server([ProbeDevice()], host="127.0.0.1", port=0) as srv:
            c = RawClient(srv.port)
            await c.connect()
            await c.send(BAD_INPUTS[name])
            if name.startswith("closed"):
                await c.close()
            else:
                assert await c.closed_by_server()
            assert await wait_until(lambda: idle(srv))
            await still_serves(srv)
            assert await wait_until(lambda: idle(srv))

    with caplog.at_level(logging.INFO, logger="usbip"):
        run(body)
    reasons = " ".join(r.getMessage() for r in caplog.records)
    assert "dropped" in reasons or "connection ended" in reasons


URB_BAD = {
    "oversized length": lambda c: c.submit_bytes(1, False, 0x7FFFFFFF)[1],
    "negative length": lambda c: c.submit_bytes(1, False, -5)[1],
    "bad devid": lambda c: c.submit_bytes(1, True, 8, devid=0xDEAD)[1],
    "unknown command": lambda c: struct.pack(">IIIII", 9, 1, c.devid, 0, 0) + bytes(28),
    "server-side command": lambda c: struct.pack(">IIIII", 3, 1, c.devid, 0, 0) + bytes(28),
    "too many iso packets": lambda c: struct.pack(">IIIIIIiiii", 1, 1, c.devid, 1, 1, 0, 0, 0, 5000, 0) + bytes(8),
    "bad direction": lambda c: struct.pack(">IIIIIIiiii", 1, 1, c.devid, 7, 1, 0, 0, 0, 0, 0) + bytes(8),
    "reused seqnum": lambda c: c.submit_bytes(2, True, 8, seqnum=77)[1] + c.submit_bytes(2, True, 8, seqnum=77)[1],
    "closed mid header": lambda c: c.submit_bytes(1, True, 8)[1][:30],
    "closed mid payload": lambda c: c.submit_bytes(1, False, 1000, b"x" * 1000)[1][:500],
}


@pytest.mark.parametrize("name", list(URB_BAD))
def test_bad_urb_phase_loses_only_that_connection(name: str, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        dev = ProbeDevice()
        async with Server([dev], host="127.0.0.1", port=0) as srv:
            bystander = RawClient(srv.port)
            srv.registry.add_virtual(ProbeDevice())
            assert await bystander.import_device("100-2") == 0
            c = RawClient(srv.port)
            assert await c.import_device(BUSID) == 0
            await c.send(URB_BAD[name](c))
            if name.startswith("closed"):
                await c.close()
            else:
                assert await c.closed_by_server()
            # the device is free again, nothing leaked, the other client is unaffected
            assert await wait_until(lambda: srv.stats()["sessions"] == 1 and srv.stats()["pending_urbs"] == 0)
            assert await wait_until(lambda: not srv.registry.is_busy(BUSID))
            seq, raw = bystander.submit_bytes(1, True, 8)
            await bystander.send(raw)
            (r,) = await bystander.replies(1)
            assert r.seqnum == seq and r.status == 0
            await bystander.close()
            await still_serves(srv)
            assert await wait_until(lambda: idle(srv))

    with caplog.at_level(logging.INFO, logger="usbip"):
        run(body)
    if not name.startswith("closed"):
        assert any("dropped" in r.getMessage() for r in caplog.records)
