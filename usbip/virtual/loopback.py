"""A test device modelled on the Linux gadget zero (f_sourcesink.c + f_loopback.c).

Default ids 0525:a4a0 so the kernel's ``usbtest`` driver binds. One vendor-specific
interface (class 0xff):

=========  ======  =====================================================  ===========
endpoint   type    role                                                   alt setting
=========  ======  =====================================================  ===========
0x81       bulk    source: every IN URB is filled with the pattern        0 and 1
0x01       bulk    sink: accepts everything (pattern 1: checked)          0 and 1
0x82       bulk    loopback IN: returns what 0x02 received, in order      0 and 1
0x02       bulk    loopback OUT: FIFO of buffers (bounded by fifo_size)   0 and 1
0x84       int     source (bInterval 4 at high speed)                     0 and 1
0x04       int     sink                                                   0 and 1
0x83       iso     source, 1024-byte packets                              1
0x03       iso     sink                                                   1
=========  ======  =====================================================  ===========

Patterns are gadget zero's: 0 = zeros, 1 = ``(i % wMaxPacketSize) % 63`` counted from
the start of each transfer (that is what ``usbtest pattern=1`` checks; it is
``i % 63`` within every packet). Vendor requests 0x5b (control write, up to 4096
bytes) and 0x5c (control read of the same buffer) are usbtest's test 14.

Bulk max packet size: 512 at high speed, 1024 at super speed (with BOS and
SuperSpeed endpoint companion descriptors), 64 at full speed.
"""

from __future__ import annotations

from collections import deque

from ..pool.buffers import PoolBuffer as _PureBuffer
from ..protocol.constants import EOVERFLOW, XFER_BULK, XFER_INT, XFER_ISOC, Speed
from ..usb.ch9 import DIR_IN, TYPE_MASK, TYPE_VENDOR
from ..usb.device import Urb
from .descriptors import bulk_max_packet, configuration, endpoint, instance_serial, interface
from .framework import VirtualDevice
from .waiting import WaitQueue, complete_in

CTRL_BUF_SIZE = 4096  # USB_COMP_EP0_BUFSIZ
# gadget zero's vendor requests (drivers/usb/gadget/function/f_loopback.c, usbtest's ctrl_out test 14)
REQ_CONTROL_WRITE = 0x5B
REQ_CONTROL_READ = 0x5C
_CACHE = 1 << 20
_ZEROS = bytes(_CACHE)
_ZMV = memoryview(_ZEROS)
_patterns: dict[int, bytes] = {}

_ZEROED: tuple[type, ...]
try:
    from ..pool._buffers import PoolBuffer as _CompiledBuffer

    _ZEROED = (_CompiledBuffer, _PureBuffer)
except ImportError:  # pragma: no cover - depends on the build
    _ZEROED = (_PureBuffer,)


def pattern_bytes(max_packet: int, length: int = _CACHE) -> bytes:
    """Gadget zero's pattern 1 for an endpoint with ``max_packet``: ``(i % max_packet) % 63``."""
    cached = _patterns.get(max_packet)
    if cached is None:
        block = bytes((i % 63) for i in range(max_packet))
        cached = _patterns[max_packet] = (block * (_CACHE // max_packet + 1))[:_CACHE]
    if length <= _CACHE:
        return cached[:length]
    block = cached[:max_packet]
    return (block * (length // max_packet + 1))[:length]


class LoopbackDevice(VirtualDevice):
    def __init__(
        self,
        pattern: int = 0,
        speed: Speed = Speed.HIGH,
        *,
        vendor_id: int = 0x0525,
        product_id: int = 0xA4A0,
        fifo_size: int = 1 << 20,
        serial: str | None = None,
        **kw,
    ) -> None:
        if pattern not in (0, 1):
            raise ValueError("pattern must be 0 (zeros) or 1 (mod 63)")
        super().__init__(
            vendor_id=vendor_id,
            product_id=product_id,
            bcd_device=0x0100,
            manufacturer=kw.pop("manufacturer", "cyusbip"),
            product=kw.pop("product", "Gadget Zero"),
            serial=serial or instance_serial("GZ"),
            speed=speed,
            **kw,
        )
        self.pattern = pattern
        self.fifo_size = fifo_size
        self.sink_errors = 0  # OUT transfers (bulk, interrupt, iso packets) with bad pattern data
        self.ctrl_buf = bytearray(CTRL_BUF_SIZE)
        self._fifo: deque[bytes] = deque()
        self._fifo_bytes = 0
        self._loop_in_wait = WaitQueue(self)
        self._loop_out_wait = WaitQueue(self)

        sp = self.speed
        bulk = bulk_max_packet(sp)
        if sp >= Speed.HIGH:
            int_mp, int_iv, iso_mp, iso_iv = 1024, 4, 1024, 4
        else:
            int_mp, int_iv, iso_mp, iso_iv = 64, 1, 1023, 1
        self.bulk_max_packet = bulk
        self.iso_max_packet = iso_mp
        common = [
            endpoint(0x81, XFER_BULK, bulk),
            endpoint(0x01, XFER_BULK, bulk),
            endpoint(0x82, XFER_BULK, bulk),
            endpoint(0x02, XFER_BULK, bulk),
            endpoint(0x84, XFER_INT, int_mp, int_iv),
            endpoint(0x04, XFER_INT, int_mp, int_iv),
        ]
        iso = [endpoint(0x83, XFER_ISOC, iso_mp, iso_iv), endpoint(0x03, XFER_ISOC, iso_mp, iso_iv)]
        self.setup_descriptors(
            [
                configuration(
                    [
                        interface(0, 0, 0xFF, 0, 0, common, name="source and sink data"),
                        interface(0, 1, 0xFF, 0, 0, common + iso, name="source and sink data (iso)"),
                    ],
                    value=1,
                    name="source/sink and loopback",
                    max_power_ma=100,
                )
            ]
        )
        self.on_endpoint(0x81, self._make_source(bulk))
        self.on_endpoint(0x01, self._make_sink(bulk))
        self.on_endpoint(0x84, self._make_source(int_mp))
        self.on_endpoint(0x04, self._make_sink(int_mp))
        self.on_endpoint(0x82, self._loop_in)
        self.on_endpoint(0x02, self._loop_out)
        self.on_endpoint(0x83, self._make_iso_source(iso_mp))
        self.on_endpoint(0x03, self._make_iso_sink(iso_mp))

    # ------------------------------------------------------------ source / sink (hot path)
    def _make_source(self, max_packet: int):
        src = _ZMV if self.pattern == 0 else memoryview(pattern_bytes(max_packet))
        lim = len(src)
        block = lim - lim % max_packet
        # the pool hands its buffers out zeroed and the server gives each IN URB a fresh one:
        # zeros are already there (any other buffer, e.g. a test's, is written)
        zeroed = _ZEROED if self.pattern == 0 else ()

        def source(urb: Urb) -> None:
            n = urb.transfer_buffer_length
            buf = urb.buffer
            if type(buf) in zeroed:
                pass
            elif n <= lim:
                memoryview(buf)[:n] = src[:n]
            else:
                mv = memoryview(buf)
                pos = 0
                while pos < n:
                    k = min(block, n - pos)
                    mv[pos : pos + k] = src[:k]
                    pos += k
                mv.release()
            urb.complete(0, n)

        return source

    def _make_sink(self, max_packet: int):
        if self.pattern == 0:

            def sink(urb: Urb) -> None:
                urb.complete(0, urb.transfer_buffer_length)

            return sink

        pat = pattern_bytes(max_packet)
        lim = len(pat)

        def check(urb: Urb) -> None:
            n = urb.transfer_buffer_length
            data = urb.buffer
            if n <= lim and len(data) == n:
                ok = pat.startswith(data)
            else:
                ok = bytes(memoryview(data)[:n]) == pattern_bytes(max_packet, n)
            if not ok:
                self.sink_errors += 1
            urb.complete(0, n)

        return check

    def _make_iso_source(self, max_packet: int):
        src = _ZMV[:max_packet] if self.pattern == 0 else memoryview(pattern_bytes(max_packet))[:max_packet]
        zeroed = _ZEROED if self.pattern == 0 else ()  # as in _make_source

        def iso_source(urb: Urb) -> None:
            # each packet gets min(length, max_packet) bytes of the pattern, counted from its start
            iso = urb.iso
            if iso is None:
                urb.complete(EOVERFLOW, 0)
                return
            total = iso.set_results(urb.transfer_buffer_length, max_packet)
            buf = urb.buffer
            if type(buf) not in zeroed:
                iso.fill(buf, src)
            urb.error_count = iso.error_count()
            urb.complete(0, total)

        return iso_source

    def _make_iso_sink(self, max_packet: int):
        pat = memoryview(pattern_bytes(max_packet))[:max_packet] if self.pattern == 1 else None

        def iso_sink(urb: Urb) -> None:
            # a packet longer than max_packet or outside the buffer fails with -EOVERFLOW
            iso = urb.iso
            if iso is None:
                urb.complete(EOVERFLOW, 0)
                return
            total = iso.set_results(len(urb.buffer), max_packet, clamp=False)
            if pat is not None:
                self.sink_errors += iso.mismatches(urb.buffer, pat)
            urb.error_count = iso.error_count()
            urb.complete(0, total)

        return iso_sink

    # ------------------------------------------------------------ loopback FIFO
    def _loop_out(self, urb: Urb) -> None:
        n = urb.transfer_buffer_length
        if not self._fifo:
            waiting = self._loop_in_wait.pop()
            if waiting is not None:
                k = min(n, waiting.transfer_buffer_length)
                with memoryview(urb.buffer) as src:
                    if k:
                        memoryview(waiting.buffer)[:k] = src[:k]
                    rest = bytes(src[k:n]) if k < n else None
                complete_in(waiting, k)
                if rest is not None:
                    self._push(rest)
                urb.complete(0, n)
                return
        if self._fifo_bytes >= self.fifo_size:
            self._loop_out_wait.park(urb)  # NAK until the IN side drains the FIFO
            return
        self._accept_out(urb)

    def _accept_out(self, urb: Urb) -> None:
        n = urb.transfer_buffer_length
        with memoryview(urb.buffer) as src:
            self._push(bytes(src[:n]))
        urb.complete(0, n)

    def _push(self, data: bytes) -> None:
        self._fifo.append(data)
        self._fifo_bytes += len(data)
        while self._fifo:
            waiting = self._loop_in_wait.pop()
            if waiting is None:
                break
            self._serve_in(waiting)

    def _loop_in(self, urb: Urb) -> None:
        if self._fifo:
            self._serve_in(urb)
        else:
            self._loop_in_wait.park(urb)

    def _serve_in(self, urb: Urb) -> None:
        data = self._fifo[0]
        n = min(len(data), urb.transfer_buffer_length)
        if n:
            memoryview(urb.buffer)[:n] = data[:n]
        if n < len(data):
            self._fifo[0] = data[n:]
        else:
            self._fifo.popleft()
        self._fifo_bytes -= n
        complete_in(urb, n)
        while self._fifo_bytes < self.fifo_size:
            out = self._loop_out_wait.pop()
            if out is None:
                break
            self._accept_out(out)

    @property
    def fifo_bytes(self) -> int:
        """Bytes written to ep 2 OUT not yet read back from ep 2 IN."""
        return self._fifo_bytes

    def on_reset(self) -> None:
        self._fifo.clear()
        self._fifo_bytes = 0

    # ------------------------------------------------------------ vendor control requests
    def control_request(self, urb: Urb, request_type: int, request: int, value: int, index: int, length: int):
        if request_type & TYPE_MASK != TYPE_VENDOR or value or index or length > CTRL_BUF_SIZE:
            return None
        if request == REQ_CONTROL_WRITE and request_type == TYPE_VENDOR:
            n = min(length, len(urb.buffer))
            self.ctrl_buf[:n] = memoryview(urb.buffer)[:n]
            return True
        if request == REQ_CONTROL_READ and request_type == (DIR_IN | TYPE_VENDOR):
            return memoryview(self.ctrl_buf)[:length]
        return None
