# The compiled codec (_codec.pyx) has the pure-Python twin's API (the differential tests hold
# both to it): type checkers see the twin's types.
from .codec import *  # noqa: F403
from .codec import __all__ as __all__
