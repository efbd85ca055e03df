"""Folios: a page-cache unit of one or more blocks with per-block uptodate
and dirty bits and a lock (struct folio plus iomap's iomap_folio_state).

A ``Folio`` caches ``nblocks`` file blocks (a power of two, naturally
aligned).  Large folios are normal.  Each block has an *uptodate* and a
*dirty* bit; the bits live in two Python ints (bit i = block index+i) and
are only touched through the small helpers on Folio.  Block arguments to
those helpers are *relative to the folio* (``first`` = 0 is the folio's
first block), half-open ``[first, first+n)``.

The folio lock guards a folio's data and its dirty/uptodate bits.
``Folio.lock`` yields only when it must wait (an uncontended lock is taken
at once, as lib/locks.py explains), and a pending cancellation raises there
as at any acquire.  With DEBUG_LOCKS the folios each task holds locked
are tracked, so waits that must not happen under a folio lock can check.

A holder that awaits with a folio locked must unlock it whatever the await
raises (delalloc_scan around a punch that fails, writepages around a wait
for writeback that is cancelled), or the next user of the folio waits
forever.  Lock, unlock and their hand-offs are KI-protected
(lib/locks.py); a Ctrl-C between two bytecodes of a holder's synchronous
stretch (the write loop's copy and write_end, readahead's batch before its
``try``, the shrinker's trylock and remove) can still leave one locked.
Only in-process runs meet that: the daemon takes signals through a receiver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from ..lib import locks as _locks
from ..lib.units import BLOCK_SHIFT

MAX_FOLIO_BLOCKS = 512          # 2 MiB, a PMD-sized folio on x86-64

if TYPE_CHECKING:
    from .filemap import AddressSpace

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
      wb_blocks     how many blocks that writeback is writing (what the
                    cache counts as writeback bytes, as dirty bytes count
                    dirty blocks)
      _owner        task holding the folio lock, or None

    A folio is on the cache's LRU exactly when it is in a mapping, clean and
    not under writeback; eviction additionally needs trylock to succeed.
    """

    __slots__ = ("mapping", "index", "nblocks", "data", "_uptodate", "_dirty",
                 "dirtied_when", "writeback", "wb_blocks", "_owner", "_lot", "_wb_event",
                 "lru_prev", "lru_next")

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
        self.wb_blocks = 0
        self._owner = None
        self._lot: trio.lowlevel.ParkingLot | None = None
        self._wb_event: trio.Event | None = None
        # Links of the page cache's LRU (pagecache.FolioLru); None: not on it.
        self.lru_prev = self.lru_next = None

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

    @_locks.ki_protected
    def lock_new(self) -> None:
        """Lock a folio nobody else can see yet (it is being added to the
        mapping locked, as filemap_add_folio does): no wait."""
        task = _current_task()
        self._owner = task
        if _locks.DEBUG_LOCKS:
            _track_locked(task, self)

    @_locks.ki_protected
    async def lock(self) -> None:
        """folio_lock: sleep until the lock is ours.  FIFO hand-off on
        unlock, like trio.Lock.  Afterwards the caller must check that
        ``folio.mapping`` is still the mapping it looked in (truncate or
        eviction may have removed the folio while it waited);
        AddressSpace.get_folio does that."""
        await trio.lowlevel.checkpoint_if_cancelled()
        task = _current_task()
        if self._owner is None:          # uncontended: no yield (lib/locks.py)
            self._owner = task
            if _locks.DEBUG_LOCKS:
                _track_locked(task, self)
            return
        if self._owner is task:
            raise RuntimeError(f"task {task.name} locks {self!r}, which it already holds "
                               "(deadlock)")
        if self._lot is None:
            self._lot = trio.lowlevel.ParkingLot()
        await self._lot.park()
        # unlock() handed the lock to us (and tracked it) before waking us.

    @_locks.ki_protected
    def trylock(self) -> bool:
        """folio_trylock: take the lock if free, never sleep."""
        if self._owner is not None:
            return False
        task = _current_task()
        self._owner = task
        if _locks.DEBUG_LOCKS:
            _track_locked(task, self)
        return True

    @_locks.ki_protected
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

    def start_writeback(self, mask: int | None = None) -> None:
        """folio_start_writeback: I/O for the blocks of ``mask`` (what
        clear_dirty_for_io returned; None: every block) is being submitted.
        Caller holds the folio lock; the flag outlives the lock and is
        cleared by end_writeback at I/O completion."""
        self.assert_locked()
        assert not self.writeback, f"start_writeback of a folio under writeback: {self!r}"
        assert self.mapping is not None
        self.writeback = True
        self.wb_blocks = self.nblocks if mask is None else mask.bit_count()
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
