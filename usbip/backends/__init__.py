"""Backends that export real host devices (``libusb``) and the bind rules they share (``state``)."""
