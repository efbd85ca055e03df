"""Fixtures for engine tests: a formatted image, a Mount with its flusher
and committer running in a nursery, and invariant checks."""

import io

import pytest
import trio
import trio.testing

from delafs.block import BlockDevice
from delafs.fs.filesystem import Filesystem
from delafs.fs.fsck import check
from delafs.lib.errortag import ErrorTags
from delafs.testing.race import invariant_violations
from delafs.vfs.mount import Mount


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


async def read_after_crash(rig, ino, pos, size):
    """Power loss, remount, read [pos, pos+size) of ``ino``; the image must
    then unmount and check clean."""
    await rig.crash()
    m = await rig.mount()
    f = await m.open(ino, write=False)
    got = await m.read(f, pos, size)
    await rig.unmount()
    await rig.fsck()
    return got


@pytest.fixture
async def rig(tmp_path, nursery):
    r = Rig(str(tmp_path / "engine.img"), nursery)
    yield r
    if r.dev is not None:
        r.dev.close()


def check_invariants(m: Mount) -> None:
    """DESIGN.md's per-block invariants, for a quiescent filesystem: the
    race explorer's checks (delafs.testing.race.invariant_violations) with no
    operation in progress -- space identity, allocator and extent maps,
    page cache counters, no dirty block over a HOLE or past EOF, no DELALLOC
    under a clean or absent cache block (post-EOF preallocation excepted),
    reservations equal to the delalloc extents' data + indlen."""
    bad = invariant_violations(m)
    assert not bad, "\n".join(bad)

