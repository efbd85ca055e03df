"""Sleeping locks of the engine, and the one canonical statement of their order.

Lock order (outermost first; a task may only take a lock further down the
list while holding one further up, never the reverse)::

    i_rwsem            per inode, RWSemaphore          -- VFS adapter / engine
      invalidate_lock  per mapping, RWSemaphore        -- engine, page cache
        folio lock     per folio (mm/folio.Folio)     -- page cache
          meta_lock    the filesystem's Mutex: the punch callback and
                       every extent-map change           -- fs/filesystem.py
            commit_lock  the journal's Mutex           -- log/metabuf.py

Outside that order: the read lock of pyfuse3's session loop, a Mutex
(fuse/loop.py), held only while a reader waits for /dev/fuse, with no
other lock held and none taken under it.

Who takes what:

- buffered write: ``i_rwsem`` exclusive for the whole write; inside it each
  iteration locks the folios it copies into.  The punch after a short copy
  also takes ``invalidate_lock`` exclusive (it removes cached folios over
  the range it punches) -- still inside ``i_rwsem``, so the order holds.
- page fault (``page_mkwrite``): ``invalidate_lock`` shared, then the folio
  lock, held while the folio is dirtied and its space reserved.  No
  ``i_rwsem``: a fault can run while a buffered write is in progress, which
  is exactly the race the invalidate lock is there to order.
- truncate, hole punch, zero range, the punch after a short write:
  ``invalidate_lock`` exclusive (under ``i_rwsem`` exclusive for the
  syscalls), so no fault or read can instantiate a folio over a range whose
  blocks are being taken away.
- read: ``invalidate_lock`` shared while it instantiates folios (so truncate
  cannot race a read that is filling a folio from blocks being freed).
- writeback (flusher, fsync): neither ``i_rwsem`` nor ``invalidate_lock``,
  only folio locks; when ``writeback_range`` fails it discards the folio's
  delalloc under the folio lock alone.  Hence the punch callback must be
  correct with or without the invalidate lock, and must never take a folio
  lock itself (it runs under one).

Never wait for writeback, dirty throttling, log space or free space while
holding a folio lock or an open transaction (truncate's wait for writeback
under the folio lock is the kernel's one exception and is safe because
writeback completion never needs the folio lock).

An uncontended acquire of any of these locks does not yield to the trio
scheduler, as the kernel's lock fast paths do not schedule: a yield costs a
scheduler pass (an epoll_wait) and was most of the time of a 4 KiB write.
Only waiting yields; a pending cancellation still raises at every acquire.  So a task runs from one real wait (I/O, a contended
lock, a named yield point of iomap/types.POINTS) to the next, and the race
explorer, which parks tasks at exactly those places, sees the same steps.

``DEBUG_LOCKS`` (environment ``DELAFS_DEBUG_LOCKS``, on unless set to 0/off/
false/no; a mounted daemon defaults to off, like lockdep in a production
kernel, and the test suite turns it on) turns on the ownership assertions (``assert_held``, the
folio-lock checks in mm/folio.py).  It is read at call time, so a process
may flip it; the bookkeeping that makes releases safe is always on.

Ctrl-C: trio raises KeyboardInterrupt between any two bytecodes of code
that is not KI-protected, which could leave a lock half handed over or
held by a task that is gone.  So every acquire, release and ``async with``
of these locks is KI-protected, and so is the code that takes meta_lock or
commit_lock by hand (acquire, then a ``try`` whose ``finally`` releases):
the transaction's enter and exit, iomap_begin, MetaStore.commit.  A pending
Ctrl-C still arrives at the main task's next checkpoint (so a protected
stretch of pure computation delays it by that long).  The folio lock's
hand-offs are protected, not yet every path that holds one: see the
mm/folio.py docstring.  (The daemon takes signals through a
receiver and never sees one; in-process tools and tests do.)
"""

from __future__ import annotations

import os
from collections import deque

import trio

__all__ = ["DEBUG_LOCKS", "Mutex", "RWSemaphore", "assert_owned", "ki_protected"]


def env_flag(name: str, default: bool) -> bool:
    val = os.environ.get(name)
    if val is None:
        return default
    return val.strip().lower() not in ("0", "", "off", "false", "no")


DEBUG_LOCKS: bool = env_flag("DELAFS_DEBUG_LOCKS", True)

_current_task = trio.lowlevel.current_task
# A Ctrl-C is raised between any two bytecodes of unprotected code; in the
# middle of a hand-off it would leave a waiter owning a lock it is never
# woken for, and the teardown after the Ctrl-C would hang on it.  trio 0.28
# and later mark the code object (python-trio/trio#3110) where older ones
# wrapped the function: no cost per call (hence pyproject's lower bound).
ki_protected = trio.lowlevel.enable_ki_protection


class Mutex:
    """A FIFO sleeping mutex (meta_lock, commit_lock, pyfuse3's read lock):
    the kernel's mutex.

    An uncontended acquire takes it without yielding; a release hands it to
    the longest waiter before that task runs, so a task arriving meanwhile
    queues behind it (no barging).  A task cancelled while queued leaves
    the queue.  Not recursive: acquiring it again raises RuntimeError, as
    does a release by a task that does not hold it.

    Its own rather than a trio.Lock: an uncontended acquire and release of
    a trio.Lock registered the owner as the lock's breaker (a dict of lists
    and an inspect call) and cost ~2.9 us a pair; meta_lock is taken several
    times by every request.  What that bought, breaking the lock when its
    owner exits without releasing, delafs does not need: every holder
    releases in ``async with``, whose enter and exit are KI-protected like
    the hand-offs (a Ctrl-C raised as ``__aexit__`` starts would otherwise
    leave the lock held by a task that is gone).
    """

    __slots__ = ("_owner", "_waiters")

    def __init__(self):
        self._owner = None
        self._waiters: deque | tuple = ()     # a deque once contended

    @ki_protected
    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        task = _current_task()
        if self._owner is None and not self._waiters:
            self._owner = task
            return
        if self._owner is task:
            raise RuntimeError("Mutex: acquired again by the task holding it (not recursive)")
        if not self._waiters:
            self._waiters = deque()
        self._waiters.append(task)

        def abort(_raise_cancel):
            # Still queued: a granted waiter was rescheduled and cannot be aborted.
            self._waiters.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        # release() made us the owner before waking us.

    @ki_protected
    def release(self) -> None:
        if self._owner is not _current_task():
            raise RuntimeError("Mutex: released by a task that does not hold it")
        if self._waiters:
            self._owner = self._waiters.popleft()
            trio.lowlevel.reschedule(self._owner)
        else:
            self._owner = None

    def locked(self) -> bool:
        return self._owner is not None

    @property
    def owner(self):
        """The task holding it, or None."""
        return self._owner

    @ki_protected
    async def __aenter__(self):
        await self.acquire()

    @ki_protected
    async def __aexit__(self, *exc):
        self.release()
        return False


def assert_owned(lock: Mutex, what: str) -> None:
    """Precondition check for a Mutex (meta_lock): the current task holds
    it.  A no-op unless DEBUG_LOCKS."""
    if DEBUG_LOCKS and lock.owner is not _current_task():
        raise AssertionError(f"{what} called without holding its lock")


class _Waiter:
    __slots__ = ("exclusive", "task")

    def __init__(self, exclusive: bool, task):
        self.exclusive = exclusive
        self.task = task


class _Guard:
    """``async with sem.shared():`` / ``async with sem.exclusive():``.

    A tiny class rather than an asynccontextmanager: no generator per use."""

    __slots__ = ("_sem", "_exclusive")

    def __init__(self, sem: "RWSemaphore", exclusive: bool):
        self._sem = sem
        self._exclusive = exclusive

    @ki_protected
    async def __aenter__(self):
        if self._exclusive:
            await self._sem.acquire_exclusive()
        else:
            await self._sem.acquire_shared()
        return self._sem

    @ki_protected
    async def __aexit__(self, *exc):
        if self._exclusive:
            self._sem.release_exclusive()
        else:
            self._sem.release_shared()
        return False


class RWSemaphore:
    """A reader/writer sleeping lock for trio tasks (the kernel's rw_semaphore).

    Used for ``i_rwsem`` and each mapping's ``invalidate_lock``.

    Policy: strict FIFO hand-off with writer preference.  A new acquirer gets
    the lock at once only if nobody is queued; otherwise it queues, so once a
    writer waits, readers arriving later wait behind it and a stream of
    readers cannot starve a writer.  When the lock is released the head of
    the queue is granted: one writer, or every reader up to the next queued
    writer.  Ownership is handed over before the woken task runs, so nothing
    can slip in between.  (The kernel also lets readers behind a queued writer
    in when it wakes readers; strict FIFO is simpler and starvation-free.)

    The lock is not recursive: acquiring it again in any mode while holding
    it is a certain deadlock (or a latent one, for shared behind a queued
    writer) and raises RuntimeError.  Releasing a mode you do not hold raises
    RuntimeError.  A task cancelled while queued leaves the queue; if it was
    the head writer, the readers behind it are granted.

    Attributes (all changed only synchronously, so atomic under trio):
      name      for messages and statistics
      _writer   the task holding it exclusive, or None
      _readers  set of tasks holding it shared
      _waiters  deque of _Waiter in arrival order; the shared empty tuple
                until the lock is first contended
      _n_*      the counters statistics() reports

    Every inode has two of these, so they are small: slots, and no deque
    until one is needed (an empty deque is 600 bytes; with a counters dict
    the two locks of an inode took 2.2 KiB).
    """

    __slots__ = ("name", "_writer", "_readers", "_waiters", "_n_shared", "_n_exclusive",
                 "_n_contended", "_n_cancelled")

    def __init__(self, name: str = "rwsem"):
        self.name = name
        self._writer = None
        self._readers: set = set()
        self._waiters: deque[_Waiter] | tuple = ()
        self._n_shared = self._n_exclusive = self._n_contended = self._n_cancelled = 0

    def __repr__(self) -> str:
        state = ("exclusive" if self._writer is not None
                 else f"shared x{len(self._readers)}" if self._readers else "free")
        return f"<RWSemaphore {self.name} {state}, {len(self._waiters)} waiting>"

    @property
    def idle(self) -> bool:
        """Nobody holds it and nobody waits for it."""
        return self._writer is None and not self._readers and not self._waiters

    # -- acquiring ----------------------------------------------------------

    def _check_not_held(self, task) -> None:
        if self._writer is task or task in self._readers:
            raise RuntimeError(f"{self.name}: task {task.name} acquires a lock it already holds "
                               "(not recursive: this deadlocks)")

    @ki_protected
    async def acquire_shared(self) -> None:
        """Take the lock shared.  Uncontended, this does not yield (see
        the module docstring); a pending cancellation still raises."""
        await trio.lowlevel.checkpoint_if_cancelled()
        task = _current_task()
        self._check_not_held(task)
        if self._writer is None and not self._waiters:
            self._readers.add(task)
            self._n_shared += 1
            return
        await self._wait(False, task)

    @ki_protected
    async def acquire_exclusive(self) -> None:
        """Take the lock exclusive.  Uncontended, this does not yield."""
        await trio.lowlevel.checkpoint_if_cancelled()
        task = _current_task()
        self._check_not_held(task)
        if self._writer is None and not self._readers and not self._waiters:
            self._writer = task
            self._n_exclusive += 1
            return
        await self._wait(True, task)

    @ki_protected
    def acquire_shared_nowait(self) -> None:
        """down_read_trylock: take it shared now or raise trio.WouldBlock."""
        task = _current_task()
        self._check_not_held(task)
        if self._writer is not None or self._waiters:
            raise trio.WouldBlock
        self._readers.add(task)
        self._n_shared += 1

    @ki_protected
    def acquire_exclusive_nowait(self) -> None:
        """down_write_trylock: take it exclusive now or raise trio.WouldBlock."""
        task = _current_task()
        self._check_not_held(task)
        if self._writer is not None or self._readers or self._waiters:
            raise trio.WouldBlock
        self._writer = task
        self._n_exclusive += 1

    async def _wait(self, exclusive: bool, task) -> None:
        waiter = _Waiter(exclusive, task)
        if not self._waiters:
            self._waiters = deque()
        self._waiters.append(waiter)
        self._n_contended += 1

        def abort(_raise_cancel):
            # Only called while we are still queued (a granted waiter has
            # already been rescheduled and cannot be aborted), so the lock
            # state never includes us here.  Leaving may unblock the queue:
            # a writer at the head kept the readers behind it waiting.
            self._waiters.remove(waiter)
            self._n_cancelled += 1
            self._grant()
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        # _grant() made us an owner before waking us.

    def _grant(self) -> None:
        """Hand the lock to the head of the queue if it can have it."""
        q = self._waiters
        while q and self._writer is None:
            w = q[0]
            if w.exclusive:
                if self._readers:
                    return
                q.popleft()
                self._writer = w.task
                self._n_exclusive += 1
                trio.lowlevel.reschedule(w.task)
                return
            q.popleft()
            self._readers.add(w.task)
            self._n_shared += 1
            trio.lowlevel.reschedule(w.task)

    # -- releasing ----------------------------------------------------------

    @ki_protected
    def release_shared(self) -> None:
        task = _current_task()
        try:
            self._readers.remove(task)
        except KeyError:
            raise RuntimeError(f"{self.name}: release_shared by task {task.name}, "
                               "which does not hold it shared") from None
        if not self._readers:
            self._grant()

    @ki_protected
    def release_exclusive(self) -> None:
        task = _current_task()
        if self._writer is not task:
            raise RuntimeError(f"{self.name}: release_exclusive by task {task.name}, "
                               "which does not hold it exclusive")
        self._writer = None
        self._grant()

    # -- context managers ---------------------------------------------------

    def shared(self) -> _Guard:
        """``async with sem.shared(): ...``"""
        return _Guard(self, False)

    def exclusive(self) -> _Guard:
        """``async with sem.exclusive(): ...``"""
        return _Guard(self, True)

    # -- ownership queries and debug assertions ---------------------------------

    @property
    def locked(self) -> bool:
        """Held in any mode by anyone."""
        return self._writer is not None or bool(self._readers)

    def held_exclusive_by_current(self) -> bool:
        return self._writer is _current_task()

    def held_shared_by_current(self) -> bool:
        """Held *shared* by the current task (exclusive does not count here;
        ``assert_held('shared')`` accepts either)."""
        return _current_task() in self._readers

    def assert_held(self, mode: str = "shared") -> None:
        """Precondition check: the current task holds the lock in ``mode``.

        'exclusive' requires exclusive; 'shared' accepts shared or exclusive
        (holding it exclusive excludes everyone a shared holder excludes).
        A no-op unless DEBUG_LOCKS."""
        if not DEBUG_LOCKS:
            return
        task = _current_task()
        if mode == "exclusive":
            ok = self._writer is task
        elif mode == "shared":
            ok = self._writer is task or task in self._readers
        else:
            raise ValueError(f"mode must be 'shared' or 'exclusive', not {mode!r}")
        if not ok:
            raise AssertionError(f"{self.name} must be held {mode} by task {task.name} "
                                 f"({self!r})")

    def statistics(self) -> dict:
        waiting_writers = sum(1 for w in self._waiters if w.exclusive)
        return {
            "name": self.name,
            "readers": len(self._readers),
            "writer": self._writer.name if self._writer is not None else None,
            "waiting_readers": len(self._waiters) - waiting_writers,
            "waiting_writers": waiting_writers,
            "acquisitions_shared": self._n_shared,
            "acquisitions_exclusive": self._n_exclusive,
            "contended": self._n_contended,
            "cancelled_waits": self._n_cancelled,
        }
