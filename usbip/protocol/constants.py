"""Numbers of the USB/IP wire protocol, version 0x0111.

Sources: Linux ``Documentation/usb/usbip_protocol.rst``,
``drivers/usb/usbip/usbip_common.h`` and ``tools/usb/usbip/src/usbip_network.h``.
"""

from __future__ import annotations

import errno
from enum import IntEnum

# endpoint transfer types: USB chapter 9's (usbip.usb.ch9), which the wire's URBs carry too
from ..usb.ch9 import XFER_BULK as XFER_BULK
from ..usb.ch9 import XFER_CONTROL as XFER_CONTROL
from ..usb.ch9 import XFER_INT as XFER_INT
from ..usb.ch9 import XFER_ISOC as XFER_ISOC

USBIP_VERSION = 0x0111
USBIP_PORT = 3240

# Operation codes (usbip_network.h). Requests have bit 15 set.
OP_REQUEST = 0x80 << 8
OP_REPLY = 0x00 << 8
OP_IMPORT = 0x03
OP_DEVLIST = 0x05
OP_REQ_IMPORT = OP_REQUEST | OP_IMPORT  # 0x8003
OP_REP_IMPORT = OP_REPLY | OP_IMPORT  # 0x0003
OP_REQ_DEVLIST = OP_REQUEST | OP_DEVLIST  # 0x8005
OP_REP_DEVLIST = OP_REPLY | OP_DEVLIST  # 0x0005


class OpStatus(IntEnum):
    """``ST_*`` values of the op header's status field (usbip_network.h)."""

    OK = 0
    NA = 1  # device not available (not bound / unknown busid)
    DEV_BUSY = 2
    DEV_ERR = 3
    NODEV = 4
    ERROR = 5


ST_OK, ST_NA, ST_DEV_BUSY, ST_DEV_ERR, ST_NODEV, ST_ERROR = (int(s) for s in OpStatus)

# URB phase commands (usbip_common.h).
USBIP_CMD_SUBMIT = 0x0001
USBIP_CMD_UNLINK = 0x0002
USBIP_RET_SUBMIT = 0x0003
USBIP_RET_UNLINK = 0x0004

USBIP_DIR_OUT = 0
USBIP_DIR_IN = 1

OP_HEADER_SIZE = 8
HEADER_SIZE = 48  # struct usbip_header: 20-byte basic + 28-byte union
ISO_DESC_SIZE = 16  # struct usbip_iso_packet_descriptor
DEVICE_RECORD_SIZE = 312  # struct usbip_usb_device
INTERFACE_RECORD_SIZE = 4  # struct usbip_usb_interface
BUSID_SIZE = 32  # SYSFS_BUS_ID_SIZE
PATH_SIZE = 256  # SYSFS_PATH_MAX

# Limits a receiver enforces before trusting a size off the wire.
USBIP_MAX_ISO_PACKETS = 1024  # usbip_common.h
DEFAULT_MAX_TRANSFER = 16 * 1024 * 1024  # usbfs' default usbfs_memory_mb
MAX_DEVICES = 4096  # devices in one OP_REP_DEVLIST
# number_of_packets for a non-iso URB: Linux vhci sends 0, Windows clients send 0xffffffff.
NON_ISO_PACKETS = -1


class Speed(IntEnum):
    """``enum usb_device_speed`` as carried in device records and vhci attach."""

    UNKNOWN = 0
    LOW = 1
    FULL = 2
    HIGH = 3
    WIRELESS = 4
    SUPER = 5
    SUPER_PLUS = 6


SPEED_NAMES = {
    Speed.UNKNOWN: "unknown",
    Speed.LOW: "1.5",
    Speed.FULL: "12",
    Speed.HIGH: "480",
    Speed.WIRELESS: "53.3-480",
    Speed.SUPER: "5000",
    Speed.SUPER_PLUS: "10000",
}

# URB transfer flags (include/linux/usb.h) and the mask the kernel stub applies
# (stub_rx.c: masking_bogus_flags).
URB_SHORT_NOT_OK = 0x0001
URB_ISO_ASAP = 0x0002
URB_NO_TRANSFER_DMA_MAP = 0x0004
URB_ZERO_PACKET = 0x0040
URB_NO_INTERRUPT = 0x0080
URB_FREE_BUFFER = 0x0100
URB_DIR_IN = 0x0200

# Negative errno values carried in status fields.
ECONNRESET = -errno.ECONNRESET
ENOENT = -errno.ENOENT
EPIPE = -errno.EPIPE
ENODEV = -errno.ENODEV
ESHUTDOWN = -errno.ESHUTDOWN
EOVERFLOW = -errno.EOVERFLOW
EREMOTEIO = -errno.EREMOTEIO
EINVAL = -errno.EINVAL
ETIMEDOUT = -errno.ETIMEDOUT
EPROTO = -errno.EPROTO
EXDEV = -errno.EXDEV
ENOMEM = -errno.ENOMEM
EBADR = -errno.EBADR  # usb_submit_urb: a control URB whose wLength is not its transfer length
