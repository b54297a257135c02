"""Differential fuzz target: the pure-Python and the compiled URB decoder on the same bytes.

Input layout (see :func:`make_input`): a ``PREFIX``-byte parameter block read with atheris'
FuzzedDataProvider (role, limits, chunk cuts, what the client announces with ``expect``),
then the wire bytes. Both decoders get the same chunks; per chunk they must return the same
messages (every field, payload bytes and iso descriptors: ``fields()``), or both raise
ProtocolError with the same message on the same chunk, after which both stay failed.
Any other exception, or any difference, is a finding.

Run: ``python -m fuzz.fuzz_decoder [libFuzzer options] [corpus dirs]`` (see scripts/fuzz).
"""

from __future__ import annotations

import importlib
import os
import struct
import sys

try:
    from fuzz import _common
except ModuleNotFoundError:  # started as a script: python fuzz/fuzz_decoder.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fuzz import _common

import atheris

from tests.unit.test_codec_differential import assert_same_state, run

with atheris.instrument_imports(include=["usbip"]):
    # by module name: the package's attribute ``codec`` is whichever twin it chose
    py_codec = importlib.import_module("usbip.protocol.codec")
    cy_codec = importlib.import_module("usbip.protocol._codec")
    from usbip.protocol.constants import USBIP_RET_SUBMIT
    from usbip.protocol.errors import ProtocolError

PREFIX = 24  # parameter bytes before the wire
MAX_CUTS = 8
MAX_SCANNED = 8  # RET_SUBMIT seqnums found in the wire that the client announces
# not the 16 MiB default: a header alone makes both decoders allocate a buffer for its whole
# body, and zero-filling 2 x 16 MiB per input would cut the rate a hundredfold for nothing new
MAX_TRANSFERS = (65536, 4096, 1 << 20, 0)
MAX_ISO = (1024, 4, 1, 0)
CHUNK_SIZES = (256 * 1024, 4096)
# how a RET_SUBMIT seqnum found in the wire is announced: its in_length (a is its actual_length,
# capped: the client decoder allocates the announced length as soon as the header arrives)
IN_CAP = 1 << 20
IN_MODES = (
    lambda a: 65536,  # IN with room to spare
    lambda a: -1,  # OUT
    lambda a: min(a, IN_CAP),  # IN, exactly the actual length
    lambda a: min(a, IN_CAP) - 1,  # IN, one byte short: actual_length out of bounds
)
_RET_HEAD = struct.Struct(">II16xi")  # command, seqnum, actual_length (after devid, direction, ep, status)


class Params:
    """What the parameter block says (all values from one FuzzedDataProvider, ints from its end)."""

    __slots__ = ("chunk_size", "cuts", "explicit", "in_modes", "max_iso", "max_transfer", "role")

    def __init__(self, raw: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(raw)
        self.role = ("server", "client")[fdp.ConsumeIntInRange(0, 1)]
        self.max_transfer = MAX_TRANSFERS[fdp.ConsumeIntInRange(0, 3)]
        self.max_iso = MAX_ISO[fdp.ConsumeIntInRange(0, 3)]
        self.chunk_size = CHUNK_SIZES[fdp.ConsumeIntInRange(0, 1)]
        self.cuts = [fdp.ConsumeIntInRange(0, 255) for _ in range(MAX_CUTS)]
        self.in_modes = [fdp.ConsumeIntInRange(0, 3) for _ in range(MAX_SCANNED)]
        # two explicit (seqnum, in_length) announcements, small numbers so they can collide
        self.explicit = [(fdp.ConsumeIntInRange(0, 15), fdp.ConsumeIntInRange(0, 255) - 1) for _ in range(2)]


def make_input(role: str, wire: bytes, cuts: list[int] | None = None, in_modes: list[int] | None = None) -> bytes:
    """A fuzz input for ``wire`` (the inverse of :class:`Params`; used by make_corpus).

    ``cuts`` are chunk boundaries as 0..255 fractions of the wire; ``in_modes`` index IN_MODES
    for the RET_SUBMITs found in the wire, in order. Integers are consumed from the end of the
    block, one byte each (value = byte mod range).
    """
    cuts = (cuts or [])[:MAX_CUTS]
    cuts = cuts + [0] * (MAX_CUTS - len(cuts))
    modes = (in_modes or [])[:MAX_SCANNED]
    modes = modes + [0] * (MAX_SCANNED - len(modes))
    values = [1 if role == "client" else 0, 0, 0, 0, *cuts, *modes, 15, 0, 15, 0]
    block = bytes(reversed(values))
    assert len(block) <= PREFIX
    return block.rjust(PREFIX, b"\0") + wire


def chunks_of(wire: bytes, cuts: list[int]) -> list[bytes]:
    n = len(wire)
    points = sorted(c * n // 255 for c in cuts)
    out, prev = [], 0
    for p in [*points, n]:
        out.append(wire[prev:p])
        prev = p
    return out


def scanned_ret_submits(wire: bytes) -> list[tuple[int, int]]:
    """(seqnum, actual_length) of every place in ``wire`` that looks like a RET_SUBMIT header."""
    found: list[tuple[int, int]] = []
    pos = wire.find(b"\0\0\0\x03")
    while 0 <= pos <= len(wire) - _RET_HEAD.size and len(found) < MAX_SCANNED:
        command, seqnum, actual = _RET_HEAD.unpack_from(wire, pos)
        step = 1
        if command == USBIP_RET_SUBMIT:
            found.append((seqnum, actual))
            step = 48  # not its own seqnum field again
        pos = wire.find(b"\0\0\0\x03", pos + step)
    return found


def make_decoders(p: Params, wire: bytes) -> list[object]:
    decs = []
    for codec in (py_codec, cy_codec):
        dec = codec.Decoder(p.role, max_transfer=p.max_transfer, max_iso_packets=p.max_iso, chunk_size=p.chunk_size)
        if p.role == "client":
            for seq, length in p.explicit:
                dec.expect(seq, length)
            for (seq, actual), mode in zip(scanned_ret_submits(wire), p.in_modes, strict=False):
                dec.expect(seq, IN_MODES[mode](actual))
        decs.append(dec)
    return decs


def test_one_input(data: bytes) -> None:
    p = Params(data[:PREFIX].rjust(PREFIX, b"\0"))  # a short input is all parameters
    wire = data[PREFIX:]
    chunks = chunks_of(wire, p.cuts)
    py, cy = make_decoders(p, wire)
    a = run(py, chunks, ProtocolError)
    b = run(cy, chunks, ProtocolError)
    if a != b:
        raise AssertionError(f"decoders differ ({p.role}):\npython: {a!r}\ncython: {b!r}")
    assert_same_state(py, cy)


def main() -> None:
    assert py_codec.IMPLEMENTATION == "python" and cy_codec.IMPLEMENTATION != "python"
    print(f"fuzz_decoder: compiled codec {cy_codec.__file__}", file=sys.stderr)
    _common.run_fuzzer(test_one_input)


if __name__ == "__main__":
    main()
