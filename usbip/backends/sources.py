"""The names of the device enumerations: what ``--enumerate`` accepts and ``UsbDevice.source`` says.

Kept apart from the enumerations themselves so the command-line parsers name them without
importing sysfs or libusb code.
"""

from __future__ import annotations

SOURCE_SYSFS = "sysfs"
SOURCE_LIBUSB = "libusb"
AUTO = "auto"  # sysfs when /sys/bus/usb/devices exists, libusb otherwise
MODES = (AUTO, SOURCE_SYSFS, SOURCE_LIBUSB)
