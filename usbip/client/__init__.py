"""The USB/IP client: list and import remote devices and drive them from user space."""

from .connection import Connection, connect
from .errors import Cancelled, Disconnected, ImportRefused, Stall, TransferError, UsbipError
from .remote import PendingUrb, RemoteDevice, UrbResult

__all__ = [
    "Cancelled",
    "Connection",
    "Disconnected",
    "ImportRefused",
    "PendingUrb",
    "RemoteDevice",
    "Stall",
    "TransferError",
    "UrbResult",
    "UsbipError",
    "connect",
]
