"""Logging set-up shared by the command-line tools."""

from __future__ import annotations

import logging
import sys


def setup_logging(debug: bool = False, prog: str = "usbip") -> None:
    fmt = f"{prog}: %(levelname)s: %(message)s" if not debug else f"{prog}: %(levelname)s: %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format=fmt, stream=sys.stderr, force=True)
