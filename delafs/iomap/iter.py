"""The iteration every iomap operation runs (fs/iomap/iter.c's iomap_iter).

    it = IomapIter(ops, inode, pos, length, flags)
    while await it.next():
        ...work on [it.pos, it.pos + it.length) under it.iomap...
        it.processed = bytes done          # it.stale = True to remap

``next()`` finishes the previous mapping (``iomap_end`` with what was
processed, then advances), and maps what is left with ``iomap_begin``.  The
iteration ends when the range is done, when an iteration processed nothing
and did not ask for a remap (the kernel's "no progress" rule), or when the
body set ``stop``.  Its invariants are checked once, here, as the kernel's
WARN_ON_ONCEs in iomap_iter_done and iomap_iter_advance check them: a
mapping starts at or before ``pos`` and ends after it, and an iteration
never processes more than it was given or a negative amount.
"""

from __future__ import annotations

from .types import POINTS, Iomap, IomapOps, VInode


class IomapIter:
    """struct iomap_iter.

    Attributes:
      pos, len     what is left of the range
      iomap        the current mapping (None before the first next())
      length       bytes of the range the current mapping covers
      processed    set by the body: bytes done in this iteration
      stale        set by the body: the mapping went stale, map again
                   even though nothing was processed
      stop         set by the body: end after this iteration
    """

    def __init__(self, ops: IomapOps, inode: VInode, pos: int, length: int, flags: int,
                 *, yield_point: str | None = None):
        self.ops = ops
        self.inode = inode
        self.pos = pos
        self.len = length
        self.flags = flags
        self.yield_point = yield_point
        self.iomap: Iomap | None = None
        self.length = 0
        self.processed = 0
        self.stale = False
        self.stop = False

    async def next(self) -> bool:
        """iomap_iter(): end and advance past the previous mapping, then map
        the next one.  False when the iteration is over."""
        if self.iomap is not None:
            processed = self.processed
            if not 0 <= processed <= self.length:
                raise AssertionError(f"iomap iteration processed {processed} of {self.length} "
                                     f"bytes at {self.pos} (inode {self.inode.ino})")
            await self.ops.iomap_end(self.inode, self.pos, self.length, processed, self.flags,
                                     self.iomap)
            self.pos += processed
            self.len -= processed
            self.iomap = None
            if self.stop or (not processed and not self.stale):
                return False
        if self.len <= 0:
            return False
        self.processed = 0
        self.stale = False
        if self.yield_point is not None and POINTS.explorer is not None:
            # The filesystem's iomap_begin takes its inode lock (it may sleep).
            await POINTS.hit(self.yield_point)
        iomap = await self.ops.iomap_begin(self.inode, self.pos, self.len, self.flags)
        if not (iomap.offset <= self.pos < iomap.end):
            raise AssertionError(f"iomap_begin mapped [{iomap.offset}, {iomap.end}) for pos "
                                 f"{self.pos} (inode {self.inode.ino})")
        self.iomap = iomap
        self.length = min(self.len, iomap.end - self.pos)
        return True
