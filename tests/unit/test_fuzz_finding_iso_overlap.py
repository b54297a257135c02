"""A finding of fuzz_session, fixed (UrbSession refuses iso packets that add up to more than the buffer).

An isochronous CMD_SUBMIT whose packet descriptors overlap - each packet inside the buffer, so
``IsoPackets.validate`` accepts them, but the lengths add up to more than
transfer_buffer_length - is answered with a RET_SUBMIT whose actual_length (the sum of the
packets' actual lengths, ``UrbSession._send_ret_submit``) exceeds transfer_buffer_length. For iso
IN the reply also carries that many data bytes, so a client decoder (ours, or vhci's
``usbip_recv_xbuff``: "recv xbuf ... size > transfer_buffer_length") rejects it and drops the
connection. Found by fuzz_session with the audio device (playback, iso OUT: actual_length 107
for a 96-byte URB); the loopback device's iso endpoints show it the same way.

Expected: the server refuses such an URB (-EINVAL, as for iso descriptors that do not fit) or
bounds actual_length by transfer_buffer_length.
"""

from __future__ import annotations

import struct

import pytest

from usbip.cli.device_spec import make_device
from usbip.pool import BufferPool
from usbip.protocol import Decoder, codec
from usbip.server.session import UrbSession
from usbip.virtual.testing import set_interface

TBL = 96
PACKETS = [(0, 24), (24, 24), (48, 35), (72, 24)]  # packet 2 overlaps packet 3: lengths add up to 107


def cmd_submit(devid: int, direction: int, ep: int) -> bytes:
    hdr = bytearray(48)
    codec.pack_cmd_submit(hdr, 0, 5, devid, direction, ep, 0, TBL, 0, len(PACKETS), 1, bytes(8))
    payload = bytes(range(TBL)) if direction == 0 else b""
    descs = b"".join(struct.pack(">IIIi", off, length, 0, 0) for off, length in PACKETS)
    return bytes(hdr) + payload + descs


@pytest.mark.parametrize("direction", [0, 1], ids=["iso-out", "iso-in"])
def test_ret_submit_actual_length_within_buffer(direction: int) -> None:
    dev = make_device("loopback")
    assert set_interface(dev, 0, 1) == 0  # alt 1 has the iso endpoints 0x03 / 0x83
    replies: list[bytes] = []
    session = UrbSession(dev, lambda bufs, n: replies.append(b"".join(bytes(b) for b in bufs)), BufferPool())
    session.handle(Decoder("server").feed(cmd_submit(dev.devid, direction, 3)))
    assert replies, "the loopback iso endpoints complete at once"
    ret = codec.unpack_header(replies[-1])
    assert isinstance(ret, codec.RetSubmit) and ret.seqnum == 5
    assert ret.status != 0 or ret.actual_length <= TBL, f"RET_SUBMIT actual_length {ret.actual_length} > {TBL}"
    client = Decoder("client")
    client.expect(5, TBL if direction else -1)
    client.feed(replies[-1])  # raises ProtocolError today for iso IN
