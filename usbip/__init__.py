"""cyusbip: USB/IP for Python (Linux kernel wire protocol 0x0111).

``async with usbip.connect(host) as conn`` lists and imports remote devices;
``usbip.Server`` / ``usbip.serve`` export devices; ``usbip.protocol`` is the codec.
Every exception cyusbip raises on purpose is a ``usbip.CyusbipError``.
"""

from __future__ import annotations

from ._version import __version__
from .client import connect
from .device import Device, Urb
from .errors import CyusbipError
from .protocol import IMPLEMENTATION
from .protocol.errors import ProtocolError
from .server import Server, serve

__all__ = [
    "IMPLEMENTATION",
    "CyusbipError",
    "Device",
    "ProtocolError",
    "Server",
    "Urb",
    "__version__",
    "connect",
    "serve",
]
