"""Control requests the libusb export looks at before libusb does (pure: no usb1 import).

* :func:`classify_control`: the standard requests the kernel stub performs itself rather than
  passing them to the device (``stub_rx.c``: SET_CONFIGURATION, SET_INTERFACE,
  CLEAR_FEATURE(ENDPOINT_HALT)), as a :class:`Special`; a port reset is one too (it carries no
  setup packet: the session turns the hub request into ``Device.reset``).
* :func:`control_refusal`: usbfs' ``check_ctrlrecip`` rules for every other request (a standard
  or class request naming an interface we did not claim is refused).
* :func:`interface_numbers`: the interfaces of a configuration descriptor (claimed on import).
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from typing import NamedTuple

from ...usb.ch9 import (
    CLEAR_FEATURE,
    DIR_IN,
    DIR_OUT,
    DT_INTERFACE,
    FEATURE_ENDPOINT_HALT,
    RECIP_DEVICE,
    RECIP_ENDPOINT,
    RECIP_INTERFACE,
    RECIP_MASK,
    SET_CONFIGURATION,
    SET_INTERFACE,
    SETUP_STRUCT,
    TYPE_CLASS,
    TYPE_MASK,
    TYPE_STANDARD,
    TYPE_VENDOR,
)
from ...usb.descriptors import walk
from .layout import ConfigLayout

#: the printer class' GET_DEVICE_ID (class, IN, interface): its wIndex names the interface in the high byte
PRINTER_GET_DEVICE_ID = (DIR_IN | TYPE_CLASS | RECIP_INTERFACE, 0)
_SET_CONFIG_RT = DIR_OUT | TYPE_STANDARD | RECIP_DEVICE
_SET_INTERFACE_RT = DIR_OUT | TYPE_STANDARD | RECIP_INTERFACE
_CLEAR_HALT_RT = DIR_OUT | TYPE_STANDARD | RECIP_ENDPOINT
#: CLEAR_FEATURE(ENDPOINT_HALT) keeps the endpoint's number and direction (stub_rx.c tweak_clear_halt_cmd)
_ENDPOINT_BITS = 0x8F


class Special(enum.Enum):
    """What the stub does itself instead of passing a request to the device."""

    CONFIG = "config"  # SET_CONFIGURATION -> setConfiguration
    INTERFACE = "interface"  # SET_INTERFACE -> setInterfaceAltSetting
    CLEAR_HALT = "clear_halt"  # CLEAR_FEATURE(ENDPOINT_HALT) -> clearHalt
    RESET = "reset"  # SET_FEATURE(PORT_RESET) to the hub port -> resetDevice

    def __str__(self) -> str:
        return self.value


class SpecialRequest(NamedTuple):
    """A special request and its arguments: ``target`` is the configuration value (CONFIG), the
    interface number (INTERFACE) or the endpoint address (CLEAR_HALT); ``alt`` the alternate
    setting (INTERFACE). wValue / wIndex are kept whole (16 bits): values that do not fit are
    refused by the checks, not cut here."""

    kind: Special
    target: int = 0
    alt: int = 0

    def __str__(self) -> str:
        if self.kind is Special.INTERFACE:
            return f"SET_INTERFACE({self.target}, {self.alt})"
        if self.kind is Special.CONFIG:
            return f"SET_CONFIGURATION({self.target})"
        if self.kind is Special.CLEAR_HALT:
            return f"CLEAR_HALT({self.target:#04x})"
        return "reset"


RESET_REQUEST = SpecialRequest(Special.RESET)


def classify_control(setup: bytes) -> SpecialRequest | None:
    """The special request in ``setup``, or None (an ordinary request, passed to the device)."""
    bm, req, value, index, _length = SETUP_STRUCT.unpack_from(setup, 0)
    if bm == _SET_CONFIG_RT and req == SET_CONFIGURATION:
        return SpecialRequest(Special.CONFIG, value)
    if bm == _SET_INTERFACE_RT and req == SET_INTERFACE:
        return SpecialRequest(Special.INTERFACE, index, value)
    if bm == _CLEAR_HALT_RT and req == CLEAR_FEATURE and value == FEATURE_ENDPOINT_HALT:
        return SpecialRequest(Special.CLEAR_HALT, index & _ENDPOINT_BITS)
    return None


def control_refusal(setup: bytes, claimed: Collection[int], layout: ConfigLayout, status: int) -> int:
    """0, or ``status`` when a standard/class request names an interface (or an endpoint of one) not
    in ``claimed``: that interface belongs to a kernel driver of this host. The rules of usbfs'
    check_ctrlrecip (vendor requests pass, so does the printer class' GET_DEVICE_ID, which names
    the interface in wIndex's high byte)."""
    bm, req, _value, index, _length = SETUP_STRUCT.unpack_from(setup, 0)
    if bm & TYPE_MASK == TYPE_VENDOR:
        return 0
    if (bm, req) == PRINTER_GET_DEVICE_ID and (index >> 8) in claimed:
        return 0
    recipient = bm & RECIP_MASK
    if recipient == RECIP_INTERFACE:
        return 0 if (index & 0xFF) in claimed else status
    if recipient == RECIP_ENDPOINT:
        address = index & 0xFF
        if address & 0x0F == 0:
            return 0
        owner = layout.owner(address)
        if owner is None:
            owner = layout.owner(address ^ 0x80)  # usbfs: some clients give the number without the direction
        if owner is None:
            return 0  # no such endpoint: the device answers, as usbfs lets it through
        return 0 if owner in claimed else status
    return 0


def interface_numbers(config: bytes) -> list[int]:
    """bInterfaceNumber of each interface in a configuration descriptor (alt 0 only)."""
    out = []
    for dtype, desc in walk(config):
        if dtype == DT_INTERFACE and len(desc) >= 4 and desc[3] == 0 and desc[2] not in out:
            out.append(desc[2])
    return out
