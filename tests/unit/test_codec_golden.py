"""Golden byte vectors for every USB/IP message, written by hand from the kernel's documentation.

References (Linux v6.x):
  [DOC]  Documentation/usb/usbip_protocol.rst, section "Message Format" (tables per message)
         and section "EXAMPLE" (HID traffic captured from the wire).
  [HDR]  drivers/usb/usbip/usbip_common.h: struct usbip_header_basic, usbip_header_cmd_submit,
         usbip_header_ret_submit, usbip_header_cmd_unlink, usbip_header_ret_unlink,
         usbip_iso_packet_descriptor (all __be32 on the wire, setup[8] copied as is).
  [NET]  tools/usb/usbip/src/usbip_network.h: struct op_common, op_devlist_reply,
         op_import_request; tools/usb/usbip/libsrc/usbip_common.h: struct usbip_usb_device
         (312 bytes), struct usbip_usb_interface (4 bytes).

The vectors are hex literals; the encoders must reproduce them byte for byte and the
decoders must read back the hand-written field values.
"""

from __future__ import annotations

import pytest

from usbip.protocol import records
from usbip.protocol.constants import (
    DEVICE_RECORD_SIZE,
    ECONNRESET,
    OP_REP_DEVLIST,
    OP_REP_IMPORT,
    OP_REQ_DEVLIST,
    OP_REQ_IMPORT,
    USBIP_VERSION,
    OpStatus,
)
from usbip.protocol.errors import ProtocolError


def H(text: str) -> bytes:
    """Hex literal with whitespace for readability."""
    return bytes.fromhex(text)


def z(n: int) -> bytes:
    return bytes(n)


# ======================================================================== op phase
# [DOC] "OP_REQ_DEVLIST": version 0x0111, code 0x8005, status 0.
REQ_DEVLIST = H("0111 8005 00000000")

PATH = b"/sys/devices/pci0000:00/0000:00:1d.1/usb3/3-2"  # the example path in [DOC]
BUSID = b"3-2"  # the example busid in [DOC]

# [NET] struct usbip_usb_device, offsets relative to the record (add 0x0C in OP_REP_DEVLIST,
# 0x08 in OP_REP_IMPORT, as the [DOC] tables do).
DEVICE_RECORD = (
    PATH
    + z(256 - len(PATH))  # 0x000 path[256], NUL padded
    + BUSID
    + z(32 - len(BUSID))  # 0x100 busid[32], NUL padded
    + H("00000003")  # 0x120 busnum = 3
    + H("00000005")  # 0x124 devnum = 5
    + H("00000003")  # 0x128 speed = USB_SPEED_HIGH
    + H("046d")  # 0x12C idVendor
    + H("c52b")  # 0x12E idProduct
    + H("1211")  # 0x130 bcdDevice
    + H("ef")  # 0x132 bDeviceClass (misc)
    + H("02")  # 0x133 bDeviceSubClass
    + H("01")  # 0x134 bDeviceProtocol (IAD)
    + H("01")  # 0x135 bConfigurationValue
    + H("01")  # 0x136 bNumConfigurations
    + H("02")  # 0x137 bNumInterfaces
)
# [NET] struct usbip_usb_interface: class, subclass, protocol, padding (0).
INTERFACES = H("03 01 01 00") + H("03 01 02 00")

# [DOC] "OP_REP_DEVLIST": header, 4-byte device count, then each device record followed by
# bNumInterfaces interface records.
REP_DEVLIST = H("0111 0005 00000000") + H("00000001") + DEVICE_RECORD + INTERFACES

# [DOC] "OP_REQ_IMPORT": header with code 0x8003, then busid[32] NUL padded.
REQ_IMPORT = H("0111 8003 00000000") + BUSID + z(29)

# [DOC] "OP_REP_IMPORT": header with code 0x0003; status 0 is followed by the device record
# (without interface records), any other status ends the reply.
REP_IMPORT_OK = H("0111 0003 00000000") + DEVICE_RECORD


def _device() -> records.DeviceRecord:
    return records.DeviceRecord(
        path=PATH.decode(),
        busid=BUSID.decode(),
        busnum=3,
        devnum=5,
        speed=3,
        idVendor=0x046D,
        idProduct=0xC52B,
        bcdDevice=0x1211,
        bDeviceClass=0xEF,
        bDeviceSubClass=0x02,
        bDeviceProtocol=0x01,
        bConfigurationValue=1,
        bNumConfigurations=1,
        bNumInterfaces=2,
        interfaces=(records.InterfaceRecord(3, 1, 1), records.InterfaceRecord(3, 1, 2)),
    )


def test_req_devlist() -> None:
    assert REQ_DEVLIST == bytes([0x01, 0x11, 0x80, 0x05, 0, 0, 0, 0])
    assert records.pack_op_header(OP_REQ_DEVLIST) == REQ_DEVLIST
    hdr = records.unpack_op_header(REQ_DEVLIST)
    assert (hdr.version, hdr.code, hdr.status) == (USBIP_VERSION, OP_REQ_DEVLIST, 0)
    assert hdr.pack() == REQ_DEVLIST


def test_rep_devlist_field_offsets() -> None:
    # every offset of the [DOC] "OP_REP_DEVLIST" table, checked against the literal
    v = REP_DEVLIST
    assert len(v) == 12 + DEVICE_RECORD_SIZE + 2 * 4
    assert v[0:2] == H("0111") and v[2:4] == H("0005") and v[4:8] == z(4)
    assert v[0x08:0x0C] == H("00000001")  # number of exported devices
    assert v[0x0C : 0x0C + len(PATH)] == PATH and v[0x0C + len(PATH) : 0x10C] == z(256 - len(PATH))
    assert v[0x10C:0x10F] == BUSID and v[0x10F:0x12C] == z(29)
    assert v[0x12C:0x130] == H("00000003")  # busnum
    assert v[0x130:0x134] == H("00000005")  # devnum
    assert v[0x134:0x138] == H("00000003")  # speed
    assert v[0x138:0x13A] == H("046d")  # idVendor
    assert v[0x13A:0x13C] == H("c52b")  # idProduct
    assert v[0x13C:0x13E] == H("1211")  # bcdDevice
    assert v[0x13E] == 0xEF  # bDeviceClass
    assert v[0x13F] == 0x02  # bDeviceSubClass
    assert v[0x140] == 0x01  # bDeviceProtocol
    assert v[0x141] == 0x01  # bConfigurationValue
    assert v[0x142] == 0x01  # bNumConfigurations
    assert v[0x143] == 0x02  # bNumInterfaces
    assert v[0x144:0x148] == H("03010100")  # interface 0: class, subclass, protocol, pad
    assert v[0x148:0x14C] == H("03010200")  # interface 1
    # [DOC]: the second device would start at 0xC + 1*0x138 + m_0*4
    assert len(v) == 0xC + 1 * 0x138 + 2 * 4


def test_rep_devlist_encode() -> None:
    assert records.pack_devlist_reply([_device()]) == REP_DEVLIST
    assert records.pack_devlist_reply([]) == H("0111 0005 00000000 00000000")


def test_rep_devlist_decode() -> None:
    v = memoryview(REP_DEVLIST)
    hdr = records.unpack_op_header(v[:8])
    assert (hdr.version, hdr.code, hdr.status) == (0x0111, OP_REP_DEVLIST, 0)
    assert records.unpack_devlist_count(v[8:12]) == 1
    dev = records.DeviceRecord.unpack(v[12 : 12 + DEVICE_RECORD_SIZE])
    ifaces = records.unpack_interfaces(v[12 + DEVICE_RECORD_SIZE :], dev.bNumInterfaces)
    dev = records.DeviceRecord.unpack(v[12 : 12 + DEVICE_RECORD_SIZE], ifaces)
    assert dev == _device()
    assert dev.devid == 0x00030005
    assert dev.as_dict()["interfaces"] == [
        {"bInterfaceClass": 3, "bInterfaceSubClass": 1, "bInterfaceProtocol": 1},
        {"bInterfaceClass": 3, "bInterfaceSubClass": 1, "bInterfaceProtocol": 2},
    ]


def test_req_import() -> None:
    assert len(REQ_IMPORT) == 8 + 32
    assert REQ_IMPORT[2:4] == H("8003")
    assert records.pack_import_request("3-2") == REQ_IMPORT
    hdr = records.unpack_op_header(REQ_IMPORT)
    assert hdr.code == OP_REQ_IMPORT
    assert records.unpack_import_busid(REQ_IMPORT[8:]) == "3-2"


def test_rep_import_success_offsets_and_roundtrip() -> None:
    v = REP_IMPORT_OK
    assert len(v) == 8 + 312
    # [DOC] "OP_REP_IMPORT" table offsets
    assert v[0x08 : 0x08 + len(PATH)] == PATH
    assert v[0x108:0x10B] == BUSID
    assert v[0x128:0x12C] == H("00000003")  # busnum
    assert v[0x12C:0x130] == H("00000005")  # devnum
    assert v[0x130:0x134] == H("00000003")  # speed
    assert v[0x134:0x136] == H("046d")  # idVendor
    assert v[0x136:0x138] == H("c52b")  # idProduct
    assert v[0x138:0x13A] == H("1211")  # bcdDevice
    assert v[0x13A:0x140] == H("ef 02 01 01 01 02")  # class .. bNumInterfaces
    assert records.pack_import_reply(0, _device()) == REP_IMPORT_OK
    hdr = records.unpack_op_header(v)
    assert (hdr.code, hdr.status) == (OP_REP_IMPORT, 0)
    dev = records.DeviceRecord.unpack(v[8:])
    assert dev == records.DeviceRecord(**{**_device().__dict__, "interfaces": ()})


# [DOC] "OP_REP_IMPORT": a non-zero status ends the reply after the 8-byte header.
# Status values: ST_NA 1, ST_DEV_BUSY 2, ST_DEV_ERR 3, ST_NODEV 4, ST_ERROR 5 (usbip_network.h).
REP_IMPORT_FAILURES = {
    OpStatus.NA: H("0111 0003 00000001"),
    OpStatus.DEV_BUSY: H("0111 0003 00000002"),
    OpStatus.DEV_ERR: H("0111 0003 00000003"),
    OpStatus.NODEV: H("0111 0003 00000004"),
    OpStatus.ERROR: H("0111 0003 00000005"),
}


@pytest.mark.parametrize("status", list(REP_IMPORT_FAILURES), ids=lambda s: s.name)
def test_rep_import_failure_is_header_only(status: OpStatus) -> None:
    vec = REP_IMPORT_FAILURES[status]
    assert records.pack_import_reply(int(status), _device()) == vec
    assert records.pack_import_reply(int(status)) == vec
    hdr = records.unpack_op_header(vec)
    assert (hdr.code, hdr.status) == (OP_REP_IMPORT, int(status))


def test_op_header_wrong_version_vector() -> None:
    with pytest.raises(ProtocolError, match="version 0x0110"):
        records.unpack_op_header(H("0110 8005 00000000"))
    assert records.unpack_op_header(H("0110 8005 00000000"), expect_version=False).version == 0x0110


# ======================================================================== URB phase
# [HDR] struct usbip_header_basic (20 bytes) + struct usbip_header_cmd_submit (28 bytes);
# [DOC] "USBIP_CMD_SUBMIT": command 1, seqnum, devid=(busnum<<16)|devnum, direction, ep,
# transfer_flags @0x14, transfer_buffer_length @0x18, start_frame @0x1C,
# number_of_packets @0x20, interval @0x24, setup[8] @0x28, then payload, then iso descriptors.

# Control IN GET_DESCRIPTOR(DEVICE, 18 bytes) on ep0 of device 3-5, as vhci sends it
# (number_of_packets 0 for a non-iso URB from Linux, transfer_flags URB_DIR_IN).
CMD_CONTROL_IN = H(
    "00000001 00000001 00030005 00000001 00000000"  # basic: CMD_SUBMIT seq 1 devid 3-5 IN ep0
    "00000200 00000012 00000000 00000000 00000000"  # flags URB_DIR_IN, length 18, sf, np, interval
    "80 06 00 01 00 00 12 00"  # setup: GET_DESCRIPTOR device, wLength 18
)
CMD_CONTROL_IN_FIELDS = (1, 1, 0x00030005, 1, 0, 0x200, 18, 0, 0, 0, H("8006000100001200"), None, None)

# Bulk OUT of 8 bytes on ep 2: the payload follows the header (direction OUT: n = length).
CMD_BULK_OUT = H(
    "00000001 00000002 00030005 00000000 00000002"
    "00000000 00000008 00000000 00000000 00000000"
    "0000000000000000"
    "deadbeef 01020304"  # transfer_buffer
)
CMD_BULK_OUT_FIELDS = (1, 2, 0x00030005, 0, 2, 0, 8, 0, 0, 0, z(8), H("deadbeef01020304"), None)

# Iso OUT on ep 3: 3 packets of 8 bytes, URB_ISO_ASAP, interval 1, start_frame 0x10;
# the whole 24-byte buffer then 3 x struct usbip_iso_packet_descriptor
# (offset, length, actual_length, status; [HDR]).
ISO_OUT_DATA = H("101112131415161718191a1b1c1d1e1f 2021222324252627")
ISO_OUT_DESCS = H(
    "00000000 00000008 00000000 0000000000000008 00000008 00000000 0000000000000010 00000008 00000000 00000000"
)
CMD_ISO_OUT = (
    H("00000001 00000003 00030005 00000000 0000000300000002 00000018 00000010 00000003 000000010000000000000000")
    + ISO_OUT_DATA
    + ISO_OUT_DESCS
)
CMD_ISO_OUT_FIELDS = (1, 3, 0x00030005, 0, 3, 2, 24, 16, 3, 1, z(8), ISO_OUT_DATA, ISO_OUT_DESCS)

# Windows clients (usbip-win) send number_of_packets 0xffffffff for non-iso URBs ([DOC] says
# "shall be set to 0xffffffff if not ISO transfer"): it decodes as -1 and means no descriptors.
CMD_BULK_OUT_WINDOWS = H(
    "00000001 00000004 00030005 00000000 0000000200000000 00000004 00000000 ffffffff 000000000000000000000000cafebabe"
)
CMD_BULK_OUT_WINDOWS_FIELDS = (1, 4, 0x00030005, 0, 2, 0, 4, 0, -1, 0, z(8), H("cafebabe"), None)

# [DOC] "EXAMPLE": HID interrupt traffic captured from the wire, verbatim.
DOC_CMD_INTR_IN = H(
    "00000001 00000d05 0001000f 00000001 00000001 00000200 00000040 ffffffff 00000000 00000004 00000000 00000000"
)
DOC_CMD_INTR_IN_FIELDS = (1, 0xD05, 0x1000F, 1, 1, 0x200, 0x40, -1, 0, 4, z(8), None, None)
DOC_INTR_OUT_PAYLOAD = H(
    "ffffffff860008a784ce5ae212376300000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
)
DOC_CMD_INTR_OUT = (
    H("00000001 00000d06 0001000f 00000000 00000001 00000000 00000040 ffffffff 00000000 00000004 00000000 00000000")
    + DOC_INTR_OUT_PAYLOAD
)
DOC_CMD_INTR_OUT_FIELDS = (1, 0xD06, 0x1000F, 0, 1, 0, 0x40, -1, 0, 4, z(8), DOC_INTR_OUT_PAYLOAD, None)

# [HDR] struct usbip_header_ret_submit: status @0x14, actual_length @0x18, start_frame @0x1C,
# number_of_packets @0x20, error_count @0x24, 8 bytes padding; the kernel stub leaves
# devid/direction/ep zero (stub_tx.c, [DOC] "for server this shall be 0").
RET_BULK_IN = H(
    "00000003 00000002 00000000 00000000 00000000"  # basic: RET_SUBMIT seq 2, zero devid/dir/ep
    "00000000 00000004 00000000 00000000 00000000"  # status 0, actual 4, sf, np 0, error_count
    "0000000000000000"  # padding
    "a1a2a3a4"  # actual_length bytes of IN data
)
RET_BULK_IN_FIELDS = (3, 2, 0, 0, 0, 0, 4, 0, 0, 0, H("a1a2a3a4"), None)

# Iso IN reply ([DOC]: "the padding between each ISO packets is not transmitted"): 3 packets of
# 8 bytes in a 24-byte buffer; packet 0 got 4 bytes, packet 1 failed with -EXDEV (-18 =
# 0xffffffee) and no data, packet 2 got 6 bytes: 10 packed data bytes then the descriptors.
ISO_IN_PACKED = H("a0a1a2a3 b0b1b2b3b4b5")
ISO_IN_DESCS = H(
    "00000000 00000008 00000004 0000000000000008 00000008 00000000 ffffffee00000010 00000008 00000006 00000000"
)
RET_ISO_IN = (
    H(
        "00000003 00000007 00000000 00000000 00000000"
        "00000000 0000000a 00000010 00000003 00000001"  # status 0, actual 10, sf 16, np 3, 1 error
        "0000000000000000"
    )
    + ISO_IN_PACKED
    + ISO_IN_DESCS
)
RET_ISO_IN_FIELDS = (3, 7, 0, 0, 0, 0, 10, 16, 3, 1, ISO_IN_PACKED, ISO_IN_DESCS)
# the 24-byte buffer after usbip_pad_iso (spread): each packet's bytes at its offset
ISO_IN_SPREAD = H("a0a1a2a3 000000000000000000000000b0b1b2b3b4b5 0000")

# RET_SUBMIT with number_of_packets 0xffffffff: -1, no descriptors.
RET_BULK_IN_WINDOWS = H(
    "00000003 00000008 00000000 00000000 0000000000000000 00000002 00000000 ffffffff 0000000000000000000000005a5b"
)
RET_BULK_IN_WINDOWS_FIELDS = (3, 8, 0, 0, 0, 0, 2, 0, -1, 0, H("5a5b"), None)

# [DOC] "EXAMPLE" RetIntrOut / RetIntrIn, verbatim
DOC_RET_INTR_OUT = H(
    "00000003 00000d06 00000000 00000000 00000000 00000000 00000040 ffffffff 00000000 00000000 00000000 00000000"
)
DOC_RET_INTR_OUT_FIELDS = (3, 0xD06, 0, 0, 0, 0, 0x40, -1, 0, 0, None, None)
DOC_INTR_IN_PAYLOAD = H(
    "ffffffff860011a784ce5ae2123763612891b1020100000400000000000000000000000000000000000000000000000000000000000000000000000000000000"
)
DOC_RET_INTR_IN = (
    H("00000003 00000d05 00000000 00000000 00000000 00000000 00000040 ffffffff 00000000 00000000 00000000 00000000")
    + DOC_INTR_IN_PAYLOAD
)
DOC_RET_INTR_IN_FIELDS = (3, 0xD05, 0, 0, 0, 0, 0x40, -1, 0, 0, DOC_INTR_IN_PAYLOAD, None)

# [HDR] struct usbip_header_cmd_unlink: unlink_seqnum @0x14 then 24 bytes padding.
CMD_UNLINK = H("00000002 00000009 00030005 00000000 0000000000000003") + z(24)
CMD_UNLINK_FIELDS = (2, 9, 0x00030005, 0, 0, 3)

# [HDR] struct usbip_header_ret_unlink: status @0x14 then 24 bytes padding; a successful
# unlink answers -ECONNRESET = -104 = 0xffffff98 ([DOC] "USBIP_RET_UNLINK").
RET_UNLINK_RESET = H("00000004 00000009 00000000 00000000 00000000ffffff98") + z(24)
RET_UNLINK_RESET_FIELDS = (4, 9, 0, 0, 0, -104)
# unlink that arrived after the RET_SUBMIT: status 0
RET_UNLINK_LATE = H("00000004 0000000a 00000000 00000000 0000000000000000") + z(24)
RET_UNLINK_LATE_FIELDS = (4, 10, 0, 0, 0, 0)


def test_vector_sizes() -> None:
    for vec in (CMD_CONTROL_IN, DOC_CMD_INTR_IN, DOC_RET_INTR_OUT, CMD_UNLINK, RET_UNLINK_RESET):
        assert len(vec) == 48
    assert len(CMD_BULK_OUT) == 48 + 8
    assert len(CMD_ISO_OUT) == 48 + 24 + 3 * 16
    assert len(RET_ISO_IN) == 48 + 10 + 3 * 16
    assert len(DOC_CMD_INTR_OUT) == len(DOC_RET_INTR_IN) == 48 + 64
    assert ECONNRESET == -104 and RET_UNLINK_RESET[20:24] == H("ffffff98")


# ------------------------------------------------------------------ encoders
def test_encode_cmd_submit(codec) -> None:
    buf = bytearray(48)
    assert codec.pack_cmd_submit(buf, 0, 1, 0x00030005, 1, 0, 0x200, 18, 0, 0, 0, H("8006000100001200")) == 48
    assert bytes(buf) == CMD_CONTROL_IN
    buf = bytearray(48 + 8)
    assert codec.pack_cmd_submit(buf, 0, 2, 0x00030005, 0, 2, 0, 8) == 48
    buf[48:] = H("deadbeef01020304")
    assert bytes(buf) == CMD_BULK_OUT
    buf = bytearray(48)
    codec.pack_cmd_submit(buf, 0, 4, 0x00030005, 0, 2, 0, 4, 0, -1, 0)
    assert bytes(buf) == CMD_BULK_OUT_WINDOWS[:48]
    codec.pack_cmd_submit(buf, 0, 0xD05, 0x1000F, 1, 1, 0x200, 0x40, -1, 0, 4)
    assert bytes(buf) == DOC_CMD_INTR_IN


def test_encode_cmd_submit_iso_at_offset(codec) -> None:
    buf = bytearray(b"\xee" * (7 + len(CMD_ISO_OUT)))
    end = codec.pack_cmd_submit(buf, 7, 3, 0x00030005, 0, 3, 2, 24, 16, 3, 1)
    assert end == 7 + 48
    buf[end : end + 24] = ISO_OUT_DATA
    iso = codec.IsoPackets.layout(3, 8)
    assert iso.pack_into(buf, end + 24) == len(buf)
    assert buf[:7] == b"\xee" * 7
    assert bytes(buf[7:]) == CMD_ISO_OUT
    assert codec.IsoPackets.from_list([(0, 8, 0, 0), (8, 8, 0, 0), (16, 8, 0, 0)]).to_bytes() == ISO_OUT_DESCS


def test_encode_ret_submit(codec) -> None:
    buf = bytearray(48)
    codec.pack_ret_submit(buf, 0, 2, 0, 4)
    assert bytes(buf) == RET_BULK_IN[:48]
    codec.pack_ret_submit(buf, 0, 7, 0, 10, 16, 3, 1)
    assert bytes(buf) == RET_ISO_IN[:48]
    codec.pack_ret_submit(buf, 0, 0xD05, 0, 0x40, -1, 0, 0)
    assert bytes(buf) == DOC_RET_INTR_IN[:48]
    codec.pack_ret_submit(buf, 0, 8, 0, 2, 0, -1)
    assert bytes(buf) == RET_BULK_IN_WINDOWS[:48]


def test_encode_iso_in_reply(codec) -> None:
    iso = codec.IsoPackets.layout(3, 8)
    iso.set_result(0, 4)
    iso.set_result(1, 0, -18)
    iso.set_result(2, 6)
    assert iso.to_bytes() == ISO_IN_DESCS
    assert iso.total_actual() == 10 and iso.error_count() == 1
    packed = bytearray(24)
    assert iso.gather(ISO_IN_SPREAD, packed) == 10
    assert bytes(packed[:10]) == ISO_IN_PACKED


def test_encode_unlink(codec) -> None:
    buf = bytearray(b"\xff" * 48)
    codec.pack_cmd_unlink(buf, 0, 9, 0x00030005, 0, 0, 3)
    assert bytes(buf) == CMD_UNLINK
    buf = bytearray(b"\xff" * 48)
    codec.pack_ret_unlink(buf, 0, 9, ECONNRESET)
    assert bytes(buf) == RET_UNLINK_RESET
    codec.pack_ret_unlink(buf, 0, 10, 0)
    assert bytes(buf) == RET_UNLINK_LATE


def test_encode_ret_submit_clears_padding(codec) -> None:
    buf = bytearray(b"\xff" * 48)
    codec.pack_ret_submit(buf, 0, 2, 0, 4)
    assert bytes(buf) == RET_BULK_IN[:48]


# ------------------------------------------------------------------ decoders
SERVER_VECTORS = [
    ("control_in", CMD_CONTROL_IN, CMD_CONTROL_IN_FIELDS),
    ("bulk_out", CMD_BULK_OUT, CMD_BULK_OUT_FIELDS),
    ("iso_out", CMD_ISO_OUT, CMD_ISO_OUT_FIELDS),
    ("windows_non_iso", CMD_BULK_OUT_WINDOWS, CMD_BULK_OUT_WINDOWS_FIELDS),
    ("doc_intr_in", DOC_CMD_INTR_IN, DOC_CMD_INTR_IN_FIELDS),
    ("doc_intr_out", DOC_CMD_INTR_OUT, DOC_CMD_INTR_OUT_FIELDS),
    ("unlink", CMD_UNLINK, CMD_UNLINK_FIELDS),
]

# (name, vector, expected fields, seqnum, in_length given to expect(); None = no expect)
CLIENT_VECTORS = [
    ("bulk_in", RET_BULK_IN, RET_BULK_IN_FIELDS, 2, 512),
    ("iso_in", RET_ISO_IN, RET_ISO_IN_FIELDS, 7, 24),
    ("windows_non_iso", RET_BULK_IN_WINDOWS, RET_BULK_IN_WINDOWS_FIELDS, 8, 64),
    ("doc_intr_out", DOC_RET_INTR_OUT, DOC_RET_INTR_OUT_FIELDS, 0xD06, -1),
    ("doc_intr_in", DOC_RET_INTR_IN, DOC_RET_INTR_IN_FIELDS, 0xD05, 64),
    ("unlink_reset", RET_UNLINK_RESET, RET_UNLINK_RESET_FIELDS, None, None),
    ("unlink_late", RET_UNLINK_LATE, RET_UNLINK_LATE_FIELDS, None, None),
]


@pytest.mark.parametrize(("vec", "fields"), [v[1:] for v in SERVER_VECTORS], ids=[v[0] for v in SERVER_VECTORS])
def test_server_decodes(codec, vec: bytes, fields: tuple) -> None:
    dec = codec.Decoder("server")
    msgs = dec.feed(vec)
    assert [m.fields() for m in msgs] == [fields]
    assert dec.buffered == 0 and dec.failed is None
    hdr = codec.unpack_header(vec)
    assert hdr.fields()[: len(fields) - 2] == fields[: len(fields) - 2]


@pytest.mark.parametrize(
    ("vec", "fields", "seqnum", "in_length"), [v[1:] for v in CLIENT_VECTORS], ids=[v[0] for v in CLIENT_VECTORS]
)
def test_client_decodes(codec, vec: bytes, fields: tuple, seqnum: int | None, in_length: int | None) -> None:
    dec = codec.Decoder("client")
    if seqnum is not None:
        dec.expect(seqnum, in_length)
    msgs = dec.feed(vec)
    assert [m.fields() for m in msgs] == [fields]
    assert dec.buffered == 0 and dec.failed is None


def test_non_iso_minus_one_has_no_descriptors(codec) -> None:
    (msg,) = codec.Decoder("server").feed(CMD_BULK_OUT_WINDOWS)
    assert msg.number_of_packets == -1 and msg.iso is None and bytes(msg.data) == H("cafebabe")
    dec = codec.Decoder("client")
    dec.expect(8, 64)
    (ret,) = dec.feed(RET_BULK_IN_WINDOWS)
    assert ret.number_of_packets == -1 and ret.iso is None


def test_kernel_style_ret_submit_has_zero_devid_direction_ep(codec) -> None:
    dec = codec.Decoder("client")
    dec.expect(2, 512)
    (msg,) = dec.feed(RET_BULK_IN)
    assert (msg.devid, msg.direction, msg.ep) == (0, 0, 0)
    assert isinstance(msg, codec.RetSubmit) and msg.command == 3


def test_iso_in_spread_matches_usbip_pad_iso(codec) -> None:
    dec = codec.Decoder("client")
    dec.expect(7, 24)
    (msg,) = dec.feed(RET_ISO_IN)
    assert msg.iso.tolist() == [(0, 8, 4, 0), (8, 8, 0, -18), (16, 8, 6, 0)]
    buf = bytearray(24)
    buf[:10] = msg.data
    msg.iso.spread(buf, msg.actual_length)
    # bytes between packets are whatever the buffer held; compare only packet payloads
    for off, _length, actual, _status in msg.iso.tolist():
        assert buf[off : off + actual] == ISO_IN_SPREAD[off : off + actual]


def test_iso_out_descriptors_decode(codec) -> None:
    (msg,) = codec.Decoder("server").feed(CMD_ISO_OUT)
    assert msg.iso.tolist() == [(0, 8, 0, 0), (8, 8, 0, 0), (16, 8, 0, 0)]
    assert len(msg.iso) == 3 and msg.iso[2] == (16, 8, 0, 0) and msg.iso[-1] == (16, 8, 0, 0)
    assert msg.iso == codec.IsoPackets.unpack(ISO_OUT_DESCS, 0, 3)


def test_unpack_header_types(codec) -> None:
    assert isinstance(codec.unpack_header(CMD_CONTROL_IN), codec.CmdSubmit)
    assert isinstance(codec.unpack_header(RET_BULK_IN), codec.RetSubmit)
    assert isinstance(codec.unpack_header(CMD_UNLINK), codec.CmdUnlink)
    assert isinstance(codec.unpack_header(RET_UNLINK_RESET), codec.RetUnlink)
    assert codec.unpack_header(b"\0" * 5 + RET_UNLINK_RESET, 5).status == ECONNRESET
    assert codec.unpack_header(CMD_CONTROL_IN).setup == H("8006000100001200")
