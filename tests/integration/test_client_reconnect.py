"""The user-space client's opt-in reconnect (``Connection.import_device(busid, reconnect=...)``)
against our in-process server, closed and started again on the same TCP port."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from usbip.capture import CaptureFile, read_records
from usbip.client import Cancelled, Disconnected, ReconnectPolicy, connect
from usbip.server import Server
from usbip.usb.device import Urb
from usbip.virtual import LoopbackDevice

from .helpers import ProbeDevice, run, wait_until

FAST = ReconnectPolicy(initial_delay=0.02, max_delay=0.1, jitter=0.0, wait_timeout=5.0, stable_after=0.2)
BUSID = "100-1"


class SetupRecorder(ProbeDevice):
    """ProbeDevice that records every control request and takes SET_INTERFACE too."""

    def __init__(self) -> None:
        super().__init__()
        self.setups: list[bytes] = []

    def submit(self, urb: Urb) -> None:
        if urb.ep == 0:
            self.setups.append(bytes(urb.setup))
            if urb.setup[0] == 0x01 and urb.setup[1] == 11:
                urb.complete(0, 0)
                return
        super().submit(urb)

    def requests(self) -> list[tuple[int, int, int, int]]:
        """(bmRequestType, bRequest, wValue, wIndex) of each control request."""
        return [(s[0], s[1], int.from_bytes(s[2:4], "little"), int.from_bytes(s[4:6], "little")) for s in self.setups]


async def restart(srv: Server, *devices: object, **kw: object) -> Server:
    """A new server on ``srv``'s port (which is closed first, if it is not)."""
    await srv.close()
    new = Server(list(devices), host="127.0.0.1", port=srv.port, **kw)  # type: ignore[arg-type]
    await new.start()
    return new


def test_urbs_in_flight_fail_later_ones_wait_and_the_state_is_restored(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "usbip.client.remote")

    async def body() -> None:
        first = SetupRecorder()
        srv = Server([first], host="127.0.0.1", port=0)
        await srv.start()
        async with connect("127.0.0.1", srv.port) as conn:
            dev = await conn.import_device(BUSID, reconnect=FAST)
            assert dev.configuration == 1  # configured at import
            await dev.set_interface(0, 1)
            assert await dev.bulk_transfer(0x81, 8) == (dev._seq).to_bytes(4, "big") * 2
            in_flight = dev.submit(0x82, 64)  # pends until the connection drops
            assert await wait_until(lambda: len(first.waiting) == 1)

            await srv.close()
            with pytest.raises(Disconnected):
                await in_flight
            assert not dev.closed and not dev.connected
            # submitted while the device is away: waits for the re-import
            waiting = asyncio.ensure_future(dev.bulk_transfer(0x81, 8, timeout=None))
            ctrl = asyncio.ensure_future(dev.get_descriptor(1, 0, 18))
            await asyncio.sleep(0.2)
            assert not waiting.done() and not ctrl.done()

            second = SetupRecorder()
            srv = await restart(srv, second)
            assert await dev.wait_connected(5)
            assert dev.reconnects == 1
            data = await asyncio.wait_for(waiting, 5)
            assert len(data) == 8  # stamped by the new server with its seqnum
            assert (await asyncio.wait_for(ctrl, 5))[:2] == bytes([18, 1])
            # re-read descriptors, configuration 1 again (the server reports 0), alt setting 1 of interface 0
            reqs = second.requests()
            assert reqs[0][:3] == (0x80, 6, 0x0100)
            assert (0x00, 9, 1, 0) in reqs and (0x01, 11, 1, 0) in reqs
            assert reqs.index((0x00, 9, 1, 0)) < reqs.index((0x01, 11, 1, 0))
            assert dev.device_descriptor is not None and dev.configuration_descriptor is not None
            await dev.close()
            assert dev.closed
        await srv.close()

    run(body)
    assert "re-import failed" in caplog.text or "back after" in caplog.text


def test_waiting_is_bounded_and_the_client_gives_up() -> None:
    async def body() -> None:
        srv = Server([ProbeDevice()], host="127.0.0.1", port=0)
        await srv.start()
        policy = ReconnectPolicy(initial_delay=0.05, max_delay=0.05, jitter=0.0, wait_timeout=0.3, max_attempts=8)
        async with connect("127.0.0.1", srv.port, timeout=1.0) as conn:
            dev = await conn.import_device(BUSID, reconnect=policy)
            await srv.close()
            assert await wait_until(lambda: not dev.connected, 5)
            # the policy's wait_timeout ends the wait (the message says which bound), not the URB's
            with pytest.raises(Disconnected, match=r"not back within 0\.3 s"):
                await dev.bulk_transfer(0x81, 8, timeout=None)
            with pytest.raises(Cancelled):  # its own shorter timeout: as a cancelled URB
                await dev.bulk_transfer(0x81, 8, timeout=0.05)
            parked = dev.submit(0x81, 8)
            assert dev.in_flight == 0
            # max_attempts (8 * 0.05 s, each refused at once) run out: closed for good
            assert await wait_until(lambda: dev.closed, 5)
            with pytest.raises(Disconnected, match="not back after 8 re-import attempts"):
                await parked
            with pytest.raises(Disconnected):
                dev.submit(0x81, 8)
            assert not await dev.wait_connected(0.1)

    run(body)


def test_close_while_away_stops_reconnecting() -> None:
    async def body() -> None:
        srv = Server([ProbeDevice()], host="127.0.0.1", port=0)
        await srv.start()
        conn = connect("127.0.0.1", srv.port)
        dev = await conn.import_device(BUSID, reconnect=FAST)
        await srv.close()
        assert await wait_until(lambda: not dev.connected, 5)
        parked = dev.submit(0x81, 8)
        await dev.close()
        assert dev.closed
        with pytest.raises(Disconnected, match="closed while away"):
            await parked
        srv = await restart(srv, ProbeDevice())
        await asyncio.sleep(0.3)
        assert dev.reconnects == 0 and srv.stats()["sessions"] == 0
        await conn.close()
        await srv.close()

    run(body)


def test_another_device_on_the_busid_is_not_taken_for_it() -> None:
    async def body() -> None:
        srv = Server([ProbeDevice()], host="127.0.0.1", port=0)
        await srv.start()
        async with connect("127.0.0.1", srv.port) as conn:
            dev = await conn.import_device(BUSID, reconnect=FAST)
            srv = await restart(srv, LoopbackDevice())  # other ids at 100-1
            await asyncio.sleep(0.3)
            assert not dev.connected and dev.reconnects == 0
            srv = await restart(srv, ProbeDevice())
            assert await dev.wait_connected(5)
            assert len(await dev.bulk_transfer(0x81, 8)) == 8
        await srv.close()

    run(body)


def test_no_policy_no_reconnect() -> None:
    async def body() -> None:
        srv = Server([ProbeDevice()], host="127.0.0.1", port=0)
        await srv.start()
        async with connect("127.0.0.1", srv.port) as conn:
            dev = await conn.import_device(BUSID)
            srv = await restart(srv, ProbeDevice())
            assert await wait_until(lambda: dev.closed, 5)
            with pytest.raises(Disconnected):
                dev.submit(0x81, 8)
            await asyncio.sleep(0.2)
            assert srv.stats()["sessions"] == 0
        await srv.close()

    run(body)


def test_reconnect_over_tls(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    from usbip.net.tls import client_context, server_context

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))

    async def body() -> None:
        tls = server_context(str(tmp_path / "server.pem"))
        srv = Server([LoopbackDevice()], host="127.0.0.1", port=0, tls=tls)
        await srv.start()
        async with connect("127.0.0.1", srv.port, tls=client_context(str(tmp_path / "ca.pem")),
                           server_hostname="localhost") as conn:  # fmt: skip
            dev = await conn.import_device(BUSID, reconnect=FAST)
            out = bytes(range(256)) * 2
            assert await dev.bulk_transfer(0x02, out) == len(out)
            srv = await restart(srv, LoopbackDevice(), tls=tls)
            assert await dev.wait_connected(5)
            assert await dev.bulk_transfer(0x02, out) == len(out)
            assert await dev.bulk_transfer(0x82, len(out)) == out  # the loopback echoes (0x02 -> 0x82)
        await srv.close()

    run(body)


def test_blocking_client_takes_the_policy() -> None:
    import threading

    from usbip.client.blocking import connect as blocking_connect

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    srv = Server([ProbeDevice()], host="127.0.0.1", port=0)
    asyncio.run_coroutine_threadsafe(srv.start(), loop).result(10)
    try:
        with blocking_connect("127.0.0.1", srv.port) as conn:
            dev = conn.import_device(BUSID, reconnect=FAST)
            assert dev.device.reconnect_policy is FAST
            assert len(dev.bulk_transfer(0x81, 8)) == 8  # type: ignore[arg-type]
    finally:
        asyncio.run_coroutine_threadsafe(srv.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_a_capture_follows_the_reimport(tmp_path: Path) -> None:
    """Records after a re-import carry the new connection's URB ids and the new record's numbers."""
    cap = CaptureFile(str(tmp_path / "client.pcapng"))

    async def body() -> tuple[int, int]:
        srv = Server([LoopbackDevice()], host="127.0.0.1", port=0)
        await srv.start()
        try:
            async with connect("127.0.0.1", srv.port, capture=cap) as conn:
                dev = await conn.import_device(BUSID, reconnect=FAST)
                await dev.bulk_transfer(0x81, 8)
                srv = await restart(srv, LoopbackDevice())
                assert await dev.wait_connected(5)
                await dev.bulk_transfer(0x81, 8)
                await dev.close()
                return dev.record.busnum, dev.record.devnum
        finally:
            await srv.close()

    try:
        busnum, devnum = run(body)
    finally:
        cap.close()
    recs = [r for r in read_records((tmp_path / "client.pcapng").read_bytes()) if r["epnum"] & 0x7F == 1]
    conns = [r["id"] >> 32 for r in recs]
    assert len(recs) == 4 and conns[0] == conns[1] != conns[2] == conns[3], recs
    assert {(r["busnum"], r["devnum"]) for r in recs} == {(busnum, devnum)}
