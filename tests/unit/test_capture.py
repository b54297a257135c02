"""usbip.capture without Wireshark: the usbmon record encoder, the pcapng file, bounds, a full disk."""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading

import pytest

from usbip.capture import (
    EV_COMPLETE,
    EV_ERROR,
    EV_SUBMIT,
    FLAG_IN,
    FLAG_NONE,
    FLAG_OUT,
    LINKTYPE_USB_LINUX_MMAPPED,
    MON_BULK,
    MON_CONTROL,
    MON_INT,
    MON_ISO,
    CaptureFile,
    file_header,
    iso_descriptors,
    iso_info,
    packet_block,
    read_records,
    usbmon_header,
)
from usbip.capture import file as capmod
from usbip.cli.capture import add_capture_options, capture_from_args
from usbip.pool import BufferPool
from usbip.protocol import CmdSubmit, IsoPackets, Urb
from usbip.protocol.constants import ECONNRESET, ENODEV, ENOENT, XFER_BULK, XFER_CONTROL, XFER_INT, XFER_ISOC

GET_DEVICE = bytes([0x80, 6, 0, 1, 0, 0, 18, 0])


def test_usbmon_header_has_the_kernel_layout():
    """struct usbmon_packet (Documentation/usb/usbmon.rst): every field at its offset."""
    h = usbmon_header(
        0x1122334455667788,
        EV_SUBMIT,
        MON_CONTROL,
        0x81,
        7,
        0x1234,
        0,
        FLAG_IN,
        1_700_000_000,
        123456,
        -104,
        4096,
        20,
        b"ABCDEFGH",
        8,
        -3,
        0x201,
        5,
    )
    assert len(h) == 64
    assert struct.unpack_from("<Q", h, 0)[0] == 0x1122334455667788
    assert h[8:12] == bytes([ord("S"), 2, 0x81, 7])
    assert struct.unpack_from("<H", h, 12)[0] == 0x1234
    assert h[14] == 0 and h[15] == ord("<")
    assert struct.unpack_from("<qi", h, 16) == (1_700_000_000, 123456)
    assert struct.unpack_from("<iII", h, 28) == (-104, 4096, 20)
    assert h[40:48] == b"ABCDEFGH"
    assert struct.unpack_from("<iiII", h, 48) == (8, -3, 0x201, 5)


def test_iso_union_and_descriptors():
    assert iso_info(2, 3) == struct.pack("<ii", 2, 3)
    packets = [(0, 100, 90, 0), (100, 100, 0, -18)]
    sub = iso_descriptors(packets, submit=True)
    done = iso_descriptors(packets, submit=False)
    assert len(sub) == len(done) == 32
    # mon_bin_isodesc: status, offset, length (submit: the packet's length, completion: actual), pad
    assert struct.unpack("<iIIIiIII", sub) == (0, 0, 100, 0, -18, 100, 100, 0)
    assert struct.unpack("<iIIIiIII", done) == (0, 0, 90, 0, -18, 100, 0, 0)


def test_file_header_is_a_little_endian_section_with_one_usbmon_interface():
    head = file_header(1000, "test")
    btype, total, magic, major, minor, seclen = struct.unpack_from("<IIIHHq", head, 0)
    assert (btype, magic, major, minor, seclen) == (0x0A0D0D0A, 0x1A2B3C4D, 1, 0, -1)
    assert struct.unpack_from("<I", head, total - 4)[0] == total
    idb = head[total:]
    btype, itotal, linktype, _res, snaplen = struct.unpack_from("<IIHHI", idb, 0)
    assert btype == 1 and linktype == LINKTYPE_USB_LINUX_MMAPPED == 220 and snaplen == 64 + 1000
    assert len(idb) == itotal and itotal % 4 == 0


def test_packet_block_roundtrip():
    hdr = usbmon_header(5, EV_COMPLETE, MON_BULK, 0x82, 3, 1, FLAG_NONE, 0, 10, 20, 0, 3, 3)
    blob = file_header() + packet_block(hdr, data=b"abc", ts_ns=10_000_020_000)
    (rec,) = read_records(blob)
    assert rec["id"] == 5 and rec["type"] == EV_COMPLETE and rec["epnum"] == 0x82 and rec["data"] == b"abc"
    assert rec["caplen"] == 67 and rec["ts_us"] == 10_000_020


# ---------------------------------------------------------------- server side records
def _urb(seqnum, ep, is_in, length, buffer=None, setup=bytes(8), iso=None, flags=0, interval=0):
    if buffer is None:
        buffer = bytearray(length)
    n = len(iso) if iso is not None else 0
    return Urb(seqnum, ep, int(is_in), length, buffer, setup, flags, 0, n, interval, iso)


def _records(path):
    with open(path, "rb") as f:
        return read_records(f.read())


@pytest.fixture
def capfile(tmp_path):
    cf = CaptureFile(str(tmp_path / "t.pcapng"))
    yield cf
    cf.close()


def test_control_in_submit_and_completion(capfile):
    sess = capfile.session(busnum=3, devnum=9)
    urb = _urb(41, 0, True, 18, setup=GET_DEVICE)
    sess.submit(urb, XFER_CONTROL)
    urb.buffer[:18] = bytes(range(18))
    urb.status, urb.actual_length = 0, 18
    sess.complete(urb)
    assert capfile.flush()
    s, c = _records(capfile.path)
    assert s["id"] == c["id"] == (1 << 32) | 41
    assert (s["type"], s["xfer_type"], s["epnum"], s["devnum"], s["busnum"]) == (EV_SUBMIT, MON_CONTROL, 0x80, 9, 3)
    assert s["flag_setup"] == 0 and s["setup"] == GET_DEVICE and s["flag_data"] == FLAG_IN
    assert s["length"] == 18 and s["len_cap"] == 0 and s["data"] == b""
    assert c["type"] == EV_COMPLETE and c["flag_setup"] == FLAG_NONE and c["flag_data"] == 0
    assert c["status"] == 0 and c["length"] == 18 and c["data"] == bytes(range(18))
    assert abs(c["ts_sec"] * 1_000_000 + c["ts_usec"] - c["ts_us"]) == 0


def test_bulk_out_interrupt_and_ids_per_connection(capfile):
    one = capfile.session(100, 2)
    two = capfile.session(100, 2)
    out = _urb(7, 1, False, 5, buffer=b"hello")
    one.submit(out, XFER_BULK)
    out.actual_length = 5
    one.complete(out)
    intr = _urb(7, 4, True, 8, interval=4)
    two.submit(intr, XFER_INT)
    assert capfile.flush()
    s, c, i = _records(capfile.path)
    assert s["data"] == b"hello" and s["flag_data"] == 0 and s["epnum"] == 0x01 and s["xfer_type"] == MON_BULK
    assert c["data"] == b"" and c["flag_data"] == FLAG_OUT and c["length"] == 5
    assert i["xfer_type"] == MON_INT and i["interval"] == 4 and i["epnum"] == 0x84
    assert s["id"] == (1 << 32) | 7 and i["id"] == (2 << 32) | 7


def test_iso_in_completion_carries_descriptors_and_the_whole_buffer(capfile):
    sess = capfile.session(1, 1)
    iso = IsoPackets.layout(3, 4)
    urb = _urb(3, 3, True, 12, iso=iso, interval=1)
    sess.submit(urb, XFER_ISOC)
    urb.buffer[:] = b"aaaabbbbcccc"
    iso.set_result(0, 4)
    iso.set_result(1, 2, -71)
    iso.set_result(2, 4)
    urb.actual_length = 10
    sess.complete(urb)
    assert capfile.flush()
    s, c = _records(capfile.path)
    assert s["xfer_type"] == MON_ISO and s["ndesc"] == 3 and s["setup"] == iso_info(0, 3)
    assert s["descs"] == [(0, 0, 4), (0, 4, 4), (0, 8, 4)] and s["data"] == b""
    assert c["descs"] == [(0, 0, 4), (-71, 4, 2), (0, 8, 4)]
    assert c["setup"] == iso_info(1, 3) and c["length"] == 10
    assert c["data"] == b"aaaabbbbcccc" and c["len_cap"] == 3 * 16 + 12


def test_refused_urb_is_an_error_event_without_completion(capfile):
    sess = capfile.session(1, 1)
    urb = _urb(9, 15, True, 64)
    sess.submit(urb, None)
    sess.refused(urb, ENOENT)
    urb.status = ENOENT
    sess.complete(urb)  # the session's callback still runs: nothing more is written
    assert capfile.flush()
    s, e = _records(capfile.path)
    assert s["type"] == EV_SUBMIT and s["xfer_type"] == MON_BULK
    assert e["type"] == EV_ERROR and e["status"] == ENOENT and e["flag_data"] == ord("E") and e["len_cap"] == 0


def test_unlinked_before_submission_is_submit_and_econnreset(capfile):
    sess = capfile.session(1, 1)
    msg = CmdSubmit(12, 0x10001, 0, 2, 0, 3, data=memoryview(b"xyz"))
    sess.cancelled_before_submit(msg)
    assert capfile.flush()
    s, c = _records(capfile.path)
    assert s["data"] == b"xyz" and c["type"] == EV_COMPLETE and c["status"] == ECONNRESET
    assert s["id"] == c["id"] == (1 << 32) | 12


def test_snaplen_cuts_data_and_keeps_the_original_length(tmp_path):
    cf = CaptureFile(str(tmp_path / "s.pcapng"), snaplen=100)
    try:
        sess = cf.session(1, 1)
        urb = _urb(1, 1, False, 1000, buffer=bytes(1000))
        sess.submit(urb, XFER_BULK)
        assert cf.flush()
        (s,) = _records(cf.path)
        assert len(s["data"]) == 100 and s["len_cap"] == 100 and s["length"] == 1000
        assert s["caplen"] == 164 and s["origlen"] == 1064
    finally:
        cf.close()


# ---------------------------------------------------------------- client side records
def test_client_capture_types_from_the_configuration():
    from usbip.capture import ClientCapture

    cfg = bytes([9, 2, 32, 0, 1, 1, 0, 0x80, 50, 9, 4, 0, 0, 2, 0xFF, 0, 0, 0])
    cfg += bytes([7, 5, 0x81, 3, 8, 0, 4]) + bytes([7, 5, 0x02, 2, 0, 2, 0])

    class Sink:
        def __init__(self):
            self.rows = []

        def record(self, *args):
            self.rows.append(args)

    sink = Sink()
    cc = ClientCapture(sink, 4, 1, 2)  # type: ignore[arg-type]
    cc.submit(1, 0x81, bytes(8), 0, 8, None, None, 4, 0, cfg)
    cc.submit(2, 0x02, bytes(8), 0, 3, b"abc", None, 0, 0, cfg)
    cc.submit(3, 0x80, GET_DEVICE, 0, 18, None, None, 0, 0, cfg)
    cc.submit(4, 0x85, bytes(8), 0, 8, None, None, 0, 0, cfg)
    assert [r[2] for r in sink.rows] == [MON_INT, MON_BULK, MON_CONTROL, MON_BULK]
    assert sink.rows[0][11] == 4  # interval of an interrupt URB
    cc.ended(1, ECONNRESET)
    cc.disconnected()
    ends = sink.rows[4:]
    assert [(r[0] & 0xFFFFFFFF, r[1], r[8]) for r in ends] == [
        (1, EV_COMPLETE, ECONNRESET),
        (2, EV_COMPLETE, ENODEV),
        (3, EV_COMPLETE, ENODEV),
        (4, EV_COMPLETE, ENODEV),
    ]
    assert ends[0][0] >> 32 == 4


# ---------------------------------------------------------------- bounds, rotation, slow and full disks
def _fill(cf, count, size=1000):
    sess = cf.session(1, 1)
    for i in range(count):
        sess.submit(_urb(i + 1, 1, False, size, buffer=bytes(size)), XFER_BULK)


def test_size_bound_stops_with_a_log_line(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "usbip.capture")
    cf = CaptureFile(str(tmp_path / "b.pcapng"), max_bytes=20_000, files=1)
    _fill(cf, 100)
    cf.close()
    assert cf.stopped
    assert "reached its size bound" in caplog.text and "capturing stopped" in caplog.text
    size = os.path.getsize(cf.path)
    assert 20_000 - 1100 < size <= 20_000
    recs = _records(cf.path)
    assert len(recs) == cf.written == cf.records and recs[-1]["id"] & 0xFFFFFFFF == len(recs)
    assert not os.path.exists(cf.path + ".1")


def test_size_bound_rotates_keeping_n_files(tmp_path):
    path = str(tmp_path / "r.pcapng")
    cf = CaptureFile(path, max_bytes=20_000, files=3)
    _fill(cf, 100)
    cf.close()
    assert cf.rotations >= 3 and cf.records == 100 and cf.dropped == 0
    assert not os.path.exists(path + ".3")
    seqs = []
    for p in (path + ".2", path + ".1", path):
        assert os.path.getsize(p) <= 20_000
        recs = _records(p)  # each file is a pcapng of its own
        assert recs
        seqs += [r["id"] & 0xFFFFFFFF for r in recs]
    assert seqs == list(range(seqs[0], 101))  # the newest records, in order, none missing


def test_bound_too_small_is_refused(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        CaptureFile(str(tmp_path / "x"), max_bytes=100)
    with pytest.raises(ValueError, match="at least 1"):
        CaptureFile(str(tmp_path / "x"), files=0)


def test_slow_disk_drops_and_counts(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, "usbip.capture")
    gate = threading.Event()
    real = os.writev

    def slow_write(fd, buffers):
        gate.wait(10)
        return real(fd, buffers)

    monkeypatch.setattr(capmod, "_os_writev", slow_write)
    cf = CaptureFile(str(tmp_path / "slow.pcapng"), max_buffer=50_000)
    _fill(cf, 200)
    assert cf.dropped > 100 and cf.records + cf.dropped == 200
    gate.set()
    cf.close()
    assert "records dropped so far: the disk does not keep up" in caplog.text
    assert len(_records(cf.path)) == cf.records == cf.written


def test_full_disk_is_logged_and_recovers(tmp_path, caplog, monkeypatch):
    """ENOSPC in the middle of a write: the file is cut back to whole blocks, writing resumes later."""
    caplog.set_level(logging.INFO, "usbip.capture")
    real = os.writev
    full = threading.Event()
    full.set()

    def write(fd, buffers):
        data = b"".join(buffers)
        if full.is_set() and len(data) > 200:
            os.write(fd, data[: len(data) // 2])  # half a block reaches the disk, then it is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, buffers)

    cf = CaptureFile(str(tmp_path / "full.pcapng"))
    try:
        _fill(cf, 3, 100)
        assert cf.flush()  # header and first records
        monkeypatch.setattr(capmod, "_os_writev", write)
        _fill(cf, 5, 100)
        assert cf.flush()
        assert cf.lost == 5 and cf.error is not None
        assert "cannot write: No space left on device" in caplog.text
        full.clear()
        _fill(cf, 2, 100)
        assert cf.flush()
    finally:
        cf.close()
    assert "writing again" in caplog.text
    recs = _records(cf.path)  # parses: no half block left behind
    assert len(recs) == 5 == cf.written and cf.lost == 5


def test_short_writes_are_completed(tmp_path, monkeypatch):
    def short(fd, buffers):  # at most 1000 bytes per call, as a pipe or a signal may leave it
        return os.write(fd, b"".join(bytes(b) for b in buffers)[:1000])

    monkeypatch.setattr(capmod, "_os_writev", short)
    cf = CaptureFile(str(tmp_path / "short.pcapng"))
    _fill(cf, 20)
    cf.close()
    assert [r["id"] & 0xFFFFFFFF for r in _records(cf.path)] == list(range(1, 21))


def test_an_idle_capture_is_still_a_pcapng(tmp_path):
    cf = CaptureFile(str(tmp_path / "idle.pcapng"), description="usbipd")
    cf.close()
    with open(cf.path, "rb") as f:
        data = f.read()
    assert data == file_header(description="usbipd") and read_records(data) == []


def test_dev_full_never_raises(caplog):
    caplog.set_level(logging.ERROR, "usbip.capture")
    cf = CaptureFile("/dev/full")
    assert not cf.regular and cf.max_bytes == 0
    _fill(cf, 10)
    assert cf.flush()
    cf.close()
    assert cf.lost == 10 and cf.written == 0
    assert "/dev/full: cannot write: No space left on device" in caplog.text


# ---------------------------------------------------------------- options
def test_options(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    add_capture_options(p)
    args = p.parse_args([])
    assert capture_from_args(args) is None
    args = p.parse_args(["--capture", str(tmp_path / "o.pcapng"), "--capture-max-mb", "2", "--capture-files", "4"])
    cf = capture_from_args(args)
    assert cf is not None
    try:
        assert cf.max_bytes == 2 * 1024 * 1024 and cf.files == 4
    finally:
        cf.close()
    with pytest.raises(ValueError, match="--capture-max-mb"):
        capture_from_args(p.parse_args(["--capture", str(tmp_path / "n"), "--capture-max-mb", "-1"]))
    with pytest.raises(OSError, match="--capture"):
        capture_from_args(p.parse_args(["--capture", str(tmp_path / "no" / "such" / "dir")]))


def test_usbipd_and_bench_have_the_options():
    from usbip.cli.usbip_main import build_parser as usbip_parser
    from usbip.cli.usbipd_main import build_parser as usbipd_parser

    a = usbipd_parser().parse_args(["--capture", "x.pcapng", "--capture-max-mb", "5", "--capture-files", "2"])
    assert (a.capture, a.capture_max_mb, a.capture_files) == ("x.pcapng", 5.0, 2)
    b = usbip_parser().parse_args(["bench", "-r", "h", "-b", "1-1", "--capture", "y.pcapng"])
    assert b.capture == "y.pcapng" and b.capture_files == 1


# ---------------------------------------------------------------- the server session with a capture
class _Session:
    """A UrbSession on the loopback device with a capture; wire messages in, records out."""

    def __init__(self, capfile: CaptureFile, **kw):
        from usbip.protocol import Decoder
        from usbip.server.session import UrbSession
        from usbip.virtual import LoopbackDevice
        from usbip.virtual.testing import set_configuration

        dev = LoopbackDevice()
        dev.busid, dev.busnum, dev.devnum = "100-1", 100, 2
        assert set_configuration(dev, 1) == 0
        self.capfile = capfile
        self.server = Decoder("server")
        self.seq = 0
        self.session = UrbSession(dev, lambda bufs, n: None, BufferPool(), capture=capfile.session(100, 2), **kw)

    def submit(self, ep, is_in, length, data=b"", setup=bytes(8), seqnum=None):
        from usbip.protocol import HEADER_SIZE, pack_cmd_submit

        if seqnum is None:
            self.seq += 1
            seqnum = self.seq
        hdr = bytearray(HEADER_SIZE)
        pack_cmd_submit(hdr, 0, seqnum, self.session.devid, int(is_in), ep, 0, length, 0, 0, 0, setup)
        self.session.handle(self.server.feed(bytes(hdr) + (b"" if is_in else data)))
        return seqnum

    def unlink(self, target):
        from usbip.protocol import HEADER_SIZE, pack_cmd_unlink

        self.seq += 1
        hdr = bytearray(HEADER_SIZE)
        pack_cmd_unlink(hdr, 0, self.seq, self.session.devid, 0, 0, target)
        self.session.handle(self.server.feed(bytes(hdr)))

    def records(self):
        assert self.capfile.flush()
        return [(r["id"] & 0xFFFFFFFF, chr(r["type"]), r["epnum"], r["status"]) for r in _records(self.capfile.path)]


def test_session_without_capture_takes_the_plain_path():
    from usbip.server.session import UrbSession

    s = UrbSession(_Dev(), lambda bufs, n: None, BufferPool())
    assert s.capture is None and s._on_complete == s._completed


class _Dev:
    busid, busnum, devnum = "1-1", 1, 1
    devid = 1 << 16 | 1


def test_session_records_completions_refusals_and_unlinks(capfile):
    h = _Session(capfile)
    h.submit(2, False, 3, b"abc")  # 1: loopback OUT
    h.submit(2, True, 64)  # 2: gets abc
    h.submit(0, True, 18, setup=bytes([0x80, 6, 0, 1, 0, 0, 64, 0]))  # 3: wLength 64 != 18: refused (EBADR)
    h.submit(9, True, 8)  # 4: no such endpoint: refused (ENOENT)
    h.submit(2, True, 64)  # 5: waits on the empty FIFO
    h.unlink(5)  # 6: cancels 5
    h.unlink(8)  # 7: early unlink of 8, which comes next
    h.submit(2, True, 64, seqnum=8)
    assert h.records() == [
        (1, "S", 0x02, 0),
        (1, "C", 0x02, 0),
        (2, "S", 0x82, 0),
        (2, "C", 0x82, 0),
        (3, "S", 0x80, 0),
        (3, "E", 0x80, -53),  # -EBADR
        (4, "S", 0x89, 0),
        (4, "E", 0x89, ENOENT),
        (5, "S", 0x82, 0),
        (5, "C", 0x82, ECONNRESET),
        (8, "S", 0x82, 0),
        (8, "C", 0x82, ECONNRESET),
    ]


def test_session_records_an_unlinked_backlogged_submit(capfile):
    from usbip.server.limits import ServerLimits

    h = _Session(capfile, limits=ServerLimits(connection_budget=64 * 1024))
    h.submit(2, True, 40 * 1024)  # 1: waits on the empty FIFO, holds most of the budget
    h.submit(2, True, 48 * 1024)  # 2: does not fit: backlogged
    assert 2 in h.session.backlog
    h.unlink(2)  # 3: never reached the device
    assert h.records() == [(1, "S", 0x82, 0), (2, "S", 0x82, 0), (2, "C", 0x82, ECONNRESET)]
