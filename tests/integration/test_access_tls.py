"""Who may connect: --allow networks, device rules, TLS and client certificates (server side,
driven by a client that speaks TLS through the standard library, as stunnel would)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from usbip.net.tls import server_context
from usbip.protocol import HEADER_SIZE, Decoder, pack_cmd_submit
from usbip.protocol.constants import OP_REP_DEVLIST, ST_NODEV
from usbip.protocol.records import pack_import_request, pack_op_header, unpack_devlist_count, unpack_op_header
from usbip.server import Server
from usbip.server.access import AccessPolicy, Client, DeviceRule
from usbip.virtual import KeyboardDevice, LoopbackDevice

from .helpers import idle, run, wait_until

trustme = pytest.importorskip("trustme")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    other_ca = trustme.CA()
    out: dict[str, str] = {}
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    out["ca"] = str(d / "ca.pem")
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    out["server"] = str(d / "server.pem")
    for name, issuer in (("alice", ca), ("bob", ca), ("mallory", other_ca)):
        cert = issuer.issue_cert(f"{name}@example.test", common_name=name)
        cert.private_key_and_cert_chain_pem.write_to_path(str(d / f"{name}.pem"))
        out[name] = str(d / f"{name}.pem")
    yield out


def client_ctx(pki: dict[str, str], who: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if who:
        ctx.load_cert_chain(pki[who])
    return ctx


async def open_from(source: str, port: int, ctx: ssl.SSLContext | None = None):  # type: ignore[no-untyped-def]
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="localhost" if ctx else None)


async def devlist(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[str]:
    writer.write(pack_op_header(0x8005, 0))
    head = unpack_op_header(await asyncio.wait_for(reader.readexactly(8), 5))
    assert head.code == OP_REP_DEVLIST
    n = unpack_devlist_count(await reader.readexactly(4))
    busids = []
    for _ in range(n):
        rec = await reader.readexactly(312)
        busids.append(rec[256:288].rstrip(b"\0").decode())
        await reader.readexactly(4 * rec[311])
    writer.close()
    return busids


async def import_status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, busid: str) -> int:
    writer.write(pack_import_request(busid))
    head = unpack_op_header(await asyncio.wait_for(reader.readexactly(8), 5))
    if head.status == 0:
        await reader.readexactly(312)
    return head.status


def devices() -> list:  # type: ignore[type-arg]
    return [LoopbackDevice(), KeyboardDevice("hi")]


# ---------------------------------------------------------------- the policy itself


def test_rule_syntax() -> None:
    r = DeviceRule.parse("0525:a4a0=10.0.0.0/8,cn:alice")
    assert r.vid == 0x0525 and r.pid == 0xA4A0 and r.names == ("alice",)
    assert r.names_device("9-9", 0x0525, 0xA4A0) and not r.names_device("9-9", 0x0525, 1)
    assert DeviceRule.parse("*:a4a0=::1").names_device("1-1", 7, 0xA4A0)
    assert DeviceRule.parse("1-1.2=192.0.2.7").busid == "1-1.2"
    for bad in ("1-1", "=10.0.0.1", "nonsense=10.0.0.1", "1-1=cn:", "1-1=not-an-address"):
        with pytest.raises(ValueError):
            DeviceRule.parse(bad)
    policy = AccessPolicy.from_specs(["10.0.0.0/8"], ["100-1=cn:alice,192.0.2.0/24"])
    assert policy.may_connect("10.1.2.3") and policy.may_connect("::ffff:10.1.2.3")
    assert not policy.may_connect("192.0.2.1") and not policy.may_connect("not-an-ip")
    assert policy.may_use(Client("10.0.0.1", ("alice",)), "100-1", 0, 0)
    assert not policy.may_use(Client("10.0.0.1", ("bob",)), "100-1", 0, 0)
    assert policy.may_use(Client("10.0.0.1"), "100-2", 0, 0)


# ---------------------------------------------------------------- over TCP


def test_allow_refuses_other_networks(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        policy = AccessPolicy.from_specs(["127.0.0.2/32"])
        async with Server(devices(), host="127.0.0.1", port=0, access=policy) as srv:
            r, w = await open_from("127.0.0.3", srv.port)
            assert await asyncio.wait_for(r.read(1), 5) == b""  # closed before a byte is read
            w.close()
            assert await devlist(*await open_from("127.0.0.2", srv.port)) == ["100-1", "100-2"]
            assert await wait_until(lambda: idle(srv))

    with caplog.at_level(logging.WARNING, "usbip.server.server"):
        run(body)
    assert "127.0.0.3: refused: not in an allowed network" in caplog.text


def test_device_rules_hide_and_refuse(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        policy = AccessPolicy.from_specs(rules=["100-1=127.0.0.2", "1209:*=127.0.0.4"])
        async with Server(devices(), host="127.0.0.1", port=0, access=policy) as srv:
            kbd = srv.registry.get("100-2")
            assert kbd is not None and kbd.record().idVendor == 0x1209
            assert await devlist(*await open_from("127.0.0.2", srv.port)) == ["100-1"]
            assert await devlist(*await open_from("127.0.0.3", srv.port)) == []
            assert await devlist(*await open_from("127.0.0.4", srv.port)) == ["100-2"]
            r, w = await open_from("127.0.0.3", srv.port)
            assert await import_status(r, w, "100-1") == ST_NODEV
            w.close()
            r, w = await open_from("127.0.0.2", srv.port)
            assert await import_status(r, w, "100-1") == 0
            w.close()
            assert await wait_until(lambda: idle(srv))

    with caplog.at_level(logging.WARNING, "usbip.server.server"):
        run(body)
    assert "import of 100-1 refused for 127.0.0.3 by the device rules" in caplog.text


# ---------------------------------------------------------------- over TLS


def test_tls_import_and_urbs(pki: dict[str, str]) -> None:
    async def body() -> None:
        ctx = server_context(pki["server"])
        async with Server(devices(), host="127.0.0.1", port=0, tls=ctx) as srv:
            assert await devlist(*await open_from("127.0.0.1", srv.port, client_ctx(pki, None))) == ["100-1", "100-2"]
            r, w = await open_from("127.0.0.1", srv.port, client_ctx(pki, None))
            assert await import_status(r, w, "100-1") == 0
            dec = Decoder("client")
            # many URBs in one batch: bulk IN (pattern 0) 64 KiB each, and a loopback OUT/IN pair
            raw = bytearray()
            for seq in range(1, 33):
                hdr = bytearray(HEADER_SIZE)
                pack_cmd_submit(hdr, 0, seq, 100 << 16 | 2, 1, 1, 0, 65536, 0, 0, 0, bytes(8))
                dec.expect(seq, 65536)
                raw += hdr
            payload = bytes(range(256)) * 64
            hdr = bytearray(HEADER_SIZE)
            pack_cmd_submit(hdr, 0, 100, 100 << 16 | 2, 0, 2, 0, len(payload), 0, 0, 0, bytes(8))
            dec.expect(100, -1)
            raw += hdr + payload
            hdr = bytearray(HEADER_SIZE)
            pack_cmd_submit(hdr, 0, 101, 100 << 16 | 2, 1, 2, 0, len(payload), 0, 0, 0, bytes(8))
            dec.expect(101, len(payload))
            raw += hdr
            w.write(bytes(raw))
            got: dict[int, bytes] = {}
            while len(got) < 34:
                chunk = await asyncio.wait_for(r.read(1 << 20), 10)
                assert chunk, "server closed the TLS stream"
                for m in dec.feed(chunk):
                    assert m.status == 0
                    got[m.seqnum] = b"" if m.data is None else bytes(m.data)
            assert all(got[s] == bytes(65536) for s in range(1, 33))
            assert got[101] == payload
            w.close()
            assert await wait_until(lambda: idle(srv))

    run(body)


def test_tls_client_certificates(pki: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        ctx = server_context(pki["server"], client_ca=pki["ca"])
        policy = AccessPolicy.from_specs(rules=["100-1=cn:alice"])
        async with Server(devices(), host="127.0.0.1", port=0, tls=ctx, access=policy) as srv:
            assert await devlist(*await open_from("127.0.0.1", srv.port, client_ctx(pki, "alice"))) == [
                "100-1",
                "100-2",
            ]
            assert await devlist(*await open_from("127.0.0.1", srv.port, client_ctx(pki, "bob"))) == ["100-2"]
            for who in (None, "mallory"):  # no certificate; one from another CA
                with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                    await devlist(*await open_from("127.0.0.1", srv.port, client_ctx(pki, who)))
            # plain TCP to a TLS server: dropped, the server carries on
            r, w = await open_from("127.0.0.1", srv.port)
            w.write(pack_op_header(0x8005, 0))
            assert await asyncio.wait_for(r.read(), 5) != struct.pack(">HHI", 0x0111, 5, 0)
            w.close()
            assert await wait_until(lambda: idle(srv))

    with caplog.at_level(logging.WARNING, "usbip.server.server"):
        run(body)
    assert "TLS handshake failed" in caplog.text


def test_server_context_needs_a_key(tmp_path: Path) -> None:
    with pytest.raises((ssl.SSLError, OSError)):
        server_context(str(tmp_path / "missing.pem"))


# ---------------------------------------------------------------- our client and usbip over TLS


def test_client_library_over_tls(pki: dict[str, str]) -> None:
    from usbip.client import TlsFailed, connect
    from usbip.net.tls import client_context

    async def body() -> None:
        ctx = server_context(pki["server"], client_ca=pki["ca"])
        async with Server(devices(), host="127.0.0.1", port=0, tls=ctx) as srv:
            alice = client_context(pki["ca"], pki["alice"])
            async with connect("127.0.0.1", srv.port, tls=alice, server_hostname="localhost") as conn:
                assert [d.busid for d in await conn.list_devices()] == ["100-1", "100-2"]
                dev = await conn.import_device("100-1")
                data = bytes(range(256)) * 64
                await dev.bulk_transfer(0x02, data)
                got = await dev.bulk_transfer(0x82, len(data))
                assert bytes(got) == data
                results = await asyncio.gather(*(dev.bulk_transfer(0x81, 16384) for _ in range(64)))
                assert all(bytes(r) == bytes(16384) for r in results)
                await dev.close()
            for bad in (client_context(pki["ca"]), client_context(pki["ca"], pki["mallory"])):
                with pytest.raises(TlsFailed):
                    async with connect("127.0.0.1", srv.port, tls=bad, server_hostname="localhost") as conn:
                        await conn.list_devices()
            other_ca = client_context(pki["alice"], pki["alice"])  # trusts only alice's chain, not the server
            with pytest.raises(TlsFailed, match="certificate verify failed"):
                async with connect("127.0.0.1", srv.port, tls=other_ca, server_hostname="localhost") as conn:
                    await conn.list_devices()
            assert await wait_until(lambda: idle(srv))

    run(body)


def test_usbip_list_over_tls_exit_codes(pki: dict[str, str]) -> None:
    import subprocess
    import sys

    async def body() -> None:
        ctx = server_context(pki["server"], client_ca=pki["ca"])
        async with Server(devices(), host="127.0.0.1", port=0, tls=ctx) as srv:
            base = [sys.executable, "-m", "usbip.cli.usbip_main", "--tcp-port", str(srv.port)]
            loop = asyncio.get_running_loop()

            def usbip(*args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run([*base, *args], capture_output=True, text=True, timeout=30)

            ok = await loop.run_in_executor(
                None,
                lambda: usbip(
                    "--tls-ca", pki["ca"], "--tls-cert", pki["alice"], "--tls-server-name", "localhost",
                    "--json", "list", "-r", "127.0.0.1",
                ),
            )  # fmt: skip
            assert ok.returncode == 0, ok.stderr
            assert '"busid": "100-1"' in ok.stdout
            nocert = await loop.run_in_executor(
                None, lambda: usbip("--tls-ca", pki["ca"], "--tls-server-name", "localhost", "list", "-r", "127.0.0.1")
            )
            assert nocert.returncode == 4 and "requires a client certificate" in nocert.stderr, nocert.stderr
            missing = await loop.run_in_executor(None, lambda: usbip("--tls-ca", "/nonexistent.pem", "list", "-r", "x"))
            assert missing.returncode == 2 and "cannot load the TLS" in missing.stderr

    run(body)


def test_a_port_probe_is_not_a_failed_handshake(pki: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with Server(devices(), host="127.0.0.1", port=0, tls=server_context(pki["server"])) as srv:
            for _ in range(3):
                _reader, w = await open_from("127.0.0.1", srv.port)
                w.close()
            assert await wait_until(lambda: srv.connections_total == 3 and idle(srv))

    with caplog.at_level(logging.INFO, "usbip.server.server"):
        run(body)
    assert "TLS handshake failed" not in caplog.text
    assert "connection closed during the TLS handshake" in caplog.text
