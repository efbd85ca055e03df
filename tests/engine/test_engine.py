"""The buffered-write engine on a real image, driven in-process."""

import errno
import os

import pytest
import trio

from delafs.fs import RENAME_EXCHANGE
from delafs.fs.extent_map import ExtentMap, ExtState
from delafs.iomap.types import IOMAP_WRITE, YieldPoints
from delafs.iomap.writeback import writepages
from delafs.lib.errors import FsError
from delafs.lib.errortag import ErrorTags
from delafs.ondisk import BLOCK_SIZE as BS

from .conftest import check_invariants, read_after_crash

ROOT = 1


async def new_file(m, name=b"f", size=None):
    inode = await m.fs.create(ROOT, name, 0o644)
    if size is not None:
        await m.truncate(inode.ino, size)
    return inode.ino


def states(m, ino, first, count):
    return [e.state for e in m.fs.emaps[ino].lookup_range(first, count)]


async def test_write_read_roundtrip_and_delalloc_lifecycle(rig):
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    data = os.urandom(300_000)
    assert await m.write(f, 1000, data) == len(data)
    assert await m.read(f, 1000, len(data)) == data
    assert await m.read(f, 0, 1000) == bytes(1000)
    # Before writeback the blocks are only reserved.
    assert ExtState.DELALLOC in states(m, ino, 0, 10)
    assert m.fs.space.alloc.reserved > 0
    check_invariants(m)
    await m.fsync(f)
    assert set(states(m, ino, 0, (1000 + len(data)) // BS)) == {ExtState.WRITTEN}
    await m.release(f)                  # last writer: post-EOF preallocation trimmed
    assert m.fs.space.alloc.reserved == 0
    check_invariants(m)
    await rig.crash()
    m = await rig.mount()
    f = await m.open(ino, write=False)
    assert await m.read(f, 1000, len(data)) == data
    await rig.unmount()
    await rig.fsck()


async def test_cold_sequential_reads_come_in_batches_and_a_failed_readahead_fails_only_its_reader(rig):
    """Readahead adds the missing folios of the request and of the window
    after it, then reads each mapped run into them with one device request
    (iomap_readahead).  An error in the window fails no read that does not
    need it; the read that does gets EIO, and succeeds once the device
    does."""
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    data = os.urandom(2 << 20)
    for off in range(0, len(data), 1 << 20):
        await m.write(f, off, data[off:off + (1 << 20)])
    await m.fsync(f)
    await m.release(f)
    pblock = m.fs.emaps[ino].lookup(100).pblock + 100 - m.fs.emaps[ino].lookup(100).fblock
    await rig.unmount()

    m = await rig.mount()
    f = await m.open(ino, write=False)
    reads = m.fs.dev.statistics()["reads"]
    chunk = 128 << 10
    for off in range(0, len(data), chunk):
        assert await m.read(f, off, chunk) == data[off:off + chunk]
    # 16 requests; one 64 KiB folio at a time made 32 device reads.
    assert m.fs.dev.statistics()["reads"] - reads <= 8, m.fs.dev.statistics()["reads"] - reads
    await m.release(f)
    await rig.unmount()

    m = await rig.mount()
    fid = m.fs.dev.faults.add("read", pblock, 1)
    f = await m.open(ino, write=False)
    assert await m.read(f, 0, chunk) == data[:chunk]
    assert await m.read(f, chunk, chunk) == data[chunk:2 * chunk]   # block 100 read ahead: failed
    with pytest.raises(FsError) as e:
        await m.read(f, 100 * BS, BS)
    assert e.value.errno == errno.EIO
    m.fs.dev.faults.remove(fid)
    assert await m.read(f, 64 * BS, 64 * BS) == data[64 * BS:128 * BS]
    await m.release(f)
    await rig.unmount()
    await rig.fsck()


async def test_fsync_flush_counts(rig):
    """Ordered device flushes per fsync, as XFS and ext4 issue them: an
    allocating fsync or fdatasync needs two (the data, then the journal
    commit that exposes it), an fdatasync of an overwrite one (the data:
    the new mtime is not needed to read it back), an fsync of an overwrite
    two (the times are metadata)."""
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    dev = m.fs.dev

    async def flushes(data, pos, datasync):
        before = dev.statistics()["flushes"]
        await m.write(f, pos, data)
        await m.fsync(f, datasync)
        return dev.statistics()["flushes"] - before

    assert await flushes(b"a" * 16384, 0, True) == 2         # allocating fdatasync
    assert await flushes(b"b" * 16384, 0, True) == 1         # overwrite fdatasync
    assert await flushes(b"c" * 16384, 0, False) == 2        # overwrite fsync: mtime
    assert await flushes(b"d" * 4096, 16384, True) == 2      # extending: the size
    await m.release(f)
    await rig.crash()
    m = await rig.mount()
    f = await m.open(ino, write=False)
    assert await m.read(f, 0, 20480) == b"c" * 16384 + b"d" * 4096
    await rig.unmount()
    await rig.fsck()


async def test_fsync_makes_two_trips_to_a_worker_thread(rig, monkeypatch):
    """An allocating fsync waits for the device twice, as XFS's does: the
    data write, then the log write, which carries its flushes as one
    request (REQ_PREFLUSH | REQ_FUA) instead of a flush, a write and a
    flush, each a round trip to a worker thread (100-300 us apiece on a
    2-vCPU VM).  The flushes and their order stay: two flushes, the data
    before the commit record."""
    import delafs.block.device as device
    from delafs.block.recorder import Recorder
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"a" * 16384)
    trips = []
    real = device.in_worker_thread

    async def counted(fn, *args):
        trips.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args)
    monkeypatch.setattr(device, "in_worker_thread", counted)
    m.fs.dev.recorder = rec = Recorder()
    await m.fsync(f)
    assert len(trips) == 2, trips
    kinds = [ev[0] for ev in rec.events]
    assert kinds.count("flush") == 2
    first_flush = kinds.index("flush")
    assert kinds[:first_flush] == ["write"]                 # the data, then its flush
    assert kinds[-1] == "flush" and "write" in kinds[first_flush:]   # the log, then its flush
    m.fs.dev.recorder = None
    await m.release(f)
    await rig.unmount()
    await rig.fsck()


async def test_background_writeback_leaves_the_flush_to_the_journal_commit(rig):
    """The flusher writes data and completes its ioends (the conversion to
    WRITTEN goes into the running transaction) without a device flush; the
    commit that carries the conversion flushes before its records, so the
    data is durable first (REQ_PREFLUSH), then flushes its own records."""
    from delafs.block.recorder import Recorder
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"w" * (64 << 10))
    dev = m.fs.dev
    dev.recorder = Recorder()
    await writepages(m.engine, await m.iget(ino), sync=False)
    assert [e[0] for e in dev.recorder.events] == ["write"] and dev.unflushed
    assert set(states(m, ino, 0, 16)) == {ExtState.WRITTEN}
    await m.fs.commit()
    assert [e[0] for e in dev.recorder.events][1:] == ["flush", "write", "flush"]
    assert not dev.unflushed
    dev.recorder = None
    await m.release(f)
    await rig.crash()
    m = await rig.mount()
    f = await m.open(ino, write=False)
    assert await m.read(f, 0, 64 << 10) == b"w" * (64 << 10)
    await rig.unmount()
    await rig.fsck()


async def test_unsynced_data_may_be_lost_but_never_stale(rig):
    m = await rig.mount(format=True)
    # Fill blocks with a pattern, free them, then reuse them for new data
    # that never reaches the disk: the crash must show zeros, not the pattern.
    old = await new_file(m, b"old")
    f = await m.open(old, write=True)
    await m.write(f, 0, b"\xAA" * (1 << 20))
    await m.fsync(f)
    await m.release(f)
    await m.fs.unlink(ROOT, b"old")
    await m.fs.commit()
    ino = await new_file(m, b"new")
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"\x55" * (1 << 20))
    await m.fs.commit()                 # metadata only: the data is still delalloc
    await rig.crash()
    m = await rig.mount()
    f = await m.open(ino, write=False)
    got = await m.read(f, 0, 1 << 20)
    assert b"\xAA" not in got
    await rig.unmount()
    await rig.fsck()


@pytest.mark.parametrize("tag", ["short_copy", "stale_mapping"])
async def test_injected_short_copies_and_stale_mappings_lose_nothing(rig, tag):
    m = await rig.mount(format=True)
    m.errortags.set(tag, 3)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    model = bytearray()
    rng = __import__("random").Random(5)
    for _ in range(60):
        pos = rng.randrange(0, 200_000)
        data = bytes([rng.randrange(1, 256)]) * rng.randrange(1, 40_000)
        assert await m.write(f, pos, data) == len(data)
        if pos > len(model):
            model += bytes(pos - len(model))
        model[pos:pos + len(data)] = data
        check_invariants(m)
    key = "short_copies" if tag == "short_copy" else "stale_mappings"
    assert m.engine.stats[key] > 0
    assert m.engine.stats["punches"] > 0
    assert await m.read(f, 0, len(model)) == bytes(model)
    await m.fsync(f)
    await m.release(f)
    check_invariants(m)
    await rig.crash()
    m = await rig.mount()
    f = await m.open(ino, write=False)
    assert await m.read(f, 0, len(model) + 10) == bytes(model)
    await rig.unmount()
    await rig.fsck()


async def test_unfaultable_source_returns_short_or_efault(rig):
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    m.errortags.set("copy_fault", 1)
    with pytest.raises(FsError) as e:
        await m.write(f, 0, b"x" * 10000)
    assert e.value.errno == errno.EFAULT
    m.errortags.set("copy_fault", 0)
    check_invariants(m)
    assert m.fs.space.alloc.reserved == 0 or m.ops.prealloc_start(ino) is not None


@pytest.mark.parametrize("mode,survives", [("scan", True), ("legacy", False)])
async def test_punch_keeps_delalloc_under_a_racing_fault(rig, mode, survives):
    """The race of seed 001, laid out step by step: a buffered write maps a
    NEW delalloc range, a page fault dirties a folio inside it, the write
    comes up short and punches its unused tail."""
    from delafs.iomap.types import IOMAP_WRITE
    rig.opts["punch_mode"] = mode
    m = await rig.mount(format=True)
    ino = await new_file(m, size=64 * 1024)
    inode = await m.iget(ino)
    async with inode.i_rwsem.exclusive():
        iomap = await m.ops.iomap_begin(inode, 0, 64 * 1024, IOMAP_WRITE)
        assert iomap.type.name == "DELALLOC" and iomap.flags
        await m.mmap_write(ino, 8 * BS, b"M" * 100)          # the racing fault
        # The write's copy faulted before its first byte: its whole NEW range
        # is the unused tail.
        await m.engine.punch_delalloc(inode, 0, 64 * 1024)
    f = await m.open(ino, write=True)
    await m.fsync(f)
    got = await m.read(f, 8 * BS, 100)
    check_invariants(m)
    await rig.crash()
    m = await rig.mount()
    f = await m.open(ino, write=False)
    on_disk = await m.read(f, 8 * BS, 100)
    if survives:
        assert got == on_disk == b"M" * 100
    else:
        assert on_disk == bytes(100), "legacy punch should have thrown the fault's data away"


async def test_page_mkwrite_reserves_and_writes_back(rig):
    m = await rig.mount(format=True)
    ino = await new_file(m, size=1 << 20)
    for i in range(0, 256, 7):
        await m.mmap_write(ino, i * BS + 5, b"page%d" % i)
    assert m.engine.stats["page_mkwrites"] > 0
    check_invariants(m)
    await m.syncfs()
    await rig.crash()
    m = await rig.mount()
    f = await m.open(ino, write=False)
    for i in range(0, 256, 7):
        assert await m.read(f, i * BS + 5, len(b"page%d" % i)) == b"page%d" % i
    await rig.unmount()
    await rig.fsck()


async def test_truncate_zeroes_the_tail(rig):
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"y" * 20000)
    await m.fsync(f)
    await m.truncate(ino, 5000)
    await m.truncate(ino, 12000)
    assert await m.read(f, 4990, 20) == b"y" * 10 + bytes(10)
    await m.fsync(f)
    await m.release(f)
    check_invariants(m)
    await rig.crash()
    m = await rig.mount()
    f = await m.open(ino, write=False)
    assert (await m.getattr(ino)).size == 12000
    assert await m.read(f, 4990, 20) == b"y" * 10 + bytes(10)
    await rig.unmount()
    await rig.fsck()


async def test_seek_data_and_hole(rig):
    m = await rig.mount(format=True)
    ino = await new_file(m, size=1 << 20)
    f = await m.open(ino, write=True)
    await m.write(f, 256 * 1024, b"d" * 8192)
    inode = await m.iget(ino)
    assert await m.engine.iomap_seek(inode, 0, True) == 256 * 1024        # delalloc, cached
    assert await m.engine.iomap_seek(inode, 256 * 1024, False) == 256 * 1024 + 8192
    await m.fsync(f)
    assert await m.engine.iomap_seek(inode, 0, True) == 256 * 1024        # written
    with pytest.raises(FsError) as e:
        await m.engine.iomap_seek(inode, 1 << 20, True)
    assert e.value.errno == errno.ENXIO


async def test_enospc_only_at_write_time_and_space_returns(rig):
    m = await rig.mount(format=True, size=16 << 20)
    initial = m.fs.statfs()["bfree"]
    files = []
    hit = False
    for i in range(100):
        ino = await new_file(m, b"f%d" % i)
        f = await m.open(ino, write=True)
        files.append((ino, f))
        try:
            for j in range(64):
                await m.write(f, j * 4096 * 16, os.urandom(4096 * 16))
        except FsError as e:
            assert e.errno == errno.ENOSPC
            hit = True
            break
    assert hit
    check_invariants(m)
    for ino, f in files:
        await m.fsync(f)                 # writeback never meets ENOSPC
    assert m.ops.stats["writeback_errors"] == 0
    for i, (ino, f) in enumerate(files):
        await m.release(f)
        await m.fs.unlink(ROOT, b"f%d" % i)
    await m.fs.sync()
    assert m.fs.statfs()["bfree"] == initial
    await rig.unmount()
    m = await rig.mount()
    assert m.fs.statfs()["bfree"] == initial
    await rig.unmount()
    await rig.fsck()


async def test_syncfs_reports_a_writeback_error_nobody_has_reported(rig):
    """The superblock's errseq (s_wb_err): syncfs reports a writeback
    error that happened before it or during it, once, whoever else (an
    fsync) reported it to its own description; the unmount's final flush
    says so too, and still leaves a clean, committed image."""
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"a" * 9000)
    assert await m.syncfs() == 0
    m.errortags.set("writeback_eio", 1)
    await m.write(f, 0, b"b" * 9000)
    assert await m.syncfs() == errno.EIO
    assert await m.syncfs() == 0               # reported once
    await m.write(f, 0, b"c" * 9000)
    inode = await m.iget(ino)
    await writepages(m.engine, inode, sync=True)   # background writeback fails, unseen
    with pytest.raises(FsError):
        await m.fsync(f)                       # the description's report...
    assert await m.syncfs() == errno.EIO       # ...is not the superblock's
    await m.write(f, 0, b"c" * 9000)
    await writepages(m.engine, inode, sync=True)   # unseen again, then an ENOSPC retry:
    m.errortags.set("writeback_eio", 0)
    m.errortags.set("alloc_enospc", 1)
    with pytest.raises(FsError) as e:
        await m.write(f, 1 << 20, b"e" * 4096)
    assert e.value.errno == errno.ENOSPC
    m.errortags.set("alloc_enospc", 0)
    assert await m.syncfs() == errno.EIO       # its flush is not a syncfs: the error waited
    await m.write(f, 0, b"d" * 9000)
    m.errortags.set("writeback_eio", 1)
    with pytest.raises(FsError) as e:
        await m.unmount()                      # the final flush loses "d"
    assert e.value.errno == errno.EIO
    rig.scope.cancel()
    rig.dev.close()
    await rig.fsck()


async def test_unmount_reports_only_what_its_own_flush_lost(rig):
    """An error fsync already reported (the program rewrote and fsynced
    since) does not fail the unmount: its final flush lost nothing."""
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    m.errortags.set("writeback_eio", 1)
    await m.write(f, 0, b"a" * 9000)
    with pytest.raises(FsError):
        await m.fsync(f)
    m.errortags.set("writeback_eio", 0)
    await m.write(f, 0, b"b" * 9000)
    await m.fsync(f)
    await m.write(f, 0, b"c" * 9000)
    await rig.unmount()
    await rig.fsck()
    m = await rig.mount()
    assert await m.read(await m.open(ino, write=False), 0, 9000) == b"c" * 9000
    await rig.unmount()


async def test_writeback_eio_is_reported_once_per_description(rig):
    m = await rig.mount(format=True)
    ino = await new_file(m)
    a = await m.open(ino, write=True)
    b = await m.open(ino, write=False)
    await m.write(a, 0, b"old" * 5000)
    await m.fsync(a)
    await m.write(a, 0, b"new" * 5000)
    m.errortags.set("writeback_eio", 1)
    await m.syncfs()                       # the error happens here, reported to nobody yet
    m.errortags.set("writeback_eio", 0)
    late = await m.open(ino, write=False)
    # Evict the failed folios: the error must outlive them.
    inode = await m.iget(ino)
    async with inode.mapping.invalidate_lock.exclusive():
        await inode.mapping.truncate_range(0, 1 << 30)
    for f in (a, b):
        with pytest.raises(FsError) as e:
            await m.fsync(f)
        assert e.value.errno == errno.EIO
        await m.fsync(f)                   # only once
    await m.fsync(late)                    # opened after the error: nothing
    check_invariants(m)
    got = await m.read(a, 0, 15000)
    assert got in (b"old" * 5000, b"new" * 5000)


async def test_fallocate_allocate_punch_and_zero(rig):
    from delafs.vfs.mount import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
    m = await rig.mount(format=True)
    ino = await new_file(m)
    await m.fallocate(ino, 0, 0, 64 * BS)
    assert (await m.getattr(ino)).size == 64 * BS
    assert set(states(m, ino, 0, 64)) == {ExtState.UNWRITTEN}
    f = await m.open(ino, write=True)
    assert await m.read(f, 0, 100) == bytes(100)           # unwritten reads as zeros
    await m.write(f, 0, b"q" * (64 * BS))
    await m.fsync(f)
    assert set(states(m, ino, 0, 64)) == {ExtState.WRITTEN}
    used = m.fs.space.alloc.used
    await m.fallocate(ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100, 10 * BS)
    assert await m.read(f, 90, 20) == b"q" * 10 + bytes(10)
    assert await m.read(f, 100 + 10 * BS - 5, 10) == bytes(5) + b"q" * 5
    assert states(m, ino, 1, 9) == [ExtState.HOLE]
    await m.fallocate(ino, FALLOC_FL_ZERO_RANGE, 20 * BS, 4 * BS)
    assert states(m, ino, 20, 4) == [ExtState.UNWRITTEN]
    assert await m.read(f, 20 * BS, 4 * BS) == bytes(4 * BS)
    await m.fs.sync()           # freed blocks stay busy until the checkpoint
    assert m.fs.space.alloc.used < used
    with pytest.raises(FsError) as e:
        await m.fallocate(ino, FALLOC_FL_PUNCH_HOLE, 0, BS)
    assert e.value.errno == errno.EINVAL
    await m.fsync(f)
    await m.release(f)
    check_invariants(m)
    await rig.unmount()
    await rig.fsck()


async def test_background_writeback_skips_folios_cleaned_meanwhile(rig):
    """An expiry pass walks a list of dirty folios taken before its first
    await; a concurrent sync pass cleans them meanwhile (dirtied_when is
    then None).  That must be a skip, not a TypeError ending writeback on
    queued folios without writing them."""
    import functools

    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    inode = await m.iget(ino)
    for round_ in range(6):
        data = bytes([65 + round_]) * (16 * BS)
        for i in range(0, 256, 16):
            await m.write(f, i * BS, data)
        async with trio.open_nursery() as n:
            n.start_soon(functools.partial(writepages, m.engine, inode, sync=False,
                                           expired_before=trio.current_time() + 60))
            n.start_soon(functools.partial(writepages, m.engine, inode, sync=True))
        assert inode.mapping.nrdirty == 0
    await m.fsync(f)
    await rig.crash()
    m = await rig.mount()
    f = await m.open(ino, write=False)
    assert await m.read(f, 0, 256 * BS) == bytes([70]) * (256 * BS)


async def test_fallocate_growing_over_preallocation_leaves_no_stale_delalloc(rig):
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"x" * 5000)              # extending: speculative delalloc past EOF
    assert m.ops.prealloc_start(ino) is not None
    await m.fallocate(ino, 0, 0, 40 * BS)          # the new EOF covers the preallocation
    check_invariants(m)
    assert ExtState.DELALLOC not in states(m, ino, 2, 38)
    await m.fsync(f)
    await m.release(f)
    check_invariants(m)
    await rig.unmount()
    await rig.fsck()


async def test_enospc_concurrent_writers_faults_and_extender(rig):
    """Two random 4 KiB writers into sparse files, a page_mkwrite driver and
    an extending writer fill the filesystem together: ENOSPC comes only at
    write or fault time, never in writeback, and deleting everything gives
    back exactly the free space mkfs reported, before and after reopening."""
    import random
    m = await rig.mount(format=True, size=12 << 20)
    initial = m.fs.statfs()["bfree"]
    enospc = {}
    # Created first: a task runs until it waits, so one writer could fill
    # the filesystem before another has even created its file.
    inos = {name: await new_file(m, name) for name in (b"r1", b"r2", b"ext")}
    inos[b"mm"] = await new_file(m, b"mm", size=8 << 20)

    async def random_writer(name, seed):
        rng = random.Random(seed)
        f = await m.open(inos[name], write=True)
        try:
            for _ in range(4000):
                await m.write(f, rng.randrange(0, 8 << 20) & ~(BS - 1), rng.randbytes(BS))
        except FsError as e:
            enospc[name] = e.errno
        return f

    async def extender():
        f = await m.open(inos[b"ext"], write=True)
        try:
            for _ in range(4000):
                await m.write(f, 0, b"e" * (16 * BS), append=True)
        except FsError as e:
            enospc[b"ext"] = e.errno
        return f

    async def faulter():
        ino = inos[b"mm"]
        rng = random.Random(7)
        try:
            for _ in range(4000):
                await m.mmap_write(ino, rng.randrange(0, 2048) * BS, b"m" * 64)
        except FsError as e:
            enospc[b"mm"] = e.errno

    files = []

    async def run(fn, *args):
        f = await fn(*args)
        if f is not None:
            files.append(f)
    async with trio.open_nursery() as n:
        n.start_soon(run, random_writer, b"r1", 1)
        n.start_soon(run, random_writer, b"r2", 2)
        n.start_soon(run, extender)
        n.start_soon(run, faulter)
    assert enospc and set(enospc.values()) == {errno.ENOSPC}, enospc
    check_invariants(m)
    for f in files:
        await m.fsync(f)
    await m.syncfs()
    assert m.ops.stats["writeback_errors"] == 0
    check_invariants(m)
    for f in files:
        await m.release(f)
    for name in (b"r1", b"r2", b"ext", b"mm"):
        inode = await m.fs.lookup(ROOT, name)
        vi = m.inodes.pop(inode.ino, None)
        if vi is not None:
            async with vi.mapping.invalidate_lock.exclusive():
                await vi.mapping.truncate_range(0, None)
        await m.fs.unlink(ROOT, name)
    await m.fs.sync()
    assert m.fs.statfs()["bfree"] == initial
    await rig.unmount()
    m = await rig.mount()
    assert m.fs.statfs()["bfree"] == initial
    await rig.unmount()
    await rig.fsck()


async def test_a_writeback_walk_lets_other_requests_run_between_folios(rig):
    """cond_resched: writepages over thousands of dirty folios runs on the
    event loop that answers FUSE requests.  Walking them all before the
    first yield held every request for the whole pass (about 190 ms per
    background pass under fio's 4 KiB random writes); the walk must give
    other tasks a turn while it is still mapping folios, not only once it
    submits."""
    m = await rig.mount(format=True, size=128 << 20)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    nfolios = 2000
    for i in range(nfolios):                    # one block every 16: a folio each
        await m.write(f, i * 16 * BS, b"r" * BS)
    await m.fsync(f)                            # WRITTEN, so the pass is pure overwrite
    for i in range(nfolios):
        await m.write(f, i * 16 * BS, b"s" * BS)
    inode = await m.iget(ino)
    stats = m.ops.stats
    start = stats["writeback_ranges"]
    seen_mid_walk = []
    walking = True

    async def another_request():
        while walking:
            done = stats["writeback_ranges"] - start
            if 0 < done < nfolios:
                seen_mid_walk.append(done)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as n:
        n.start_soon(another_request)
        await trio.lowlevel.checkpoint()
        await writepages(m.engine, inode, sync=False)
        walking = False
    assert stats["writeback_ranges"] - start == nfolios
    assert len(seen_mid_walk) >= 5, seen_mid_walk
    await m.fsync(f)
    await m.release(f)
    check_invariants(m)
    await rig.unmount()
    await rig.fsck()


async def test_a_writeback_pass_submits_as_it_goes_and_holds_a_bounded_copy(rig):
    """Writeback copies each folio's dirty blocks into its ioend.  A pass
    that queued every ioend of the walk and submitted them only at its end
    held a copy of all the file's dirty data at once (up to dirty_limit,
    64 MiB by default, on top of the cache) and kept every folio of it under
    writeback until the last write: the one-million-write sparse job's
    peak RSS.  Like the kernel, which sends each ioend on its way as the
    walk moves on, a pass submits once WRITEBACK_BATCH bytes are queued and
    ends those folios' writeback before it maps more."""
    import tracemalloc

    from delafs.iomap.writeback import WRITEBACK_BATCH
    rig.opts.update(dirty_limit=256 << 20, dirty_expire=1000.0, writeback_interval=1000.0)
    m = await rig.mount(format=True, size=192 << 20)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    nfolios = 6144                              # 24 MiB, three batches
    assert nfolios * BS >= 3 * WRITEBACK_BATCH
    for i in range(nfolios):                    # one block every other: an ioend each
        await m.write(f, 2 * i * BS, i.to_bytes(4, "little") * (BS // 4))
    submits = []
    real_submit = m.fs.dev.submit

    async def submit(writes):
        submits.append((sum(len(b) for _, bufs in writes for b in bufs), m.cache.writeback_bytes))
        return await real_submit(writes)

    m.fs.dev.submit = submit
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        await m.fsync(f)
        held = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    m.fs.dev.submit = real_submit
    data_submits = [s for s in submits if s[0] > 16 * BS]
    assert len(data_submits) >= 3, submits
    assert max(n for n, _ in data_submits) <= WRITEBACK_BATCH, submits
    assert max(wb for _, wb in data_submits) <= WRITEBACK_BATCH, submits
    # The old single submit held ~36 MiB here (24 MiB of copies plus an
    # ioend object per block); a batch of copies is 8 MiB.
    assert held < 2 * WRITEBACK_BATCH, f"fsync held {held >> 20} MiB"
    assert m.cache.writeback_bytes == 0 and m.cache.dirty_bytes == 0
    await m.release(f)
    check_invariants(m)
    await rig.unmount()
    m = await rig.mount()
    f = await m.open(ino, write=False)
    for i in (0, 1, 2047, 2048, 4095, 4096, nfolios - 1):
        assert await m.read(f, 2 * i * BS, BS) == i.to_bytes(4, "little") * (BS // 4)
    await m.release(f)
    await rig.unmount()
    await rig.fsck()


async def test_fsync_writeback_rolls_its_transaction_before_dirty_leaves_pile_up(rig):
    """The one-million-write sparse job peaked in its final fsync: with no
    request running between them to roll the transaction, writeback's
    delalloc conversions and the ioend completion dirtied one extent leaf
    per scattered block, thousands of decoded leaves pinned until the
    fsync's commit (+30 MiB).  Both roll at the running transaction's
    bound, as a punch does, and what they committed recovers."""
    m = await rig.mount(format=True, size=128 << 20)
    m.fs.store.dirty_roll = 16
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    nblocks = 3000                              # ~40 extent leaves
    for i in range(nblocks):
        await m.write(f, 2 * i * BS, i.to_bytes(4, "little") * (BS // 4))
    store = m.fs.store
    most = 0
    real_mark, real_add = store.mark_dirty, store.add

    def mark_dirty(obj):
        nonlocal most
        real_mark(obj)
        most = max(most, len(store.dirty))

    def add(obj):
        nonlocal most
        real_add(obj)
        most = max(most, len(store.dirty))

    store.mark_dirty, store.add = mark_dirty, add
    rolls = m.fs.stats["rolls"]
    await m.fsync(f)
    store.mark_dirty, store.add = real_mark, real_add
    assert most <= 16 + 8, most                 # the bound plus what one step dirties
    assert m.fs.stats["rolls"] > rolls
    check_invariants(m)
    await rig.crash()                           # the rolled commits and fsync's recover
    m = await rig.mount()
    f = await m.open(ino, write=False)
    for i in (0, 1, 999, 1000, 2998, nblocks - 1):
        assert await m.read(f, 2 * i * BS, BS) == i.to_bytes(4, "little") * (BS // 4)
    assert (await m.iget(ino)).size == (2 * nblocks - 1) * BS
    await m.release(f)
    await rig.unmount()
    await rig.fsck()


async def test_fsync_writeback_keeps_the_metadata_cache_to_its_bound(rig):
    """The cache of decoded metadata blocks was trimmed only when a
    request's transaction ended.  An fsync's writeback runs no request
    between its conversions, so every extent leaf it read or split stayed
    decoded until it returned: the one-million-write sparse job's final
    fsync grew the cache from its 2,048 blocks to 3,340 (~23 MiB).  The
    roll points trim it too."""
    m = await rig.mount(format=True, size=128 << 20)
    store = m.fs.store
    store.dirty_roll = 16
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    nblocks = 3000                              # ~40 extent leaves
    for i in range(nblocks):
        await m.write(f, 2 * i * BS, i.to_bytes(4, "little") * (BS // 4))
    store.cache_blocks = 8
    most = 0
    real_get, real_add = store.get, store.add

    async def get(blk, decode):
        nonlocal most
        obj = await real_get(blk, decode)
        most = max(most, len(store.cache) - len(store.dirty))
        return obj

    def add(obj):
        nonlocal most
        real_add(obj)
        most = max(most, len(store.cache) - len(store.dirty))

    store.get, store.add = get, add
    await m.fsync(f)
    store.get, store.add = real_get, real_add
    assert most <= 8 + 8, most                  # the bound plus what one step reads
    check_invariants(m)
    await m.release(f)
    await rig.unmount()
    await rig.fsck()


async def test_a_write_into_an_existing_mapping_looks_it_up_once(rig, monkeypatch):
    """An append lands in the delalloc its file's previous write reserved:
    iomap_begin's lookup that finds no hole is already the mapping to
    return.  Looking it up a second time was a tenth of the in-process
    cost of a 4-byte append (generic/069's pattern)."""
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"abcd", append=True)
    emap = m.fs.emaps[ino]
    lookups = 0
    real_lookup = ExtentMap.lookup

    def lookup(self, *a, **kw):
        nonlocal lookups
        lookups += self is emap
        return real_lookup(self, *a, **kw)

    monkeypatch.setattr(ExtentMap, "lookup", lookup)
    assert await m.write(f, 0, b"efgh", append=True) == 4
    assert lookups == 1
    monkeypatch.undo()
    assert await m.read(f, 0, 8) == b"abcdefgh"
    await m.release(f)
    await rig.unmount()
    await rig.fsck()


async def test_switched_off_yield_points_and_delays_cost_no_await(rig, monkeypatch):
    """Yield points and delay errortags stay in the code users run (the race
    explorer must explore it), so when nothing is armed each may cost one
    attribute test and no more.  An ``await`` on a no-op coroutine costs a
    coroutine object each: five of them were ~2 us of a 4-byte append."""
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    calls = []

    async def hit(self, name):
        calls.append(name)

    async def delay(self, tag):
        calls.append(tag)

    monkeypatch.setattr(YieldPoints, "hit", hit)
    monkeypatch.setattr(ErrorTags, "delay", delay)
    assert await m.write(f, 0, b"abcd" * 3000) == 12000
    assert await m.write(f, 0, b"efgh", append=True) == 4
    await m.truncate(ino, 6000)
    await m.fsync(f)
    await m.mmap_write(ino, 100, b"mmap")
    async with f.inode.i_rwsem.exclusive():
        await m.engine.punch_delalloc(f.inode, 0, 6000)
    await m.fsync(f)
    assert calls == []
    monkeypatch.undo()
    assert await m.read(f, 0, 8) == b"abcdabcd"
    assert await m.read(f, 100, 4) == b"mmap"
    await m.release(f)
    await rig.unmount()
    await rig.fsck()


async def test_mapping_a_mapped_range_of_a_loaded_file_opens_no_transaction(rig, monkeypatch):
    """iomap_begin that finds the range mapped in a loaded extent map (a
    read, an overwrite, an append into its own delalloc) only looks it up:
    XFS opens a transaction only to allocate.  It takes meta_lock and
    nothing else, and still fails on a shut down filesystem."""
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    data = bytearray(os.urandom(64 * BS))
    await m.write(f, 0, data)
    await m.fsync(f)
    m.cache.shrink(0)
    assert f.inode.mapping.nrpages == 0
    opened = []
    real = m.fs.transaction

    def transaction(**kw):
        opened.append(kw)
        return real(**kw)

    monkeypatch.setattr(m.fs, "transaction", transaction)
    assert await m.read(f, 5 * BS, 3 * BS) == data[5 * BS:8 * BS]
    assert await m.read(f, 40 * BS + 7, 100) == data[40 * BS + 7:40 * BS + 107]
    assert await m.write(f, 9 * BS + 3, b"over") == 4
    data[9 * BS + 3:9 * BS + 7] = b"over"
    assert opened == []
    assert await m.write(f, 1000 * BS, b"tail") == 4           # a hole: reserves
    assert len(opened) == 1
    assert await m.write(f, 0, b"more", append=True) == 4     # into its own delalloc
    assert len(opened) == 1
    data += bytes(1000 * BS - len(data)) + b"tailmore"
    monkeypatch.undo()
    await m.fsync(f)
    m.cache.shrink(0)
    assert await m.read(f, 0, len(data)) == data
    await m.release(f)
    m.fs.shut_down("test")
    for flags in (0, IOMAP_WRITE):
        with pytest.raises(FsError) as e:
            await m.engine.ops.iomap_begin(f.inode, 50 * BS, BS, flags)
        assert e.value.errno == errno.EIO


async def test_readahead_inserts_a_missing_folio_without_looking_it_up_again(rig, monkeypatch):
    """Readahead adds the folio it found missing straight away, as the
    kernel's readahead calls filemap_add_folio: no second lookup and no
    cancellation point in between (get_folio's miss path did both, a
    fifteenth of a cold random 4 KiB read's Python calls)."""
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    data = os.urandom(32 * BS)
    await m.write(f, 0, data)
    await m.fsync(f)
    m.cache.shrink(0)
    mapping = f.inode.mapping
    looked = []
    real = type(mapping).lookup

    def lookup(self, block):
        if self is mapping:
            looked.append(block)
        return real(self, block)

    monkeypatch.setattr(type(mapping), "lookup", lookup)
    assert await m.read(f, 17 * BS, BS) == data[17 * BS:18 * BS]
    assert looked.count(17) == 2          # readahead's miss, then the copy's hit
    monkeypatch.undo()
    assert await m.read(f, 0, len(data)) == data
    await m.release(f)
    await rig.unmount()


async def test_a_new_file_starts_with_an_empty_extent_map_without_reading_the_tree(rig):
    """A file just created has no extents: its first write must not scan
    the tree for them (and re-read its inode to check the block count), a
    tenth of the write path's time when tar extracts thousands of files."""
    m = await rig.mount(format=True)
    scans = []
    real_scan = m.fs.tree.scan

    async def scan(lo, hi, **kw):
        scans.append(lo)
        return await real_scan(lo, hi, **kw)

    m.fs.tree.scan = scan
    ino = await new_file(m, b"new")
    f = await m.open(ino, write=True)
    assert await m.write(f, 0, b"n" * 5000) == 5000
    assert [lo for lo in scans if lo[0] == ino] == []
    await m.fsync(f)
    await m.release(f)
    check_invariants(m)
    await rig.unmount()
    m = await rig.mount()
    f = await m.open(ino, write=False)
    assert await m.read(f, 0, 5000) == b"n" * 5000
    await rig.unmount()
    await rig.fsck()


async def test_evict_clean_lets_a_forgotten_clean_inode_go_and_keeps_a_busy_one(rig):
    """Mount.evict_clean (the kernel's evict of an inode it forgot): a clean
    one loses its VInode, its mapping and its folios and reads back from the
    image; dirty pages, writeback or a held lock keep it."""
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"e" * 70000)
    await m.release(f)
    assert not m.evict_clean(ino)                    # dirty: kept
    assert m.inodes[ino].mapping.nrdirty
    await m.syncfs()
    vi = m.inodes[ino]
    async with vi.i_rwsem.shared():
        assert not m.evict_clean(ino)                # in use: kept
    cached = m.cache.cached_bytes
    assert m.evict_clean(ino)
    assert ino not in m.inodes and m.cache.find_mapping(ino) is None
    assert m.cache.cached_bytes <= cached - 70000
    m.cache.verify()
    f = await m.open(ino, write=False)
    assert await m.read(f, 0, 70000) == b"e" * 70000
    await m.release(f)
    check_invariants(m)
    await rig.unmount()
    await rig.fsck()


async def test_opens_racing_on_an_uncached_inode_share_one_vinode(rig):
    """iget's find-or-insert must look again after it waited: two opens of
    a file the mount holds no VInode for, both waiting for meta_lock (a
    commit, a writeback conversion or a readdir batch holds it), each built
    one, and the second replaced the first in ``m.inodes``.  The writer's
    size then lived in a VInode writeback never sees: syncfs wrote back
    against the other one's EOF, cleaned the folios without writing them,
    and the data was gone after a remount although fsync returned 0."""
    m = await rig.mount(format=True)
    ino = await new_file(m)
    opened = []

    async def opener():
        opened.append(await m.open(ino, write=True))

    await m.fs.meta_lock.acquire()
    async with trio.open_nursery() as n:
        n.start_soon(opener)
        n.start_soon(opener)
        await trio.testing.wait_all_tasks_blocked()
        m.fs.meta_lock.release()
    a, b = opened
    assert a.inode is b.inode is m.inodes[ino]
    data = os.urandom(64 << 10)
    assert await m.write(a, 0, data) == len(data)
    await m.syncfs()
    await m.fsync(a)
    await m.release(a)
    await m.release(b)
    check_invariants(m)
    assert await read_after_crash(rig, ino, 0, len(data)) == data


async def test_truncate_inside_a_written_block_never_races_writeback_for_it(rig):
    """A shrink to a size inside a WRITTEN block zeroes the block's cached
    tail (dirty).  The filesystem then also read the block from the device,
    zeroed its tail there and wrote it back itself, holding no folio lock:
    a background pass that had mapped the extent before could write the
    cached folio (newer head) at the same time, and when the truncate's
    write of the old head landed last the newer bytes were gone from the
    disk while the folio said clean.  XFS writes the zeroed block back
    through the page cache before it logs the new size; so does delafs."""
    from delafs.iomap.types import POINTS

    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    for b in range(3):                              # three folios, one extent
        await m.write(f, b * BS, os.urandom(BS))
    await m.fsync(f)
    head = os.urandom(100)
    await m.write(f, 0, os.urandom(10))             # dirty: the pass maps it first
    await m.write(f, 2 * BS, head)                  # dirty: the newer head
    eof_pblock = m.fs.emaps[ino].lookup(2).pblock

    parked, resume, flusher = trio.Event(), trio.Event(), []
    hits = []

    class ParkSecondFolio:                          # a one-task race explorer
        async def point(self, name):
            if name == "writepages_folio" and trio.lowlevel.current_task() in flusher:
                hits.append(name)
                if len(hits) == 2:                  # folio 0 mapped and queued
                    parked.set()
                    await resume.wait()

    gate, writing = trio.Event(), trio.Event()
    dev_write = m.fs.dev.write

    async def slow_write(blk, bufs):
        if blk == eof_pblock:
            writing.set()
            await gate.wait()
        return await dev_write(blk, bufs)

    m.fs.dev.write = slow_write
    POINTS.explorer = ParkSecondFolio()
    try:
        async def background_pass():
            flusher.append(trio.lowlevel.current_task())
            await writepages(m.engine, f.inode, sync=False)

        async with trio.open_nursery() as n:
            n.start_soon(background_pass)
            await parked.wait()
            n.start_soon(m.truncate, ino, 2 * BS + 100)
            await trio.testing.wait_all_tasks_blocked()
            resume.set()                            # the pass writes folio 2 now
            await trio.testing.wait_all_tasks_blocked()
            gate.set()                              # then the truncate's own write, if any
    finally:
        POINTS.explorer = None
        m.fs.dev.write = dev_write
    await m.fsync(f)
    await m.release(f)
    check_invariants(m)
    got = await read_after_crash(rig, ino, 2 * BS, BS)
    assert got == head, "the truncate's write of the old head landed last"


async def test_a_rename_over_a_file_writes_the_renamed_file_back_first(rig):
    """Mount.rename (ext4's auto_da_alloc): a regular file renamed over
    another has its data written back and converted before the rename, so
    a crash after the rename's commit finds the new name with the data.  An
    exchange, or a rename over nothing or over a directory, writes nothing."""
    m = await rig.mount(format=True)
    old = await new_file(m, b"old")
    new = await new_file(m, b"new")
    spare = await new_file(m, b"spare")
    await m.fs.mkdir(ROOT, b"dir", 0o755)
    data = os.urandom(3 * BS)
    for ino in (old, new, spare):
        f = await m.open(ino, write=True)
        await m.write(f, 0, data)
        await m.release(f)
    await m.fs.commit()
    await m.rename(ROOT, b"spare", ROOT, b"moved")              # over nothing
    await m.rename(ROOT, b"moved", ROOT, b"old", RENAME_EXCHANGE)
    assert m.inodes[spare].mapping.nrdirty and m.inodes[old].mapping.nrdirty
    await m.rename(ROOT, b"new", ROOT, b"old")
    assert not m.inodes[new].mapping.nrdirty
    assert set(states(m, new, 0, 3)) == {ExtState.WRITTEN}
    await m.fs.commit()
    await rig.crash()
    m = await rig.mount()
    f = await m.open((await m.fs.lookup(ROOT, b"old")).ino, write=False)
    assert await m.read(f, 0, len(data)) == data
    await rig.unmount()
    await rig.fsck()


async def test_a_failed_punch_leaves_no_folio_locked(rig):
    """delalloc_scan holds a folio locked while it punches up to it: a
    punch that fails (the filesystem shut down by an I/O error, a
    cancellation) must still unlock it, or the next writeback, truncate or
    unmount of the file waits for the lock forever."""
    m = await rig.mount(format=True)
    ino = (await m.fs.create(1, b"f", 0o644)).ino
    f = await m.open(ino, write=True)
    await m.write(f, 2 * BS, b"x" * BS)            # one dirty folio at block 2
    inode = m.inodes[ino]

    async def punch(*args):
        await trio.lowlevel.checkpoint()
        raise FsError(errno.EIO, "injected punch failure")

    m.engine.ops.punch = punch
    with pytest.raises(FsError):
        await m.engine.delalloc_scan(inode, 0, 2 * BS, 3 * BS)
    assert not [folio for folio in inode.mapping.folios.values() if folio.locked]


async def test_an_fsync_cancelled_while_waiting_for_writeback_leaves_the_folio_unlocked(rig):
    """A data-integrity writeback waits, folio locked, for writeback already
    in flight on it.  Cancelled there (a FUSE request interrupted, the
    daemon shutting down), it must unlock the folio on its way out."""
    m = await rig.mount(format=True)
    ino = (await m.fs.create(1, b"f", 0o644)).ino
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"x" * BS)
    inode = m.inodes[ino]
    folio = inode.mapping.lookup(0)
    await folio.lock()
    folio.start_writeback()                 # an earlier pass's I/O, still in flight
    folio.unlock()
    await m.write(f, 0, b"y" * BS)          # dirty again: sync writeback must wait for it
    with trio.move_on_after(0.05) as scope:
        await writepages(m.engine, inode, sync=True)
    assert scope.cancelled_caught
    assert not folio.locked
    folio.end_writeback()
