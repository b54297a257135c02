"""Shared fixtures: run codec and buffer-pool tests against BOTH twins in one pytest run.

``codec`` is parametrized over the pure-Python ``usbip.protocol.codec`` and the compiled
``usbip.protocol._codec`` (ids "python" / "cython"); ``pool_impl`` likewise over
``usbip.pool.buffers`` / ``usbip.pool._buffers``. A compiled twin that cannot be imported makes
its tests FAIL, unless ``USBIP_NO_EXTENSIONS=1`` is set, in which case they are skipped.
"""

from __future__ import annotations

import importlib
import os
import struct
from dataclasses import dataclass
from types import ModuleType

import pytest
from hypothesis import strategies as st

NO_EXTENSIONS = os.environ.get("USBIP_NO_EXTENSIONS", "") not in ("", "0")

CODEC_MODULES = {"python": "usbip.protocol.codec", "cython": "usbip.protocol._codec"}
POOL_MODULES = {"python": "usbip.pool.buffers", "cython": "usbip.pool._buffers"}


def load_twin(name: str) -> ModuleType:
    """Import ``name``; a missing compiled twin fails the test unless USBIP_NO_EXTENSIONS=1."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if NO_EXTENSIONS:
            pytest.skip(f"{name} unavailable and USBIP_NO_EXTENSIONS=1: {exc}")
        pytest.fail(
            f"compiled extension {name} cannot be imported ({exc}); build it with "
            "`python3 setup.py build_ext --inplace` or set USBIP_NO_EXTENSIONS=1",
            pytrace=False,
        )


@pytest.fixture(scope="session", params=list(CODEC_MODULES), ids=list(CODEC_MODULES))
def codec(request: pytest.FixtureRequest) -> ModuleType:
    """The URB codec twin under test."""
    return load_twin(CODEC_MODULES[request.param])


@pytest.fixture(scope="session", params=list(POOL_MODULES), ids=list(POOL_MODULES))
def pool_impl(request: pytest.FixtureRequest) -> ModuleType:
    """The buffer-pool twin under test."""
    return load_twin(POOL_MODULES[request.param])


@pytest.fixture(scope="session")
def py_codec() -> ModuleType:
    return load_twin(CODEC_MODULES["python"])


@pytest.fixture(scope="session")
def cy_codec() -> ModuleType:
    return load_twin(CODEC_MODULES["cython"])


# ---------------------------------------------------------------- message streams for codec tests
# Plain data (no codec objects), so one stream can be encoded by and fed to either twin.
U32 = st.integers(0, 2**32 - 1)
S32 = st.integers(-(2**31), 2**31 - 1)
_ISO = struct.Struct(">IIIi")


def iso_bytes(packets: list[tuple[int, int, int, int]] | None) -> bytes | None:
    """Descriptors as the wire carries them, packed with struct (independent of both twins)."""
    if packets is None:
        return None
    return b"".join(_ISO.pack(*p) for p in packets)


@dataclass
class Spec:
    """One message of a stream: what to encode and what the decoder must give back."""

    kind: str  # "cmd_submit" | "cmd_unlink" | "ret_submit" | "ret_unlink"
    args: tuple  # for codec.pack_<kind>(buf, offset, *args)
    payload: bytes | None
    iso: list[tuple[int, int, int, int]] | None
    expect: tuple[int, int] | None  # (seqnum, in_length) for Decoder.expect, client side
    fields: tuple  # the decoded message's fields()

    def encode(self, codec) -> bytes:
        buf = bytearray(48)
        getattr(codec, "pack_" + self.kind)(buf, 0, *self.args)
        if self.payload:
            buf += self.payload
        if self.iso is not None:
            buf += codec.IsoPackets.from_list(self.iso).to_bytes()
        return bytes(buf)


def encode_stream(codec, specs: list[Spec]) -> bytes:
    return b"".join(s.encode(codec) for s in specs)


def make_decoder(codec, role: str, specs: list[Spec], **kw):
    dec = codec.Decoder(role, **kw)
    for s in specs:
        if s.expect is not None:
            dec.expect(*s.expect)
    return dec


@st.composite
def iso_layout(draw, max_packets: int = 6, max_size: int = 48, with_actual: bool = True):
    """Back-to-back packets (optionally with gaps) as the kernel lays them out."""
    n = draw(st.integers(1, max_packets))
    packets, off = [], 0
    for _ in range(n):
        off += draw(st.sampled_from([0, 0, 0, 3]))
        size = draw(st.integers(0, max_size))
        actual = draw(st.integers(0, size)) if with_actual else 0
        status = draw(st.sampled_from([0, 0, -18, -71, -104]))
        packets.append((off, size, actual, status))
        off += size
    slack = draw(st.sampled_from([0, 0, 5]))
    return packets, off + slack


@st.composite
def cmd_submit_spec(draw, seqnum: int, max_payload: int = 300) -> Spec:
    direction = draw(st.sampled_from([0, 1]))
    devid, ep, flags = draw(U32), draw(st.integers(0, 15) | U32), draw(U32)
    start_frame, interval = draw(S32), draw(S32)
    setup = draw(st.binary(min_size=8, max_size=8))
    kind = draw(st.sampled_from(["plain", "plain", "windows", "iso"]))
    iso = None
    if kind == "iso":
        iso, tbl = draw(iso_layout(with_actual=draw(st.booleans())))
        np = len(iso)
    else:
        tbl = draw(st.integers(0, max_payload))
        np = 0 if kind == "plain" else -1
    payload = draw(st.binary(min_size=tbl, max_size=tbl)) if direction == 0 else None
    args = (seqnum, devid, direction, ep, flags, tbl, start_frame, np, interval, setup)
    fields = (1, seqnum, devid, direction, ep, flags, tbl, start_frame, np, interval, setup, payload, iso_bytes(iso))
    return Spec("cmd_submit", args, payload, iso, None, fields)


@st.composite
def cmd_unlink_spec(draw, seqnum: int) -> Spec:
    devid, direction, ep, victim = draw(U32), draw(st.sampled_from([0, 1])), draw(U32), draw(U32)
    return Spec(
        "cmd_unlink",
        (seqnum, devid, direction, ep, victim),
        None,
        None,
        None,
        (2, seqnum, devid, direction, ep, victim),
    )


@st.composite
def ret_submit_spec(draw, seqnum: int, max_payload: int = 300) -> Spec:
    is_in = draw(st.booleans())
    status, start_frame, error_count = draw(S32), draw(S32), draw(S32)
    devid, direction, ep = draw(st.just((0, 0, 0)) | st.tuples(U32, U32, U32))
    kind = draw(st.sampled_from(["plain", "plain", "windows", "iso"]))
    iso = None
    if kind == "iso":
        iso, buflen = draw(iso_layout())
        np = len(iso)
        actual = sum(p[2] for p in iso)
        in_length = buflen if is_in else -1
    else:
        np = 0 if kind == "plain" else -1
        if is_in:
            in_length = draw(st.integers(0, max_payload))
            actual = draw(st.integers(0, in_length))
        else:
            in_length, actual = -1, draw(st.integers(0, 1 << 20))
    payload = draw(st.binary(min_size=actual, max_size=actual)) if is_in else None
    args = (seqnum, status, actual, start_frame, np, error_count, devid, direction, ep)
    fields = (3, seqnum, devid, direction, ep, status, actual, start_frame, np, error_count, payload, iso_bytes(iso))
    return Spec("ret_submit", args, payload, iso, (seqnum, in_length), fields)


@st.composite
def ret_unlink_spec(draw, seqnum: int) -> Spec:
    status = draw(st.sampled_from([0, -104]) | S32)
    devid, direction, ep = draw(st.just((0, 0, 0)) | st.tuples(U32, U32, U32))
    return Spec(
        "ret_unlink",
        (seqnum, status, devid, direction, ep),
        None,
        None,
        None,
        (4, seqnum, devid, direction, ep, status),
    )


@st.composite
def streams(draw, role: str, min_size: int = 1, max_size: int = 6) -> list[Spec]:
    """A valid stream for a decoder of ``role`` (seqnums unique, so expect() is unambiguous)."""
    n = draw(st.integers(min_size, max_size))
    base = draw(st.integers(0, 2**32 - 1 - max_size))
    out = []
    for i in range(n):
        seq = base + i
        if role == "server":
            spec = draw(cmd_submit_spec(seq) if draw(st.integers(0, 3)) else cmd_unlink_spec(seq))
        else:
            spec = draw(ret_submit_spec(seq) if draw(st.integers(0, 3)) else ret_unlink_spec(seq))
        out.append(spec)
    return out


def fixed_stream(role: str) -> list[Spec]:
    """A deterministic stream with payloads, zero-length payloads, unlinks and iso."""
    if role == "server":
        iso = [(0, 8, 0, 0), (8, 8, 0, 0), (19, 5, 0, 0)]
        setup = bytes.fromhex("8006000100001200")
        p1, p3 = bytes(range(100)), bytes(range(200, 224))
        return [
            Spec(
                "cmd_submit",
                (1, 0x30005, 1, 0, 0x200, 18, 0, 0, 0, setup),
                None,
                None,
                None,
                (1, 1, 0x30005, 1, 0, 0x200, 18, 0, 0, 0, setup, None, None),
            ),
            Spec(
                "cmd_submit",
                (2, 0x30005, 0, 2, 0, 100, 0, -1, 0, bytes(8)),
                p1,
                None,
                None,
                (1, 2, 0x30005, 0, 2, 0, 100, 0, -1, 0, bytes(8), p1, None),
            ),
            Spec(
                "cmd_submit",
                (3, 0x30005, 0, 2, 0, 0, 0, 0, 0, bytes(8)),
                b"",
                None,
                None,
                (1, 3, 0x30005, 0, 2, 0, 0, 0, 0, 0, bytes(8), b"", None),
            ),
            Spec(
                "cmd_submit",
                (4, 0x30005, 0, 3, 2, 24, 7, 3, 1, bytes(8)),
                p3,
                iso,
                None,
                (1, 4, 0x30005, 0, 3, 2, 24, 7, 3, 1, bytes(8), p3, iso_bytes(iso)),
            ),
            Spec("cmd_unlink", (5, 0x30005, 0, 0, 2), None, None, None, (2, 5, 0x30005, 0, 0, 2)),
            Spec(
                "cmd_submit",
                (6, 0x30005, 1, 3, 2, 24, 9, 3, 1, bytes(8)),
                None,
                iso,
                None,
                (1, 6, 0x30005, 1, 3, 2, 24, 9, 3, 1, bytes(8), None, iso_bytes(iso)),
            ),
        ]
    iso = [(0, 8, 4, 0), (8, 8, 0, -18), (16, 8, 6, 0)]
    d1, d3 = bytes(range(50, 150)), bytes(range(10))
    return [
        Spec("ret_submit", (1, 0, 100, 0, 0, 0), d1, None, (1, 512), (3, 1, 0, 0, 0, 0, 100, 0, 0, 0, d1, None)),
        Spec("ret_submit", (2, 0, 100, 0, -1, 0), None, None, (2, -1), (3, 2, 0, 0, 0, 0, 100, 0, -1, 0, None, None)),
        Spec("ret_submit", (3, -32, 0, 0, 0, 0), b"", None, (3, 64), (3, 3, 0, 0, 0, -32, 0, 0, 0, 0, b"", None)),
        Spec("ret_unlink", (4, -104), None, None, None, (4, 4, 0, 0, 0, -104)),
        Spec(
            "ret_submit", (5, 0, 10, 12, 3, 1), d3, iso, (5, 24), (3, 5, 0, 0, 0, 0, 10, 12, 3, 1, d3, iso_bytes(iso))
        ),
        Spec(
            "ret_submit",
            (6, 0, 10, 12, 3, 1),
            None,
            iso,
            (6, -1),
            (3, 6, 0, 0, 0, 0, 10, 12, 3, 1, None, iso_bytes(iso)),
        ),
    ]


def pytest_sessionstart(session: pytest.Session) -> None:
    # the usbipd / usbip processes the tests start compile nothing (tests/kernel/harness.py)
    from tests.kernel.harness import compile_package

    compile_package()
