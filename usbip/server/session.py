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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ..device import Device
from ..pool import BufferPool
from ..protocol import (
    HEADER_SIZE,
    ISO_DESC_SIZE,
    USBIP_DIR_IN,
    ProtocolError,
    Urb,
    pack_ret_unlink,
    ret_submit_header,
    urb_from_submit,
)
from ..protocol.constants import (
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
    USBIP_CMD_SUBMIT,
    XFER_BULK,
    XFER_CONTROL,
    XFER_ISOC,
)

log = logging.getLogger(__name__)

MAX_PENDING = 4096  # URBs in flight per connection before the peer is treated as hostile
MAX_PENDING_BYTES = 512 * 1024 * 1024  # IN buffers allocated for those URBs

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


def _seq_after(a: int, b: int) -> bool:
    """Seqnum ``a`` comes after ``b`` (32-bit serial number arithmetic, so wrap-around works)."""
    return 0 < ((a - b) & 0xFFFFFFFF) < 0x80000000


class UrbSession:
    """Runs the URB phase for ``device`` and writes replies through ``send(buffers, nbytes)``."""

    def __init__(
        self,
        device: Device,
        send: Callable[[list[Any], int], None],
        pool: BufferPool,
        devid: int | None = None,
    ) -> None:
        self.device = device
        self.devid = device.devid if devid is None else devid
        self.send = send
        self.pool = pool
        self.pending: dict[int, Urb] = {}
        self.pending_bytes = 0
        self.closing = False
        self._idle: asyncio.Event | None = None
        self._ep_cache: dict[int, tuple[int | None, int]] = {}
        self.submitted = 0
        self.completed = 0
        self.max_seqnum = 0  # highest CMD_SUBMIT seqnum seen
        self._early_unlinks: dict[int, int] = {}  # target seqnum -> seqnum of its early CMD_UNLINK

    # ------------------------------------------------------------ input
    def handle(self, messages: list[Any]) -> None:
        """Process every message of one read. Raises ProtocolError to end the connection."""
        for msg in messages:
            if msg.devid != self.devid:
                raise ProtocolError(f"header names devid 0x{msg.devid:08x}, imported device is 0x{self.devid:08x}")
            if msg.command == USBIP_CMD_SUBMIT:
                self._submit(msg)
            else:
                self._unlink(msg)

    def endpoint_type(self, ep: int, direction: int) -> int | None:
        return self._endpoint(ep, direction)[0]

    def _endpoint(self, ep: int, direction: int) -> tuple[int | None, int]:
        """(transfer type or None, allowed flag mask) of an endpoint, cached per configuration."""
        key = ep << 1 | direction
        try:
            return self._ep_cache[key]
        except KeyError:
            xfer = XFER_CONTROL if ep == 0 else self.device.endpoint_type(ep, direction) if ep < 16 else None
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
        if len(pending) >= MAX_PENDING:
            raise ProtocolError(f"more than {MAX_PENDING} URBs in flight")
        if self._early_unlinks and self._settle_early_unlinks(seqnum):
            return  # unlinked before it arrived: answered with RET_UNLINK, never submitted
        if _seq_after(seqnum, self.max_seqnum):
            self.max_seqnum = seqnum
        ep = msg.ep
        direction = msg.direction
        if direction == USBIP_DIR_IN:
            tbl = msg.transfer_buffer_length
            if self.pending_bytes + tbl > MAX_PENDING_BYTES:
                raise ProtocolError(f"more than {MAX_PENDING_BYTES} bytes of IN buffers in flight")
            self.pending_bytes += tbl
            urb = urb_from_submit(msg, self.pool.acquire(tbl), self._completed)
        else:
            urb = urb_from_submit(msg, msg.data, self._completed)
        pending[seqnum] = urb
        self.submitted += 1
        xfer, allowed = self._endpoint(ep, direction)
        if xfer is None:
            # usb_submit_urb() answers -ENOENT for an endpoint the device does not have
            log.debug("seqnum %d: no endpoint %d %s", seqnum, ep, "IN" if direction else "OUT")
            urb.complete(ENOENT, 0)
            return
        if (xfer == XFER_ISOC) != (urb.iso is not None):
            log.debug("seqnum %d: iso descriptors do not match endpoint type %d", seqnum, xfer)
            urb.complete(EINVAL, 0)
            return
        urb.transfer_flags &= allowed
        if ep == 0 and msg.setup[0] == 0x23 and msg.setup[1] == 3 and msg.setup[2] == 4:
            # SET_FEATURE(PORT_RESET): the stub resets the device itself (stub_rx.c: tweak_reset_device_cmd)
            self.invalidate_endpoints()
            try:
                self.device.reset()
            except Exception:
                log.exception("device %s failed to reset", self.device.busid)
            urb.complete(0, 0)
            return
        try:
            self.device.submit(urb)
        except Exception:
            log.exception("device %s failed on %r", self.device.busid, urb)
            urb.complete(EINVAL, 0)

    def _unlink(self, msg: Any) -> None:
        target = msg.unlink_seqnum
        urb = self.pending.get(target)
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
        self.send([hdr], HEADER_SIZE)

    def _completed(self, urb: Urb) -> None:
        pending = self.pending
        del pending[urb.seqnum]
        self.completed += 1
        is_in = urb.direction == USBIP_DIR_IN
        if not self.closing:
            if urb.unlink_seqnum >= 0:
                self._send_ret_unlink(urb.unlink_seqnum, urb.status)
            else:
                self._send_ret_submit(urb, is_in)
                if urb.ep == 0 and urb.setup[1] in (9, 11) and urb.setup[0] in (0, 1):
                    self.invalidate_endpoints()  # SET_CONFIGURATION / SET_INTERFACE
        if is_in:
            self.pending_bytes -= urb.transfer_buffer_length
            self.pool.release(urb.buffer)  # reused once the queued payload view is sent
        urb.buffer = b""
        if self._idle is not None and not pending:
            self._idle.set()

    def _send_ret_submit(self, urb: Urb, is_in: bool) -> None:
        iso = urb.iso
        if iso is None:
            actual = urb.actual_length
            if actual < 0 or actual > urb.transfer_buffer_length:
                log.error("device %s reported actual_length %d for %r", self.device.busid, actual, urb)
                actual = max(0, min(actual, urb.transfer_buffer_length))
            hdr = ret_submit_header(urb, actual, urb.number_of_packets, 0)
            if is_in and actual:
                self.send([hdr, memoryview(urb.buffer)[:actual]], HEADER_SIZE + actual)
            else:
                self.send([hdr], HEADER_SIZE)
            return
        # isochronous: actual_length is the sum of the packets' actual lengths (usbip_recv_iso checks it)
        n = len(iso)
        total = iso.total_actual()
        hdr = ret_submit_header(urb, total, n, iso.error_count())
        descs = bytearray(n * ISO_DESC_SIZE)
        iso.pack_into(descs, 0)
        parts: list[Any] = [hdr]
        if is_in and total:
            view = memoryview(urb.buffer)
            for off, _length, act, _status in iso.tolist():
                if act:
                    parts.append(view[off : off + act])
        else:
            total = 0
        parts.append(descs)
        self.send(parts, HEADER_SIZE + total + len(descs))

    # ------------------------------------------------------------ teardown
    async def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel every pending URB and wait (bounded) for the device to complete them."""
        self.closing = True
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
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                log.error("device %s left %d URBs pending after %.1fs", self.device.busid, len(self.pending), timeout)
                for urb in list(self.pending.values()):
                    urb.complete(ECONNRESET, 0)
