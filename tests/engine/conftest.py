"""Fixtures for engine tests: a formatted image, a Mount with its flusher
and committer running in a nursery, and invariant checks."""

import io

import pytest
import trio
import trio.testing

from delafs.blockdev import BlockDevice
from delafs.errortag import ErrorTags
from delafs.extent_map import ExtState
from delafs.fs import Filesystem
from delafs.fsck import check
from delafs.mount import Mount
from delafs.ondisk import BLOCK_SHIFT, BLOCK_SIZE


class Rig:
    """A mounted filesystem for a test, remountable without a clean close."""

    def __init__(self, path, nursery, **opts):
        self.path = path
        self.nursery = nursery
        self.opts = opts
        self.dev = None
        self.m = None

    async def mount(self, *, format=False, size=64 << 20, log_blocks=None):
        if format:
            BlockDevice.create_file(self.path, size)
        self.dev = BlockDevice.open(self.path)
        if format:
            await Filesystem.format(self.dev, log_blocks=log_blocks)
        fs = await Filesystem.open(self.dev)
        opts = dict(self.opts)
        opts.setdefault("errortags", ErrorTags(seed=1))
        self.m = Mount(fs, **opts)
        self.scope = trio.CancelScope()

        async def background():
            with self.scope:
                async with trio.open_nursery() as n:
                    await self.m.start(n)
                    await trio.sleep_forever()
        self.nursery.start_soon(background)
        await trio.testing.wait_all_tasks_blocked()
        return self.m

    async def crash(self):
        """Stop everything without writing anything more (power loss)."""
        self.scope.cancel()
        self.m.cache.stop()
        self.dev.close()
        await trio.testing.wait_all_tasks_blocked()

    async def unmount(self):
        await self.m.unmount()
        self.scope.cancel()
        self.dev.close()
        await trio.testing.wait_all_tasks_blocked()

    async def fsck(self):
        with BlockDevice.open(self.path, readonly=True) as dev:
            out = io.StringIO()
            report = await check(dev, repair=False, out=out)
            assert report.exit_code == 0, out.getvalue()


@pytest.fixture
async def rig(tmp_path, nursery):
    r = Rig(str(tmp_path / "engine.img"), nursery)
    yield r
    if r.dev is not None:
        r.dev.close()


def check_invariants(m: Mount) -> None:
    """DESIGN.md's per-block invariants, for a quiescent filesystem."""
    fs = m.fs
    a = fs.space.alloc
    a.check()
    assert a.total == a.available + a.used + a.reserved + a.metadata_reserve
    reserved = 0
    for ino, emap in fs.emaps.items():
        emap.check()
        inode = m.inodes.get(ino)
        mapping = inode.mapping if inode else None
        pre = m.ops.prealloc_start(ino)
        for ext in emap.iter_extents(0):
            if ext.state == ExtState.DELALLOC:
                reserved += ext.length + ext.indlen
                for b in range(ext.fblock, ext.end):
                    folio = mapping.lookup(b) if mapping else None
                    dirty = folio is not None and folio.dirty_blocks(b - folio.index, 1)
                    past_eof = inode is not None and (b << BLOCK_SHIFT) >= inode.size
                    if pre is not None and b >= pre and past_eof:
                        continue            # speculative preallocation, trimmed at close
                    assert dirty, f"stale delalloc at block {b} of inode {ino}"
        if mapping:
            for folio in mapping.dirty_folios():
                for i in range(folio.nblocks):
                    if folio.dirty_blocks(i, 1):
                        st = emap.lookup(folio.index + i).state
                        assert st != ExtState.HOLE, f"dirty block {folio.index + i} of {ino} over a hole"
    # Reservations held by delalloc extents are exactly the allocator's.
    assert reserved == a.reserved, (reserved, a.reserved)

