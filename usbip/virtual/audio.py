"""A USB Audio Class 2.0 device: a stereo microphone with a test signal and a speaker that counts.

The layout follows the UAC2 spec (rev. 2.0, sections 4.6 - 4.10) and is what the Linux
``snd-usb-audio`` driver needs to create a card with one capture and one playback PCM
(``sound/usb/card.c``, ``stream.c``, ``format.c``, ``clock.c``)::

    IAD (interfaces 0-2, class audio, protocol 0x20 = UAC2: card.c refuses UAC2 without it)
    interface 0  AudioControl: header (bcdADC 2.00), clock source, two terminal pairs
                 clock source 0x10  internal, programmable; SAM_FREQ read/write, CLOCK_VALID read
                 capture:   input terminal 0x01 (microphone) -> output terminal 0x02 (USB streaming)
                 playback:  input terminal 0x03 (USB streaming) -> output terminal 0x04 (speaker)
    interface 1  AudioStreaming, capture: alt 0 no endpoint, alt 1 iso IN 0x81 (asynchronous)
    interface 2  AudioStreaming, playback: alt 0 no endpoint, alt 1 iso OUT 0x01 (adaptive)

Both streams are 2 channels of 16-bit PCM (Format Type I, 4-byte frames). The sync types need
no feedback endpoint: ``snd_usb_audioformat_set_sync_ep()`` (pcm.c) only looks for one for an
asynchronous OUT or an adaptive IN endpoint. No feature unit: the driver needs none.

Class requests (UAC2 5.2): the clock source answers SAM_FREQ CUR (GET and SET, 4 bytes; SET of a
rate not offered STALLs), SAM_FREQ RANGE (GET, layout 3: one subrange per rate, ascending) and
CLOCK_VALID CUR (GET, 1 byte: 1). Everything else STALLs, as a device does for a control its
descriptors do not advertise (terminal and interface bmControls are 0).

Timing: at high speed the endpoints use ``bInterval`` 4 by default (one packet per millisecond,
48 frames at 48 kHz; ``interval=1`` gives one packet per 125 us microframe, 6 frames). Each
packet carries the frames of its (micro)frame: ``rate / packets_per_second`` with the fraction
carried to the next packet (44.1 kHz at 1 ms: nine packets of 44 frames, then one of 45).
With ``realtime`` (the default) an URB completes when its last packet's slot has passed, each
URB's packets taking the slots right after the previous URB's (or now, if the host fell behind),
so a host streams at the real rate; ``realtime=False`` completes URBs at once (unit tests).

Capture signal: frame *n* of a stream (counted from the SET_INTERFACE that started it) is *n*
as a little-endian uint32, so the left sample is ``n & 0xffff`` and the right one ``n >> 16``.
Frames are counted when delivered, so the signal has no gaps even when the host is late.

Playback: the device counts the frames it receives, the all-zero (silent) ones among them and a
CRC-32 of the others in order (:attr:`AudioDevice.playback`). When a stream stops (alt 0,
SET_CONFIGURATION or the importer going away) after moving packets, it logs at INFO
``audio: capture stopped after N frames`` / ``audio: playback stopped after N frames (S silent,
crc32 X of the others)``.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import sys
import zlib
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..protocol.constants import EINVAL, EOVERFLOW, XFER_ISOC, Speed
from ..usb.ch9 import DIR_IN, RECIP_INTERFACE, RECIP_MASK, TYPE_CLASS, TYPE_MASK
from ..usb.device import Urb
from .descriptors import Association, configuration, endpoint, instance_serial, interface
from .framework import VirtualDevice

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- UAC2 constants (include/linux/usb/audio-v2.h)
CLASS_AUDIO = 0x01
SUBCLASS_AUDIOCONTROL = 0x01
SUBCLASS_AUDIOSTREAMING = 0x02
PROTOCOL_UAC2 = 0x20  # UAC_VERSION_2 (bInterfaceProtocol / bFunctionProtocol)

CS_INTERFACE = 0x24
CS_ENDPOINT = 0x25
# AudioControl descriptor subtypes
AC_HEADER = 0x01
AC_INPUT_TERMINAL = 0x02
AC_OUTPUT_TERMINAL = 0x03
AC_CLOCK_SOURCE = 0x0A
# AudioStreaming descriptor subtypes
AS_GENERAL = 0x01
AS_FORMAT_TYPE = 0x02
EP_GENERAL = 0x01

FUNCTION_IO_BOX = 0x08  # bCategory (UAC2 appendix A.7)
FORMAT_TYPE_I = 0x01
FORMAT_PCM = 0x00000001  # bmFormats bit 0 (Frmts20 A.2.1)
CHANNELS_FRONT_LR = 0x00000003  # bmChannelConfig: front left | front right

# terminal types (Termt20)
TERMINAL_USB_STREAMING = 0x0101
TERMINAL_MICROPHONE = 0x0201
TERMINAL_SPEAKER = 0x0301

# request codes (UAC2 A.14) and clock source control selectors (A.17.1)
REQ_CUR = 0x01
REQ_RANGE = 0x02
CS_SAM_FREQ_CONTROL = 0x01
CS_CLOCK_VALID_CONTROL = 0x02

# iso endpoint sync types (bmAttributes bits 3:2)
SYNC_ASYNC = 0x04
SYNC_ADAPTIVE = 0x08

# entity ids and interface numbers of this device
CLOCK_ID = 0x10
CAPTURE_IT, CAPTURE_OT = 0x01, 0x02
PLAYBACK_IT, PLAYBACK_OT = 0x03, 0x04
AC_INTERFACE, CAPTURE_INTERFACE, PLAYBACK_INTERFACE = 0, 1, 2
CAPTURE_EP, PLAYBACK_EP = 0x81, 0x01

CHANNELS = 2
SAMPLE_BYTES = 2
FRAME_BYTES = CHANNELS * SAMPLE_BYTES

_U32 = next(t for t in "IL" if array(t).itemsize == 4)


def capture_frames(first: int, count: int) -> bytes:
    """``count`` frames of the capture signal starting at frame number ``first``."""
    start = first & 0xFFFFFFFF
    if start + count <= 1 << 32:
        frames = array(_U32, range(start, start + count))
    else:
        frames = array(_U32, [(start + i) & 0xFFFFFFFF for i in range(count)])
    if sys.byteorder == "big":
        frames.byteswap()
    return frames.tobytes()


# ---------------------------------------------------------------- descriptors


def _cs(subtype: int, fmt: str, *fields: int) -> bytes:
    """A class-specific interface descriptor: bLength, CS_INTERFACE, subtype, fields."""
    body = struct.pack("<" + fmt, *fields)
    return bytes((3 + len(body), CS_INTERFACE, subtype)) + body


def clock_source(clock_id: int) -> bytes:
    """UAC2 4.7.2.1: internal programmable clock (bmAttributes 0b11); bmControls: SAM_FREQ
    host programmable (0b11), CLOCK_VALID read-only (0b01 << 2); no associated terminal, no name."""
    return _cs(AC_CLOCK_SOURCE, "BBBBB", clock_id, 0x03, 0x07, 0, 0)


def input_terminal(terminal_id: int, terminal_type: int, clock_id: int) -> bytes:
    """UAC2 4.7.2.4 (17 bytes): no associated terminal, 2 channels FL/FR, no controls."""
    return _cs(
        AC_INPUT_TERMINAL, "BHBBBIBHB", terminal_id, terminal_type, 0, clock_id, CHANNELS, CHANNELS_FRONT_LR, 0, 0, 0
    )


def output_terminal(terminal_id: int, terminal_type: int, source_id: int, clock_id: int) -> bytes:
    """UAC2 4.7.2.5 (12 bytes): no associated terminal, no controls."""
    return _cs(AC_OUTPUT_TERMINAL, "BHBBBHB", terminal_id, terminal_type, 0, source_id, clock_id, 0, 0)


def ac_header(units: bytes) -> bytes:
    """UAC2 4.7.2 (9 bytes): bcdADC 2.00, wTotalLength = header + every unit/terminal/clock."""
    return _cs(AC_HEADER, "HBHB", 0x0200, FUNCTION_IO_BOX, 9 + len(units), 0) + units


def as_general(terminal_link: int) -> bytes:
    """UAC2 4.9.2 (16 bytes): Format Type I PCM, 2 channels FL/FR, no controls."""
    return _cs(AS_GENERAL, "BBBIBIB", terminal_link, 0, FORMAT_TYPE_I, FORMAT_PCM, CHANNELS, CHANNELS_FRONT_LR, 0)


def format_type_i() -> bytes:
    """Frmts20 2.3.1.6 (6 bytes): 2-byte subslots, 16 valid bits."""
    return _cs(AS_FORMAT_TYPE, "BBB", FORMAT_TYPE_I, SAMPLE_BYTES, SAMPLE_BYTES * 8)


def iso_endpoint_general() -> bytes:
    """UAC2 4.10.1.2 (8 bytes): no MaxPacketsOnly, no pitch/overrun controls, no lock delay."""
    return struct.pack("<BBBBBBH", 8, CS_ENDPOINT, EP_GENERAL, 0, 0, 0, 0)


def rate_range(rates: Iterable[int]) -> bytes:
    """SAM_FREQ RANGE parameter block (UAC2 5.2.3.3, layout 3): one (rate, rate, 0) per rate."""
    ordered = sorted(set(rates))
    return struct.pack("<H", len(ordered)) + b"".join(struct.pack("<III", r, r, 0) for r in ordered)


# ---------------------------------------------------------------- streams


@dataclass
class StreamStats:
    """Counters of one stream; reset when it starts (alt 1), kept after it stops."""

    frames: int = 0  # frames delivered (capture) or received (playback)
    packets: int = 0  # iso packets completed
    silent_frames: int = 0  # playback: all-zero frames among ``frames``
    crc32: int = 0  # playback: CRC-32 of the non-silent frames, in order
    running: bool = False
    starts: int = 0  # how many times the stream started


class _Stream:
    """Timing state of one direction: the next free packet slot and the fractional frames."""

    __slots__ = ("name", "next_slot", "remainder", "stats")

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats = StreamStats()
        self.next_slot = 0.0  # event loop time at which the next packet slot begins
        self.remainder = 0  # fractional frames carried over, in 1/packets_per_second units

    def start(self) -> None:
        starts = self.stats.starts + 1
        self.stats = StreamStats(running=True, starts=starts)
        self.next_slot = 0.0
        self.remainder = 0


class AudioDevice(VirtualDevice):
    """UAC2 stereo 16-bit capture + playback (see the module docstring)."""

    def __init__(
        self,
        rates: Iterable[int] = (48000,),
        *,
        speed: Speed = Speed.HIGH,
        interval: int = 4,
        realtime: bool = True,
        **kw: Any,
    ) -> None:
        rates = tuple(int(r) for r in rates)
        if not rates or any(not 8000 <= r <= 192000 for r in rates):
            raise ValueError(f"sample rates must be 8000..192000 Hz, got {rates}")
        speed = Speed(speed)
        if speed == Speed.HIGH:
            if not 1 <= interval <= 4:  # snd_usb_parse_datainterval() takes bInterval 1..4
                raise ValueError(f"high-speed audio bInterval must be 1..4, got {interval}")
            packets_per_second = 8000 >> (interval - 1)
        elif speed == Speed.FULL:
            interval, packets_per_second = 1, 1000  # full-speed iso: one packet per 1 ms frame
        else:
            raise ValueError(f"the audio device runs at full or high speed, not {speed.name}")
        super().__init__(
            vendor_id=kw.pop("vendor_id", 0x1D6B),  # the Linux audio gadget's ids (g_audio)
            product_id=kw.pop("product_id", 0x0101),
            bcd_device=0x0100,
            device_class=0xEF,  # miscellaneous / common class / IAD (IAD ECN)
            device_subclass=0x02,
            device_protocol=0x01,
            manufacturer=kw.pop("manufacturer", "cyusbip"),
            product=kw.pop("product", "Virtual Audio"),
            serial=kw.pop("serial", None) or instance_serial("AUD"),
            speed=speed,
            **kw,
        )
        self.rates = rates
        self.sample_rate = rates[0]
        self.interval = interval
        self.packets_per_second = packets_per_second
        self.realtime = realtime
        # the most frames a packet carries, plus one of headroom (a host clock running slightly fast)
        self.max_packet = (-(-max(rates) // packets_per_second) + 1) * FRAME_BYTES
        self._capture = _Stream("capture")
        self._playback = _Stream("playback")
        self._streams = {CAPTURE_INTERFACE: self._capture, PLAYBACK_INTERFACE: self._playback}

        units = (
            clock_source(CLOCK_ID)
            + input_terminal(CAPTURE_IT, TERMINAL_MICROPHONE, CLOCK_ID)
            + output_terminal(CAPTURE_OT, TERMINAL_USB_STREAMING, CAPTURE_IT, CLOCK_ID)
            + input_terminal(PLAYBACK_IT, TERMINAL_USB_STREAMING, CLOCK_ID)
            + output_terminal(PLAYBACK_OT, TERMINAL_SPEAKER, PLAYBACK_IT, CLOCK_ID)
        )
        streaming = format_type_i()
        capture_ep = endpoint(
            CAPTURE_EP, XFER_ISOC, self.max_packet, interval, attributes=SYNC_ASYNC, extra=iso_endpoint_general()
        )
        playback_ep = endpoint(
            PLAYBACK_EP, XFER_ISOC, self.max_packet, interval, attributes=SYNC_ADAPTIVE, extra=iso_endpoint_general()
        )
        audio = (CLASS_AUDIO, SUBCLASS_AUDIOSTREAMING, PROTOCOL_UAC2)
        self.setup_descriptors(
            [
                configuration(
                    [
                        interface(
                            AC_INTERFACE,
                            0,
                            CLASS_AUDIO,
                            SUBCLASS_AUDIOCONTROL,
                            PROTOCOL_UAC2,
                            name="Audio Control",
                            extra=ac_header(units),
                        ),
                        interface(CAPTURE_INTERFACE, 0, *audio, name="Capture (idle)"),
                        interface(
                            CAPTURE_INTERFACE,
                            1,
                            *audio,
                            [capture_ep],
                            name="Capture",
                            extra=as_general(CAPTURE_OT) + streaming,
                        ),
                        interface(PLAYBACK_INTERFACE, 0, *audio, name="Playback (idle)"),
                        interface(
                            PLAYBACK_INTERFACE,
                            1,
                            *audio,
                            [playback_ep],
                            name="Playback",
                            extra=as_general(PLAYBACK_IT) + streaming,
                        ),
                    ],
                    value=1,
                    name="Audio",
                    max_power_ma=100,
                    associations=[Association(AC_INTERFACE, 3, CLASS_AUDIO, 0, PROTOCOL_UAC2, "Virtual Audio")],
                )
            ]
        )
        self.on_endpoint(CAPTURE_EP, self._capture_urb)
        self.on_endpoint(PLAYBACK_EP, self._playback_urb)

    # ------------------------------------------------------------ counters
    @property
    def capture(self) -> StreamStats:
        return self._capture.stats

    @property
    def playback(self) -> StreamStats:
        return self._playback.stats

    def describe(self) -> str:
        return f"UAC2, {'/'.join(str(r) for r in self.rates)} Hz, {self.packets_per_second} packets/s"

    # ------------------------------------------------------------ class requests (UAC2 5.2)
    def control_request(
        self, urb: Urb, request_type: int, request: int, value: int, index: int, length: int
    ) -> bytes | bool | None:
        if request_type & TYPE_MASK != TYPE_CLASS or request_type & RECIP_MASK != RECIP_INTERFACE:
            return None  # endpoint controls (pitch, overrun) are not advertised
        entity, intf = index >> 8, index & 0xFF
        selector, channel = value >> 8, value & 0xFF
        log.debug(
            "audio %s: class request %02x %02x entity 0x%02x interface %d selector %d channel %d length %d",
            self.busid,
            request_type,
            request,
            entity,
            intf,
            selector,
            channel,
            length,
        )
        if intf != AC_INTERFACE or entity != CLOCK_ID or channel != 0:
            return None  # terminals and AudioStreaming interfaces have no controls
        is_in = bool(request_type & DIR_IN)
        if selector == CS_SAM_FREQ_CONTROL:
            if request == REQ_CUR:
                return struct.pack("<I", self.sample_rate) if is_in else self._set_rate(urb, length)
            if request == REQ_RANGE and is_in:
                return rate_range(self.rates)
        elif selector == CS_CLOCK_VALID_CONTROL and request == REQ_CUR and is_in:
            return b"\x01"  # read-only (UAC2 5.2.5.1.2): SET stalls below
        return None

    def _set_rate(self, urb: Urb, length: int) -> bool:
        if length != 4 or urb.transfer_buffer_length < 4:
            return False
        (rate,) = struct.unpack_from("<I", urb.buffer)
        if rate not in self.rates:
            log.info("audio %s: refusing sample rate %d Hz (offers %s)", self.busid, rate, self.rates)
            return False
        if rate != self.sample_rate:
            log.info("audio %s: sample rate %d Hz", self.busid, rate)
        self.sample_rate = rate
        return True

    # ------------------------------------------------------------ streams start and stop
    def on_set_interface(self, interface: int, alternate: int) -> None:
        stream = self._streams.get(interface)
        if stream is None:
            return
        self._stop(stream, "alt 0" if alternate == 0 else f"alt {alternate} again")
        if alternate:
            stream.start()
            log.debug("audio %s: %s started at %d Hz", self.busid, stream.name, self.sample_rate)

    def on_configure(self, value: int) -> None:
        for stream in self._streams.values():
            self._stop(stream, "new configuration")

    async def close(self) -> None:
        for stream in self._streams.values():
            self._stop(stream, "device closed")
            # the next importer's URBs take slots from its own start, not after the last one's
            stream.next_slot = 0.0
            stream.remainder = 0
        await super().close()

    def _stop(self, stream: _Stream, why: str) -> None:
        st = stream.stats
        if not st.running:
            return
        st.running = False
        if not st.packets:  # snd-usb-audio selects alt 1 then alt 0 while probing: not worth an INFO line
            log.debug("audio %s: %s stopped before any packet (%s)", self.busid, stream.name, why)
        elif stream is self._playback:
            log.info(
                "audio: playback stopped after %d frames (%d silent, crc32 %08x of the others; %s; %s)",
                st.frames,
                st.silent_frames,
                st.crc32,
                why,
                self.busid,
            )
        else:
            log.info("audio: capture stopped after %d frames (%s; %s)", st.frames, why, self.busid)

    # ------------------------------------------------------------ isochronous endpoints
    def _capture_urb(self, urb: Urb) -> None:
        self._iso(urb, self._capture, self._fill_capture)

    def _playback_urb(self, urb: Urb) -> None:
        self._iso(urb, self._playback, self._take_playback)

    def _iso(self, urb: Urb, stream: _Stream, finish: Callable[[Urb], None]) -> None:
        """Finish ``urb`` now, or (realtime) when the slots of its packets have passed."""
        if urb.iso is None:
            urb.complete(EINVAL, 0)  # usb_submit_urb() refuses an iso URB without packets
            return
        if not self.realtime or not len(urb.iso):
            finish(urb)
            return
        loop = asyncio.get_running_loop()
        start = max(loop.time(), stream.next_slot)
        stream.next_slot = start + len(urb.iso) / self.packets_per_second
        timer = loop.call_at(stream.next_slot, self._finish_parked, urb, finish)

        def abort(u: Urb, status: int) -> None:
            timer.cancel()
            u.complete(status, 0)

        self.park(urb, abort)

    def _finish_parked(self, urb: Urb, finish: Callable[[Urb], None]) -> None:
        self.unpark(urb)
        if not urb.done:
            finish(urb)

    def _frames_in_next_packet(self, stream: _Stream) -> int:
        frames, stream.remainder = divmod(stream.remainder + self.sample_rate, self.packets_per_second)
        return frames

    def _fill_capture(self, urb: Urb) -> None:
        iso = urb.iso
        assert iso is not None
        stats = self._capture.stats
        size = min(urb.transfer_buffer_length, len(urb.buffer))
        total = errors = 0
        with memoryview(urb.buffer) as mv:
            for i in range(len(iso)):
                off, length = iso[i][:2]
                if off + length > size:
                    iso.set_result(i, 0, EOVERFLOW)
                    errors += 1
                    continue
                # a packet buffer too small for the slot gets what fits; the count stays gap-free
                n = min(self._frames_in_next_packet(self._capture), length // FRAME_BYTES)
                data = capture_frames(stats.frames, n)
                mv[off : off + len(data)] = data
                iso.set_result(i, len(data), 0)
                stats.frames += n
                stats.packets += 1
                total += len(data)
        urb.error_count = errors
        urb.complete(0, total)

    def _take_playback(self, urb: Urb) -> None:
        iso = urb.iso
        assert iso is not None
        size = min(urb.transfer_buffer_length, len(urb.buffer))
        total = errors = 0
        with memoryview(urb.buffer) as mv:
            for i in range(len(iso)):
                off, length = iso[i][:2]
                if off + length > size or length > self.max_packet:
                    iso.set_result(i, 0, EOVERFLOW)
                    errors += 1
                    continue
                self._count_playback(mv[off : off + length])
                iso.set_result(i, length, 0)
                total += length
        urb.error_count = errors
        urb.complete(0, total)

    def _count_playback(self, data: memoryview) -> None:
        stats = self._playback.stats
        stats.packets += 1
        n = len(data) // FRAME_BYTES
        if not n:
            return
        frames = array(_U32)
        frames.frombytes(data[: n * FRAME_BYTES])
        silent = frames.count(0)
        if silent < n:
            sound = frames if not silent else array(_U32, [f for f in frames if f])
            stats.crc32 = zlib.crc32(sound.tobytes(), stats.crc32)
        stats.frames += n
        stats.silent_frames += silent
