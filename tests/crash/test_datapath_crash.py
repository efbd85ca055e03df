"""Crash states of the real data path (tests/crash/datapath.py): every
promise an fsync made survives every crash the device's volatile cache
allows, and the harness catches the mutants that break those promises.

The CI run checks a few thousand crash images; ``--runslow`` checks more
than 10,000 over several seeds."""

from __future__ import annotations

import pytest
import trio

from delafs.mm.filemap import AddressSpace

from .datapath import Harness, check_run
from .workload import InlineDevice


async def record_and_check(tmp_path, *, seed, ops_per_file=60, variants=4, max_images=None,
                           stop_at_first=False, **kw):
    run = await Harness(tmp_path, seed=seed, ops_per_file=ops_per_file, **kw).record()
    verdict = await check_run(run, tmp_path, seed=seed, variants_per_point=variants,
                              max_images=max_images, stop_at_first=stop_at_first)
    return run, verdict


@pytest.mark.parametrize("seed,delay", [(1, 0), (2, 3)])
async def test_datapath_crash_states_keep_every_promise(tmp_path, seed, delay):
    run, v = await record_and_check(tmp_path, seed=seed, delay_writeback=delay)
    print(f"seed {seed}: {v.images} crash images, {v.promises} promises, "
          f"{len(run.events)} device events, {run.stats['iomap']['ioends']} ioends")
    assert v.promises >= 30 and v.images >= 400
    assert not v.violations, "\n".join(v.violations[:20])


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10, 20))
async def test_datapath_crash_states_many(tmp_path, seed):
    run, v = await record_and_check(tmp_path, seed=seed, ops_per_file=100, variants=8,
                                    delay_writeback=seed % 3)
    print(f"seed {seed}: {v.images} crash images, {v.promises} promises")
    assert v.images >= 1000
    assert not v.violations, "\n".join(v.violations[:20])


async def test_mutant_fsync_not_waiting_for_writeback_is_caught(tmp_path, monkeypatch):
    """fsync that does not wait for folios already under writeback: with
    the flusher's ioends held (delay_writeback), an fsync returns before
    their data is written, and some crash image shows it."""
    async def no_wait(self, start_block=0, end_block=None):
        return None
    monkeypatch.setattr(AddressSpace, "wait_writeback_range", no_wait)
    _, v = await record_and_check(tmp_path, seed=3, delay_writeback=20, ops_per_file=25,
                                  stop_at_first=True)
    assert v.violations, f"mutant survived {v.images} crash images"


async def test_injected_writeback_errors_are_reported_and_break_no_promise(tmp_path):
    run, v = await record_and_check(tmp_path, seed=4, writeback_eio=6, delay_writeback=2)
    errors = sum(fm.errors for fm in run.files)
    print(f"{v.images} crash images, {v.promises} promises, {errors} fsyncs reported EIO")
    assert errors > 0 and v.promises > 0
    assert not v.violations, "\n".join(v.violations[:20])


async def test_mutant_lost_writeback_error_is_caught(tmp_path, monkeypatch):
    """Writeback that drops a write error instead of recording it in
    errseq: fsync then succeeds over data that never reached the disk."""
    from delafs.lib.errseq import ErrSeq
    monkeypatch.setattr(ErrSeq, "set", lambda self, err: None)
    run, v = await record_and_check(tmp_path, seed=4, writeback_eio=6, delay_writeback=2,
                                    stop_at_first=True)
    assert v.violations, (f"mutant survived {v.images} crash images, {v.promises} promises, "
                          f"{run.stats['iomap']['writeback_errors']} writeback errors")


async def test_clean_unmount_with_writeback_in_flight_keeps_everything(tmp_path):
    run, v = await record_and_check(tmp_path, seed=5, delay_writeback=20, finish="unmount",
                                    ops_per_file=30)
    assert v.promises >= 3 and not v.violations, "\n".join(v.violations[:20])


async def test_mutant_unmount_cancelling_the_flusher_is_caught(tmp_path, monkeypatch):
    """The unmount cancels the flusher mid-pass instead of letting it
    finish: the ioends it holds are lost, their folios already clean."""
    from delafs.vfs.mount import Mount

    async def cancel_at_once(self):
        return None
    monkeypatch.setattr(Mount, "stop_background", cancel_at_once)
    _, v = await record_and_check(tmp_path, seed=5, delay_writeback=20, finish="unmount",
                                  ops_per_file=30, stop_at_first=True)
    assert v.violations, f"mutant survived {v.images} crash images"


def discard_keeps_data(monkeypatch):
    """A device whose discard leaves the old data in place, as a block
    device may (discard is advisory).  On the image file a discard punches
    a hole, so a freed block reused later reads as zeros, which hides stale
    data whenever the discard won the race with the reuse: whether a crash
    image could show stale data then depended on timing."""
    async def keep(self, blk, count):
        await trio.lowlevel.checkpoint()
    monkeypatch.setattr(InlineDevice, "discard", keep)


async def test_crash_states_expose_no_stale_data_when_discard_keeps_it(tmp_path, monkeypatch):
    discard_keeps_data(monkeypatch)
    run, v = await record_and_check(tmp_path, seed=6)
    assert v.promises >= 30 and v.images >= 400
    assert not v.violations, "\n".join(v.violations[:20])


async def test_mutant_conversion_committed_before_the_data_is_caught(tmp_path, monkeypatch):
    """Completion (UNWRITTEN -> WRITTEN, the on-disk size) made durable
    before the ioend's data is written: a crash in between exposes
    whatever the reused blocks held -- another block's, another file's."""
    from delafs.fs.aops import FsWritebackOps
    real = FsWritebackOps.writeback_submit
    discard_keeps_data(monkeypatch)

    async def complete_first(self, wpc):
        ioends = wpc.ready + ([wpc.ioend] if wpc.ioend is not None else [])
        if ioends:
            await self._complete(wpc.inode, ioends)
            await self.fs.commit()
        await real(self, wpc)
    monkeypatch.setattr(FsWritebackOps, "writeback_submit", complete_first)
    checked = 0
    for seed in (6, 7, 9):           # each caught it alone, 8 of 8 seeds tried
        work = tmp_path / str(seed)
        work.mkdir()
        _, v = await record_and_check(work, seed=seed, stop_at_first=True)
        checked += v.images
        if v.violations:
            print(v.violations[0])
            return
    pytest.fail(f"mutant survived {checked} crash images")


async def test_mutant_fsyncdir_not_committing_is_caught(tmp_path, monkeypatch):
    """A directory fsync that returns without committing the journal: the
    names it promised are not durable."""
    from delafs.vfs.mount import Mount

    async def no_commit(self):
        return None
    monkeypatch.setattr(Mount, "fsyncdir", no_commit)
    # Only the namespace worker and no background commit: a name change is
    # made durable by nothing but the directory fsync the mutant skips, so
    # the first promise after a create, rename or unlink is broken, whatever
    # the timing.
    _, v = await record_and_check(tmp_path, seed=1, nfiles=0, commit_interval=3600,
                                  stop_at_first=True)
    assert any("d: " in x for x in v.violations), f"mutant survived {v.images} crash images"

