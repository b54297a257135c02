"""Export real host USB devices through libusb (python-libusb1)."""

from .mapping import status_to_errno

__all__ = ["status_to_errno"]
