"""What ``usbip --version`` and ``usbipd --version`` print: the version and which codec runs."""

from __future__ import annotations

from .. import IMPLEMENTATION as CODEC
from .. import __version__
from .._env import FORCED_PURE
from ..pool import IMPLEMENTATION as POOL

_NAMES = {"cython": "compiled", "python": "pure-Python"}


def build_description() -> str:
    """``compiled codec`` or ``pure-Python codec (why)``; both halves when they differ."""
    if CODEC == POOL == "cython":
        return "compiled codec"
    if CODEC == POOL == "python":
        why = "USBIP_NO_EXTENSIONS=1" if FORCED_PURE else "compiled extensions unavailable"
        return f"pure-Python codec ({why})"
    return f"{_NAMES.get(CODEC, CODEC)} codec, {_NAMES.get(POOL, POOL)} buffer pool"


def version_string(prog: str) -> str:
    """e.g. ``usbip (cyusbip) 0.1.0, compiled codec``."""
    return f"{prog} (cyusbip) {__version__}, {build_description()}"
