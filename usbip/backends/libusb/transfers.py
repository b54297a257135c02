"""python-libusb1 transfers kept for reuse, per endpoint and kind.

A fresh ``USBDeviceHandle.getTransfer()`` per URB costs a ``libusb_alloc_transfer``, the
USBTransfer's set-up (two flag writes through ctypes), a ``weakref.finalize`` registered under a
lock, and at the end a ``close()`` running that finalizer and ``libusb_free_transfer``: about a
third of the export's per-URB Python under load (profile in benchmarks/tools/profile_libusb.py).
A transfer that came back is set up for its next URB as it is instead: only its buffer and user
data change (``setBuffer`` / ``setUserData``), the endpoint, type, callback and flags stay.

Free lists are keyed by everything that stays: endpoint address, transfer type, the
SHORT_NOT_OK / ADD_ZERO_PACKET flags, and (iso) the packet count, which libusb fixes at
allocation. A list holds at most as many transfers as were in flight on its key at once, capped
per key and in total (a client cycling through iso packet counts cannot make it grow without
bound); beyond that a returning transfer is closed. A transfer going back to its list lets go of
the URB's buffer and the URB first (no pooled buffer stays pinned by a ctypes view).
"""

from __future__ import annotations

import contextlib
import ctypes
import struct
from typing import Any

from .devmem import release as release_region

#: transfers kept per key, and over all keys of one device
PER_KEY = 64
TOTAL = 256

#: transfer kinds in the key (libusb's transfer types, plus the flags the transfer keeps)
FLAG_SHORT_NOT_OK = 1
FLAG_ZERO_PACKET = 2


def transfer_key(address: int, xfer: int, flags: int = 0, iso_packets: int = 0) -> int:
    """One int naming what a reused transfer keeps: endpoint address, type, flags, iso packets."""
    return address | xfer << 8 | flags << 10 | iso_packets << 12


#: a new bulk / interrupt transfer is set up (python-libusb1's setBulk / setInterrupt) on this
#: one-byte buffer and then pointed at each URB's buffer by :func:`point_at`
SETUP_BUFFER = bytearray(1)
_c_char = ctypes.c_char
_addressof = ctypes.addressof
_EMPTY = (ctypes.c_char * 1)()
_EMPTY_ADDRESS = ctypes.addressof(_EMPTY)


def point_at(transfer: Any, buf: Any, n: int) -> None:
    """Point a (not submitted) transfer at the first ``n`` bytes of ``buf``: in place when ``buf`` is
    writable (IN data lands in the URB's buffer, OUT data is not copied), one copy when read-only.

    Not python-libusb1's ``setBuffer``: its ``ctypes.cast`` of the buffer's ``c_char`` array makes
    a reference cycle (the cast result shares the array's keep-alive dict, which then holds the
    array), so the array - and the buffer export it holds - lives until the garbage collector
    runs; a bytearray with an export cannot be resized, and the session's buffer pool reuses a
    released buffer only when it can: every IN URB's pooled buffer was thrown away (and a new one
    allocated and zeroed for the next URB). Here the view is a one-char ``c_char`` over the
    buffer's start, kept on the transfer (``usbip_view``) while libusb owns the buffer and dropped
    by :func:`unpin`: refcounting releases the export at once."""
    try:
        raw = transfer._USBTransfer__transfer
    except AttributeError:  # not python-libusb1's USBTransfer (the unit tests' fakes)
        transfer.setBuffer(buf if len(buf) == n else memoryview(buf)[:n])
        return
    c = raw.contents
    if n:
        view: Any
        try:
            view = _c_char.from_buffer(buf)
        except TypeError:  # read-only (bytes): one copy
            view = (_c_char * n).from_buffer_copy(buf)
        c.buffer = _addressof(view)
        transfer.usbip_view = view
    else:
        c.buffer = _EMPTY_ADDRESS
        transfer.usbip_view = None
    c.length = n


#: libusb on Linux refuses control transfers with more data (os/linux_usbfs.h MAX_CTRL_BUFFER_LENGTH)
MAX_CONTROL_DATA = 4096
CONTROL_SETUP_SIZE = 8
_SETUP = struct.Struct("<BBHHH")


def setup_control(transfer: Any, bm: int, req: int, value: int, index: int, data: Any, callback: Any) -> None:
    """Set a control transfer up for one request: ``data`` is the OUT data, or (an int) how many
    bytes to read. A transfer keeps a setup + data buffer of its own (``usbip_ctrl``, made when it
    is first set up): the setup packet is packed and OUT data copied into it, the C struct's length
    set; python-libusb1's ``setControl`` (a new buffer and a ``ctypes.cast`` cycle per request) runs
    once per transfer, for the type, endpoint and callback."""
    try:
        raw = transfer._USBTransfer__transfer
    except AttributeError:  # the unit tests' fakes
        transfer.setControl(bm, req, value, index, data, callback)
        return
    buf = getattr(transfer, "usbip_ctrl", None)
    if buf is None:
        transfer.setControl(bm, req, value, index, 0, callback)
        buf = transfer.usbip_ctrl = bytearray(CONTROL_SETUP_SIZE + MAX_CONTROL_DATA)
        transfer.usbip_ctrl_address = _addressof(_c_char.from_buffer(buf))  # pinned for the transfer's life
    if isinstance(data, int):
        n = data
    else:
        n = len(data)
        buf[CONTROL_SETUP_SIZE : CONTROL_SETUP_SIZE + n] = data
    _SETUP.pack_into(buf, 0, bm, req, value, index, n)
    c = raw.contents
    c.buffer = transfer.usbip_ctrl_address
    c.length = CONTROL_SETUP_SIZE + n


def control_data(transfer: Any) -> Any:
    """The data stage of a control transfer that came back (after the setup packet)."""
    buf = getattr(transfer, "usbip_ctrl", None)
    if buf is None:
        return transfer.getBuffer()
    return memoryview(buf)[CONTROL_SETUP_SIZE:]


def transfer_result(transfer: Any) -> tuple[int, int]:
    """(libusb status, actual_length) of a transfer libusb gave back: one read of the C struct
    (python-libusb1's getStatus and getActualLength each build a ctypes view of it)."""
    try:
        c = transfer._USBTransfer__transfer.contents
    except AttributeError:  # the unit tests' fakes
        return transfer.getStatus(), transfer.getActualLength()
    return c.status, c.actual_length


def close_transfer(transfer: Any) -> None:
    """Free a transfer (libusb_free_transfer through python-libusb1) and its usbfs region."""
    with contextlib.suppress(Exception):
        release_region(transfer)
    with contextlib.suppress(Exception):
        transfer.close()


def unpin(transfer: Any) -> None:
    """Drop the transfer's references to the last URB and its buffer (never submitted meanwhile)."""
    transfer.setUserData(None)
    transfer.usbip_view = None


class TransferPool:
    """Free lists of transfers of one device handle (loop thread only)."""

    __slots__ = ("_free", "closed", "count", "reused")

    def __init__(self) -> None:
        self._free: dict[int, list[Any]] = {}
        self.count = 0  # transfers in the free lists
        self.reused = 0  # transfers handed out again (tests, diagnostics)
        self.closed = False

    def get(self, key: int) -> Any:
        """A transfer set up for ``key`` before, or None."""
        free = self._free.get(key)
        if free:
            self.count -= 1
            self.reused += 1
            return free.pop()
        return None

    def put(self, key: int, transfer: Any) -> None:
        """A transfer back from libusb: kept for ``key``, or closed when the lists are full."""
        if not self.closed and self.count < TOTAL:
            free = self._free.get(key)
            if free is None:
                free = self._free[key] = []
            if len(free) < PER_KEY:
                try:
                    unpin(transfer)
                except Exception:
                    pass
                else:
                    free.append(transfer)
                    self.count += 1
                    return
        close_transfer(transfer)

    def close(self) -> None:
        """Free every kept transfer (before the handle closes); later returns are closed at once."""
        self.closed = True
        free, self._free = self._free, {}
        self.count = 0
        for transfers in free.values():
            for t in transfers:
                close_transfer(t)
