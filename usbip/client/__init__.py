"""The USB/IP client: list and import remote devices and drive them from user space."""

from .connection import Connection, connect
from .errors import (
    BadReply,
    Cancelled,
    Disconnected,
    ImportRefused,
    Overloaded,
    Stall,
    Timeout,
    TlsFailed,
    TransferError,
    UsbipError,
)
from .reconnect import ReconnectPolicy
from .remote import PendingUrb, RemoteDevice, UrbResult

__all__ = [
    "BadReply",
    "Cancelled",
    "Connection",
    "Disconnected",
    "ImportRefused",
    "Overloaded",
    "PendingUrb",
    "ReconnectPolicy",
    "RemoteDevice",
    "Stall",
    "Timeout",
    "TlsFailed",
    "TransferError",
    "UrbResult",
    "UsbipError",
    "connect",
]
