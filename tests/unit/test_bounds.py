"""The cost bounds delafs promises, measured.

* A metadata change that touches one block costs 3 log blocks (descriptor,
  image, commit record: ``k + ceil(k / TAGS_PER_DESC) + 1`` with k = 1),
  whatever the size of the directory or file it belongs to.
* Opening an image reads a number of blocks that depends on the device size
  (superblocks, journal slots, the bitmap, fsinfo, one tree path), not on the
  number of inodes, and takes bounded time and memory.
* A lookup in a directory of N entries descends the btree: O(log N) node
  visits, not a scan.

The measured figures are printed (``pytest -s`` shows them).  The default
suite runs with 20,000 inodes/entries; the 100,000 versions are marked slow
(``--runslow``): populating them takes most of a minute.
"""

from __future__ import annotations

import statistics
import time
import tracemalloc

import pytest
import trio

from delafs.block import BLOCK_SIZE, BlockDevice
from delafs.fs.filesystem import Filesystem
from delafs.fs.items import T_EXTENT
from delafs.log.journal import log_blocks_needed
from delafs.ondisk import ROOT_INO

SMALL = 1_000
DEFAULT_BIG = 20_000
SLOW_BIG = 100_000
IMAGE_SIZE = 1 << 30          # every image the same size: the bitmap is too


def name(i: int) -> bytes:
    return b"file-%07d" % i


def no_flush(dev: BlockDevice) -> None:
    """Skip fdatasync while populating: durability is not what is measured
    here, and thousands of flushes would dominate the runtime.  ``del
    dev.flush_sync`` restores it."""
    dev.flush_sync = lambda: None


# ---------------------------------------------------------------------------
# Populated images, built once per size and shared by the tests of a module
# ---------------------------------------------------------------------------

async def _populate(path: str, n: int) -> None:
    """``n`` empty files: all in /big (the directory the lookup test uses),
    plus a handful of other directories and files around it."""
    BlockDevice.create_file(path, IMAGE_SIZE)
    with BlockDevice.open(path) as dev:
        await Filesystem.format(dev)
        fs = await Filesystem.open(dev)
        no_flush(dev)
        for i in range(4):
            d = await fs.mkdir(ROOT_INO, b"other%d" % i, 0o755)
            await fs.create(d.ino, b"x", 0o644)
        big = await fs.mkdir(ROOT_INO, b"big", 0o755)
        for i in range(n):
            await fs.create(big.ino, name(i), 0o644)
            if i % 5000 == 4999:
                await fs.commit()
        await fs.close()


class Images:
    def __init__(self, tmp_path_factory):
        self.dir = tmp_path_factory.mktemp("bounds")
        self.paths: dict[int, str] = {}

    def get(self, n: int) -> str:
        if n not in self.paths:
            path = str(self.dir / f"{n}.img")
            t = time.monotonic()
            trio.run(_populate, path, n)
            print(f"\n[populated {n} files in {time.monotonic() - t:.1f} s]")
            self.paths[n] = path
        return self.paths[n]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return Images(tmp_path_factory)


# ---------------------------------------------------------------------------
# Journal blocks per metadata change
# ---------------------------------------------------------------------------

BIG_DIR = 20_000
BIG_EXTENTS = 5_000


async def _journal_costs(path: str) -> dict:
    BlockDevice.create_file(path, 256 << 20)
    out: dict = {}
    with BlockDevice.open(path) as dev:
        await Filesystem.format(dev)
        fs = await Filesystem.open(dev)
        no_flush(dev)
        small = await fs.create(ROOT_INO, b"small", 0o644)
        await fs.pwrite(small.ino, 0, b"s" * (4 * BLOCK_SIZE))
        empty = await fs.mkdir(ROOT_INO, b"empty", 0o755)
        big = await fs.mkdir(ROOT_INO, b"bigdir", 0o755)
        for i in range(BIG_DIR):
            await fs.create(big.ino, name(i), 0o644)
            if i % 5000 == 4999:
                await fs.commit()
        frag = await fs.create(ROOT_INO, b"frag", 0o644)
        for i in range(BIG_EXTENTS):
            # Every other file block: a hole between any two, so each block
            # is an extent of its own.
            await fs.pwrite(frag.ino, 2 * i * BLOCK_SIZE, b"f" * BLOCK_SIZE)
            if i % 1000 == 999:
                await fs.commit()
        async with fs.meta_lock:
            nitems = len(await fs.tree.scan((frag.ino, T_EXTENT, 0), (frag.ino, T_EXTENT + 1, 0)))
        assert nitems == BIG_EXTENTS
        assert (await fs.getattr(big.ino)).size == BIG_DIR
        out["tree_levels"] = fs.tree.levels
        del dev.flush_sync
        await fs.sync()                      # everything home, the log empty

        j = fs.store.journal

        async def cost(op) -> tuple[int, int]:
            """(log blocks, dirty metadata blocks) of one operation + commit."""
            await fs.commit()
            b0, c0 = j.stats["log_blocks_written"], j.stats["commits"]
            await op()
            dirty = len(fs.store.dirty)
            await fs.commit()
            assert j.stats["commits"] == c0 + 1
            return j.stats["log_blocks_written"] - b0, dirty

        for label, ino in (("small file", small.ino), ("empty dir", empty.ino),
                           (f"dir of {BIG_DIR} entries", big.ino),
                           (f"file of {BIG_EXTENTS} extents", frag.ino),
                           ("root dir", ROOT_INO)):
            out[f"chmod {label}"] = await cost(lambda ino=ino: fs.setattr(ino, mode=0o600))
            out[f"utimes {label}"] = await cost(
                lambda ino=ino: fs.setattr(ino, atime=1, mtime=2))
        out["create in empty dir"] = await cost(lambda: fs.create(empty.ino, b"new", 0o644))
        # Where a name lands depends on the hash salt (a random UUID per
        # mkfs): one create may split its leaf.  The bound is about the
        # common case, so take the cheapest of three names.
        out[f"create in dir of {BIG_DIR}"] = min(
            [await cost(lambda n=n: fs.create(big.ino, n, 0o644)) for n in (b"new1", b"new2", b"new3")])
        out["rewrite a block of small file"] = await cost(
            lambda: fs.pwrite(small.ino, BLOCK_SIZE, b"t" * BLOCK_SIZE))
        out[f"rewrite a block of file of {BIG_EXTENTS} extents"] = await cost(
            lambda: fs.pwrite(frag.ino, BIG_EXTENTS * BLOCK_SIZE, b"t" * BLOCK_SIZE))
        await fs.close()
    return out


def test_one_block_change_costs_three_log_blocks(tmp_path):
    assert log_blocks_needed(1) == 3
    t = time.monotonic()
    costs = trio.run(_journal_costs, str(tmp_path / "journal.img"))
    print(f"\njournal cost per operation (log blocks, dirty metadata blocks); "
          f"tree of {costs.pop('tree_levels')} levels; built+measured in "
          f"{time.monotonic() - t:.1f} s")
    for k, v in costs.items():
        print(f"  {k:45s} {v[0]:3d} log blocks  ({v[1]} dirty)")
    # Changing one inode item dirties exactly its leaf: 1 descriptor + 1
    # image + 1 commit record, for a tiny file and a 5000-extent one alike.
    for k, (blocks, dirty) in costs.items():
        if k.startswith(("chmod", "utimes")):
            assert dirty == 1, k
            assert blocks == 3, k
    # Larger operations cost log blocks per block they dirty, not per entry
    # or extent the inode owns.
    assert costs[f"create in dir of {BIG_DIR}"][0] <= costs["create in empty dir"][0] + 2
    big_rw = costs[f"rewrite a block of file of {BIG_EXTENTS} extents"][0]
    assert big_rw <= costs["rewrite a block of small file"][0] + 2
    # And in general: one log block per dirty block, one descriptor, one commit.
    for k, (blocks, dirty) in costs.items():
        assert blocks == dirty + 2, k


# ---------------------------------------------------------------------------
# Open cost
# ---------------------------------------------------------------------------

async def _measure_open(path: str) -> dict:
    """A mount's open of a cleanly closed image: time, blocks read, memory."""
    with BlockDevice.open(path) as dev:
        t = time.perf_counter()
        fs = await Filesystem.open(dev)
        elapsed = time.perf_counter() - t
        reads = dev.statistics()["blocks_read"]
        inodes = fs.info.inode_count
        levels = fs.tree.levels
        await fs.close()
    with BlockDevice.open(path) as dev:
        tracemalloc.start()
        try:
            fs = await Filesystem.open(dev)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        await fs.close()
    return {"seconds": elapsed, "blocks_read": reads, "peak_bytes": peak,
            "inodes": inodes, "levels": levels}


def _check_open_bound(images, big_n: int) -> None:
    small = trio.run(_measure_open, images.get(SMALL))
    big = trio.run(_measure_open, images.get(big_n))
    print(f"\nopen of a {IMAGE_SIZE >> 20} MiB image:")
    for label, m in (("small", small), ("big", big)):
        print(f"  {m['inodes']:7d} inodes, {m['levels']} tree levels: {m['blocks_read']} blocks read, "
              f"{m['seconds'] * 1000:.1f} ms, tracemalloc peak {m['peak_bytes'] / 2**20:.2f} MiB")
    assert small["inodes"] >= SMALL and big["inodes"] >= big_n
    # Independent of the inode count: at most one more tree level to descend.
    assert big["blocks_read"] <= small["blocks_read"] + (big["levels"] - small["levels"]) + 1
    assert big["blocks_read"] < 64
    assert big["seconds"] < 2.0
    assert big["peak_bytes"] < 20 << 20


def test_open_cost_is_independent_of_inode_count(images):
    _check_open_bound(images, DEFAULT_BIG)


@pytest.mark.slow
def test_open_cost_with_100k_inodes(images):
    _check_open_bound(images, SLOW_BIG)


# ---------------------------------------------------------------------------
# Lookup cost
# ---------------------------------------------------------------------------

async def _measure_lookups(path: str, n: int, samples: int = 60) -> dict:
    with BlockDevice.open(path, readonly=True) as dev:
        fs = await Filesystem.open(dev)
        big = await fs.lookup(ROOT_INO, b"big")
        assert big.size == n
        await fs.lookup(big.ino, name(0))        # the directory inode is cached now
        visits, reads = [], []
        for i in range(1, n, max(1, n // samples)):
            s = fs.store.stats
            v0, m0 = s["hits"] + s["misses"], s["misses"]
            found = await fs.lookup(big.ino, name(i))
            assert found.size == 0
            visits.append(s["hits"] + s["misses"] - v0)
            reads.append(s["misses"] - m0)
        # A name that is not there costs the same descent.
        s = fs.store.stats
        v0 = s["hits"] + s["misses"]
        with pytest.raises(Exception):
            await fs.lookup(big.ino, b"absent")
        absent = s["hits"] + s["misses"] - v0
        return {"levels": fs.tree.levels, "visits": visits, "reads": reads, "absent": absent}


def _check_lookup_bound(images, big_n: int) -> None:
    small = trio.run(_measure_lookups, images.get(SMALL), SMALL)
    big = trio.run(_measure_lookups, images.get(big_n), big_n)
    print("\nnode visits per lookup (cold metadata cache, directory inode cached):")
    for n, m in ((SMALL, small), (big_n, big)):
        print(f"  dir of {n:7d} entries, tree of {m['levels']} levels: visits median "
              f"{statistics.median(m['visits'])}, mean {statistics.mean(m['visits']):.2f}, "
              f"max {max(m['visits'])}; blocks read mean {statistics.mean(m['reads']):.2f}; "
              f"absent name {m['absent']}")
    # A lookup is two descents (the entry, then the child's inode), and
    # stepping to a neighbour leaf when the entry's hash range ends a leaf.
    for m in (small, big):
        assert max(m["visits"]) <= 2 * m["levels"] + m["levels"]
    assert statistics.median(big["visits"]) <= statistics.median(small["visits"]) + 2
    assert max(big["visits"]) <= max(small["visits"]) + 3
    assert big["absent"] <= small["absent"] + 2
    # Not linear: 20x-100x the entries cost well under twice the visits.
    assert statistics.mean(big["visits"]) < 2 * statistics.mean(small["visits"])


def test_lookup_is_logarithmic(images):
    _check_lookup_bound(images, DEFAULT_BIG)


@pytest.mark.slow
def test_lookup_in_100k_entry_directory(images):
    _check_lookup_bound(images, SLOW_BIG)
