"""Helpers to drive a device directly with :class:`~usbip.usb.device.Urb` objects (tests, tools).

IN buffers are pre-filled with junk (0xA5) because the server's buffers have
undefined contents; OUT data is handed over as a read-only memoryview.
"""

from __future__ import annotations

import itertools
import struct
from typing import Any

from ..protocol.constants import USBIP_DIR_IN, USBIP_DIR_OUT
from ..usb.device import Device, Urb

_seq = itertools.count(1)
JUNK = 0xA5


def setup_packet(request_type: int, request: int, value: int = 0, index: int = 0, length: int = 0) -> bytes:
    return struct.pack("<BBHHH", request_type, request, value, index, length)


def in_urb(ep: int, length: int, **kw: Any) -> Urb:
    return Urb(next(_seq), ep, USBIP_DIR_IN, length, bytearray([JUNK]) * length, **kw)


def out_urb(ep: int, data: bytes, **kw: Any) -> Urb:
    return Urb(next(_seq), ep, USBIP_DIR_OUT, len(data), memoryview(bytes(data)), **kw)


def result(urb: Urb) -> tuple[int, bytes]:
    """(status, data) of a completed IN URB (data: the first actual_length bytes)."""
    assert urb.done, f"{urb!r} has not completed"
    return urb.status, bytes(memoryview(urb.buffer)[: urb.actual_length])


def control(
    dev: Device, request_type: int, request: int, value: int = 0, index: int = 0, length: int = 0, data: bytes = b""
) -> tuple[int, bytes]:
    """Run one control transfer to completion: (status, IN data or b"")."""
    setup = setup_packet(request_type, request, value, index, length if request_type & 0x80 else len(data))
    urb = in_urb(0, length, setup=setup) if request_type & 0x80 else out_urb(0, data, setup=setup)
    dev.submit(urb)
    assert urb.done, "control transfer did not complete synchronously"
    if request_type & 0x80:
        return result(urb)
    return urb.status, b""


def get_descriptor(dev: Device, dtype: int, index: int = 0, length: int = 255, lang: int = 0) -> tuple[int, bytes]:
    return control(dev, 0x80, 0x06, (dtype << 8) | index, lang, length)


def set_configuration(dev: Device, value: int = 1) -> int:
    return control(dev, 0x00, 0x09, value)[0]


def set_interface(dev: Device, interface: int, alternate: int) -> int:
    return control(dev, 0x01, 0x0B, alternate, interface)[0]


def clear_halt(dev: Device, address: int) -> int:
    return control(dev, 0x02, 0x01, 0, address)[0]


def bulk_in(dev: Device, ep: int, length: int, **kw: Any) -> Urb:
    urb = in_urb(ep, length, **kw)
    dev.submit(urb)
    return urb


def bulk_out(dev: Device, ep: int, data: bytes, **kw: Any) -> Urb:
    urb = out_urb(ep, data, **kw)
    dev.submit(urb)
    return urb


CBW = struct.Struct("<IIIBBB16s")
CSW = struct.Struct("<IIIB")


class BotHost:
    """A minimal Bulk-Only Transport host: CBW, data stage, CSW (with stall handling)."""

    def __init__(self, dev: Device, ep_in: int = 1, ep_out: int = 2, chunk: int = 120 * 1024) -> None:
        self.dev = dev
        self.ep_in = ep_in
        self.ep_out = ep_out
        self.chunk = chunk
        self.tag = 0
        self.stalls: list[int] = []

    def cbw(self, cdb: bytes, length: int, direction_in: bool, lun: int = 0) -> bytes:
        self.tag += 1
        flags = 0x80 if direction_in else 0
        return CBW.pack(0x43425355, self.tag, length, flags, lun, len(cdb), cdb.ljust(16, b"\0"))

    def command(
        self, cdb: bytes, data_in: int = 0, data_out: bytes | None = None, chunk: int | None = None
    ) -> tuple[int, int, bytes]:
        """Run one command: (CSW status, residue, data read)."""
        chunk = chunk or self.chunk
        length = data_in if data_out is None else len(data_out)
        urb = bulk_out(self.dev, self.ep_out, self.cbw(cdb, length, data_out is None))
        assert urb.status == 0, f"CBW failed: {urb.status}"
        got = bytearray()
        if data_out is None and data_in:
            pos = 0
            while pos < data_in:
                n = min(chunk, data_in - pos)
                u = bulk_in(self.dev, self.ep_in, n)
                assert u.done
                if u.status == -32:  # stall: clear it, go to the status stage
                    self.stalls.append(self.ep_in | 0x80)
                    assert clear_halt(self.dev, 0x80 | self.ep_in) == 0
                    break
                assert u.status in (0, -121), u.status
                got += result(u)[1]
                pos += u.actual_length
                if u.actual_length < n:
                    break
        elif data_out:
            pos = 0
            while pos < len(data_out):
                u = bulk_out(self.dev, self.ep_out, data_out[pos : pos + chunk])
                assert u.done
                if u.status == -32:
                    self.stalls.append(self.ep_out)
                    assert clear_halt(self.dev, self.ep_out) == 0
                    break
                assert u.status == 0
                pos += u.actual_length
        return (*self.csw(), bytes(got))

    def csw(self) -> tuple[int, int]:
        u = bulk_in(self.dev, self.ep_in, 13)
        if u.status == -32:
            self.stalls.append(self.ep_in | 0x80)
            assert clear_halt(self.dev, 0x80 | self.ep_in) == 0
            u = bulk_in(self.dev, self.ep_in, 13)
        status, data = result(u)
        assert status == 0 and len(data) == 13, (status, data)
        sig, tag, residue, st = CSW.unpack(data)
        assert sig == 0x53425355 and tag == self.tag
        return st, residue

    def request_sense(self) -> tuple[int, int, int]:
        st, _res, data = self.command(bytes((0x03, 0, 0, 0, 18, 0)), 18)
        assert st == 0 and data[0] == 0x70
        return data[2] & 0x0F, data[12], data[13]
