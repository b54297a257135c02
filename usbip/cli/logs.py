"""Logging set-up shared by the command-line tools ("usbip: error: ..." as the Linux tools print)."""

from __future__ import annotations

import logging
import sys


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.levelname_lower = record.levelname.lower()
        return super().format(record)


def setup_logging(debug: bool = False, prog: str = "usbip") -> None:
    fmt = f"{prog}: %(levelname_lower)s: %(message)s"
    if debug:
        fmt = f"{prog}: %(levelname_lower)s: %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler], force=True)
