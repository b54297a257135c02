"""Devices implemented in Python, exportable by the server like real ones.

The command line's ``--virtual`` specs are parsed in :mod:`usbip.cli.device_spec`.
"""

from __future__ import annotations

import os

from .audio import AudioDevice
from .descriptors import Association, Configuration, Endpoint, Interface, configuration, endpoint, interface
from .framework import DEFERRED, UsbError, VirtualDevice
from .keyboard import KeyboardDevice
from .loopback import LoopbackDevice
from .serial import SerialDevice
from .storage import StorageDevice
from .waiting import WaitQueue, complete_in

__all__ = [
    "DEFERRED",
    "Association",
    "AudioDevice",
    "Configuration",
    "Endpoint",
    "Interface",
    "KeyboardDevice",
    "LoopbackDevice",
    "SerialDevice",
    "StorageDevice",
    "UsbError",
    "VirtualDevice",
    "WaitQueue",
    "complete_in",
    "configuration",
    "demo_devices",
    "endpoint",
    "interface",
]


def demo_devices(tmpdir: str | os.PathLike[str]) -> list[VirtualDevice]:
    """One device of each kind; the storage image (64 MiB, sparse) lives in ``tmpdir``."""
    path = os.path.join(os.fspath(tmpdir), "cyusbip-demo-disk.img")
    return [
        LoopbackDevice(),
        StorageDevice(path, size=64 * 1024 * 1024),
        KeyboardDevice("Hello from cyusbip!\n"),
        SerialDevice(),
        AudioDevice(),
    ]
