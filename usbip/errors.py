"""The root of every exception cyusbip raises on purpose.

``except usbip.CyusbipError`` catches them all: wire errors (:class:`usbip.ProtocolError`),
client errors (``usbip.client.UsbipError`` and its kinds), vhci-hcd and host enumeration
errors, TLS failures and bad configuration files. Each also keeps the builtin base that
says what kind of failure it is (``ConnectionError``, ``OSError``, ``ValueError``), so
callers that catch those still do.
"""

from __future__ import annotations


class CyusbipError(Exception):
    """Something cyusbip refused or could not do; the message says what."""


__all__ = ["CyusbipError"]
