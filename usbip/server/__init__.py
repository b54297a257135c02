"""The USB/IP server (usbipd): op phase, URB sessions, the device registry."""

from .registry import Registry
from .server import Server, serve
from .session import UrbSession

__all__ = ["Registry", "Server", "UrbSession", "serve"]
