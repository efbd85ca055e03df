"""The scheduler that interleaves the tasks of one schedule at named yield
points and lock waits, deterministically from a seed, and the findings
it reports."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import trio
import trio.testing

from ...iomap.types import POINTS
from ...lib.locks import RWSemaphore
from ...mm.folio import Folio
from .consts import DEFAULT_MAX_STEPS


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
