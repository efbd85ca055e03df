"""The address space of one inode (mm/filemap.c): its folios keyed by first
block, its ``invalidate_lock``, its dirty tag, writeback waits and its
writeback error (errseq).

``invalidate_lock`` orders the instantiation of folios (read, fault)
against their removal (truncate, punch).  The folio dict and counters are
only changed synchronously (no await in between), which is atomic under
trio; that is why insertion and removal never await.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import trio
from sortedcontainers import SortedDict, SortedSet

from ..lib.errseq import ErrSeq
from ..lib.locks import RWSemaphore
from ..lib.units import BLOCK_SHIFT, BLOCK_SIZE
from .folio import MAX_FOLIO_BLOCKS, Folio

if TYPE_CHECKING:
    from .pagecache import PageCache



class _NoFolios(SortedDict):
    """The one empty folio map that every mapping without folios shares (a
    SortedDict costs about 1.2 KiB even empty, and most cached inodes have
    no folios).  Read-only: a mapping gets its own map on its first folio."""

    def __setitem__(self, key, value):
        raise TypeError("the shared empty folio map is read-only")


class _NoIndex(SortedSet):
    """The one empty tag index (dirty or writeback) that mappings share
    while no folio carries the tag; read-only, as _NoFolios."""

    def add(self, value):
        raise TypeError("the shared empty tag index is read-only")


_NO_FOLIOS = _NoFolios()
_NO_INDEX = _NoIndex()


class AddressSpace:
    """Per-inode mapping (struct address_space).

    Attributes:
      ino              inode number
      cache            the PageCache it belongs to
      folios           SortedDict first block -> Folio; folios never overlap.
                       Changed synchronously only: insertion under
                       invalidate_lock shared or i_rwsem (by the engine's
                       callers), removal under the folio lock
      dirty_index      SortedSet of first blocks of folios with a dirty bit
                       (the xarray's dirty tag)
      dirty_order      the same folios in the order they became dirty, which
                       is dirtied_when order: the oldest is the first
      writeback_index  SortedSet of first blocks of folios under writeback
                       (the writeback tag)
                       The three sorted containers are shared empty ones
                       (_NO_FOLIOS, _NO_INDEX) while empty: a mapping gets
                       its own on the first insertion and gives it back
                       when it empties again.
      invalidate_lock  RWSemaphore ordering folio instantiation (read, fault)
                       against removal (truncate, punch); see locks.py
      nrpages          blocks cached; nrdirty: dirty blocks;
      nrwriteback      folios under writeback
      wb_err           ErrSeq of writeback errors, checked at fsync
    """

    def __init__(self, cache: "PageCache", ino: int):
        self.cache = cache
        self.ino = ino
        self.folios: SortedDict = _NO_FOLIOS
        self.dirty_index: SortedSet = _NO_INDEX
        self.dirty_order: OrderedDict[int, Folio] = OrderedDict()
        self.writeback_index: SortedSet = _NO_INDEX
        self.invalidate_lock = RWSemaphore(f"invalidate_lock[{ino}]")
        self.nrpages = 0
        self.nrdirty = 0
        self.nrwriteback = 0
        self.wb_err = ErrSeq()

    def set_error(self, err: int) -> None:
        """mapping_set_error: a writeback error is the inode's (fsync
        reports it to each description) and the superblock's (syncfs)."""
        self.wb_err.set(err)
        self.cache.wb_err.set(err)

    def __repr__(self) -> str:
        return (f"<AddressSpace ino={self.ino} folios={len(self.folios)} "
                f"blocks={self.nrpages} dirty={self.nrdirty}>")

    # -- lookup -------------------------------------------------------------

    def lookup(self, block: int) -> Folio | None:
        """The folio containing file block ``block``, or None.  O(log n)."""
        folios = self.folios
        f = folios.get(block)          # the common case: block starts a folio
        if f is not None:
            return f
        i = folios.bisect_right(block) - 1
        if i < 0:
            return None
        f = folios.peekitem(i)[1]
        return f if block < f.index + f.nblocks else None

    def _walk(self, start_block: int, end_block: int | None):
        """Lazily yield the folios overlapping [start_block, end_block), in
        order.  For synchronous callers only (the mapping must not change
        while the generator is alive)."""
        folios = self.folios
        first = self.lookup(start_block)
        lo = first.index if first is not None else start_block
        for index in folios.irange(lo, end_block, inclusive=(True, False)):
            yield folios[index]

    def iter_folios(self, start_block: int = 0, end_block: int | None = None) -> list[Folio]:
        """Snapshot list, in order, of the folios overlapping
        [start_block, end_block) (end None: to the end of the file)."""
        return list(self._walk(start_block, end_block))

    def dirty_folios(self, start_block: int = 0, end_block: int | None = None, *,
                     dirtied_before: float | None = None) -> list[Folio]:
        """Snapshot list, in order, of the folios with a dirty block that
        overlap [start_block, end_block); with ``dirtied_before``, only those
        that became dirty at or before that trio time (dirty expiry)."""
        folios = self.folios
        idx = self.dirty_index
        out = []
        first = self.lookup(start_block)
        if first is not None and first.index < start_block and first._dirty:
            out.append(first)
        for index in idx.irange(start_block, end_block, inclusive=(True, False)):
            out.append(folios[index])
        if dirtied_before is not None:
            out = [f for f in out if f.dirtied_when <= dirtied_before]
        return out

    async def wait_writeback_range(self, start_block: int = 0, end_block: int | None = None) -> None:
        """filemap_fdatawait_range: wait for every folio of the range that is
        under writeback now, dirty again or not.  fsync needs this after
        its own writeback pass: a folio the flusher cleaned and is still
        writing is not dirty, so that pass never saw it."""
        if not self.nrwriteback:
            return
        first = self.lookup(start_block)
        lo = first.index if first is not None else start_block
        folios = self.folios
        waiting = [folios[i] for i in self.writeback_index.irange(lo, end_block, inclusive=(True, False))]
        for folio in waiting:
            await folio.wait_writeback()

    def cache_runs(self, start_block: int = 0, end_block: int | None = None,
                   max_folios: int | None = None) -> list[tuple[int, int, str]]:
        """What the cache holds of [start_block, end_block), for ``delafs
        bmap`` and ``top``: runs (first block, blocks, state), ascending,
        state "writeback" (the whole folio is under writeback), "dirty",
        "uptodate" or "stale" (cached but not valid: never read, or a read
        failed).  Blocks not cached are in no run.  Reads the bits without
        folio locks: a snapshot for display, exact only when taken with no
        await between it and what it is compared with.  ``max_folios`` bounds
        the walk (the rest of the range is left out)."""
        runs: list[list] = []

        def add(first: int, n: int, state: str) -> None:
            if runs and runs[-1][2] == state and runs[-1][0] + runs[-1][1] == first:
                runs[-1][1] += n
            else:
                runs.append([first, n, state])

        for i, folio in enumerate(self._walk(start_block, end_block)):
            if max_folios is not None and i >= max_folios:
                break
            lo = max(folio.index, start_block)
            hi = folio.index + folio.nblocks if end_block is None else min(folio.index + folio.nblocks,
                                                                            end_block)
            if folio.writeback:
                add(lo, hi - lo, "writeback")
                continue
            # One step per run of blocks in a state, not per block: top
            # asks for this several times a second over the whole cache.
            span = Folio.block_range_mask(lo - folio.index, hi - lo)
            dirty, uptodate = folio.dirty_blocks() & span, folio.uptodate_mask & span
            pieces = [(first, n, state)
                      for mask, state in ((dirty, "dirty"), (uptodate & ~dirty, "uptodate"),
                                          (span & ~uptodate, "stale"))
                      for first, n in Folio.mask_segments(mask)]
            for first, n, state in sorted(pieces):
                add(folio.index + first, n, state)
        return [tuple(r) for r in runs]

    def oldest_dirtied_when(self) -> float | None:
        """When the longest-dirty folio became dirty (None if clean)."""
        for folio in self.dirty_order.values():
            return folio.dirtied_when
        return None

    # -- instantiation and removal -------------------------------------------

    async def get_folio(self, block: int, *, create: bool, nblocks_hint: int = 1,
                        lock: bool = True) -> Folio | None:
        """filemap_get_folio: the folio containing ``block``.

        If there is none and ``create``: allocate one of the largest power of
        two <= nblocks_hint (max MAX_FOLIO_BLOCKS), naturally aligned around
        ``block`` and shrunk until it overlaps no cached folio; it starts
        clean and not uptodate, and is inserted already locked when ``lock``
        (as the kernel does, so nobody sees it before its owner fills it).
        Lookup and insertion have no await in between, so two tasks cannot
        both insert.  Accounting the new folio may evict other clean folios.

        With ``lock``, wait for the folio lock, then re-check that the folio
        is still in this mapping (truncate or eviction may have removed it
        while we waited) and retry if not.  Without ``lock`` the caller gets
        an unlocked folio that eviction may remove at the next await: it
        must lock it and check ``folio.mapping`` before trusting it.
        Returns None only if not ``create`` and nothing is cached.  Schedule
        point only if it waits for the folio lock.

        Caller: the engine, under whatever its path requires (invalidate_lock
        shared for read/fault instantiation, i_rwsem for buffered writes).
        """
        if lock:
            await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            folio = self.lookup(block)
            if folio is None:
                if not create:
                    return None
                return self.add_folio(block, nblocks_hint, lock=lock)
            self.cache.mark_accessed(folio)
            if not lock:
                return folio
            await folio.lock()
            if folio.mapping is self:
                return folio
            folio.unlock()            # removed while we waited: look again

    def add_folio(self, block: int, nblocks_hint: int = 1, *, lock: bool = True) -> Folio:
        """filemap_add_folio: insert a new folio over ``block``, which the
        caller has just found uncached with no await since (readahead, or
        get_folio's miss), sized as get_folio describes, locked if ``lock``."""
        n = 1
        hint = min(max(nblocks_hint, 1), MAX_FOLIO_BLOCKS)
        while n << 1 <= hint:
            n <<= 1
        folios = self.folios
        while n > 1:
            start = block & ~(n - 1)
            # The next folio at or after `start` must begin at or after the
            # end; the one before must end at or before `start`.
            i = folios.bisect_left(start)
            ok = True
            if i < len(folios) and folios.peekitem(i)[0] < start + n:
                ok = False
            elif i > 0:
                prev = folios.peekitem(i - 1)[1]
                if prev.index + prev.nblocks > start:
                    ok = False
            if ok:
                break
            n >>= 1
        folio = Folio(self, block & ~(n - 1), n)
        if lock:
            folio.lock_new()
        if folios is _NO_FOLIOS:
            folios = self.folios = SortedDict()
        folios[folio.index] = folio
        self.nrpages += n
        self.cache._folio_added(folio)
        return folio

    def remove(self, folio: Folio) -> None:
        """Delete a folio from the mapping (filemap_remove_folio).  Caller
        holds its lock; it must be clean and not under writeback (truncate
        clears the dirty bits and waits for writeback first).  The folio
        stays locked; the caller unlocks it, and tasks waiting for the lock
        then find ``folio.mapping`` is None."""
        folio.assert_locked()
        assert folio.mapping is self, f"remove of {folio!r} from ino {self.ino}"
        assert not folio._dirty, f"remove of a dirty folio {folio!r}"
        assert not folio.writeback, f"remove of a folio under writeback {folio!r}"
        del self.folios[folio.index]
        if not self.folios:
            self.folios = _NO_FOLIOS
        folio.mapping = None
        self.nrpages -= folio.nblocks
        self.cache._folio_removed(folio)

    # -- accounting hooks called by Folio (synchronous) ----------------------

    def _account_dirty(self, folio: Folio, nblocks: int, was_clean: bool) -> None:
        cache = self.cache
        if was_clean:
            folio.dirtied_when = trio.current_time()
            if self.dirty_index is _NO_INDEX:
                self.dirty_index = SortedSet()
            self.dirty_index.add(folio.index)
            self.dirty_order[folio.index] = folio
            cache._lru.discard(folio)
            if not self.nrdirty:
                cache._dirty_mappings[self.ino] = self
        self.nrdirty += nblocks
        cache.dirty_bytes += nblocks << BLOCK_SHIFT

    def _account_clean(self, folio: Folio, nblocks: int, now_clean: bool) -> None:
        cache = self.cache
        self.nrdirty -= nblocks
        cache.dirty_bytes -= nblocks << BLOCK_SHIFT
        if now_clean:
            folio.dirtied_when = None
            self.dirty_index.discard(folio.index)
            if not self.dirty_index:
                self.dirty_index = _NO_INDEX
            del self.dirty_order[folio.index]
            if not folio.writeback:
                cache._lru.add(folio)
            if not self.nrdirty:
                cache._dirty_mappings.pop(self.ino, None)
        cache._maybe_unthrottle()

    def _account_writeback(self, folio: Folio, starting: bool) -> None:
        cache = self.cache
        if starting:
            if self.writeback_index is _NO_INDEX:
                self.writeback_index = SortedSet()
            self.writeback_index.add(folio.index)
            self.nrwriteback += 1
            cache.writeback_bytes += folio.wb_blocks << BLOCK_SHIFT
            cache._lru.discard(folio)
        else:
            self.writeback_index.discard(folio.index)
            if not self.writeback_index:
                self.writeback_index = _NO_INDEX
            self.nrwriteback -= 1
            cache.writeback_bytes -= folio.wb_blocks << BLOCK_SHIFT
            if not folio._dirty:
                cache._lru.add(folio)
            cache._maybe_unthrottle()

    # -- SEEK_DATA / SEEK_HOLE over the cache ------------------------------------

    def seek_data(self, start: int, end: int) -> int:
        """mapping_seek_hole_data(SEEK_DATA) over the cache only: the first
        byte >= start (and < end) lying in an uptodate block of a cached
        folio, per block for partially uptodate folios; ``end`` if there is
        none (where the kernel returns -ENXIO: the caller, iomap's seek over
        an unwritten extent, just moves on to the next extent)."""
        if start >= end:
            return end
        sblk = start >> BLOCK_SHIFT
        eblk = (end + BLOCK_SIZE - 1) >> BLOCK_SHIFT
        for folio in self._walk(sblk, eblk):
            rel = sblk - folio.index if sblk > folio.index else 0
            mask = folio._uptodate >> rel
            if mask:
                blk = folio.index + rel + (mask & -mask).bit_length() - 1
                pos = blk << BLOCK_SHIFT
                if pos >= end:
                    return end
                return pos if pos > start else start
        return end

    def seek_hole(self, start: int, end: int) -> int:
        """SEEK_HOLE over the cache: the first byte >= start not in an
        uptodate cached block, capped to ``end``."""
        if start >= end:
            return end
        cur = start >> BLOCK_SHIFT
        eblk = (end + BLOCK_SIZE - 1) >> BLOCK_SHIFT
        for folio in self._walk(cur, eblk):
            if folio.index > cur:
                break                          # a gap between folios
            rel = cur - folio.index
            missing = (~folio._uptodate & ((1 << folio.nblocks) - 1)) >> rel
            if missing:
                cur += (missing & -missing).bit_length() - 1
                break
            cur = folio.index + folio.nblocks
            if cur >= eblk:
                break
        pos = cur << BLOCK_SHIFT
        if pos <= start:
            return start
        return pos if pos < end else end

    # -- truncate -------------------------------------------------------------

    async def truncate_range(self, start: int, end: int | None = None) -> None:
        """truncate_inode_pages_range over bytes [start, end) (end None: to
        the end of the file).

        Each overlapping folio is locked and its writeback waited for; a
        folio entirely inside the range loses its dirty state and is
        removed; a folio only partly inside has the range zeroed (its
        uptodate state kept: zeros are the right contents of a truncated or
        punched range) and the dirty state dropped for the blocks wholly in
        the range -- a block only partly covered keeps its state, since its
        other bytes are still data.

        Caller holds ``invalidate_lock`` exclusive, so no read or fault can
        instantiate folios in the range meanwhile; writeback may still hold
        folio locks, hence the per-folio waits.
        """
        self.invalidate_lock.assert_held("exclusive")
        if end is not None and end <= start:
            return
        sblk = start >> BLOCK_SHIFT
        eblk = None if end is None else (end + BLOCK_SIZE - 1) >> BLOCK_SHIFT
        # Rescan until every folio in the range has been handled: while we
        # slept on a lock, writeback cannot add folios and invalidate_lock
        # keeps reads and faults out, but a buffered write under i_rwsem
        # alone could (the engine's callers hold i_rwsem too; be safe).
        done: set[Folio] = set()
        while True:
            todo = [f for f in self.iter_folios(sblk, eblk) if f not in done]
            if not todo:
                return
            for folio in todo:
                done.add(folio)
                await folio.lock()
                try:
                    if folio.mapping is not self:
                        continue                # evicted while we waited
                    await folio.wait_writeback()
                    self._truncate_folio(folio, start, end)
                finally:
                    folio.unlock()

    def _truncate_folio(self, folio: Folio, start: int, end: int | None) -> None:
        fpos, fend = folio.pos, folio.end
        lo = start if start > fpos else fpos
        hi = fend if end is None or end > fend else end
        if lo == fpos and hi == fend:
            folio.clear_dirty()
            self.remove(folio)
            return
        folio.zero(lo - fpos, hi - lo)
        # Blocks wholly inside [lo, hi) lose their dirty state.
        first = (lo - fpos + BLOCK_SIZE - 1) >> BLOCK_SHIFT
        last = (hi - fpos) >> BLOCK_SHIFT
        if last > first:
            folio.clear_dirty(first, last - first)

    def statistics(self) -> dict:
        return {"ino": self.ino, "folios": len(self.folios), "nrpages": self.nrpages,
                "nrdirty": self.nrdirty, "dirty_folios": len(self.dirty_index),
                "nrwriteback": self.nrwriteback,
                "invalidate_lock": self.invalidate_lock.statistics()}
