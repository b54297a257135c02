"""mDNS discovery between network namespaces: usbipd announces, usbip list --discover finds it."""

from __future__ import annotations

import json
import sys
import time

import pytest

from usbip.net.mdns import parse_txt, txt_records

from .test_dead_peer import SERVER_IP, Namespaces, netns  # noqa: F401  (the netns fixture)

PORT = 3240


def test_txt_records_round_trip_and_hostile_txt_is_skipped() -> None:
    props = {k.encode(): v.encode() for k, v in txt_records([("100-1", 0x0525, 0xA4A0)] * 40, tls=True).items()}
    tls, devices = parse_txt(props)
    assert tls and len(devices) == 32 and devices[0] == ("100-1", "0525:a4a0")
    assert props[b"devices"] == b"40"
    hostile = {b"d0": b"x" * 300, b"d1": None, b"d2": b"1-1 zzzz", b"d3": b"\xff\xfe 0525:a4a0", b"tls": b"yes"}
    assert parse_txt(hostile) == (False, (("\ufffd\ufffd", "0525:a4a0"),))


@pytest.mark.slow
def test_discover_a_server_in_another_namespace(netns: Namespaces) -> None:  # noqa: F811
    server, out = netns.spawn(
        netns.a,
        "usbipd",
        *("-m", "usbip.cli.usbipd_main", "--no-libusb", "--virtual", "loopback", "--virtual", "keyboard:x"),
        *("--host", SERVER_IP, "--tcp-port", str(PORT), "-d"),
        merge=True,
    )
    assert out.wait_for("listening on", time.monotonic() + 20), "\n".join(out.transcript)
    res = netns.exec(
        netns.b,
        *(sys.executable, "-m", "usbip.cli.usbip_main"),
        *("--json", "list", "--discover", "--seconds", "4"),
        check=False,
    )
    assert res.returncode == 0, res.stderr + "\n".join(out.transcript)
    servers = json.loads(res.stdout)["servers"]
    assert len(servers) == 1, (servers, "\n".join(out.transcript))
    (s,) = servers
    assert s["port"] == PORT and SERVER_IP in s["addresses"] and not s["tls"]
    assert [d["busid"] for d in s["devices"]] == ["100-1", "100-2"]
    assert s["devices"][0]["usbid"] == "0525:a4a0"
    server.terminate()
    assert server.wait(10) == 0
    # --no-announce: nothing to find
    server, out = netns.spawn(
        netns.a,
        "usbipd-quiet",
        *("-m", "usbip.cli.usbipd_main", "--no-libusb", "--virtual", "loopback", "--no-announce"),
        *("--host", SERVER_IP, "--tcp-port", str(PORT)),
        merge=True,
    )
    assert out.wait_for("listening on", time.monotonic() + 20)
    res = netns.exec(
        netns.b,
        *(sys.executable, "-m", "usbip.cli.usbip_main", "--json", "list", "--discover", "--seconds", "3"),
        check=False,
    )
    assert res.returncode == 0 and json.loads(res.stdout)["servers"] == [], res.stdout


def test_no_mdns_network_is_a_warning_not_a_failure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    from usbip.net import mdns

    monkeypatch.setattr(mdns, "_own_addresses", lambda host: [])

    async def body() -> bool:
        ann = mdns.Announcer(3240, lambda: [("100-1", 1, 2)])
        ok = await ann.start()
        await ann.close()
        return ok

    assert asyncio.run(body()) is False
    assert "not announcing over mDNS: no non-loopback address" in caplog.text
