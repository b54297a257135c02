"""Every bound a receiver enforces raises ProtocolError saying what was wrong, before allocating."""

from __future__ import annotations

import struct
import time
import tracemalloc

import pytest

from usbip.protocol import records
from usbip.protocol.constants import DEVICE_RECORD_SIZE, MAX_DEVICES, OP_REQ_DEVLIST
from usbip.protocol.errors import ProtocolError


def header(*words: int, setup: bytes = bytes(8)) -> bytes:
    """A 48-byte URB header from ten 32-bit words (negative values as two's complement)."""
    assert len(words) == 10
    return b"".join((w & 0xFFFFFFFF).to_bytes(4, "big") for w in words) + setup


def cmd_submit(tbl: int = 0, np: int = 0, direction: int = 0, seq: int = 1) -> bytes:
    return header(1, seq, 0x10002, direction, 1, 0, tbl, 0, np, 0)


def ret_submit(seq: int = 1, actual: int = 0, np: int = 0, status: int = 0) -> bytes:
    return header(3, seq, 0, 0, 0, status, actual, 0, np, 0)


def iso(*packets: tuple[int, int, int, int]) -> bytes:
    return b"".join(struct.pack(">IIIi", *p) for p in packets)


def fails(dec, data: bytes, match: str) -> ProtocolError:
    with pytest.raises(ProtocolError, match=match) as info:
        dec.feed(data)
    assert dec.failed is info.value
    # the decoder stays failed: every later call raises the same error
    for call in (
        lambda: dec.feed(cmd_submit()),
        lambda: dec.feed(b""),
        lambda: dec.get_buffer(-1),
        lambda: dec.buffer_updated(0),
    ):
        with pytest.raises(ProtocolError) as again:
            call()
        assert again.value is info.value
    return info.value


# ------------------------------------------------------------------ server side
@pytest.mark.parametrize("tbl", [4097, 0x7FFFFFFF])
def test_transfer_buffer_length_over_max(codec, tbl: int) -> None:
    dec = codec.Decoder("server", max_transfer=4096)
    fails(dec, cmd_submit(tbl), rf"transfer_buffer_length {tbl} outside 0\.\.4096")


@pytest.mark.parametrize("tbl", [-1, -(2**31)])
def test_transfer_buffer_length_negative(codec, tbl: int) -> None:
    fails(codec.Decoder("server"), cmd_submit(tbl), rf"transfer_buffer_length {tbl} outside")


def test_transfer_buffer_length_at_max_is_accepted(codec) -> None:
    dec = codec.Decoder("server", max_transfer=4096)
    assert dec.feed(cmd_submit(4096) + bytes(4096))[0].transfer_buffer_length == 4096
    assert dec.feed(cmd_submit(4096, direction=1))[0].data is None


@pytest.mark.parametrize("np", [1025, 0x7FFFFFFF, -2, -(2**31)])
def test_number_of_packets_bounds_server(codec, np: int) -> None:
    fails(codec.Decoder("server"), cmd_submit(np=np), rf"number_of_packets {np} outside")


def test_number_of_packets_configured_limit(codec) -> None:
    dec = codec.Decoder("server", max_iso_packets=4)
    fails(dec, cmd_submit(tbl=80, np=5, direction=1), r"number_of_packets 5 outside 0\.\.4")


def test_number_of_packets_1024_accepted(codec) -> None:
    descs = iso(*[(0, 0, 0, 0)] * 1024)
    (msg,) = codec.Decoder("server").feed(cmd_submit(np=1024, direction=1) + descs)
    assert len(msg.iso) == 1024


@pytest.mark.parametrize("direction", [2, 0xFFFFFFFF, 0x80000000])
def test_direction_not_0_or_1(codec, direction: int) -> None:
    fails(codec.Decoder("server"), cmd_submit(direction=direction), rf"direction {direction} is neither 0 nor 1")


@pytest.mark.parametrize(
    ("packets", "match"),
    [
        ([(0, 8, 0, 0), (8, 9, 0, 0)], r"iso packet 1 \(8\+9\) overruns the 16-byte buffer"),
        ([(17, 0, 0, 0)], r"iso packet 0 \(17\+0\) overruns the 16-byte buffer"),
        ([(0xFFFFFFFF, 1, 0, 0)], r"iso packet 0 \(4294967295\+1\) overruns"),  # no 32-bit wrap-around
        ([(0, 8, 9, 0)], r"iso packet 0 actual_length 9 > length 8"),
    ],
)
def test_iso_descriptor_outside_buffer_server(codec, packets, match: str) -> None:
    fails(codec.Decoder("server"), cmd_submit(16, len(packets), direction=1) + iso(*packets), match)


def test_server_rejects_ret_commands(codec) -> None:
    fails(codec.Decoder("server"), ret_submit(), "a server does not accept command 3")
    fails(codec.Decoder("server"), header(4, 1, 0, 0, 0, 0, 0, 0, 0, 0), "a server does not accept command 4")


@pytest.mark.parametrize("role", ["server", "client"])
@pytest.mark.parametrize("command", [0, 5, 0x01000000, 0xFFFFFFFF])
def test_unknown_command(codec, role: str, command: int) -> None:
    fails(codec.Decoder(role), header(command, 1, 0, 0, 0, 0, 0, 0, 0, 0), f"unknown USB/IP command 0x{command:08x}")


# ------------------------------------------------------------------ client side
def test_client_rejects_cmd_commands(codec) -> None:
    fails(codec.Decoder("client"), cmd_submit(), "a client does not accept command 1")
    fails(codec.Decoder("client"), header(2, 1, 0, 0, 0, 5, 0, 0, 0, 0), "a client does not accept command 2")


def test_ret_submit_unknown_seqnum(codec) -> None:
    dec = codec.Decoder("client")
    dec.expect(1, 10)
    fails(dec, ret_submit(seq=2), "RET_SUBMIT for unknown seqnum 2")


def test_ret_submit_seqnum_is_used_once(codec) -> None:
    dec = codec.Decoder("client")
    dec.expect(1, 0)
    dec.feed(ret_submit(seq=1))
    fails(dec, ret_submit(seq=1), "unknown seqnum 1")


def test_forget(codec) -> None:
    dec = codec.Decoder("client")
    dec.expect(7, 0)
    dec.forget(7)
    dec.forget(8)  # unknown: no error
    fails(dec, ret_submit(seq=7), "unknown seqnum 7")


@pytest.mark.parametrize("actual", [65, 0x7FFFFFFF, -1])
def test_ret_submit_actual_length_over_expected_in_length(codec, actual: int) -> None:
    dec = codec.Decoder("client")
    dec.expect(1, 64)
    fails(dec, ret_submit(actual=actual), rf"actual_length {actual} outside 0\.\.64")


def test_ret_submit_out_actual_length_over_max_transfer(codec) -> None:
    dec = codec.Decoder("client", max_transfer=1000)
    dec.expect(1, -1)
    fails(dec, ret_submit(actual=1001), r"actual_length 1001 outside 0\.\.1000")


@pytest.mark.parametrize("np", [1025, -2])
def test_number_of_packets_bounds_client(codec, np: int) -> None:
    dec = codec.Decoder("client")
    dec.expect(1, 100)
    fails(dec, ret_submit(np=np), rf"number_of_packets {np} outside")


def test_iso_actual_sum_mismatch_client(codec) -> None:
    dec = codec.Decoder("client")
    dec.expect(1, 16)
    body = bytes(7) + iso((0, 8, 4, 0), (8, 8, 4, 0))
    fails(dec, ret_submit(actual=7, np=2) + body, "iso actual_lengths sum to 8, header says 7")


def test_iso_actual_over_length_client(codec) -> None:
    dec = codec.Decoder("client")
    dec.expect(1, 16)
    fails(dec, ret_submit(actual=9, np=1) + bytes(9) + iso((0, 8, 9, 0)), "iso packet 0 actual_length 9 > length 8")


def test_iso_outside_in_buffer_client(codec) -> None:
    dec = codec.Decoder("client")
    dec.expect(1, 16)
    fails(dec, ret_submit(actual=0, np=1) + iso((12, 8, 0, 0)), r"iso packet 0 \(12\+8\) overruns the 16-byte buffer")


# ------------------------------------------------------------------ no huge allocations
@pytest.mark.parametrize("role", ["server", "client"])
def test_huge_claims_raise_immediately_without_allocating(codec, role: str) -> None:
    claims = (
        [cmd_submit(tbl=0x80000000), cmd_submit(tbl=0x7FFFFFFF), cmd_submit(np=0x7FFFFFFF), cmd_submit(np=0x80000000)]
        if role == "server"
        else [ret_submit(actual=0x7FFFFFFF), ret_submit(actual=0x80000000), ret_submit(np=0x7FFFFFFF)]
    )
    for claim in claims:
        dec = codec.Decoder(role)
        dec.expect(1, -1)
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            with pytest.raises(ProtocolError):
                dec.feed(claim)  # the header alone must be enough to reject it
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert time.perf_counter() - t0 < 0.5
        assert peak < 4 << 20, f"{peak} bytes allocated for a rejected header"


def test_header_at_limit_allocates_only_what_is_allowed(codec) -> None:
    dec = codec.Decoder("server", max_transfer=1 << 20)
    assert dec.feed(cmd_submit(tbl=1 << 20)) == []
    view = dec.get_buffer(-1)
    assert len(view) >= 1 << 20
    assert len(view) < 2 << 20  # sized for this message, not for a bigger claim


# ------------------------------------------------------------------ direct API bounds
def test_iso_packets_api_bounds(codec) -> None:
    with pytest.raises(ProtocolError, match=r"number_of_packets 1025 outside 0\.\.1024"):
        codec.IsoPackets.unpack(bytes(16 * 1025), 0, 1025)
    with pytest.raises(ProtocolError, match="iso packet descriptors truncated"):
        codec.IsoPackets.unpack(bytes(31), 0, 2)
    with pytest.raises(ValueError, match="negative offset"):
        codec.IsoPackets.unpack(bytes(64), -16, 1)
    with pytest.raises(ValueError):
        codec.IsoPackets(1025)
    with pytest.raises(ValueError):
        codec.IsoPackets(-1)
    p = codec.IsoPackets.layout(2, 8)
    with pytest.raises(ValueError, match=r"actual_length 9 outside 0\.\.8"):
        p.set_result(0, 9)
    with pytest.raises(ProtocolError, match="iso actual_lengths sum to 0, header says 1"):
        p.spread(bytearray(16), 1)
    p.set_result(1, 8)
    with pytest.raises(ProtocolError, match="iso data larger than the buffer"):
        p.spread(bytearray(4), 8)
    with pytest.raises(ValueError, match="iso packet outside the buffer"):
        p.gather(bytes(15), bytearray(16))
    with pytest.raises(ValueError, match="iso packet outside the buffer"):
        p.gather(bytes(16), bytearray(7))


def test_unpack_header_bounds(codec) -> None:
    with pytest.raises(ProtocolError, match="URB header needs 48 bytes, got 47"):
        codec.unpack_header(bytes(47))
    with pytest.raises(ProtocolError, match="URB header needs 48 bytes, got 40"):
        codec.unpack_header(cmd_submit(), 8)
    with pytest.raises(ValueError, match="negative offset"):
        codec.unpack_header(cmd_submit() * 2, -48)


def test_pack_into_short_buffer_raises(codec) -> None:
    with pytest.raises((ValueError, struct.error)):
        codec.pack_ret_unlink(bytearray(47), 0, 1, 0)
    with pytest.raises((ValueError, struct.error)):
        codec.pack_cmd_submit(bytearray(60), 13, 1, 2, 0, 1, 0, 0)
    with pytest.raises(ValueError, match="setup packet must be 8 bytes"):
        codec.pack_cmd_submit(bytearray(48), 0, 1, 2, 0, 1, 0, 0, 0, 0, 0, b"short")


def test_decoder_api_misuse(codec) -> None:
    with pytest.raises(ValueError, match="role"):
        codec.Decoder("proxy")
    dec = codec.Decoder("server")
    n = len(dec.get_buffer(-1))
    with pytest.raises(ValueError, match="beyond the buffer"):
        dec.buffer_updated(n + 1)
    with pytest.raises(ValueError, match="beyond the buffer"):
        dec.buffer_updated(-1)
    assert dec.failed is None  # misuse is not a protocol failure


# ------------------------------------------------------------------ op-phase records
def _record(path: bytes = b"/sys/x", busid: bytes = b"1-1") -> bytes:
    return (
        path.ljust(256, b"\0")[:256]
        + busid.ljust(32, b"\0")[:32]
        + struct.pack(">IIIHHHBBBBBB", 1, 2, 3, 0x1234, 0x5678, 0x100, 0, 0, 0, 1, 1, 1)
    )


def test_device_count_over_limit() -> None:
    with pytest.raises(ProtocolError, match=f"device list claims {MAX_DEVICES + 1} devices"):
        records.unpack_devlist_count((MAX_DEVICES + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match=r"claims 4294967295 devices \(limit 4096\)"):
        records.unpack_devlist_count(b"\xff\xff\xff\xff")
    with pytest.raises(ProtocolError, match=r"claims 3 devices \(limit 2\)"):
        records.unpack_devlist_count(b"\0\0\0\3", max_devices=2)
    assert records.unpack_devlist_count(MAX_DEVICES.to_bytes(4, "big")) == MAX_DEVICES


def test_device_count_truncated() -> None:
    with pytest.raises(ProtocolError, match="device count needs 4 bytes, got 3"):
        records.unpack_devlist_count(b"\0\0\1")


def test_busid_and_path_must_be_nul_terminated() -> None:
    assert records.DeviceRecord.unpack(_record()).busid == "1-1"
    with pytest.raises(ProtocolError, match="busid is not NUL-terminated within 32 bytes"):
        records.DeviceRecord.unpack(_record(busid=b"x" * 32))
    with pytest.raises(ProtocolError, match="path is not NUL-terminated within 256 bytes"):
        records.DeviceRecord.unpack(_record(path=b"p" * 256))
    with pytest.raises(ProtocolError, match="busid is not NUL-terminated"):
        records.unpack_import_busid(b"y" * 32)
    with pytest.raises(ProtocolError, match="not valid UTF-8"):
        records.DeviceRecord.unpack(_record(busid=b"\xff\xfe"))


def test_truncated_records() -> None:
    with pytest.raises(ProtocolError, match=f"device record needs {DEVICE_RECORD_SIZE} bytes, got 311"):
        records.DeviceRecord.unpack(_record()[:311])
    with pytest.raises(ProtocolError, match="interface records truncated"):
        records.unpack_interfaces(bytes(7), 2)
    with pytest.raises(ProtocolError, match="op header needs 8 bytes, got 7"):
        records.unpack_op_header(bytes(7))
    with pytest.raises(ProtocolError, match="import request needs a 32-byte busid, got 31"):
        records.unpack_import_busid(bytes(31))


@pytest.mark.parametrize("version", [0x0000, 0x0100, 0x0110, 0x0112, 0x1101, 0xFFFF])
def test_wrong_op_version(version: int) -> None:
    raw = struct.pack(">HHI", version, OP_REQ_DEVLIST, 0)
    with pytest.raises(ProtocolError, match=f"unsupported protocol version 0x{version:04x}"):
        records.unpack_op_header(raw)


def test_record_encoding_bounds() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        records.pack_import_request("b" * 32)
    dev = records.DeviceRecord.unpack(_record())
    with pytest.raises(ValueError, match="bNumInterfaces"):
        dev.pack(with_interfaces=True)  # 1 declared, 0 given


def test_every_error_cyusbip_raises_has_one_root() -> None:
    import asyncio

    import usbip
    from usbip.backends.usbdev import EnumerationError
    from usbip.cli.config import ConfigError
    from usbip.client import BadReply, Disconnected, ImportRefused, Timeout, TlsFailed, TransferError, UsbipError
    from usbip.net.netio import PeerClosed
    from usbip.net.tls import TlsError
    from usbip.vhci.driver import VhciError
    from usbip.virtual.framework import UsbError

    for cls in (usbip.ProtocolError, UsbipError, BadReply, Disconnected, ImportRefused, Timeout, TlsFailed,
                TransferError, PeerClosed, TlsError, VhciError, EnumerationError, ConfigError, UsbError):  # fmt: skip
        assert issubclass(cls, usbip.CyusbipError), cls
    # and each keeps the builtin kind callers may catch
    assert issubclass(Timeout, asyncio.TimeoutError) and issubclass(VhciError, OSError)
    assert issubclass(PeerClosed, ConnectionError) and issubclass(ConfigError, ValueError)
