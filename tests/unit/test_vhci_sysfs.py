"""vhci-hcd sysfs parsing and writes against a fake tree (the real kernel is in tests/kernel)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from usbip.cli.vhci import format_ports
from usbip.protocol.constants import Speed
from usbip.vhci.driver import VDEV_ST_USED, VhciDriver, VhciError, parse_status
from usbip.vhci.imports import imported_ports

# vhci_sysfs.c: status_show_vhci prints this header and one line per port
STATUS0 = """hub port sta spd dev      sockfd local_busid
hs  0000 006 003 00640002 000003 3-1
hs  0001 004 000 00000000 000000 0-0
ss  0002 004 000 00000000 000000 0-0
ss  0003 004 000 00000000 000000 0-0
"""
STATUS1 = """hub port sta spd dev      sockfd local_busid
hs  0004 004 000 00000000 000000 0-0
hs  0005 004 000 00000000 000000 0-0
ss  0006 004 000 00000000 000000 0-0
ss  0007 004 000 00000000 000000 0-0
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    d = tmp_path / "platform" / "vhci_hcd.0"
    d.mkdir(parents=True)
    (d / "status").write_text(STATUS0)
    (d / "status.1").write_text(STATUS1)
    (d / "nports").write_text("8\n")
    (d / "attach").write_text("")
    (d / "detach").write_text("")
    return tmp_path


def test_parse_status_line() -> None:
    p = parse_status(STATUS0)[0]
    assert (p.hub, p.port, p.status, p.speed, p.devid, p.sockfd, p.local_busid) == (
        "hs",
        0,
        VDEV_ST_USED,
        3,
        0x00640002,
        3,
        "3-1",
    )
    assert (p.busnum, p.devnum) == (100, 2)
    assert p.in_use


def test_ports_of_all_controllers_and_free_port_by_speed(tree: Path) -> None:
    drv = VhciDriver(str(tree / "platform"), str(tree / "run"))
    assert [p.port for p in drv.ports()] == list(range(8))
    assert drv.nports == 8
    assert drv.free_port(Speed.HIGH) == 1  # port 0 is in use
    assert drv.free_port(Speed.FULL) == 1
    assert drv.free_port(Speed.SUPER) == 2  # super-speed devices go to the ss hub


def test_attach_detach_write_the_kernel_format(tree: Path) -> None:
    drv = VhciDriver(str(tree / "platform"), str(tree / "run"))
    drv.attach(5, 7, 0x00010002, 3)
    assert (tree / "platform/vhci_hcd.0/attach").read_text() == "5 7 65538 3"
    drv.detach(5)
    assert (tree / "platform/vhci_hcd.0/detach").read_text() == "5"


def test_records_and_port_listing(tree: Path) -> None:
    drv = VhciDriver(str(tree / "platform"), str(tree / "run"))
    drv.write_record(0, "10.0.2.2", 3240, "100-1")
    assert (tree / "run" / "port0").read_text() == "10.0.2.2 3240 100-1\n"
    assert oct(os.stat(tree / "run").st_mode & 0o777) == "0o700"
    ports = imported_ports(drv)
    assert [p.port for p in ports] == [0]
    assert ports[0].to_json()["remote"] == {"host": "10.0.2.2", "port": "3240", "busid": "100-1"}
    text = format_ports(ports)
    assert "Port 00: <Port in Use> at High Speed(480Mbps)" in text
    assert "3-1 -> usbip://10.0.2.2:3240/100-1" in text
    assert "-> remote bus/dev 100/002" in text
    drv.remove_record(0)
    assert drv.read_record(0) is None


def test_full_hub_and_missing_driver(tree: Path) -> None:
    (tree / "platform/vhci_hcd.0/status").write_text(STATUS0.replace(" 004 ", " 006 "))
    (tree / "platform/vhci_hcd.0/status.1").write_text(STATUS1.replace(" 004 ", " 006 "))
    drv = VhciDriver(str(tree / "platform"), str(tree / "run"))
    with pytest.raises(VhciError, match="no free high-speed"):
        drv.free_port(Speed.HIGH)
    with pytest.raises(VhciError, match="vhci-hcd is not loaded"):
        VhciDriver(str(tree / "nowhere"))


def test_a_chosen_port_must_exist_be_free_and_match_the_speed(tree: Path) -> None:
    drv = VhciDriver(str(tree / "platform"), str(tree / "run"))
    assert drv.check_port(4, Speed.HIGH) == 4  # second controller's high-speed hub
    assert drv.check_port(6, Speed.SUPER) == 6
    assert drv.check_port(6) == 6  # no speed: only free and existing
    with pytest.raises(VhciError, match="port 0 is in use") as busy:
        drv.check_port(0, Speed.HIGH)
    assert busy.value.errno == errno.EBUSY
    with pytest.raises(VhciError, match="is a ss port") as wrong:
        drv.check_port(6, Speed.HIGH)
    assert wrong.value.errno == errno.EINVAL
    with pytest.raises(VhciError, match="no vhci port 8"):
        drv.check_port(8)
