# The compiled buffer pool (_buffers.pyx) has the pure-Python twin's API (tests/unit run both):
# type checkers see the twin's types.
from .buffers import IMPLEMENTATION as IMPLEMENTATION
from .buffers import BufferPool as BufferPool
from .buffers import PoolBuffer as PoolBuffer
