"""IsoPackets' whole-URB helpers (set_results, fill, mismatches, payload, total_length) on both codecs.

Devices complete an iso URB with these in one call each instead of a Python loop per packet;
the session builds RET_SUBMIT's data with ``payload``. Each is checked against what the loop
per packet it replaces computes.
"""

from __future__ import annotations

import pytest

from usbip.protocol.constants import EOVERFLOW

PAT = bytes(i % 63 for i in range(1024))


def make(codec, packets):
    return codec.IsoPackets.from_list([(o, n, 0, 0) for o, n in packets])


def test_set_results_clamps_to_max_packet_and_fails_packets_outside(codec):
    iso = make(codec, [(0, 1024), (1024, 100), (1124, 2000), (3124, 0), (9000, 10)])
    total = iso.set_results(4000, 1024)
    assert [p[2:] for p in iso.tolist()] == [(1024, 0), (100, 0), (1024, 0), (0, 0), (0, EOVERFLOW)]
    assert total == 1024 + 100 + 1024 == iso.total_actual()
    assert iso.error_count() == 1


def test_set_results_without_clamp_fails_long_packets(codec):
    iso = make(codec, [(0, 1024), (1024, 1025), (2049, 7)])
    assert iso.set_results(4096, 1024, clamp=False) == 1031
    assert [p[2:] for p in iso.tolist()] == [(1024, 0), (0, EOVERFLOW), (7, 0)]


def test_set_results_refuses_negative_sizes(codec):
    with pytest.raises(ValueError):
        make(codec, [(0, 8)]).set_results(-1, 8)


def test_fill_writes_each_packets_actual_bytes_at_its_offset(codec):
    iso = make(codec, [(0, 10), (20, 5), (30, 0), (40, 8)])
    iso.set_results(48, 6)
    buf = bytearray(b"\xee" * 48)
    iso.fill(buf, PAT[:6])
    want = bytearray(b"\xee" * 48)
    for off, _n, actual, _st in iso.tolist():
        want[off : off + actual] = PAT[:actual]
    assert buf == want


def test_fill_refuses_packets_outside_the_buffer_or_longer_than_the_source(codec):
    iso = codec.IsoPackets.from_list([(0, 8, 8, 0)])
    with pytest.raises(ValueError):
        iso.fill(bytearray(4), PAT)
    with pytest.raises(ValueError):
        iso.fill(bytearray(8), PAT[:4])
    codec.IsoPackets.from_list([(100, 8, 0, EOVERFLOW)]).fill(bytearray(8), PAT)  # nothing to write: fine


def test_mismatches_counts_successful_packets_with_other_data(codec):
    data = PAT[:100] + PAT[:50] + b"\xff" * 50 + b"\0" * 20
    iso = codec.IsoPackets.from_list([(0, 100, 100, 0), (100, 50, 50, 0), (150, 50, 50, 0), (200, 20, 0, EOVERFLOW)])
    assert iso.mismatches(data, PAT) == 1
    assert iso.mismatches(memoryview(data), PAT[:60]) == 2  # a packet longer than the pattern cannot match


def test_payload_is_a_view_when_packets_lie_back_to_back(codec):
    buf = bytearray(PAT[:64])
    iso = codec.IsoPackets.from_list([(0, 16, 16, 0), (16, 16, 16, 0), (32, 16, 0, 0), (32, 16, 8, 0)])
    out = iso.payload(buf)
    assert isinstance(out, memoryview) and bytes(out) == bytes(buf[:40])
    full = codec.IsoPackets.from_list([(0, 32, 32, 0), (32, 32, 32, 0)]).payload(buf)
    assert isinstance(full, memoryview) and len(full) == 64


def test_payload_gathers_short_packets(codec):
    buf = bytearray(PAT[:64])
    iso = codec.IsoPackets.from_list([(0, 16, 10, 0), (16, 16, 16, 0), (48, 16, 3, 0)])
    out = iso.payload(buf)
    assert bytes(out) == bytes(buf[0:10] + buf[16:32] + buf[48:51])
    dst = bytearray(29)
    assert iso.gather(buf, dst) == 29 and bytes(dst) == bytes(out)


def test_payload_refuses_data_beyond_the_buffer(codec):
    with pytest.raises(ValueError):
        codec.IsoPackets.from_list([(0, 16, 16, 0)]).payload(bytearray(8))


def test_total_length_and_item_access(codec):
    iso = codec.IsoPackets.from_list([(0, 16, 3, 0), (16, 100, 0, EOVERFLOW)])
    assert iso.total_length() == 116
    assert iso[1] == (16, 100, 0, EOVERFLOW) and iso[-2] == (0, 16, 3, 0)
    iso.set_result(-1, 50, 0)
    assert iso[1] == (16, 100, 50, 0)
    with pytest.raises(ValueError):
        iso.set_result(0, 17)
    with pytest.raises(IndexError):
        iso.set_result(2, 0)
