"""make_device() specs and demo_devices()."""

from __future__ import annotations

import os

import pytest

from usbip.cli.device_spec import make_device
from usbip.protocol.constants import Speed
from usbip.virtual import (
    AudioDevice,
    KeyboardDevice,
    LoopbackDevice,
    SerialDevice,
    StorageDevice,
    demo_devices,
)
from usbip.virtual.storage import parse_size


def test_loopback_specs():
    d = make_device("loopback")
    assert isinstance(d, LoopbackDevice) and d.speed == Speed.HIGH and d.pattern == 0
    d = make_device("loopback:ss")
    assert d.speed == Speed.SUPER and d.bulk_max_packet == 1024
    d = make_device("loopback:fs:p1")
    assert d.speed == Speed.FULL and d.pattern == 1


def test_storage_specs(tmp_path):
    path = tmp_path / "a.img"
    d = make_device(f"storage:{path}:64M")
    assert isinstance(d, StorageDevice) and d.size == 64 * 1024 * 1024 and not d.readonly
    d.release()
    d = make_device(f"storage:{path}::ro")
    assert d.readonly and d.size == 64 * 1024 * 1024
    d.release()
    d = make_device(f"storage:{tmp_path / 'c.img'}:1G")
    assert d.size == 1 << 30 and os.stat(tmp_path / "c.img").st_blocks < 100
    d.release()


def test_keyboard_and_serial_specs():
    k = make_device("keyboard:Hi\\n")
    assert isinstance(k, KeyboardDevice) and k.pending_reports == 6
    s = make_device("serial")
    assert isinstance(s, SerialDevice) and s.pty_path
    s.release()


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "mouse",
        "loopback:xx",
        "storage",
        "storage:",
        "storage:/nonexistent/x.img",
        "storage:/tmp/x:12Q",
        "serial:9",
        "audio:x",
    ],
)
def test_bad_specs(spec):
    with pytest.raises(ValueError) as e:
        make_device(spec)
    assert str(e.value)


def test_parse_size():
    assert parse_size("64M") == 64 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("512k") == 512 << 10
    assert parse_size("4096") == 4096
    assert parse_size("1.5K") == 1536
    for bad in ("", "M", "-1", "0", "abc"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_demo_devices(tmp_path):
    devs = demo_devices(tmp_path)
    assert [type(d) for d in devs] == [LoopbackDevice, StorageDevice, KeyboardDevice, SerialDevice, AudioDevice]
    assert devs[1].size == 64 * 1024 * 1024
    assert len({d.busid for d in devs}) == 5
    for d in devs:
        rec = d.record()
        assert rec.bNumInterfaces >= 1 and rec.idVendor
    devs[1].release()
    devs[3].release()
