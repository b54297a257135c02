"""The URB phase of one imported device: CMD_SUBMIT/CMD_UNLINK in, RET_SUBMIT/RET_UNLINK out.

The rules are the kernel stub's (``drivers/usb/usbip/stub_rx.c``, ``stub_tx.c``):

* A header naming another device (devid) or an unknown command ends the
  connection (``valid_request``, ``stub_rx_pdu``); so does a reused seqnum.
* Transfer flags are masked to what the endpoint type allows (``masking_bogus_flags``).
* CMD_UNLINK of a pending URB cancels it; when it completes, a RET_UNLINK with
  the unlink's seqnum and the URB's status (normally -ECONNRESET) goes out and no
  RET_SUBMIT. An URB that already completed gets RET_UNLINK status 0 at once.
* RET_SUBMIT carries only command and seqnum in the basic header; for iso IN only
  each packet's actual bytes travel, back to back, then the descriptors.
* A control URB is checked as ``usb_submit_urb`` (drivers/usb/core/urb.c) checks it:
  wLength must equal transfer_buffer_length (-EBADR). The kernel only warns when
  the pipe's direction disagrees with bmRequestType; there is no usb core in front
  of a virtual device, so a data stage whose direction disagrees is refused
  (-EINVAL): an OUT request never carries IN data back.

Memory is bounded per connection (``ServerLimits.connection_budget``): IN buffers
and OUT payloads of URBs in flight plus replies queued for the socket. A submit
that would go beyond it waits in a backlog until URBs complete and replies drain;
an unlink still reaches the URB it names there. When the backlog is full too, the
session pauses reading the socket (``pause_input``) until it drains.

This file runs as it is (``usbip.server.urbsession``: the fallback when the extension is missing
or ``USBIP_NO_EXTENSIONS=1``), and Cython compiles it, augmented by ``_urbsession.pxd`` (a C
class, C attributes, typed locals; the codec's ``Urb`` and ``CmdSubmit`` as C structs), into
``usbip.server._urbsession``; ``usbip.server.session`` picks one at import.
"""

from __future__ import annotations

try:
    import cython
except ImportError:  # Cython is only needed to build: plain Python sees compiled == False
    from ..protocol import _cython_shim as cython  # type: ignore[no-redef,unused-ignore]


import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..cancelsafe import wait_for
from ..pool import BufferPool
from ..protocol import (
    HEADER_SIZE,
    ISO_DESC_SIZE,
    USBIP_DIR_IN,
    ProtocolError,
    Urb,
)
from ..protocol.constants import (
    EBADR,
    ECONNRESET,
    EINVAL,
    ENOENT,
    URB_DIR_IN,
    URB_FREE_BUFFER,
    URB_ISO_ASAP,
    URB_NO_INTERRUPT,
    URB_NO_TRANSFER_DMA_MAP,
    URB_SHORT_NOT_OK,
    URB_ZERO_PACKET,
)
from ..usb.ch9 import (
    DIR_IN,
    PORT_FEAT_RESET,
    RECIP_DEVICE,
    RECIP_INTERFACE,
    RT_PORT,
    SET_CONFIGURATION,
    SET_FEATURE,
    SET_INTERFACE,
    TYPE_STANDARD,
    XFER_BULK,
    XFER_CONTROL,
    XFER_ISOC,
)
from ..usb.device import Device
from .limits import ServerLimits

if not cython.compiled:  # compiled, _urbsession.pxd cimports them: the codec's C functions and C class
    from ..protocol import CmdSubmit, pack_ret_unlink, ret_submit_header, urb_from_submit

    _CPool: Any = None  # compiled: the compiled pool's C class (its acquire/release are C calls)
    _CStream: Any = None  # compiled: the compiled pump's C class (its write and byte count: C calls)

if TYPE_CHECKING:
    from ..capture import UrbCapture

log = logging.getLogger("usbip.server.session")  # the public module's name, whichever build runs

IMPLEMENTATION = "cython" if cython.compiled else "python"

#: An OUT payload smaller than 1/COPY_RATIO of the decoder buffer it lies in is copied before
#: it is parked: a small pending URB must not pin a whole receive chunk (256 KiB).
COPY_RATIO = 4
MAX_ENDPOINT = 15  # endpoint numbers are 4 bits (USB 2.0 9.6.6 bEndpointAddress)
_NO_ENDPOINT = (None, 0)
_CHANGES_ENDPOINTS = (SET_CONFIGURATION, SET_INTERFACE)
_CHANGES_ENDPOINTS_TYPES = (TYPE_STANDARD | RECIP_DEVICE, TYPE_STANDARD | RECIP_INTERFACE)  # OUT
MSG_OVERHEAD = 64  # bytes counted per backlogged message besides its payload

MAX_EARLY_UNLINKS = 256  # CMD_UNLINKs held for submits not seen yet

_BASE_FLAGS = URB_NO_TRANSFER_DMA_MAP | URB_NO_INTERRUPT | URB_DIR_IN | URB_FREE_BUFFER


def allowed_flags(xfer_type: int, is_in: bool) -> int:
    """The transfer flags the kernel stub keeps for an endpoint (stub_rx.c: masking_bogus_flags)."""
    allowed = _BASE_FLAGS
    if xfer_type == XFER_ISOC:
        return allowed | URB_ISO_ASAP
    if xfer_type == XFER_BULK and not is_in:
        allowed |= URB_ZERO_PACKET
    if is_in:
        allowed |= URB_SHORT_NOT_OK
    return allowed


def control_check(setup: Any, tbl: int, direction: int) -> int:
    """0 if a control URB is consistent, else the status it completes with.

    ``usb_submit_urb`` (drivers/usb/core/urb.c) refuses wLength != transfer_buffer_length
    with -EBADR; with a data stage, bmRequestType's direction bit must be the URB's.
    """
    wlength = setup[6] | setup[7] << 8
    if wlength != tbl:
        return EBADR
    if wlength and bool(setup[0] & DIR_IN) != (direction == USBIP_DIR_IN):
        return EINVAL
    return 0


_SEQ_MASK = 0xFFFFFFFF  # C constants in the compiled build (a literal this large would be a Python int)
_SEQ_HALF = 0x80000000


def _seq_after(a: int, b: int) -> bool:
    """Seqnum ``a`` comes after ``b`` (32-bit serial number arithmetic, so wrap-around works)."""
    return 0 < ((a - b) & _SEQ_MASK) < _SEQ_HALF


class UrbSession:
    """Runs the URB phase for ``device`` and writes replies through ``send(buffers, nbytes)``."""

    def __init__(
        self,
        device: Device,
        send: Callable[[list[Any], int], None],
        pool: BufferPool,
        devid: int | None = None,
        *,
        limits: ServerLimits | None = None,
        queued: Callable[[], int] | None = None,
        pause_input: Callable[[bool], None] | None = None,
        readmit: Callable[[], None] | None = None,
        capture: UrbCapture | None = None,
    ) -> None:
        self.device = device
        self.devid = device.devid if devid is None else devid
        self.send = send
        self.pool = pool
        # the compiled session writing to the compiled Stream (send=stream.write, queued=stream.queued_bytes)
        # calls its write and reads its byte count in C; anything else goes through the callbacks
        stream: Any = getattr(send, "__self__", None)
        if not (
            cython.compiled
            and type(stream) is _CStream
            and send == stream.write
            and queued is not None
            and queued == stream.queued_bytes
        ):
            stream = None
        self._stream = stream
        # the device's per-endpoint entry points (Device.submit_table), resolved once per import
        table = getattr(device, "submit_table", None)
        self._table = table() if table is not None else None
        # the compiled session holding the compiled pool calls it directly; else through ``pool``
        self._cpool = pool if cython.compiled and type(pool) is _CPool else None
        self.limits = limits = limits or ServerLimits()
        self._max_pending = limits.max_pending_urbs  # ServerLimits is frozen
        self.budget = limits.connection_budget
        self.backlog_limit = max(limits.connection_budget // 4, 64 * 1024)
        self._queued = queued or (lambda: 0)
        self._pause_input = pause_input
        self._readmit = readmit
        self.admission_waiting = False  # the stream waits for room to read a large OUT body
        self.pending: dict[int, Urb] = {}
        self.pending_bytes = 0  # IN buffers and OUT payloads of the URBs in ``pending``
        self.backlog: dict[int, Any] = {}  # seqnum -> CMD_SUBMIT waiting for budget, in arrival order
        self.backlog_bytes = 0
        self.input_paused = False
        self._draining = False
        self.closing = False
        self._idle: asyncio.Event | None = None
        self._ep_cache: dict[int, tuple[int | None, int]] = {}
        self.submitted = 0
        self.completed = 0
        self.unlinks = 0  # CMD_UNLINKs received
        self.errors: dict[int, int] = {}  # URBs completed with a non-zero status, by status
        self.max_seqnum = 0  # highest CMD_SUBMIT seqnum seen
        self._early_unlinks: dict[int, int] = {}  # target seqnum -> seqnum of its early CMD_UNLINK
        # with a capture (usbip.capture) every URB is recorded: S in _submit, C through the callback
        self.capture = capture
        self._on_complete = self._completed if capture is None else self._completed_captured

    # ------------------------------------------------------------ input
    def handle(self, messages: list[Any]) -> None:
        """Process every message of one read. Raises ProtocolError to end the connection."""
        backlog = self.backlog
        devid = self.devid
        for msg in messages:
            # the server's decoder hands over CMD_SUBMIT and CMD_UNLINK only
            if isinstance(msg, CmdSubmit):
                sub = msg  # compiled: a C-typed CmdSubmit, its fields C fields
                if sub.devid != devid:
                    raise self._foreign(sub.devid)
                if backlog or not self._fits(sub.transfer_buffer_length):
                    self._defer(sub)
                else:
                    self._submit(sub)
            else:
                if msg.devid != devid:
                    raise self._foreign(msg.devid)
                self._unlink(msg)

    def _foreign(self, devid: int) -> ProtocolError:
        return ProtocolError(f"header names devid 0x{devid:08x}, imported device is 0x{self.devid:08x}")

    # ------------------------------------------------------------ memory budget
    @property
    def held_bytes(self) -> int:
        """What this connection holds now: URB buffers in flight, backlogged payloads, unsent replies."""
        return self.pending_bytes + self._queued_bytes() + self.backlog_bytes

    def _queued_bytes(self) -> int:
        stream = self._stream
        return stream._out_bytes if stream is not None else self._queued()

    def _fits(self, cost: int) -> bool:
        # an URB larger than half the budget (up to max_transfer) runs once at most half is held
        queued = self._queued_bytes()
        return self.pending_bytes + queued + min(cost, self.budget >> 1) <= self.budget

    def admit(self, body: int) -> bool:
        """May the decoder allocate a ``body``-byte OUT payload now? (Stream asks before reading it.)"""
        held = self.pending_bytes + self._queued_bytes() + self.backlog_bytes
        ok = held + min(body, self.budget >> 1) <= self.budget
        self.admission_waiting = not ok
        return ok

    def _defer(self, msg: Any) -> None:
        seqnum = msg.seqnum
        if seqnum in self.backlog or seqnum in self.pending:
            raise ProtocolError(f"seqnum {seqnum} is already in flight")
        if len(self.backlog) + len(self.pending) >= self.limits.max_pending_urbs:
            raise ProtocolError(f"more than {self.limits.max_pending_urbs} URBs in flight")
        data = msg.data if msg.direction != USBIP_DIR_IN else None
        self.backlog[seqnum] = msg
        self.backlog_bytes += MSG_OVERHEAD + (len(data) if data is not None else 0)
        if self.backlog_bytes > self.backlog_limit and not self.input_paused:
            self._set_input_paused(True)

    def _set_input_paused(self, paused: bool) -> None:
        self.input_paused = paused
        if self._pause_input is not None:
            self._pause_input(paused)

    def drain(self) -> None:
        """Run backlogged submits that fit the budget now (URBs completed, replies were sent)."""
        if self._draining or self.closing:
            return
        backlog = self.backlog
        if backlog:
            self._draining = True
            try:
                while backlog:
                    seqnum, msg = next(iter(backlog.items()))
                    if not self._fits(msg.transfer_buffer_length):
                        break
                    del backlog[seqnum]
                    data = msg.data if msg.direction != USBIP_DIR_IN else None
                    self.backlog_bytes -= MSG_OVERHEAD + (len(data) if data is not None else 0)
                    self._submit(msg)
            finally:
                self._draining = False
        if self.input_paused and self.backlog_bytes <= self.backlog_limit // 2:
            self._set_input_paused(False)
        if self.admission_waiting and self._readmit is not None:
            self._readmit()

    def endpoint_type(self, ep: int, direction: int) -> int | None:
        return self._endpoint(ep, direction)[0]

    def _endpoint(self, ep: int, direction: int) -> tuple[int | None, int]:
        """(transfer type or None, allowed flag mask) of an endpoint, cached per configuration."""
        if ep > MAX_ENDPOINT or direction > 1:
            # stub_rx.c get_pipe: an endpoint number above 15 is refused. Checked before the key is
            # built: with 32-bit ep and direction (the compiled build) ``ep << 1 | direction`` wraps,
            # and 0x80000001 would alias endpoint 1 (found by fuzz_session)
            return _NO_ENDPOINT
        key = ep << 1 | direction
        try:
            return self._ep_cache[key]
        except KeyError:
            xfer = XFER_CONTROL if ep == 0 else self.device.endpoint_type(ep, direction)
            info = self._ep_cache[key] = (xfer, 0 if xfer is None else allowed_flags(xfer, direction == USBIP_DIR_IN))
            return info

    def invalidate_endpoints(self) -> None:
        """Forget cached endpoint types (after SET_CONFIGURATION / SET_INTERFACE)."""
        self._ep_cache.clear()

    def _submit(self, msg: Any) -> None:
        seqnum = msg.seqnum
        pending = self.pending
        if seqnum in pending:
            raise ProtocolError(f"seqnum {seqnum} is already in flight")
        if len(pending) >= self._max_pending:
            raise ProtocolError(f"more than {self._max_pending} URBs in flight")
        if self._early_unlinks and self._settle_early_unlinks(seqnum):
            if self.capture is not None:
                self.capture.cancelled_before_submit(msg)
            return  # unlinked before it arrived: answered with RET_UNLINK, never submitted
        if _seq_after(seqnum, self.max_seqnum):
            self.max_seqnum = seqnum
        ep = msg.ep
        direction = msg.direction
        tbl = msg.transfer_buffer_length
        if direction == USBIP_DIR_IN:
            # pool buffers come zeroed: a device that reports more than it wrote leaks nothing
            cpool = self._cpool
            buf = cpool.acquire(tbl) if cpool is not None else self.pool.acquire(tbl)
            urb = urb_from_submit(msg, buf, self._on_complete)
        else:
            data = msg.data
            base: Any = data.obj if isinstance(data, memoryview) else data  # what a view pins
            if tbl and tbl * COPY_RATIO < len(base):
                data = bytes(data)  # do not pin the decoder's receive chunk while this URB is parked
            urb = urb_from_submit(msg, data, self._on_complete)
        self.pending_bytes += tbl
        pending[seqnum] = urb
        self.submitted += 1
        xfer, allowed = self._endpoint(ep, direction)
        if self.capture is not None:
            self.capture.submit(urb, xfer)
        if xfer is None:
            # usb_submit_urb() answers -ENOENT for an endpoint the device does not have
            log.debug("seqnum %d: no endpoint %d %s", seqnum, ep, "IN" if direction else "OUT")
            self._refuse(urb, ENOENT)
            return
        if (xfer == XFER_ISOC) != (urb.iso is not None):
            log.debug("seqnum %d: iso descriptors do not match endpoint type %d", seqnum, xfer)
            self._refuse(urb, EINVAL)
            return
        if urb.iso is not None and urb.iso.total_length() > tbl:
            # packets each inside the buffer but overlapping: their actual lengths could add up to
            # more than the buffer, a RET_SUBMIT no client accepts (found by fuzz_session)
            log.debug("seqnum %d: iso packets add up to more than the %d-byte buffer", seqnum, tbl)
            self._refuse(urb, EINVAL)
            return
        urb.transfer_flags &= allowed
        if xfer == XFER_CONTROL:
            status = control_check(msg.setup, tbl, direction)
            if status:
                log.debug("seqnum %d: control request refused (%d): setup %s", seqnum, status, bytes(msg.setup).hex())
                self._refuse(urb, status)
                return
        setup = msg.setup
        if ep == 0 and setup[0] == RT_PORT and setup[1] == SET_FEATURE and setup[2] == PORT_FEAT_RESET:
            # SET_FEATURE(PORT_RESET): the stub resets the device itself (stub_rx.c: tweak_reset_device_cmd)
            self.invalidate_endpoints()
            try:
                self.device.reset()
            except Exception:
                log.exception("device %s failed to reset", self.device.busid)
            urb.complete(0, 0)
            return
        table = self._table
        try:
            if table is not None:
                table[ep | direction << 4](urb)  # ep <= 15, direction <= 1: checked by _endpoint
            else:
                self.device.submit(urb)
        except Exception:
            log.exception("device %s failed on %r", self.device.busid, urb)
            self._refuse(urb, EINVAL)

    def _unlink(self, msg: Any) -> None:
        self.unlinks += 1
        target = msg.unlink_seqnum
        urb = self.pending.get(target)
        if urb is None and target in self.backlog:
            # still waiting for budget: never submitted, answered as the kernel answers a cancelled URB
            held = self.backlog.pop(target)
            data = held.data if held.direction != USBIP_DIR_IN else None
            self.backlog_bytes -= MSG_OVERHEAD + (len(data) if data is not None else 0)
            if _seq_after(target, self.max_seqnum):
                self.max_seqnum = target
            self._send_ret_unlink(msg.seqnum, ECONNRESET)
            if self.capture is not None:
                self.capture.cancelled_before_submit(held)
            return
        if urb is None and _seq_after(target, self.max_seqnum) and len(self._early_unlinks) < MAX_EARLY_UNLINKS:
            # vhci can send a CMD_UNLINK before the CMD_SUBMIT it targets: vhci_tx_loop sends the
            # unlink list after the submit list, and an URB queued and unlinked in between has its
            # submit go out on the next pass. Answering 0 now would make vhci give the URB back
            # (its priv is on priv_rx by the time RET_UNLINK arrives) and then drop the connection
            # on the RET_SUBMIT that follows ("cannot find a urb of seqnum"). Hold the answer
            # until the submit shows up.
            self._early_unlinks[target] = msg.seqnum
            return
        if urb is None or urb.done:
            # already completed: its RET_SUBMIT is (or was) queued before this reply
            self._send_ret_unlink(msg.seqnum, 0)
            return
        if urb.cancelled:
            # a second unlink for the same URB: the first one will report it
            self._send_ret_unlink(msg.seqnum, 0)
            return
        urb.cancelled = True
        urb.unlink_seqnum = msg.seqnum
        try:
            self.device.cancel(urb)
        except Exception:
            log.exception("device %s failed to cancel %r", self.device.busid, urb)
            urb.complete(ECONNRESET, 0)

    def _settle_early_unlinks(self, seqnum: int) -> bool:
        """Answer held unlinks now that ``seqnum`` arrived; True if it was one of their targets."""
        early = self._early_unlinks
        hit = early.pop(seqnum, None)
        if hit is not None:
            self._send_ret_unlink(hit, ECONNRESET)
        for target in [t for t in early if not _seq_after(t, seqnum)]:
            # submits arrive in seqnum order: this one will never come (not vhci; answer as not found)
            self._send_ret_unlink(early.pop(target), 0)
        return hit is not None

    # ------------------------------------------------------------ output
    def _send_ret_unlink(self, seqnum: int, status: int) -> None:
        hdr = bytearray(HEADER_SIZE)
        pack_ret_unlink(hdr, 0, seqnum, status)
        self._send([hdr], HEADER_SIZE)

    def _send(self, parts: list[Any], nbytes: int) -> None:
        stream = self._stream
        if stream is not None:
            stream.write(parts, nbytes)
        else:
            self.send(parts, nbytes)

    def _refuse(self, urb: Urb, status: int) -> None:
        """Complete ``urb`` with ``status`` without handing it to the device (a capture shows E)."""
        if self.capture is not None:
            self.capture.refused(urb, status)
        urb.complete(status, 0)

    def _completed_captured(self, urb: Urb) -> None:
        self.capture.complete(urb)  # type: ignore[union-attr]  # before _completed releases the buffer
        self._completed(urb)

    def _completed(self, urb: Urb) -> None:
        pending = self.pending
        del pending[urb.seqnum]
        self.completed += 1
        if urb.status:
            self.errors[urb.status] = self.errors.get(urb.status, 0) + 1
        is_in = urb.direction == USBIP_DIR_IN
        if not self.closing:
            if urb.unlink_seqnum >= 0:
                self._send_ret_unlink(urb.unlink_seqnum, urb.status)
            else:
                self._send_ret_submit(urb, is_in)
            if urb.ep == 0 and urb.setup[1] in _CHANGES_ENDPOINTS and urb.setup[0] in _CHANGES_ENDPOINTS_TYPES:
                self.invalidate_endpoints()  # SET_CONFIGURATION / SET_INTERFACE ran (unlinked or not)
        self.pending_bytes -= urb.transfer_buffer_length
        if is_in:  # reused once the queued payload view is sent
            cpool = self._cpool
            if cpool is not None:
                cpool.release(urb.buffer)
            else:
                self.pool.release(urb.buffer)
        urb.buffer = b""
        if self._idle is not None and not pending:
            self._idle.set()
        if self.backlog or self.admission_waiting:
            self.drain()

    def _send_ret_submit(self, urb: Urb, is_in: bool) -> None:
        iso = urb.iso
        if iso is None:
            actual = urb.actual_length
            if actual < 0 or actual > urb.transfer_buffer_length:
                log.error("device %s reported actual_length %d for %r", self.device.busid, actual, urb)
                actual = max(0, min(actual, urb.transfer_buffer_length))
            hdr = ret_submit_header(urb, actual, urb.number_of_packets, 0)
            if is_in and actual:
                cpool = self._cpool
                if cpool is not None:  # read-only: sending the buffer is not writing it (no zeroing again)
                    view = cpool.view(urb.buffer, actual)
                else:
                    view = memoryview(urb.buffer)
                    if actual < len(view):
                        view = view[:actual]  # a full buffer (the common case) goes as it is: no second view
                self._send([hdr, view], HEADER_SIZE + actual)
            else:
                self._send([hdr], HEADER_SIZE)
            return
        # isochronous: actual_length is the sum of the packets' actual lengths (usbip_recv_iso checks it)
        n = len(iso)
        total = iso.total_actual()
        hdr = ret_submit_header(urb, total, n, iso.error_count())
        descs = iso.to_bytes()
        if is_in and total:
            # the packets' data back to back: a view of the buffer when they already lie so (read-only
            # from the compiled pool: sending is not writing)
            buf = urb.buffer if self._cpool is None else self._cpool.view(urb.buffer, len(urb.buffer))
            self._send([hdr, iso.payload(buf), descs], HEADER_SIZE + total + n * ISO_DESC_SIZE)
        else:
            self._send([hdr, descs], HEADER_SIZE + n * ISO_DESC_SIZE)

    # ------------------------------------------------------------ teardown
    async def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel every pending URB and wait (bounded) for the device to complete them."""
        self.closing = True
        self.backlog.clear()
        self.backlog_bytes = 0
        for urb in list(self.pending.values()):
            if not urb.done and not urb.cancelled:
                urb.cancelled = True
                try:
                    self.device.cancel(urb)
                except Exception:
                    log.exception("device %s failed to cancel %r", self.device.busid, urb)
                    urb.complete(ECONNRESET, 0)
        if self.pending:
            self._idle = asyncio.Event()
            try:
                await wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                log.error("device %s left %d URBs pending after %.1fs", self.device.busid, len(self.pending), timeout)
                for urb in list(self.pending.values()):
                    if urb.direction == USBIP_DIR_IN:
                        # the device may still write into it (a transfer the kernel has not ended):
                        # never hand this buffer to another URB, of this client or another
                        self.pool.abandon(urb.buffer)
                    urb.complete(ECONNRESET, 0)
