"""usbip.usb.ch9: the setup packet type, and the vocabulary written once."""

from __future__ import annotations

import pytest

from usbip.protocol import constants
from usbip.usb import ch9, descriptors
from usbip.virtual import framework


def test_setup_round_trip_and_fields() -> None:
    raw = bytes.fromhex("8006000100001200")  # GET_DESCRIPTOR(DEVICE), 18 bytes
    s = ch9.Setup.unpack(raw)
    assert s == (0x80, ch9.GET_DESCRIPTOR, ch9.DT_DEVICE << 8, 0, 18)
    assert s.is_in and s.type == ch9.TYPE_STANDARD and s.recipient == ch9.RECIP_DEVICE
    assert s.is_standard(ch9.GET_DESCRIPTOR) and not s.is_standard(ch9.GET_DESCRIPTOR, ch9.RECIP_INTERFACE)
    assert s.pack() == raw and len(raw) == ch9.SETUP_SIZE


def test_port_reset_is_class_other() -> None:
    s = ch9.Setup.unpack(bytes((ch9.RT_PORT, ch9.SET_FEATURE, ch9.PORT_FEAT_RESET, 0, 1, 0, 0, 0)))
    assert (s.type, s.recipient, s.is_in) == (ch9.TYPE_CLASS, ch9.RECIP_OTHER, False)
    assert s.bmRequestType == 0x23  # ch11: SET_FEATURE(PORT_RESET) to a hub port


def test_short_setup_is_an_error() -> None:
    with pytest.raises(Exception):  # noqa: B017 - struct.error
        ch9.Setup.unpack(b"\x80\x06")


def test_the_layers_share_one_definition() -> None:
    for module in (descriptors, framework, constants):
        names = [n for n in vars(module) if n.startswith(("DT_", "XFER_", "GET_", "SET_", "RECIP_", "TYPE_"))]
        assert names, module
        for name in names:
            assert getattr(module, name) is getattr(ch9, name), (module.__name__, name)


def test_transfer_types() -> None:
    assert [ch9.XFER_CONTROL, ch9.XFER_ISOC, ch9.XFER_BULK, ch9.XFER_INT] == [0, 1, 2, 3]
