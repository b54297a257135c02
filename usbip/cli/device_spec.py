"""The ``--virtual`` device specs of ``usbipd``: ``make_device(spec)`` builds a virtual device from one:

* ``loopback`` / ``loopback:hs`` / ``loopback:ss`` / ``loopback:fs`` - gadget zero
  source/sink/loopback (``:p1`` anywhere after the name selects pattern 1,
  e.g. ``loopback:ss:p1``)
* ``storage:PATH:SIZE[:ro]`` - mass storage on a disk image (SIZE like 64M, 1G or
  bytes; may be empty, ``storage:PATH`` or ``storage:PATH::ro``, for an existing image)
* ``keyboard[:TEXT][:delay=SECONDS][:fifo=PATH]`` - HID keyboard typing TEXT (``\\n`` is
  Enter, ``\\t`` Tab) once the host configured it and SECONDS (default 1.5) passed; with
  ``fifo=PATH`` it also types what is written to the named pipe PATH (created if missing).
  The option segments may come in any order; every other segment is text (``:`` included)
* ``serial`` - CDC-ACM serial port bridged to a local PTY (``device.pty_path``)
* ``audio`` / ``audio:RATE[,RATE...]`` / ``audio:fs`` - USB Audio Class 2.0 stereo 16-bit
  capture (a frame-counter test signal) and playback (counted); 48 kHz unless rates are
  given (the first one is the initial rate); high speed unless ``:fs``
"""

from __future__ import annotations

import os
from typing import Any

from ..protocol.constants import Speed
from ..virtual import AudioDevice, KeyboardDevice, LoopbackDevice, SerialDevice, StorageDevice, VirtualDevice
from ..virtual.storage import parse_size

__all__ = ["SPEC_HELP", "make_device"]

_SPEEDS = {
    "fs": Speed.FULL,
    "full": Speed.FULL,
    "hs": Speed.HIGH,
    "high": Speed.HIGH,
    "ss": Speed.SUPER,
    "super": Speed.SUPER,
}

SPEC_HELP = (
    "loopback[:hs|:ss|:fs][:p1], storage:PATH[:SIZE][:ro], keyboard[:TEXT][:delay=S][:fifo=PATH], serial, "
    "audio[:RATE,...][:fs]"
)


def make_device(spec: str) -> VirtualDevice:
    """Build a virtual device from a spec string (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "loopback":
        speed, pattern = Speed.HIGH, 0
        for opt in filter(None, rest.split(":")):
            o = opt.lower()
            if o in _SPEEDS:
                speed = _SPEEDS[o]
            elif o in ("p0", "p1", "pattern0", "pattern1"):
                pattern = int(o[-1])
            else:
                raise ValueError(f"bad loopback option {opt!r} in {spec!r} (use hs, ss, fs, p0 or p1)")
        return LoopbackDevice(pattern=pattern, speed=speed)
    if kind == "storage":
        parts = rest.split(":")
        readonly = False
        if len(parts) > 1 and parts[-1].lower() == "ro":
            readonly = True
            parts.pop()
        if not parts or not parts[0]:
            raise ValueError(f"bad storage spec {spec!r}: expected storage:PATH[:SIZE][:ro]")
        if len(parts) > 2:
            raise ValueError(f"bad storage spec {spec!r}: expected storage:PATH[:SIZE][:ro]")
        path = parts[0]
        size = parse_size(parts[1]) if len(parts) == 2 and parts[1] else None
        if size is None and not os.path.exists(path):
            raise ValueError(f"bad storage spec {spec!r}: {path} does not exist, give a size (storage:PATH:64M)")
        return StorageDevice(path, size=size, readonly=readonly)
    if kind == "keyboard":
        return _keyboard(spec, rest)
    if kind == "serial":
        if rest:
            raise ValueError(f"bad serial spec {spec!r}: takes no options")
        return SerialDevice()
    if kind == "audio":
        return _audio(spec, rest)
    raise ValueError(f"unknown virtual device {spec!r}; expected one of: {SPEC_HELP}")


def _keyboard(spec: str, rest: str) -> KeyboardDevice:
    """``keyboard[:TEXT][:delay=SECONDS][:fifo=PATH]``: ``delay=``/``fifo=`` segments are options,
    the others (joined again with ``:``) the text, so ``keyboard:TEXT`` keeps meaning TEXT."""
    text: list[str] = []
    delay: float | None = None
    fifo: str | None = None
    for part in rest.split(":") if rest else []:
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if eq and key == "delay":
            try:
                delay = float(value)
            except ValueError:
                delay = -1.0
            if not (0 <= delay <= 86400):
                raise ValueError(f"bad keyboard delay {value!r} in {spec!r} (seconds, e.g. delay=1.5)")
        elif eq and key == "fifo":
            if not value:
                raise ValueError(f"bad keyboard spec {spec!r}: fifo= needs a path")
            fifo = value
        else:
            text.append(part)
    kw: dict[str, Any] = {}
    if delay is not None:
        kw["delay"] = delay
    typed = ":".join(text).replace("\\n", "\n").replace("\\t", "\t")
    return KeyboardDevice(typed, fifo=fifo, **kw)


def _audio(spec: str, rest: str) -> AudioDevice:
    speed, rates = Speed.HIGH, [48000]
    for opt in filter(None, rest.split(":")):
        o = opt.lower()
        if o in ("fs", "full", "hs", "high"):
            speed = _SPEEDS[o]
            continue
        try:
            rates = [int(r) for r in o.split(",")]
        except ValueError:
            raise ValueError(f"bad audio option {opt!r} in {spec!r} (use fs, hs or rates like 44100,48000)") from None
    return AudioDevice(rates, speed=speed)
