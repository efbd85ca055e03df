"""The deterministic race explorer (``delafs race``).

It runs many small concurrent workloads against the iomap engine on an
in-memory image, each under a schedule drawn from a seed, and checks
DESIGN.md's invariants after every scheduling step and the data at the end.
Any failing schedule replays exactly from its seed (``--replay SEED``).

How a schedule runs
-------------------

Everything happens in one ``trio.run``, on a :class:`~delafs.block.device.MemoryDevice`
whose I/O completes inline (no worker threads), with a ``MockClock`` (no real
time) and without the flusher or the periodic committer: writeback is one of
the explorer's own tasks.

The :class:`Scheduler` installs itself as ``POINTS.explorer``.  A task that
reaches a named yield point (``await POINTS.hit(name)`` in the engine) *parks*
there on its own ``trio.Event``.  The driver loop waits until every task is
blocked (``trio.testing.wait_all_tasks_blocked``), checks the invariants, then
picks ONE parked task with its own ``random.Random`` and releases it; that task
runs alone until it parks again, blocks or finishes.

Why this is a pure function of the seed
---------------------------------------

* Only one task runs between two driver steps.  A task that waits for a sleeping
  lock (``i_rwsem``/``invalidate_lock``, a folio lock, a folio's writeback) is
  "blocked", not parked; when the running task hands it the lock, it becomes
  runnable too -- so the lock waits are wrapped (while the explorer runs) to
  park the woken task at a point named after the lock, before it executes any
  engine code.  The only code a woken task runs concurrently with the released
  one is that bookkeeping, which touches nothing but its own parking record.
* Parked tasks are chosen by their index in spawn order, never in the order they
  parked, so trio's own (randomised) run-queue order never matters.
* A trio Instrument checks every task step: a task may only run if it is the one
  released, or is waking from a wrapped lock wait.  Anything else (a wait the
  explorer does not know about) is reported as an ``explorer`` finding rather
  than silently making the run depend on trio's scheduler.  A task blocked on
  an unknown primitive can never be woken (nobody else runs), which shows up as
  a deadlock finding.
* The device does no I/O in threads and never checkpoints; the clock is a
  ``MockClock`` (errortag delays stay 0: a real sleep would block forever and be
  reported as a deadlock); the workload, the errortag RNG and the scheduler RNG
  are all derived from the seed (``random.Random`` seeded with a string is
  stable across processes and ``PYTHONHASHSEED``).

The image's UUID and timestamps are random and from the wall clock, but nothing
the engine decides depends on them.

The workload
------------

Drawn from the seed (:func:`make_plan`): a file of 8-32 blocks, sized by
truncate, by a zero-filling write (synced or not), partly fallocated
(UNWRITTEN), or on an almost full image (writes fall back to UNWRITTEN
allocation, ENOSPC happens), optionally read first (large clean folios) and
with a tiny page cache (eviction); one or two buffered writers (small writes in
their own slot of a block, multi-block and aligned writes, extending writes,
and writes whose source cannot be faulted in -- they stop and punch the rest
of their NEW delalloc, or fail with EFAULT: a direct punch of their whole
range), with ``short_copy``/``stale_mapping``/``copy_fault`` injected; one or
two mmap writers storing in their own slot of blocks of the region that never
leaves EOF (some stores *chase*: they go to a block a write is in the middle
of); a truncate task moving EOF in the tail and back; a writeback task
(writepages, journal commits), sometimes with ``writeback_eio`` or
``alloc_enospc`` injected (``alloc_enospc`` can be limited to some tasks:
page faults only, writeback only, writers only); sometimes a reader.  Blocks
are chosen at random, among a few hot blocks, or by every task sweeping the
same blocks in the same order (holetest).  Three scheduling strategies: uniform
choice, random per-task speeds, and PCT (priorities with random change points).

What is checked
---------------

After every step: the allocator (space identity), the extent maps, the page
cache counters, no dirty block over a HOLE, no dirty block past EOF, the
allocator's reservations equal the delalloc extents' data + indlen, and --
except where an operation is in progress (a write call's range, a truncate's
tail, any folio that some task holds locked) -- no DELALLOC under a clean or
absent cache block (post-EOF speculative preallocation excepted).

At the end: the same invariants with no exemption after every writer closed,
then every byte is compared with a model updated at the exact moment data
lands in the page cache (each buffered-write copy, each mmap store, each
truncate), through the page cache, after ``syncfs``, and after unmounting and
opening the image again; and fsck must find the image clean.  Bytes a failed
writeback (injected ``writeback_eio`` / ``alloc_enospc``) may legitimately have
lost are excluded until something lands on them again; after such a failure
the on-disk size may also lag (only completed ioends move it), which is
accepted if nothing but zeros or such bytes lie past it.  A writeback failure
with nothing injected is a finding.

Mutants
-------

``--mutant NAME`` monkeypatches a deliberately broken piece of the engine
(:data:`MUTANTS`) for the run, and the mutant's workload profile draws the
features that make it observable (:data:`_PROFILES`).  ``no_eof_clamp`` is an
equivalent mutant in this model, which tracks dirty state per block: a block
past ``round_up(i_size)`` is never dirty while a punch scan can run -- the
scan runs under ``i_rwsem`` exclusive, so no truncate is half-way; write_end
moves ``i_size`` in the same step in which it dirties blocks; page_mkwrite
dirties only blocks inside EOF, under ``invalidate_lock`` which truncate takes
exclusive; zeroing dirties only inside EOF; and a shrinking truncate removes
or cleans every block past the new EOF before it drops ``i_rwsem``.  So the
scan finds nothing to keep past EOF, with or without the clamp (the explorer
counts such scans, and its dirty-past-EOF invariant would flag the premise).
In the kernel the clamp matters because dirtiness is per folio: a dirty folio
straddling EOF makes its post-EOF blocks look dirty.
"""

from .explore import explore, format_summary, main, replay
from .invariants import invariant_violations
from .mutants import MUTANTS, mutant
from .plan import Plan, make_plan
from .schedule import Result, Schedule, run_schedule
from .scheduler import DONE, Finding, Scheduler, TaskInfo

__all__ = ["DONE", "MUTANTS", "Finding", "Plan", "Result", "Schedule", "Scheduler", "TaskInfo",
           "explore", "format_summary", "invariant_violations", "main", "make_plan", "mutant",
           "replay", "run_schedule"]
