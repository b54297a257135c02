"""Compiled vs pure codec: identical bytes, identical decoded fields, identical errors.

Random valid streams are encoded by both twins (bytes must match), then randomly corrupted
(bytes flipped, inserted, deleted) and fed to both decoders in the same chunks; the outputs
must match chunk by chunk until and including the first ProtocolError, after which both
stay failed with the same message.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import S32, U32, encode_stream, iso_layout, make_decoder, streams

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROLES = ["server", "client"]


def run(dec, chunks: list[bytes], error_type) -> list:
    """Feed chunks; record each chunk's messages, or the error that stopped the decoder."""
    out: list = []
    for chunk in chunks:
        try:
            out.append([m.fields() for m in dec.feed(chunk)])
        except error_type as exc:
            out.append(("error", type(exc).__name__, str(exc)))
            break
    return out


def assert_same_state(py, cy) -> None:
    assert (py.failed is None) == (cy.failed is None)
    if py.failed is not None:
        assert str(py.failed) == str(cy.failed)
        # the failed state sticks, with the same error, on both
        for dec in (py, cy):
            with pytest.raises(type(dec.failed)) as info:
                dec.feed(b"\0" * 48)
            assert str(info.value) == str(dec.failed)
            with pytest.raises(type(dec.failed)):
                dec.get_buffer(-1)
    else:
        assert py.buffered == cy.buffered


@st.composite
def corrupt(draw, wire: bytes) -> bytes:
    data = bytearray(wire)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "flip", "set", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


@st.composite
def chunking(draw, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    out, prev = [], 0
    for c in [*cuts, len(data)]:
        out.append(data[prev:c])
        prev = c
    return out


@pytest.mark.parametrize("role", ROLES)
@SETTINGS
@given(data=st.data())
def test_encoders_agree_and_decoders_agree_on_valid_streams(py_codec, cy_codec, role: str, data) -> None:
    from usbip.protocol.errors import ProtocolError

    specs = data.draw(streams(role))
    wire = encode_stream(py_codec, specs)
    assert encode_stream(cy_codec, specs) == wire
    chunks = data.draw(chunking(wire))
    py = make_decoder(py_codec, role, specs)
    cy = make_decoder(cy_codec, role, specs)
    a, b = run(py, chunks, ProtocolError), run(cy, chunks, ProtocolError)
    assert a == b
    assert [f for chunk in a for f in chunk] == [s.fields for s in specs]
    assert_same_state(py, cy)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("max_transfer", [65536, 16 << 20])
@SETTINGS
@given(data=st.data())
def test_decoders_agree_on_corrupted_streams(py_codec, cy_codec, role: str, max_transfer: int, data) -> None:
    from usbip.protocol.errors import ProtocolError

    specs = data.draw(streams(role))
    wire = data.draw(corrupt(encode_stream(py_codec, specs)))
    chunks = data.draw(chunking(wire))
    max_iso = data.draw(st.sampled_from([1024, 4]))
    py = make_decoder(py_codec, role, specs, max_transfer=max_transfer, max_iso_packets=max_iso)
    cy = make_decoder(cy_codec, role, specs, max_transfer=max_transfer, max_iso_packets=max_iso)
    # anything but ProtocolError escaping is a bug in itself: let it propagate
    assert run(py, chunks, ProtocolError) == run(cy, chunks, ProtocolError)
    assert_same_state(py, cy)


@pytest.mark.parametrize("role", ROLES)
@SETTINGS
@given(data=st.data())
def test_decoders_agree_on_random_bytes(py_codec, cy_codec, role: str, data) -> None:
    from usbip.protocol.errors import ProtocolError

    # random headers whose command word is mostly valid, so the bounds checks get exercised
    parts = []
    for _ in range(data.draw(st.integers(1, 4))):
        cmd = data.draw(st.sampled_from([1, 2, 3, 4]) | U32)
        words = data.draw(st.lists(U32 | st.integers(0, 64) | st.just(0xFFFFFFFF), min_size=9, max_size=9))
        parts.append(b"".join(w.to_bytes(4, "big") for w in [cmd, *words]))
        parts.append(data.draw(st.binary(max_size=80)))
    wire = b"".join(parts)
    expects = data.draw(st.lists(st.tuples(st.integers(0, 64), st.integers(-1, 200)), max_size=8))
    chunks = data.draw(chunking(wire))
    decs = []
    for codec in (py_codec, cy_codec):
        dec = codec.Decoder(role, max_transfer=4096)
        for seq, length in expects:
            dec.expect(seq, length)
        decs.append(dec)
    assert run(decs[0], chunks, ProtocolError) == run(decs[1], chunks, ProtocolError)
    assert_same_state(*decs)


@SETTINGS
@given(
    words=st.lists(U32, min_size=10, max_size=10),
    setup=st.binary(min_size=8, max_size=8),
    offset=st.integers(0, 16),
)
def test_unpack_header_agrees(py_codec, cy_codec, words, setup, offset) -> None:
    from usbip.protocol.errors import ProtocolError

    words[0] = words[0] % 6  # commands 0..5: four valid, two unknown
    raw = b"\xaa" * offset + b"".join(w.to_bytes(4, "big") for w in words) + setup
    results = []
    for codec in (py_codec, cy_codec):
        try:
            results.append(codec.unpack_header(raw, offset).fields())
        except ProtocolError as exc:
            results.append(str(exc))
    assert results[0] == results[1]
    # truncated input: same message
    msgs = []
    for codec in (py_codec, cy_codec):
        with pytest.raises(ProtocolError) as info:
            codec.unpack_header(raw[: offset + 47], offset)
        msgs.append(str(info.value))
    assert msgs[0] == msgs[1]


@SETTINGS
@given(
    seq=U32,
    devid=U32,
    direction=U32,
    ep=U32,
    flags=U32,
    tbl=S32,
    sf=S32,
    np=S32,
    interval=S32,
    status=S32,
    setup=st.binary(min_size=8, max_size=8),
    offset=st.integers(0, 8),
)
def test_encoders_agree(
    py_codec, cy_codec, seq, devid, direction, ep, flags, tbl, sf, np, interval, status, setup, offset
) -> None:
    outs = []
    for codec in (py_codec, cy_codec):
        buf = bytearray(b"\x5a" * (offset + 48 * 4 + 3))
        end = codec.pack_cmd_submit(buf, offset, seq, devid, direction, ep, flags, tbl, sf, np, interval, setup)
        end = codec.pack_ret_submit(buf, end, seq, status, tbl, sf, np, interval, devid, direction, ep)
        end = codec.pack_cmd_unlink(buf, end, seq, devid, direction, ep, flags)
        end = codec.pack_ret_unlink(buf, end, seq, status, devid, direction, ep)
        assert end == offset + 4 * 48
        outs.append(bytes(buf))
    assert outs[0] == outs[1]


# ------------------------------------------------------------------ iso descriptors
iso_tuple = st.tuples(st.integers(0, 80), st.integers(0, 40), st.integers(0, 40), st.sampled_from([0, -18]) | S32)


@SETTINGS
@given(packets=st.lists(iso_tuple, max_size=12), src=st.binary(max_size=120), dstlen=st.integers(0, 120))
def test_iso_gather_agrees(py_codec, cy_codec, packets, src, dstlen) -> None:
    results = []
    for codec in (py_codec, cy_codec):
        iso = codec.IsoPackets.from_list(packets)
        dst = bytearray(b"\xcc" * dstlen)
        try:
            n = iso.gather(src, dst)
        except ValueError as exc:
            n = str(exc)
        results.append((n, bytes(dst), iso.tolist(), iso.to_bytes(), iso.total_actual(), iso.error_count()))
    assert results[0] == results[1]


@SETTINGS
@given(
    packets=st.lists(iso_tuple, max_size=12),
    buf=st.binary(max_size=120),
    delta=st.sampled_from([0, 0, 0, -1, 1, -1000]),
)
def test_iso_spread_agrees_on_anything(py_codec, cy_codec, packets, buf, delta) -> None:
    from usbip.protocol.errors import ProtocolError

    results = []
    for codec in (py_codec, cy_codec):
        iso = codec.IsoPackets.from_list(packets)
        b = bytearray(buf)
        try:
            iso.spread(b, iso.total_actual() + delta)
            err = None
        except ProtocolError as exc:
            err = str(exc)
        results.append((err, bytes(b)))
    assert results[0] == results[1]


@SETTINGS
@given(
    packets=st.lists(iso_tuple, max_size=12), buffer_length=st.integers(0, 200), actual=st.none() | st.integers(0, 300)
)
def test_iso_validate_agrees(py_codec, cy_codec, packets, buffer_length, actual) -> None:
    from usbip.protocol.errors import ProtocolError

    results = []
    for codec in (py_codec, cy_codec):
        try:
            codec.IsoPackets.from_list(packets).validate(buffer_length, actual)
            results.append(None)
        except ProtocolError as exc:
            results.append(str(exc))
    assert results[0] == results[1]


@SETTINGS
@given(data=st.data())
def test_iso_spread_restores_gathered_packets(codec, data) -> None:
    """spread(gather(x)) puts each packet's actual bytes back at its offset (usbip_pad_iso)."""
    packets, buflen = data.draw(iso_layout(max_packets=32, max_size=64))
    x = data.draw(st.binary(min_size=buflen, max_size=buflen))
    iso = codec.IsoPackets.from_list(packets)
    packed = bytearray(buflen)
    total = iso.gather(x, packed)
    assert total == iso.total_actual() == sum(p[2] for p in packets)
    # the packed form is the packets' actual bytes back to back
    assert bytes(packed[:total]) == b"".join(x[o : o + a] for o, _l, a, _s in packets)
    buf = bytearray(packed)  # bytes after `total` are leftovers, as in a receive buffer
    iso.spread(buf, total)
    for off, _length, actual, _status in packets:
        assert buf[off : off + actual] == x[off : off + actual]
    # and unpack(pack) is the identity on descriptors
    raw = bytearray(3 + 16 * len(packets))
    assert iso.pack_into(raw, 3) == len(raw)
    assert codec.IsoPackets.unpack(raw, 3, len(packets)) == iso
