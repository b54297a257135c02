"""Codec benchmarks, each run against the pure and the compiled twin in the same session.

    python3 -m pytest benchmarks/test_codec.py --benchmark-only -q

Groups are named after the operation; ``benchmarks/conftest.py`` prints pure/compiled
ratios per group at the end and stores them in each benchmark's ``extra_info``.
"""

from __future__ import annotations

import functools

SETUP = bytes.fromhex("8006000100001200")
N_STREAM = 10_000
STREAM_PAYLOAD = 512
FEED_CHUNK = 64 * 1024


def bench(benchmark, fn, iterations: int = 1000, rounds: int = 100):
    """Time ``iterations`` calls per round so the timer's own cost (~50 ns) is amortized."""
    return benchmark.pedantic(fn, iterations=iterations, rounds=rounds, warmup_rounds=2)


def test_cmd_submit_header(benchmark, codec) -> None:
    benchmark.group = "cmd_submit header"
    pack, unpack = codec.pack_cmd_submit, codec.unpack_header
    buf = bytearray(48)

    def run():
        pack(buf, 0, 1234, 0x10002, 1, 0, 0x200, 18, 0, 0, 0, SETUP)
        return unpack(buf, 0)

    msg = bench(benchmark, run)
    assert msg.fields()[:11] == (1, 1234, 0x10002, 1, 0, 0x200, 18, 0, 0, 0, SETUP)


def test_ret_submit_header(benchmark, codec) -> None:
    benchmark.group = "ret_submit header"
    pack, unpack = codec.pack_ret_submit, codec.unpack_header
    buf = bytearray(48)

    def run():
        pack(buf, 0, 1234, 0, 512, 0, -1, 0)
        return unpack(buf, 0)

    msg = bench(benchmark, run)
    assert msg.fields()[:10] == (3, 1234, 0, 0, 0, 0, 512, 0, -1, 0)


def _iso32(codec):
    iso = codec.IsoPackets.layout(32, 1024)
    for i in range(32):
        iso.set_result(i, 1024 - (i % 4) * 8, 0 if i % 7 else -18)
    return iso


def test_iso_descriptors(benchmark, codec) -> None:
    benchmark.group = "iso 32 descriptors"
    iso = _iso32(codec)
    unpack = codec.IsoPackets.unpack
    raw = bytearray(32 * 16)

    def run():
        iso.pack_into(raw, 0)
        return unpack(raw, 0, 32)

    back = bench(benchmark, run, 200)
    assert back == iso


def test_iso_unpad_pad(benchmark, codec) -> None:
    """gather ("unpad", stub side of an iso IN reply) + spread ("pad", usbip_pad_iso on vhci)."""
    benchmark.group = "iso 32x1024 unpad/pad"
    iso = _iso32(codec)
    src = bytes(range(256)) * 128  # 32 x 1024 bytes, as the device filled them
    packed = bytearray(32 * 1024)
    total = iso.total_actual()

    def run():
        n = iso.gather(src, packed)
        iso.spread(packed, n)
        return n

    assert bench(benchmark, run, 200) == total
    for off, _length, actual, _status in iso.tolist():
        assert packed[off : off + actual] == src[off : off + actual]


def test_iso_full(benchmark, codec) -> None:
    """The whole iso IN path for 32 x 1024: descriptors pack + unpack and data unpad/pad."""
    benchmark.group = "iso 32 packets: desc + unpad/pad"
    iso = _iso32(codec)
    unpack = codec.IsoPackets.unpack
    src = bytes(range(256)) * 128
    packed = bytearray(32 * 1024)
    raw = bytearray(32 * 16)

    def run():
        n = iso.gather(src, packed)
        iso.pack_into(raw, 0)
        back = unpack(raw, 0, 32)
        back.spread(packed, n)
        return back

    assert bench(benchmark, run, 100) == iso


@functools.cache
def _ret_stream(codec) -> bytes:
    one = bytearray(48 + STREAM_PAYLOAD)
    out = bytearray()
    for seq in range(1, N_STREAM + 1):
        codec.pack_ret_submit(one, 0, seq, 0, STREAM_PAYLOAD)
        one[48:] = seq.to_bytes(4, "big") * (STREAM_PAYLOAD // 4)
        out += one
    return bytes(out)


def test_ret_submit_stream(benchmark, codec) -> None:
    """10,000 pipelined RET_SUBMITs with 512-byte IN payloads, fed in 64 KiB chunks (client role)."""
    benchmark.group = "ret_submit stream 10k x 512"
    wire = _ret_stream(codec)
    chunks = [wire[i : i + FEED_CHUNK] for i in range(0, len(wire), FEED_CHUNK)]

    def setup():
        dec = codec.Decoder("client")
        for seq in range(1, N_STREAM + 1):
            dec.expect(seq, STREAM_PAYLOAD)
        return (dec,), {}

    def run(dec):
        n = 0
        for chunk in chunks:
            n += len(dec.feed(chunk))
        return n

    assert benchmark.pedantic(run, setup=setup, rounds=15, iterations=1, warmup_rounds=1) == N_STREAM
