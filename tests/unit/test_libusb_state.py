"""Bind state file rules, `usbip bind`/`unbind`, `list -l` markers, and the backend's registry sync."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from usbip.backends.state import BindState, DeviceIdentity, make_rule, normalize_vidpid, parse_rules
from usbip.cli.local import bind_command, list_local

DEV_DESC = bytes.fromhex("12010002000000402505a0a4000101020301")
CONFIG = bytes.fromhex("09022000010100c0320904000002ff0000000705810200020007050102000200")


def make_sysfs(root, busid="1-1", vid="0525", pid="a4a0", serial="S1", devnum=2, cls="00"):
    d = root / busid
    d.mkdir(parents=True, exist_ok=True)
    attrs = {
        "idVendor": vid,
        "idProduct": pid,
        "serial": serial,
        "busnum": busid.split("-")[0],
        "devnum": str(devnum),
        "speed": "480",
        "bDeviceClass": cls,
        "bConfigurationValue": "1",
        "dev": "189:1",
    }
    for k, v in attrs.items():
        (d / k).write_text(v + "\n")
    (d / "descriptors").write_bytes(DEV_DESC + CONFIG)
    (d / f"{busid}:1.0").mkdir(exist_ok=True)
    return d


def test_rules_match():
    dev = DeviceIdentity("1-1.2", 0x0525, 0xA4A0, "ABC")
    st = BindState("/nonexistent/x.json")
    assert not st.matches(dev)
    st.rules = [{"busid": "1-1.2"}]
    assert st.matches(dev)
    st.rules = [{"vidpid": "525:A4A0"}]
    assert st.matches(dev)
    st.rules = [{"serial": "ABC"}]
    assert st.matches(dev)
    st.rules = [{"serial": ""}, {"busid": "1-1"}, {"vidpid": "0525:a4a1"}]
    assert not st.matches(dev)
    assert normalize_vidpid("1D6B:2") == "1d6b:0002"
    with pytest.raises(ValueError):
        normalize_vidpid("xyz")
    with pytest.raises(ValueError):
        make_rule(busid="1-1", serial="x")
    assert parse_rules({"rules": [{"busid": "1-1"}, {"busid": 3}, "junk", {"busid": "2-1", "serial": "x"}]}) == [
        {"busid": "1-1"}
    ]


def test_save_reload_on_mtime_change(tmp_path):
    path = str(tmp_path / "sub" / "exported.json")
    a = BindState(path)
    assert not a.reload_if_changed()
    a.add({"busid": "1-1"})
    a.save()
    b = BindState(path)
    assert b.reload_if_changed() and b.rules == [{"busid": "1-1"}]
    assert not b.reload_if_changed()  # unchanged file: not re-read
    a.add({"vidpid": "0525:a4a0"})
    a.save()
    assert b.reload_if_changed() and len(b.rules) == 2
    os.unlink(path)
    assert b.reload_if_changed() and b.rules == []
    (tmp_path / "sub" / "exported.json").write_text("{not json")
    assert not b.reload_if_changed() or b.rules == []
    assert b.error


def test_bind_unbind_and_list_local(tmp_path, monkeypatch, capsys):
    root = tmp_path / "sys"
    make_sysfs(root, "1-1")
    make_sysfs(root, "1-2", vid="1209", pid="0001", serial="S2")
    make_sysfs(root, "2-1", cls="09")  # a hub
    state = str(tmp_path / "exported.json")
    assert bind_command("9-9", True, state_file=state, root=str(root)) != 0  # no such device
    assert bind_command("2-1", True, state_file=state, root=str(root)) != 0  # hub
    assert bind_command("1-1", True, state_file=state, root=str(root)) == 0
    assert bind_command(None, True, vidpid="1209:0001", state_file=state, root=str(root)) == 0
    assert json.load(open(state))["rules"] == [{"busid": "1-1"}, {"vidpid": "1209:0001"}]
    listed = {d["busid"]: d["bound"] for d in list_local(str(root), state)}
    assert listed == {"1-1": True, "1-2": True, "2-1": False}
    # unbind by busid drops every rule exporting that device (here the vidpid one)
    assert bind_command("1-2", False, state_file=state, root=str(root)) == 0
    assert json.load(open(state))["rules"] == [{"busid": "1-1"}]
    assert bind_command("1-2", False, state_file=state, root=str(root)) != 0  # not bound
    capsys.readouterr()
    assert bind_command("1-1", False, as_json=True, state_file=state, root=str(root)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["removed"] == [{"busid": "1-1"}] and out["rules"] == []
    monkeypatch.setenv("USBIP_STATE_FILE", state)
    assert BindState().path == state


class FakeRegistry:
    def __init__(self):
        self.devs = {}
        self.refresh_hooks = []

    def add(self, d):
        self.devs[d.busid] = d
        return d

    def remove(self, busid):
        return self.devs.pop(busid, None)

    def get(self, busid):
        return self.devs.get(busid)


def test_backend_sync_follows_rules_and_hotplug(tmp_path):
    from usbip.backends.libusb.backend import LibusbBackend
    from usbip.backends.libusb.device import LibusbDevice

    root = tmp_path / "sys"
    make_sysfs(root, "1-1")
    state = BindState(str(tmp_path / "exported.json"))
    reg = FakeRegistry()

    async def body():
        be = LibusbBackend(reg, state.path, sysfs_root=str(root), poll_interval=60)
        inits = []

        def fake_init():
            inits.append(1)
            be.context = object()
            be.events = None
            return True

        be._init_libusb = fake_init  # no libusb needed for the bookkeeping
        be.start()
        assert reg.devs == {} and not inits  # no rules: libusb not even initialised
        state.add({"busid": "1-1"})
        state.save()
        be.sync()
        dev = reg.devs["1-1"]
        assert isinstance(dev, LibusbDevice) and inits
        assert (dev.busnum, dev.devnum, dev.devid, dev.speed) == (1, 2, (1 << 16) | 2, 3)
        assert dev.record().idVendor == 0x0525 and dev.record().bNumInterfaces == 1
        assert dev.endpoint_type(1, 1) == 2 and dev.endpoint_type(3, 1) is None
        # unplugged: marked gone, removed
        dev.gone = asyncio.Event()
        import shutil

        shutil.rmtree(root / "1-1")
        be.sync()
        assert reg.devs == {} and dev.is_gone and dev.gone.is_set()
        # plugged again (new devnum): exported again by the same rule
        make_sysfs(root, "1-1", devnum=3)
        be.sync()
        assert reg.devs["1-1"] is not dev and reg.devs["1-1"].devnum == 3
        # unbound: removed
        state.remove({"busid": "1-1"})
        state.save()
        be.sync()
        assert reg.devs == {}
        await be.close()
        assert reg.refresh_hooks == []

    asyncio.run(body())
