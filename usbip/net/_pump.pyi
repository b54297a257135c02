# usbip.net._pump is pump.py compiled by Cython (with _pump.pxd): type checkers see pump.py's types.
from .pump import IMPLEMENTATION as IMPLEMENTATION
from .pump import Stream as Stream
from .pump import TlsSession as TlsSession
