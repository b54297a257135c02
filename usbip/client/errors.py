"""Errors a USB/IP client reports.

Every error the client raises because of what a server sent (or did not send) is a
:class:`UsbipError`; none of them is a bare ``OverflowError``, ``KeyError`` or
``struct.error``, whatever the server sends. :class:`BadReply` is also a
:class:`usbip.ProtocolError`, :class:`Timeout` also a ``TimeoutError`` (and
``asyncio.TimeoutError``), :class:`Disconnected` also a ``ConnectionError``.
"""

from __future__ import annotations

import asyncio
import errno
import os

from ..errors import CyusbipError
from ..protocol.constants import OpStatus
from ..protocol.errors import ProtocolError

_OP_STATUS_TEXT = {
    OpStatus.NA: "device not available",
    OpStatus.DEV_BUSY: "device busy (exported to another client)",
    OpStatus.DEV_ERR: "device in error state",
    OpStatus.NODEV: "device not found",
    OpStatus.ERROR: "unexpected response",
}


def status_text(status: int) -> str:
    """A readable name for an URB status off the wire: ``-EPIPE: Broken pipe``, ``status 5 (...)``.

    The kernel reports a negative errno; a server may send any 32-bit value, so nothing
    here assumes the value is one (``os.strerror`` raises OverflowError past a C int).
    """
    if status < 0:
        name = errno.errorcode.get(-status)
        if name is not None:
            try:
                return f"-{name}: {os.strerror(-status)}"
            except (ValueError, OverflowError):  # pragma: no cover - errorcode names are C ints
                return f"-{name}"
        return f"status {status} (not a known errno)"
    return f"status {status} (not a negative errno)"


class UsbipError(CyusbipError):
    """Base class of client-side errors."""


class BadReply(UsbipError, ProtocolError):
    """The server sent something the USB/IP protocol does not allow (the connection is dropped)."""


# asyncio.TimeoutError is the builtin TimeoutError from Python 3.11 on, a class of its own before
_TIMEOUT_BASES: tuple[type[BaseException], ...] = (
    (TimeoutError,) if asyncio.TimeoutError is TimeoutError else (TimeoutError, asyncio.TimeoutError)
)


class Timeout(UsbipError, *_TIMEOUT_BASES):  # type: ignore[misc]
    """The server did not answer in time."""


class Overloaded(UsbipError):
    """Too many URBs in flight, or too much data queued for a server that does not read it."""


class ImportRefused(UsbipError):
    """The server answered OP_REP_IMPORT / OP_REP_DEVLIST with a non-zero status."""

    def __init__(self, busid: str, status: int) -> None:
        self.busid = busid
        self.status = status
        try:
            text = _OP_STATUS_TEXT[OpStatus(status)]
        except (ValueError, KeyError):
            text = f"status {status}"
        super().__init__(f"import of {busid} refused: {text}")


class TransferError(UsbipError, OSError):
    """An URB completed with a non-zero status (a negative errno, as the kernel reports it).

    ``status`` is the value off the wire; ``errno`` is its negation (so ``errno.EPIPE`` for a stall).
    """

    def __init__(self, status: int, actual_length: int = 0, data: bytes | bytearray | memoryview | None = None) -> None:
        self.status = status
        self.actual_length = actual_length
        self.data = data
        OSError.__init__(self, -status, f"URB failed with {status_text(status)}")

    def __reduce__(self) -> tuple[object, ...]:  # OSError's would rebuild it from (errno, strerror)
        data = bytes(self.data) if isinstance(self.data, memoryview) else self.data
        return (type(self), (self.status, self.actual_length, data))


class Stall(TransferError):
    """The endpoint stalled (-EPIPE)."""


class Cancelled(TransferError):
    """The URB was unlinked (-ECONNRESET) because of a timeout or a cancelled task."""


class Disconnected(UsbipError, ConnectionError):
    """The connection to the server ended (while URBs were in flight, or during a request)."""


class TlsFailed(Disconnected):
    """The TLS handshake failed: the server's certificate is not trusted, or it refused ours."""


def transfer_error(
    status: int, actual_length: int = 0, data: bytes | bytearray | memoryview | None = None
) -> TransferError:
    if status == -errno.EPIPE:
        return Stall(status, actual_length, data)
    if status in (-errno.ECONNRESET, -errno.ENOENT):
        return Cancelled(status, actual_length, data)
    return TransferError(status, actual_length, data)
