"""Crash consistency: recorded write/flush streams replayed as crash images.

Every test records the requests a workload sends to the image (from a
snapshot of the image as the base), builds the images a power cut could
leave (crashsim: cut at every flush point, plus cuts inside the unflushed
window with reordered, dropped and torn writes), and checks on each:

* ``fsck -n`` on the raw crash image (which replays the journal in memory)
  is clean;
* mounting recovers a tree whose metadata is exactly that of one committed
  state, no older than the newest commit whose journal flush is inside the
  durable prefix, and whose file contents are that state's or in-place
  rewrites issued after it (see ``workload.py``);
* after a clean unmount of the recovered filesystem, fsck is clean again.

The default run keeps to a few hundred images; ``--runslow`` adds bigger
matrices over several seeds.
"""

from __future__ import annotations

import functools
import random
import stat

import pytest
import trio

from delafs.block import BLOCK_SIZE, BlockDevice, Recorder
from delafs.fs.extent_map import ExtState
from delafs.fs.filesystem import Filesystem
from delafs.log import journal as journal_log
from delafs.ondisk import SB_STATE_CLEAN
from delafs.testing.crashsim import build_image, flush_points, snapshot

from .workload import (
    CheckStats,
    InlineDevice,
    OpResult,
    Recording,
    Workload,
    build_cut,
    crash_cuts,
    format_image,
    fsck_clean,
    logical_snapshot,
    match_state,
    record_workload,
    remove,
    verify_crash_image,
)

NBLOCKS = 4096          # 16 MiB
LOG_BLOCKS = 256        # the minimum: wraps after a few dozen commits


def run_trio(fn, *args, **kw):
    return trio.run(functools.partial(fn, *args, **kw))


async def check_cuts(base: str, events: list, trace, cuts, workdir, stats: CheckStats, *,
                     readonly_every: int = 1) -> None:
    """Build and verify every cut; the read-only mount comparison (a second
    walk of the tree) on every ``readonly_every``-th image."""
    for n, cut in enumerate(cuts):
        dest = str(workdir / f"crash-{n:05d}.img")
        build_cut(base, events, dest, cut)
        await verify_crash_image(dest, trace, cut.upto, cut.label, stats,
                                 readonly_too=n % readonly_every == 0)
        remove(dest)


class RecordedRun:
    def __init__(self, base, events, trace):
        self.base, self.events, self.trace = base, events, trace


async def record_async(tmp, *, seed, nops, commit_every=(1, 4), finish="crash") -> RecordedRun:
    """Format an image, snapshot it as the base, record a random workload."""
    img = str(tmp / "image")
    await format_image(img, NBLOCKS, log_blocks=LOG_BLOCKS, seed=seed)
    base = snapshot(img, str(tmp / "base"))
    events, trace = await record_workload(img, seed=seed, nops=nops, commit_every=commit_every,
                                          finish=finish)
    return RecordedRun(base, events, trace)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One recorded random workload (300 operations, committed every 1-3,
    ending with a clean unmount) shared by the default-size tests.  A sync
    fixture running its own trio loop, so that it can be module-scoped."""
    return run_trio(record_async, tmp_path_factory.mktemp("recorded"), seed=1, nops=300,
                    commit_every=(1, 3), finish="close")


# ---------------------------------------------------------------------------
# The helpers themselves
# ---------------------------------------------------------------------------


async def test_logical_snapshot_sees_everything(tmp_path):
    img = str(tmp_path / "image")
    await format_image(img, 2048)
    with BlockDevice.open(img) as dev:
        fs = await Filesystem.open(dev)
        d = await fs.mkdir(1, b"dir", 0o750)
        f = await fs.create(d.ino, b"file", stat.S_IFREG | 0o640)
        await fs.pwrite(f.ino, 100, b"hello" * 2000)
        await fs.link(f.ino, 1, b"hard")
        await fs.symlink(d.ino, b"sym", b"../hard")
        await fs.symlink(1, b"longsym", b"x/" * 700)
        await fs.setxattr(f.ino, b"user.small", b"v")
        await fs.setxattr(d.ino, b"user.big", b"B" * 3000)
        snap = await logical_snapshot(fs)
        assert set(snap) == {b"/", b"/dir", b"/dir/file", b"/hard", b"/dir/sym", b"/longsym"}
        assert snap[b"/dir/file"] == snap[b"/hard"]
        e = snap[b"/dir/file"]
        assert (e.kind, stat.S_IMODE(e.mode), e.nlink, e.size) == ("reg", 0o640, 2, 100 + 10000)
        assert [n for n, _ in e.xattrs] == [b"user.small"]
        assert snap[b"/dir/sym"].payload == b"../hard"
        assert snap[b"/longsym"].payload == b"x/" * 700
        assert snap[b"/dir"].nlink == 2 and snap[b"/"].nlink == 3
        assert [n for n, _ in snap[b"/dir"].xattrs] == [b"user.big"]
        await fs.close()
    with BlockDevice.open(img) as dev:
        fs = await Filesystem.open(dev)
        assert await logical_snapshot(fs) == snap
        await fs.close()
    await fsck_clean(img, "clean image")


def test_workload_wraps_the_journal_and_checkpoints(recorded):
    t = recorded.trace
    assert t.stats["checkpoints"] > 0, t.stats
    assert t.wraps() >= 2, f"journal head wrapped {t.wraps()} times: {t.stats}"
    assert t.stats["log_blocks_written"] > 2 * LOG_BLOCKS
    assert len(t.commits) > 50
    ops = " ".join(t.log)
    for word in ("mkdir", "create", "pwrite", "truncate", "unlink", "rename", "link",
                 "symlink", "setxattr", "removexattr", "exchange", "orphan freed"):
        assert word in ops, f"the workload never did {word!r}"
    big = [d for d in t.log if d.startswith("setxattr") and int(d.split("(")[1].split()[0]) > 512]
    assert big, "no out-of-line xattr"
    assert any(d.startswith("pwrite") and int(d.split("+")[1].rstrip(")")) > 2 * BLOCK_SIZE for d in t.log)


# ---------------------------------------------------------------------------
# 3. The crash matrix
# ---------------------------------------------------------------------------


async def test_crash_matrix_every_flush_point(recorded, tmp_path):
    """Every flush point of the recorded stream, plus one reordered /
    dropped / torn cut inside each unflushed window."""
    cuts = crash_cuts(recorded.events, random.Random(7), variants_per_point=1)
    stats = CheckStats()
    await check_cuts(recorded.base, recorded.events, recorded.trace, cuts, tmp_path, stats,
                     readonly_every=4)
    print(f"crash matrix: {stats.images} images, {stats.exact} exact, "
          f"{stats.in_place} with in-place data, {len(stats.states)} distinct states")
    assert stats.images == len(cuts) > 2 * len(recorded.trace.commits)
    # The matrix went through (nearly) every committed state...
    assert len(stats.states) >= 0.9 * len(recorded.trace.commits)
    # ...and the whole stream, which ends with a clean unmount, is the last.
    assert cuts[-1].upto == len(recorded.events) or any(c.upto == len(recorded.events) for c in cuts)
    final = str(tmp_path / "final.img")
    build_image(recorded.base, recorded.events, final, upto=len(recorded.events))
    with InlineDevice.open(final) as dev:
        sb, _ = await Filesystem.read_superblock(dev)
        assert sb.state == SB_STATE_CLEAN
    assert await verify_crash_image(final, recorded.trace, len(recorded.events), "whole stream") \
        == len(recorded.trace.commits) - 1


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12, 13, 14])
async def test_crash_matrix_soak(seed, tmp_path):
    """Bigger matrices: 500 operations per seed, three variants per window."""
    run = await record_async(tmp_path, seed=seed, nops=500, commit_every=(1, 6),
                             finish="close" if seed % 2 else "crash")
    assert run.trace.wraps() >= 2
    cuts = crash_cuts(run.events, random.Random(seed), variants_per_point=3)
    stats = CheckStats()
    await check_cuts(run.base, run.events, run.trace, cuts, tmp_path, stats, readonly_every=3)
    print(f"seed {seed}: {stats.images} images, {stats.in_place} with in-place data")


async def test_crash_during_recovery(recorded, tmp_path):
    """Crash images whose log holds transactions, crashed again while the
    mount replays them: the second recovery ends in the same tree."""
    events, trace = recorded.events, recorded.trace
    points = flush_points(events)
    rng = random.Random(3)
    tried = checked = 0
    for upto in rng.sample(points, len(points)):
        if tried == 6:
            break
        first = str(tmp_path / "first.img")
        build_image(recorded.base, events, first, upto=upto)
        with InlineDevice.open(first) as dev:
            sb, _ = await Filesystem.read_superblock(dev)
            if len((await journal_log.scan(dev, sb)).txns) < 2:
                continue
            tried += 1
        pre = str(tmp_path / "pre.img")
        snapshot(first, pre)
        with InlineDevice.open(first) as dev:
            dev.recorder = Recorder()
            fs = await Filesystem.open(dev)        # recovery, recorded
            contents = {}
            expect = await logical_snapshot(fs, contents)
            match_state(trace, upto, expect, contents)
            rec_events = dev.recorder.events       # ...and a crash right after
        cuts = crash_cuts(rec_events, rng, variants_per_point=2)
        cuts += [c for c in crash_cuts(rec_events, rng, variants_per_point=0,
                                       points=list(range(len(rec_events) + 1)))]
        for n, cut in enumerate(cuts):
            second = str(tmp_path / f"second-{n}.img")
            build_cut(pre, rec_events, second, cut)
            await fsck_clean(second, f"crash at {upto}, then at {cut.label} of the recovery")
            with InlineDevice.open(second) as dev:
                fs = await Filesystem.open(dev)
                got = await logical_snapshot(fs)
                assert got == expect, f"recovery crashed at {cut.label} of {len(rec_events)}"
                await fs.close()
            await fsck_clean(second, "recovered twice")
            remove(second)
            checked += 1
    assert tried == 6
    print(f"crash during recovery: {checked} images")


# ---------------------------------------------------------------------------
# 4a. Free, reallocate, crash
# ---------------------------------------------------------------------------


def pattern(tag: bytes, nbytes: int) -> bytes:
    unit = tag * (64 // len(tag))
    return (unit * (nbytes // len(unit) + 1))[:nbytes]


async def extents_of(fs: Filesystem, ino: int, nblocks: int) -> set[int]:
    out = set()
    for e in await fs.map_blocks(ino, 0, nblocks):
        if e.state in (ExtState.WRITTEN, ExtState.UNWRITTEN):
            out.update(range(e.pblock, e.pblock + e.length))
    return out


def all_cuts(events: list, rng: random.Random, variants: int):
    """Every prefix length, plus ``variants`` random window cuts per flush point."""
    cuts = crash_cuts(events, rng, variants_per_point=variants)
    cuts += crash_cuts(events, rng, variants_per_point=0, points=list(range(len(events) + 1)))
    return cuts


@pytest.mark.parametrize("between", ["sync", "commit", None],
                         ids=["delete-checkpointed", "delete-committed", "delete-uncommitted"])
async def test_free_reallocate_crash(tmp_path, between):
    """Delete a big file, (commit or checkpoint,) write a new one: only once
    the delete is checkpointed may the new file reuse the blocks (while its
    records are in the log, damage to them could roll the delete back); a
    crash anywhere must never show the old file (still existing) with the
    new file's bytes, nor the new file with the old file's bytes."""
    img = str(tmp_path / "image")
    await format_image(img, 2048, log_blocks=LOG_BLOCKS, seed=5)
    a_data = pattern(b"OLD-FILE-A:", 160 * BLOCK_SIZE)
    b_data = pattern(b"NEW-FILE-B;", 160 * BLOCK_SIZE)
    k_data = pattern(b"KEEPER", 24 * BLOCK_SIZE + 123)
    dev = InlineDevice.open(img)
    try:
        fs = await Filesystem.open(dev)
        k = await fs.create(1, b"keep", stat.S_IFREG | 0o644)
        await fs.pwrite(k.ino, 0, k_data)
        a = await fs.create(1, b"a", stat.S_IFREG | 0o644)
        await fs.pwrite(a.ino, 0, a_data)
        await fs.sync()
        a_blocks = await extents_of(fs, a.ino, 160)
        base = snapshot(img, str(tmp_path / "base"))
        dev.recorder = Recorder()
        rec = Recording(fs, dev.recorder)
        await rec.initial_state()

        async def op(desc, coro, ino=None):
            await coro
            return OpResult(desc, ino)

        await rec.op(op, "unlink a", fs.unlink(1, b"a"))
        if between == "sync":
            await rec.sync()
        elif between == "commit":
            await rec.commit()
        b = await fs.create(1, b"b", stat.S_IFREG | 0o644)
        await rec.op(op, "pwrite b", fs.pwrite(b.ino, 0, b_data), b.ino)
        b_blocks = await extents_of(fs, b.ino, 160)
        if between == "sync":
            assert b_blocks & a_blocks, "the new file did not reuse the freed blocks"
        else:
            assert not b_blocks & a_blocks, "blocks freed by a delete not yet checkpointed were reused"
        await rec.commit()
        await rec.op(op, "pwrite keep", fs.pwrite(k.ino, 5000, b"k" * 9000), k.ino)
        await rec.op(op, "unlink b", fs.unlink(1, b"b"))
        events, trace = dev.recorder.events, rec.trace
    finally:
        dev.close()

    stats = CheckStats()
    for n, cut in enumerate(all_cuts(events, random.Random(5), 4)):
        dest = str(tmp_path / f"crash-{n}.img")
        build_cut(base, events, dest, cut)
        await verify_crash_image(dest, trace, cut.upto, cut.label, stats)
        with InlineDevice.open(dest) as cdev:
            cfs = await Filesystem.open(cdev)
            snap = await logical_snapshot(cfs)
            names = {p for p in snap if p != b"/"}
            if b"/a" in names:
                assert await cfs.pread(snap[b"/a"].ino, 0, len(a_data) + 1) == a_data, cut.label
            if b"/b" in names:
                got = await cfs.pread(snap[b"/b"].ino, 0, len(b_data) + 1)
                assert got == b_data, f"{cut.label}: new file shows foreign bytes"
            keep = await cfs.pread(snap[b"/keep"].ino, 0, 1 << 20)
            assert keep[:5000] == k_data[:5000] and keep[14000:] == k_data[14000:]
            await cfs.close()
        remove(dest)
    assert stats.states == set(range(len(trace.commits)))
    print(f"free/reallocate ({between or 'no'} between delete and write): {stats.images} images")


# ---------------------------------------------------------------------------
# 4b. Allocate, write, crash before the data flush: no stale bytes
# ---------------------------------------------------------------------------

STALE = b"STALE-FREED-DATA"


class NoDiscardDevice(InlineDevice):
    """A disk that ignores discard (it is advisory): freed blocks keep
    their old contents on the media."""

    async def discard(self, blk, count):
        self.ignored_discards = getattr(self, "ignored_discards", 0) + 1


def contains_stale(data: bytes) -> bool:
    return STALE[:8] in data


async def test_no_stale_data_after_crash_before_data_flush(tmp_path):
    """Freed blocks full of a recognizable pattern are reallocated to a new
    file; the device ignores discards, so the pattern is still on the media.
    Whatever a crash leaves, no file may ever read the pattern: new blocks
    are UNWRITTEN (read as zeros) until their data is flushed, and only then
    does the mapping to them commit."""
    img = str(tmp_path / "image")
    await format_image(img, 2048, log_blocks=LOG_BLOCKS, seed=9)
    base = snapshot(img, str(tmp_path / "base"))
    dev = NoDiscardDevice.open(img)
    dev.recorder = Recorder()
    try:
        fs = await Filesystem.open(dev)
        rec = Recording(fs, dev.recorder)
        await rec.initial_state()

        async def op(desc, coro, ino=None):
            await coro
            return OpResult(desc, ino)

        p = await fs.create(1, b"p", stat.S_IFREG | 0o644)
        await rec.op(op, "fill p", fs.pwrite(p.ino, 0, pattern(STALE, 300 * BLOCK_SIZE)), p.ino)
        p_blocks = await extents_of(fs, p.ino, 300)
        await rec.commit()
        await rec.op(op, "unlink p", fs.unlink(1, b"p"))
        await rec.sync()                    # checkpointed: p's blocks are free
        assert dev.ignored_discards, "p's blocks were never discarded"
        n = await fs.create(1, b"n", stat.S_IFREG | 0o644)
        e = await fs.create(1, b"e", stat.S_IFREG | 0o644)
        await rec.op(op, "pwrite e", fs.pwrite(e.ino, 0, b"e" * (BLOCK_SIZE + 100)), e.ino)
        await rec.commit()
        n_start = len(dev.recorder.events)
        await rec.op(op, "pwrite n", fs.pwrite(n.ino, 0, pattern(b"FRESH", 64 * BLOCK_SIZE)), n.ino)
        assert await extents_of(fs, n.ino, 64) & p_blocks, "the new file did not reuse p's blocks"
        await rec.op(op, "append e", fs.pwrite(e.ino, BLOCK_SIZE + 100, b"E" * 3 * BLOCK_SIZE), e.ino)
        await rec.op(op, "extend e", fs.truncate(e.ino, 40 * BLOCK_SIZE), e.ino)
        await rec.op(op, "write past a hole", fs.pwrite(e.ino, 50 * BLOCK_SIZE, b"tail"), e.ino)
        await rec.commit()
        await rec.op(op, "rewrite n", fs.pwrite(n.ino, 10 * BLOCK_SIZE, b"R" * 20 * BLOCK_SIZE), n.ino)
        events, trace = dev.recorder.events, rec.trace
    finally:
        dev.close()
    assert not any(ev[0] == "discard" for ev in events)

    # The cut the brief names: n's data writes issued, its flush not, and
    # the writes lost.
    data_flush = next(i for i in range(n_start, len(events)) if events[i][0] == "flush")
    assert any(ev[0] == "write" for ev in events[n_start:data_flush])
    named = crash_cuts(events, random.Random(0), variants_per_point=0, points=[data_flush])
    named[0].opts = {"drop_after_last_flush": 1.0}
    named[0].label = "right before n's data flush, data writes dropped"
    cuts = named + all_cuts(events, random.Random(9), 4)

    stats = CheckStats()
    for i, cut in enumerate(cuts):
        dest = str(tmp_path / f"crash-{i}.img")
        build_cut(base, events, dest, cut)
        await verify_crash_image(dest, trace, cut.upto, cut.label, stats)
        with InlineDevice.open(dest) as cdev:
            cfs = await Filesystem.open(cdev)
            snap = await logical_snapshot(cfs)
            for path, ent in snap.items():
                if ent.kind != "reg":
                    continue
                data = await cfs.pread(ent.ino, 0, ent.size)
                if path != b"/p":       # p legitimately holds the pattern until deleted
                    assert not contains_stale(data), f"{cut.label}: {path!r} reads freed data"
                # Whatever is mapped but not WRITTEN reads as zeros.
                for ext in await cfs.map_blocks(ent.ino, 0, -(-ent.size // BLOCK_SIZE)):
                    if ext.state != ExtState.WRITTEN:
                        lo, hi = ext.fblock * BLOCK_SIZE, min(ext.end * BLOCK_SIZE, ent.size)
                        assert data[lo:hi] == bytes(max(0, hi - lo)), f"{cut.label}: {path!r} {ext}"
            if i == 0:
                assert snap[b"/n"].size == 0, "n's data flush never happened"
            await cfs.close()
        remove(dest)
    print(f"stale data: {stats.images} images")


# ---------------------------------------------------------------------------
# 4c. Reopen without a clean close at random points
# ---------------------------------------------------------------------------


async def test_reopen_without_clean_close(tmp_path):
    """Drop all in-memory state at random points of a workload and reopen
    (the image file keeps every write that was issued, so nothing is torn):
    every committed change is there, and the tree is exactly the last
    committed one; uncommitted operations are gone (their in-place data
    writes excepted).  The workload then goes on on the recovered tree."""
    img = str(tmp_path / "image")
    await format_image(img, NBLOCKS, log_blocks=LOG_BLOCKS, seed=21)
    rng = random.Random(21)
    dev = BlockDevice.open(img)                 # the real, threaded device
    fs = await Filesystem.open(dev)
    total_ops = lost_ops = 0
    try:
        for rnd in range(12):
            dev.recorder = Recorder()
            rec = Recording(fs, dev.recorder)
            await rec.initial_state()
            w = await Workload.attach(fs, rng)
            for _ in range(rng.randint(5, 40)):
                await rec.op(w.step)
                if rng.random() < 0.3:
                    await rec.commit()
            await rec.commit()
            tail = rng.randint(0, 5)
            for _ in range(tail):                # uncommitted
                await rec.op(w.step)
            total_ops += rec.nops
            lost_ops += tail
            events, trace = dev.recorder.events, rec.trace
            dev.close()                         # crash: fs and w are dropped
            del fs, w, rec
            await fsck_clean(img, f"image left by round {rnd}")
            dev = BlockDevice.open(img)
            fs = await Filesystem.open(dev)
            contents = {}
            snap = await logical_snapshot(fs, contents)
            j, _ = match_state(trace, len(events), snap, contents)
            assert j == len(trace.commits) - 1, \
                f"round {rnd}: recovered state {j}, last committed {len(trace.commits) - 1}"
        await fs.close()
    finally:
        dev.close()
    await fsck_clean(img, "final image")
    assert total_ops > 150 and lost_ops > 10


# ---------------------------------------------------------------------------
# 5. A transaction spanning the end of the circular log
# ---------------------------------------------------------------------------


async def test_recovery_across_journal_wrap(tmp_path):
    """Commit until a transaction straddles the end of the log (blocks on
    both sides of the wrap), crash with it still in the log, and check
    every cut through it: recovery must replay it whole or not at all."""
    img = str(tmp_path / "image")
    await format_image(img, 2048, log_blocks=LOG_BLOCKS, seed=33)
    dev = InlineDevice.open(img)
    try:
        fs = await Filesystem.open(dev)
        j = fs.store.journal
        rng = random.Random(33)
        w = Workload(fs, rng)
        # Small commits until the head is a few blocks from the end...
        i = 0
        while not (0 < j.L - j.head_pos <= 4 and j.head_pos > j.tail_pos):
            await fs.setxattr(1, b"user.tick", str(i).encode())
            await fs.commit()
            i += 1
            assert i < 10000
        base = snapshot(img, str(tmp_path / "base"))
        dev.recorder = Recorder()
        rec = Recording(fs, dev.recorder)
        await rec.initial_state()
        checkpoints = j.stats["checkpoints"]
        # ...then a big transaction: many new names and inodes.
        d = await fs.mkdir(1, b"wrap", 0o755)
        for k in range(40):
            await fs.create(d.ino, b"f%02d" % k, stat.S_IFREG | 0o600)
        await fs.setxattr(d.ino, b"user.big", b"W" * 2000)
        head0 = j.head_pos
        await rec.commit()
        assert j.head_pos < head0, "the transaction did not wrap"
        assert j.stats["checkpoints"] == checkpoints, "a checkpoint retired the wrapped transaction"
        # A couple of ordinary transactions after it.
        for _ in range(4):
            await rec.op(w.step)
            await rec.commit()
        events, trace = dev.recorder.events, rec.trace
        del w
    finally:
        dev.close()

    stats = CheckStats()
    wrapped_replays = 0
    for n, cut in enumerate(all_cuts(events, random.Random(33), 6)):
        dest = str(tmp_path / f"crash-{n}.img")
        build_cut(base, events, dest, cut)
        with InlineDevice.open(dest) as cdev:
            sb, _ = await Filesystem.read_superblock(cdev)
            scan = await journal_log.scan(cdev, sb)
            if any(t.pos + t.length > sb.log_blocks for t in scan.txns):
                wrapped_replays += 1
        await verify_crash_image(dest, trace, cut.upto, cut.label, stats)
        remove(dest)
    assert wrapped_replays > 0, "no crash image replayed a transaction across the wrap"
    assert stats.states == set(range(len(trace.commits)))
    print(f"journal wrap: {stats.images} images, {wrapped_replays} replayed across the wrap")


# ---------------------------------------------------------------------------
# Revokes: a btree node freed and reused for data while its old image is
# still in the log
# ---------------------------------------------------------------------------


async def node_blocks(fs: Filesystem) -> set[int]:
    out: set[int] = set()
    await fs.tree.walk(lambda node, lo, hi: out.add(node.blocknr))
    return out


async def test_freed_node_is_not_reused_inside_the_log_window(tmp_path):
    """Grow the btree, shrink it (nodes freed: their blocks are revoked),
    then write data, all inside one log window.  The freed node blocks stay
    busy until the frees are checkpointed, so no data lands where an old
    node image could be replayed over it (the revokes guard the same
    thing a second way); every crash image recovers clean."""
    img = str(tmp_path / "image")
    await format_image(img, 2048, log_blocks=1024, seed=44)
    dev = InlineDevice.open(img)
    try:
        fs = await Filesystem.open(dev)
        await fs.sync()
        checkpoints = fs.store.journal.stats["checkpoints"]
        base = snapshot(img, str(tmp_path / "base"))
        dev.recorder = Recorder()
        rec = Recording(fs, dev.recorder)
        await rec.initial_state()

        async def op(desc, coro, ino=None):
            await coro
            return OpResult(desc, ino)

        d = await fs.mkdir(1, b"big", 0o755)
        names = [b"%03d-" % i + b"n" * 200 for i in range(120)]
        for i, name in enumerate(names):
            await rec.op(op, f"create {i}", fs.create(d.ino, name, stat.S_IFREG | 0o644))
            if i % 30 == 29:
                await rec.commit()
        grown = await node_blocks(fs)
        for i, name in enumerate(names):
            await rec.op(op, f"unlink {i}", fs.unlink(d.ino, name))
            if i % 30 == 29:
                await rec.commit()
        freed = grown - await node_blocks(fs)
        assert len(freed) >= 4, f"only {len(freed)} btree nodes freed"
        reused = set()
        for i in range(24):
            f = await fs.create(1, b"data%d" % i, stat.S_IFREG | 0o644)
            await rec.op(op, f"write data{i}", fs.pwrite(f.ino, 0, pattern(b"DATA%02d" % i, BLOCK_SIZE)), f.ino)
            reused |= await extents_of(fs, f.ino, 1) & freed
            if i % 8 == 7:
                await rec.commit()
        assert not reused, f"freed node blocks {sorted(reused)} reused before their free was checkpointed"
        assert fs.store.journal.stats["checkpoints"] == checkpoints, "a checkpoint emptied the log"
        events, trace = dev.recorder.events, rec.trace
    finally:
        dev.close()

    stats = CheckStats()
    cuts = crash_cuts(events, random.Random(44), variants_per_point=2)
    await check_cuts(base, events, trace, cuts, tmp_path, stats)
    assert max(stats.states) == len(trace.commits) - 1
    print(f"revokes: {len(reused)} freed node blocks reused for data, {stats.images} images")


# ---------------------------------------------------------------------------
# Truncate down: what a crash before its commit may show
# ---------------------------------------------------------------------------


async def test_truncate_down_crash_before_commit(tmp_path):
    """truncate() zeroes the tail of the new last block in place (and
    flushes) before the size change commits, so that a later extension
    can never bring the old bytes back.  A crash in between shows the old
    size with that tail zeroed: the only difference from a committed state
    that is allowed (an in-place data write, like an overwrite).  Pinned
    here so that a change to it is a decision, not an accident."""
    img = str(tmp_path / "image")
    await format_image(img, 2048, log_blocks=LOG_BLOCKS, seed=17)
    old = pattern(b"ORIGINAL", 3 * BLOCK_SIZE)
    dev = InlineDevice.open(img)
    try:
        fs = await Filesystem.open(dev)
        f = await fs.create(1, b"f", stat.S_IFREG | 0o644)
        await fs.pwrite(f.ino, 0, old)
        await fs.sync()
        base = snapshot(img, str(tmp_path / "base"))
        dev.recorder = Recorder()
        await fs.truncate(f.ino, 5000)
        await fs.commit()
        events = dev.recorder.events
    finally:
        dev.close()
    zeroed = old[:5000] + bytes(BLOCK_SIZE * 2 - 5000) + old[2 * BLOCK_SIZE:]
    seen = set()
    for n, cut in enumerate(all_cuts(events, random.Random(17), 4)):
        dest = str(tmp_path / f"crash-{n}.img")
        build_cut(base, events, dest, cut)
        await fsck_clean(dest, cut.label)
        with InlineDevice.open(dest) as cdev:
            cfs = await Filesystem.open(cdev)
            ino = (await cfs.lookup(1, b"f")).ino
            size = (await cfs.getattr(ino)).size
            data = await cfs.pread(ino, 0, size)
            if size == 5000:
                assert data == old[:5000], cut.label
                seen.add("truncated")
            else:
                assert size == len(old), cut.label
                # Sector by sector: the original, or zeroed by the truncate.
                for off in range(0, size, 512):
                    assert data[off:off + 512] in (old[off:off + 512], zeroed[off:off + 512]), \
                        f"{cut.label}: sector at {off}"
                seen.add("original" if data == old else "old size, tail zeroed")
            await cfs.close()
        remove(dest)
    assert {"truncated", "original", "old size, tail zeroed"} <= seen, seen
    print(f"truncate down: {n + 1} images")


async def test_truncate_that_rolls_is_finished_after_any_crash(tmp_path):
    """A shrinking truncate of a file with many extents commits its new
    size, then frees the blocks past it over several rolled transactions.
    A crash anywhere in it must recover to the old file, or to the new size
    with nothing past it: blocks left past EOF would come back as the old
    data when the file grows again, and would never be freed.  The file is
    on the orphan list meanwhile and the mount finishes the truncate."""
    img = str(tmp_path / "image")
    await format_image(img, 4096, log_blocks=LOG_BLOCKS, seed=31)
    nblocks = 1024
    old = pattern(b"TRUNCATED AWAY", nblocks * BLOCK_SIZE)
    dev = InlineDevice.open(img)
    try:
        fs = await Filesystem.open(dev)
        f = await fs.create(1, b"f", stat.S_IFREG | 0o644)
        await fs.pwrite(f.ino, 0, old)
        for b in range(1, nblocks, 2):          # 512 extents: eight batches of the punch
            await fs.punch_hole(f.ino, b, 1)
        await fs.sync()
        base = snapshot(img, str(tmp_path / "base"))
        fs.store.dirty_roll = 8
        rolls = fs.stats["rolls"]
        dev.recorder = Recorder()
        i = 0
        while len(fs.store.dirty) < 8:          # earlier work, near the roll bound
            await fs.mkdir(1, b"d%d" % i, 0o755)
            i += 1
        await fs.truncate(f.ino, 100)
        await fs.commit()
        assert fs.stats["rolls"] > rolls, "the truncate never rolled: the test no longer reaches the bug"
        events = dev.recorder.events
    finally:
        dev.close()
    seen = set()
    for n, cut in enumerate(crash_cuts(events, random.Random(31), variants_per_point=1)):
        dest = str(tmp_path / f"crash-{n}.img")
        build_cut(base, events, dest, cut)
        await fsck_clean(dest, cut.label)
        with InlineDevice.open(dest) as cdev:
            cfs = await Filesystem.open(cdev)
            a = await cfs.getattr(f.ino)
            if a.size == 100:
                assert a.blocks == 1, f"{cut.label}: {a.blocks - 1} blocks left past EOF"
                await cfs.truncate(f.ino, len(old))
                assert await cfs.pread(f.ino, 0, len(old)) == old[:100] + bytes(len(old) - 100), cut.label
                seen.add("truncated" if cfs.stats["truncates_recovered"] == 0 else "finished at mount")
            else:
                assert a.size == len(old), cut.label
                seen.add("old")
            await cfs.close()
        await fsck_clean(dest, f"{cut.label}, recovered")
        remove(dest)
    assert seen == {"old", "finished at mount", "truncated"}, seen
    print(f"rolled truncate: {n + 1} images")


# ---------------------------------------------------------------------------
# Discards of freed blocks that have been reallocated since
# ---------------------------------------------------------------------------


async def test_discard_after_rolled_commit_spares_reused_blocks(tmp_path):
    """Blocks freed in a transaction that an operation rolls on its own
    (dirty > roll_threshold) become allocatable when it is durable, but
    their discard waits for the next commit/sync; a write in between may
    reuse them, and the late discard must not punch its data.  (Found by
    this suite: the discard used to wipe the new file.)"""
    img = str(tmp_path / "image")
    await format_image(img, 4096, log_blocks=LOG_BLOCKS, seed=2)
    with InlineDevice.open(img) as dev:
        fs = await Filesystem.open(dev)
        # A tree of many leaves, so that touching spread-out inodes dirties
        # more blocks than the roll threshold.
        inos = []
        for i in range(300):
            f = await fs.create(1, b"file%03d-" % i + b"x" * 100, stat.S_IFREG | 0o644)
            await fs.setxattr(f.ino, b"user.a", b"v" * 300)
            inos.append(f.ino)
            if i % 20 == 19:
                await fs.commit()
        victim = await fs.create(1, b"victim", stat.S_IFREG | 0o644)
        await fs.pwrite(victim.ino, 0, b"V" * 50 * BLOCK_SIZE)
        vblocks = await extents_of(fs, victim.ino, 50)
        await fs.commit()
        seq = fs.store.durable_seq
        await fs.unlink(1, b"victim")
        for ino in inos[::7]:
            await fs.setattr(ino, mode=0o600)
            if fs.store.durable_seq != seq:
                break
        rolled = fs.store.durable_seq != seq
        new = await fs.create(1, b"new", stat.S_IFREG | 0o644)
        data = pattern(b"NEW DATA", 50 * BLOCK_SIZE)
        await fs.pwrite(new.ino, 0, data)
        reused = bool(await extents_of(fs, new.ino, 50) & vblocks)
        await fs.commit()
        got = await fs.pread(new.ino, 0, len(data))
        assert got == data, (f"{sum(a != b for a, b in zip(got, data))} bytes of the new file lost "
                             f"(victim's blocks reused: {reused})")
        await fs.close()
        # The setup must still go down the rolled path.
        assert rolled, "no operation rolled its transaction: the setup no longer exercises the bug"
    await fsck_clean(img, "image after the rolled commit")


class GatedDiscardDevice(InlineDevice):
    """A device whose first discard takes a long time (until ``gate``)."""

    def arm(self) -> None:
        self.entered = trio.Event()
        self.gate = trio.Event()

    async def discard(self, blk, count):
        if hasattr(self, "gate") and not self.entered.is_set():
            self.entered.set()
            await self.gate.wait()
        await super().discard(blk, count)


async def test_discard_races_with_concurrent_reuse(tmp_path):
    """A checkpoint releases freed blocks (on_home) and then they are discarded;
    a concurrent write that allocates them meanwhile must keep its data.
    The device's first discard stalls, to open the window wide."""
    img = str(tmp_path / "image")
    await format_image(img, 2048, log_blocks=LOG_BLOCKS, seed=3)
    with GatedDiscardDevice.open(img) as dev:
        fs = await Filesystem.open(dev)
        victim = await fs.create(1, b"victim", stat.S_IFREG | 0o644)
        other = await fs.create(1, b"other", stat.S_IFREG | 0o644)
        await fs.pwrite(victim.ino, 0, b"V" * 8 * BLOCK_SIZE)
        await fs.pwrite(other.ino, 0, b"O" * BLOCK_SIZE)     # splits the victim in two runs
        await fs.pwrite(victim.ino, 8 * BLOCK_SIZE, b"V" * 8 * BLOCK_SIZE)
        await fs.commit()
        assert len([e for e in await fs.map_blocks(victim.ino, 0, 16)
                    if e.state == ExtState.WRITTEN]) == 2
        await fs.unlink(1, b"victim")
        dev.arm()
        data = pattern(b"CONCURRENT", 16 * BLOCK_SIZE)
        written = trio.Event()
        new_ino = []

        async def writer():
            new = await fs.create(1, b"new", stat.S_IFREG | 0o644)
            new_ino.append(new.ino)
            await fs.pwrite(new.ino, 0, data)                # may reuse the released blocks
            written.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.sync)                      # stalls in its first discard
            with trio.move_on_after(5):                      # (if it discards at all)
                await dev.entered.wait()
            nursery.start_soon(writer)
            with trio.move_on_after(1):                      # (unless the discard excludes it)
                await written.wait()
            dev.gate.set()
        assert dev.entered.is_set(), "the checkpoint discarded nothing: the race was not exercised"
        await fs.commit()
        got = await fs.pread(new_ino[0], 0, len(data))
        assert got == data, f"{sum(a != b for a, b in zip(got, data))} bytes of the new file lost"
        await fs.close()
