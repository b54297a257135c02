"""The Linux vhci-hcd driver: ``usbip attach`` / ``detach`` / ``port`` through sysfs."""

from .driver import VhciDriver, VhciError, VhciPort, parse_status

__all__ = ["VhciDriver", "VhciError", "VhciPort", "parse_status"]
