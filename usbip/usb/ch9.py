"""USB chapter 9 (USB 2.0 spec and its 3.x additions), and the hub port request of chapter 11
the server intercepts: request codes, descriptor types, bmRequestType fields, feature selectors,
transfer types, and :class:`Setup`, a setup packet with readable fields.

Written once here; the server, the virtual device framework, the libusb export and the
descriptor parser import it (the kernel's include/uapi/linux/usb/ch9.h holds the same names).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# descriptor types (USB 2.0 table 9-5, USB 3.2 table 9-6)
DT_DEVICE = 0x01
DT_CONFIG = 0x02
DT_STRING = 0x03
DT_INTERFACE = 0x04
DT_ENDPOINT = 0x05
DT_DEVICE_QUALIFIER = 0x06
DT_OTHER_SPEED_CONFIG = 0x07
DT_INTERFACE_ASSOCIATION = 0x0B
DT_BOS = 0x0F
DT_DEVICE_CAPABILITY = 0x10
DT_SS_ENDPOINT_COMP = 0x30

# standard requests (USB 2.0 table 9-4, USB 3.2 table 9-5)
GET_STATUS = 0x00
CLEAR_FEATURE = 0x01
SET_FEATURE = 0x03
SET_ADDRESS = 0x05
GET_DESCRIPTOR = 0x06
SET_DESCRIPTOR = 0x07
GET_CONFIGURATION = 0x08
SET_CONFIGURATION = 0x09
GET_INTERFACE = 0x0A
SET_INTERFACE = 0x0B
SYNCH_FRAME = 0x0C
SET_SEL = 0x30
SET_ISOCH_DELAY = 0x31

# bmRequestType (USB 2.0 9.3.1); the direction bit is also bEndpointAddress' (9.6.6)
DIR_OUT = 0x00
DIR_IN = 0x80
TYPE_MASK = 0x60
TYPE_STANDARD = 0x00
TYPE_CLASS = 0x20
TYPE_VENDOR = 0x40
RECIP_MASK = 0x1F
RECIP_DEVICE = 0
RECIP_INTERFACE = 1
RECIP_ENDPOINT = 2
RECIP_OTHER = 3

# feature selectors (USB 2.0 table 9-6)
FEATURE_ENDPOINT_HALT = 0
FEATURE_REMOTE_WAKEUP = 1

# endpoint transfer types (bmAttributes & 3, USB 2.0 table 9-13)
XFER_CONTROL = 0
XFER_ISOC = 1
XFER_BULK = 2
XFER_INT = 3
XFER_MASK = 0x03

# hubs (chapter 11): the device class, and SET_FEATURE(PORT_RESET) to a port (class | other)
HUB_CLASS = 0x09
RT_PORT = TYPE_CLASS | RECIP_OTHER
PORT_FEAT_RESET = 4

SETUP_SIZE = 8
SETUP_STRUCT = struct.Struct("<BBHHH")


class Setup(NamedTuple):
    """A setup packet (USB 2.0 table 9-2), little-endian on the wire."""

    bmRequestType: int
    bRequest: int
    wValue: int
    wIndex: int
    wLength: int

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Setup:
        return cls(*SETUP_STRUCT.unpack_from(data))

    def pack(self) -> bytes:
        return SETUP_STRUCT.pack(*self)

    @property
    def is_in(self) -> bool:
        return bool(self.bmRequestType & DIR_IN)

    @property
    def type(self) -> int:
        return self.bmRequestType & TYPE_MASK

    @property
    def recipient(self) -> int:
        return self.bmRequestType & RECIP_MASK

    def is_standard(self, request: int, recipient: int = RECIP_DEVICE) -> bool:
        """This is the standard ``request`` to ``recipient`` (either direction)."""
        return self.bRequest == request and self.bmRequestType & (TYPE_MASK | RECIP_MASK) == recipient


__all__ = [
    "CLEAR_FEATURE",
    "DIR_IN",
    "DIR_OUT",
    "DT_BOS",
    "DT_CONFIG",
    "DT_DEVICE",
    "DT_DEVICE_CAPABILITY",
    "DT_DEVICE_QUALIFIER",
    "DT_ENDPOINT",
    "DT_INTERFACE",
    "DT_INTERFACE_ASSOCIATION",
    "DT_OTHER_SPEED_CONFIG",
    "DT_SS_ENDPOINT_COMP",
    "DT_STRING",
    "FEATURE_ENDPOINT_HALT",
    "FEATURE_REMOTE_WAKEUP",
    "GET_CONFIGURATION",
    "GET_DESCRIPTOR",
    "GET_INTERFACE",
    "GET_STATUS",
    "HUB_CLASS",
    "PORT_FEAT_RESET",
    "RECIP_DEVICE",
    "RECIP_ENDPOINT",
    "RECIP_INTERFACE",
    "RECIP_MASK",
    "RECIP_OTHER",
    "RT_PORT",
    "SETUP_SIZE",
    "SETUP_STRUCT",
    "SET_ADDRESS",
    "SET_CONFIGURATION",
    "SET_DESCRIPTOR",
    "SET_FEATURE",
    "SET_INTERFACE",
    "SET_ISOCH_DELAY",
    "SET_SEL",
    "SYNCH_FRAME",
    "TYPE_CLASS",
    "TYPE_MASK",
    "TYPE_STANDARD",
    "TYPE_VENDOR",
    "XFER_BULK",
    "XFER_CONTROL",
    "XFER_INT",
    "XFER_ISOC",
    "XFER_MASK",
    "Setup",
]
