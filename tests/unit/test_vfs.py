"""The FUSE adapter's replies, driven in-process (no kernel involved): the
attributes it hands the kernel for lookups the kernel rarely sends, and
its answers to values the filesystem cannot store."""

import errno
import stat
from types import SimpleNamespace

import pyfuse3
import pytest

from delafs.block import BlockDevice
from delafs.fs.filesystem import Filesystem
from delafs.fuse.operations import Operations
from delafs.lib.errors import FsError
from delafs.ondisk import ROOT_INO
from delafs.vfs.mount import Mount


@pytest.fixture
async def ops(tmp_path, nursery):
    path = str(tmp_path / "vfs.img")
    BlockDevice.create_file(path, 32 << 20)
    dev = BlockDevice.open(path)
    await Filesystem.format(dev)
    m = Mount(await Filesystem.open(dev))
    await m.start(nursery)
    yield Operations(m)
    m.cache.stop()
    dev.close()


CTX = SimpleNamespace(uid=0, gid=0, pid=0, umask=0o022)


async def test_lookups_that_reach_the_root_report_generation_zero(ops):
    """The kernel insists that the root's generation is 0 ("fuse: root
    generation should be zero"); a lookup of "." in the root or of ".."
    in a top-level directory (NFS export, open_by_handle_at) returns the
    root's attributes."""
    sub = await ops.mkdir(ROOT_INO, b"sub", 0o755, CTX)
    assert sub.generation != 0
    dot = await ops.lookup(ROOT_INO, b".", CTX)
    dotdot = await ops.lookup(sub.st_ino, b"..", CTX)
    root = await ops.getattr(ROOT_INO, CTX)
    assert (dot.st_ino, dotdot.st_ino) == (ROOT_INO, ROOT_INO)
    assert (dot.generation, dotdot.generation, root.generation) == (0, 0, 0)


async def test_out_of_range_times_are_clamped_and_change_nothing_else(ops):
    e = await ops.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, 0, CTX)
    ino = e[1].st_ino
    attr = pyfuse3.EntryAttributes()
    attr.st_mtime_ns = 17_000_000_000 * 10**9          # year 2508
    attr.st_atime_ns = -2**70
    fields = SimpleNamespace(update_size=False, update_mode=False, update_uid=False,
                             update_gid=False, update_atime=True, update_mtime=True,
                             update_ctime=False)
    got = await ops.setattr(ino, attr, fields, None, CTX)
    assert got.st_mtime_ns == 2**63 - 1
    assert got.st_atime_ns == -2**63
    assert not ops.fs.shutdown
    again = await ops.getattr(ino, CTX)
    assert (again.st_mtime_ns, again.st_atime_ns) == (2**63 - 1, -2**63)


async def test_link_count_limit_is_emlink_not_a_shutdown(ops, monkeypatch):
    import delafs.fs.dir as fsmod
    e = await ops.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, 0, CTX)
    ino = e[1].st_ino
    monkeypatch.setattr(fsmod, "LINK_MAX", 3, raising=False)
    await ops.link(ino, ROOT_INO, b"g", CTX)
    await ops.link(ino, ROOT_INO, b"h", CTX)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.link(ino, ROOT_INO, b"i", CTX)
    assert exc.value.errno == errno.EMLINK
    assert not ops.fs.shutdown
    assert (await ops.getattr(ino, CTX)).st_nlink == 3


async def test_a_readdir_that_fails_midway_counts_only_the_entries_the_kernel_gets(ops, monkeypatch):
    """READDIRPLUS entries count as lookups once the kernel has them.  A
    batch that failed after earlier ones filled part of the reply turned
    the whole request into an error: the kernel dropped the entries, the
    daemon had counted them, and an inode it counted that way was never
    forgotten (an unlinked one kept its blocks until the next mount).  The
    reply now ends with what it has; the next READDIR reports the error."""
    d = await ops.mkdir(ROOT_INO, b"d", 0o755, CTX)
    for i in range(40):
        await ops.create(d.st_ino, b"f%02d" % i, stat.S_IFREG | 0o644, 0, CTX)
    created = dict(ops.lookups)
    fh = await ops.opendir(d.st_ino, CTX)
    real = ops.fs.readdir_plus
    calls = []

    async def only_the_first_batch_reads(dir_ino, cookie, limit):
        calls.append(cookie)
        if cookie:
            raise FsError(errno.EIO, "injected: a damaged directory block")
        return await real(dir_ino, cookie, limit)

    monkeypatch.setattr(ops.fs, "readdir_plus", only_the_first_batch_reads)
    listed = []
    monkeypatch.setattr(pyfuse3, "readdir_reply",
                        lambda token, name, attr, nxt: listed.append((name, nxt)) or True)
    await ops.readdir(fh, 0, None)              # a partial listing, not EIO
    assert len(calls) == 2 and len(listed) == 2 + 32, (calls, len(listed))
    counted = {ino: n - created.get(ino, 0) for ino, n in ops.lookups.items()
               if n != created.get(ino, 0)}
    assert sum(counted.values()) == 32, counted
    with pytest.raises(pyfuse3.FUSEError) as e:  # where it stopped: the error now
        await ops.readdir(fh, listed[-1][1], None)
    assert e.value.errno == errno.EIO
