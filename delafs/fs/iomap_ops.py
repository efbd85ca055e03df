"""The filesystem's iomap ops (xfs_iomap.c in spirit): iomap_begin with
delalloc reservation (or direct UNWRITTEN allocation when space is short),
iomap_end, the validity cookie, the delalloc punch and post-EOF
preallocation.  Its writeback ops (xfs_aops.c) are in aops.py;
FsIomapOps is both.

Every entry takes the filesystem's ``meta_lock`` (below the folio lock in
the lock order), so extent-map changes are atomic with respect to each
other; DELALLOC lives only in memory, so reserving and punching it needs
no transaction.

Space.  A DELALLOC extent of n blocks holds a reservation of n data
blocks plus ``indlen``, the worst-case btree blocks its later allocation
can need (XFS's indirect-length reservation).  Adjacent delalloc extents
merge and their indlen is trimmed back to the worst case of the merged
length; writeback allocates the data from the reservation and charges the
btree nodes it needs to the converted piece's indlen, returning the rest.
So writeback never meets ENOSPC.
"""

from __future__ import annotations

import errno
import logging

from ..iomap.types import (
    IOMAP_F_NEW,
    IOMAP_FAULT,
    IOMAP_REPORT,
    IOMAP_WRITE,
    IOMAP_ZERO,
    Iomap,
    IomapType,
    VInode,
)
from ..lib.errors import FsError
from ..lib.locks import ki_protected
from ..lib.trace import TRACE
from ..lib.units import BLOCK_SHIFT, BLOCK_SIZE
from .aops import EXT_TO_IOMAP, FsWritebackOps
from .btree import worst_case_nodes
from .extent_map import Extent, ExtState
from .items import EXTENT_ITEM_SIZE

log = logging.getLogger("delafs")

# Below this share of free space, writes allocate UNWRITTEN blocks at once
# instead of reserving delalloc (ext4's "nonda" fallback, seeds 002/004).
NONDA_FREE_FRACTION = 0.02
# Speculative post-EOF preallocation for extending writes, in blocks.
PREALLOC_MAX_BLOCKS = 256


class FsIomapOps(FsWritebackOps):
    """IomapOps + WritebackOps of a :class:`delafs.fs.Filesystem`.

    Attributes:
      fs          the filesystem
      errortags   the ErrorTags table shared with the engine
      prealloc    ino -> first block of speculative post-EOF delalloc
      stats       counters shown by ``delafs stat``
    """

    # The punch removes delalloc and nothing else: UNWRITTEN and WRITTEN
    # blocks hold data on disk (xfs_buffered_write_delalloc_punch).
    PUNCH_STATES = (ExtState.DELALLOC,)

    def __init__(self, fs, errortags):
        self.fs = fs
        self.errortags = errortags
        self.prealloc: dict[int, int] = {}
        self.stats = {"delalloc_reserved": 0, "delalloc_punched": 0, "delalloc_converted": 0,
                      "nonda_allocations": 0, "writeback_ranges": 0, "ioends": 0,
                      "ioend_bytes": 0, "writeback_errors": 0, "discards": 0,
                      "prealloc_trimmed": 0}

    # ------------------------------------------------------------------
    # iomap_begin / iomap_end
    # ------------------------------------------------------------------

    @ki_protected       # meta_lock is taken by hand: no Ctrl-C before the try
    async def iomap_begin(self, inode: VInode, pos: int, length: int, flags: int) -> Iomap:
        fs = self.fs
        fblock = pos >> BLOCK_SHIFT
        nblocks = ((pos + length + BLOCK_SIZE - 1) >> BLOCK_SHIFT) - fblock
        write = bool(flags & (IOMAP_WRITE | IOMAP_ZERO)) and not flags & IOMAP_REPORT
        reserve = bool(flags & IOMAP_WRITE) and not flags & IOMAP_REPORT
        if not flags & IOMAP_FAULT:
            # Most calls find the range already mapped in a loaded extent map
            # (a read, an overwrite, an append into its own delalloc): the
            # lookup is the answer.  As XFS maps without a transaction unless
            # it allocates, that needs meta_lock (an update may be between two
            # of its awaits) and not a transaction's reservation, roll check
            # and cache trims: they were a sixth of a 4 KiB overwrite.
            await fs.meta_lock.acquire()
            try:
                emap = fs.emaps.get(inode.ino)
                if emap is not None:
                    fs.check_alive(write=write)
                    ext = emap.lookup(fblock, limit=nblocks)
                    if not reserve or ext.state != ExtState.HOLE:
                        return self._iomap(ext, emap.cookie, 0)
            finally:
                fs.meta_lock.release()
        async with fs.transaction(write=write, items=0):
            emap = await fs.extent_map(inode.ino)
            ext = None
            new = False
            if reserve:
                if flags & IOMAP_FAULT:
                    new = await self._reserve_all(inode, emap, fblock, nblocks)
                else:
                    ext = emap.lookup(fblock, limit=nblocks)
                    if ext.state == ExtState.HOLE:
                        new = True
                        nblocks = await self._reserve_hole(inode, emap, fblock, ext.length, nblocks,
                                                           pos + length)
                        ext = None
            if ext is None:
                ext = emap.lookup(fblock, limit=nblocks)
            return self._iomap(ext, emap.cookie, IOMAP_F_NEW if new and ext.state in
                               (ExtState.DELALLOC, ExtState.UNWRITTEN) else 0)

    @staticmethod
    def _iomap(ext: Extent, cookie: int, flags: int) -> Iomap:
        addr = ext.pblock << BLOCK_SHIFT if ext.pblock is not None else None
        return Iomap(ext.fblock << BLOCK_SHIFT, ext.length << BLOCK_SHIFT, EXT_TO_IOMAP[ext.state],
                     addr, flags, cookie)

    def _low_space(self) -> bool:
        a = self.fs.space.alloc
        return a.available < max(64, int(a.total * NONDA_FREE_FRACTION))

    async def _reserve_hole(self, inode: VInode, emap, fblock: int, n: int, nblocks: int,
                            write_end: int) -> int:
        """Reserve the hole of ``n`` blocks at ``fblock`` (already clipped to
        the write).  Returns how far the mapping may reach.

        A directly allocated run may touch an older UNWRITTEN extent (a
        KEEP_SIZE fallocate) and merge with it: the mapping marked NEW must
        stop where the new blocks do, or a failed write's iomap_end would
        free the older ones."""
        if self._low_space():
            return await self._allocate_unwritten(inode, emap, fblock, n)
        extra = 0
        if write_end > inode.size and fblock + n == (write_end + BLOCK_SIZE - 1) >> BLOCK_SHIFT:
            # An extending write: reserve speculatively past EOF so a
            # growing file stays contiguous (XFS's post-EOF preallocation).
            hole = emap.lookup(fblock + n, limit=PREALLOC_MAX_BLOCKS)
            if hole.state == ExtState.HOLE:
                extra = min(hole.length, max(n, 16), PREALLOC_MAX_BLOCKS)
        try:
            self._reserve_delalloc(emap, fblock, n + extra)
        except FsError:
            if not extra:
                raise
            extra = 0
            self._reserve_delalloc(emap, fblock, n)
        if extra:
            start = fblock + n
            self.prealloc[inode.ino] = min(self.prealloc.get(inode.ino, start), start)
        return nblocks

    async def _reserve_all(self, inode: VInode, emap, fblock: int, nblocks: int) -> bool:
        """page_mkwrite: reserve every hole of the range, or none of them."""
        holes = [e for e in emap.lookup_range(fblock, nblocks) if e.state == ExtState.HOLE]
        if not holes:
            return False
        total = sum(e.length + worst_case_nodes(e.length, EXTENT_ITEM_SIZE, self.fs.tree.levels)
                    for e in holes)
        if self.errortags.fires("alloc_enospc"):
            raise FsError(errno.ENOSPC, "injected ENOSPC (alloc_enospc)")
        self.fs.space.alloc.reserve(total)      # all or nothing
        for e in holes:
            indlen = worst_case_nodes(e.length, EXTENT_ITEM_SIZE, self.fs.tree.levels)
            total -= e.length + indlen
            self._settle(emap.set(Extent(e.fblock, e.length, ExtState.DELALLOC, indlen=indlen)))
            self._trim_indlen(emap, e.fblock)
        assert total == 0
        self.stats["delalloc_reserved"] += sum(e.length for e in holes)
        return True

    def _reserve_delalloc(self, emap, fblock: int, n: int) -> None:
        if self.errortags.fires("alloc_enospc"):
            raise FsError(errno.ENOSPC, "injected ENOSPC (alloc_enospc)")
        indlen = worst_case_nodes(n, EXTENT_ITEM_SIZE, self.fs.tree.levels)
        self.fs.space.alloc.reserve(n + indlen)
        self._settle(emap.set(Extent(fblock, n, ExtState.DELALLOC, indlen=indlen)))
        self._trim_indlen(emap, fblock)
        self.stats["delalloc_reserved"] += n

    def _settle(self, replaced: list[Extent]) -> None:
        """Reserving over a hole replaces nothing; anything else is a bug."""
        assert not replaced, replaced

    def _trim_indlen(self, emap, fblock: int) -> None:
        """After a merge, give back indlen beyond the merged extent's worst case."""
        ext = emap.extent_at(fblock)
        want = worst_case_nodes(ext.length, EXTENT_ITEM_SIZE, self.fs.tree.levels)
        if ext.indlen > want:
            excess = ext.indlen - want
            emap.set_indlen(ext.fblock, want)
            self.fs.space.alloc.unreserve(excess)

    async def _allocate_unwritten(self, inode: VInode, emap, fblock: int, n: int) -> int:
        """Direct allocation when space is short: UNWRITTEN blocks now, in a
        transaction, instead of a reservation that might not be honoured.
        One contiguous run from ``fblock``; returns its length."""
        fs = self.fs
        need = n + worst_case_nodes(n, EXTENT_ITEM_SIZE, fs.tree.levels)
        fs.space.alloc.reserve(need)
        fs.space.begin_op(need, "available")
        try:
            fsinode = await fs.iget(inode.ino)
            got = await fs.allocate_unwritten(fsinode, emap, fblock, n, one_run=True)
            await fs.log_inode(fsinode)
        finally:
            fs.space.end_op()
        self.stats["nonda_allocations"] += 1
        return got

    async def iomap_end(self, inode: VInode, pos: int, length: int, written: int,
                        flags: int, iomap: Iomap) -> None:
        """The engine punches the unused tail of a NEW delalloc mapping
        itself (iomap_file_buffered_write_punch_delalloc) before calling
        here.  What is left is a NEW UNWRITTEN mapping from the low-space
        path: blocks allocated for an extending write that ended short of
        them lie past EOF with nothing to write them or free them, so they
        go now (ext4 truncates a failed write's blocks the same way).  The
        block holding EOF keeps its allocation: data was copied into it."""
        if not (flags & IOMAP_WRITE and iomap.flags & IOMAP_F_NEW
                and iomap.type == IomapType.UNWRITTEN and written < length):
            return
        first = (max(pos + written, inode.size) + BLOCK_SIZE - 1) >> BLOCK_SHIFT
        last = (pos + length + BLOCK_SIZE - 1) >> BLOCK_SHIFT
        if last > first:
            await self.fs.punch_hole(inode.ino, first, last - first)

    def iomap_valid(self, inode: VInode, iomap: Iomap) -> bool:
        emap = self.fs.emaps.get(inode.ino)
        if emap is None:
            return False
        if self.errortags.fires("stale_mapping"):
            emap.cookie += 1        # as if another task changed the extent map
        return emap.cookie == iomap.validity_cookie

    # ------------------------------------------------------------------
    # The punch callback
    # ------------------------------------------------------------------

    async def punch(self, inode: VInode, pos: int, length: int) -> None:
        """Remove only DELALLOC from [pos, pos+length), atomically, and
        return its reservation (data and indlen)."""
        async with self.fs.meta_lock:
            self.punch_locked(inode.ino, pos, length)

    def punch_locked(self, ino: int, pos: int, length: int) -> int:
        """punch, meta_lock held by the caller; returns the blocks punched."""
        emap = self.fs.emaps.get(ino)
        if emap is None:
            return 0
        first = pos >> BLOCK_SHIFT
        last = (pos + length + BLOCK_SIZE - 1) >> BLOCK_SHIFT
        removed = emap.remove(first, last - first, self.PUNCH_STATES)
        removed = [e for e in removed if e.state == ExtState.DELALLOC]
        n = sum(e.length for e in removed)
        if removed:
            self.fs.space.alloc.unreserve(n + sum(e.indlen for e in removed))
            self.stats["delalloc_punched"] += n
            if TRACE.on:
                TRACE.emit("xfs_delalloc_punch", ino=ino, pos=pos, length=length, blocks=n)
        return n

    async def trim_prealloc(self, inode: VInode) -> None:
        """The last writer closed: drop speculative delalloc past EOF."""
        start = self.prealloc.pop(inode.ino, None)
        if start is None:
            return
        eof = (inode.size + BLOCK_SIZE - 1) >> BLOCK_SHIFT
        first = max(start, eof)
        async with self.fs.meta_lock:
            n = self.punch_locked(inode.ino, first << BLOCK_SHIFT, (1 << 62) - (first << BLOCK_SHIFT))
        self.stats["prealloc_trimmed"] += n

    def prealloc_start(self, ino: int) -> int | None:
        return self.prealloc.get(ino)

    async def read_blocks(self, addr: int, views) -> None:
        await self.fs.dev.read_into(addr >> BLOCK_SHIFT, views)
