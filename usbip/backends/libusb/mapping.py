"""Pure translation rules between libusb and the kernel's URB world (no usb1 import needed)."""

from __future__ import annotations

import errno as _errno
from collections.abc import Sequence

from ...errors import CyusbipError
from ...protocol.constants import (
    ECONNRESET,
    EINVAL,
    ENODEV,
    EOVERFLOW,
    EPIPE,
    EPROTO,
    ETIMEDOUT,
    Speed,
)
from .control import Special

EMSGSIZE = -_errno.EMSGSIZE  # usb_submit_urb: an iso packet larger than the endpoint moves per interval
EBUSY = -_errno.EBUSY

# enum libusb_transfer_status (libusb.h; stable ABI)
TRANSFER_COMPLETED = 0
TRANSFER_ERROR = 1
TRANSFER_TIMED_OUT = 2
TRANSFER_CANCELLED = 3
TRANSFER_STALL = 4
TRANSFER_NO_DEVICE = 5
TRANSFER_OVERFLOW = 6

_STATUS_ERRNO = {
    TRANSFER_COMPLETED: 0,
    TRANSFER_ERROR: EPROTO,
    TRANSFER_TIMED_OUT: ETIMEDOUT,
    TRANSFER_CANCELLED: ECONNRESET,
    TRANSFER_STALL: EPIPE,
    TRANSFER_NO_DEVICE: ENODEV,
    TRANSFER_OVERFLOW: EOVERFLOW,
}

# enum libusb_speed -> usbip speed
_LIBUSB_SPEEDS = {
    0: Speed.UNKNOWN,
    1: Speed.LOW,
    2: Speed.FULL,
    3: Speed.HIGH,
    4: Speed.SUPER,
    5: Speed.SUPER_PLUS,
    6: Speed.SUPER_PLUS,  # LIBUSB_SPEED_SUPER_PLUS_X2 (20 Gbit/s): sysfs "20000", also SUPER_PLUS for usbip
}

# enum libusb_error (negative) -> errno for synchronous calls (set_configuration, ...)
LIBUSB_ERROR_IO = -1
LIBUSB_ERROR_INVALID_PARAM = -2
LIBUSB_ERROR_NO_DEVICE = -4
LIBUSB_ERROR_NOT_FOUND = -5
LIBUSB_ERROR_BUSY = -6
LIBUSB_ERROR_TIMEOUT = -7
LIBUSB_ERROR_OVERFLOW = -8
LIBUSB_ERROR_PIPE = -9
# LIBUSB_ERROR_NOT_FOUND is deliberately absent: what it means depends on the call (see
# special_error_to_errno). Read as "no device", a client's SET_INTERFACE to an alt setting
# that does not exist marked the whole device gone.
_ERROR_ERRNO = {
    LIBUSB_ERROR_NO_DEVICE: ENODEV,
    LIBUSB_ERROR_TIMEOUT: ETIMEDOUT,
    LIBUSB_ERROR_OVERFLOW: EOVERFLOW,
    LIBUSB_ERROR_PIPE: EPIPE,
}

#: LIBUSB_ERROR_NOT_FOUND of the calls the stub makes for a client (libusb os/linux_usbfs.c):
#: set_configuration / set_interface_alt_setting: usbfs said EINVAL (no such configuration,
#: interface or alt setting; libusb also says it for an interface the handle has not claimed),
#: which usb_set_configuration / usb_set_interface report as -EINVAL; clear_halt: usbfs said
#: ENOENT (no such endpoint in the current settings), where the kernel stub's usb_clear_halt
#: would have sent the request to the device, which stalls it (-EPIPE); reset: usbfs said
#: ENODEV (the device went away or came back as another one), or an interface could not be
#: claimed again after the reset: the device is gone for this import.
_NOT_FOUND_ERRNO = {Special.CONFIG: EINVAL, Special.INTERFACE: EINVAL, Special.CLEAR_HALT: EPIPE, Special.RESET: ENODEV}


def status_to_errno(status: int) -> int:
    """libusb transfer status -> the negative errno a kernel URB would carry.

    COMPLETED 0, STALL -EPIPE, NO_DEVICE -ENODEV, CANCELLED -ECONNRESET (an
    unlink), OVERFLOW -EOVERFLOW, TIMED_OUT -ETIMEDOUT, ERROR (and anything
    unknown) -EPROTO.
    """
    return _STATUS_ERRNO.get(status, EPROTO)


def error_to_errno(code: int | None) -> int:
    """A libusb error code (USBError.value) from a synchronous call -> negative errno."""
    if code is None:
        return EPROTO
    return _ERROR_ERRNO.get(code, EPROTO)


def special_error_to_errno(what: Special | str, code: int | None) -> int:
    """A libusb error code from the synchronous call standing for a client's request ``what``
    (a :class:`Special`, or its value) -> the errno its URB completes with."""
    if code == LIBUSB_ERROR_NOT_FOUND:
        return _NOT_FOUND_ERRNO.get(Special(what), EPROTO)
    return error_to_errno(code)


class UrbRefused(CyusbipError, ValueError):
    """An URB refused before libusb sees it; ``status`` is what it completes with."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def speed_from_libusb(speed: int) -> Speed:
    return _LIBUSB_SPEEDS.get(speed, Speed.UNKNOWN)


def devid_for(bus: int, devnum: int) -> int:
    return (bus << 16) | devnum


class IsoPlan:
    """How an URB's iso packets map onto one libusb iso transfer.

    libusb lays packets back to back in the transfer buffer; a Linux URB names
    each packet's offset. When the offsets are already back to back (the usual
    case) the URB's own buffer is used in place; otherwise a bounce buffer is
    laid out and packets are gathered (OUT) / scattered (IN) around the transfer.
    python-libusb1 refuses zero-length iso packets, so those are set up with
    length 1 and patched back to 0 in the libusb packet descriptors.

    Bounds (checked before anything is allocated): every packet inside the URB's buffer;
    no packet longer than ``max_packet`` (the endpoint's bytes per interval: -EMSGSIZE, as
    usb_submit_urb); and the packets' lengths add up to at most the buffer's length. The
    decoder only checks each packet against the buffer, so without the last rule 1024
    packets all naming the whole buffer (overlapping) asked for a bounce buffer of 1024
    times transfer_buffer_length (16 GiB for a 16 MiB URB).
    """

    __slots__ = ("contiguous", "lengths", "offsets", "setup_lengths", "total", "zero")

    def __init__(
        self,
        packets: Sequence[tuple[int, int, int, int]],
        buffer_length: int,
        max_packet: int | None = None,
    ) -> None:
        self.offsets = [p[0] for p in packets]
        self.lengths = [p[1] for p in packets]
        if max_packet is not None:
            for i, n in enumerate(self.lengths):
                if n > max_packet:
                    raise UrbRefused(EMSGSIZE, f"iso packet {i} of {n} bytes, the endpoint moves {max_packet}")
        total = sum(self.lengths)
        if total > buffer_length:
            raise UrbRefused(EINVAL, f"iso packets of {total} bytes overlap in a {buffer_length}-byte buffer")
        self.zero = [i for i, n in enumerate(self.lengths) if n == 0]
        self.setup_lengths = [n or 1 for n in self.lengths]
        self.total = sum(self.setup_lengths)
        pos = 0
        contiguous = not self.zero
        for off, n in zip(self.offsets, self.lengths, strict=True):
            if off != pos:
                contiguous = False
            pos += n
        self.contiguous = contiguous and pos <= buffer_length
        for off, n in zip(self.offsets, self.lengths, strict=True):
            if off + n > buffer_length:
                raise UrbRefused(EINVAL, f"iso packet {off}+{n} outside the {buffer_length}-byte buffer")

    def positions(self) -> list[int]:
        """Start of each packet in the libusb transfer buffer (libusb packs them by their real lengths)."""
        out = []
        pos = 0
        for n in self.lengths:
            out.append(pos)
            pos += n
        return out

    def gather(self, src: memoryview, dst: memoryview) -> None:
        """OUT: copy each packet from its URB offset to its libusb position."""
        for pos, off, n in zip(self.positions(), self.offsets, self.lengths, strict=True):
            if n:
                dst[pos : pos + n] = src[off : off + n]

    def scatter(self, src: memoryview, dst: memoryview, actuals: Sequence[int]) -> None:
        """IN: copy each packet's received bytes from its libusb position to its URB offset."""
        for pos, off, n in zip(self.positions(), self.offsets, actuals, strict=True):
            if n:
                dst[off : off + n] = src[pos : pos + n]


def apply_iso_results(iso: object, results: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Store (libusb status, actual_length) per packet into ``iso`` (IsoPackets); returns (total, errors)."""
    total = 0
    errors = 0
    for i, (status, actual) in enumerate(results):
        err = status_to_errno(status)
        length = iso[i][1]  # type: ignore[index]
        actual = max(0, min(actual, length))
        iso.set_result(i, actual, err)  # type: ignore[attr-defined]
        total += actual
        if err:
            errors += 1
    return total, errors
