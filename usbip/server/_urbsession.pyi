# usbip.server._urbsession is urbsession.py compiled by Cython (with _urbsession.pxd):
# type checkers see urbsession.py's types.
from .urbsession import COPY_RATIO as COPY_RATIO
from .urbsession import IMPLEMENTATION as IMPLEMENTATION
from .urbsession import MAX_EARLY_UNLINKS as MAX_EARLY_UNLINKS
from .urbsession import MSG_OVERHEAD as MSG_OVERHEAD
from .urbsession import UrbSession as UrbSession
from .urbsession import allowed_flags as allowed_flags
from .urbsession import control_check as control_check
