"""The one exception type for bytes that break the protocol."""

from __future__ import annotations

from ..errors import CyusbipError


class ProtocolError(CyusbipError):
    """Raised when bytes off the wire violate the USB/IP protocol or a configured bound.

    The message says what was wrong; the connection that sent it should be dropped.
    """
