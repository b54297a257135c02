"""Pure rules of the libusb backend: errno mapping, names, speeds, iso packet layout."""

from __future__ import annotations

import errno

import pytest

from usbip.backends.libusb import mapping as m
from usbip.backends.libusb.control import Special, SpecialRequest, classify_control, interface_numbers
from usbip.backends.sysfs import busid_for, speed_from_sysfs, split_descriptors
from usbip.protocol import IsoPackets
from usbip.protocol.constants import Speed


def test_status_to_errno_matches_the_kernel_stub():
    assert m.status_to_errno(m.TRANSFER_COMPLETED) == 0
    assert m.status_to_errno(m.TRANSFER_STALL) == -errno.EPIPE
    assert m.status_to_errno(m.TRANSFER_NO_DEVICE) == -errno.ENODEV
    assert m.status_to_errno(m.TRANSFER_CANCELLED) == -errno.ECONNRESET
    assert m.status_to_errno(m.TRANSFER_OVERFLOW) == -errno.EOVERFLOW
    assert m.status_to_errno(m.TRANSFER_TIMED_OUT) == -errno.ETIMEDOUT
    assert m.status_to_errno(m.TRANSFER_ERROR) == -errno.EPROTO
    assert m.status_to_errno(99) == -errno.EPROTO


def test_constants_agree_with_usb1():
    usb1 = pytest.importorskip("usb1")
    assert (m.TRANSFER_COMPLETED, m.TRANSFER_ERROR, m.TRANSFER_TIMED_OUT, m.TRANSFER_CANCELLED) == (
        usb1.TRANSFER_COMPLETED,
        usb1.TRANSFER_ERROR,
        usb1.TRANSFER_TIMED_OUT,
        usb1.TRANSFER_CANCELLED,
    )
    assert (m.TRANSFER_STALL, m.TRANSFER_NO_DEVICE, m.TRANSFER_OVERFLOW) == (
        usb1.TRANSFER_STALL,
        usb1.TRANSFER_NO_DEVICE,
        usb1.TRANSFER_OVERFLOW,
    )
    assert m.speed_from_libusb(usb1.SPEED_HIGH) == Speed.HIGH
    assert m.speed_from_libusb(usb1.SPEED_SUPER) == Speed.SUPER


def test_error_to_errno():
    assert m.error_to_errno(m.LIBUSB_ERROR_PIPE) == -errno.EPIPE
    assert m.error_to_errno(m.LIBUSB_ERROR_NO_DEVICE) == -errno.ENODEV
    assert m.error_to_errno(m.LIBUSB_ERROR_IO) == -errno.EPROTO
    assert m.error_to_errno(None) == -errno.EPROTO


def test_busid_devid_and_speeds():
    assert busid_for(1, [1]) == "1-1"
    assert busid_for(3, (2, 4, 1)) == "3-2.4.1"
    assert busid_for(2, []) == "usb2"
    assert m.devid_for(17, 2) == (17 << 16) | 2
    assert speed_from_sysfs("480") == Speed.HIGH
    assert speed_from_sysfs("1.5") == Speed.LOW
    assert speed_from_sysfs("5000\n") == Speed.SUPER
    assert speed_from_sysfs("20000") == Speed.SUPER_PLUS
    assert speed_from_sysfs("weird") == Speed.UNKNOWN
    assert [m.speed_from_libusb(i) for i in range(6)] == [0, 1, 2, 3, 5, 6]


CONFIG = bytes.fromhex(
    "09022000020100c032"  # config, wTotalLength 32, 2 interfaces
    "0904000002ff000000"  # interface 0 alt 0
    "07058102000200"  # ep 0x81 bulk
    "07050102000200"  # ep 0x01 bulk
)


def test_split_descriptors_and_interfaces():
    dev = bytes.fromhex("12010002000000402505a0a4000101020301")
    cfg2 = bytearray(CONFIG)
    cfg2[5] = 2
    dd, configs = split_descriptors(dev + CONFIG + bytes(cfg2))
    assert dd == dev and configs == [CONFIG, bytes(cfg2)]
    assert split_descriptors(dev)[1] == []
    assert interface_numbers(CONFIG) == [0]


def test_classify_control():
    assert classify_control(bytes.fromhex("0009010000000000")) == SpecialRequest(Special.CONFIG, 1)
    assert classify_control(bytes.fromhex("010b010002000000")) == SpecialRequest(Special.INTERFACE, 2, 1)
    assert classify_control(bytes.fromhex("0201000081000000")) == SpecialRequest(Special.CLEAR_HALT, 0x81)
    assert str(classify_control(bytes.fromhex("010b010002000000"))) == "SET_INTERFACE(2, 1)"
    assert classify_control(bytes.fromhex("0201010081000000")) is None  # not ENDPOINT_HALT
    assert classify_control(bytes.fromhex("8006000100001200")) is None  # GET_DESCRIPTOR


def test_iso_plan_contiguous():
    iso = IsoPackets.layout(4, 192)
    plan = m.IsoPlan(iso.tolist(), 4 * 192)
    assert plan.contiguous and plan.total == 768 and plan.setup_lengths == [192] * 4
    assert plan.positions() == [0, 192, 384, 576]


def test_iso_plan_gaps_gather_scatter():
    packets = [(0, 4, 0, 0), (8, 4, 0, 0), (16, 0, 0, 0), (20, 2, 0, 0)]
    plan = m.IsoPlan(packets, 24)
    assert not plan.contiguous and plan.zero == [2]
    assert plan.setup_lengths == [4, 4, 1, 2] and plan.total == 11
    assert plan.positions() == [0, 4, 8, 8]
    src = bytearray(range(24))
    dst = bytearray(plan.total)
    plan.gather(memoryview(src), memoryview(dst))
    assert dst[:10] == bytes([0, 1, 2, 3, 8, 9, 10, 11, 20, 21])
    back = bytearray(24)
    plan.scatter(memoryview(dst), memoryview(back), [4, 3, 0, 2])
    assert back[0:4] == bytes([0, 1, 2, 3]) and back[8:11] == bytes([8, 9, 10]) and back[11] == 0
    assert back[20:22] == bytes([20, 21])


def test_iso_plan_rejects_overrun():
    with pytest.raises(ValueError):
        m.IsoPlan([(0, 10, 0, 0)], 8)


def test_apply_iso_results_per_packet_status():
    iso = IsoPackets.layout(3, 100)
    total, errors = m.apply_iso_results(
        iso, [(m.TRANSFER_COMPLETED, 100), (m.TRANSFER_ERROR, 0), (m.TRANSFER_COMPLETED, 40)]
    )
    assert (total, errors) == (140, 1)
    assert iso.tolist() == [(0, 100, 100, 0), (100, 100, 0, -errno.EPROTO), (200, 100, 40, 0)]
