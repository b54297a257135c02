"""Where records come from: the server's URBs (:class:`UrbCapture`) and the client's messages
(:class:`ClientCapture`), both mapped to usbmon events."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..protocol.constants import ECONNRESET, ENODEV
from .format import (
    EV_COMPLETE,
    EV_ERROR,
    EV_SUBMIT,
    FLAG_ERROR,
    FLAG_IN,
    FLAG_NONE,
    FLAG_OUT,
    MASK32,
    MON_BULK,
    MON_CONTROL,
    MON_INT,
    MON_ISO,
    NO_SETUP,
    USBMON_XFER,
    iso_descriptors,
    iso_info,
)

if TYPE_CHECKING:
    from .file import CaptureFile


def _mon_xfer(xfer: int | None, ep: int, iso: bool) -> int:
    if iso:
        return MON_ISO
    if xfer is None:
        return MON_CONTROL if ep == 0 else MON_BULK
    return USBMON_XFER.get(xfer, MON_BULK)


class UrbCapture:
    """The server side of one connection: records of the :class:`~usbip.protocol.Urb` objects
    the session hands to its device."""

    __slots__ = ("_xfer", "busnum", "devnum", "file", "id_base")

    def __init__(self, file: CaptureFile, conn_id: int, busnum: int, devnum: int) -> None:
        self.file = file
        self.id_base = (conn_id & MASK32) << 32
        self.busnum = busnum & 0xFFFF
        self.devnum = devnum & 0xFF
        self._xfer: dict[int, int] = {}  # seqnum -> usbmon transfer type of URBs submitted

    def submit(self, urb: Any, xfer: int | None) -> None:
        """The ``S`` record of ``urb`` (``xfer``: its endpoint's XFER_* type, None if unknown)."""
        iso = urb.iso
        mx = self._xfer[urb.seqnum] = _mon_xfer(xfer, urb.ep, iso is not None)
        self._write(urb, EV_SUBMIT, mx, 0)

    def complete(self, urb: Any) -> None:
        """The ``C`` record of ``urb`` (status and actual length as the device left them)."""
        mx = self._xfer.pop(urb.seqnum, None)
        if mx is None:  # refused (its E record is written) or never recorded
            return
        self._write(urb, EV_COMPLETE, mx, urb.status)

    def refused(self, urb: Any, status: int) -> None:
        """The ``E`` record of an URB the server completes with ``status`` itself (no ``C`` follows)."""
        mx = self._xfer.pop(urb.seqnum, None)
        if mx is None:
            return
        ep = urb.ep | (0x80 if urb.direction else 0)
        self.file.record(
            self.id_base | urb.seqnum,
            EV_ERROR,
            mx,
            ep,
            self.devnum,
            self.busnum,
            FLAG_NONE,
            FLAG_ERROR,
            status,
            0,
            NO_SETUP,
            0,
            0,
            urb.transfer_flags,
            0,
            None,
            None,
            0,
        )

    def cancelled_before_submit(self, msg: Any) -> None:
        """``S`` and ``C`` (-ECONNRESET) of a CMD_SUBMIT unlinked before it reached the device."""
        urb = _MsgUrb(msg)
        mx = _mon_xfer(None, urb.ep, urb.iso is not None)
        self._write(urb, EV_SUBMIT, mx, 0)
        self._write(urb, EV_COMPLETE, mx, ECONNRESET)

    def _write(self, urb: Any, event: int, mx: int, status: int) -> None:
        is_in = urb.direction == 1
        seqnum = urb.seqnum
        tbl = urb.transfer_buffer_length
        iso = urb.iso
        submit = event == EV_SUBMIT
        flag_setup = FLAG_NONE
        setup = NO_SETUP
        ndesc = 0
        descs = None
        interval = 0
        start_frame = 0
        if mx == MON_CONTROL:
            if submit:
                setup = bytes(urb.setup)
                flag_setup = 0
        elif mx == MON_ISO:
            interval = urb.interval
            start_frame = urb.start_frame
            if iso is not None:
                packets = iso.tolist()
                ndesc = len(packets)
                descs = iso_descriptors(packets, submit)
                setup = iso_info(0 if submit else iso.error_count(), ndesc)
        elif mx == MON_INT:
            interval = urb.interval
        data = None
        full = 0
        if submit:
            length = tbl
            if is_in:
                flag_data = FLAG_IN
            else:
                flag_data = 0
                if tbl:
                    data = memoryview(urb.buffer)[:tbl]
                    full = tbl
        else:
            if iso is not None:
                length = iso.total_actual()
            else:
                length = urb.actual_length
                if length < 0 or length > tbl:
                    length = max(0, min(length, tbl))
            if is_in:
                flag_data = 0
                if iso is not None:
                    if tbl:  # iso IN: the whole buffer, each packet at its offset
                        data = memoryview(urb.buffer)[:tbl]
                        full = len(data)
                elif length:
                    data = memoryview(urb.buffer)[:length]
                    full = len(data)
            else:
                flag_data = FLAG_OUT
        self.file.record(
            self.id_base | seqnum,
            event,
            mx,
            urb.ep | (0x80 if is_in else 0),
            self.devnum,
            self.busnum,
            flag_setup,
            flag_data,
            status,
            length,
            setup,
            interval,
            start_frame,
            urb.transfer_flags,
            ndesc,
            descs,
            data,
            full,
        )


class _MsgUrb:
    """A CMD_SUBMIT seen as the Urb it would have become (for URBs unlinked before submission)."""

    __slots__ = (
        "actual_length",
        "buffer",
        "direction",
        "ep",
        "interval",
        "iso",
        "seqnum",
        "setup",
        "start_frame",
        "transfer_buffer_length",
        "transfer_flags",
    )

    def __init__(self, msg: Any) -> None:
        self.seqnum = msg.seqnum
        self.ep = msg.ep
        self.direction = msg.direction
        self.transfer_buffer_length = msg.transfer_buffer_length
        self.setup = msg.setup
        self.transfer_flags = msg.transfer_flags
        self.interval = msg.interval
        self.start_frame = msg.start_frame
        self.iso = msg.iso
        self.actual_length = 0
        data = msg.data if msg.direction != 1 else None
        self.buffer = data if data is not None else b""
        if data is None and msg.direction != 1:
            self.transfer_buffer_length = 0


class ClientCapture:
    """The client side of one imported device: records of what :class:`~usbip.client.RemoteDevice`
    submits and gets back. Transfer types come from the configuration descriptor (ep 0: control,
    an URB with iso packets: isochronous, an endpoint not described: bulk)."""

    __slots__ = ("_pending", "_types", "_types_of", "busnum", "devnum", "file", "id_base")

    def __init__(self, file: CaptureFile, conn_id: int, busnum: int, devnum: int) -> None:
        self.file = file
        self.id_base = (conn_id & MASK32) << 32
        self.busnum = busnum & 0xFFFF
        self.devnum = devnum & 0xFF
        self._pending: dict[int, tuple[int, int, int, int]] = {}  # seqnum -> (xfer, ep, length, flags)
        self._types: dict[int, int] = {}
        self._types_of: bytes | None = None

    def _xfer(self, epaddr: int, iso: bool, config: bytes | None) -> int:
        if iso:
            return MON_ISO
        if epaddr & 0x0F == 0:
            return MON_CONTROL
        if config is not self._types_of:
            from ..usb.descriptors import endpoints

            types: dict[int, int] = {}
            for e in endpoints(config or b""):
                types.setdefault(e["bEndpointAddress"], USBMON_XFER[e["bmAttributes"] & 3])
            self._types = types
            self._types_of = config
        return self._types.get(epaddr, MON_BULK)

    def submit(
        self,
        seqnum: int,
        epaddr: int,
        setup: bytes,
        flags: int,
        length: int,
        payload: Any,
        iso: Any,
        interval: int,
        start_frame: int,
        config: bytes | None,
    ) -> None:
        mx = self._xfer(epaddr, iso is not None, config)
        self._pending[seqnum] = (mx, epaddr, length, flags)
        ndesc = 0
        descs = None
        s8 = NO_SETUP
        flag_setup = FLAG_NONE
        if mx == MON_CONTROL:
            s8 = bytes(setup)
            flag_setup = 0
        elif mx == MON_ISO and iso is not None:
            packets = iso.tolist()
            ndesc = len(packets)
            descs = iso_descriptors(packets, True)
            s8 = iso_info(0, ndesc)
        data = None
        if epaddr & 0x80:
            flag_data = FLAG_IN
        else:
            flag_data = 0
            if length:
                data = memoryview(payload).cast("B")
        self.file.record(
            self.id_base | seqnum,
            EV_SUBMIT,
            mx,
            epaddr,
            self.devnum,
            self.busnum,
            flag_setup,
            flag_data,
            0,
            length,
            s8,
            interval if mx in (MON_ISO, MON_INT) else 0,
            start_frame if mx == MON_ISO else 0,
            flags,
            ndesc,
            descs,
            data,
            length if data is not None else 0,
        )

    def complete(self, seqnum: int, res: Any) -> None:
        """The ``C`` record from an :class:`~usbip.client.remote.UrbResult`."""
        info = self._pending.pop(seqnum, None)
        if info is None:
            return
        mx, epaddr, length, flags = info
        iso = res.iso
        ndesc = 0
        descs = None
        s8 = NO_SETUP
        if mx == MON_ISO and iso is not None:
            packets = iso.tolist()
            ndesc = len(packets)
            descs = iso_descriptors(packets, False)
            s8 = iso_info(res.error_count, ndesc)
        data = None
        full = 0
        if epaddr & 0x80:
            flag_data = 0
            got = res.data
            if got is not None:
                n = length if mx == MON_ISO else res.actual_length
                if n:
                    data = memoryview(got).cast("B")[:n]
                    full = len(data)
        else:
            flag_data = FLAG_OUT
        self.file.record(
            self.id_base | seqnum,
            EV_COMPLETE,
            mx,
            epaddr,
            self.devnum,
            self.busnum,
            FLAG_NONE,
            flag_data,
            res.status,
            res.actual_length,
            s8,
            0,
            res.start_frame if mx == MON_ISO else 0,
            flags,
            ndesc,
            descs,
            data,
            full,
        )

    def ended(self, seqnum: int, status: int) -> None:
        """A ``C`` record with ``status`` and no data (RET_UNLINK: -ECONNRESET)."""
        info = self._pending.pop(seqnum, None)
        if info is None:
            return
        mx, epaddr, _length, flags = info
        self.file.record(
            self.id_base | seqnum,
            EV_COMPLETE,
            mx,
            epaddr,
            self.devnum,
            self.busnum,
            FLAG_NONE,
            0 if epaddr & 0x80 else FLAG_OUT,
            status,
            0,
            NO_SETUP,
            0,
            0,
            flags,
            0,
            None,
            None,
            0,
        )

    def disconnected(self) -> None:
        """Every URB still pending completes with -ENODEV (vhci's status when the connection ends)."""
        for seqnum in list(self._pending):
            self.ended(seqnum, ENODEV)
