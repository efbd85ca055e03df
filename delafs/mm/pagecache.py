"""The page cache (layer 3) as a whole: the memory limit and the LRU of
clean folios, the dirty and writeback byte counters, throttling of writers
over the dirty limit (balance_dirty_pages), and the background flusher.

The model is mm/filemap.c and mm/page-writeback.c plus the per-folio state
iomap keeps, re-expressed for one trio thread: ``folio.py`` holds folios and
their locks, ``filemap.py`` one inode's address space, this module what is
global.  The page cache never calls into the engine except through the
``writeback_fn`` handed to ``run_flusher``.

Locks (the order is written once, in lib/locks.py): everything here -- the
counters, the LRU -- is only changed synchronously, which is atomic under
trio; that is why insertion and eviction never await.
``balance_dirty_pages`` only yields when it actually has to wait: it sits
on the write path and is usually free.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import trio

from ..lib.errseq import ErrSeq
from ..lib.units import BLOCK_SHIFT
from . import heap
from .filemap import AddressSpace
from .folio import Folio, assert_no_folio_locks_held

log = logging.getLogger(__name__)


class FolioLru:
    """The LRU of clean idle folios, least recently used first: a doubly
    linked list through two slots of each folio, as the kernel links
    folio->lru.  An OrderedDict cost 67 bytes a folio more than the two
    slots (4 MiB for a cache full of 4 KiB folios).  Every operation is
    O(1) and synchronous."""

    __slots__ = ("lru_prev", "lru_next", "_n")

    def __init__(self) -> None:
        # The list head: a ring through this object.
        self.lru_prev = self.lru_next = self
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __contains__(self, folio: Folio) -> bool:
        return folio.lru_next is not None

    def __iter__(self) -> Iterator[Folio]:
        f = self.lru_next
        while f is not self:
            yield f
            f = f.lru_next

    def add(self, folio: Folio) -> None:
        """At the young end; a folio already on the list stays where it is."""
        if folio.lru_next is not None:
            return
        last = self.lru_prev
        folio.lru_prev, folio.lru_next = last, self
        last.lru_next = self.lru_prev = folio
        self._n += 1

    def discard(self, folio: Folio) -> None:
        prev, nxt = folio.lru_prev, folio.lru_next
        if nxt is None:
            return
        prev.lru_next, nxt.lru_prev = nxt, prev
        folio.lru_prev = folio.lru_next = None
        self._n -= 1

    def move_to_end(self, folio: Folio) -> None:
        if folio.lru_next is not None:
            self.discard(folio)
            self.add(folio)

    def popleft(self) -> Folio | None:
        folio = self.lru_next
        if folio is self:
            return None
        self.discard(folio)
        return folio



class PageCache:
    """Global page cache state: memory limit, LRU of clean folios, dirty
    accounting and throttling, the background flusher.

    Attributes (all changed synchronously; no lock needed under trio):
      cache_size        bytes the cache may hold before clean folios are evicted
      dirty_limit       dirty+writeback bytes above which writers are throttled
      dirty_background  dirty bytes above which the flusher writes back
                        until under it
      dirty_expire      seconds after which a dirty folio is written back
      writeback_interval seconds between flusher passes when not kicked
      cached_bytes, dirty_bytes, writeback_bytes   exact sums over folios
      _mappings         ino -> AddressSpace
      _dirty_mappings   ino -> AddressSpace with dirty blocks, in the order
                        they became dirty (the kernel's b_dirty list)
      _lru              FolioLru, least recently used first: exactly the
                        cached folios that are clean and not under writeback
      wb_err            ErrSeq of every mapping's writeback errors: the
                        superblock's s_wb_err, which syncfs reports (a
                        cache serves one mount)

    Dirty limits, as the kernel measures them: writers are throttled on
    dirty + writeback bytes (memory not yet reclaimable), the background
    threshold looks at dirty bytes only (what writeback can still start on).
    """

    def __init__(self, *, cache_size: int = 256 << 20, dirty_limit: int | None = None,
                 dirty_background: int | None = None, dirty_expire: float = 5.0,
                 writeback_interval: float = 1.0):
        self.cache_size = cache_size
        self.dirty_limit = cache_size // 4 if dirty_limit is None else dirty_limit
        self.dirty_background = (self.dirty_limit // 2 if dirty_background is None
                                 else dirty_background)
        self.dirty_expire = dirty_expire
        self.writeback_interval = writeback_interval
        self.cached_bytes = 0
        self.dirty_bytes = 0
        self.writeback_bytes = 0
        self._mappings: dict[int, AddressSpace] = {}
        self._dirty_mappings: dict[int, AddressSpace] = {}
        self._lru = FolioLru()
        self._nfolios = 0
        self.wb_err = ErrSeq()
        # throttling
        self._unthrottle: trio.Event | None = None
        self._nr_throttled = 0
        # flusher
        self._flusher_running = False
        self._stopping = False
        self._kick_event = trio.Event()
        self._passes_started = 0
        self._passes_done = 0
        self._pass_event = trio.Event()
        self._stats = {"evictions": 0, "throttled": 0, "flusher_runs": 0,
                       "flusher_errors": 0, "flusher_calls": 0, "expired_calls": 0,
                       "heap_trims": 0}
        self._untrimmed = 0           # bytes evicted since the flusher last trimmed the heap

    # -- mappings -------------------------------------------------------------

    def mapping(self, ino: int) -> AddressSpace:
        """The inode's AddressSpace, created on first use."""
        m = self._mappings.get(ino)
        if m is None:
            m = self._mappings[ino] = AddressSpace(self, ino)
        return m

    def find_mapping(self, ino: int) -> AddressSpace | None:
        """The inode's AddressSpace if it has one (never creates it)."""
        return self._mappings.get(ino)

    def forget_mapping(self, ino: int) -> None:
        """The inode is evicted: drop its mapping, which must hold no folios."""
        m = self._mappings.get(ino)
        if m is None:
            return
        if m.folios:
            raise RuntimeError(f"forget_mapping({ino}) with {len(m.folios)} folios cached")
        del self._mappings[ino]

    def mappings(self) -> list[AddressSpace]:
        return list(self._mappings.values())

    # -- memory limit -----------------------------------------------------------

    def _folio_added(self, folio: Folio) -> None:
        self.cached_bytes += folio.size
        self._nfolios += 1
        if self.cached_bytes > self.cache_size:
            self.shrink()
        # Only now on the LRU: the new folio is never its own victim.
        self._lru.add(folio)

    def _folio_removed(self, folio: Folio) -> None:
        self.cached_bytes -= folio.size
        self._nfolios -= 1
        self._lru.discard(folio)

    def mark_accessed(self, folio: Folio) -> None:
        """folio_mark_accessed: move a clean folio to the young end."""
        self._lru.move_to_end(folio)

    def shrink(self, target: int | None = None) -> int:
        """Evict least recently used clean folios until cached_bytes <=
        target (default cache_size); ``shrink(0)`` is drop_caches.  Never
        touches dirty, locked or writeback folios: dirty and writeback ones
        are not on the LRU, a locked one fails trylock and is rotated to the
        young end (it is in use).  Synchronous: trylock, remove, unlock.
        Returns the number of folios evicted.  If nothing evictable is left,
        the cache simply stays over its size (the dirty limit bounds that)."""
        if target is None:
            target = self.cache_size
        lru = self._lru
        evicted = 0
        busy = []
        while self.cached_bytes > target and lru:
            folio = lru.popleft()
            if not folio.trylock():
                busy.append(folio)
                continue
            self._untrimmed += folio.size
            folio.mapping.remove(folio)
            folio.unlock()
            evicted += 1
        for folio in busy:
            lru.add(folio)
        self._stats["evictions"] += evicted
        return evicted

    # -- throttling -------------------------------------------------------------

    def _maybe_unthrottle(self) -> None:
        ev = self._unthrottle
        if ev is not None and self.dirty_bytes + self.writeback_bytes <= self.dirty_limit:
            self._unthrottle = None
            ev.set()

    async def balance_dirty_pages(self, mapping: AddressSpace) -> None:
        """Throttle a writer that has just dirtied data in ``mapping``.

        Over the background threshold: kick the flusher.  Over the dirty
        limit (dirty + writeback): wait until the flusher (and I/O
        completion) brings it back under, re-kicking it every
        writeback_interval in case it ran out of work.  Without a running
        flusher nobody could clean anything, so there is no throttling.
        Must be called holding no folio lock (asserted under DEBUG_LOCKS):
        the flusher needs those locks to make progress.  Only a schedule
        point when it waits."""
        assert_no_folio_locks_held("balance_dirty_pages")
        if self.dirty_bytes > self.dirty_background:
            self.kick()
        if self.dirty_bytes + self.writeback_bytes <= self.dirty_limit:
            return
        if not self._flusher_running:
            return
        self._stats["throttled"] += 1
        self._nr_throttled += 1
        try:
            while (self.dirty_bytes + self.writeback_bytes > self.dirty_limit
                   and self._flusher_running):
                self.kick()
                if self._unthrottle is None:
                    self._unthrottle = trio.Event()
                with trio.move_on_after(self.writeback_interval):
                    await self._unthrottle.wait()
        finally:
            self._nr_throttled -= 1

    # -- the flusher --------------------------------------------------------------

    def kick(self) -> None:
        """Wake the flusher for a pass now (wakeup_flusher_threads)."""
        self._kick_event.set()

    def stop(self) -> None:
        """Make run_flusher return after its current pass."""
        self._stopping = True
        self._kick_event.set()

    async def stop_flusher(self) -> None:
        """stop(), then wait until the flusher has finished its pass and
        returned.  Cancelling it instead would cancel the device writes of
        ioends whose folios it already cleaned: their data would be written
        nowhere."""
        self.stop()
        while self._flusher_running:
            await self._pass_event.wait()

    async def wait_idle(self) -> None:
        """Kick the flusher and wait until a pass that started after this
        call has finished (for tests and sync helpers)."""
        if not self._flusher_running:
            raise RuntimeError("wait_idle: the flusher is not running")
        target = self._passes_started + 1
        self.kick()
        while self._passes_done < target:
            if not self._flusher_running:
                raise RuntimeError("wait_idle: the flusher stopped")
            await self._pass_event.wait()

    async def run_flusher(self, writeback_fn, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The background flusher (the kernel's per-bdi writeback worker).

        Loops until stop(): wait for a kick or writeback_interval, then one
        pass.  A pass first does background writeback -- while dirty bytes
        exceed dirty_background (or writers are throttled), call
        ``await writeback_fn(mapping, expired_only=False)`` on dirty
        mappings in the order they became dirty, until under the threshold
        or a round makes no progress -- then expiry writeback: for each
        mapping holding a folio dirty for dirty_expire seconds or more,
        ``await writeback_fn(mapping, expired_only=True)``, which should
        write at least the folios ``mapping.dirty_folios(dirtied_before=
        cache.expire_cutoff())`` returns.  Exceptions from writeback_fn are
        logged and counted; the engine records them in mapping.wb_err.
        After a pass, once the cache has evicted ``heap.TRIM_AFTER`` bytes
        since the last time, it hands the freed memory back (mm/heap.py).
        """
        if self._flusher_running:
            raise RuntimeError("run_flusher: a flusher is already running")
        self._flusher_running = True
        self._stopping = False
        task_status.started()
        try:
            while not self._stopping:
                with trio.move_on_after(self.writeback_interval):
                    await self._kick_event.wait()
                if self._stopping:
                    break
                self._kick_event = trio.Event()   # kicks during the pass count
                self._passes_started += 1
                try:
                    await self._flush_pass(writeback_fn)
                finally:
                    self._passes_done += 1
                    ev, self._pass_event = self._pass_event, trio.Event()
                    ev.set()
                if self._untrimmed >= heap.TRIM_AFTER:
                    self._untrimmed = 0
                    await trio.to_thread.run_sync(heap.trim)
                    self._stats["heap_trims"] += 1
        finally:
            self._flusher_running = False
            self._pass_event.set()
            if self._unthrottle is not None:      # let throttled writers go
                self._unthrottle.set()
                self._unthrottle = None

    def expire_cutoff(self) -> float:
        """Folios dirtied at or before this trio time have expired."""
        return trio.current_time() - self.dirty_expire

    async def _call(self, writeback_fn, mapping: AddressSpace, expired_only: bool) -> None:
        self._stats["flusher_calls"] += 1
        try:
            await writeback_fn(mapping, expired_only)
        except Exception:
            self._stats["flusher_errors"] += 1
            log.exception("background writeback of inode %d failed", mapping.ino)

    def _over_background(self) -> bool:
        return self.dirty_bytes > self.dirty_background or self._nr_throttled > 0

    async def _flush_pass(self, writeback_fn) -> None:
        self._stats["flusher_runs"] += 1
        while self._over_background() and self._dirty_mappings:
            before = self.dirty_bytes
            for mapping in list(self._dirty_mappings.values()):
                if mapping.nrdirty:
                    await self._call(writeback_fn, mapping, False)
                if not self._over_background():
                    break
            if self.dirty_bytes >= before:
                break                           # no progress: try again later
        cutoff = self.expire_cutoff()
        for mapping in list(self._dirty_mappings.values()):
            if not mapping.nrdirty:
                continue
            oldest = mapping.oldest_dirtied_when()
            if oldest is not None and oldest <= cutoff:
                self._stats["expired_calls"] += 1
                await self._call(writeback_fn, mapping, True)

    # -- introspection --------------------------------------------------------------

    def verify(self) -> None:
        """Recompute every counter from the folios; AssertionError on any
        mismatch (tests call this after each step)."""
        cached = dirty = wb = nfolios = 0
        lru_expect = set()
        for ino, m in self._mappings.items():
            assert m.ino == ino
            pages = mdirty = mwb = 0
            prev_end = None
            dirty_idx = set()
            for index, f in m.folios.items():
                assert f.index == index and f.mapping is m, f
                assert index % f.nblocks == 0, f
                assert prev_end is None or prev_end <= index, f"overlap at {f!r}"
                prev_end = f.end_block
                assert f._dirty & ~f._uptodate == 0, f"dirty but not uptodate: {f!r}"
                assert f._uptodate >> f.nblocks == 0 and f._dirty >> f.nblocks == 0, f
                pages += f.nblocks
                nd = f._dirty.bit_count()
                mdirty += nd
                if nd:
                    dirty_idx.add(index)
                    assert f.dirtied_when is not None, f
                else:
                    assert f.dirtied_when is None, f
                if f.writeback:
                    mwb += 1
                    wb += f.wb_blocks << BLOCK_SHIFT
                if not nd and not f.writeback:
                    lru_expect.add(f)
                cached += f.size
                nfolios += 1
            assert pages == m.nrpages, (m, pages)
            assert mdirty == m.nrdirty, (m, mdirty)
            assert mwb == m.nrwriteback, (m, mwb)
            assert dirty_idx == set(m.dirty_index), m
            order = [f.dirtied_when for f in m.dirty_order.values()]
            assert set(m.dirty_order) == dirty_idx and order == sorted(order), m
            assert (ino in self._dirty_mappings) == (mdirty > 0), m
            dirty += mdirty << BLOCK_SHIFT
        assert cached == self.cached_bytes, (cached, self.cached_bytes)
        assert dirty == self.dirty_bytes, (dirty, self.dirty_bytes)
        assert wb == self.writeback_bytes, (wb, self.writeback_bytes)
        assert nfolios == self._nfolios
        lru = list(self._lru)
        assert lru_expect == set(lru) and len(lru) == len(self._lru), \
            "LRU is not exactly the clean idle folios"
        assert all(f.lru_next.lru_prev is f for f in lru), "LRU links broken"

    def statistics(self) -> dict:
        return {
            "cache_size": self.cache_size,
            "dirty_limit": self.dirty_limit,
            "dirty_background": self.dirty_background,
            "cached_bytes": self.cached_bytes,
            "dirty_bytes": self.dirty_bytes,
            "writeback_bytes": self.writeback_bytes,
            "folios": self._nfolios,
            "lru_folios": len(self._lru),
            "mappings": len(self._mappings),
            "dirty_mappings": len(self._dirty_mappings),
            "throttled_now": self._nr_throttled,
            "flusher_running": self._flusher_running,
            **self._stats,
        }
