"""A finding of fuzz_session, fixed (UrbSession refuses endpoint numbers above 15 before its cache).

CMD_SUBMIT's ep field is 32 bits. The compiled URB session keys its endpoint cache with
``ep << 1 | direction`` in 32-bit arithmetic, so ep 0x80000001 IN wrapped to the key of endpoint
1 IN: the URB was taken for one on the loopback's bulk IN endpoint and handed to the device,
whose dispatch table then failed on the real number (an IndexError logged as a device failure);
a libusb device would have been asked for a transfer on an endpoint the client never named.
The kernel's stub refuses any endpoint number above 15 (stub_rx.c ``get_pipe``).

Expected, on both builds: such an URB is refused (-ENOENT, as for any endpoint the device does
not have), the device never sees it, nothing is logged as an error, and the endpoint it would
have aliased keeps working.
"""

from __future__ import annotations

import logging

import pytest

from usbip.cli.device_spec import make_device
from usbip.pool import BufferPool
from usbip.protocol import Decoder, codec
from usbip.protocol.constants import ENOENT
from usbip.server.session import UrbSession


def cmd_submit(seqnum: int, devid: int, ep: int, length: int = 64) -> bytes:
    hdr = bytearray(48)
    codec.pack_cmd_submit(hdr, 0, seqnum, devid, 1, ep, 0, length, 0, 0, 0, bytes(8))
    return bytes(hdr)


@pytest.mark.parametrize("ep", [0x80000001, 0x10, 0xFFFFFFFF, 1 << 31])
def test_endpoint_numbers_above_15_are_refused(ep: int, caplog: pytest.LogCaptureFixture) -> None:
    dev = make_device("loopback")
    seen: list[int] = []
    submit = dev.submit
    dev.submit = lambda urb: (seen.append(urb.ep), submit(urb))[1]  # type: ignore[method-assign]
    replies: list[bytes] = []
    session = UrbSession(dev, lambda bufs, n: replies.append(b"".join(bytes(b) for b in bufs)), BufferPool())
    decoder = Decoder("server")
    with caplog.at_level(logging.ERROR):
        session.handle(decoder.feed(cmd_submit(1, dev.devid, 1)))  # endpoint 1 IN: cached
        session.handle(decoder.feed(cmd_submit(2, dev.devid, ep)))
        session.handle(decoder.feed(cmd_submit(3, dev.devid, 1)))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert seen == [1, 1], "only the URBs for endpoint 1 reach the device"
    rets = {r.seqnum: r for r in (codec.unpack_header(b[:48]) for b in replies)}
    assert rets[2].status == ENOENT and rets[2].actual_length == 0
    assert rets[1].status == 0 and rets[3].status == 0
