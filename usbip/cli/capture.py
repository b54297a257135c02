"""The ``--capture`` options of usbipd and usbip (bench, attach)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..capture.defaults import DEFAULT_MAX_MB  # the capture file itself: only when one is asked for

if TYPE_CHECKING:
    from ..capture.file import CaptureFile


def add_capture_options(p: argparse.ArgumentParser | Any, what: str = "every URB") -> None:
    """--capture FILE, --capture-max-mb MIB, --capture-files N (usbipd and usbip bench)."""
    p.add_argument(
        "--capture",
        metavar="FILE",
        help=f"write {what} (submit, completion, unlink) to FILE as pcapng that Wireshark decodes as USB "
        "(usbmon link type; see README: Capturing traffic)",
    )
    p.add_argument(
        "--capture-max-mb",
        type=float,
        default=DEFAULT_MAX_MB,
        metavar="MIB",
        help=f"size bound of the capture file; 0: none (default {DEFAULT_MAX_MB:g})",
    )
    p.add_argument(
        "--capture-files",
        type=int,
        default=1,
        metavar="N",
        help="1: stop capturing when the file reaches its bound (default); N: rotate, keeping FILE.1 .. FILE.(N-1)",
    )


def capture_from_args(args: argparse.Namespace, description: str = "") -> CaptureFile | None:
    """The CaptureFile the options ask for (None without --capture); ValueError / OSError."""
    if not getattr(args, "capture", None):
        return None
    if args.capture_max_mb < 0:
        raise ValueError(f"--capture-max-mb {args.capture_max_mb:g}: must not be negative")
    from ..capture.file import CaptureFile

    try:
        return CaptureFile(
            args.capture,
            max_bytes=int(args.capture_max_mb * 1024 * 1024),
            files=args.capture_files,
            description=description,
        )
    except ValueError as exc:
        raise ValueError(f"--capture: {exc}") from None
    except OSError as exc:
        raise OSError(f"--capture {args.capture}: {exc.strerror or exc}") from None
