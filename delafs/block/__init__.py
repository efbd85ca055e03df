"""The block device (layer 6): the image file, loop or block device the
filesystem lives in, and the devices tests use in its place.

    device      BlockDevice: block I/O, flush, discard on a real image
    memory      MemoryDevice: the same interface on a bytearray (tests and the race
                explorer import it from here; the runtime never loads it)
    faults      FaultTable: injected request errors, checked before any I/O
    recorder    Recorder: completed requests, for crash simulation
    logwrites   WriteLog: the same stream kept in a file by a running daemon
                (dm-log-writes), and read_write_log
"""

from .device import BLOCK_SIZE, BlockDevice
from .faults import FaultTable
from .logwrites import WriteLog, read_write_log
from .recorder import Recorder

__all__ = ["BLOCK_SIZE", "BlockDevice", "FaultTable", "Recorder", "WriteLog", "read_write_log"]
