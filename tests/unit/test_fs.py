"""The filesystem layer through its Python API: POSIX semantics, errors,
space accounting, orphans, and reopening without a clean close."""

import errno
import os
import stat

import pytest

from delafs.block import BlockDevice
from delafs.fs import RENAME_EXCHANGE, RENAME_NOREPLACE, XATTR_CREATE, XATTR_REPLACE, Filesystem
from delafs.fs.fsck import check
from delafs.lib.errors import CorruptionError, FsError
from delafs.testing.crashsim import sparse_copy

ROOT = 1


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "fs.img")
    BlockDevice.create_file(path, 32 << 20)
    return path


async def fresh(path, **kw):
    dev = BlockDevice.open(path)
    await Filesystem.format(dev, log_blocks=kw.pop("log_blocks", None))
    return dev, await Filesystem.open(dev, **kw)


async def reopen(dev, fs=None, *, clean=False):
    """Drop every in-memory structure (optionally unmounting cleanly first)."""
    if clean and fs is not None:
        await fs.close()
    path = dev.path
    dev.close()
    dev = BlockDevice.open(path)
    return dev, await Filesystem.open(dev)


async def assert_files_survive_reopen(dev, d, n):
    """Reopen without a clean close; files 0000.. of ``d`` hold their number."""
    dev, fs = await reopen(dev)
    for i in range(n):
        f = await fs.lookup(d.ino, b"%04d" % i)
        assert await fs.pread(f.ino, 0, 10) == b"%d" % i
    await fs.close()
    await fsck_clean(dev)


async def fsck_clean(dev):
    import io
    out = io.StringIO()
    report = await check(dev, repair=False, out=out)
    assert report.exit_code == 0, out.getvalue()


def err(e):
    return e.value.errno


async def test_names_and_errors(image):
    dev, fs = await fresh(image)
    d = await fs.mkdir(ROOT, b"d", 0o755)
    f = await fs.create(d.ino, b"f", 0o644)
    with pytest.raises(FsError) as e:
        await fs.create(d.ino, b"f", 0o644)
    assert err(e) == errno.EEXIST
    with pytest.raises(FsError) as e:
        await fs.lookup(d.ino, b"missing")
    assert err(e) == errno.ENOENT
    with pytest.raises(FsError) as e:
        await fs.create(d.ino, b"x" * 256, 0o644)
    assert err(e) == errno.ENAMETOOLONG
    for bad in (b"a/b", b"a\0b", b".", b"..", b""):
        with pytest.raises(FsError) as e:
            await fs.create(d.ino, bad, 0o644)
        assert err(e) == errno.EINVAL
    with pytest.raises(FsError) as e:
        await fs.create(f.ino, b"g", 0o644)
    assert err(e) == errno.ENOTDIR
    with pytest.raises(FsError) as e:
        await fs.rmdir(ROOT, b"d")
    assert err(e) == errno.ENOTEMPTY
    with pytest.raises(FsError) as e:
        await fs.unlink(ROOT, b"d")
    assert err(e) == errno.EISDIR
    with pytest.raises(FsError) as e:
        await fs.rmdir(d.ino, b"f")
    assert err(e) == errno.ENOTDIR
    # Every byte but NUL and '/' is a valid name byte.
    odd = bytes(range(1, 256)).replace(b"/", b"")[:255]
    o = await fs.create(ROOT, odd, 0o600)
    assert (await fs.lookup(ROOT, odd)).ino == o.ino
    await fs.close()
    await fsck_clean(dev)


async def test_link_counts_and_types(image):
    dev, fs = await fresh(image)
    a = await fs.mkdir(ROOT, b"a", 0o755)
    b = await fs.mkdir(a.ino, b"b", 0o700)
    assert (await fs.getattr(a.ino)).nlink == 3
    assert (await fs.getattr(ROOT)).nlink == 3
    f = await fs.create(b.ino, b"f", 0o644)
    await fs.link(f.ino, a.ino, b"f2")
    assert (await fs.getattr(f.ino)).nlink == 2
    with pytest.raises(FsError) as e:
        await fs.link(a.ino, ROOT, b"dirlink")
    assert err(e) == errno.EPERM
    fifo = await fs.create(ROOT, b"fifo", stat.S_IFIFO | 0o600)
    dev_node = await fs.create(ROOT, b"null", stat.S_IFCHR | 0o666, rdev=0x103)
    assert stat.S_ISFIFO(fifo.mode) and (await fs.getattr(dev_node.ino)).rdev == 0x103
    s = await fs.symlink(ROOT, b"long", b"x" * 3000)
    s2 = await fs.symlink(ROOT, b"short", b"a/b/f")
    dev, fs = await reopen(dev, fs, clean=True)
    assert await fs.readlink(s.ino) == b"x" * 3000
    assert await fs.readlink(s2.ino) == b"a/b/f"
    names = sorted(n for n, *_ in await fs.readdir(ROOT))
    assert names == [b"a", b"fifo", b"long", b"null", b"short"]
    await fs.unlink(b.ino, b"f")
    assert (await fs.getattr(f.ino)).nlink == 1
    await fs.rmdir(a.ino, b"b")
    assert (await fs.getattr(a.ino)).nlink == 2
    await fs.close()
    await fsck_clean(dev)


async def test_rename_semantics(image):
    dev, fs = await fresh(image)
    a = await fs.mkdir(ROOT, b"a", 0o755)
    b = await fs.mkdir(ROOT, b"b", 0o755)
    x = await fs.create(a.ino, b"x", 0o644)
    y = await fs.create(b.ino, b"y", 0o644)
    await fs.rename(a.ino, b"x", b.ino, b"y")          # replaces y
    assert (await fs.lookup(b.ino, b"y")).ino == x.ino
    with pytest.raises(FsError):
        await fs.getattr(y.ino)                          # y was freed
    z = await fs.create(a.ino, b"z", 0o644)
    with pytest.raises(FsError) as e:
        await fs.rename(a.ino, b"z", b.ino, b"y", RENAME_NOREPLACE)
    assert err(e) == errno.EEXIST
    await fs.rename(a.ino, b"z", b.ino, b"y", RENAME_EXCHANGE)
    assert (await fs.lookup(b.ino, b"y")).ino == z.ino
    assert (await fs.lookup(a.ino, b"z")).ino == x.ino
    # Directory moves keep link counts and refuse cycles.
    sub = await fs.mkdir(a.ino, b"sub", 0o755)
    await fs.rename(a.ino, b"sub", b.ino, b"sub")
    assert (await fs.getattr(a.ino)).nlink == 2
    assert (await fs.getattr(b.ino)).nlink == 3
    assert (await fs.getattr(sub.ino)).parent == b.ino
    with pytest.raises(FsError) as e:
        await fs.rename(ROOT, b"b", sub.ino, b"loop")
    assert err(e) == errno.EINVAL
    with pytest.raises(FsError) as e:
        await fs.rename(b.ino, b"y", ROOT, b"a")          # file over a directory
    assert err(e) == errno.EISDIR
    await fs.close()
    await fsck_clean(dev)


async def test_xattrs(image):
    dev, fs = await fresh(image)
    f = await fs.create(ROOT, b"f", 0o644)
    await fs.setxattr(f.ino, b"user.small", b"v")
    await fs.setxattr(f.ino, b"user.big", bytes(range(256)) * 256)      # 64 KiB
    with pytest.raises(FsError) as e:
        await fs.setxattr(f.ino, b"user.small", b"w", XATTR_CREATE)
    assert err(e) == errno.EEXIST
    with pytest.raises(FsError) as e:
        await fs.setxattr(f.ino, b"user.none", b"w", XATTR_REPLACE)
    assert err(e) == errno.ENODATA
    with pytest.raises(FsError) as e:
        await fs.setxattr(f.ino, b"user.huge", b"x" * 65537)
    assert err(e) == errno.E2BIG
    with pytest.raises(FsError) as e:
        await fs.getxattr(f.ino, b"user.none")
    assert err(e) == errno.ENODATA
    used = fs.space.alloc.used
    await fs.setxattr(f.ino, b"user.big", b"short now")                 # frees its blocks
    await fs.sync()                                     # busy until checkpointed
    assert fs.space.alloc.used < used
    dev, fs = await reopen(dev)
    assert sorted(await fs.listxattr(f.ino)) == [b"user.big", b"user.small"]
    assert await fs.getxattr(f.ino, b"user.big") == b"short now"
    await fs.removexattr(f.ino, b"user.small")
    assert await fs.listxattr(f.ino) == [b"user.big"]
    await fs.close()
    await fsck_clean(dev)


async def test_xattr_names_cached_by_a_miss_follow_every_change(image):
    """getxattr answers a miss from the inode's cached names without the
    tree (the kernel asks for security.capability before every write):
    every later set, replace and remove must still be seen at once."""
    dev, fs = await fresh(image)
    f = await fs.create(ROOT, b"f", 0o644)

    async def missing(name):
        with pytest.raises(FsError) as e:
            await fs.getxattr(f.ino, name)
        assert err(e) == errno.ENODATA, e.value
        return True

    assert await missing(b"security.capability")          # lists and caches: none
    await fs.setxattr(f.ino, b"security.capability", b"cap")
    assert await fs.getxattr(f.ino, b"security.capability") == b"cap"
    assert await missing(b"user.other")
    await fs.setxattr(f.ino, b"user.other", b"x" * 5000)   # out of line
    assert await fs.getxattr(f.ino, b"user.other") == b"x" * 5000
    await fs.removexattr(f.ino, b"security.capability")
    assert await missing(b"security.capability")
    assert await fs.listxattr(f.ino) == [b"user.other"]
    await fs.sync()
    dev, fs = await reopen(dev)
    assert await missing(b"security.capability")
    assert await fs.getxattr(f.ino, b"user.other") == b"x" * 5000
    await fs.close()
    await fsck_clean(dev)


async def test_a_new_inode_knows_it_has_no_xattrs(image, monkeypatch):
    """A file this filesystem just created has no xattrs unless it was
    created with some (inherited ACLs): the GETXATTR(security.capability)
    before its first write is answered without a tree scan, and names set
    at creation are still found."""
    dev, fs = await fresh(image)
    acl = b"\x02\x00\x00\x00" + b"\x01\x00\x06\x00\xff\xff\xff\xff"
    inherited = await fs.create(ROOT, b"acl", 0o644, xattrs={b"system.posix_acl_access": acl})
    plain = await fs.create(ROOT, b"f", 0o644)
    d = await fs.mkdir(ROOT, b"d", 0o755)
    scans = []
    real_scan = fs.tree.scan

    async def counted(*args, **kwargs):
        scans.append(args)
        return await real_scan(*args, **kwargs)

    monkeypatch.setattr(fs.tree, "scan", counted)
    for ino in (plain.ino, d.ino):
        with pytest.raises(FsError) as e:
            await fs.getxattr(ino, b"security.capability")
        assert err(e) == errno.ENODATA
    assert scans == []
    assert await fs.getxattr(inherited.ino, b"system.posix_acl_access") == acl
    await fs.close()
    await fsck_clean(dev)


async def test_data_extents_and_truncate(image):
    dev, fs = await fresh(image)
    f = await fs.create(ROOT, b"f", 0o644)
    await fs.pwrite(f.ino, 0, b"a" * 10000)
    await fs.pwrite(f.ino, 5, b"XY")                  # partial-block overwrite
    await fs.pwrite(f.ino, 1 << 20, b"tail")          # leaves a hole
    assert await fs.pread(f.ino, 0, 8) == b"aaaaaXYa"
    assert await fs.pread(f.ino, 500000, 4) == bytes(4)
    exts = await fs.map_blocks(f.ino, 0, 257)
    assert [e.state.name for e in exts] == ["WRITTEN", "HOLE", "WRITTEN"]
    await fs.truncate(f.ino, 4097)
    assert (await fs.getattr(f.ino)).size == 4097
    await fs.truncate(f.ino, 20000)                   # grow: the old tail reads as zeros
    assert await fs.pread(f.ino, 4096, 3) == b"a" + bytes(2)
    with pytest.raises(FsError) as e:
        await fs.pwrite(f.ino, 1 << 52, b"x")
    assert err(e) == errno.EFBIG
    dev, fs = await reopen(dev, fs, clean=True)
    assert (await fs.getattr(f.ino)).blocks == 2
    await fs.close()
    await fsck_clean(dev)


async def test_enospc_changes_nothing_and_space_returns(image):
    dev, fs = await fresh(image)
    initial = fs.statfs()["bfree"]
    files = []
    with pytest.raises(FsError) as e:
        for i in range(10000):
            f = await fs.create(ROOT, b"f%d" % i, 0o644)
            files.append(f.ino)
            await fs.pwrite(f.ino, 0, b"x" * (1 << 20))
    assert err(e) == errno.ENOSPC
    assert not fs.shutdown
    fs.space.alloc.check()
    # The failed write left nothing behind but the empty file it was given.
    last = await fs.getattr(files[-1])
    assert last.size == 0 and last.blocks == 0
    await fs.commit()
    dev, fs = await reopen(dev)
    for i in range(len(files)):
        await fs.unlink(ROOT, b"f%d" % i)
    await fs.sync()
    assert fs.statfs()["bfree"] == initial
    dev, fs = await reopen(dev, fs, clean=True)
    assert fs.statfs()["bfree"] == initial
    await fs.close()
    await fsck_clean(dev)


async def test_orphan_survives_crash_and_is_reaped(image):
    dev, fs = await fresh(image)
    f = await fs.create(ROOT, b"f", 0o644)
    await fs.pwrite(f.ino, 0, b"z" * 100000)
    fs.open_ref(f.ino)
    await fs.unlink(ROOT, b"f")
    assert await fs.pread(f.ino, 0, 3) == b"zzz"      # still readable while open
    await fs.commit()
    free_before = fs.statfs()["bfree"]
    dev, fs = await reopen(dev)                        # crash with the file open
    assert fs.stats["orphans_recovered"] == 1
    with pytest.raises(FsError):
        await fs.getattr(f.ino)
    assert fs.statfs()["bfree"] > free_before
    await fs.close()
    await fsck_clean(dev)


async def test_truncate_cut_short_by_a_crash_is_finished_at_mount(image, tmp_path):
    """A shrinking truncate of a file with many extents logs the new size,
    then frees the blocks past it in batches, rolling the transaction in
    between.  A crash after a roll leaves the small size with WRITTEN
    extents past it: growing the file would read the old data back, and
    nothing would ever free those blocks.  The truncate puts the inode on
    the orphan list for its duration (as ext4 does), so the next mount
    finishes it."""
    nblocks = 2048
    dev, fs = await fresh(image)
    f = await fs.create(ROOT, b"f", 0o644)
    await fs.pwrite(f.ino, 0, b"S" * (nblocks * 4096))
    for b in range(1, nblocks, 2):      # 1024 extents: many batches of the punch
        await fs.punch_hole(f.ino, b, 1)
    await fs.sync()
    # Earlier work still in the running transaction, near the roll bound.
    fs.store.dirty_roll = 8
    i = 0
    while len(fs.store.dirty) < 8:
        await fs.mkdir(ROOT, b"d%d" % i, 0o755)
        i += 1
    crash = str(tmp_path / "crash.img")
    commit_locked = fs.store.commit_locked

    async def power_cut_after_first_roll():
        seq = await commit_locked()
        if not os.path.exists(crash):
            sparse_copy(image, crash)
        return seq

    fs.store.commit_locked = power_cut_after_first_roll
    await fs.truncate(f.ino, 0)
    await fs.close()
    dev.close()
    assert os.path.exists(crash), "the truncate never rolled: the setup no longer reaches the bug"

    # What the crash left is a state recovery finishes, not damage.
    dev = BlockDevice.open(crash)
    await fsck_clean(dev)
    dev.close()
    with BlockDevice.open(crash, readonly=True) as rdev:
        rfs = await Filesystem.open(rdev)
        left = (await rfs.getattr(f.ino)).blocks
        free_at_crash = rfs.statfs()["bfree"]
    assert left, "the crash image holds no blocks past EOF: the setup no longer reaches the bug"

    dev = BlockDevice.open(crash)
    fs = await Filesystem.open(dev)
    a = await fs.getattr(f.ino)
    assert (a.size, a.blocks) == (0, 0)
    assert [e for e in await fs.map_blocks(f.ino, 0, nblocks) if e.state.name != "HOLE"] == []
    assert fs.statfs()["bfree"] >= free_at_crash + left
    await fs.truncate(f.ino, nblocks * 4096)
    assert await fs.pread(f.ino, 0, nblocks * 4096) == bytes(nblocks * 4096)
    await fs.close()
    await fsck_clean(dev)
    dev.close()


async def test_truncate_of_an_open_unlinked_file_keeps_its_orphan_record(image):
    """An orphan's record is already there when it is truncated: the
    truncate must neither add it twice nor take it away."""
    dev, fs = await fresh(image)
    f = await fs.create(ROOT, b"f", 0o644)
    await fs.pwrite(f.ino, 0, b"z" * (400 * 4096))
    for b in range(1, 400, 2):
        await fs.punch_hole(f.ino, b, 1)
    fs.open_ref(f.ino)
    await fs.unlink(ROOT, b"f")
    await fs.truncate(f.ino, 4096)
    await fs.commit()
    dev, fs = await reopen(dev)                        # crash with the file open
    assert fs.stats["orphans_recovered"] == 1
    with pytest.raises(FsError):
        await fs.getattr(f.ino)
    await fs.close()
    await fsck_clean(dev)


async def test_reopen_without_clean_close_keeps_committed(image):
    dev, fs = await fresh(image)
    d = await fs.mkdir(ROOT, b"d", 0o755)
    for i in range(300):
        f = await fs.create(d.ino, b"%04d" % i, 0o644)
        await fs.pwrite(f.ino, 0, b"%d" % i)
    await fs.commit()
    await fs.create(d.ino, b"uncommitted", 0o644)      # may or may not survive
    await assert_files_survive_reopen(dev, d, 300)


async def test_readonly_open_writes_nothing(image):
    dev, fs = await fresh(image)
    await fs.create(ROOT, b"f", 0o644)
    await fs.commit()                                   # in the log, not checkpointed
    dev.close()
    dev = BlockDevice.open(image, readonly=True)
    fs = await Filesystem.open(dev)
    assert fs.readonly
    assert (await fs.lookup(ROOT, b"f")).size == 0       # journal applied in memory
    with pytest.raises(FsError) as e:
        await fs.create(ROOT, b"g", 0o644)
    assert err(e) == errno.EROFS
    assert dev.statistics()["writes"] == 0


async def test_readdir_cookies_stable_under_changes(image):
    dev, fs = await fresh(image)
    d = await fs.mkdir(ROOT, b"d", 0o755)
    for i in range(500):
        await fs.create(d.ino, b"n%03d" % i, 0o644)
    first = await fs.readdir(d.ino, 0, 100)
    cookie = first[-1][3]
    seen = {n for n, *_ in first}
    # Remove names already returned and add new ones: the cookie still resumes
    # exactly after the last returned entry, and no old name repeats.
    for name in list(seen)[:50]:
        await fs.unlink(d.ino, name)
    for i in range(100):
        await fs.create(d.ino, b"new%03d" % i, 0o644)
    rest = await fs.readdir(d.ino, cookie, 10000)
    assert not ({n for n, *_ in rest} & seen)
    old = {b"n%03d" % i for i in range(500)} - seen
    assert old <= {n for n, *_ in rest}
    assert all(0 < c < 2**63 for *_, c in first + rest)
    await fs.close()


async def test_rename_whiteout(image):
    from delafs.fs import RENAME_WHITEOUT
    dev, fs = await fresh(image)
    d = await fs.mkdir(ROOT, b"d", 0o755)
    f = await fs.create(d.ino, b"f", 0o644)
    await fs.rename(d.ino, b"f", ROOT, b"g", RENAME_WHITEOUT, uid=7, gid=8)
    assert (await fs.lookup(ROOT, b"g")).ino == f.ino
    wo = await fs.lookup(d.ino, b"f")
    assert stat.S_ISCHR(wo.mode) and wo.rdev == 0 and (wo.uid, wo.gid) == (7, 8)
    for bad in (RENAME_WHITEOUT | RENAME_EXCHANGE, 8):
        with pytest.raises(FsError) as e:
            await fs.rename(ROOT, b"g", d.ino, b"h", bad)
        assert err(e) == errno.EINVAL
    dev, fs = await reopen(dev, fs, clean=True)
    assert stat.S_ISCHR((await fs.lookup(d.ino, b"f")).mode)
    await fsck_clean(dev)
    dev.close()


async def test_committed_images_waiting_for_a_checkpoint_stay_bounded(image):
    # Issue 11's memory target: the log alone let durable images pile up
    # in memory to three quarters of the journal (up to 96 MiB).
    dev, fs = await fresh(image, log_blocks=2048)   # room for far more than 16
    fs.store.pending_blocks = 16
    checkpoints = fs.store.journal.stats["checkpoints"]
    most = 0
    d = await fs.mkdir(ROOT, b"d", 0o755)
    for i in range(600):
        f = await fs.create(d.ino, b"%04d" % i, 0o644)
        await fs.pwrite(f.ino, 0, b"%d" % i)
        if i % 20 == 19:
            await fs.commit()
            most = max(most, len(fs.store.pending))
    assert fs.store.journal.stats["checkpoints"] > checkpoints
    assert most <= 16 + 20, most                 # the bound plus one transaction
    await assert_files_survive_reopen(dev, d, 600)   # recovery after those checkpoints


async def test_the_running_transaction_rolls_before_its_dirty_blocks_pile_up(image):
    # Issue 11's memory target: a dirty block stays decoded (~18 KiB for a
    # full extent leaf) until it commits, and rolling only at an eighth of
    # the log let the sparse job hold 2,674 of them (~60 MiB then) at once.
    dev, fs = await fresh(image, log_blocks=2048)   # an eighth of the log: 256
    fs.store.dirty_roll = 16
    commits = fs.store.stats["commits"]
    most = 0
    d = await fs.mkdir(ROOT, b"d", 0o755)
    for i in range(600):
        f = await fs.create(d.ino, b"%04d" % i, 0o644)
        await fs.pwrite(f.ino, 0, b"%d" % i)
        most = max(most, len(fs.store.dirty))
    assert most <= 16 + 8, most                  # the bound plus what one operation dirties
    assert fs.store.stats["commits"] > commits
    await fs.commit()
    await assert_files_survive_reopen(dev, d, 600)   # the rolled commits recover in order


async def test_inode_cache_eviction_looks_only_at_the_oldest_inodes(image):
    # Once more than inode_cache_size inodes were cached, every operation
    # listed all of them to pick its few victims: creating 100k files in a
    # directory fell to ~700/s in process (py-spy: 40 % of samples there).
    from collections import OrderedDict

    class CountingCache(OrderedDict):
        looked_at = 0

        def __iter__(self):
            for key in OrderedDict.__iter__(self):
                CountingCache.looked_at += 1
                yield key

    dev, fs = await fresh(image)
    fs.inode_cache_size = 50
    for i in range(400):
        await fs.create(ROOT, b"f%d" % i, 0o644)
    await fs.commit()                            # their times are in the tree
    fs.inodes = CountingCache(fs.inodes)
    for i in range(20):
        await fs.create(ROOT, b"g%d" % i, 0o644)
    assert len(fs.inodes) <= 50 + 1
    assert CountingCache.looked_at < 20 * 10, CountingCache.looked_at
    await fs.close()
    await fsck_clean(dev)


async def _extent_items(fs, ino):
    from delafs.fs.items import T_EXTENT, decode_extent
    async with fs.transaction(write=False):
        items = await fs.tree.scan((ino, T_EXTENT, 0), (ino, T_EXTENT + 1, 0))
    return [(k[2],) + decode_extent(v)[:3] for k, v in items]


def _wanted_items(emap):
    from delafs.fs.bmap import _STATE_TO_DISK
    from delafs.fs.items import MAX_EXTENT_LEN
    out = []
    for e in emap.iter_extents():
        if e.state in _STATE_TO_DISK:
            f, p, n = e.fblock, e.pblock, e.length
            while n:
                k = min(n, MAX_EXTENT_LEN)
                out.append((f, p, k, _STATE_TO_DISK[e.state]))
                f, p, n = f + k, p + k, n - k
    return out


async def test_an_extent_conversion_rewrites_only_the_items_it_changes(image, monkeypatch):
    """Converting one UNWRITTEN extent to WRITTEN changes one item's value
    in place: the neighbouring items the range touches are left alone
    (rewriting them dirtied their leaves and cost a delete and an insert
    each), and nothing is deleted and inserted again."""
    from delafs.fs.items import EXTENT_ITEM_SIZE
    dev, fs = await fresh(image)
    f = await fs.create(ROOT, b"f", 0o644)
    await fs.truncate(f.ino, 16 * 4096)     # WRITTEN blocks past EOF would be fsck errors
    await fs.allocate(f.ino, 0, 4)
    await fs.allocate(f.ino, 6, 4)
    await fs.allocate(f.ino, 12, 4)
    calls = []
    for name in ("insert", "update", "delete"):
        real = getattr(fs.tree, name)

        async def counted(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            return await _real(*a, **kw)
        monkeypatch.setattr(fs.tree, name, counted)
    async with fs.transaction(items=3, item_size=EXTENT_ITEM_SIZE):
        emap = await fs.extent_map(f.ino)
        await fs.convert_unwritten(f.ino, emap, 6, 4)
    assert calls == ["update"]
    monkeypatch.undo()
    items = await _extent_items(fs, f.ino)
    assert [(i[0], i[2]) for i in items] == [(0, 4), (6, 4), (12, 4)]
    assert items == _wanted_items(fs.emaps[f.ino])
    await fs.close()
    await fsck_clean(dev)


async def test_extent_items_follow_the_map_through_random_changes(image):
    """Whatever sync_extents skips, the tree's extent items stay exactly
    the map's on-disk extents: allocations, partial conversions (which
    split and merge extents) and punches at random."""
    import random

    from delafs.fs.items import EXTENT_ITEM_SIZE
    rng = random.Random(11)
    dev, fs = await fresh(image)
    f = await fs.create(ROOT, b"f", 0o644)
    await fs.truncate(f.ino, 224 * 4096)    # WRITTEN blocks past EOF would be fsck errors
    for step in range(300):
        a = rng.randrange(0, 200)
        n = rng.randrange(1, 24)
        op = rng.random()
        if op < 0.4:
            await fs.allocate(f.ino, a, n)
        elif op < 0.8:
            async with fs.transaction(items=2 * n + 2, item_size=EXTENT_ITEM_SIZE):
                await fs.convert_unwritten(f.ino, await fs.extent_map(f.ino), a, n)
        else:
            await fs.punch_hole(f.ino, a, n)
        assert await _extent_items(fs, f.ino) == _wanted_items(fs.emaps[f.ino]), step
    dev, fs = await reopen(dev, fs, clean=True)
    emap = None
    async with fs.transaction(write=False):
        emap = await fs.extent_map(f.ino)
    assert await _extent_items(fs, f.ino) == _wanted_items(emap)
    await fs.close()
    await fsck_clean(dev)


async def test_readdir_plus_gives_each_entry_its_inode_in_one_transaction(image):
    """What READDIRPLUS needs: the names after a cookie with their inodes,
    read under one transaction for the whole batch (not one per entry),
    resuming where the batch ended."""
    dev, fs = await fresh(image)
    d = await fs.mkdir(ROOT, b"d", 0o755)
    made = {}
    for i in range(40):
        made[b"f%02d" % i] = await fs.create(d.ino, b"f%02d" % i, 0o600 + i % 8)
    await fs.mkdir(d.ino, b"sub", 0o700)
    ops = fs.stats["ops"]
    first = await fs.readdir_plus(d.ino, 0, 32)
    assert fs.stats["ops"] == ops + 1
    assert len(first) == 32
    rest = await fs.readdir_plus(d.ino, first[-1][3], 32)
    assert len(rest) == 9
    assert [e[:4] for e in first + rest] == await fs.readdir(d.ino, 0, 100)
    for name, ino, dtype, _, inode in first + rest:
        assert inode == await fs.getattr(ino)
        assert dtype == stat.S_IFMT(inode.mode) >> 12
        if name in made:
            assert inode.mode == made[name].mode
    # A copy: changing it changes nothing cached.
    first[0][4].mode = 0
    assert (await fs.getattr(first[0][1])).mode != 0
    # An inode whose type disagrees with its entry is listed with the error.
    async with fs.transaction(write=False):
        cached = await fs.iget(made[b"f03"].ino)
    cached.mode = stat.S_IFDIR | 0o755
    bad = {e[0]: e[4] for e in await fs.readdir_plus(d.ino, 0, 100)}
    assert isinstance(bad[b"f03"], CorruptionError) and "disagrees" in str(bad[b"f03"])
    assert not any(isinstance(v, Exception) for k, v in bad.items() if k != b"f03")
    cached.mode = stat.S_IFREG | 0o603
    await fs.close()


async def test_a_failed_log_write_inside_an_operation_shuts_the_filesystem_down(image):
    """A transaction frozen for the log and then not written leaves a hole
    in the log's sequence: a later commit written where recovery expects
    the lost one is never replayed, and a later checkpoint writes it home
    without the lost one's blocks.  Only Filesystem.commit shut down on a
    failed log write; the roll at an operation's end (and the checkpoint a
    short reservation forces) did not, so every later fsync reported
    success for changes a crash would lose."""
    from delafs.lib.errortag import ErrorTags
    dev, fs = await fresh(image, log_blocks=256)
    tags = ErrorTags(seed=1)
    fs.attach_errortags(tags)
    fs.store.dirty_roll = 8
    d = await fs.mkdir(ROOT, b"d", 0o755)
    await fs.commit()
    tags.set("log_eio", 1)
    with pytest.raises(FsError):
        for i in range(2000):
            await fs.create(d.ino, b"%05d" % i, 0o644)
    tags.set("log_eio", 0)
    assert fs.shutdown, "a failed log write must stop the filesystem"
    with pytest.raises(FsError) as e:
        await fs.create(d.ino, b"after", 0o644)
    assert e.value.errno == errno.EIO
    with pytest.raises(FsError):
        await fs.commit()
    dev, fs = await reopen(dev)
    report = await check(dev, repair=False)
    assert report.exit_code == 0
    dev.close()


async def test_timestamps_of_many_inodes_commit_in_rolled_transactions(image):
    """The timestamps stamped in memory since the last commit (atime of a
    first read under relatime, mtime of writes) were logged in one
    transaction with no roll: with a few thousand of them it outgrew half
    the log (EFBIG), the commit failed, and nothing shut down, so the
    commits after it were not durable."""
    dev, fs = await fresh(image, log_blocks=256)
    d = await fs.mkdir(ROOT, b"d", 0o755)
    inos = []
    for i in range(6000):
        inos.append((await fs.create(d.ino, b"%05d" % i, 0o644)).ino)
        if i % 200 == 199:
            await fs.commit()
    await fs.commit()
    for ino in inos:
        await fs.update_atime(ino, strict=True)
    await fs.commit()
    assert not fs.shutdown
    await fs.create(d.ino, b"after", 0o644)
    await fs.commit()
    dev, fs = await reopen(dev)
    assert (await fs.lookup(d.ino, b"after")).ino
    dev.close()


async def test_a_time_stamped_while_its_inode_is_logged_is_not_lost(image):
    """log_inode awaits the tree update, which may read a node from the
    device; a write(2) stamping mtime meanwhile (file_update_time takes no
    lock) must leave the inode dirty, as I_DIRTY_SYNC set after the copy
    for writeback does.  It was marked clean after the await: no commit
    wrote the new times and a remount showed the old mtime."""
    dev, fs = await fresh(image)
    f = await fs.create(ROOT, b"f", 0o644)
    await fs.sync()
    real_update = fs.tree.update
    stamped = {}

    async def update_while_a_write_stamps(key, data):
        # Where the update would wait for a node read, a write(2) lands.
        await fs.file_update_time(f.ino)
        stamped["mtime"] = fs.inodes[f.ino].mtime
        return await real_update(key, data)

    fs.tree.update = update_while_a_write_stamps
    try:
        await fs.setattr(f.ino, mode=0o600)
    finally:
        fs.tree.update = real_update
    assert f.ino in fs.dirty_times
    dev, fs = await reopen(dev, fs, clean=True)
    got = await fs.getattr(f.ino)
    assert (got.mtime, got.mode & 0o777) == (stamped["mtime"], 0o600)
    await fs.close()
