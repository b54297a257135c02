"""How the package chooses between compiled extensions and pure-Python twins."""

from __future__ import annotations

import os
import warnings

#: ``USBIP_NO_EXTENSIONS=1`` forces the pure-Python twins.
FORCED_PURE = os.environ.get("USBIP_NO_EXTENSIONS", "") not in ("", "0")
_warned = False


def warn_fallback(exc: BaseException) -> None:
    """One warning per process when a compiled extension cannot be imported."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"cyusbip: compiled extensions unavailable ({exc}); using the pure-Python codec",
            RuntimeWarning,
            stacklevel=3,
        )
