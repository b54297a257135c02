"""Errors a USB/IP client reports."""

from __future__ import annotations

import errno
import os

from ..protocol.constants import OpStatus

_OP_STATUS_TEXT = {
    OpStatus.NA: "device not available",
    OpStatus.DEV_BUSY: "device busy (exported to another client)",
    OpStatus.DEV_ERR: "device in error state",
    OpStatus.NODEV: "device not found",
    OpStatus.ERROR: "unexpected response",
}


class UsbipError(Exception):
    """Base class of client-side errors."""


class ImportRefused(UsbipError):
    """The server answered OP_REP_IMPORT / OP_REP_DEVLIST with a non-zero status."""

    def __init__(self, busid: str, status: int) -> None:
        self.busid = busid
        self.status = status
        try:
            text = _OP_STATUS_TEXT[OpStatus(status)]
        except ValueError:
            text = f"status {status}"
        super().__init__(f"import of {busid} refused: {text}")


class TransferError(UsbipError, OSError):
    """An URB completed with a non-zero status (a negative errno, as the kernel reports it)."""

    def __init__(self, status: int, actual_length: int = 0, data: bytes | memoryview | None = None) -> None:
        self.status = status
        self.actual_length = actual_length
        self.data = data
        code = -status
        name = errno.errorcode.get(code, str(code))
        OSError.__init__(self, code, f"URB failed with -{name}: {os.strerror(code)}")


class Stall(TransferError):
    """The endpoint stalled (-EPIPE)."""


class Cancelled(TransferError):
    """The URB was unlinked (-ECONNRESET) because of a timeout or a cancelled task."""


class Disconnected(UsbipError, ConnectionError):
    """The connection to the server ended while URBs were in flight."""


def transfer_error(status: int, actual_length: int = 0, data: bytes | memoryview | None = None) -> TransferError:
    if status == -errno.EPIPE:
        return Stall(status, actual_length, data)
    if status in (-errno.ECONNRESET, -errno.ENOENT):
        return Cancelled(status, actual_length, data)
    return TransferError(status, actual_length, data)
