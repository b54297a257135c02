"""AudioDevice (UAC2): descriptors as snd-usb-audio reads them, clock requests, iso streams, pacing.

The descriptor checks decode the blob here, with the field layouts of the UAC2 spec (4.7 - 4.10)
and the sizes snd-usb-audio's validate.c insists on, rather than with the device's own builders.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import time
import zlib

import pytest

from usbip.cli.device_spec import make_device
from usbip.protocol import IsoPackets
from usbip.protocol.constants import ECONNRESET, EINVAL, ENOENT, EOVERFLOW, EPIPE, ESHUTDOWN, Speed
from usbip.virtual import AudioDevice
from usbip.virtual.testing import control, get_descriptor, in_urb, out_urb, set_configuration, set_interface

GET_CLASS_IF, SET_CLASS_IF = 0xA1, 0x21
CUR, RANGE = 0x01, 0x02
SAM_FREQ, CLOCK_VALID = 0x01, 0x02
CLOCK = 0x10  # the clock source's entity id: checked against the descriptors below


def frames(first: int, count: int) -> bytes:
    """The capture signal computed independently: frame n = n as a little-endian uint32."""
    return b"".join(struct.pack("<I", (first + i) & 0xFFFFFFFF) for i in range(count))


def make(**kw) -> AudioDevice:
    kw.setdefault("realtime", False)
    dev = AudioDevice(**kw)
    assert set_configuration(dev, 1) == 0
    return dev


# ---------------------------------------------------------------- descriptors


def split(blob: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(blob):
        n = blob[pos]
        assert n >= 2 and pos + n <= len(blob), f"bad descriptor length at {pos}: {blob.hex()}"
        out.append(blob[pos : pos + n])
        pos += n
    assert pos == len(blob)
    return out


def interfaces(blob: bytes) -> list[dict]:
    """Each interface descriptor with the class-specific descriptors and endpoints after it."""
    out: list[dict] = []
    for d in split(blob)[1:]:
        if d[1] == 0x04:
            out.append({"desc": d, "num": d[2], "alt": d[3], "cs": [], "eps": []})
        elif d[1] == 0x24:
            out[-1]["cs"].append(d)
        elif d[1] == 0x05:
            out[-1]["eps"].append({"desc": d, "cs": []})
        elif d[1] == 0x25:
            out[-1]["eps"][-1]["cs"].append(d)
    return out


@pytest.mark.parametrize("interval,maxp", [(4, 196), (1, 28)])
def test_descriptors_are_consistent_uac2(interval: int, maxp: int) -> None:
    dev = AudioDevice(interval=interval)
    dd = dev.device_descriptor
    bcd_usb, dclass, dsub, dproto = struct.unpack_from("<HBBB", dd, 2)
    assert (bcd_usb, dclass, dsub, dproto) == (0x0200, 0xEF, 0x02, 0x01)  # IAD device class triple
    assert struct.unpack_from("<HH", dd, 8) == (0x1D6B, 0x0101)
    assert dev.speed == Speed.HIGH

    cfg = dev.configuration_descriptor(0)
    descs = split(cfg)
    assert struct.unpack_from("<H", cfg, 2)[0] == len(cfg)
    assert cfg[4] == 3  # bNumInterfaces
    # the IAD comes right before interface 0 and spans the three interfaces, class audio, UAC2
    assert descs[1][:7] == bytes((8, 0x0B, 0, 3, 0x01, 0x00, 0x20))
    assert descs[2][1] == 0x04 and descs[2][2:4] == b"\0\0"
    assert sum(1 for d in descs if d[1] == 0x0B) == 1

    ifs = interfaces(cfg)
    assert [(i["num"], i["alt"]) for i in ifs] == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)]
    for i in ifs:
        assert i["desc"][4] == len(i["eps"])  # bNumEndpoints
        assert i["desc"][5:8] == bytes((0x01, 0x01 if i["num"] == 0 else 0x02, 0x20))

    # AudioControl: header, then clock source, terminals; wTotalLength covers exactly them
    ac = ifs[0]
    header, *units = ac["cs"]
    assert header[2] == 0x01 and len(header) == 9
    bcd_adc, _category, total = struct.unpack_from("<HBH", header, 3)
    assert bcd_adc == 0x0200 and total == sum(len(d) for d in ac["cs"])
    by_id = {d[3]: d for d in units}
    clock = [d for d in units if d[2] == 0x0A]
    assert len(clock) == 1 and len(clock[0]) == 8 and clock[0][3] == CLOCK
    assert clock[0][5] & 0x03 == 0x03  # SAM_FREQ host programmable
    assert clock[0][5] >> 2 & 0x03 == 0x01  # CLOCK_VALID read-only
    terminals = {}
    for d in units:
        if d[2] == 0x02:  # input terminal: 17 bytes
            assert len(d) == 17
            tid, ttype, _assoc, csrc, nch, chcfg = struct.unpack_from("<BHBBBI", d, 3)
            terminals[tid] = ("in", ttype, None, csrc)
            assert (nch, chcfg) == (2, 3)
        elif d[2] == 0x03:  # output terminal: 12 bytes
            assert len(d) == 12
            tid, ttype, _assoc, src, csrc = struct.unpack_from("<BHBBB", d, 3)
            terminals[tid] = ("out", ttype, src, csrc)
    assert all(t[3] == CLOCK for t in terminals.values())
    # every output terminal's source exists; one microphone -> streaming chain, one streaming -> speaker
    chains = {(terminals[t[2]][1], t[1]) for t in terminals.values() if t[0] == "out"}
    assert chains == {(0x0201, 0x0101), (0x0101, 0x0301)}
    assert set(by_id) == {CLOCK, *terminals}

    # AudioStreaming: alt 0 empty, alt 1 one iso endpoint linked to a USB streaming terminal
    for alt0, alt1, addr, attrs in ((ifs[1], ifs[2], 0x81, 0x05), (ifs[3], ifs[4], 0x01, 0x09)):
        assert alt0["cs"] == [] and alt0["eps"] == []
        general, fmt = alt1["cs"]
        assert len(general) == 16 and general[2] == 0x01
        link, _ctl, ftype, formats, nch, chcfg = struct.unpack_from("<BBBIBI", general, 3)
        kind, ttype, _src, _clk = terminals[link]
        assert ttype == 0x0101 and kind == ("out" if addr & 0x80 else "in")
        assert (ftype, formats, nch, chcfg) == (1, 1, 2, 3)
        assert fmt == bytes((6, 0x24, 0x02, 1, 2, 16))  # Format Type I, 2-byte subslots, 16 bits
        (ep,) = alt1["eps"]
        e_addr, e_attrs, e_maxp, e_interval = struct.unpack_from("<BBHB", ep["desc"], 2)
        # capture asynchronous, playback adaptive: neither needs a feedback endpoint
        assert (e_addr, e_attrs, e_maxp, e_interval) == (addr, attrs, maxp, interval)
        frames_per_packet = 48000 // (8000 >> (interval - 1))
        assert e_maxp >= frames_per_packet * 4
        assert ep["cs"] == [bytes((8, 0x25, 0x01, 0, 0, 0, 0, 0))]

    # the full-speed twin (OTHER_SPEED_CONFIGURATION) keeps the IAD and the class descriptors
    st, other = get_descriptor(dev, 0x07, 0, 1024)
    assert st == 0 and other[1] == 0x07 and struct.unpack_from("<H", other, 2)[0] == len(other)
    assert split(other)[1][:7] == descs[1][:7]
    assert [i["cs"] for i in interfaces(other)] == [i["cs"] for i in ifs]


def test_full_speed_one_packet_per_frame() -> None:
    dev = make(speed=Speed.FULL, rates=(44100, 48000))
    eps = [e for i in interfaces(dev.configuration_descriptor(0)) for e in i["eps"]]
    assert [struct.unpack_from("<BBHB", e["desc"], 2) for e in eps] == [(0x81, 0x05, 196, 1), (0x01, 0x09, 196, 1)]
    assert dev.packets_per_second == 1000


@pytest.mark.parametrize(
    "kw", [{"rates": ()}, {"rates": (4000,)}, {"interval": 5}, {"interval": 0}, {"speed": Speed.SUPER}]
)
def test_bad_parameters(kw: dict) -> None:
    with pytest.raises(ValueError):
        AudioDevice(**kw)


# ---------------------------------------------------------------- clock source requests


def test_sampling_frequency_cur_and_range() -> None:
    dev = make()
    assert control(dev, GET_CLASS_IF, CUR, SAM_FREQ << 8, CLOCK << 8, 4) == (0, struct.pack("<I", 48000))
    # snd-usb-audio reads wNumSubRanges with wLength 2 first, then the whole block (format.c)
    assert control(dev, GET_CLASS_IF, RANGE, SAM_FREQ << 8, CLOCK << 8, 2) == (0, b"\x01\x00")
    st, data = control(dev, GET_CLASS_IF, RANGE, SAM_FREQ << 8, CLOCK << 8, 14)
    assert st == 0 and struct.unpack("<HIII", data) == (1, 48000, 48000, 0)
    assert control(dev, GET_CLASS_IF, CUR, CLOCK_VALID << 8, CLOCK << 8, 1) == (0, b"\x01")
    # SET_CUR of the rate it runs at is fine; any other rate STALLs and changes nothing
    assert control(dev, SET_CLASS_IF, CUR, SAM_FREQ << 8, CLOCK << 8, data=struct.pack("<I", 48000))[0] == 0
    assert control(dev, SET_CLASS_IF, CUR, SAM_FREQ << 8, CLOCK << 8, data=struct.pack("<I", 44100))[0] == EPIPE
    assert dev.sample_rate == 48000


def test_programmable_rates() -> None:
    dev = make(rates=(48000, 44100, 96000))
    st, data = control(dev, GET_CLASS_IF, RANGE, SAM_FREQ << 8, CLOCK << 8, 100)
    assert st == 0 and len(data) == 2 + 3 * 12
    assert struct.unpack("<H9I", data) == (3, 44100, 44100, 0, 48000, 48000, 0, 96000, 96000, 0)  # ascending
    assert control(dev, SET_CLASS_IF, CUR, SAM_FREQ << 8, CLOCK << 8, data=struct.pack("<I", 96000))[0] == 0
    assert control(dev, GET_CLASS_IF, CUR, SAM_FREQ << 8, CLOCK << 8, 4) == (0, struct.pack("<I", 96000))
    assert dev.sample_rate == 96000
    assert control(dev, SET_CLASS_IF, CUR, SAM_FREQ << 8, CLOCK << 8, data=struct.pack("<I", 32000))[0] == EPIPE
    assert control(dev, SET_CLASS_IF, CUR, SAM_FREQ << 8, CLOCK << 8, data=b"\x44\xac\x00")[0] == EPIPE  # 3 bytes
    assert dev.sample_rate == 96000


@pytest.mark.parametrize(
    "rt,req,value,index,length,data",
    [
        (SET_CLASS_IF, CUR, CLOCK_VALID << 8, CLOCK << 8, 0, b"\x00"),  # CLOCK_VALID is read-only
        (GET_CLASS_IF, RANGE, CLOCK_VALID << 8, CLOCK << 8, 14, b""),
        (GET_CLASS_IF, CUR, 0x03 << 8, CLOCK << 8, 1, b""),  # CLOCK_CONTROL selector: not a control we have
        (GET_CLASS_IF, CUR, SAM_FREQ << 8 | 1, CLOCK << 8, 4, b""),  # channel 1 of a clock
        (GET_CLASS_IF, CUR, 0x02 << 8, 0x02 << 8, 1, b""),  # connector control of an output terminal
        (GET_CLASS_IF, CUR, SAM_FREQ << 8, CLOCK << 8 | 1, 4, b""),  # addressed to an AS interface
        (GET_CLASS_IF, CUR, 0x01 << 8, 1, 1, b""),  # AS_ACT_ALT_SETTING: not advertised
        (0xA2, CUR, 0x01 << 8, 0x81, 1, b""),  # endpoint PITCH control: not advertised
        (0xC1, 0x01, 0, 0, 4, b""),  # vendor request
    ],
)
def test_other_requests_stall(rt: int, req: int, value: int, index: int, length: int, data: bytes) -> None:
    dev = make()
    assert control(dev, rt, req, value, index, length, data)[0] == EPIPE


# ---------------------------------------------------------------- streams (URBs completed at once)


def iso_in(dev: AudioDevice, sizes: list[int]) -> tuple:
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    iso = IsoPackets.from_list([(o, n, 0, 0) for o, n in zip(offs, sizes, strict=True)])
    urb = in_urb(0x01, sum(sizes), iso=iso, number_of_packets=len(sizes))
    dev.submit(urb)
    return urb, iso


def iso_out(dev: AudioDevice, packets: list[bytes]) -> tuple:
    pos, descs = 0, []
    for p in packets:
        descs.append((pos, len(p), 0, 0))
        pos += len(p)
    iso = IsoPackets.from_list(descs)
    urb = out_urb(0x01, b"".join(packets), iso=iso, number_of_packets=len(packets))
    dev.submit(urb)
    return urb, iso


def packet_data(urb, iso: IsoPackets) -> list[bytes]:
    buf = bytes(urb.buffer)
    return [buf[off : off + act] for off, _ln, act, _st in iso.tolist()]


def test_capture_needs_alt_1_and_delivers_the_counter() -> None:
    dev = make()
    urb, _iso = iso_in(dev, [196] * 4)
    assert urb.done and urb.status == ENOENT  # alt 0: no endpoint
    assert set_interface(dev, 1, 1) == 0
    assert dev.capture.running and dev.capture.frames == 0
    urb, iso = iso_in(dev, [196] * 8)
    assert urb.status == 0 and urb.error_count == 0
    assert [(act, st) for _o, _l, act, st in iso.tolist()] == [(192, 0)] * 8  # 48 frames per 1 ms packet
    assert urb.actual_length == 8 * 192
    assert b"".join(packet_data(urb, iso)) == frames(0, 8 * 48)
    urb, iso = iso_in(dev, [196] * 3)
    assert b"".join(packet_data(urb, iso)) == frames(8 * 48, 3 * 48)  # the next URB continues the count
    assert dev.capture.frames == 11 * 48 and dev.capture.packets == 11


def test_capture_microframes_six_frames_each() -> None:
    dev = make(interval=1)
    set_interface(dev, 1, 1)
    urb, iso = iso_in(dev, [28] * 16)
    assert [act for _o, _l, act, _st in iso.tolist()] == [24] * 16  # 48000 / 8000 = 6 frames per microframe
    assert b"".join(packet_data(urb, iso)) == frames(0, 96)


def test_capture_carries_fractional_frames() -> None:
    dev = make(rates=(44100, 48000))
    assert control(dev, SET_CLASS_IF, CUR, SAM_FREQ << 8, CLOCK << 8, data=struct.pack("<I", 44100))[0] == 0
    set_interface(dev, 1, 1)
    sizes = []
    for _ in range(10):  # one second in URBs of 100 packets
        urb, iso = iso_in(dev, [46 * 4] * 100)
        assert urb.status == 0
        sizes += [act // 4 for _o, _l, act, _st in iso.tolist()]
    assert sizes[:10] == [44] * 9 + [45]  # 44.1 frames per millisecond
    assert sizes == sizes[:10] * 100 and sum(sizes) == 44100  # exactly the rate, no drift
    assert dev.capture.frames == 44100


def test_capture_small_or_bad_packets() -> None:
    dev = make()
    set_interface(dev, 1, 1)
    # a packet buffer smaller than the slot's frames gets the whole frames that fit
    urb, iso = iso_in(dev, [196, 10, 0, 196])
    assert [act for _o, _l, act, _st in iso.tolist()] == [192, 8, 0, 192]
    assert b"".join(packet_data(urb, iso)) == frames(0, 48 + 2 + 48)  # and the signal has no gap
    # a packet outside the transfer buffer fails alone
    iso = IsoPackets.from_list([(0, 196, 0, 0), (4000, 196, 0, 0)])
    urb = in_urb(0x01, 392, iso=iso, number_of_packets=2)
    dev.submit(urb)
    assert urb.status == 0 and urb.error_count == 1 and iso.tolist()[1][3] == EOVERFLOW
    # an iso URB without packet descriptors is refused
    urb = in_urb(0x01, 196)
    dev.submit(urb)
    assert urb.status == EINVAL


def test_playback_counts_frames_silence_and_crc() -> None:
    dev = make()
    urb, _iso = iso_out(dev, [bytes(192)])
    assert urb.status == ENOENT
    assert set_interface(dev, 2, 1) == 0
    sound = frames(1, 480)
    silence = bytes(96)  # 24 silent frames
    mixed = frames(1000, 10) + bytes(8) + frames(2000, 10)  # 2 silent frames inside
    packets = [silence] + [sound[i : i + 192] for i in range(0, len(sound), 192)] + [mixed, b""]
    urb, iso = iso_out(dev, packets)
    assert urb.status == 0 and urb.error_count == 0
    assert urb.actual_length == sum(len(p) for p in packets)
    assert [act for _o, _l, act, _st in iso.tolist()] == [len(p) for p in packets]
    st = dev.playback
    assert st.frames == 24 + 480 + 22 and st.silent_frames == 26 and st.packets == len(packets)
    assert st.crc32 == zlib.crc32(sound + frames(1000, 10) + frames(2000, 10))
    # a packet larger than wMaxPacketSize fails alone and is not counted
    urb, iso = iso_out(dev, [frames(0, 50), frames(0, 48)])
    assert [(act, s) for _o, _l, act, s in iso.tolist()] == [(0, EOVERFLOW), (192, 0)]
    assert urb.error_count == 1 and dev.playback.frames == 526 + 48


def test_alt_0_stops_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="usbip.virtual.audio")
    dev = make()
    set_interface(dev, 1, 1)
    set_interface(dev, 2, 1)
    iso_in(dev, [196] * 5)
    iso_out(dev, [frames(7, 48)] * 3 + [bytes(192)])
    assert set_interface(dev, 1, 0) == 0
    assert not dev.capture.running and dev.capture.frames == 240  # counters stay readable
    assert dev.playback.running
    assert set_interface(dev, 2, 0) == 0
    text = caplog.text
    assert re.search(r"audio: capture stopped after 240 frames \(alt 0", text), text
    crc = zlib.crc32(frames(7, 48) * 3)
    assert re.search(rf"audio: playback stopped after 192 frames \(48 silent, crc32 {crc:08x} of the others", text)
    assert iso_in(dev, [196])[0].status == ENOENT
    # a new stream starts from frame 0 with fresh counters
    set_interface(dev, 1, 1)
    assert dev.capture.frames == 0 and dev.capture.starts == 2
    urb, iso = iso_in(dev, [196])
    assert packet_data(urb, iso) == [frames(0, 48)]


def test_set_configuration_and_close_stop_streams(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="usbip.virtual.audio")
    dev = make()
    set_interface(dev, 1, 1)
    iso_in(dev, [196] * 2)
    assert set_configuration(dev, 1) == 0
    assert "audio: capture stopped after 96 frames (new configuration" in caplog.text
    set_interface(dev, 2, 1)
    iso_out(dev, [frames(1, 48)])
    asyncio.run(dev.close())
    assert "audio: playback stopped after 48 frames (0 silent" in caplog.text and "device closed" in caplog.text
    assert caplog.text.count("stopped after") == 2


# ---------------------------------------------------------------- real-time pacing


async def wait_all(urbs: list, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not all(u.done for u in urbs):
        assert time.monotonic() < end, "URBs did not complete"
        await asyncio.sleep(0.001)


def test_realtime_urbs_take_their_slots_in_order() -> None:
    async def body() -> None:
        dev = make(realtime=True)
        set_interface(dev, 1, 1)
        done_at: list[tuple[int, float]] = []
        urbs = []
        t0 = time.monotonic()
        for k in range(6):  # 6 URBs x 10 packets of 1 ms, all submitted at once
            urb, iso = iso_in(dev, [196] * 10)
            assert not urb.done
            urb.on_complete = lambda u, k=k: done_at.append((k, time.monotonic() - t0))
            urbs.append((urb, iso))
        assert dev.pending_count == 6
        await wait_all([u for u, _iso in urbs])
        assert [k for k, _t in done_at] == list(range(6))
        for k, t in done_at:  # URB k completes when its 10 ms have passed, not before
            assert t >= (k + 1) * 0.010 - 0.002, done_at
        assert done_at[-1][1] < 1.0
        data = b"".join(b"".join(packet_data(u, iso)) for u, iso in urbs)
        assert data == frames(0, 6 * 10 * 48)
        # after a pause the next URB starts now: no burst to catch up
        await asyncio.sleep(0.05)
        t1 = time.monotonic()
        urb, _iso = iso_in(dev, [196] * 5)
        await wait_all([urb])
        assert 0.004 <= time.monotonic() - t1 < 0.5

    asyncio.run(body())


def test_realtime_cancel_and_alt_change_abort_parked_urbs() -> None:
    async def body() -> None:
        dev = make(realtime=True)
        set_interface(dev, 1, 1)
        set_interface(dev, 2, 1)
        first, _ = iso_in(dev, [196] * 20)
        second, _ = iso_in(dev, [196] * 20)
        dev.cancel(first)
        assert first.done and first.status == ECONNRESET and first.actual_length == 0
        await wait_all([second])
        assert second.status == 0 and bytes(second.buffer)[:192] == frames(0, 48)  # cancelled frames never existed
        out, _ = iso_out(dev, [frames(1, 48)] * 50)
        assert not out.done
        assert set_interface(dev, 2, 0) == 0
        assert out.done and out.status == ESHUTDOWN and dev.playback.frames == 0
        assert dev.pending_count == 0
        await asyncio.sleep(0.08)  # the aborted URBs' timers must not fire into anything

    asyncio.run(body())


# ---------------------------------------------------------------- specs


def test_make_device_specs() -> None:
    d = make_device("audio")
    assert isinstance(d, AudioDevice) and d.rates == (48000,) and d.speed == Speed.HIGH and d.realtime
    d = make_device("audio:44100,48000")
    assert d.rates == (44100, 48000) and d.sample_rate == 44100
    d = make_device("audio:fs:96000")
    assert d.speed == Speed.FULL and d.rates == (96000,) and d.max_packet == 97 * 4
    for bad in ("audio:abc", "audio:1000", "audio:ss", "audio:48000,x"):
        with pytest.raises(ValueError):
            make_device(bad)


def test_a_stream_that_never_moved_a_packet_stops_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """snd-usb-audio selects alt 1 and then alt 0 on each streaming interface while probing."""
    caplog.set_level(logging.DEBUG, logger="usbip.virtual.audio")
    dev = make()
    for intf in (1, 2):
        assert set_interface(dev, intf, 1) == 0
        assert set_interface(dev, intf, 0) == 0
    infos = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert infos == []
    assert "capture stopped before any packet (alt 0)" in caplog.text
    assert "playback stopped before any packet (alt 0)" in caplog.text
    assert dev.capture.starts == dev.playback.starts == 1 and not dev.capture.running
