"""The metadata buffer cache and the running transaction.

Metadata (btree nodes, bitmap blocks, fsinfo) is read lazily, one block at a
time, decoded and verified once, and kept in an LRU cache.  Changing a block
makes it *dirty*: it joins the running transaction and is pinned in memory
until that transaction is committed.  A commit turns every dirty block into
its on-disk image (the snapshot, taken atomically between metadata
operations) and writes the images to the journal.  Images then wait in the
checkpoint list until a checkpoint writes them home, so a block evicted from
the cache is re-read from the newest image, never from a stale home location:

    dirty/cache  ->  committing (in flight)  ->  pending (durable)  ->  device

Locking.  ``meta_lock`` (a lib/locks.Mutex owned by the filesystem, passed in)
serializes every metadata operation; an operation holds it across its awaits
(cache misses), so tasks see each other's changes only whole.  ``commit_lock``
serializes journal writes.  Order: meta_lock -> commit_lock; the holder of
commit_lock never takes meta_lock, so a commit can snapshot under meta_lock
and write the journal after dropping it while new operations go on.
"""

from __future__ import annotations

import errno
from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Protocol

from ..lib.errors import FsError
from ..lib.locks import Mutex, ki_protected
from .journal import Journal, log_blocks_needed


class MetaBlock(Protocol):
    blocknr: int

    def encode(self, seq: int) -> bytes: ...


#: Decoded blocks the cache keeps.  A decoded full leaf is about 12 KiB of
#: Python objects (a packed int key, a bytes value and two list slots for
#: each of 119 extent items), three times its 4 KiB image, so 2048 blocks
#: bound the cache near 24 MiB.
#: A miss costs a pread the host's page cache usually answers and a decode
#: (~0.1 ms).
CACHE_BLOCKS = 2048
#: Committed images kept in memory until a checkpoint writes them home.  The
#: log alone would let them reach three quarters of the journal (up to 96 MiB
#: for the largest), so a checkpoint also runs once this many are waiting.
PENDING_BLOCKS = 4096
#: Dirty blocks at which a metadata operation rolls its transaction (sooner
#: if an eighth of the log is less).  A dirty block stays decoded in the
#: cache, beside the CACHE_BLOCKS clean ones, until it commits: rolling at
#: an eighth of a large log let the sparse job hold 2,674 (~60 MiB).  Each
#: roll is a commit (a log write and its flush), one per 512 blocks dirtied.
DIRTY_ROLL = 512


@dataclass
class _Frozen:
    seq: int
    images: dict[int, bytes]
    revokes: set[int]


class MetaStore:
    """Attributes:
      cache      OrderedDict blocknr -> decoded block, LRU order (meta_lock)
      dirty      blocknr -> block changed in the running transaction (meta_lock)
      revokes    blocks freed in the running transaction (meta_lock)
      committing images frozen but not yet durable (set under meta_lock,
                 drained under commit_lock)
      pending    durable images not yet written home (commit_lock); a
                 commit checkpoints first when the log runs short or
                 ``pending_blocks`` images are waiting
      dirty_roll   dirty blocks at which operations roll (roll_threshold)
      running_seq  sequence number the running transaction will commit as
      durable_seq  newest transaction known to be on stable storage
      failed       why a frozen transaction or a checkpoint could not be
                   written (None while the log is usable); once set nothing
                   is frozen or written again, and ``on_failure`` was told
    """

    def __init__(self, dev, journal: Journal | None, meta_lock: Mutex, *,
                 cache_blocks: int = CACHE_BLOCKS,
                 on_home: Callable[[int], None] | None = None,
                 on_failure: Callable[[str], None] | None = None,
                 overlay: dict[int, bytes] | None = None):
        self.dev = dev
        self.journal = journal          # None: read-only, nothing is ever written
        self.meta_lock = meta_lock
        self.commit_lock = Mutex()
        self.cache: OrderedDict[int, MetaBlock] = OrderedDict()
        self.cache_blocks = cache_blocks
        self.pending_blocks = PENDING_BLOCKS
        self.dirty_roll = DIRTY_ROLL
        self.dirty: dict[int, MetaBlock] = {}
        self.revokes: set[int] = set()
        self.committing: dict[int, bytes] = {}
        self.pending: dict[int, bytes] = dict(overlay or {})
        self.running_seq = journal.next_seq if journal else 1
        self.durable_seq = self.running_seq - 1
        self.on_home = on_home
        self.on_failure = on_failure
        self.failed: str | None = None
        # Bumped by every change: lets an operation tell whether it has
        # modified anything (and so must shut down if it then fails).
        self.changes = 0
        self.stats = {"hits": 0, "misses": 0, "evictions": 0, "commits": 0,
                      "blocks_committed": 0}

    @property
    def readonly(self) -> bool:
        return self.journal is None

    # -- reading ----------------------------------------------------------------

    async def get(self, blk: int, decode: Callable[[bytes, int], MetaBlock]) -> MetaBlock:
        obj = self.cache.get(blk)
        if obj is not None:
            self.cache.move_to_end(blk)
            self.stats["hits"] += 1
            return obj
        self.stats["misses"] += 1
        img = self.committing.get(blk) or self.pending.get(blk)
        if img is None:
            img = await self.dev.read(blk, 1)
            # Another task may have loaded it while we waited for the device.
            obj = self.cache.get(blk)
            if obj is not None:
                return obj
        obj = decode(img, blk)
        self.cache[blk] = obj
        return obj

    # -- changing -----------------------------------------------------------------

    def add(self, obj: MetaBlock) -> None:
        """A freshly allocated block: cached and dirty, never read."""
        self.changes += 1
        self.revokes.discard(obj.blocknr)
        self.cache[obj.blocknr] = obj
        self.dirty[obj.blocknr] = obj

    def mark_dirty(self, obj: MetaBlock) -> None:
        if self.readonly:
            raise FsError(errno.EROFS, "filesystem is read-only")
        self.changes += 1
        self.dirty[obj.blocknr] = obj

    def forget(self, blk: int) -> None:
        """The block was freed: drop it and revoke its journaled images."""
        self.changes += 1
        self.cache.pop(blk, None)
        self.dirty.pop(blk, None)
        self.revokes.add(blk)

    def evict(self) -> None:
        """Trim clean blocks to the cache limit: between operations, or
        inside one where it holds no decoded block (Filesystem.roll_if_full)."""
        excess = len(self.cache) - self.cache_blocks
        if excess <= 0:
            return
        # The oldest ``excess`` clean blocks lie among the oldest
        # excess + dirty keys: no need to copy the whole order.
        for blk in list(islice(self.cache, excess + len(self.dirty))):
            if excess <= 0:
                break
            if blk in self.dirty:
                continue
            del self.cache[blk]
            excess -= 1
            self.stats["evictions"] += 1

    # -- committing -----------------------------------------------------------------

    @property
    def roll_threshold(self) -> int:
        """Dirty blocks at which an operation should roll to a new
        transaction: ``dirty_roll``, or an eighth of the log if that is
        less, so a transaction always fits."""
        return max(8, min(self.journal.L // 8, self.dirty_roll)) if self.journal else 1 << 30

    def should_roll(self) -> bool:
        """The running transaction holds enough dirty blocks to commit
        before an operation goes on (or, between operations, ends)."""
        return len(self.dirty) > self.roll_threshold

    def has_changes(self) -> bool:
        return bool(self.dirty or self.revokes)

    def _snapshot(self) -> _Frozen | None:
        """Freeze the running transaction (meta_lock held, no await inside)."""
        self._check_usable()
        if not self.has_changes():
            return None
        seq = self.running_seq
        images = {blk: obj.encode(seq) for blk, obj in self.dirty.items()}
        self.running_seq += 1
        frozen = _Frozen(seq, images, self.revokes)
        # Visible to readers from now on: the cache may evict these blocks
        # as soon as they are clean, long before the write completes.
        self.committing.update(images)
        self.dirty = {}
        self.revokes = set()
        return frozen

    def _check_usable(self) -> None:
        if self.failed:
            # A frozen transaction was lost: one committed after it would
            # sit where recovery expects the lost one and never be replayed.
            raise FsError(errno.EIO, f"the journal is unusable: {self.failed}")

    def _fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
            if self.on_failure:
                self.on_failure(why)

    async def _write(self, frozen: _Frozen) -> None:
        """Write a frozen transaction (commit_lock held).  Any failure, an
        I/O error or a cancellation alike, leaves the transaction neither
        in the log nor in the running one: the store fails for good."""
        try:
            await self._write_frozen(frozen)
        except BaseException as e:
            self._fail(f"journal commit failed: {e} (transaction {frozen.seq})")
            raise

    async def _write_frozen(self, frozen: _Frozen) -> None:
        j = self.journal
        need = log_blocks_needed(len(frozen.images), len(frozen.revokes))
        if need > j.L // 2:
            raise FsError(errno.EFBIG, f"metadata transaction of {need} log blocks exceeds half the journal ({j.L} blocks)")
        if j.free() < need + j.L // 4 or len(self.pending) >= self.pending_blocks:
            await self._checkpoint()
        j.next_seq = frozen.seq + 1
        await j.write_transaction(frozen.seq, frozen.images, frozen.revokes)
        self.pending.update(frozen.images)
        for blk, img in frozen.images.items():
            if self.committing.get(blk) is img:
                del self.committing[blk]
        for blk in frozen.revokes:
            if blk not in frozen.images:
                self.pending.pop(blk, None)
        self.durable_seq = frozen.seq
        self.stats["commits"] += 1
        self.stats["blocks_committed"] += len(frozen.images)

    @ki_protected       # commit_lock is taken by hand: no Ctrl-C before the try (lib/locks.py)
    async def commit(self) -> int:
        """Make every change made so far durable; return its sequence number."""
        if self.readonly:
            return self.durable_seq
        # commit_lock first, then freeze: a cancellation (or Ctrl-C) met at
        # the acquire must find nothing frozen yet, or the transaction would
        # be dropped unwritten and the next one take its successor's number,
        # where recovery stops.  meta_lock, held across, keeps changes out.
        async with self.meta_lock:
            await self.commit_lock.acquire()
            try:
                frozen = self._snapshot()
            except BaseException:
                self.commit_lock.release()
                raise
        try:
            if frozen is not None:
                await self._write(frozen)
            return self.durable_seq
        finally:
            self.commit_lock.release()

    async def commit_locked(self) -> int:
        """Commit from inside a metadata operation (meta_lock already held):
        how a long operation rolls its transaction so none grows unbounded."""
        async with self.commit_lock:        # then freeze: see commit()
            frozen = self._snapshot()
            if frozen is not None:
                await self._write(frozen)
        return self.durable_seq

    async def _checkpoint(self) -> None:
        self._check_usable()
        try:
            await self.journal.checkpoint(self.pending)
        except BaseException as e:
            self._fail(f"checkpoint failed: {e}")
            raise
        self.pending = {}
        # Every transaction up to durable_seq is home: the log no longer
        # holds anything a recovery could roll back past.
        if self.on_home:
            self.on_home(self.durable_seq)

    async def checkpoint_locked(self) -> None:
        """Commit and checkpoint from inside a metadata operation (meta_lock
        held): how an allocation short of space gets the busy blocks back."""
        async with self.commit_lock:        # then freeze: see commit()
            frozen = self._snapshot()
            if frozen is not None:
                await self._write(frozen)
            await self._checkpoint()

    async def checkpoint(self) -> None:
        """Commit, then write every image home and empty the log."""
        if self.readonly:
            return
        await self.commit()
        async with self.commit_lock:
            await self._checkpoint()

    def statistics(self) -> dict:
        return dict(self.stats, cached=len(self.cache), dirty=len(self.dirty),
                    pending=len(self.pending), running_seq=self.running_seq,
                    durable_seq=self.durable_seq,
                    log_used=self.journal.used() if self.journal else 0,
                    log_blocks=self.journal.L if self.journal else 0)
