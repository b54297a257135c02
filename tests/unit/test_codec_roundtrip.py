"""Round trips pack -> Decoder for every message, under every fragmentation of the stream."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Spec, encode_stream, fixed_stream, iso_bytes, make_decoder, streams

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROLES = ["server", "client"]


def fields(msgs) -> list[tuple]:
    return [m.fields() for m in msgs]


def feed_chunks(dec, data: bytes, cuts) -> list[tuple]:
    out, prev = [], 0
    for cut in [*cuts, len(data)]:
        out += fields(dec.feed(data[prev:cut]))
        prev = cut
    return out


def feed_buffered(dec, data: bytes, sizehint: int, hold: bool = False) -> list[tuple]:
    """asyncio.BufferedProtocol style: get_buffer(sizehint), write <= sizehint bytes, buffer_updated."""
    out, pos = [], 0
    while pos < len(data):
        view = dec.get_buffer(sizehint)
        assert len(view) > 0
        n = min(len(view), sizehint, len(data) - pos)
        view[:n] = data[pos : pos + n]
        if not hold:  # asyncio keeps its local reference during buffer_updated; test both
            del view
        out += fields(dec.buffer_updated(n))
        pos += n
    return out


# ------------------------------------------------------------------ random streams
@pytest.mark.parametrize("role", ROLES)
@SETTINGS
@given(data=st.data())
def test_roundtrip_random_stream(codec, role: str, data) -> None:
    specs: list[Spec] = data.draw(streams(role))
    wire = encode_stream(codec, specs)
    expected = [s.fields for s in specs]
    dec = make_decoder(codec, role, specs)
    assert fields(dec.feed(wire)) == expected
    assert dec.buffered == 0 and dec.failed is None
    # and split at random points
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    assert feed_chunks(make_decoder(codec, role, specs), wire, cuts) == expected
    hint = data.draw(st.integers(1, 100))
    assert feed_buffered(make_decoder(codec, role, specs), wire, hint, hold=data.draw(st.booleans())) == expected


@pytest.mark.parametrize("role", ROLES)
@SETTINGS
@given(data=st.data())
def test_unpack_header_roundtrip(codec, role: str, data) -> None:
    (spec,) = data.draw(streams(role, 1, 1))
    wire = spec.encode(codec)
    offset = data.draw(st.integers(0, 9))
    hdr = codec.unpack_header(b"\x55" * offset + wire, offset)
    n = 11 if spec.kind == "cmd_submit" else 10 if spec.kind == "ret_submit" else 6
    assert hdr.fields()[:n] == spec.fields[:n]
    # re-encoding the decoded header gives the same 48 bytes
    buf = bytearray(48)
    args = hdr.fields()[1:n]
    if spec.kind == "cmd_submit":
        codec.pack_cmd_submit(buf, 0, *args)
    elif spec.kind == "ret_submit":
        seq, devid, direction, ep, *rest = args
        codec.pack_ret_submit(buf, 0, seq, *rest, devid, direction, ep)
    elif spec.kind == "cmd_unlink":
        codec.pack_cmd_unlink(buf, 0, *args)
    else:
        seq, devid, direction, ep, status = args
        codec.pack_ret_unlink(buf, 0, seq, status, devid, direction, ep)
    assert bytes(buf) == wire[:48]


def test_message_constructors_and_fields(codec) -> None:
    m = codec.CmdSubmit(1, 2, 1, 3, 4, 5, 6, 7, 8, b"abcdefgh")
    assert m.fields() == (1, 1, 2, 1, 3, 4, 5, 6, 7, 8, b"abcdefgh", None, None)
    assert "CmdSubmit" in repr(m)
    r = codec.RetSubmit(9, -1, 5, data=b"hello", iso=codec.IsoPackets.layout(1, 5))
    assert r.fields() == (3, 9, 0, 0, 0, -1, 5, 0, 0, 0, b"hello", iso_bytes([(0, 5, 0, 0)]))
    assert codec.CmdUnlink(1, 2, 0, 0, 7).fields() == (2, 1, 2, 0, 0, 7)
    assert codec.RetUnlink(1, -104).fields() == (4, 1, 0, 0, 0, -104)
    assert (codec.CmdSubmit.command, codec.CmdUnlink.command, codec.RetSubmit.command, codec.RetUnlink.command) == (
        1,
        2,
        3,
        4,
    )


# ------------------------------------------------------------------ fragmentation
@pytest.mark.parametrize("role", ROLES)
def test_split_at_every_byte_boundary(codec, role: str) -> None:
    specs = fixed_stream(role)
    wire = encode_stream(codec, specs)
    expected = [s.fields for s in specs]
    for i in range(len(wire) + 1):
        dec = make_decoder(codec, role, specs)
        first = fields(dec.feed(wire[:i]))
        rest = fields(dec.feed(wire[i:]))
        assert first + rest == expected, f"split at {i}"
        # everything complete in the first part was already delivered
        assert first == expected[: len(first)]


@pytest.mark.parametrize("role", ROLES)
def test_one_byte_at_a_time(codec, role: str) -> None:
    specs = fixed_stream(role)
    wire = encode_stream(codec, specs)
    dec = make_decoder(codec, role, specs)
    got = []
    ends = []
    for i in range(len(wire)):
        msgs = dec.feed(wire[i : i + 1])
        got += fields(msgs)
        ends += [i + 1] * len(msgs)
    assert got == [s.fields for s in specs]
    # each message came out exactly when its last byte arrived
    sizes = [len(s.encode(codec)) for s in specs]
    assert ends == [sum(sizes[: k + 1]) for k in range(len(sizes))]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("sizehint", [1, 2, 3, 7, 16, 47, 48, 49, 100, 4096])
@pytest.mark.parametrize("hold", [False, True], ids=["drop", "hold"])
def test_get_buffer_small_sizehints(codec, role: str, sizehint: int, hold: bool) -> None:
    specs = fixed_stream(role)
    wire = encode_stream(codec, specs)
    dec = make_decoder(codec, role, specs)
    assert feed_buffered(dec, wire, sizehint, hold) == [s.fields for s in specs]
    assert dec.buffered == 0


@pytest.mark.parametrize("role", ROLES)
def test_many_messages_in_one_feed_and_memoryview_input(codec, role: str) -> None:
    specs = fixed_stream(role)
    wire = encode_stream(codec, specs)
    dec = make_decoder(codec, role, specs)
    assert fields(dec.feed(memoryview(bytearray(wire)))) == [s.fields for s in specs]
    assert dec.feed(b"") == []


# ------------------------------------------------------------------ large payloads and view lifetime
@pytest.mark.parametrize("chunk", [1 << 20, 65536, 1000])
def test_large_out_payload(codec, chunk: int) -> None:
    size = 1 << 20
    payload = bytes(range(256)) * (size // 256)
    buf = bytearray(48)
    codec.pack_cmd_submit(buf, 0, 77, 0x10002, 0, 1, 0, size)
    wire = bytes(buf) + payload
    wire += wire[:48]  # and a header of the next message
    dec = codec.Decoder("server")
    msgs = []
    for pos in range(0, len(wire), chunk):
        msgs += dec.feed(wire[pos : pos + chunk])
    assert len(msgs) == 1
    (m,) = msgs
    assert m.transfer_buffer_length == size and len(m.data) == size
    assert m.data == payload
    # the second (incomplete) message is still buffered
    assert dec.buffered == 48


def test_large_in_payload_client(codec) -> None:
    size = 3 * (1 << 19) + 17  # 1.5 MiB + 17 > 256 KiB chunk
    payload = bytes((i * 7) & 0xFF for i in range(size))
    buf = bytearray(48)
    codec.pack_ret_submit(buf, 0, 5, 0, size)
    dec = codec.Decoder("client")
    dec.expect(5, size)
    got = feed_buffered(dec, bytes(buf) + payload, 65536)
    assert got == [(3, 5, 0, 0, 0, 0, size, 0, 0, 0, payload, None)]


def _bulk_out(codec, seq: int, payload: bytes) -> bytes:
    buf = bytearray(48)
    codec.pack_cmd_submit(buf, 0, seq, 1, 0, 2, 0, len(payload))
    return bytes(buf) + payload


@pytest.mark.parametrize("mode", ["feed", "get_buffer"])
def test_payload_views_stay_valid(codec, mode: str) -> None:
    """Held payload views must never be overwritten by later input (buffers are reused only when free)."""
    dec = codec.Decoder("server")
    held = []  # (view, expected bytes)
    sizes = [1, 100, 4000, 20000, 70000, 300000]
    seq = 0
    for rnd in range(60):
        wire = b""
        for k, size in enumerate(sizes):
            seq += 1
            payload = bytes([(seq + k) & 0xFF]) * size
            wire += _bulk_out(codec, seq, payload)
        if mode == "feed":
            msgs = []
            step = 12345
            for pos in range(0, len(wire), step):
                msgs += dec.feed(wire[pos : pos + step])
        else:
            msgs, pos = [], 0
            while pos < len(wire):
                view = dec.get_buffer(9000)
                n = min(len(view), 9000, len(wire) - pos)
                view[:n] = wire[pos : pos + n]
                del view
                msgs += dec.buffer_updated(n)
                pos += n
        assert len(msgs) == len(sizes)
        for k, (m, size) in enumerate(zip(msgs, sizes, strict=True)):
            assert m.data == bytes([(m.seqnum + k) & 0xFF]) * size
        if rnd % 3 == 0:  # hold every third round's payloads, drop the rest so buffers get reused
            held += [(m.data, bytes(m.data)) for m in msgs]
        del msgs
        # all held views still carry their bytes after all the feeding
        for view, copy in held:
            assert view == copy
    for view, copy in held:
        assert bytes(view) == copy
        assert len(set(copy)) == 1
