"""The page cache (layer 3): folios, address spaces, writeback errors, the
memory limit, dirty accounting and throttling, and the background flusher.

The model is mm/filemap.c plus the per-folio state iomap keeps
(fs/iomap/buffered-io.c's ``iomap_folio_state``), re-expressed for one trio
thread:

- A ``Folio`` caches ``nblocks`` file blocks (a power of two, naturally
  aligned).  Large folios are normal.  Each block has an *uptodate* and a
  *dirty* bit; the bits live in two Python ints (bit i = block index+i) and
  are only touched through the small helpers on Folio.  Block arguments to
  those helpers are *relative to the folio* (``first`` = 0 is the folio's
  first block), half-open ``[first, first+n)``.
- An ``AddressSpace`` is one inode's mapping: its folios keyed by first
  block, its ``invalidate_lock``, its dirty tag and its writeback error.
- ``PageCache`` is global: the cache-size limit and the LRU of clean folios,
  the dirty/writeback byte counters, throttling of writers over the dirty
  limit, and the flusher task.

The page cache never calls into the engine except through the
``writeback_fn`` handed to ``run_flusher``.

Locks (the order is written once, in locks.py): the folio lock guards a
folio's data and its dirty/uptodate bits; ``invalidate_lock`` orders the
instantiation of folios (read, fault) against their removal (truncate,
punch).  Everything else here -- the folio dicts, counters, the LRU -- is
only changed synchronously (no await in between), which is atomic under
trio; that is why insertion and eviction never await.

Schedule points: ``Folio.lock`` and ``get_folio(lock=True)`` always yield, as
trio's own acquires do (they are where the kernel could sleep).
``wait_writeback`` and ``balance_dirty_pages`` only yield when they actually
have to wait -- they sit on the write path and are usually free.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import trio
from sortedcontainers import SortedDict, SortedSet

from ..lib import locks as _locks
from ..lib.locks import RWSemaphore
from ..lib.units import BLOCK_SHIFT, BLOCK_SIZE

__all__ = ["BLOCK_SIZE", "BLOCK_SHIFT", "MAX_FOLIO_BLOCKS", "Folio", "AddressSpace",
           "ErrSeq", "ErrSeqCursor", "PageCache", "folio_locks_held",
           "assert_no_folio_locks_held"]

log = logging.getLogger(__name__)

MAX_FOLIO_BLOCKS = 512          # 2 MiB, a PMD-sized folio on x86-64

_current_task = trio.lowlevel.current_task


# ---------------------------------------------------------------------------
# Debug tracking of folio locks per task (DEBUG_LOCKS only)
# ---------------------------------------------------------------------------

# task -> set of folios it holds locked.  Lets balance_dirty_pages (and any
# other "must not hold a folio lock here" point) check its precondition.
_held_folios: dict = {}


def _track_locked(task, folio: "Folio") -> None:
    s = _held_folios.get(task)
    if s is None:
        _held_folios[task] = {folio}
    else:
        s.add(folio)


def _track_unlocked(task, folio: "Folio") -> None:
    s = _held_folios.get(task)
    if s is not None:
        s.discard(folio)
        if not s:
            del _held_folios[task]


def folio_locks_held(task=None) -> frozenset:
    """The folios the task (default: current) holds locked.  Only tracked
    while DEBUG_LOCKS is on; empty otherwise."""
    if task is None:
        task = _current_task()
    return frozenset(_held_folios.get(task, ()))


def assert_no_folio_locks_held(what: str = "this call") -> None:
    """Precondition of every wait that may take long (throttling, log space,
    free space): the current task holds no folio lock."""
    if not _locks.DEBUG_LOCKS:
        return
    held = _held_folios.get(_current_task())
    if held:
        raise AssertionError(f"{what} called with folio lock(s) held: "
                             + ", ".join(repr(f) for f in sorted(held, key=lambda f: f.index)))


def _ones(n: int) -> int:
    return (1 << n) - 1


# ---------------------------------------------------------------------------
# Folio
# ---------------------------------------------------------------------------

class Folio:
    """One page-cache unit of ``nblocks`` file blocks (a power of two,
    1..MAX_FOLIO_BLOCKS), naturally aligned: ``index % nblocks == 0``.

    Attributes:
      mapping       the AddressSpace it is cached in; None once removed
                    (truncated or evicted) -- a task that waited for the lock
                    must re-check it (changed only under the folio lock)
      index         first file block; nblocks: number of blocks (immutable)
      data          bytearray(nblocks * BLOCK_SIZE) (folio lock)
      _uptodate     int bitmask, bit i = block index+i holds valid data
                    (folio lock; set_uptodate/is_uptodate/... only)
      _dirty        int bitmask of dirty blocks, always a subset of
                    _uptodate (folio lock; mark_dirty/clear_* only)
      dirtied_when  trio time the folio went from clean to dirty, None when
                    clean (drives dirty expiry)
      writeback     True between start_writeback and end_writeback; set
                    under the folio lock, cleared by I/O completion without it
      _owner        task holding the folio lock, or None

    A folio is on the cache's LRU exactly when it is in a mapping, clean and
    not under writeback; eviction additionally needs trylock to succeed.
    """

    __slots__ = ("mapping", "index", "nblocks", "data", "_uptodate", "_dirty",
                 "dirtied_when", "writeback", "_owner", "_lot", "_wb_event")

    def __init__(self, mapping: "AddressSpace | None", index: int, nblocks: int):
        if nblocks < 1 or nblocks > MAX_FOLIO_BLOCKS or nblocks & (nblocks - 1):
            raise ValueError(f"folio size {nblocks} blocks is not a power of two "
                             f"in 1..{MAX_FOLIO_BLOCKS}")
        if index % nblocks:
            raise ValueError(f"folio at block {index} of {nblocks} blocks is not aligned")
        self.mapping = mapping
        self.index = index
        self.nblocks = nblocks
        self.data = bytearray(nblocks << BLOCK_SHIFT)
        self._uptodate = 0
        self._dirty = 0
        self.dirtied_when: float | None = None
        self.writeback = False
        self._owner = None
        self._lot: trio.lowlevel.ParkingLot | None = None
        self._wb_event: trio.Event | None = None

    def __repr__(self) -> str:
        ino = self.mapping.ino if self.mapping is not None else "-"
        flags = "".join(c for c, on in (("L", self._owner is not None),
                                        ("W", self.writeback)) if on)
        return (f"<Folio ino={ino} blocks [{self.index}, {self.index + self.nblocks}) "
                f"uptodate={self._uptodate:#x} dirty={self._dirty:#x} {flags}>")

    # -- geometry -----------------------------------------------------------

    @property
    def pos(self) -> int:
        """Byte offset of the folio in the file."""
        return self.index << BLOCK_SHIFT

    @property
    def size(self) -> int:
        return self.nblocks << BLOCK_SHIFT

    @property
    def end(self) -> int:
        """Byte offset just past the folio (half-open)."""
        return (self.index + self.nblocks) << BLOCK_SHIFT

    @property
    def end_block(self) -> int:
        return self.index + self.nblocks

    def contains(self, block: int) -> bool:
        return self.index <= block < self.index + self.nblocks

    # -- per-block state: the only code that touches the bitmasks ------------

    @staticmethod
    def block_range_mask(first: int, n: int) -> int:
        """Mask of blocks [first, first+n) (relative to a folio)."""
        return ((1 << n) - 1) << first

    @staticmethod
    def mask_segments(mask: int) -> list[tuple[int, int]]:
        """Contiguous runs of set bits as (first, n), ascending.  One step
        per run, not per bit."""
        out = []
        while mask:
            first = (mask & -mask).bit_length() - 1
            shifted = mask >> first
            n = (shifted ^ (shifted + 1)).bit_length() - 1   # trailing ones
            out.append((first, n))
            mask &= ~(((1 << n) - 1) << first)
        return out

    def _range(self, first: int, n: int | None) -> int:
        if n is None:
            n = self.nblocks - first
        if first < 0 or n < 0 or first + n > self.nblocks:
            raise ValueError(f"blocks [{first}, {first + n}) outside a folio of {self.nblocks}")
        return ((1 << n) - 1) << first

    def is_uptodate(self, first: int = 0, n: int | None = None) -> bool:
        """All of blocks [first, first+n) hold valid data (n=None: to the end)."""
        m = self._range(first, n)
        return self._uptodate & m == m

    @property
    def all_uptodate(self) -> bool:
        return self._uptodate == _ones(self.nblocks)

    @property
    def uptodate_mask(self) -> int:
        return self._uptodate

    def set_uptodate(self, first: int = 0, n: int | None = None) -> None:
        """Blocks [first, first+n) now hold valid data (after a read or a
        full overwrite).  Caller holds the folio lock."""
        self.assert_locked()
        self._uptodate |= self._range(first, n)

    def clear_uptodate(self, first: int = 0, n: int | None = None) -> None:
        """Forget that blocks hold valid data (a failed read).  They must not
        be dirty.  Caller holds the folio lock."""
        self.assert_locked()
        m = self._range(first, n)
        assert not self._dirty & m, f"clear_uptodate of dirty blocks in {self!r}"
        self._uptodate &= ~m

    def test_dirty(self) -> bool:
        """Any block dirty."""
        return self._dirty != 0

    def dirty_blocks(self, first: int = 0, n: int | None = None) -> int:
        """Mask (relative to the folio) of the dirty blocks in [first, first+n)."""
        return self._dirty & self._range(first, n)

    def dirty_segments(self) -> list[tuple[int, int]]:
        """Contiguous dirty runs as (first, n) relative to the folio (add
        ``index`` for file blocks); for writeback's find_dirty_range.  To
        segment the mask returned by clear_dirty_for_io use mask_segments."""
        return self.mask_segments(self._dirty)

    def mark_dirty(self, first: int = 0, n: int | None = None) -> None:
        """Dirty blocks [first, first+n).  They must be uptodate: a dirty
        block is written back whole.  Only newly dirtied blocks are
        accounted.  Caller holds the folio lock."""
        self.assert_locked()
        m = self._range(first, n)
        new = m & ~self._dirty
        if not new:
            return
        assert self._uptodate & m == m, f"mark_dirty of blocks not uptodate in {self!r}"
        mapping = self.mapping
        assert mapping is not None, f"mark_dirty of a folio no longer cached: {self!r}"
        was_clean = not self._dirty
        self._dirty |= new
        mapping._account_dirty(self, new.bit_count(), was_clean)

    def clear_dirty_for_io(self) -> int:
        """folio_clear_dirty_for_io: return the dirty mask and clear it.
        From here writeback owns those blocks: it must write them, give them
        back with redirty(), or discard them (and record the error).
        Caller holds the folio lock."""
        self.assert_locked()
        mask = self._dirty
        if mask:
            self._dirty = 0
            self.mapping._account_clean(self, mask.bit_count(), True)
        return mask

    def redirty(self, mask: int) -> None:
        """Give blocks back that writeback took with clear_dirty_for_io but
        could not write now.  The folio counts as freshly dirtied (so an
        expiry-driven flusher does not spin on it).  Caller holds the folio
        lock."""
        self.assert_locked()
        new = mask & ~self._dirty
        if not new:
            return
        assert self._uptodate & new == new, f"redirty of blocks not uptodate in {self!r}"
        assert new >> self.nblocks == 0, "redirty mask wider than the folio"
        was_clean = not self._dirty
        self._dirty |= new
        self.mapping._account_dirty(self, new.bit_count(), was_clean)

    def clear_dirty(self, first: int = 0, n: int | None = None) -> None:
        """Drop the dirty state of blocks [first, first+n) without writing
        them (truncate, invalidate, writeback discarding after an error).
        Caller holds the folio lock."""
        self.assert_locked()
        gone = self._dirty & self._range(first, n)
        if gone:
            self._dirty &= ~gone
            self.mapping._account_clean(self, gone.bit_count(), not self._dirty)

    def zero(self, offset: int, length: int) -> None:
        """Zero ``length`` bytes at ``offset`` inside the folio (no state
        change).  Caller holds the folio lock."""
        self.assert_locked()
        if length > 0:
            self.data[offset:offset + length] = bytes(length)

    # -- the folio lock -----------------------------------------------------

    @property
    def locked(self) -> bool:
        return self._owner is not None

    async def lock(self) -> None:
        """folio_lock: sleep until the lock is ours.  FIFO hand-off on
        unlock, like trio.Lock.  Afterwards the caller must check that
        ``folio.mapping`` is still the mapping it looked in (truncate or
        eviction may have removed the folio while it waited);
        AddressSpace.get_folio does that."""
        await trio.lowlevel.checkpoint_if_cancelled()
        task = _current_task()
        if self._owner is None:
            self._owner = task
            if _locks.DEBUG_LOCKS:
                _track_locked(task, self)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if self._owner is task:
            raise RuntimeError(f"task {task.name} locks {self!r}, which it already holds "
                               "(deadlock)")
        if self._lot is None:
            self._lot = trio.lowlevel.ParkingLot()
        await self._lot.park()
        # unlock() handed the lock to us (and tracked it) before waking us.

    def trylock(self) -> bool:
        """folio_trylock: take the lock if free, never sleep."""
        if self._owner is not None:
            return False
        task = _current_task()
        self._owner = task
        if _locks.DEBUG_LOCKS:
            _track_locked(task, self)
        return True

    def unlock(self) -> None:
        """folio_unlock: release, handing the lock to the longest waiter."""
        owner = self._owner
        if owner is None:
            raise RuntimeError(f"unlock of an unlocked folio {self!r}")
        if _locks.DEBUG_LOCKS:
            task = _current_task()
            if owner is not task:
                raise RuntimeError(f"task {task.name} unlocks {self!r}, "
                                   f"locked by task {owner.name}")
            _track_unlocked(owner, self)
        lot = self._lot
        if lot:
            (nxt,) = lot.unpark()
            self._owner = nxt
            if _locks.DEBUG_LOCKS:
                _track_locked(nxt, self)
            if not lot:
                self._lot = None
        else:
            self._owner = None

    def assert_locked(self) -> None:
        """Precondition check: the current task holds this folio's lock
        (DEBUG_LOCKS only)."""
        if _locks.DEBUG_LOCKS and self._owner is not _current_task():
            raise AssertionError(f"folio lock of {self!r} not held by the current task")

    # -- the writeback flag ---------------------------------------------------

    def start_writeback(self) -> None:
        """folio_start_writeback: I/O for some of its blocks is being
        submitted.  Caller holds the folio lock; the flag outlives the lock
        and is cleared by end_writeback at I/O completion."""
        self.assert_locked()
        assert not self.writeback, f"start_writeback of a folio under writeback: {self!r}"
        assert self.mapping is not None
        self.writeback = True
        self.mapping._account_writeback(self, True)

    def end_writeback(self) -> None:
        """folio_end_writeback: the I/O completed.  Needs no folio lock
        (truncate waits for this while holding it).  Wakes waiters; a clean
        folio becomes evictable again."""
        assert self.writeback, f"end_writeback of a folio not under writeback: {self!r}"
        self.writeback = False
        self.mapping._account_writeback(self, False)
        ev = self._wb_event
        if ev is not None:
            self._wb_event = None
            ev.set()

    async def wait_writeback(self) -> None:
        """folio_wait_writeback: return once the folio is not under
        writeback.  Only a schedule point if it has to wait."""
        while self.writeback:
            if self._wb_event is None:
                self._wb_event = trio.Event()
            await self._wb_event.wait()


# ---------------------------------------------------------------------------
# errseq
# ---------------------------------------------------------------------------

class ErrSeq:
    """Writeback error reporting with errseq_t semantics (lib/errseq.c's idea).

    A sequence of error events: each ``set`` records an errno and moves the
    counter; an open file description holds an ErrSeqCursor, and
    ``check_and_advance`` (at fsync) reports to it the newest errno if any
    error happened since it last looked -- once per description, however
    many errors there were.

    Two deliberate differences from the kernel.  ``sample`` (at open)
    returns the current position, so errors from before the open are never
    reported to that description; errseq_sample instead hands out a cookie
    *before* an error nobody has seen yet, so the next opener inherits it
    (delafs reports an error only to descriptions that were open when it
    happened -- a later opener did not write the lost data).  And every
    error moves the counter: the kernel collapses errors nobody has seen
    into one event to save counter bits, which is only sound with its
    sample rule (a description opened between two unseen errors would
    otherwise miss the second).

    Attributes: _seq (event counter, 0 = never an error), _errno (newest
    errno), _seen (some description has reported the newest event; for
    statistics).  No lock: every method is synchronous.
    """

    __slots__ = ("_seq", "_errno", "_seen")

    def __init__(self):
        self._seq = 0
        self._errno = 0
        self._seen = False

    def set(self, err: int) -> None:
        """Record a writeback error (an errno, either sign; 0 is ignored)."""
        if not err:
            return
        self._seq += 1
        self._errno = abs(err)
        self._seen = False

    def sample(self) -> int:
        """Cookie for a new file description: errors so far are not its."""
        return self._seq

    def check(self, cursor: "ErrSeqCursor") -> int:
        """The errno of an error since the cursor's cookie, or 0; no advance."""
        return self._errno if cursor.cookie != self._seq else 0

    def check_and_advance(self, cursor: "ErrSeqCursor") -> int:
        """At fsync: the errno of an error since the cursor's cookie (0 if
        none), and advance the cursor so it is reported once."""
        if cursor.cookie == self._seq:
            return 0
        self._seen = True
        cursor.cookie = self._seq
        return self._errno

    @property
    def errno(self) -> int:
        """The newest recorded errno (0 if none), regardless of cursors."""
        return self._errno

    @property
    def seen(self) -> bool:
        return self._seen

    def __repr__(self) -> str:
        return f"<ErrSeq seq={self._seq} errno={self._errno} seen={self._seen}>"


class ErrSeqCursor:
    """One per open file description: the ErrSeq cookie sampled at open."""

    __slots__ = ("cookie",)

    def __init__(self, errseq: ErrSeq):
        self.cookie = errseq.sample()


# ---------------------------------------------------------------------------
# AddressSpace
# ---------------------------------------------------------------------------

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
      writeback_index  SortedSet of first blocks of folios under writeback
                       (the writeback tag)
      invalidate_lock  RWSemaphore ordering folio instantiation (read, fault)
                       against removal (truncate, punch); see locks.py
      nrpages          blocks cached; nrdirty: dirty blocks;
      nrwriteback      folios under writeback
      wb_err           ErrSeq of writeback errors, checked at fsync
    """

    def __init__(self, cache: "PageCache", ino: int):
        self.cache = cache
        self.ino = ino
        self.folios: SortedDict = SortedDict()
        self.dirty_index: SortedSet = SortedSet()
        self.writeback_index: SortedSet = SortedSet()
        self.invalidate_lock = RWSemaphore(f"invalidate_lock[{ino}]")
        self.nrpages = 0
        self.nrdirty = 0
        self.nrwriteback = 0
        self.wb_err = ErrSeq()

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

    def oldest_dirtied_when(self) -> float | None:
        """When the longest-dirty folio became dirty (None if clean)."""
        folios = self.folios
        return min((folios[i].dirtied_when for i in self.dirty_index), default=None)

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
        point iff ``lock``.

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
                folio = self._add_folio(block, nblocks_hint, lock)
                if lock:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return folio
            self.cache.mark_accessed(folio)
            if not lock:
                return folio
            await folio.lock()
            if folio.mapping is self:
                return folio
            folio.unlock()            # removed while we waited: look again

    def _add_folio(self, block: int, nblocks_hint: int, lock: bool) -> Folio:
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
            task = _current_task()
            folio._owner = task
            if _locks.DEBUG_LOCKS:
                _track_locked(task, folio)
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
        folio.mapping = None
        self.nrpages -= folio.nblocks
        self.cache._folio_removed(folio)

    # -- accounting hooks called by Folio (synchronous) ----------------------

    def _account_dirty(self, folio: Folio, nblocks: int, was_clean: bool) -> None:
        cache = self.cache
        if was_clean:
            folio.dirtied_when = trio.current_time()
            self.dirty_index.add(folio.index)
            cache._lru.pop(folio, None)
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
            if not folio.writeback:
                cache._lru[folio] = None
            if not self.nrdirty:
                cache._dirty_mappings.pop(self.ino, None)
        cache._maybe_unthrottle()

    def _account_writeback(self, folio: Folio, starting: bool) -> None:
        cache = self.cache
        if starting:
            self.writeback_index.add(folio.index)
            self.nrwriteback += 1
            cache.writeback_bytes += folio.size
            cache._lru.pop(folio, None)
        else:
            self.writeback_index.discard(folio.index)
            self.nrwriteback -= 1
            cache.writeback_bytes -= folio.size
            if not folio._dirty:
                cache._lru[folio] = None
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


# ---------------------------------------------------------------------------
# PageCache
# ---------------------------------------------------------------------------

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
      _lru              OrderedDict Folio -> None, least recently used first:
                        exactly the cached folios that are clean and not
                        under writeback

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
        self._lru: OrderedDict[Folio, None] = OrderedDict()
        self._nfolios = 0
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
                       "flusher_errors": 0, "flusher_calls": 0, "expired_calls": 0}

    # -- mappings -------------------------------------------------------------

    def mapping(self, ino: int) -> AddressSpace:
        """The inode's AddressSpace, created on first use."""
        m = self._mappings.get(ino)
        if m is None:
            m = self._mappings[ino] = AddressSpace(self, ino)
        return m

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
        self._lru[folio] = None

    def _folio_removed(self, folio: Folio) -> None:
        self.cached_bytes -= folio.size
        self._nfolios -= 1
        self._lru.pop(folio, None)

    def mark_accessed(self, folio: Folio) -> None:
        """folio_mark_accessed: move a clean folio to the young end."""
        lru = self._lru
        if folio in lru:
            lru.move_to_end(folio)

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
            folio, _ = lru.popitem(last=False)
            if not folio.trylock():
                busy.append(folio)
                continue
            folio.mapping.remove(folio)
            folio.unlock()
            evicted += 1
        for folio in busy:
            lru[folio] = None
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
                    wb += f.size
                if not nd and not f.writeback:
                    lru_expect.add(f)
                cached += f.size
                nfolios += 1
            assert pages == m.nrpages, (m, pages)
            assert mdirty == m.nrdirty, (m, mdirty)
            assert mwb == m.nrwriteback, (m, mwb)
            assert dirty_idx == set(m.dirty_index), m
            assert (ino in self._dirty_mappings) == (mdirty > 0), m
            dirty += mdirty << BLOCK_SHIFT
        assert cached == self.cached_bytes, (cached, self.cached_bytes)
        assert dirty == self.dirty_bytes, (dirty, self.dirty_bytes)
        assert wb == self.writeback_bytes, (wb, self.writeback_bytes)
        assert nfolios == self._nfolios
        assert lru_expect == set(self._lru), "LRU is not exactly the clean idle folios"

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
