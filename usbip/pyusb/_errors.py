"""PyUSB's errors, raised as ``usb.backend.libusb1`` raises them.

libusb1 raises ``USBError(strerror, code, errno)`` with a libusb error code as
``backend_error_code`` and the errno libusb maps it to (``LIBUSB_ERROR_PIPE`` -> ``EPIPE``),
``USBTimeoutError`` for ``LIBUSB_ERROR_TIMEOUT``; a PyUSB program that checks ``e.errno`` or
``e.backend_error_code`` sees the same values through this backend. URB statuses map the way
libusb's Linux backend maps usbfs completions (``linux_usbfs.c``).
"""

from __future__ import annotations

import errno

import usb.core

from ..client.errors import (
    Disconnected,
    ImportRefused,
    Overloaded,
    Timeout,
    TlsFailed,
    TransferError,
    UsbipError,
)
from ..protocol.constants import OpStatus

LIBUSB_ERROR_IO = -1
LIBUSB_ERROR_INVALID_PARAM = -2
LIBUSB_ERROR_ACCESS = -3
LIBUSB_ERROR_NO_DEVICE = -4
LIBUSB_ERROR_NOT_FOUND = -5
LIBUSB_ERROR_BUSY = -6
LIBUSB_ERROR_TIMEOUT = -7
LIBUSB_ERROR_OVERFLOW = -8
LIBUSB_ERROR_PIPE = -9
LIBUSB_ERROR_INTERRUPTED = -10
LIBUSB_ERROR_NO_MEM = -11
LIBUSB_ERROR_NOT_SUPPORTED = -12
LIBUSB_ERROR_OTHER = -99

#: libusb error code -> (libusb_strerror text, errno), as usb.backend.libusb1 reports them
_ERRORS: dict[int, tuple[str, int | None]] = {
    LIBUSB_ERROR_IO: ("Input/Output Error", errno.EIO),
    LIBUSB_ERROR_INVALID_PARAM: ("Invalid parameter", errno.EINVAL),
    LIBUSB_ERROR_ACCESS: ("Access denied (insufficient permissions)", errno.EACCES),
    LIBUSB_ERROR_NO_DEVICE: ("No such device (it may have been disconnected)", errno.ENODEV),
    LIBUSB_ERROR_NOT_FOUND: ("Entity not found", errno.ENOENT),
    LIBUSB_ERROR_BUSY: ("Resource busy", errno.EBUSY),
    LIBUSB_ERROR_TIMEOUT: ("Operation timed out", errno.ETIMEDOUT),
    LIBUSB_ERROR_OVERFLOW: ("Overflow", errno.EOVERFLOW),
    LIBUSB_ERROR_PIPE: ("Pipe error", errno.EPIPE),
    LIBUSB_ERROR_INTERRUPTED: ("System call interrupted (perhaps due to signal)", errno.EINTR),
    LIBUSB_ERROR_NO_MEM: ("Insufficient memory", errno.ENOMEM),
    LIBUSB_ERROR_NOT_SUPPORTED: ("Operation not supported or unimplemented on this platform", errno.ENOSYS),
    LIBUSB_ERROR_OTHER: ("Other error", None),
}

#: URB status (negative errno off the wire) -> libusb error code; anything else is LIBUSB_ERROR_IO
_STATUS: dict[int, int] = {
    -errno.EPIPE: LIBUSB_ERROR_PIPE,
    -errno.EOVERFLOW: LIBUSB_ERROR_OVERFLOW,
    -errno.ENODEV: LIBUSB_ERROR_NO_DEVICE,
    -errno.ESHUTDOWN: LIBUSB_ERROR_NO_DEVICE,
}

_REFUSED: dict[int, int] = {
    OpStatus.DEV_BUSY: LIBUSB_ERROR_BUSY,
    OpStatus.NA: LIBUSB_ERROR_NO_DEVICE,
    OpStatus.NODEV: LIBUSB_ERROR_NO_DEVICE,
}


def usb_error(code: int) -> usb.core.USBError:
    """The PyUSB exception libusb1's backend raises for libusb error ``code``."""
    text, eno = _ERRORS.get(code, _ERRORS[LIBUSB_ERROR_OTHER])
    cls = usb.core.USBTimeoutError if code == LIBUSB_ERROR_TIMEOUT else usb.core.USBError
    return cls(text, code, eno)


def status_code(status: int) -> int:
    """The libusb error code for a failed URB's status."""
    return _STATUS.get(status, LIBUSB_ERROR_IO)


def error_code(exc: BaseException) -> int:
    """The libusb error code for an error of the client (or of the socket under it)."""
    if isinstance(exc, TransferError):
        return status_code(exc.status)
    if isinstance(exc, Timeout):
        return LIBUSB_ERROR_TIMEOUT
    if isinstance(exc, ImportRefused):
        return _REFUSED.get(exc.status, LIBUSB_ERROR_IO)
    if isinstance(exc, TlsFailed):
        return LIBUSB_ERROR_ACCESS
    if isinstance(exc, (Disconnected, ConnectionError)):
        return LIBUSB_ERROR_NO_DEVICE
    if isinstance(exc, Overloaded):
        return LIBUSB_ERROR_NO_MEM
    if isinstance(exc, UsbipError):
        return LIBUSB_ERROR_IO
    if isinstance(exc, (ValueError, TypeError, OverflowError)):
        return LIBUSB_ERROR_INVALID_PARAM
    if isinstance(exc, TimeoutError):
        return LIBUSB_ERROR_TIMEOUT
    if isinstance(exc, OSError):
        return LIBUSB_ERROR_NO_DEVICE if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH) else LIBUSB_ERROR_IO
    return LIBUSB_ERROR_OTHER


def to_usb_error(exc: BaseException) -> usb.core.USBError:
    """``exc`` as PyUSB's error (the caller chains it: ``raise to_usb_error(e) from e``)."""
    if isinstance(exc, usb.core.USBError):
        return exc
    return usb_error(error_code(exc))


__all__ = [
    "LIBUSB_ERROR_BUSY",
    "LIBUSB_ERROR_INVALID_PARAM",
    "LIBUSB_ERROR_IO",
    "LIBUSB_ERROR_NOT_FOUND",
    "LIBUSB_ERROR_NO_DEVICE",
    "LIBUSB_ERROR_PIPE",
    "LIBUSB_ERROR_TIMEOUT",
    "error_code",
    "status_code",
    "to_usb_error",
    "usb_error",
]
