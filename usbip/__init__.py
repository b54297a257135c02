"""cyusbip: USB/IP for Python (Linux kernel wire protocol 0x0111)."""

from __future__ import annotations

from ._version import __version__
from .protocol import IMPLEMENTATION
from .protocol.errors import ProtocolError

__all__ = ["IMPLEMENTATION", "ProtocolError", "__version__"]
