"""An in-memory device for tests and the race explorer."""

from __future__ import annotations

import errno
from typing import Sequence

from ..lib.errors import FsError
from ..lib.units import BLOCK_SIZE
from .device import Buffer, check_request, fill_views, prepare_write, submit_sync, write_fua_sync
from .faults import FaultTable
from .recorder import Recorder


class MemoryDevice:
    """A device backed by a ``bytearray``: the image of a test or of the race
    explorer (:mod:`delafs.testing.race`), with the same interface the filesystem
    uses on a :class:`BlockDevice`.

    The async methods do the work inline, on the trio thread, and do not
    await anything -- not even ``trio.lowlevel.checkpoint()``.  That is a
    deliberate choice: a worker thread completes in an order the OS decides,
    and a checkpoint would hand trio's own (randomised) scheduler a choice.
    With neither, an ``await dev.write(...)`` is atomic with the code around
    it, so the only places where tasks interleave are the ones the caller
    controls (the explorer's named yield points and lock waits), and every
    run of the same workload is the same.  The price: a task doing device
    I/O never lets another task run, which no test relies on.

    Attributes (as on BlockDevice): ``path`` (a label), ``kind``
    (``'memory'``), ``readonly``, ``size``, ``nblocks``, ``faults`` (a
    :class:`FaultTable`, checked before every request, so a failed request
    changes nothing), ``recorder`` (a :class:`Recorder` or None).
    ``discard`` zeroes the range, as punching a hole in a sparse image file
    does.  ``close`` only marks the device closed (its contents stay, so a
    test can open a new Filesystem on it after an unmount); I/O on a closed
    device fails with EBADF until :meth:`reopen`.
    """

    def __init__(self, size: int, *, path: str = "<memory>", readonly: bool = False,
                 data: bytes | bytearray | None = None):
        if size < 0 or size % BLOCK_SIZE:
            raise ValueError(f"memory device size {size} is not a multiple of {BLOCK_SIZE}")
        if data is not None and len(data) != size:
            raise ValueError(f"initial contents are {len(data)} bytes, not {size}")
        self.path = path
        self.kind = "memory"
        self.size = size
        self.nblocks = size // BLOCK_SIZE
        self.readonly = readonly
        self.direct = False
        self.unflushed = False
        self.faults = FaultTable()
        self.recorder: Recorder | None = None
        self.errortags = None
        self.data = bytearray(data) if data is not None else bytearray(size)
        self.closed = False
        self._locked = False
        self._stats = dict.fromkeys(
            ("reads", "writes", "blocks_read", "blocks_written", "flushes", "discards"), 0
        )

    def clone(self, *, readonly: bool | None = None) -> "MemoryDevice":
        """An independent copy of the current contents (a snapshot)."""
        return MemoryDevice(self.size, path=self.path, data=self.data,
                            readonly=self.readonly if readonly is None else readonly)

    # -- synchronous primitives ---------------------------------------------

    def _check_open(self, op: str) -> None:
        if self.closed:
            raise FsError(errno.EBADF, f"{op} on closed memory device {self.path}")

    def read_sync(self, blk: int, count: int) -> bytes:
        self._check_open("read")
        check_request(self, "read", blk, count)
        if count == 0:
            return b""
        self._stats["reads"] += 1
        self._stats["blocks_read"] += count
        off = blk * BLOCK_SIZE
        return bytes(self.data[off:off + count * BLOCK_SIZE])

    def read_into_sync(self, blk: int, views) -> None:
        fill_views(views, self.read_sync(blk, sum(len(v) for v in views) // BLOCK_SIZE))

    def write_sync(self, blk: int, bufs: Sequence[Buffer]) -> None:
        self._check_open("write")
        views, nbytes, count = prepare_write(self, blk, bufs)
        if count == 0:
            return
        off = blk * BLOCK_SIZE
        for v in views:
            self.data[off:off + len(v)] = v
            off += len(v)
        self._stats["writes"] += 1
        self._stats["blocks_written"] += count
        self.unflushed = True
        if self.recorder is not None:
            self.recorder.events.append(("write", blk, b"".join(views)))

    def flush_sync(self) -> None:
        self._check_open("flush")
        check_request(self, "flush")
        self.unflushed = False
        self._stats["flushes"] += 1
        if self.recorder is not None:
            self.recorder.events.append(("flush",))

    def discard_sync(self, blk: int, count: int) -> None:
        self._check_open("discard")
        check_request(self, "discard", blk, count)
        if count == 0:
            return
        off = blk * BLOCK_SIZE
        self.data[off:off + count * BLOCK_SIZE] = bytes(count * BLOCK_SIZE)
        self._stats["discards"] += 1
        if self.recorder is not None:
            self.recorder.events.append(("discard", blk, count))

    # -- async API: inline, no thread, no checkpoint (see the class doc) -------

    async def read(self, blk: int, count: int) -> bytes:
        return self.read_sync(blk, count)

    async def read_into(self, blk: int, views) -> None:
        self.read_into_sync(blk, views)

    async def write(self, blk: int, bufs: Sequence[Buffer]) -> None:
        self.write_sync(blk, bufs)

    async def flush(self) -> None:
        self.flush_sync()

    async def submit(self, writes):
        return submit_sync(self, writes)

    async def write_fua(self, writes, *, preflush: bool) -> None:
        write_fua_sync(self, writes, preflush)

    async def discard(self, blk: int, count: int) -> None:
        self.discard_sync(blk, count)

    # -- exclusive use and lifetime -------------------------------------------

    def lock(self, *, wait: float = 0.0) -> None:
        """Nothing else can open this device, so there is nothing to wait for."""
        self._locked = True

    def unlock(self) -> None:
        self._locked = False

    def close(self) -> None:
        """Mark the device closed (the contents are kept)."""
        self.closed = True
        self._locked = False

    def reopen(self) -> "MemoryDevice":
        self.closed = False
        return self

    def __enter__(self) -> "MemoryDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def statistics(self) -> dict:
        stats = dict(self._stats)
        stats["injected_errors"] = self.faults.fired
        return stats

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"<MemoryDevice {self.path} {mode} {self.nblocks} blocks>"
