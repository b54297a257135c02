# usbip.protocol._codec is codec.py compiled by Cython (with _codec.pxd): type checkers see codec.py's types.
from .codec import *  # noqa: F403
from .codec import __all__ as __all__
