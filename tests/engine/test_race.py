"""The deterministic race explorer (delafs.testing.race), short versions of its
acceptance runs, and regression tests for the engine bugs it found.

The explorer runs its own trio.run per schedule, so its tests are plain
(synchronous) functions; the engine regressions are async tests on the
engine rig.
"""

import errno
import os
import subprocess
import sys

import pytest

from delafs.block.memory import MemoryDevice
from delafs.cli.app import build_parser
from delafs.fs.extent_map import ExtState
from delafs.iomap.buffered_io import IovIter
from delafs.lib.errors import FsError
from delafs.ondisk import BLOCK_SIZE as BS
from delafs.testing import race
from delafs.testing.race.scheduler import _Guard

from .conftest import check_invariants

ROOT = 1


# ---------------------------------------------------------------------------
# The explorer
# ---------------------------------------------------------------------------

def test_legacy_punch_loses_data():
    """The old algorithm (truncate the cache range, punch everything) throws
    away dirty data other tasks put in the range: found within 200
    schedules, and it is data loss."""
    s = race.explore(punch="legacy", schedules=200, stop_at_first=True)
    assert s.findings, race.format_summary(s)
    assert s.findings[0].kind == "data loss", race.format_summary(s)


def test_scan_punch_finds_nothing():
    s = race.explore(punch="scan", schedules=100)
    assert not s.findings, race.format_summary(s)
    assert len(s.interleavings) >= 95
    # The races were really reached.
    for key in ("punches", "short_copies", "stale_mappings", "page_mkwrites",
                "fs_delalloc_converted"):
        assert s.stats[key] > 0, key


OBSERVABLE = [m for m in race.MUTANTS if m != "no_eof_clamp"]


@pytest.mark.parametrize("name", OBSERVABLE)
def test_mutant_is_caught(name):
    s = race.explore(mutant_name=name, schedules=200, stop_at_first=True)
    assert s.findings, f"mutant {name} not caught:\n" + race.format_summary(s)


def test_no_eof_clamp_is_unobservable_here():
    """Equivalent mutant: with per-block dirty state no block past
    round_up(i_size) is ever dirty while a punch scan can run (the scan runs
    under i_rwsem, truncate cleans everything past the new EOF before it
    drops i_rwsem, page_mkwrite dirties only blocks inside EOF, write_end
    moves i_size with the blocks it dirties), so scanning past EOF finds
    nothing to keep.  The explorer's dirty-past-EOF invariant backs this."""
    s = race.explore(mutant_name="no_eof_clamp", schedules=60)
    assert not s.findings, race.format_summary(s)
    assert s.stats["mutant_scans"] > 0
    assert s.stats["mutant_scans_with_dirty_past_eof"] == 0


def _same(a, b):
    assert a.trace == b.trace
    assert a.log == b.log
    assert [str(f) for f in a.findings] == [str(f) for f in b.findings]


@pytest.mark.parametrize("seed", [3, 17, 42])
def test_replay_is_deterministic(seed):
    a = race.run_schedule(seed)
    b = race.run_schedule(seed)
    assert a.steps > 10
    _same(a, b)


def test_replay_of_a_finding_is_deterministic():
    s = race.explore(mutant_name="no_writeback_discard", schedules=50, stop_at_first=True)
    seed = s.findings[0].seed
    a = race.run_schedule(seed, mutant_name="no_writeback_discard")
    b = race.run_schedule(seed, mutant_name="no_writeback_discard")
    assert a.findings
    _same(a, b)


def test_deterministic_across_processes_and_hash_seeds():
    """Nothing depends on trio's scheduler RNG, set order or id()s."""
    outs = []
    for hs in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hs)
        r = subprocess.run([sys.executable, "-m", "delafs.cli", "race", "--replay", "7"],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1]
    assert "trace " in outs[0]
    assert race.run_schedule(7).trace_hash in outs[0]


def test_cli_race_parses_and_exits():
    p = build_parser()
    args = p.parse_args(["race", "--punch", "legacy", "--schedules", "5", "--seed", "9", "-v"])
    assert args.punch == "legacy" and args.schedules == 5 and args.seed == 9 and args.verbose
    args = p.parse_args(["race", "--mutant", "per_folio_punch", "--replay", "4"])
    assert args.mutant == "per_folio_punch" and args.replay == 4
    with pytest.raises(SystemExit):
        p.parse_args(["race", "--mutant", "no_such_mutant"])
    from delafs.cli.app import main
    assert main(["race", "--schedules", "2"]) == 0
    assert main(["race", "--punch", "legacy", "--mutant", "no_cookie_check",
                 "--schedules", "1"]) == 2


def _run_scheduler(bodies, choose_last=True):
    """Drive tasks ``bodies`` (async functions of the scheduler) under a
    Scheduler with its determinism guard; return the scheduler."""
    import trio
    import trio.testing

    sched = race.Scheduler(1)
    if choose_last:
        sched._choose = lambda parked: parked[-1]

    async def task(info, body):
        sched.by_task[trio.lowlevel.current_task()] = info
        try:
            await sched.point("start")
            await body(sched)
        finally:
            info.state = race.DONE

    async def main():
        async with trio.open_nursery() as n:
            for i, body in enumerate(bodies):
                info = race.TaskInfo(i, f"t{i}")
                sched.tasks.append(info)
                n.start_soon(task, info, body)
            await sched.drive(lambda step: True)
            sched.cancelling = True
            n.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(), instruments=[_Guard(sched)])
    return sched


def test_scheduler_reports_a_wakeup_it_did_not_schedule():
    """A task woken through a primitive the explorer does not wrap would run
    concurrently with the released one: the guard reports it."""
    import trio
    ev = trio.Event()

    async def setter(sched):
        ev.set()
        await sched.point("after set")

    async def waiter(sched):
        await ev.wait()                  # not a wrapped wait

    sched = _run_scheduler([setter, waiter])
    assert sched.guard_violations and "t1" in sched.guard_violations[0]


def test_scheduler_reports_deadlock():
    import trio

    async def stuck(sched):
        await trio.Event().wait()

    async def fine(sched):
        await sched.point("one")

    sched = _run_scheduler([fine, stuck])
    assert [t.name for t in sched.deadlock] == ["t1"]
    assert not sched.guard_violations
    assert [(name, point) for _, name, point in sched.trace] == [
        ("t1", "start"), ("t0", "start"), ("t0", "one")]


# ---------------------------------------------------------------------------
# MemoryDevice
# ---------------------------------------------------------------------------

async def test_memory_device_roundtrip_faults_and_discard():
    dev = MemoryDevice(16 * BS)
    assert dev.kind == "memory" and dev.nblocks == 16 and not dev.readonly
    await dev.write(2, [b"a" * BS, bytearray(b"b" * BS)])
    assert await dev.read(2, 2) == b"a" * BS + b"b" * BS
    await dev.flush()
    dev.faults.add("write", 3, 1, times=1)
    with pytest.raises(FsError):
        await dev.write(3, [b"c" * BS])
    assert await dev.read(3, 1) == b"b" * BS          # a failed write changes nothing
    await dev.discard(2, 1)
    assert await dev.read(2, 1) == bytes(BS)
    with pytest.raises(FsError):
        await dev.read(15, 2)                          # beyond the end
    s = dev.statistics()
    assert s["writes"] == 1 and s["discards"] == 1 and s["injected_errors"] == 1
    snap = dev.clone()
    dev.close()
    with pytest.raises(FsError):
        await dev.read(0, 1)
    assert await snap.read(3, 1) == b"b" * BS
    assert (await dev.reopen().read(3, 1)) == b"b" * BS


# ---------------------------------------------------------------------------
# Engine bugs the explorer found (see the explorer's report for the seeds)
# ---------------------------------------------------------------------------

async def _file(m, size=None):
    ino = (await m.fs.create(ROOT, b"f", 0o644)).ino
    if size is not None:
        await m.truncate(ino, size)
    return ino


async def test_truncate_down_drops_delalloc_when_disk_size_lags(rig):
    """fs.truncate compared the new size with the on-disk size only: data
    still in delalloc (the in-memory size ahead of the disk) kept its
    delalloc past the new EOF, reserved forever, under no cache."""
    m = await rig.mount(format=True)
    ino = await _file(m)
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"d" * (3 * BS))
    await m.truncate(ino, 1000)
    check_invariants(m)
    assert [e.state for e in m.fs.emaps[ino].lookup_range(1, 2)] == [ExtState.HOLE]
    await m.release(f)
    await m.fsync(await m.open(ino, write=False))
    assert m.fs.space.alloc.reserved == 0
    check_invariants(m)


async def test_failed_write_at_unaligned_pos_punches_its_first_block(rig):
    """A write that copied nothing must punch from the block holding pos
    (iomap_last_written_block rounds down when nothing was written), not
    from round_up(pos): that block's NEW delalloc holds no data."""
    m = await rig.mount(format=True)
    ino = await _file(m, size=16 * BS)
    f = await m.open(ino, write=True)
    m.errortags.set("copy_fault", 1)
    with pytest.raises(FsError) as e:
        await m.write(f, 100, b"x" * 50)
    assert e.value.errno == errno.EFAULT
    m.errortags.set("copy_fault", 0)
    check_invariants(m)
    assert m.fs.space.alloc.reserved == 0


async def test_truncate_up_trims_preallocation_it_covers(rig):
    """Speculative post-EOF delalloc that a truncate up brings inside EOF is
    no longer post-EOF: nothing writes it back and close does not trim it."""
    m = await rig.mount(format=True)
    ino = await _file(m)
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"e" * (2 * BS))
    assert m.ops.prealloc_start(ino) == 2
    await m.truncate(ino, 12 * BS + 5)
    check_invariants(m)
    await m.release(f)
    assert m.fs.space.alloc.reserved == 2 + m.fs.emaps[ino].extent_at(0).indlen
    g = await m.open(ino, write=False)
    assert await m.read(g, 0, 13 * BS) == b"e" * (2 * BS) + bytes(10 * BS + 5)


class _ShortSource(IovIter):
    """Copies only ``first`` bytes, then cannot be faulted in any more."""

    __slots__ = ("first", "calls")

    def __init__(self, data, first):
        super().__init__(data)
        self.first = first
        self.calls = 0

    def fault_in(self, n):
        return 0 if self.calls else super().fault_in(n)

    def copy_to(self, buf, off, n):
        self.calls += 1
        return super().copy_to(buf, off, min(n, self.first))


async def test_read_never_returns_blocks_that_are_not_uptodate(rig):
    """A short copy into a large folio leaves the block it stopped in not
    uptodate, holding the copied bytes; buffered_read checked only the first
    block of each folio and returned those bytes past what write() said it
    wrote."""
    m = await rig.mount(format=True)
    ino = await _file(m, size=16 * BS)
    f = await m.open(ino, write=True)
    n = await m.write(f, 100, _ShortSource(b"s" * (4 * BS), 5000))
    assert n == BS - 100                   # backed up to the start of block 1
    inode = await m.iget(ino)
    folio = inode.mapping.lookup(1)
    assert folio is not None and folio.nblocks > 1 and not folio.is_uptodate(1, 1)
    got = await m.read(f, 0, 2 * BS)
    assert got == bytes(100) + b"s" * (BS - 100) + bytes(BS)
    check_invariants(m)


async def test_write_past_eof_trims_preallocation_in_the_gap(rig):
    """An extending write that starts past EOF brings the speculative
    preallocation between the old EOF and its start inside EOF, where no
    data will ever cover it."""
    m = await rig.mount(format=True)
    ino = await _file(m)
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"p" * (2 * BS))
    assert m.ops.prealloc_start(ino) == 2
    await m.write(f, 10 * BS + 7, b"q" * 100)
    check_invariants(m)
    assert [e.state for e in m.fs.emaps[ino].lookup_range(2, 8)] == [ExtState.HOLE]
    assert await m.read(f, 0, 11 * BS) == b"p" * (2 * BS) + bytes(8 * BS + 7) + b"q" * 100


async def test_zero_range_remaps_a_stale_mapping_that_became_a_hole(rig):
    """iomap_zero_range kept zeroing through the cache with the new mapping
    after a stale one even when it was now a HOLE (writeback had discarded
    the delalloc), dirtying blocks with no reservation under them."""
    m = await rig.mount(format=True)
    ino = await _file(m)
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"z" * 8000)          # blocks 0-1, delalloc, dirty
    inode = await m.iget(ino)
    orig = m.ops.iomap_valid
    fired = []

    def valid(vinode, iomap):
        if not fired:
            # What a failed writeback does meanwhile: the folio's dirty
            # blocks are taken and its delalloc discarded.
            fired.append(1)
            folio = inode.mapping.lookup(1)
            folio.clear_dirty()
            m.ops.punch_locked(ino, folio.pos, folio.end - folio.pos)
            return False
        return orig(vinode, iomap)

    m.ops.iomap_valid = valid
    await m.truncate(ino, 6000)               # zeroes [6000, 8192) of block 1
    m.ops.iomap_valid = orig
    assert fired
    check_invariants(m)


async def test_failed_writeback_range_abandons_the_rest_of_the_folio(rig):
    """After writeback_range failed (and discarded the folio's delalloc), the
    next dirty range of the same folio was still handed to writeback_range,
    which failed again with EIO on the discarded blocks: fsync reported EIO
    instead of the real error (the kernel stops at the folio's first error)."""
    m = await rig.mount(format=True)
    ino = await _file(m, size=8 * BS)
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"a" * (4 * BS))       # one 4-block folio, all delalloc
    inode = await m.iget(ino)
    folio = inode.mapping.lookup(0)
    assert folio.nblocks == 4
    await folio.lock()
    folio.clear_dirty(1, 1)                    # two dirty ranges: [0, 1) and [2, 4)
    folio.unlock()
    calls = []
    orig = m.ops.writeback_range

    async def writeback_range(wpc, folio, pos, length, end_pos):
        calls.append(pos)
        if pos == 0:                           # an allocation failure: discard, as fs_iomap does
            m.ops.punch_locked(ino, folio.pos, folio.end - folio.pos)
            raise FsError(errno.ENOSPC, "injected")
        return await orig(wpc, folio, pos, length, end_pos)

    m.ops.writeback_range = writeback_range
    with pytest.raises(FsError) as e:
        await m.fsync(f)
    m.ops.writeback_range = orig
    assert e.value.errno == errno.ENOSPC
    assert calls == [0]
    check_invariants(m)


@pytest.mark.parametrize("seed", [4, 24, 92, 128, 867, 1573, 1738])
def test_schedules_that_found_engine_bugs_are_clean(seed):
    """The schedules (with the explorer as committed) that first found each
    engine bug above, with its fix reverted: truncate with a lagging disk
    size (4), zero-progress write punch (24), read of non-uptodate blocks
    (92), truncate up over preallocation (128), writeback going on after a
    failed range (867), write past EOF over preallocation (1573), zeroing
    with a stale mapping turned hole (1738)."""
    res = race.run_schedule(seed)
    assert not res.findings, res.findings
