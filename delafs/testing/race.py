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

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import random
import sys
import time
from dataclasses import dataclass, field

import trio
import trio.testing

from ..block.memory import MemoryDevice
from ..fs.extent_map import ExtState
from ..fs.filesystem import Filesystem
from ..fs.fsck import check
from ..fs.iomap_ops import FsIomapOps
from ..iomap.buffered_io import Engine, IovIter
from ..iomap.types import POINTS
from ..iomap.writeback import writepages
from ..lib.errors import FsError
from ..lib.errortag import ErrorTags
from ..lib.locks import RWSemaphore
from ..lib.units import round_up
from ..mm.pagecache import Folio
from ..ondisk import BLOCK_SHIFT, BLOCK_SIZE, ROOT_INO
from ..vfs.mount import Mount

BS = BLOCK_SIZE
INF = 1 << 62
IMAGE_SIZE = 8 << 20
DEFAULT_MAX_STEPS = 20000
# Byte slots inside every block (holetest style): buffered writers' small
# writes use [0, 512) and [1024, 1536), mmap stores [2048, 3072).
MMAP_SLOT = (2048, 3072)

# ---------------------------------------------------------------------------
# Findings
# ---------------------------------------------------------------------------


@dataclass
class Finding:
    """One problem found by one schedule.

    kind: "data loss" (a byte differs from the model), "invariant" (a DESIGN.md
    invariant broke after a step), "fsck", "deadlock", "livelock" (step limit),
    "exception" (a task raised something the workload does not expect) or
    "explorer" (the determinism guard tripped: an explorer bug)."""
    seed: int
    step: int | str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"seed {self.seed} step {self.step}: {self.kind}: {self.message}"


class _Stop(Exception):
    pass


# ---------------------------------------------------------------------------
# The scheduler
# ---------------------------------------------------------------------------

NEW, PARKED, RUNNING, WAITING, BLOCKED, DONE = "new", "parked", "running", "waiting", "blocked", "done"


class TaskInfo:
    """An explorer task: its spawn index (the only order choices use), its
    state, where it is parked, and the block range it has an operation in
    progress on (for the invariant exemptions)."""

    __slots__ = ("index", "name", "state", "event", "point", "busy", "task", "ops_done")

    def __init__(self, index: int, name: str):
        self.index = index
        self.name = name
        self.state = NEW
        self.event: trio.Event | None = None
        self.point = "start"
        self.busy: tuple[int, int] | None = None
        self.task = None
        self.ops_done = 0


class Scheduler:
    """Parks tasks at yield points and releases one at a time, chosen by its
    own seeded RNG.  See the module docstring for the determinism argument."""

    def __init__(self, seed: int, *, max_steps: int = DEFAULT_MAX_STEPS):
        self.rng = random.Random(f"delafs-race:{seed}:schedule")
        self.tasks: list[TaskInfo] = []
        self.by_task: dict = {}
        self.trace: list[tuple[int, str, str]] = []
        self.log: list[str] = []          # workload events, for --replay
        self.step = 0
        self.max_steps = max_steps
        self.guard_violations: list[str] = []
        self.cancelling = False
        self.stop = False
        self.deadlock: list[TaskInfo] = []
        self.livelock = False
        self.strategy = self.rng.choice(["uniform", "uniform", "speeds", "pct"])
        self.prio: dict[int, int] | None = None
        self.speeds: list[float] | None = None
        self.change_points: set[int] = set()

    # -- called by tasks -------------------------------------------------------

    def info(self) -> TaskInfo | None:
        return self.by_task.get(trio.lowlevel.current_task())

    async def point(self, name: str) -> None:
        """POINTS.hit lands here: park the calling explorer task until the
        driver picks it.  Other tasks (setup, final checks) pass through."""
        info = self.by_task.get(trio.lowlevel.current_task())
        if info is None:
            return
        ev = trio.Event()
        info.event = ev
        info.point = name
        info.state = PARKED
        await ev.wait()

    # -- the wrapped lock waits (installed by _patched_waits) ------------------

    def waiting(self) -> TaskInfo | None:
        info = self.by_task.get(trio.lowlevel.current_task())
        if info is not None:
            info.state = WAITING
        return info

    # -- the driver -------------------------------------------------------------

    def _choose(self, parked: list[TaskInfo]) -> TaskInfo:
        """Three strategies, chosen per schedule by the RNG.

        ``uniform``: any parked task, equally likely (fine-grained
        interleavings).  ``speeds``: each task gets a random weight, so some
        crawl while others run many steps.  ``pct`` (probabilistic
        concurrency testing): tasks get random distinct priorities, the
        highest parked one always runs, and at a few random steps the one
        about to run drops to the lowest priority -- one task runs far while
        another stays parked at an arbitrary point."""
        if len(parked) == 1:
            return parked[0]
        if self.strategy == "uniform":
            return parked[self.rng.randrange(len(parked))]
        if self.strategy == "speeds":
            if self.speeds is None:
                self.speeds = [self.rng.choice([0.05, 0.2, 1.0, 1.0, 4.0]) for _ in self.tasks]
            return self.rng.choices(parked, weights=[self.speeds[t.index] for t in parked])[0]
        if self.prio is None:
            order = list(range(len(self.tasks)))
            self.rng.shuffle(order)
            self.prio = {i: p + 1 for i, p in enumerate(order)}
            self.change_points = {self.rng.randint(1, 160) for _ in range(self.rng.randint(1, 4))}
        t = max(parked, key=lambda t: self.prio[t.index])
        if self.step + 1 in self.change_points and len(parked) > 1:
            self.prio[t.index] = -(self.step + 1)
            t = max(parked, key=lambda t: self.prio[t.index])
        return t

    async def drive(self, on_step) -> None:
        """Release parked tasks one at a time until all are done, a check
        fails (on_step returns False) or nothing can run."""
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if self.guard_violations or not on_step(self.step) or self.stop:
                return
            parked = [t for t in self.tasks if t.state == PARKED]
            if not parked:
                self.deadlock = [t for t in self.tasks if t.state != DONE]
                return
            if self.step >= self.max_steps:
                self.livelock = True
                return
            t = self._choose(parked)
            for o in self.tasks:
                if o.state == RUNNING:
                    o.state = BLOCKED      # blocked on something unwrapped
            self.step += 1
            self.trace.append((self.step, t.name, t.point))
            t.state = RUNNING
            ev, t.event = t.event, None
            ev.set()


class _Guard(trio.abc.Instrument):
    """Every step of an explorer task must be allowed by the explorer."""

    def __init__(self, sched: Scheduler):
        self.sched = sched

    def before_task_step(self, task) -> None:
        s = self.sched
        info = s.by_task.get(task)
        if info is None or s.cancelling or info.state in (NEW, RUNNING, WAITING):
            return
        s.guard_violations.append(
            f"task {info.name} ran in state {info.state!r} (at {info.point!r}) at step {s.step}: "
            "woken by a primitive the explorer does not schedule")


@contextlib.contextmanager
def _patched_waits(sched: Scheduler):
    """While exploring, a task that had to wait for a sleeping lock parks right
    after it got it, so the task that woke it keeps running alone."""
    orig_wait = RWSemaphore._wait
    orig_lock = Folio.lock
    orig_wait_wb = Folio.wait_writeback

    async def _wait(self, exclusive, task):
        info = sched.waiting()
        await orig_wait(self, exclusive, task)
        if info is not None:
            await sched.point(f"got {self.name.split('[')[0]} {'excl' if exclusive else 'shared'}")

    async def lock(self):
        owner = self._owner
        if owner is None or owner is trio.lowlevel.current_task():
            return await orig_lock(self)
        info = sched.waiting()
        await orig_lock(self)
        if info is not None:
            await sched.point("got folio lock")

    async def wait_writeback(self):
        if not self.writeback:
            return
        info = sched.waiting()
        await orig_wait_wb(self)
        if info is not None:
            await sched.point("writeback done")

    RWSemaphore._wait = _wait
    Folio.lock = lock
    Folio.wait_writeback = wait_writeback
    old_explorer = POINTS.explorer
    POINTS.explorer = sched
    try:
        yield
    finally:
        POINTS.explorer = old_explorer
        RWSemaphore._wait = orig_wait
        Folio.lock = orig_lock
        Folio.wait_writeback = orig_wait_wb


# ---------------------------------------------------------------------------
# Invariants (shared with tests/engine/conftest.py)
# ---------------------------------------------------------------------------

def invariant_violations(m: Mount, exempt=None, *, limit: int = 5) -> list[str]:
    """DESIGN.md's per-block invariants; returns messages (empty if all hold).

    ``exempt(ino, block)`` -> True for blocks where an operation is in
    progress: the "no DELALLOC under a clean or absent cache block" rule does
    not apply to them (everything else always does).  With ``exempt`` None the
    filesystem must be quiescent."""
    out: list[str] = []
    fs = m.fs
    a = fs.space.alloc
    try:
        a.check()
    except (AssertionError, ValueError) as e:
        out.append(str(e))
    if a.total != a.available + a.used + a.reserved + a.metadata_reserve:
        out.append(f"space: total {a.total} != available {a.available} + used {a.used} + "
                   f"reserved {a.reserved} + metadata reserve {a.metadata_reserve}")
    try:
        m.cache.verify()
    except AssertionError as e:
        out.append(f"page cache: {e}")
    reserved = 0
    for ino in sorted(fs.emaps):
        emap = fs.emaps[ino]
        try:
            emap.check()
        except AssertionError as e:
            out.append(f"inode {ino}: {e}")
        inode = m.inodes.get(ino)
        mapping = inode.mapping if inode else None
        pre = m.ops.prealloc_start(ino)
        eof_blocks = (inode.size + BS - 1) >> BLOCK_SHIFT if inode is not None else None
        for ext in emap.iter_extents(0):
            if ext.state != ExtState.DELALLOC:
                continue
            reserved += ext.length + ext.indlen
            for b in range(ext.fblock, ext.end):
                folio = mapping.lookup(b) if mapping else None
                if folio is not None and folio.dirty_blocks(b - folio.index, 1):
                    continue
                if pre is not None and b >= pre and eof_blocks is not None and b >= eof_blocks:
                    continue            # speculative preallocation, trimmed at close
                if folio is not None and folio._owner is not None:
                    continue            # someone is working on this folio
                if exempt is not None and exempt(ino, b):
                    continue
                state = "absent" if folio is None else "clean"
                out.append(f"stale delalloc: inode {ino} block {b} is DELALLOC under a {state} "
                           f"cache block (eof block {eof_blocks})")
                break
            if len(out) >= limit:
                return out
        if mapping:
            for folio in mapping.dirty_folios():
                for first, n in folio.dirty_segments():
                    for b in range(folio.index + first, folio.index + first + n):
                        st = emap.lookup(b).state
                        if st == ExtState.HOLE:
                            out.append(f"dirty block {b} of inode {ino} lies over a HOLE "
                                       "(dirty data without a space reservation)")
                            break
                        if eof_blocks is not None and b >= eof_blocks and not (
                                exempt is not None and exempt(ino, b)):
                            out.append(f"dirty block {b} of inode {ino} lies past EOF "
                                       f"(eof block {eof_blocks}): writeback would drop it")
                            break
                if len(out) >= limit:
                    return out
    if reserved != a.reserved:
        out.append(f"reservations: allocator has {a.reserved} blocks reserved, delalloc "
                   f"extents hold {reserved} (data + indlen)")
    return out


# ---------------------------------------------------------------------------
# Fault injection with per-task filters
# ---------------------------------------------------------------------------

class RaceErrorTags(ErrorTags):
    """ErrorTags whose tags can be limited to some tasks (by name prefix), so
    a workload injects, say, ENOSPC into page faults but not into writeback."""

    def __init__(self, seed, sched: Scheduler):
        super().__init__(seed)
        self.sched = sched
        self.only: dict[str, tuple[str, ...]] = {}

    def fires(self, tag: str) -> bool:
        if not self.active:
            return False
        prefixes = self.only.get(tag)
        if prefixes is not None:
            info = self.sched.info()
            if info is None or not info.name.startswith(prefixes):
                return False
        return super().fires(tag)

    async def delay(self, tag: str) -> None:
        # Real sleeps would make the run depend on time; they stay off.
        return None

    def clear(self) -> None:
        for t in self.values:
            self.values[t] = 0
        self.active = False


# ---------------------------------------------------------------------------
# The data model
# ---------------------------------------------------------------------------

class Model:
    """What the file must contain: updated at the instant bytes land in the
    page cache (a buffered-write copy, an mmap store) or a truncate returns,
    which under trio's single thread is a total order."""

    def __init__(self, size: int, cap: int):
        self.cap = cap
        self.data = bytearray(cap)
        self.amb = bytearray(cap)       # 1: a failed writeback may have lost this byte
        self.size = size
        self.events: list[tuple[int, str, int, int]] = []   # (step, who, pos, len)
        self.failed_writeback = False

    def land(self, pos: int, data, who: str, step: int) -> None:
        n = len(data)
        assert pos + n <= self.cap, (pos, n, self.cap)
        self.data[pos:pos + n] = data
        self.amb[pos:pos + n] = bytes(n)
        self.events.append((step, who, pos, n))

    def truncate(self, size: int) -> None:
        if size < self.size:
            self.data[size:self.size] = bytes(self.size - size)
            self.amb[size:self.size] = bytes(self.size - size)
        self.size = size

    def ambiguous(self, lo: int, hi: int) -> None:
        self.failed_writeback = True
        lo, hi = max(0, lo), min(self.cap, hi)
        if lo < hi:
            self.amb[lo:hi] = b"\x01" * (hi - lo)

    def short_ok(self, disk_size: int) -> bool:
        """After a failed writeback the on-disk size may lag the in-memory
        one (only completed ioends move it): acceptable if nothing certain
        but zeros lies past it."""
        if not self.failed_writeback or disk_size > self.size:
            return False
        for off in range(disk_size, self.size):
            if self.data[off] and not self.amb[off]:
                return False
        return True

    def who(self, off: int) -> str:
        for step, who, pos, n in reversed(self.events):
            if pos <= off < pos + n:
                return f"{who} at step {step}"
        return "nobody (zeros)"

    def compare(self, got: bytes, where: str, *, allow_short: bool = False) -> str | None:
        size = self.size
        if allow_short and len(got) < size and self.short_ok(len(got)):
            size = len(got)
        exp = bytearray(self.data[:size])
        amb = self.amb
        i = amb.find(1, 0, size)
        while i != -1:
            j = amb.find(0, i, size)
            if j == -1:
                j = size
            exp[i:j] = got[i:j] if len(got) >= j else exp[i:j]
            i = amb.find(1, j, size)
        if len(got) == size and got == exp:
            return None
        n = min(len(got), size)
        off = next((k for k in range(n) if got[k] != exp[k]), n)
        if off == n and len(got) != size:
            return f"{where}: file size {len(got)}, expected {size}"
        end = off
        while end < n and got[end] != exp[end]:
            end += 1
        return (f"{where}: bytes [{off}, {end}) of the file (block {off >> BLOCK_SHIFT}) read "
                f"{bytes(got[off:min(end, off + 12)])!r}..., expected "
                f"{bytes(exp[off:min(end, off + 12)])!r}... written by {self.who(off)}")


class RaceIovIter(IovIter):
    """A write source that records, at the instant of each copy into a folio,
    which file bytes it put there (and takes them back on revert)."""

    __slots__ = ("pos", "model", "who", "sched", "fail_at", "kept", "_undo")

    def __init__(self, data, tags, pos: int, model: Model, who: str, sched: Scheduler,
                 fail_at: int | None = None):
        super().__init__(data, tags)
        self.pos = pos
        self.model = model
        self.who = who
        self.sched = sched
        self.fail_at = fail_at        # source offset from which it cannot be faulted in
        self.kept = 0
        self._undo = None

    def fault_in(self, n: int) -> int:
        if self.fail_at is not None and self.off >= self.fail_at:
            return 0
        return super().fault_in(n)

    def copy_to(self, buf, off: int, n: int) -> int:
        start = self.off
        copied = super().copy_to(buf, off, n)
        fpos = self.pos + start
        m = self.model
        self._undo = (fpos, bytes(m.data[fpos:fpos + copied]), bytes(m.amb[fpos:fpos + copied]))
        m.land(fpos, self.data[start:start + copied], self.who, self.sched.step)
        self.kept += copied
        return copied

    def revert(self, n: int) -> None:
        super().revert(n)
        if n:
            fpos, old, oldamb = self._undo
            end = fpos + len(old)
            self.model.data[end - n:end] = old[len(old) - n:]
            self.model.amb[end - n:end] = oldamb[len(oldamb) - n:]
            self.kept -= n


# ---------------------------------------------------------------------------
# Mutants: deliberately broken engines
# ---------------------------------------------------------------------------

MUTANTS = {
    "no_invalidate_lock": "the delalloc punch scans the page cache without invalidate_lock",
    "no_eof_clamp": "the punch scan runs to the end of the range, not min(EOF, end)",
    "mkwrite_punches": "a failing page_mkwrite punches the delalloc of the range it was mapping",
    "punch_unwritten": "the punch callback also removes UNWRITTEN extents",
    "no_cookie_check": "iomap_valid always says the mapping is current",
    "no_writeback_discard": "a failed writeback_range leaves the folio's delalloc in place",
    "per_folio_punch": "the scan keeps delalloc under every block of a dirty folio (folio granular)",
}

_mutant_stats = {"scans": 0, "scans_with_dirty_past_eof": 0}


async def _release_body(self: Engine, inode, start: int, end: int, *, clamp: bool) -> None:
    """Engine.delalloc_release without its lock assertion, EOF clamp optional."""
    mapping = inode.mapping
    punch_start = start
    scan_end = min(round_up(inode.size), end) if clamp else end
    _mutant_stats["scans"] += 1
    eof = round_up(inode.size)
    for folio in mapping.iter_folios(eof >> BLOCK_SHIFT, (end + BS - 1) >> BLOCK_SHIFT):
        if any(max(eof, start) <= ((folio.index + f) << BLOCK_SHIFT) < end
               for f, _ in folio.dirty_segments()):
            _mutant_stats["scans_with_dirty_past_eof"] += 1
            break
    pos = start
    while pos < scan_end:
        pos = mapping.seek_data(pos, scan_end)
        if pos >= scan_end:
            break
        data_end = mapping.seek_hole(pos, scan_end)
        punch_start = await self._delalloc_scan(inode, punch_start, pos, data_end)
        pos = data_end
    if punch_start < end:
        await self._punch(inode, punch_start, end)


async def _m_punch_delalloc_nolock(self: Engine, inode, start: int, end: int) -> None:
    if start >= end:
        return
    self.stats["punches"] += 1
    # MUTANT: no invalidate_lock, so faults may instantiate and dirty folios
    # the scan has already passed.
    await POINTS.hit("punch_locked")
    await _release_body(self, inode, start, end, clamp=True)


async def _m_release_noclamp(self: Engine, inode, start: int, end: int) -> None:
    await _release_body(self, inode, start, end, clamp=False)


async def _m_page_mkwrite_failed_punches(self: Engine, inode, folio, end: int) -> None:
    # MUTANT: the old iomap_end error path of the fault punched the range it
    # was mapping, delalloc that others' dirty data needs.
    await self.ops.punch(inode, folio.pos, end - folio.pos)


def _m_punch_locked_unwritten(self: FsIomapOps, ino: int, pos: int, length: int) -> int:
    emap = self.fs.emaps.get(ino)
    if emap is None:
        return 0
    first = pos >> BLOCK_SHIFT
    last = (pos + length + BS - 1) >> BLOCK_SHIFT
    # MUTANT: UNWRITTEN extents go too (their blocks are simply forgotten).
    removed = emap.remove(first, last - first, (ExtState.DELALLOC, ExtState.UNWRITTEN))
    dela = [e for e in removed if e.state == ExtState.DELALLOC]
    n = sum(e.length for e in dela)
    if dela:
        self.fs.space.alloc.unreserve(n + sum(e.indlen for e in dela))
        self.stats["delalloc_punched"] += n
    return n


def _m_iomap_valid_always(self: FsIomapOps, inode, iomap) -> bool:
    return True                          # MUTANT: no validity cookie check


def _m_discard_folio_noop(self: FsIomapOps, ino: int, folio) -> None:
    pass                                 # MUTANT: no discard of the folio's delalloc


async def _m_delalloc_scan_per_folio(self: Engine, inode, punch_start: int, start: int,
                                     end: int) -> int:
    mapping = inode.mapping
    while start < end:
        folio = mapping.lookup(start >> BLOCK_SHIFT)
        if folio is None:
            start = (start & ~(BS - 1)) + BS
            continue
        await folio.lock()
        if folio.mapping is not mapping or not folio.contains(start >> BLOCK_SHIFT):
            folio.unlock()
            continue
        await POINTS.hit("delalloc_scan_folio")
        # MUTANT: a dirty folio protects all its blocks (folio_test_dirty).
        if folio.test_dirty():
            if start > punch_start:
                await self._punch(inode, punch_start, start)
            punch_start = min(end, folio.end)
        start = folio.end
        folio.unlock()
    return punch_start


_MUTANT_PATCHES = {
    "no_invalidate_lock": [(Engine, "punch_delalloc", _m_punch_delalloc_nolock)],
    "no_eof_clamp": [(Engine, "delalloc_release", _m_release_noclamp)],
    "mkwrite_punches": [(Engine, "_page_mkwrite_failed", _m_page_mkwrite_failed_punches)],
    "punch_unwritten": [(FsIomapOps, "_punch_locked", _m_punch_locked_unwritten)],
    "no_cookie_check": [(FsIomapOps, "iomap_valid", _m_iomap_valid_always)],
    "no_writeback_discard": [(FsIomapOps, "discard_folio", _m_discard_folio_noop)],
    "per_folio_punch": [(Engine, "_delalloc_scan", _m_delalloc_scan_per_folio)],
}
assert set(_MUTANT_PATCHES) == set(MUTANTS)


@contextlib.contextmanager
def mutant(name: str | None):
    """Monkeypatch the engine into mutant ``name`` for the duration."""
    if name is None:
        yield
        return
    if name not in MUTANTS:
        raise ValueError(f"unknown mutant {name!r} (known: {', '.join(MUTANTS)})")
    saved = [(cls, attr, cls.__dict__[attr]) for cls, attr, _ in _MUTANT_PATCHES[name]]
    try:
        for cls, attr, fn in _MUTANT_PATCHES[name]:
            setattr(cls, attr, fn)
        yield
    finally:
        for cls, attr, fn in saved:
            setattr(cls, attr, fn)


# ---------------------------------------------------------------------------
# The workload of one schedule
# ---------------------------------------------------------------------------

@dataclass
class Plan:
    """Everything a schedule does, drawn from its seed."""
    nblocks: int                  # initial file size in blocks
    work: int                     # blocks [0, work) never leave EOF (mmap stores live there)
    setup: str                    # truncate | zerofill | zerofill_sync | prealloc | lowspace
    precache: bool                # read the file first: large clean folios
    cache_blocks: int | None      # small page cache (eviction) or None
    tags: dict[str, int]
    only: dict[str, tuple[str, ...]]
    tasks: list[tuple[str, list]] = field(default_factory=list)

    def describe(self) -> list[str]:
        lines = [f"file {self.nblocks} blocks (work region {self.work}), setup {self.setup}"
                 f"{', precached' if self.precache else ''}"
                 f"{f', cache {self.cache_blocks} blocks' if self.cache_blocks else ''}",
                 "errortags " + (", ".join(f"{k}={v}" + (f" (only {'/'.join(self.only[k])})"
                                                         if k in self.only else "")
                                          for k, v in sorted(self.tags.items()) if v) or "none")]
        for name, ops in self.tasks:
            lines.append(f"{name}: " + "; ".join(_op_str(op) for op in ops))
        return lines


def _op_str(op) -> str:
    kind = op[0]
    if kind == "pwrite":
        _, pos, data, fail_at = op
        s = f"pwrite({pos}, {len(data)})"
        return s + (f" unfaultable from {fail_at}" if fail_at is not None else "")
    if kind == "mmap":
        return f"mmap({op[1]}, {len(op[2])}{', chasing' if op[3] else ''})"
    if kind == "truncate":
        return f"truncate({op[1]})"
    if kind == "read":
        return f"read({op[1]}, {op[2]})"
    return kind


_PROFILES = {
    # What a mutant's workload needs for its bug to become observable.  The
    # plain explorer draws all of these too, only less often.
    "mkwrite_punches": dict(enospc=("mmap",), large=True, precache=True, setup="truncate",
                            placement="hot", mmaps=2),
    "no_writeback_discard": dict(enospc=("writeback",), writeback=True),
    "no_cookie_check": dict(enospc=("writeback",), writeback=True, large=True, small_cache=True,
                            placement="hot"),
    "punch_unwritten": dict(writeback=True, short=True, placement="hot", efault=3, mmaps=2),
    "per_folio_punch": dict(large=True, short=True, efault=5, efault_spans=[2, 4, 8],
                            fail_mid=True),
    "no_invalidate_lock": dict(short=True, efault=4, mmaps=2, chase=0.8),
    "no_eof_clamp": dict(extend=True, short=True, placement="hot", efault=3, mmaps=2),
}


def make_plan(seed: int, mutant_name: str | None = None) -> Plan:
    """The workload of schedule ``seed``: a pure function of the seed."""
    r = random.Random(f"delafs-race:{seed}:workload")
    prof = _PROFILES.get(mutant_name, {})
    nblocks = r.choice([8, 12, 16, 24, 32])
    work = nblocks - r.randint(2, max(2, nblocks // 4))
    setup = prof.get("setup") or r.choices(
        ["truncate", "zerofill", "zerofill_sync", "prealloc", "lowspace"], weights=[4, 2, 1, 2, 1])[0]
    precache = prof.get("precache") or r.random() < 0.3 or (prof.get("large") and r.random() < 0.5)
    small_cache = r.random() < (0.5 if prof.get("small_cache") else 0.2)
    cache_blocks = r.choice([6, 12, 24]) if small_cache else None
    tags = {
        "short_copy": r.choice([0, 2, 2, 3, 4, 6]) or (3 if prof.get("short") else 0),
        "stale_mapping": r.choice([0, 0, 3, 5, 8]),
        "copy_fault": r.choice([0, 0, 0, 6, 10]),
        "alloc_enospc": 0,
        "writeback_eio": r.choice([0] * 6 + [2, 4]),
    }
    only: dict[str, tuple[str, ...]] = {}
    if prof.get("enospc"):
        tags["alloc_enospc"] = r.choice([2, 3])
        only["alloc_enospc"] = prof["enospc"]
    elif r.random() < 0.3:
        tags["alloc_enospc"] = r.choice([2, 3, 5])
        only["alloc_enospc"] = r.choice([("mmap",), ("writeback",), ("writer",), ("mmap", "writer")])
    plan = Plan(nblocks, work, setup, precache, cache_blocks, tags, only)
    eof = nblocks * BS

    def marker(name: str, k: int, n: int) -> bytes:
        tag = f"<{name}#{k}>".encode()
        return (tag * (n // len(tag) + 1))[:n]

    # Often most ops hit a few "hot" blocks, so that writers, faults and
    # punches meet on the same blocks (holetest: every task has its own slot
    # in the same pages).
    # Or every task sweeps the same blocks in the same order (holetest's
    # threads walking the pages of one file), so they meet at blocks that
    # are still holes: the first one to arrive reserves, the others race it.
    hot = r.sample(range(work), min(work, r.randint(1, 3)))
    placement = prof.get("placement") or r.choices(["random", "hot", "sweep"], weights=[1, 2, 2])[0]
    hot_p = r.choice([0.5, 0.8]) if placement == "hot" else 0.0
    sweep_start = r.randrange(work)
    sweep_pos: dict[str, int] = {}

    def block(task: str = "") -> int:
        if placement == "sweep" and task:
            k = sweep_pos.get(task, 0)
            sweep_pos[task] = k + 1
            return (sweep_start + k) % work
        return r.choice(hot) if r.random() < hot_p else r.randrange(work)

    nwriters = r.choice([1, 2, 2])
    for w in range(nwriters):
        name = f"writer{w + 1}"
        slot = (0, 1024)[w]
        ops = []
        for k in range(r.randint(2, 5)):
            kind = r.choices(["slot", "multi", "aligned", "extend", "efault"],
                             weights=[5, 3, 3 if prof.get("large") else 1,
                                      2 if prof.get("extend") else 1, prof.get("efault", 2)])[0]
            fail_at = None
            if kind == "slot":
                pos = block(name) * BS + slot + r.randrange(0, 448)
                n = r.randint(8, 64)
            elif kind == "multi":
                b = block() if r.random() < 0.5 else r.randrange(work)
                span = r.randint(2, 8)
                pos = b * BS + r.randrange(0, BS)
                n = min(span * BS - r.randrange(0, BS), max(1, work * BS - pos))
            elif kind == "aligned":
                span = r.choice([2, 4, 8])
                b = r.randrange(max(1, work // span)) * span
                pos, n = b * BS, min(span, work - b) * BS
            elif kind == "extend":
                pos = r.randrange(work * BS, eof + BS)
                n = r.randint(100, 2 * BS)
            else:
                # The source cannot be faulted in from fail_at on: the write
                # stops there and punches the rest of its NEW delalloc (at
                # 0 it fails with EFAULT: a direct punch of its whole range).
                b = block(name)
                span = r.choice(prof.get("efault_spans", [1, 1, 2, 4]))
                pos = b * BS + r.randrange(0, BS) if span == 1 else (b & ~(span - 1)) * BS
                n = r.randint(8, span * BS)
                fail_at = r.choice([0, 0, r.randrange(1, n + 1)] if not prof.get("fail_mid")
                                   else [0, r.randrange(1, n + 1), r.randrange(1, n + 1)])
            ops.append(("pwrite", pos, marker(name, k, n), fail_at))
        plan.tasks.append((name, ops))
    nmmap = prof.get("mmaps") or r.choice([0, 1, 1, 1, 2])
    chase_p = prof.get("chase", r.choice([0.0, 0.3, 0.7]))
    for i in range(nmmap):
        ops = []
        half = (MMAP_SLOT[1] - MMAP_SLOT[0]) // 2
        base = MMAP_SLOT[0] + i * half
        for k in range(r.randint(2, 7)):
            pos = block(f"mmap{i + 1}") * BS + base + 16 * r.randrange(0, half // 16)
            n = r.randint(4, 16)
            # A chasing store goes, at run time, to a block some write is in
            # the middle of (if there is one): faults meet in-flight writes.
            ops.append(("mmap", pos, marker(f"m{i + 1}", k, n), r.random() < chase_p))
        plan.tasks.append((f"mmap{i + 1}", ops))
    if r.random() < 0.6:
        ops = []
        cur = eof
        for _ in range(r.randint(1, 2)):
            small = r.randrange(work * BS, cur + 1) if cur > work * BS else work * BS
            ops.append(("truncate", small))
            cur = r.choice([eof, r.randrange(small, eof + 1)])
            ops.append(("truncate", cur))
        plan.tasks.append(("truncate", ops))
    if prof.get("writeback") or r.random() < 0.8:
        ops = [r.choice(["writepages", "writepages", "writepages", "commit"])
               for _ in range(r.randint(2, 6))]
        if "writepages" not in ops:
            ops.append("writepages")
        plan.tasks.append(("writeback", [(o,) for o in ops]))
    if r.random() < 0.3:
        ops = []
        for _ in range(r.randint(1, 3)):
            pos = r.randrange(eof)
            ops.append(("read", pos, r.randint(1, 4 * BS)))
        plan.tasks.append(("reader", ops))
    return plan


# ---------------------------------------------------------------------------
# One schedule
# ---------------------------------------------------------------------------

_templates: dict[int, bytes] = {}


async def _template(size: int) -> MemoryDevice:
    """A freshly formatted image (formatting costs more than a copy)."""
    img = _templates.get(size)
    if img is None:
        dev = MemoryDevice(size)
        await Filesystem.format(dev)
        img = _templates[size] = bytes(dev.data)
    return MemoryDevice(size, data=img)


@dataclass
class Result:
    seed: int
    findings: list[Finding]
    trace: list[tuple[int, str, str]]
    log: list[str]
    steps: int
    stats: dict

    @property
    def trace_hash(self) -> str:
        h = hashlib.sha1()
        for step, name, point in self.trace:
            h.update(f"{step} {name} {point}\n".encode())
        return h.hexdigest()


class Schedule:
    def __init__(self, seed: int, *, punch: str = "scan", mutant_name: str | None = None,
                 max_steps: int = DEFAULT_MAX_STEPS):
        self.seed = seed
        self.punch = punch
        self.mutant_name = mutant_name
        self.plan = make_plan(seed, mutant_name)
        self.sched = Scheduler(seed, max_steps=max_steps)
        self.findings: list[Finding] = []
        self.stats: dict = {}
        # Choices made while running (deterministic: so is the run).
        self.rt_rng = random.Random(f"delafs-race:{seed}:runtime")

    # -- helpers --------------------------------------------------------------

    def find(self, kind: str, message: str, step=None) -> None:
        self.findings.append(Finding(self.seed, self.sched.step if step is None else step,
                                     kind, message))

    def note(self, text: str) -> None:
        info = self.sched.info()
        who = info.name if info else "-"
        self.sched.log.append(f"[step {self.sched.step}] {who}: {text}")

    def exempt(self, ino: int, b: int) -> bool:
        if ino != self.ino:
            return False
        for t in self.sched.tasks:
            if t.busy is not None and t.busy[0] <= b < t.busy[1]:
                return True
        return False

    def on_step(self, step: int) -> bool:
        msgs = invariant_violations(self.m, self.exempt)
        if self.m.fs.meta_lock.locked():
            msgs.append("explorer: meta_lock is held at a yield point")
        if msgs:
            self.find("invariant", "; ".join(msgs))
            return False
        return not self.findings

    # -- setup --------------------------------------------------------------------

    async def setup(self) -> None:
        p = self.plan
        self.dev = await _template(IMAGE_SIZE)
        fs = await Filesystem.open(self.dev)
        self.tags = RaceErrorTags(f"delafs-race:{self.seed}:errortags", self.sched)
        cache_size = p.cache_blocks * BS if p.cache_blocks else 256 << 20
        self.m = m = Mount(fs, cache_size=cache_size, punch_mode=self.punch, errortags=self.tags)
        inode = await fs.create(ROOT_INO, b"f", 0o644)
        self.ino = ino = inode.ino
        size = p.nblocks * BS
        # Room for every write the plan can make (extending ones end below
        # EOF + 3 blocks, unfaultable ones span up to 8 blocks from the
        # work region).
        self.model = Model(size, (p.nblocks + 12) * BS)
        f = await m.open(ino, write=True)
        if p.setup.startswith("zerofill"):
            await m.write(f, 0, bytes(size))
            if p.setup == "zerofill_sync":
                await m.syncfs()
        else:
            await m.truncate(ino, size)
        if p.setup == "prealloc":
            r = random.Random(f"delafs-race:{self.seed}:prealloc")
            first = r.randrange(p.nblocks)
            cnt = r.randint(1, p.nblocks - first)
            await fs.allocate(ino, first, cnt)        # fallocate(KEEP_SIZE): UNWRITTEN
        elif p.setup == "lowspace":
            r = random.Random(f"delafs-race:{self.seed}:lowspace")
            target = 64 + r.randrange(8, 64)
            filler = await fs.create(ROOT_INO, b"filler", 0o644)
            off = 0
            while fs.space.alloc.available > target:
                n = min(64, fs.space.alloc.available - target)
                try:
                    await fs.pwrite(filler.ino, off, bytes(n * BS))
                except FsError:
                    break
                off += n * BS
            await fs.commit()
        if p.precache:
            await m.read(f, 0, size)
        await m.release(f)
        self.inode = await m.iget(ino)
        self.files = {}
        for name, ops in p.tasks:
            if any(op[0] == "pwrite" for op in ops):
                self.files[name] = await m.open(ino, write=True)
            elif any(op[0] == "read" for op in ops):
                self.files[name] = await m.open(ino, write=False)
        bad = invariant_violations(m)
        if bad:
            self.find("invariant", "after setup: " + "; ".join(bad), step=0)
        for tag, v in p.tags.items():
            self.tags.set(tag, v)
        self.tags.only = dict(p.only)
        self._hook_writeback_failures()

    def _hook_writeback_failures(self) -> None:
        """Bytes a failed writeback may have lost become 'either' in the model."""
        ops = self.m.ops
        model = self.model
        orig_range = ops.writeback_range
        orig_submit = ops.writeback_submit

        hits = self.tags.hits

        async def writeback_range(wpc, folio, pos, length, end_pos):
            injected = hits["alloc_enospc"]
            try:
                return await orig_range(wpc, folio, pos, length, end_pos)
            except FsError as e:
                model.ambiguous(folio.pos, folio.end)
                self.note(f"writeback_range failed ({e}); folio [{folio.pos}, {folio.end}) discarded")
                if hits["alloc_enospc"] == injected:
                    self.find("invariant", f"writeback_range failed with nothing injected: {e}")
                    self.sched.stop = True
                raise

        async def writeback_submit(wpc):
            ranges = [(io.offset, io.offset + io.size) for io in wpc.ready]
            if wpc.ioend is not None:
                ranges.append((wpc.ioend.offset, wpc.ioend.offset + wpc.ioend.size))
            before = ops.stats["writeback_errors"]
            injected = hits["writeback_eio"]
            await orig_submit(wpc)
            if ops.stats["writeback_errors"] != before:
                for lo, hi in ranges:
                    model.ambiguous(lo, hi)
                self.note(f"writeback I/O failed; ioends {ranges} may be lost")
                if hits["writeback_eio"] == injected:
                    self.find("invariant", "writeback I/O failed with nothing injected")
                    self.sched.stop = True

        ops.writeback_range = writeback_range
        ops.writeback_submit = writeback_submit

    # -- the tasks -------------------------------------------------------------------

    async def _task(self, info: TaskInfo, ops) -> None:
        info.task = trio.lowlevel.current_task()
        self.sched.by_task[info.task] = info
        try:
            await self.sched.point("start")
            for op in ops:
                await self.sched.point(f"op {op[0]}")
                await self._op(info, op)
                info.ops_done += 1
        except trio.Cancelled:
            raise
        except _Stop:
            self.sched.stop = True
        except BaseException as e:      # noqa: BLE001 - every surprise is a finding
            import traceback
            tb = traceback.format_exception(type(e), e, e.__traceback__)
            self.find("exception", f"task {info.name} raised {type(e).__name__}: {e}\n"
                      + "".join(tb[-6:]))
            self.sched.stop = True
        finally:
            info.state = DONE
            info.busy = None

    async def _op(self, info: TaskInfo, op) -> None:
        m, model, ino = self.m, self.model, self.ino
        kind = op[0]
        if kind == "pwrite":
            _, pos, data, fail_at = op
            src = RaceIovIter(data, self.tags, pos, model, f"{info.name} pwrite({pos}, {len(data)})",
                              self.sched, fail_at)
            info.busy = (pos >> BLOCK_SHIFT, (pos + len(data) + BS - 1) >> BLOCK_SHIFT)
            try:
                n = await m.write(self.files[info.name], pos, src)
            except FsError as e:
                if e.errno not in (errno.ENOSPC, errno.EFAULT):
                    raise
                self.note(f"pwrite({pos}, {len(data)}) failed: {e}")
                n = 0
            finally:
                info.busy = None
            if src.kept != n:
                self.find("explorer", f"{info.name}: pwrite returned {n} but {src.kept} bytes "
                          "stayed in the page cache")
                raise _Stop
            if n:
                model.size = max(model.size, pos + n)
            self.note(f"pwrite({pos}, {len(data)}) = {n}")
        elif kind == "mmap":
            _, pos, data, chase = op
            if chase:
                busy = sorted(t.busy for t in self.sched.tasks
                              if t.busy is not None and t.name.startswith("writer")
                              and t.busy[0] < self.plan.work)
                if busy:
                    lo, hi = busy[self.rt_rng.randrange(len(busy))]
                    b = self.rt_rng.randrange(lo, min(hi, self.plan.work))
                    pos = b * BS + (pos & (BS - 1))
            try:
                await m.mmap_write(ino, pos, data)
            except FsError as e:
                if e.errno not in (errno.ENOSPC, errno.EFAULT):
                    raise
                self.note(f"mmap store at {pos} failed: {e}")
                return
            model.land(pos, data, f"mmap store({pos}, {len(data)})", self.sched.step)
            self.note(f"mmap store({pos}, {len(data)})")
        elif kind == "truncate":
            new = op[1]
            info.busy = (self.plan.work, INF)
            try:
                await m.truncate(ino, new)
            finally:
                info.busy = None
            model.truncate(new)
            self.note(f"truncate({new})")
        elif kind == "writepages":
            n = await writepages(m.engine, self.inode, sync=False)
            self.note(f"writepages: {n} folios")
        elif kind == "commit":
            await m.fs.commit()
            self.note("journal commit")
        elif kind == "read":
            _, pos, n = op
            got = await m.read(self.files[info.name], pos, n)
            self._check_read(pos, n, got)
        else:
            raise ValueError(f"unknown op {op!r}")

    def _check_read(self, pos: int, n: int, got: bytes) -> None:
        """A read excludes writes and truncates (i_rwsem shared), not mmap
        stores: bytes in the mmap slots of each block are not compared."""
        model = self.model
        end = min(pos + n, model.size)
        exp = bytearray(model.data[pos:end]) if end > pos else bytearray()
        if len(got) != len(exp):
            self.find("data loss", f"read({pos}, {n}) returned {len(got)} bytes, expected {len(exp)}")
            self.sched.stop = True
            return
        for off in range(pos, end):
            if model.amb[off] or MMAP_SLOT[0] <= (off & (BS - 1)) < MMAP_SLOT[1]:
                exp[off - pos] = got[off - pos]
        if bytes(exp) != got:
            k = next(i for i in range(len(got)) if got[i] != exp[i])
            self.find("data loss", f"read({pos}, {n}): byte {pos + k} (block {(pos + k) >> BLOCK_SHIFT}) "
                      f"is {got[k:k + 8]!r}, expected {bytes(exp[k:k + 8])!r} written by "
                      f"{model.who(pos + k)}")
            self.sched.stop = True

    # -- the end ------------------------------------------------------------------------

    async def final(self) -> None:
        m, model = self.m, self.model
        self.tags.clear()
        step = "end"
        for f in self.files.values():
            await m.release(f)
        bad = invariant_violations(m)
        if bad:
            self.find("invariant", "quiescent, after every writer closed: " + "; ".join(bad), step)
            return
        rf = await m.open(self.ino, write=False)
        got = await m.read(rf, 0, model.cap)
        err = model.compare(got, "through the page cache")
        if err:
            self.find("data loss", err, step)
            return
        await m.syncfs()
        bad = invariant_violations(m)
        if self.inode.mapping.nrdirty:
            bad.append(f"{self.inode.mapping.nrdirty} dirty blocks left after syncfs")
        if bad:
            self.find("invariant", "after syncfs: " + "; ".join(bad), step)
            return
        got = await m.read(rf, 0, model.cap)
        err = model.compare(got, "through the page cache after syncfs")
        if err:
            self.find("data loss", err, step)
            return
        await m.release(rf)
        await m.unmount()
        out = io.StringIO()
        report = await check(self.dev, repair=False, out=out)
        if report.exit_code != 0:
            self.find("fsck", out.getvalue().strip().replace("\n", "; ")[:2000], step)
            return
        fs2 = await Filesystem.open(self.dev)
        m2 = Mount(fs2)
        f2 = await m2.open(self.ino, write=False)
        got = await m2.read(f2, 0, model.cap)
        err = model.compare(got, "after unmount and remount", allow_short=True)
        if err:
            self.find("data loss", err, step)
            return
        size = (await m2.getattr(self.ino)).size
        if size != model.size and not model.short_ok(size):
            self.find("data loss", f"after remount the file is {size} bytes, expected {model.size}", step)
        await m2.release(f2)
        await m2.unmount()

    # -- run ------------------------------------------------------------------------------

    async def main(self) -> None:
        await self.setup()
        if self.findings:
            return
        sched = self.sched
        for i, (name, _) in enumerate(self.plan.tasks):
            sched.tasks.append(TaskInfo(i, name))
        with _patched_waits(sched):
            async with trio.open_nursery() as nursery:
                for info, (_, ops) in zip(sched.tasks, self.plan.tasks):
                    nursery.start_soon(self._task, info, ops, name=info.name)
                await sched.drive(self.on_step)
                sched.cancelling = True
                nursery.cancel_scope.cancel()
        if sched.guard_violations:
            self.find("explorer", sched.guard_violations[0])
        if sched.deadlock:
            self.find("deadlock", "no task can run; stuck: " + ", ".join(
                f"{t.name} (last at {t.point!r}, state {t.state})" for t in sched.deadlock))
        if sched.livelock:
            self.find("livelock", f"still running after {sched.max_steps} steps")
        if self.findings:
            return
        await self.final()

    def run(self) -> Result:
        try:
            trio.run(self.main, clock=trio.testing.MockClock(),
                     instruments=[_Guard(self.sched)])
        except BaseException as e:     # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            import traceback
            self.find("exception", f"schedule crashed: {type(e).__name__}: {e}\n"
                      + "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:]))
        stats = {}
        m = getattr(self, "m", None)
        if m is not None:
            stats = {**m.engine.stats, **{f"fs_{k}": v for k, v in m.ops.stats.items()},
                     **{f"tag_{k}": v for k, v in self.tags.hits.items()}}
        return Result(self.seed, self.findings, self.sched.trace, self.sched.log,
                      self.sched.step, stats)


def run_schedule(seed: int, *, punch: str = "scan", mutant_name: str | None = None,
                 max_steps: int = DEFAULT_MAX_STEPS) -> Result:
    """Run the schedule of ``seed`` once (mutant patches applied around it)."""
    with mutant(mutant_name):
        return Schedule(seed, punch=punch, mutant_name=mutant_name, max_steps=max_steps).run()


# ---------------------------------------------------------------------------
# Many schedules
# ---------------------------------------------------------------------------

@dataclass
class Summary:
    punch: str
    mutant: str | None
    schedules: int = 0
    steps: int = 0
    interleavings: set = field(default_factory=set)
    findings: list[Finding] = field(default_factory=list)
    first_finding_at: int | None = None     # 1-based schedule count of the first finding
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)


def explore(*, punch: str = "scan", schedules: int = 100, seed: int = 0,
            mutant_name: str | None = None, stop_at_first: bool = False,
            max_steps: int = DEFAULT_MAX_STEPS, progress=None) -> Summary:
    """Run ``schedules`` schedules with seeds seed, seed+1, ..."""
    if punch not in ("scan", "legacy"):
        raise ValueError(f"punch mode must be scan or legacy, not {punch!r}")
    if mutant_name is not None and mutant_name not in MUTANTS:
        raise ValueError(f"unknown mutant {mutant_name!r} (known: {', '.join(MUTANTS)})")
    s = Summary(punch, mutant_name)
    t0 = time.perf_counter()
    for k in _mutant_stats:
        _mutant_stats[k] = 0
    with mutant(mutant_name):
        for i in range(schedules):
            sd = seed + i
            res = Schedule(sd, punch=punch, mutant_name=mutant_name, max_steps=max_steps).run()
            s.schedules += 1
            s.steps += res.steps
            s.interleavings.add(res.trace_hash)
            for k, v in res.stats.items():
                s.stats[k] = s.stats.get(k, 0) + v
            if res.findings:
                if s.first_finding_at is None:
                    s.first_finding_at = i + 1
                s.findings.extend(res.findings)
            if progress is not None:
                progress(i + 1, res)
            if res.findings and stop_at_first:
                break
    if mutant_name:
        s.stats.update({f"mutant_{k}": v for k, v in _mutant_stats.items()})
    s.seconds = time.perf_counter() - t0
    return s


def format_summary(s: Summary, *, max_findings: int = 5) -> str:
    what = f"punch={s.punch}" + (f" mutant={s.mutant}" if s.mutant else "")
    lines = [f"delafs race ({what}): {s.schedules} schedules, {s.steps} steps, "
             f"{len(s.interleavings)} distinct interleavings, {s.seconds:.1f}s"]
    st = s.stats
    keys = ["punches", "punch_ranges", "short_copies", "stale_mappings", "page_mkwrites",
            "fs_delalloc_converted", "fs_nonda_allocations", "fs_writeback_errors", "fs_discards",
            "mutant_scans", "mutant_scans_with_dirty_past_eof"]
    lines.append("  reached: " + ", ".join(f"{k}={st[k]}" for k in keys if k in st))
    if not s.findings:
        lines.append("  no findings")
    else:
        seeds = sorted({f.seed for f in s.findings})
        lines.append(f"  {len(s.findings)} finding(s) in {len(seeds)} schedule(s); first after "
                     f"{s.first_finding_at} schedule(s)")
        seen = set()
        shown = 0
        for f in s.findings:
            if f.seed in seen:
                continue
            seen.add(f.seed)
            msg = f.message.splitlines()[0] if f.message else ""
            lines.append(f"  - seed {f.seed}, step {f.step}: {f.kind}: {msg}")
            shown += 1
            if shown >= max_findings:
                break
        mut = f" --mutant {s.mutant}" if s.mutant else ""
        lines.append(f"  replay: delafs race --punch {s.punch}{mut} --replay {s.findings[0].seed}")
    return "\n".join(lines)


def replay(seed: int, *, punch: str = "scan", mutant_name: str | None = None,
           out=sys.stdout, max_steps: int = DEFAULT_MAX_STEPS) -> Result:
    """Run one schedule and print its workload, every step and its findings."""
    plan = make_plan(seed, mutant_name)
    print(f"schedule {seed} (punch={punch}{', mutant=' + mutant_name if mutant_name else ''})",
          file=out)
    for line in plan.describe():
        print(f"  {line}", file=out)
    res = run_schedule(seed, punch=punch, mutant_name=mutant_name, max_steps=max_steps)
    logs = {}
    for line in res.log:
        step = int(line[6:line.index("]")])
        logs.setdefault(step, []).append(line)
    for line in logs.pop(0, []):
        print(f"  {line}", file=out)
    for step, name, point in res.trace:
        print(f"step {step:5d}: release {name:<10} at {point}", file=out)
        for line in logs.pop(step, []):
            print(f"           {line}", file=out)
    print(f"trace {res.trace_hash} ({res.steps} steps)", file=out)
    if res.findings:
        for f in res.findings:
            print(f"FINDING {f}", file=out)
    else:
        print("no findings", file=out)
    return res


def main(args) -> int:
    """``delafs race`` (argparse namespace from delafs.cli)."""
    if args.list_mutants:
        for name, what in MUTANTS.items():
            print(f"{name:22} {what}")
        print("no_eof_clamp cannot be caught in this model: no block past EOF is ever dirty "
              "while a punch scan runs (tests/engine/test_race.py)")
        return 0
    if args.mutant and args.punch != "scan":
        print("delafs race: mutants are variants of the scan punch; use --punch scan",
              file=sys.stderr)
        return 2
    if args.replay is not None:
        res = replay(args.replay, punch=args.punch, mutant_name=args.mutant)
        return 1 if res.findings else 0

    def progress(i, res):
        if args.verbose:
            state = "; ".join(str(f).splitlines()[0] for f in res.findings) or "ok"
            print(f"schedule {res.seed}: {res.steps} steps, trace {res.trace_hash[:12]}: {state}",
                  flush=True)
        elif sys.stderr.isatty() and i % 50 == 0:
            print(f"\r{i}/{args.schedules} schedules", end="", file=sys.stderr, flush=True)

    s = explore(punch=args.punch, schedules=args.schedules, seed=args.seed,
                mutant_name=args.mutant, stop_at_first=args.exitfirst, progress=progress)
    if sys.stderr.isatty() and not args.verbose:
        print("\r", end="", file=sys.stderr)
    print(format_summary(s))
    return 1 if s.findings else 0
