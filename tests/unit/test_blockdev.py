"""Layer 6: the image.  Real files in tmp_path; a loop device when we can."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading

import pytest
import trio

from delafs.block import BLOCK_SIZE, BlockDevice, FaultTable, Recorder
from delafs.lib.errors import FsError

NBLOCKS = 64


def block(fill: int, n: int = 1) -> bytes:
    return bytes([fill]) * (BLOCK_SIZE * n)


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "image")
    BlockDevice.create_file(path, NBLOCKS * BLOCK_SIZE)
    return path


@pytest.fixture
def dev(image):
    d = BlockDevice.open(image)
    yield d
    d.close()


# -- opening ---------------------------------------------------------------


def test_open_missing_path(tmp_path):
    with pytest.raises(FsError) as exc:
        BlockDevice.open(str(tmp_path / "nope"))
    assert exc.value.errno == errno.ENOENT
    assert "does not exist" in str(exc.value)


def test_open_directory(tmp_path):
    with pytest.raises(FsError) as exc:
        BlockDevice.open(str(tmp_path))
    assert exc.value.errno == errno.EINVAL
    assert "is a directory" in str(exc.value)


def test_open_fifo_is_rejected_without_blocking(tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    with pytest.raises(FsError) as exc:
        BlockDevice.open(fifo, readonly=True)
    assert exc.value.errno == errno.EINVAL


def test_geometry(dev, image):
    assert dev.kind == "file"
    assert dev.path == image
    assert dev.size == NBLOCKS * BLOCK_SIZE
    assert dev.nblocks == NBLOCKS
    assert not dev.readonly and not dev.direct


def test_trailing_partial_block_is_not_addressable(tmp_path):
    path = str(tmp_path / "odd")
    BlockDevice.create_file(path, 3 * BLOCK_SIZE + 100)
    with BlockDevice.open(path) as d:
        assert d.nblocks == 3
        with pytest.raises(FsError):
            d.read_sync(3, 1)


def test_create_file_is_sparse_and_never_shrinks(tmp_path):
    path = str(tmp_path / "big")
    BlockDevice.create_file(path, 1 << 30)
    st = os.stat(path)
    assert st.st_size == 1 << 30
    assert st.st_blocks * 512 < 64 * 1024
    BlockDevice.create_file(path, 1 << 20)
    assert os.stat(path).st_size == 1 << 30
    BlockDevice.create_file(path, 2 << 30)
    assert os.stat(path).st_size == 2 << 30


def test_create_file_in_missing_directory(tmp_path):
    with pytest.raises(FsError) as exc:
        BlockDevice.create_file(str(tmp_path / "no" / "image"), BLOCK_SIZE)
    assert exc.value.errno == errno.ENOENT


def test_close_is_idempotent(image):
    d = BlockDevice.open(image)
    d.close()
    d.close()


# -- reads and writes --------------------------------------------------------


def test_sparse_image_reads_zeros(dev):
    assert dev.read_sync(0, NBLOCKS) == bytes(NBLOCKS * BLOCK_SIZE)


def test_sync_round_trip(dev, image):
    dev.write_sync(5, [block(0xAB, 2)])
    assert dev.read_sync(5, 2) == block(0xAB, 2)
    assert dev.read_sync(4, 1) == block(0)
    with open(image, "rb") as f:
        f.seek(5 * BLOCK_SIZE)
        assert f.read(2 * BLOCK_SIZE) == block(0xAB, 2)


def test_pwritev_with_several_buffers(dev):
    bufs = [block(1), bytearray(block(2, 2)), memoryview(block(3))]
    dev.write_sync(10, bufs)
    assert dev.read_sync(10, 4) == block(1) + block(2, 2) + block(3)


def test_partial_pwritev_is_resumed(dev, monkeypatch):
    real_pwritev = os.pwritev

    def dribble(fd, bufs, offset):
        # Write at most 1000 bytes per call, cutting buffers mid-way.
        return real_pwritev(fd, [memoryview(bufs[0])[:1000]], offset)

    monkeypatch.setattr(os, "pwritev", dribble)
    dev.write_sync(1, [block(1), block(2, 2)])
    monkeypatch.undo()
    assert dev.read_sync(1, 3) == block(1) + block(2, 2)


def test_more_buffers_than_iov_max(tmp_path):
    path = str(tmp_path / "wide")
    n = os.sysconf("SC_IOV_MAX") + 100
    BlockDevice.create_file(path, n * BLOCK_SIZE)
    with BlockDevice.open(path) as d:
        d.write_sync(0, [block(i % 251) for i in range(n)])
        assert d.read_sync(0, n) == b"".join(block(i % 251) for i in range(n))
        assert d.statistics()["writes"] == 1


async def test_concurrent_async_io(dev):
    async def worker(blk):
        await dev.write(blk, [block(blk)])
        assert await dev.read(blk, 1) == block(blk)

    async with trio.open_nursery() as nursery:
        for blk in range(NBLOCKS):
            nursery.start_soon(worker, blk)
    assert dev.read_sync(0, NBLOCKS) == b"".join(block(b) for b in range(NBLOCKS))
    stats = dev.statistics()
    assert stats["writes"] == stats["reads"] - 1 == NBLOCKS


async def test_read_into_mixes_host_cached_and_uncached_blocks(dev, monkeypatch):
    """read_into takes what the host page cache holds at once (RWF_NOWAIT)
    and the rest in a worker thread, resuming where the first stopped,
    also mid-buffer; both halves land in the right views."""
    data = os.urandom(16 * BLOCK_SIZE)
    dev.write_sync(10, [data])
    real = os.preadv
    calls = []

    def preadv(fd, bufs, offset, flags=0):
        calls.append(flags)
        if flags:                       # the host cache holds 5 blocks, then would block
            if len(calls) > 1:
                raise BlockingIOError(errno.EAGAIN, "would block")
            n = real(fd, bufs, offset)
            return min(n, 5 * BLOCK_SIZE)
        return real(fd, bufs, offset, flags)
    monkeypatch.setattr(os, "preadv", preadv)
    views = [memoryview(bytearray(4 * BLOCK_SIZE)) for _ in range(4)]
    before = dev.statistics()["reads"]
    await dev.read_into(10, views)
    assert b"".join(bytes(v) for v in views) == data
    nowaits = calls.index(0)                    # polled the host cache, then the thread
    assert nowaits >= 2 and set(calls[:nowaits]) == {os.RWF_NOWAIT} and not any(calls[nowaits:])
    assert dev.statistics()["reads"] == before + 1


async def test_a_cold_read_polls_the_host_cache_before_it_waits_in_a_thread(dev, monkeypatch):
    """A RWF_NOWAIT miss has started the host's I/O: read_into polls for
    the data, giving other tasks a turn between polls, and needs no worker
    thread when it lands within read_poll.  Without polling every cold 4 KiB
    read paid a thread round trip (fio randread: 1,073 IOPS median against
    2,235 with a 150 us poll, 5 alternating runs each)."""
    data = os.urandom(4 * BLOCK_SIZE)
    dev.write_sync(7, [data])
    real = os.preadv
    misses = []

    def preadv(fd, bufs, offset, flags=0):
        if flags and len(misses) < 3:           # in flight for three polls
            misses.append(offset)
            raise BlockingIOError(errno.EAGAIN, "would block")
        return real(fd, bufs, offset)

    async def no_thread(*args):
        raise AssertionError("waited in a worker thread")

    others = []

    async def another_request():
        while len(misses) < 3:
            others.append(len(misses))
            await trio.lowlevel.checkpoint()

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr("delafs.block.device.in_worker_thread", no_thread)
    dev.read_poll = 5.0
    view = memoryview(bytearray(4 * BLOCK_SIZE))
    async with trio.open_nursery() as n:
        n.start_soon(another_request)
        await dev.read_into(7, [view])
    assert bytes(view) == data and len(misses) == 3
    assert any(0 < n < 3 for n in others)       # it ran while the read polled


def refuse_nowait_reads(monkeypatch, error: OSError) -> list[int]:
    """Make every RWF_NOWAIT read raise ``error``; returns the flags of
    every preadv, in order."""
    real = os.preadv
    flags_seen = []

    def preadv(fd, bufs, offset, flags=0):
        flags_seen.append(flags)
        if flags:
            raise error
        return real(fd, bufs, offset)
    monkeypatch.setattr(os, "preadv", preadv)
    return flags_seen


async def test_a_read_the_host_cache_never_gets_in_time_waits_in_a_thread(dev, monkeypatch):
    """On a slow disk the poll gives up after read_poll and the read waits
    in a worker thread, once."""
    data = os.urandom(2 * BLOCK_SIZE)
    dev.write_sync(9, [data])
    flags_seen = refuse_nowait_reads(monkeypatch, BlockingIOError(errno.EAGAIN, "would block"))
    dev.read_poll = 0.002
    view = memoryview(bytearray(2 * BLOCK_SIZE))
    await dev.read_into(9, [view])
    assert bytes(view) == data
    assert flags_seen[0] == os.RWF_NOWAIT and flags_seen[-1] == 0 and flags_seen.count(0) == 1


async def test_read_into_on_a_host_without_nowait_reads(dev, monkeypatch):
    """A host filesystem that refuses RWF_NOWAIT (tmpfs answers EOPNOTSUPP)
    gets every read through the thread, and is not asked again."""
    data = os.urandom(4 * BLOCK_SIZE)
    dev.write_sync(3, [data])
    flags_seen = refuse_nowait_reads(monkeypatch, OSError(errno.EOPNOTSUPP, "Operation not supported"))
    for _ in range(2):
        view = memoryview(bytearray(4 * BLOCK_SIZE))
        await dev.read_into(3, [view])
        assert bytes(view) == data
    assert flags_seen == [os.RWF_NOWAIT, 0, 0]


def test_buffer_must_be_whole_blocks(dev):
    with pytest.raises(ValueError):
        dev.write_sync(0, [b"x" * 100])


def test_read_past_eof_of_truncated_image_is_eio(dev, image):
    os.truncate(image, 2 * BLOCK_SIZE)
    with pytest.raises(FsError) as exc:
        dev.read_sync(1, 2)
    assert exc.value.errno == errno.EIO


async def test_async_round_trip(dev):
    await dev.write(3, [block(7), block(8)])
    await dev.flush()
    assert await dev.read(3, 2) == block(7) + block(8)
    await dev.discard(3, 1)
    assert await dev.read(3, 2) == block(0) + block(8)


@pytest.mark.parametrize(
    "blk,count", [(-1, 1), (NBLOCKS, 1), (NBLOCKS - 1, 2), (0, NBLOCKS + 1)]
)
def test_bounds(dev, image, blk, count):
    before = os.stat(image).st_blocks
    for op in (
        lambda: dev.read_sync(blk, count),
        lambda: dev.write_sync(blk, [block(0xFF, count)]),
        lambda: dev.discard_sync(blk, count),
    ):
        with pytest.raises(FsError) as exc:
            op()
        assert exc.value.errno == errno.EIO
        assert "beyond end of device" in str(exc.value)
    assert os.stat(image).st_blocks == before
    assert dev.statistics()["writes"] == 0


def test_last_block_is_addressable(dev):
    dev.write_sync(NBLOCKS - 1, [block(9)])
    assert dev.read_sync(NBLOCKS - 1, 1) == block(9)


def test_readonly_refuses_writes(dev, image):
    dev.write_sync(0, [block(4)])
    with BlockDevice.open(image, readonly=True) as ro:
        assert ro.readonly
        assert ro.read_sync(0, 1) == block(4)
        for op in (lambda: ro.write_sync(0, [block(5)]), lambda: ro.discard_sync(0, 1)):
            with pytest.raises(FsError) as exc:
                op()
            assert exc.value.errno == errno.EROFS
    assert dev.read_sync(0, 1) == block(4)


# -- discard -----------------------------------------------------------------


def test_discard_punches_a_hole(dev, image):
    dev.write_sync(0, [block(0x55, 16)])
    dev.flush_sync()
    allocated = os.stat(image).st_blocks
    assert allocated * 512 >= 16 * BLOCK_SIZE
    dev.discard_sync(4, 8)
    assert os.stat(image).st_blocks * 512 <= allocated * 512 - 8 * BLOCK_SIZE
    assert os.stat(image).st_size == NBLOCKS * BLOCK_SIZE
    assert dev.read_sync(0, 16) == block(0x55, 4) + block(0, 8) + block(0x55, 4)


# -- fault injection -----------------------------------------------------------


def test_fault_table_is_falsy_when_empty():
    faults = FaultTable()
    assert not faults
    fid = faults.add("read")
    assert faults
    faults.remove(fid)
    assert not faults


def test_fault_range_overlap(dev):
    dev.write_sync(10, [block(1, 4)])
    dev.faults.add("write", 12, 2)
    with pytest.raises(FsError) as exc:
        dev.write_sync(8, [block(2, 5)])  # 8..12 touches 12
    assert exc.value.errno == errno.EIO
    assert "injected write error" in str(exc.value) and "block 12" in str(exc.value)
    assert dev.read_sync(10, 4) == block(1, 4)  # failed before any I/O
    dev.write_sync(8, [block(2, 4)])  # 8..11: no overlap
    dev.write_sync(14, [block(2)])  # just past the range
    with pytest.raises(FsError):
        dev.write_sync(13, [block(2, 3)])
    dev.read_sync(12, 2)  # other ops unaffected
    assert dev.faults.fired == 2
    assert dev.statistics()["injected_errors"] == 2


def test_fault_whole_device_and_errno(dev):
    dev.faults.add("read", error=errno.ENOSPC)
    for blk in (0, NBLOCKS - 1):
        with pytest.raises(FsError) as exc:
            dev.read_sync(blk, 1)
        assert exc.value.errno == errno.ENOSPC


def test_fault_open_ended_range_starts_at_start(dev):
    dev.faults.add("discard", 32)
    dev.discard_sync(0, 32)
    with pytest.raises(FsError):
        dev.discard_sync(31, 2)


def test_fault_times(dev):
    dev.faults.add("read", 0, 1, times=2)
    for _ in range(2):
        with pytest.raises(FsError):
            dev.read_sync(0, 1)
    dev.read_sync(0, 1)
    assert not dev.faults
    assert dev.faults.fired == 2


def test_fault_flush_and_removal(dev):
    fid = dev.faults.add("flush", 50, 1, error=errno.EIO)  # the range is ignored
    with pytest.raises(FsError) as exc:
        dev.flush_sync()
    assert "injected flush error" in str(exc.value)
    dev.faults.remove(fid)
    dev.flush_sync()
    dev.faults.add("flush")
    dev.faults.add("write")
    dev.faults.clear()
    dev.flush_sync()
    dev.write_sync(0, [block(1)])
    assert dev.statistics()["flushes"] == 2


def test_fault_first_matching_rule_wins(dev):
    dev.faults.add("read", 0, 4, error=errno.EIO, times=1)
    dev.faults.add("read", 0, 4, error=errno.ENODATA)
    with pytest.raises(FsError) as exc:
        dev.read_sync(1, 1)
    assert exc.value.errno == errno.EIO
    with pytest.raises(FsError) as exc:
        dev.read_sync(1, 1)
    assert exc.value.errno == errno.ENODATA


async def test_async_fault(dev):
    dev.faults.add("write", 0, 1)
    with pytest.raises(FsError):
        await dev.write(0, [block(1)])


def test_fault_bad_arguments():
    faults = FaultTable()
    for args, kw in [(("fsync",), {}), (("read", -1), {}), (("read", 0, 0), {}), (("read",), {"times": 0})]:
        with pytest.raises(ValueError):
            faults.add(*args, **kw)


# -- recorder and statistics -----------------------------------------------------


def test_recorder_events_in_order(dev):
    dev.write_sync(1, [block(1)])  # before the recorder: not recorded
    dev.recorder = Recorder()
    dev.write_sync(2, [block(2), block(3)])
    dev.flush_sync()
    dev.discard_sync(2, 1)
    dev.faults.add("write", 9, 1)
    with pytest.raises(FsError):
        dev.write_sync(9, [block(9)])  # failed: not recorded
    dev.read_sync(0, 4)  # reads are not recorded
    dev.write_sync(4, [block(4)])
    assert dev.recorder.events == [
        ("write", 2, block(2) + block(3)),
        ("flush",),
        ("discard", 2, 1),
        ("write", 4, block(4)),
    ]
    assert all(type(ev[2]) is bytes for ev in dev.recorder.events if ev[0] == "write")
    dev.recorder.clear()
    assert dev.recorder.events == []


def test_recorded_data_is_a_copy(dev):
    dev.recorder = Recorder()
    buf = bytearray(block(1))
    dev.write_sync(0, [buf])
    buf[:] = block(2)
    assert dev.recorder.events[0][2] == block(1)


def test_statistics(dev):
    dev.write_sync(0, [block(1, 3)])
    dev.write_sync(3, [block(1), block(2)])
    dev.read_sync(0, 5)
    dev.flush_sync()
    dev.discard_sync(0, 2)
    assert dev.statistics() == {
        "reads": 1,
        "writes": 2,
        "blocks_read": 5,
        "blocks_written": 5,
        "flushes": 1,
        "discards": 1,
        "injected_errors": 0,
    }


# -- locking -----------------------------------------------------------------


def test_lock_conflict_between_two_opens(image):
    with BlockDevice.open(image) as a, BlockDevice.open(image, readonly=True) as b:
        a.lock()
        with pytest.raises(FsError) as exc:
            b.lock()
        assert exc.value.errno == errno.EBUSY
        assert "in use by another delafs process" in str(exc.value)
        a.unlock()
        b.lock()


def test_lock_released_on_close(image):
    a = BlockDevice.open(image)
    a.lock()
    a.close()
    with BlockDevice.open(image) as b:
        b.lock()


def test_lock_wait_succeeds_when_holder_unlocks(image):
    with BlockDevice.open(image) as a, BlockDevice.open(image) as b:
        a.lock()
        timer = threading.Timer(0.3, a.unlock)
        timer.start()
        try:
            b.lock(wait=5.0)
        finally:
            timer.join()


def test_lock_wait_times_out(image):
    with BlockDevice.open(image) as a, BlockDevice.open(image) as b:
        a.lock()
        with pytest.raises(FsError) as exc:
            b.lock(wait=0.25)
        assert exc.value.errno == errno.EBUSY


# -- O_DIRECT and block devices ------------------------------------------------


@pytest.fixture
def disk_dir(tmp_path_factory):
    """A directory on a disk filesystem: O_DIRECT is refused by some tmpfs."""
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for base in ("/var/tmp", checkout):
        if os.path.isdir(base) and os.access(base, os.W_OK):
            break
    else:
        pytest.skip("no writable disk-backed directory")
    d = os.path.join(base, f"delafs-test-{os.getpid()}-{threading.get_ident()}")
    os.makedirs(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def open_direct(path):
    try:
        return BlockDevice.open(path, direct=True)
    except FsError as e:
        if e.errno == errno.EINVAL:
            pytest.skip(str(e))
        raise


async def test_direct_round_trip(disk_dir):
    path = os.path.join(disk_dir, "image")
    BlockDevice.create_file(path, NBLOCKS * BLOCK_SIZE)
    with open_direct(path) as d:
        assert d.direct
        # Unaligned source buffers: a slice of bytes at an odd offset.
        raw = b"?" + block(0x11) + block(0x22)
        d.write_sync(7, [memoryview(raw)[1:], bytearray(block(0x33))])
        assert d.read_sync(7, 3) == block(0x11) + block(0x22) + block(0x33)
        await d.write(20, [block(0x44)])
        await d.flush()
        assert await d.read(20, 1) == block(0x44)
    with BlockDevice.open(path) as d:
        assert d.read_sync(8, 1) == block(0x22)


def test_direct_refused_by_filesystem_is_einval(image, monkeypatch):
    """tmpfs before Linux 6.6 fails O_DIRECT opens with EINVAL; say so clearly."""
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    with pytest.raises(FsError) as exc:
        BlockDevice.open(image, direct=True)
    assert exc.value.errno == errno.EINVAL
    assert "O_DIRECT" in str(exc.value)


@pytest.fixture
def loop_device(disk_dir):
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    backing = os.path.join(disk_dir, "backing")
    BlockDevice.create_file(backing, NBLOCKS * BLOCK_SIZE)
    proc = subprocess.run(
        ["losetup", "--find", "--show", backing], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"losetup failed: {proc.stderr.strip()}")
    loop = proc.stdout.strip()
    try:
        yield loop, backing
    finally:
        subprocess.run(["losetup", "--detach", loop], check=False)


def test_loop_device(loop_device):
    loop, backing = loop_device
    with BlockDevice.open(loop) as d:
        assert d.kind == "block"
        assert d.size == NBLOCKS * BLOCK_SIZE
        assert d.nblocks == NBLOCKS
        d.lock()
        d.write_sync(2, [block(0x66, 2)])
        d.flush_sync()
        assert d.read_sync(2, 2) == block(0x66, 2)
        d.discard_sync(2, 1)  # advisory: must not raise either way
        with pytest.raises(FsError):
            d.read_sync(NBLOCKS, 1)
    with open(backing, "rb") as f:
        f.seek(3 * BLOCK_SIZE)
        assert f.read(BLOCK_SIZE) == block(0x66)


@pytest.mark.parametrize("first", ["file", "loop"])
def test_an_image_locked_one_way_is_locked_the_other(loop_device, first):
    """The image file and a loop device over it are one image: a daemon
    (or fsck) holding either must keep the other from being opened for
    writing by a second one, whichever came first.  The lock was on the
    opened node only, so two daemons wrote the same blocks."""
    loop, backing = loop_device
    paths = {"file": backing, "loop": loop}
    second = "loop" if first == "file" else "file"
    with BlockDevice.open(paths[first]) as a:
        a.lock()
        with BlockDevice.open(paths[second]) as b:
            with pytest.raises(FsError) as e:
                b.lock()
            assert e.value.errno == errno.EBUSY and "in use" in str(e.value)
    with BlockDevice.open(paths[second]) as b:
        b.lock()            # released with the first


def test_a_flush_in_flight_does_not_make_earlier_writes_look_flushed(dev, monkeypatch):
    """The journal skips its preflush when nothing is unflushed.  While
    another task's flush is still running, the writes it will cover are not
    durable yet: a commit record written then could reach the disk first."""
    dev.write_sync(5, [b"d" * BLOCK_SIZE])
    assert dev.unflushed
    started, release = threading.Event(), threading.Event()
    real = os.fdatasync

    def slow_fdatasync(fd):
        started.set()
        release.wait(10)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    t = threading.Thread(target=dev.flush_sync)
    t.start()
    try:
        assert started.wait(10)
        assert dev.unflushed, "a flush that has not finished made the write look durable"
    finally:
        release.set()
        t.join(10)
    assert not dev.unflushed
    # A write completing while a flush runs needs the next one.
    release.clear()
    started.clear()
    t = threading.Thread(target=dev.flush_sync)
    t.start()
    assert started.wait(10)
    dev.write_sync(6, [b"e" * BLOCK_SIZE])
    release.set()
    t.join(10)
    assert dev.unflushed
    dev.flush_sync()
    assert not dev.unflushed


def test_a_failed_flush_leaves_writes_unflushed(dev, monkeypatch):
    dev.write_sync(5, [b"d" * BLOCK_SIZE])

    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    with pytest.raises(FsError):
        dev.flush_sync()
    assert dev.unflushed


async def test_a_cancelled_caller_waits_for_its_device_write_to_finish(dev, monkeypatch):
    """A cancelled request never returns while the write it started in a
    worker thread may still be half-way onto the image; the write's errors
    reach the caller like any exception."""
    started, release = threading.Event(), threading.Event()
    real = dev.write_sync
    finished = []

    def slow_write(blk, bufs):
        started.set()
        release.wait(5)
        real(blk, bufs)
        finished.append(blk)

    async def writer(scope):
        with scope:
            await dev.write(3, [b"c" * BLOCK_SIZE])
        returned.append(finished[:])

    monkeypatch.setattr(dev, "write_sync", slow_write)
    returned = []
    scope = trio.CancelScope()
    async with trio.open_nursery() as n:
        n.start_soon(writer, scope)
        await trio.to_thread.run_sync(started.wait)
        scope.cancel()
        await trio.sleep(0.05)
        assert not returned                     # still waiting for its write
        release.set()
    assert returned == [[3]] and dev.read_sync(3, 1) == b"c" * BLOCK_SIZE
    monkeypatch.setattr(dev, "write_sync", real)
    dev.faults.add("write", start=5, count=1)
    with pytest.raises(FsError) as e:
        await dev.write(5, [b"d" * BLOCK_SIZE])
    assert e.value.errno == errno.EIO
    errors = await dev.submit([(5, [b"e" * BLOCK_SIZE]), (6, [b"f" * BLOCK_SIZE])])
    assert isinstance(errors[0], FsError) and errors[1] is None


async def test_a_read_the_host_cache_holds_needs_no_worker_thread(dev, monkeypatch):
    """dev.read (metadata blocks, journal replay, fsck) takes the same fast
    path as read_into: a block the host's page cache holds is read on the
    loop, not after a worker-thread round trip (185 us or more here), which
    every metadata-cache miss of a cold directory walk used to pay."""
    data = os.urandom(3 * BLOCK_SIZE)
    dev.write_sync(11, [data])
    dev.read_sync(11, 3)                        # now in the host's page cache

    async def no_thread(*args):
        raise AssertionError("waited in a worker thread")

    monkeypatch.setattr("delafs.block.device.in_worker_thread", no_thread)
    before = dev.statistics()
    assert await dev.read(11, 3) == data
    after = dev.statistics()
    assert after["reads"] == before["reads"] + 1 and after["blocks_read"] == before["blocks_read"] + 3
