"""IomapIter, the one driver of the iomap loops: begin -> work -> end ->
advance, and the invariants it checks (fs/iomap/iter.c's WARN_ON_ONCEs)."""

import pytest

from delafs.iomap.iter import IomapIter
from delafs.iomap.types import Iomap, IomapType


class Inode:
    ino = 7


class Ops:
    """Maps fixed 4 KiB pieces and records every call."""

    def __init__(self, bad_offset=False):
        self.calls = []
        self.bad_offset = bad_offset

    async def iomap_begin(self, inode, pos, length, flags):
        self.calls.append(("begin", pos, length))
        start = pos - pos % 4096 + (8192 if self.bad_offset else 0)
        return Iomap(start, 4096, IomapType.HOLE, None, 0, 0)

    async def iomap_end(self, inode, pos, length, written, flags, iomap):
        self.calls.append(("end", pos, length, written))


async def test_begin_work_end_advance_until_done():
    ops = Ops()
    it = IomapIter(ops, Inode(), 1000, 10000, 0)
    seen = []
    while await it.next():
        seen.append((it.pos, it.length))
        it.processed = it.length
    assert seen == [(1000, 3096), (4096, 4096), (8192, 2808)]
    assert ops.calls[-1] == ("end", 8192, 2808, 2808) and it.len == 0


async def test_no_progress_ends_the_iteration_unless_stale():
    ops = Ops()
    it = IomapIter(ops, Inode(), 0, 8192, 0)
    assert await it.next()
    it.processed, it.stale = 0, True            # remap the same range
    assert await it.next() and it.pos == 0
    it.processed = 0                            # no progress, not stale: over
    assert not await it.next()
    assert [c[0] for c in ops.calls] == ["begin", "end", "begin", "end"]


async def test_stop_ends_after_this_iteration():
    it = IomapIter(Ops(), Inode(), 0, 8192, 0)
    assert await it.next()
    it.processed, it.stop = 100, True
    assert not await it.next() and it.pos == 100


async def test_invariants_are_checked():
    it = IomapIter(Ops(), Inode(), 0, 8192, 0)
    assert await it.next()
    it.processed = it.length + 1
    with pytest.raises(AssertionError, match="processed 4097 of 4096"):
        await it.next()
    it = IomapIter(Ops(bad_offset=True), Inode(), 0, 8192, 0)
    with pytest.raises(AssertionError, match="iomap_begin mapped"):
        await it.next()
