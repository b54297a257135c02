"""The argument parser of the command-line tools: argparse's, minus what costs at every start.

argparse's HelpFormatter imports ``shutil`` for the terminal width (and ``shutil`` pulls in
``fnmatch``, ``zlib``, ``bz2`` and ``lzma``) as soon as the first argument is added, and
``action="version"`` wants its text when the parser is built (ours names the codec and the
buffer pool, importing the pool). Each module imported is a file read over 9p and its code run
under emulation in the kernel-test guest, where every ``usbip`` command starts Python anew;
here the width comes from ``os`` alone, the version text only when ``--version`` asks for it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def terminal_columns() -> int:
    """What ``shutil.get_terminal_size().columns`` says: $COLUMNS, else stdout's terminal, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
        super().__init__(prog, indent_increment, max_help_position, terminal_columns() - 2 if width is None else width)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`HelpFormatter` (its subparsers too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


class VersionAction(argparse.Action):
    """``--version``: prints :func:`usbip.cli.version.version_string` of the parser's prog and exits."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(
            option_strings,
            dest=dest,
            default=argparse.SUPPRESS,
            nargs=0,
            help=help or "show program's version number and exit",
        )

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None) -> None:
        from .version import version_string

        sys.stdout.write(version_string(parser.prog) + "\n")
        parser.exit()
