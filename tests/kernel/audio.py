"""Checks of a USB audio device imported into the kernel-test guest, shared by the tests that
import OUR virtual UAC2 device directly (test_virtual_audio) and through our libusb export
(test_libusb_export): snd-usb-audio makes a sound card of it, ``arecord`` captures the device's
test signal (frame n is n as a little-endian uint32) and ``aplay`` plays a WAV that the device
counts and checksums (it logs both in the usbipd log of the server that serves it).
"""

from __future__ import annotations

import random
import re
import struct
import time
import wave
import zlib

from . import gadgets
from .harness import GUEST_SHARE, Guest
from .ourserver import UsbipdProcess

AUDIO_VID, AUDIO_PID = 0x1D6B, 0x0101
RATE = 48000
CAPTURE_FRAMES = 2 * RATE  # two seconds
PLAYBACK_FRAMES = 2 * RATE + 1234


def wait_log(srv: UsbipdProcess, pattern: str, since: int, timeout: float = 60) -> re.Match[str]:
    """The first match of ``pattern`` in the server's log after offset ``since`` (polling)."""
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(pattern, srv.log()[since:])
        if m:
            return m
        assert time.monotonic() < deadline, f"no {pattern!r} in the usbipd log:\n{srv.log_tail(60)}"
        time.sleep(0.2)


def sound_card(guest: Guest, local_busid: str, timeout: float = 60) -> int:
    """Number of the ALSA card snd-usb-audio created on the AudioControl interface."""
    sound = f"/sys/bus/usb/devices/{local_busid}:1.0/sound"
    r = guest.run(gadgets.poll_sh(f"ls -d {sound}/card* >/dev/null 2>&1", timeout) + f"; ls {sound}", timeout + 30)
    assert r.rc == 0, "no sound card:\n" + r.out + guest.run("dmesg | tail -30").out
    (card,) = [int(n[4:]) for n in r.out.split() if re.fullmatch(r"card\d+", n)]
    return card


def playback_wav(path: str, frames: int) -> bytes:
    """A stereo 16-bit WAV of seeded noise without a single all-zero frame; returns its PCM data."""
    rng = random.Random(20261125)
    pcm = bytearray(rng.randbytes(frames * 4))
    for i in range(0, len(pcm), 4):
        if not any(pcm[i : i + 4]):
            pcm[i] = 1
    with wave.open(path, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(bytes(pcm))
    return bytes(pcm)


def capture_and_playback(g: Guest, srv: UsbipdProcess, local_busid: str, alsa_opts: str = "") -> None:
    """The sound card of USB device ``local_busid`` streams both ways, checked frame by frame
    against the device served by ``srv``. ``alsa_opts`` go to arecord and aplay (e.g. buffer and
    period times for a slow path: ALSA fails a read or write with EIO when no period completes
    within 1.1 buffer times)."""
    card = sound_card(g, local_busid)
    card_id = g.run(f"cat /proc/asound/card{card}/id", check=True).out.strip()
    cards = g.run("cat /proc/asound/cards", check=True).out
    assert re.search(rf"^\s*{card} \[{re.escape(card_id)}\s*\]: USB-Audio - Virtual Audio$", cards, re.M), cards
    # the driver's view of the streams: both directions, the format and the sync types we declared
    streams = g.run(f"cat /proc/asound/card{card}/stream0", check=True).out
    print(streams)
    for direction, ep in (("Playback", r"0x01 \(1 OUT\) \(ADAPTIVE\)"), ("Capture", r"0x81 \(1 IN\) \(ASYNC\)")):
        section = streams.split(f"{direction}:", 1)[1]
        assert re.search(r"Format: S16_LE\s+Channels: 2", section), streams
        assert re.search(rf"Endpoint: {ep}", section), streams
        assert re.search(r"Rates: 48000\b", section), streams
    device = f"hw:CARD={card_id},DEV=0"

    # capture: every frame is its frame number (uint32 LE), counted from the stream start
    raw = g.share_dir / "capture.raw"
    raw.unlink(missing_ok=True)
    since = len(srv.log())
    t0 = time.monotonic()
    r = g.run(
        f"arecord {alsa_opts} -D {device} -f S16_LE -c 2 -r {RATE} -s {CAPTURE_FRAMES} "
        f"-t raw {GUEST_SHARE}/capture.raw",
        timeout=300,
    )
    took = time.monotonic() - t0
    assert r.rc == 0, r
    assert "overrun" not in r.out, r
    data = raw.read_bytes()
    assert len(data) == CAPTURE_FRAMES * 4
    got = struct.unpack(f"<{CAPTURE_FRAMES}I", data)
    first = got[0]
    bad = [i for i, v in enumerate(got) if v != (first + i) & 0xFFFFFFFF]
    assert not bad, f"{len(bad)} frames off the counter, first at {bad[0]}: {got[max(0, bad[0] - 2) : bad[0] + 3]}"
    m = wait_log(srv, r"audio: capture stopped after (\d+) frames \((.*?)\)", since)
    delivered = int(m.group(1))
    # The device delivered every frame arecord kept. The ones before ``first`` came back before the
    # driver marked the substream running (a few 1 ms URBs: 672 frames in one run); the bound
    # only catches a counter that does not restart with the stream.
    assert first + CAPTURE_FRAMES <= delivered, (first, delivered)
    assert first < 5 * RATE, first
    print(f"capture: {CAPTURE_FRAMES} frames in {took:.1f}s, first frame {first}, device delivered {delivered}")

    # playback: the device counts what arrives and checksums the non-silent frames
    pcm = playback_wav(str(g.share_dir / "playback.wav"), PLAYBACK_FRAMES)
    since = len(srv.log())
    t0 = time.monotonic()
    r = g.run(f"aplay {alsa_opts} -D {device} {GUEST_SHARE}/playback.wav", timeout=300)
    took = time.monotonic() - t0
    assert r.rc == 0, r
    assert "underrun" not in r.out, r
    m = wait_log(
        srv, r"audio: playback stopped after (\d+) frames \((\d+) silent, crc32 ([0-9a-f]{8}) of the others", since
    )
    frames, silent, crc = int(m.group(1)), int(m.group(2)), int(m.group(3), 16)
    print(f"playback: {PLAYBACK_FRAMES} frames in {took:.1f}s; device: {frames} frames, {silent} silent")
    # Every frame of the WAV arrived, in order: the WAV has no silent frame, so the non-silent frames
    # the device counted and checksummed must be exactly the WAV's. The silent ones are padding: aplay
    # fills its last period with silence (``aplay -v`` here: period 6000 frames, buffer 24000; in one
    # run 4526 silent frames, all after the WAV's last frame). Up to two periods of silence are
    # allowed; more would mean the driver streamed silence, e.g. after an underrun.
    assert frames - silent == PLAYBACK_FRAMES, m.group(0)
    assert crc == zlib.crc32(pcm), m.group(0)
    assert silent <= RATE // 4, m.group(0)
