"""One schedule: set up an image, run the plan under the scheduler, check
the invariants after every step and every byte at the end."""

from __future__ import annotations

import errno
import hashlib
import io
import random
from dataclasses import dataclass

import trio
import trio.testing

from ...block.memory import MemoryDevice
from ...fs.filesystem import Filesystem
from ...fs.fsck import check
from ...iomap.writeback import writepages
from ...lib.errors import FsError
from ...ondisk import BLOCK_SHIFT, ROOT_INO
from ...vfs.mount import Mount
from .consts import BS, DEFAULT_MAX_STEPS, IMAGE_SIZE, INF, MMAP_SLOT
from .invariants import invariant_violations
from .model import Model, RaceErrorTags, RaceIovIter
from .mutants import mutant
from .plan import make_plan
from .scheduler import DONE, Finding, Scheduler, TaskInfo, _Guard, _patched_waits, _Stop

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
