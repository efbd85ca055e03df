"""Writeback when something goes wrong or runs concurrently: truncate
against an ioend in flight, an unexpected exception in writeback_range,
a delalloc conversion that fails halfway, and the validity cookie across
an extent map's eviction.  In-process, so each window is forced exactly."""

import errno

import pytest
import trio

from delafs.lib.errors import CorruptionError, FsError

from .conftest import check_invariants, read_after_crash

ROOT = 1


BS = 4096


async def new_file(m, name=b"f"):
    return (await m.fs.create(ROOT, name, 0o644)).ino


async def wait_for(pred, timeout=10):
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.005)


async def test_truncate_against_writeback_in_flight_exposes_no_old_tail(rig):
    """The flusher holds an ioend for blocks that were delalloc (now
    UNWRITTEN, data not yet on the device).  Shrinking into the held block
    and growing again must read zeros past the old EOF, before and after a
    crash: truncate waits for writeback of the EOF block before zeroing."""
    rig.opts.update(dirty_expire=0.01, writeback_interval=0.01)
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    m.errortags.set("delay_writeback", 300)
    await m.write(f, 0, b"z" * 8192)
    inode = await m.iget(ino)
    await wait_for(lambda: inode.mapping.nrwriteback > 0)
    await m.truncate(ino, 5000)
    await m.truncate(ino, 8192)
    assert await m.read(f, 4990, 20) == b"z" * 10 + bytes(10)
    m.errortags.set("delay_writeback", 0)
    await m.fsync(f)
    await m.release(f)
    check_invariants(m)
    await rig.crash()
    m = await rig.mount()
    f = await m.open(ino, write=False)
    assert await m.read(f, 0, 8192) == b"z" * 5000 + bytes(3192)
    await rig.unmount()
    await rig.fsck()


async def test_truncate_zeroing_after_writeback_started_in_its_window_leaves_no_old_tail(rig):
    """truncate waits for writeback of the EOF block, then zeroes it; but
    the zeroing first waits for meta_lock (its iomap_begin), and a pass
    that starts in that wait converts the block's delalloc to UNWRITTEN
    and queues the old bytes.  The zeroing then saw UNWRITTEN, zeroed only
    the cached copy and dirtied nothing: the ioend put the old bytes past
    the new EOF on disk, and an extension read them back.  The kernel's
    iomap_zero_range writes back and waits first when the range has dirty
    or writeback folios (filemap_range_needs_writeback)."""
    from delafs.iomap.writeback import writepages

    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"z" * 8192)
    inode = await m.iget(ino)
    await m.fs.meta_lock.acquire()
    async with trio.open_nursery() as n:
        n.start_soon(m.truncate, ino, 5000)
        await trio.testing.wait_all_tasks_blocked()        # in the zeroing's iomap_begin
        n.start_soon(lambda: writepages(m.engine, inode, sync=False))
        await trio.testing.wait_all_tasks_blocked()        # the pass holds the folio
        m.errortags.set("delay_writeback", 300)
        m.fs.meta_lock.release()
    m.errortags.set("delay_writeback", 0)
    await m.fsync(f)
    m.cache.shrink(0)                                       # read the disk from now on
    await m.write(f, 12288, b"!")
    assert await m.read(f, 4096, 4096) == b"z" * 904 + bytes(3192)
    await m.fsync(f)
    await m.release(f)
    check_invariants(m)
    assert await read_after_crash(rig, ino, 4096, 4096) == b"z" * 904 + bytes(3192)


async def test_a_write_past_eof_zeroes_the_tail_of_the_old_eof_block(rig, monkeypatch):
    """A store through a mapping may land past EOF inside the EOF block (a
    truncate shrank the file between its fault and the store; the kernel
    allows it).  Those bytes must never become file data: a write past EOF
    zeroes [old EOF, end of its block) first, as XFS's
    xfs_file_write_zero_eof does.  delafs only punched the delalloc of the
    gap, and the stray bytes became part of the file."""
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"a" * 8192)
    await m.fsync(f)
    gate, at_gate = trio.Event(), trio.Event()
    stamp = m.fs.file_update_time

    async def gated(i):
        if not gate.is_set():
            at_gate.set()
            await gate.wait()
        return await stamp(i)

    monkeypatch.setattr(m.fs, "file_update_time", gated)
    async with trio.open_nursery() as n:
        n.start_soon(m.mmap_write, ino, 6000, b"S" * 100)
        await at_gate.wait()                   # between the read fault and page_mkwrite
        gate.set()
        await m.truncate(ino, 5000)
    await m.write(f, 12288, b"!")
    assert await m.read(f, 5000, 3192) == bytes(3192)
    await m.fsync(f)
    await m.release(f)
    check_invariants(m)
    assert await read_after_crash(rig, ino, 4096, 4096) == b"a" * 904 + bytes(3192)


async def test_unexpected_error_in_writeback_ends_writeback_and_is_reported(rig, monkeypatch):
    """A corruption error (not an FsError) out of writeback_range: the
    folio must not stay under writeback (a later truncate would hang and
    writers stay throttled); the error reaches fsync as EIO."""
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"x" * 20000)

    async def corrupt(_ino):
        raise CorruptionError("extent map", 1234, "injected")
    monkeypatch.setattr(m.fs, "extent_map", corrupt)
    try:
        with pytest.raises(Exception) as e:
            await m.fsync(f)
    finally:
        monkeypatch.undo()
    inode = await m.iget(ino)
    assert inode.mapping.nrwriteback == 0, "a folio was left under writeback"
    assert isinstance(e.value, FsError) and e.value.errno == errno.EIO, repr(e.value)
    with trio.fail_after(5):
        await m.truncate(ino, 0)
    check_invariants(m)


async def test_conversion_failing_halfway_shuts_the_filesystem_down(rig, monkeypatch):
    """Allocation and the extent map have changed when the extent items
    cannot be written: that half change must never be committed (XFS shuts
    down when a dirty transaction is cancelled)."""
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"x" * 20000)

    async def fail(*_a, **_k):
        raise CorruptionError("btree node", 99, "injected")
    monkeypatch.setattr(m.fs, "sync_extents", fail)
    try:
        with pytest.raises(Exception):
            await m.fsync(f)
    finally:
        monkeypatch.undo()
    assert m.fs.shutdown, "a half-done delalloc conversion was left for the next commit"
    with pytest.raises(FsError) as e:
        await m.fs.commit()
    assert e.value.errno == errno.EIO


async def test_validity_cookie_never_repeats_across_eviction(rig):
    """A mapping taken before an extent map was evicted and reloaded must
    be seen as stale afterwards: the cookie of the reloaded map may not
    start again from a value an old mapping could hold."""
    m = await rig.mount(format=True)
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"a" * 4096)
    await m.fsync(f)
    old = m.fs.emaps[ino].cookie
    del m.fs.emaps[ino]                     # evicted (no delalloc left)
    async with m.fs.meta_lock:
        emap = await m.fs.extent_map(ino)
    assert emap.cookie > old, (old, emap.cookie)


@pytest.mark.parametrize("fragmented", [False, True])
async def test_direct_allocation_of_a_failed_extending_write_is_freed(rig, monkeypatch, fragmented):
    """Low on space, iomap_begin allocates UNWRITTEN blocks at once instead
    of reserving delalloc.  When the extending write then fails (its
    source cannot be faulted in), the blocks past EOF must go, as ext4
    truncates a failed write's blocks: nothing else would ever free them.
    On fragmented free space the allocation comes in several runs, and
    the mapping iomap_end is given covers only the first."""
    m = await rig.mount(format=True)
    if fragmented:
        # Free space in runs of two blocks, each fenced by a used block.
        filler = await new_file(m, b"filler")
        g = await m.open(filler, write=True)
        await m.write(g, 0, b"f" * (60 * BS))
        await m.fsync(g)
        await m.release(g)
        for k in range(20):
            await m.fs.punch_hole(filler, 3 * k, 2)
        await m.fs.sync()
        take = m.fs.space.take
        monkeypatch.setattr(m.fs.space, "take",
                            lambda count, goal, **kw: take(min(count, 2), None, **kw))
    ino = await new_file(m)
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"a" * 5000)
    await m.fsync(f)
    await m.release(f)                  # trims the speculative delalloc past EOF
    f = await m.open(ino, write=True)
    await m.fs.sync()
    free = m.fs.space.alloc.available
    monkeypatch.setattr(m.ops, "_low_space", lambda: True)
    m.errortags.set("copy_fault", 1)
    with pytest.raises(FsError) as e:
        await m.write(f, 8192, b"b" * 40000)
    assert e.value.errno == errno.EFAULT
    m.errortags.set("copy_fault", 0)
    assert (await m.getattr(ino)).size == 5000
    past_eof = [x for x in m.fs.emaps[ino].iter_extents(2) if x.fblock >= 2]
    assert m.ops.stats["nonda_allocations"], "the low-space path was not taken"
    assert past_eof == [], f"blocks left allocated past EOF: {past_eof}"
    await m.fsync(f)
    await m.fs.sync()           # freed blocks stay busy until the checkpoint
    assert m.fs.space.alloc.available == free
    await m.release(f)
    check_invariants(m)
