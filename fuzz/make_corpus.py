"""Write the seed corpus under fuzz/corpus/<target>/ (small valid inputs; the files are checked in).

Run from the repository root: ``python -m fuzz.make_corpus``. Every file of
fuzz/corpus/<target>/ is regenerated (the directories hold nothing else). Messages are
encoded with the pure-Python codec's encoders and the op-phase record packers.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
from collections.abc import Callable

try:
    from fuzz import _common
except ModuleNotFoundError:  # started as a script: python fuzz/make_corpus.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fuzz import _common

from usbip.protocol import codec
from usbip.protocol.constants import OP_REP_IMPORT, OP_REQ_DEVLIST, ST_NODEV, ST_OK
from usbip.protocol.records import (
    DeviceRecord,
    pack_devlist_reply,
    pack_import_reply,
    pack_import_request,
    pack_op_header,
)

CORPUS = os.path.join(_common.REPO, "fuzz", "corpus")
DEVID = 1 << 16 | 2  # fuzz_session.DEVID (not imported: that would start atheris' instrumentation)
SESSION_DEVICES = ("loopback", "loopback:ss", "storage", "keyboard", "serial", "audio")  # fuzz_session.SPEC_NAMES

# decoder parameter block: kept in step with fuzz_decoder.make_input (imported lazily, it needs atheris)
Seeds = dict[str, bytes]


def setup(rt: int, req: int, value: int = 0, index: int = 0, length: int = 0) -> bytes:
    return struct.pack("<BBHHH", rt, req, value, index, length)


def cmd_submit(
    seq: int,
    ep: int,
    direction: int,
    length: int,
    data: bytes = b"",
    setup_packet: bytes = bytes(8),
    iso: list[int] | None = None,
    flags: int = 0,
    np: int | None = None,
    devid: int = DEVID,
) -> bytes:
    packets = None
    if iso is not None:
        packets = codec.IsoPackets.from_list([(sum(iso[:i]), n, 0, 0) for i, n in enumerate(iso)])
    count = len(packets) if packets is not None else (0 if np is None else np)
    hdr = bytearray(48)
    interval = 1 if iso is not None else 0
    codec.pack_cmd_submit(hdr, 0, seq, devid, direction, ep, flags, length, 0, count, interval, setup_packet)
    return bytes(hdr) + data + (packets.to_bytes() if packets is not None else b"")


def cmd_unlink(seq: int, victim: int, devid: int = DEVID) -> bytes:
    hdr = bytearray(48)
    codec.pack_cmd_unlink(hdr, 0, seq, devid, 0, 0, victim)
    return bytes(hdr)


def ret_submit(seq: int, status: int, data: bytes = b"", actual: int | None = None, iso: list | None = None) -> bytes:
    hdr = bytearray(48)
    np = len(iso) if iso is not None else 0
    al = len(data) if actual is None else actual
    errors = sum(1 for p in iso or [] if p[3])
    codec.pack_ret_submit(hdr, 0, seq, status, al, 0, np, errors)
    tail = codec.IsoPackets.from_list(iso).to_bytes() if iso is not None else b""
    return bytes(hdr) + data + tail


def ret_unlink(seq: int, status: int) -> bytes:
    hdr = bytearray(48)
    codec.pack_ret_unlink(hdr, 0, seq, status)
    return bytes(hdr)


GET_DEVICE = setup(0x80, 6, 0x0100, 0, 18)
GET_CONFIG = setup(0x80, 6, 0x0200, 0, 255)
SET_CONFIG = setup(0x00, 9, 1, 0, 0)


# ------------------------------------------------------------------ fuzz_decoder
def decoder_seeds() -> Seeds:
    from fuzz.fuzz_decoder import make_input

    out: Seeds = {}
    server = {
        "get-descriptor": cmd_submit(1, 0, 1, 18, setup_packet=GET_DEVICE),
        "set-configuration": cmd_submit(2, 0, 0, 0, setup_packet=SET_CONFIG),
        "bulk-out": cmd_submit(3, 2, 0, 64, bytes(range(64))),
        "bulk-in": cmd_submit(4, 2, 1, 512),
        "bulk-out-windows": cmd_submit(5, 1, 0, 16, b"w" * 16, np=-1),
        "iso-out": cmd_submit(6, 3, 0, 24, bytes(24), iso=[8, 8, 8]),
        "iso-in": cmd_submit(7, 3, 1, 3072, iso=[1024, 1024, 1024]),
        "unlink": cmd_unlink(8, 4),
    }
    for name, wire in server.items():
        out[f"server-{name}"] = make_input("server", wire)
    stream = b"".join(server.values())
    out["server-stream"] = make_input("server", stream)
    out["server-stream-chunked"] = make_input("server", stream, cuts=[3, 40, 41, 90, 128, 200, 254])
    iso = [(0, 8, 4, 0), (8, 8, 0, -18), (16, 8, 6, 0)]
    client = {
        "in": (ret_submit(1, 0, bytes(range(18))), [2]),
        "out": (ret_submit(2, 0, actual=64), [1]),
        "stall": (ret_submit(3, -32), [0]),
        "iso-in": (ret_submit(4, 0, bytes(10), iso=iso), [0]),
        "iso-out": (ret_submit(5, 0, actual=10, iso=iso), [1]),
        "unlink": (ret_unlink(6, -104), []),
    }
    for name, (wire, modes) in client.items():
        out[f"client-{name}"] = make_input("client", wire, in_modes=modes)
    wire = b"".join(w for w, _m in client.values())
    modes = [m for _w, ms in client.values() for m in ms]
    out["client-stream"] = make_input("client", wire, in_modes=modes)
    out["client-stream-chunked"] = make_input("client", wire, cuts=[1, 50, 100, 101, 180, 250], in_modes=modes)
    return out


# ------------------------------------------------------------------ fuzz_op_phase
def op_phase_seeds() -> Seeds:
    from usbip.virtual import demo_devices

    with tempfile.TemporaryDirectory() as tmp:
        devices = demo_devices(tmp)
        for i, dev in enumerate(devices):
            dev.busnum, dev.devnum, dev.busid = 100, i + 2, f"100-{i + 1}"
        records = [dev.record() for dev in devices]
        for dev in devices:
            dev.release()
    one = records[0]
    out: Seeds = {
        "request-devlist": b"\0" + pack_op_header(OP_REQ_DEVLIST),
        "request-import": b"\0" + pack_import_request("100-1"),
        "reply-devlist-empty": b"\1" + pack_devlist_reply([]),
        "reply-devlist": b"\1" + pack_devlist_reply(records),
        "reply-import-refused": b"\2\1" + pack_import_reply(ST_NODEV),
        "raw-record": b"\3" + one.pack(with_interfaces=True),
        "devlist-count": b"\4\xff" + struct.pack(">I", 5),
    }
    # mode 2 asks for fuzz_op_phase.BUSIDS[second byte]; BUSIDS[1] is "100-1"
    out["reply-import"] = b"\2\1" + pack_import_reply(ST_OK, one)
    out["reply-import-wrong-code"] = b"\2\1" + pack_op_header(OP_REP_IMPORT + 1) + one.pack()
    assert DeviceRecord.unpack(one.pack()).busid == "100-1"
    return out


# ------------------------------------------------------------------ fuzz_session
def session_seeds() -> Seeds:
    dev = {name: i for i, name in enumerate(SESSION_DEVICES)}

    def seed(device: str, *msgs: bytes, spin: int = 1) -> bytes:
        return bytes((dev[device], spin)) + b"".join(msgs)

    set_alt1 = cmd_submit(2, 0, 0, 0, setup_packet=setup(0x01, 11, 1, 0))
    cbw_inquiry = struct.pack(
        "<IIIBBB16s", 0x43425355, 1, 36, 0x80, 0, 6, bytes((0x12, 0, 0, 0, 36, 0)).ljust(16, b"\0")
    )
    write10 = struct.pack(">BBIBHB", 0x2A, 0, 3, 0, 1, 0)
    read10 = struct.pack(">BBIBHB", 0x28, 0, 3, 0, 1, 0)
    cbw_write = struct.pack("<IIIBBB16s", 0x43425355, 2, 512, 0, 0, 10, write10.ljust(16, b"\0"))
    cbw_read = struct.pack("<IIIBBB16s", 0x43425355, 3, 512, 0x80, 0, 10, read10.ljust(16, b"\0"))
    out: Seeds = {}
    for name in SESSION_DEVICES:
        key = name.replace(":", "-")
        out[f"{key}-descriptors"] = seed(
            name,
            cmd_submit(1, 0, 1, 18, setup_packet=GET_DEVICE),
            cmd_submit(2, 0, 1, 255, setup_packet=GET_CONFIG),
            cmd_submit(3, 0, 0, 0, setup_packet=SET_CONFIG),
        )
        out[f"{key}-unlink"] = seed(
            name, cmd_submit(1, 1, 1, 64), cmd_unlink(2, 1), cmd_unlink(4, 3), cmd_submit(3, 1, 1, 64), spin=0
        )
    out["loopback-bulk"] = seed(
        "loopback",
        cmd_submit(1, 2, 0, 512, bytes(range(256)) * 2),
        cmd_submit(2, 2, 1, 512),
        cmd_submit(3, 1, 1, 512),
        cmd_submit(4, 1, 0, 100, bytes(100)),
    )
    out["loopback-iso"] = seed(
        "loopback", set_alt1, cmd_submit(3, 3, 1, 3072, iso=[1024] * 3), cmd_submit(4, 3, 0, 24, bytes(24), iso=[8] * 3)
    )
    out["loopback-ss-bulk"] = seed("loopback:ss", cmd_submit(1, 2, 0, 1024, bytes(1024)), cmd_submit(2, 2, 1, 1024))
    out["storage-inquiry"] = seed(
        "storage", cmd_submit(1, 2, 0, 31, cbw_inquiry), cmd_submit(2, 1, 1, 36), cmd_submit(3, 1, 1, 13)
    )
    out["storage-write-read"] = seed(
        "storage",
        cmd_submit(1, 2, 0, 31, cbw_write),
        cmd_submit(2, 2, 0, 512, bytes(range(256)) * 2),
        cmd_submit(3, 1, 1, 13),
        cmd_submit(4, 2, 0, 31, cbw_read),
        cmd_submit(5, 1, 1, 512),
        cmd_submit(6, 1, 1, 13),
    )
    out["keyboard-interrupt"] = seed(
        "keyboard",
        cmd_submit(1, 1, 1, 8),
        cmd_submit(2, 0, 1, 8, setup_packet=setup(0xA1, 1, 0x0100, 0, 8)),
        cmd_submit(3, 0, 0, 0, setup_packet=setup(0x21, 0x0A, 0, 0)),
        spin=3,
    )
    out["serial-line"] = seed(
        "serial",
        cmd_submit(1, 0, 0, 7, struct.pack("<IBBB", 115200, 0, 0, 8), setup_packet=setup(0x21, 0x20, 0, 0, 7)),
        cmd_submit(2, 0, 0, 0, setup_packet=setup(0x21, 0x22, 3, 0)),
        cmd_submit(3, 1, 0, 5, b"hello"),
        cmd_submit(4, 1, 1, 64),
        cmd_submit(5, 2, 1, 16),
    )
    clock = setup(0x21, 1, 0x0100, 0x0900, 4)
    out["audio-stream"] = seed(
        "audio",
        cmd_submit(1, 0, 0, 4, struct.pack("<I", 48000), setup_packet=clock),
        cmd_submit(2, 0, 0, 0, setup_packet=setup(0x01, 11, 1, 1)),
        cmd_submit(3, 0, 0, 0, setup_packet=setup(0x01, 11, 1, 2)),
        cmd_submit(4, 1, 1, 4 * 28, iso=[28] * 4),
        cmd_submit(5, 1, 0, 4 * 24, bytes(96), iso=[24] * 4),
        spin=2,
    )
    return out


TARGETS: dict[str, Callable[[], Seeds]] = {
    "fuzz_decoder": decoder_seeds,
    "fuzz_op_phase": op_phase_seeds,
    "fuzz_session": session_seeds,
}


def write(target: str, seeds: Seeds) -> None:
    path = os.path.join(CORPUS, target)
    os.makedirs(path, exist_ok=True)
    for old in os.listdir(path):
        os.unlink(os.path.join(path, old))
    for name, data in sorted(seeds.items()):
        with open(os.path.join(path, name), "wb") as fh:
            fh.write(data)
    print(f"{target}: {len(seeds)} seeds in {os.path.relpath(path, _common.REPO)}")


def main() -> None:
    for target, make in TARGETS.items():
        write(target, make())


if __name__ == "__main__":
    main()
