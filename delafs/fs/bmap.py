"""Extent maps and the tree: load, sync, allocate, convert, punch
(xfs_bmap.c).

A mixin of :class:`~delafs.fs.filesystem.Filesystem`: every method runs
on the Filesystem and keeps its locking rules (public methods are whole
metadata operations under ``meta_lock``)."""

from __future__ import annotations

import errno
import logging

from ..lib.errors import CorruptionError, FsError
from ..lib.locks import assert_owned
from ..lib.trace import TRACE
from ..ondisk import (
    BLOCK_SHIFT,
)
from .extent_map import Extent, ExtentMap, ExtState
from .items import (
    EXT_UNWRITTEN,
    EXT_WRITTEN,
    EXTENT_ITEM_SIZE,
    MAX_EXTENT_LEN,
    T_EXTENT,
    T_XATTR,
    Inode,
    OutOfLine,
    decode_extent,
    decode_xattr,
    encode_extent,
)

log = logging.getLogger("delafs")

# Extents a punch frees per step; between steps it may roll the transaction.
PUNCH_BATCH = 64

_STATE_TO_DISK = {ExtState.UNWRITTEN: EXT_UNWRITTEN, ExtState.WRITTEN: EXT_WRITTEN}
_DISK_TO_STATE = {EXT_UNWRITTEN: ExtState.UNWRITTEN, EXT_WRITTEN: ExtState.WRITTEN}


class BmapOps:

    async def extent_map(self, ino: int) -> ExtentMap:
        """The inode's in-memory extent map, loaded from the tree on first use.
        Caller holds meta_lock."""
        assert_owned(self.meta_lock, "extent_map")
        emap = self.emaps.get(ino)
        if emap is None:
            emap = self._new_extent_map()
            held = 0
            for key, val, blk in await self.tree.scan((ino, T_XATTR, 0), (ino, T_EXTENT + 1, 0),
                                                      with_block=True):
                if key[1] == T_EXTENT:
                    pblock, length, state = decode_extent(val, blk)
                    emap.set(Extent(key[2], length, _DISK_TO_STATE[state], pblock))
                    held += length
                elif key[1] == T_XATTR:
                    value = decode_xattr(val, blk)[1]
                    held += value.nblocks if isinstance(value, OutOfLine) else 0
            # The inode's block count is fsck's check that no extent went
            # missing: a leaf that lost an item (and was resealed) must give
            # EIO, not zeros where the file's data was.
            inode = await self.iget(ino)
            if inode.is_reg and inode.blocks != held:
                raise CorruptionError(f"inode {ino}", None,
                                      f"block count {inode.blocks}, its extents and values hold {held}")
            self.emaps[ino] = emap
        return emap

    def _new_extent_map(self) -> ExtentMap:
        emap = ExtentMap()
        # A mapping taken from an earlier copy of this map (since evicted)
        # must look stale: each copy starts the cookie in a range of its
        # own, above every value an earlier copy reached.
        self._emap_loads += 1
        emap.cookie = self._emap_loads << 40
        return emap

    def delalloc_blocks(self) -> dict[int, int]:
        """Inode -> blocks of delalloc, for the inodes whose maps are
        loaded and hold some (an unloaded map holds none): which files
        writeback has work in, for ``delafs top``.  O(1) per map."""
        counts = {ino: emap.count_state(ExtState.DELALLOC) for ino, emap in self.emaps.items()}
        return {ino: n for ino, n in counts.items() if n}

    async def sync_extents(self, ino: int, emap: ExtentMap, lo: int, hi: int) -> None:
        """Make the tree's extent items agree with the map after the map
        changed in [lo, hi).  The items touching the edges are compared
        too, since the map may have split or merged them; only items that
        differ are written (an item whose key stays takes its new value in
        place), so an untouched neighbour's leaf stays clean."""
        tree = self.tree
        r0 = lo
        if lo > 0:
            # Outside [lo, hi) the tree holds what the map holds, and the map
            # keeps a run of blocks it could merge as one extent: an item
            # reaching lo - 1 lies inside the map's extent there, so no
            # lookup in the tree is needed to find where the items start.
            m = emap.extent_at(lo - 1)
            if m is not None:
                r0 = m.fblock
        # Every item starting up to hi, in one scan: the last of them may
        # reach past hi, and so may the map's extent at hi; only then is
        # there more to read.
        items = await tree.scan((ino, T_EXTENT, r0), (ino, T_EXTENT, hi + 1))
        r1 = hi
        if items:
            last_key, last_val = items[-1]
            r1 = max(r1, last_key[2] + decode_extent(last_val)[1])
        m = emap.extent_at(hi)
        if m is not None:
            r1 = max(r1, m.end)
        if r1 > hi + 1:
            items += await tree.scan((ino, T_EXTENT, hi + 1), (ino, T_EXTENT, r1))
        old = dict(items)
        new = {}
        for ext in emap.iter_extents(r0, r1):
            if ext.state not in _STATE_TO_DISK:
                continue
            f, p, n = ext.fblock, ext.pblock, ext.length
            while n:
                k = min(n, MAX_EXTENT_LEN)
                new[(ino, T_EXTENT, f)] = encode_extent(p, k, _STATE_TO_DISK[ext.state])
                f, p, n = f + k, p + k, n - k
        # Deletes first: a leaf only shrinks before anything grows it.
        for key in old:
            if key not in new:
                await tree.delete(key)
        for key, val in new.items():
            was = old.get(key)
            if was is None:
                await tree.insert(key, val)
            elif was != val:
                await tree.update(key, val)

    async def allocate_unwritten(self, inode: Inode, emap: ExtentMap, fblock: int, count: int,
                              *, one_run: bool = False) -> int:
        """Allocate UNWRITTEN blocks over the holes of [fblock, fblock+count)
        and return how many.  The caller reserved ``count`` blocks in the
        operation.  ``one_run`` stops after the first contiguous run, which
        must start at ``fblock`` (a hole): xfs_bmapi_write hands iomap one
        mapping, and a caller that may have to free what it allocated
        (iomap_end of a failed write) is only ever told of that one."""
        done = 0
        for piece in emap.lookup_range(fblock, count):
            if piece.state != ExtState.HOLE:
                continue
            f, n = piece.fblock, piece.length
            while n:
                goal = self.alloc_goal(emap, f)
                start, got = self.space.take(n, goal)
                emap.set(Extent(f, got, ExtState.UNWRITTEN, start))
                inode.blocks += got
                f, n, done = f + got, n - got, done + got
                if one_run:
                    break
            if one_run:
                break
        await self.sync_extents(inode.ino, emap, fblock, fblock + count)
        return done

    @staticmethod
    def alloc_goal(emap: ExtentMap, fblock: int) -> int | None:
        """Where the previous extent's disk blocks end: allocate next to them."""
        if fblock == 0:
            return None
        prev = emap.lookup(fblock - 1)
        if prev.state in _STATE_TO_DISK:
            return prev.pblock + 1
        return None

    async def convert_unwritten(self, ino: int, emap: ExtentMap, fblock: int, count: int) -> None:
        """UNWRITTEN -> WRITTEN over the range (the data is on stable storage)."""
        for piece in emap.lookup_range(fblock, count):
            if piece.state == ExtState.UNWRITTEN:
                emap.set(Extent(piece.fblock, piece.length, ExtState.WRITTEN, piece.pblock))
                if TRACE.on:
                    TRACE.emit("xfs_unwritten_convert", ino=ino, fblock=piece.fblock,
                               blocks=piece.length, pblock=piece.pblock)
        await self.sync_extents(ino, emap, fblock, fblock + count)

    async def _punch(self, inode: Inode, fblock: int, count: int) -> None:
        """Free the UNWRITTEN/WRITTEN blocks of the range, rolling the
        transaction every few hundred changed blocks so that punching a
        file with a million extents never needs a huge transaction."""
        emap = await self.extent_map(inode.ino)
        end = fblock + count
        while fblock < end:
            batch_end = fblock
            n = 0
            for ext in emap.iter_extents(fblock, end):
                batch_end = ext.end
                n += 1
                if n >= PUNCH_BATCH:
                    break
            else:
                batch_end = end
            removed = emap.remove(fblock, batch_end - fblock,
                                  (ExtState.UNWRITTEN, ExtState.WRITTEN))
            for ext in removed:
                self.space.free(ext.pblock, ext.length)
                inode.blocks -= ext.length
            await self.sync_extents(inode.ino, emap, fblock, batch_end)
            await self.log_inode(inode)
            fblock = batch_end
            if fblock < end:
                await self.roll_if_full()

    @staticmethod
    def punch_may_roll(emap: ExtentMap, fblock: int, end: int) -> bool:
        """Whether ``_punch`` of [fblock, end) may commit before it ends:
        it rolls only between batches, so only over more than one."""
        return len(list(emap.iter_extents(fblock, end, limit=PUNCH_BATCH + 1))) > PUNCH_BATCH

    async def allocate(self, ino: int, fblock: int, count: int) -> None:
        """fallocate's allocation: UNWRITTEN blocks over the holes of the
        range (delalloc and existing extents are left as they are)."""
        if (fblock + count) << BLOCK_SHIFT > self.sb.max_file_size:
            raise FsError(errno.EFBIG, f"file size limit is {self.sb.max_file_size} bytes")
        async with self.transaction(items=2 * count + 2, item_size=EXTENT_ITEM_SIZE, data=count):
            inode = await self.iget(ino)
            if not inode.is_reg:
                raise FsError(errno.ENODEV, f"inode {ino} is not a regular file")
            emap = await self.extent_map(ino)
            holes = sum(e.length for e in emap.lookup_range(fblock, count) if e.state == ExtState.HOLE)
            if holes:
                await self.allocate_unwritten(inode, emap, fblock, count)
                await self.log_inode(inode)

    async def punch_hole(self, ino: int, fblock: int, count: int) -> None:
        """Free every block of the range: delalloc (its reservation returns)
        and allocated extents (through the journal)."""
        async with self.transaction(items=2, item_size=EXTENT_ITEM_SIZE, pool=True):
            inode = await self.iget(ino)
            emap = await self.extent_map(ino)
            gone = emap.remove(fblock, count, (ExtState.DELALLOC,))
            if gone:
                self.space.alloc.unreserve(sum(e.length + e.indlen for e in gone))
            await self._punch(inode, fblock, count)

    async def map_blocks(self, ino: int, fblock: int, count: int) -> list[Extent]:
        async with self.transaction(write=False):
            return (await self.extent_map(ino)).lookup_range(fblock, count)
