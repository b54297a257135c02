"""The vhci TLS relay without vhci: the test holds the socket vhci-hcd would get and speaks
plain USB/IP on it while the relay process carries it through TLS to our usbipd."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from usbip.net.tls import TlsChannel, client_context, server_context
from usbip.protocol import HEADER_SIZE, Decoder, pack_cmd_submit
from usbip.protocol.records import pack_import_request, unpack_op_header
from usbip.server import Server
from usbip.vhci import relay
from usbip.virtual import LoopbackDevice

from .helpers import idle, run, wait_until

trustme = pytest.importorskip("trustme")
DEVID = 100 << 16 | 2


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("relaypki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    return {"ca": str(d / "ca.pem"), "server": str(d / "server.pem")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


async def tls_import(port: int, ca: str, busid: str) -> TlsChannel:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    ch = TlsChannel(sock, client_context(ca), server_side=False, server_hostname="localhost")
    await ch.handshake(5)
    await ch.send_all(pack_import_request(busid))
    assert unpack_op_header(await ch.recv_exactly(8, 5)).status == 0
    await ch.recv_exactly(312, 5)
    return ch


def urb_roundtrip(vhci: socket.socket, count: int) -> None:
    """What vhci would do: CMD_SUBMITs on the socket, RET_SUBMITs back (blocking, bounded)."""
    vhci.settimeout(10)
    dec = Decoder("client")
    payload = bytes(range(256)) * 16
    out = bytearray()
    for i in range(count):
        hdr = bytearray(HEADER_SIZE)
        pack_cmd_submit(hdr, 0, 2 * i + 1, DEVID, 0, 2, 0, len(payload), 0, 0, 0, bytes(8))
        dec.expect(2 * i + 1, -1)
        out += hdr + payload
        hdr = bytearray(HEADER_SIZE)
        pack_cmd_submit(hdr, 0, 2 * i + 2, DEVID, 1, 2, 0, len(payload), 0, 0, 0, bytes(8))
        dec.expect(2 * i + 2, len(payload))
        out += hdr
    vhci.sendall(out)
    got = 0
    while got < 2 * count:
        chunk = vhci.recv(1 << 20)
        assert chunk, "relay closed vhci's end"
        for m in dec.feed(chunk):
            assert m.status == 0
            if m.seqnum % 2 == 0:
                assert bytes(m.data) == payload
            got += 1


def test_relay_carries_urbs_and_ends_with_the_detach(certs: dict[str, str], tmp_path: Path) -> None:
    async def body() -> None:
        async with Server([LoopbackDevice()], host="127.0.0.1", port=0, tls=server_context(certs["server"])) as srv:
            ch = await tls_import(srv.port, certs["ca"], "100-1")
            vhci, pid = relay.start(ch, str(tmp_path / "relay.log"))
            try:
                assert alive(pid)
                await asyncio.get_running_loop().run_in_executor(None, urb_roundtrip, vhci, 64)
                vhci.shutdown(socket.SHUT_RDWR)  # what vhci does on detach
                vhci.close()
                assert await wait_until(lambda: not alive(pid), 5.0)
                assert await wait_until(lambda: idle(srv), 5.0), srv.stats()
            finally:
                vhci.close()
                relay.stop(pid)
        assert "vhci closed its end" in (tmp_path / "relay.log").read_text()

    run(body)


def test_relay_closes_vhci_when_the_server_goes(certs: dict[str, str], tmp_path: Path) -> None:
    async def body() -> None:
        srv = Server([LoopbackDevice()], host="127.0.0.1", port=0, tls=server_context(certs["server"]))
        await srv.start()
        ch = await tls_import(srv.port, certs["ca"], "100-1")
        vhci, pid = relay.start(ch, str(tmp_path / "relay.log"))
        try:
            await asyncio.get_running_loop().run_in_executor(None, urb_roundtrip, vhci, 4)
            await srv.close()
            vhci.settimeout(5)
            end = time.monotonic() + 5
            while time.monotonic() < end and vhci.recv(65536):
                pass
            assert await wait_until(lambda: not alive(pid), 5.0)
        finally:
            vhci.close()
            relay.stop(pid)

    run(body)


def test_vhci_attach_over_tls_with_a_fake_vhci(certs: dict[str, str], tmp_path: Path) -> None:
    """usbip attach's TLS path against a fake vhci sysfs tree whose 'kernel' is this test."""
    from usbip.net.tls import client_context
    from usbip.vhci.driver import VhciDriver
    from usbip.vhci.imports import attach

    d = tmp_path / "platform" / "vhci_hcd.0"
    d.mkdir(parents=True)
    (d / "status").write_text("hub port sta spd dev      sockfd local_busid\nhs  0000 004 000 00000000 000000 0-0\n")
    (d / "nports").write_text("1\n")
    (d / "attach").write_text("")
    taken: list[socket.socket] = []

    class FakeVhci(VhciDriver):
        def attach(self, port: int, sockfd: int, devid: int, speed: int) -> None:
            sock = socket.socket(fileno=os.dup(sockfd))
            assert sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM  # vhci_sysfs.c asks this
            assert devid == DEVID
            taken.append(sock)

    async def body() -> None:
        async with Server([LoopbackDevice()], host="127.0.0.1", port=0, tls=server_context(certs["server"])) as srv:
            drv = FakeVhci(str(tmp_path / "platform"), str(tmp_path / "run"))
            port = await attach("127.0.0.1", srv.port, "100-1", driver=drv, tls=client_context(certs["ca"]),
                                server_hostname="localhost")  # fmt: skip
            pid = drv.read_relay(port)
            assert port == 0 and pid is not None and alive(pid)
            assert drv.read_record(port) is not None
            (vhci,) = taken
            try:
                await asyncio.get_running_loop().run_in_executor(None, urb_roundtrip, vhci, 16)
                vhci.shutdown(socket.SHUT_RDWR)
                assert await wait_until(lambda: not alive(pid), 5.0)
                assert await wait_until(lambda: idle(srv), 5.0)
            finally:
                vhci.close()
                relay.stop(pid)
        assert "detached" in (tmp_path / "run" / "relay.log").read_text()

    run(body)
