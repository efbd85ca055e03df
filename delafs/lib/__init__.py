"""Primitives every layer uses and none owns: units, errors, the lock
primitives and their order, errortags (fault injection) and trace events.

Nothing here imports another delafs layer.
"""

from .errors import CorruptionError, DelafsError, FsError, IncompatibleError, NotDelafsError
from .errortag import TAGS, ErrorTags
from .locks import RWSemaphore
from .trace import TRACE
from .units import BLOCK_SHIFT, BLOCK_SIZE, parse_size, round_down, round_up

__all__ = ["BLOCK_SHIFT", "BLOCK_SIZE", "TAGS", "TRACE", "CorruptionError", "DelafsError",
           "ErrorTags", "FsError", "IncompatibleError", "NotDelafsError", "RWSemaphore",
           "parse_size", "round_down", "round_up"]
