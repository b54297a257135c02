"""Pure translation rules between libusb and the kernel's URB world (no usb1 import needed)."""

from __future__ import annotations

from collections.abc import Sequence

from ...protocol.constants import (
    ECONNRESET,
    ENODEV,
    EOVERFLOW,
    EPIPE,
    EPROTO,
    ETIMEDOUT,
    Speed,
)

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
LIBUSB_ERROR_NO_DEVICE = -4
LIBUSB_ERROR_NOT_FOUND = -5
LIBUSB_ERROR_TIMEOUT = -7
LIBUSB_ERROR_OVERFLOW = -8
LIBUSB_ERROR_PIPE = -9
_ERROR_ERRNO = {
    LIBUSB_ERROR_NO_DEVICE: ENODEV,
    LIBUSB_ERROR_NOT_FOUND: ENODEV,
    LIBUSB_ERROR_TIMEOUT: ETIMEDOUT,
    LIBUSB_ERROR_OVERFLOW: EOVERFLOW,
    LIBUSB_ERROR_PIPE: EPIPE,
}


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
    """

    __slots__ = ("contiguous", "lengths", "offsets", "setup_lengths", "total", "zero")

    def __init__(self, packets: Sequence[tuple[int, int, int, int]], buffer_length: int) -> None:
        self.offsets = [p[0] for p in packets]
        self.lengths = [p[1] for p in packets]
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
                raise ValueError(f"iso packet {off}+{n} outside the {buffer_length}-byte buffer")

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
