"""The URB phase of one imported device (:class:`UrbSession`): compiled or pure.

The logic lives in ``urbsession.py``, which runs as it is (the fallback) and which Cython
compiles, augmented by ``_urbsession.pxd``, into ``usbip.server._urbsession``. The compiled
module serves unless it is missing or ``USBIP_NO_EXTENSIONS=1`` is set.
"""

from __future__ import annotations

from .._env import FORCED_PURE, warn_fallback

if FORCED_PURE:
    from .urbsession import (
        COPY_RATIO,
        IMPLEMENTATION,
        MAX_EARLY_UNLINKS,
        MSG_OVERHEAD,
        UrbSession,
        allowed_flags,
        control_check,
    )
else:
    try:
        from ._urbsession import (
            COPY_RATIO,
            IMPLEMENTATION,
            MAX_EARLY_UNLINKS,
            MSG_OVERHEAD,
            UrbSession,
            allowed_flags,
            control_check,
        )
    except ImportError as exc:  # pragma: no cover - depends on the build
        warn_fallback(exc)
        from .urbsession import (
            COPY_RATIO,
            IMPLEMENTATION,
            MAX_EARLY_UNLINKS,
            MSG_OVERHEAD,
            UrbSession,
            allowed_flags,
            control_check,
        )

__all__ = [
    "COPY_RATIO",
    "IMPLEMENTATION",
    "MAX_EARLY_UNLINKS",
    "MSG_OVERHEAD",
    "UrbSession",
    "allowed_flags",
    "control_check",
]
