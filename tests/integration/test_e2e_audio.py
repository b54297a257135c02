"""The UAC2 audio device through the server and our client: the requests snd-usb-audio makes,
then capture and playback streams with URBs in flight, paced in real time."""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import struct
import time
import zlib

import pytest

from usbip.client import RemoteDevice, Stall, connect
from usbip.virtual import AudioDevice

from .conftest import bounded, exported
from .helpers import run

ENOENT = -errno.ENOENT
ESHUTDOWN = -errno.ESHUTDOWN
CLOCK = 0x10
SAM_FREQ, CLOCK_VALID = 0x01, 0x02


def frames(first: int, count: int) -> bytes:
    return b"".join(struct.pack("<I", (first + i) & 0xFFFFFFFF) for i in range(count))


def iso_endpoints(dev: RemoteDevice) -> dict[int, tuple[int, int, int]]:
    return {e["bEndpointAddress"]: (e["bmAttributes"], e["wMaxPacketSize"], e["bInterval"]) for e in dev.endpoints()}


def test_probe_requests_over_the_wire() -> None:
    async def body() -> None:
        async with exported(AudioDevice(rates=(44100, 48000))) as srv:
            conn = connect("127.0.0.1", srv.port, timeout=5)
            dev = await conn.import_device("100-1")
            assert iso_endpoints(dev) == {0x81: (0x05, 196, 4), 0x01: (0x09, 196, 4)}
            # format.c: RANGE with wLength 2 (the count), then the whole block
            assert await dev.control_transfer(0xA1, 0x02, SAM_FREQ << 8, CLOCK << 8, 2) == b"\x02\x00"
            block = await dev.control_transfer(0xA1, 0x02, SAM_FREQ << 8, CLOCK << 8, 26)
            assert struct.unpack("<H6I", block) == (2, 44100, 44100, 0, 48000, 48000, 0)
            # clock.c: GET_CUR, SET_CUR, GET_CUR, then the validity
            assert await dev.control_transfer(0xA1, 0x01, SAM_FREQ << 8, CLOCK << 8, 4) == struct.pack("<I", 44100)
            await dev.control_transfer(0x21, 0x01, SAM_FREQ << 8, CLOCK << 8, struct.pack("<I", 48000))
            assert await dev.control_transfer(0xA1, 0x01, SAM_FREQ << 8, CLOCK << 8, 4) == struct.pack("<I", 48000)
            assert await dev.control_transfer(0xA1, 0x01, CLOCK_VALID << 8, CLOCK << 8, 1) == b"\x01"
            with pytest.raises(Stall):
                await dev.control_transfer(0x21, 0x01, SAM_FREQ << 8, CLOCK << 8, struct.pack("<I", 96000))
            with pytest.raises(Stall):  # the connector control of a terminal: not advertised
                await dev.control_transfer(0xA1, 0x01, 0x02 << 8, 0x02 << 8, 1)
            await conn.close()

    run(body)


def test_capture_and_playback_streams(caplog: pytest.LogCaptureFixture) -> None:
    """What snd-usb-audio does at 48 kHz with bInterval 4: capture keeps 12 one-packet URBs in
    flight, playback 3 URBs of 6 packets (endpoint.c, MAX_URBS / MAX_QUEUE)."""
    caplog.set_level(logging.INFO, logger="usbip.virtual.audio")

    async def body() -> None:
        audio = AudioDevice()
        async with exported(audio) as srv:
            conn = connect("127.0.0.1", srv.port, timeout=5)
            dev = await conn.import_device("100-1")
            assert (await dev.iso_transfer(0x81, [196])).status == ENOENT  # alt 0 has no endpoint
            await dev.set_interface(1, 1)
            await dev.set_interface(2, 1)

            # capture: 250 URBs of one 1 ms packet, 12 in flight: 250 ms of signal, no gap
            t0 = time.monotonic()
            got: list[bytes] = []
            inflight = [dev.submit(0x81, 196, iso_packets=[196], interval=4) for _ in range(12)]
            submitted = 12
            while inflight:
                res = await inflight.pop(0).wait(5)
                assert res.status == 0 and res.error_count == 0
                ((st, act, data),) = res.packets()
                assert (st, act) == (0, 192)
                got.append(data)
                if submitted < 250:
                    inflight.append(dev.submit(0x81, 196, iso_packets=[196], interval=4))
                    submitted += 1
            elapsed = time.monotonic() - t0
            assert b"".join(got) == frames(0, 250 * 48)
            assert elapsed >= 0.245, f"250 ms of audio in {elapsed:.3f} s: not paced"
            assert audio.capture.frames == 250 * 48

            # playback: 40 URBs of 6 packets (240 ms), 3 in flight; 2 ms of silence at the start
            sound = frames(1, 40 * 6 * 48 - 96)
            stream = bytes(96 * 4) + sound
            chunks = [stream[i : i + 192] for i in range(0, len(stream), 192)]
            t0 = time.monotonic()
            pending = []
            for u in range(40):
                pending.append(dev.submit(0x01, b"".join(chunks[u * 6 : u * 6 + 6]), iso_packets=[192] * 6))
                if len(pending) == 3:
                    res = await pending.pop(0).wait(5)
                    assert res.status == 0 and res.actual_length == 6 * 192
            for p in pending:
                assert (await p.wait(5)).status == 0
            elapsed = time.monotonic() - t0
            assert elapsed >= 0.235, f"240 ms of audio in {elapsed:.3f} s: not paced"
            assert audio.playback.frames == 40 * 6 * 48 and audio.playback.silent_frames == 96
            assert audio.playback.crc32 == zlib.crc32(sound)

            # an URB parked for its slot is aborted by alt 0, uncounted
            late = dev.submit(0x01, b"".join(chunks[:6]), iso_packets=[192] * 6)
            await asyncio.sleep(0)
            await dev.set_interface(2, 0)
            assert (await late.wait(5)).status in (ESHUTDOWN, 0)
            await dev.set_interface(1, 0)
            await conn.close()
        text = caplog.text
        assert "audio: capture stopped after 12000 frames (alt 0" in text, text
        m = re.search(r"audio: playback stopped after (\d+) frames \(96 silent, crc32 ([0-9a-f]{8})", text)
        assert m, text
        # the late URB either finished before the SET_INTERFACE reached the device or did not count
        assert int(m.group(1)) in (11520, 11520 + 288) and audio.playback.frames == int(m.group(1))

    run(body)


def test_close_ends_running_streams(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="usbip.virtual.audio")

    async def body() -> None:
        audio = AudioDevice()
        async with exported(audio) as srv:
            conn = connect("127.0.0.1", srv.port, timeout=5)
            dev = await conn.import_device("100-1")
            await dev.set_interface(1, 1)
            res = await bounded(dev.iso_transfer(0x81, [196] * 4, interval=4))
            assert res.status == 0 and res.actual_length == 4 * 192
            await conn.close()  # the importer goes away while the capture stream runs
            for _ in range(100):
                if "capture stopped" in caplog.text:
                    break
                await asyncio.sleep(0.01)
        assert "audio: capture stopped after 192 frames (device closed" in caplog.text, caplog.text
        assert not audio.capture.running

    run(body)
