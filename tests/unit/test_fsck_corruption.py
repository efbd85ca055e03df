"""fsck and the library against damaged images.

A small populated image is built once per module (files with multi-block
data, directories, a small and a large (out-of-line) xattr, a symlink, two
fragmented files and a 200-entry directory, so that inode items, directory
entries and extents each fill leaves of their own).  Every test damages a
sparse copy of it in one place and checks that

* the real ``delafs fsck`` command exits with e2fsck's code (0 clean,
  1 repaired, 4 left uncorrected, 8 operational) and names the damaged
  structure and its block, and
* the library (``Filesystem.open`` plus an operation touching the damage)
  raises a DelafsError (CorruptionError where a block fails verification)
  with the same information: never another exception type, never garbage.
"""

from __future__ import annotations

import io
import random
import shutil
import stat
import subprocess
import sys

import pytest
import trio

from delafs.block import BLOCK_SIZE, BlockDevice
from delafs.fs.btree import Node
from delafs.fs.filesystem import Filesystem
from delafs.fs.fsck import check
from delafs.fs.items import (
    T_DIRENT,
    T_EXTENT,
    T_INODE,
    T_ORPHAN,
    T_SYMLINK,
    decode_dirent,
    dirent_range,
    name_hash,
)
from delafs.lib.errors import CorruptionError, DelafsError, NotDelafsError
from delafs.log import journal as journal_log
from delafs.log.journal import TAGS_OFF
from delafs.ondisk import (
    HDR_SIZE,
    MAGIC_BITMAP,
    ROOT_INO,
    FsInfo,
    Superblock,
    decode_bitmap,
    encode_bitmap,
    unseal,
)
from delafs.testing.crashsim import sparse_copy
from delafs.testing.damage import flip, leaf_holding, read_sb, reseal_node, tree_leaves, zero_block

IMAGE_SIZE = 64 << 20
CLI = [sys.executable, "-m", "delafs.cli"]
NFRAG = 300          # blocks (= extents) in each of the two fragmented files
NMANY = 400          # entries in /many: several leaves of entries only


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def delafs(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real command; stdout and stderr kept apart."""
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout)


def output(r: subprocess.CompletedProcess) -> str:
    return r.stdout + r.stderr


def assert_no_traceback(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stderr, r.stderr


def leaf_of_only(path: str, oid_pred, typ: int) -> Node:
    """A leaf all of whose items have type ``typ`` and an objectid passing
    ``oid_pred`` (so damaging it touches exactly that kind of item)."""
    for leaf in tree_leaves(path):
        if leaf.keys and all(k[1] == typ and oid_pred(k[0]) for k in leaf.keys):
            return leaf
    raise AssertionError(f"no leaf holding only items of type {typ}")


def data_pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def run_check(path: str, *, repair: bool):
    out = io.StringIO()
    with BlockDevice.open(path, readonly=not repair) as dev:
        report = await check(dev, repair=repair, out=out)
    return report, out.getvalue()


# ---------------------------------------------------------------------------
# The populated image
# ---------------------------------------------------------------------------

async def _populate(path: str) -> dict:
    BlockDevice.create_file(path, IMAGE_SIZE)
    exp: dict = {}
    with BlockDevice.open(path) as dev:
        await Filesystem.format(dev)
        fs = await Filesystem.open(dev)
        d = await fs.mkdir(ROOT_INO, b"dir", 0o755)
        f = await fs.create(d.ino, b"file", 0o644)
        exp["file_data"] = data_pattern(1, 5 * BLOCK_SIZE + 100)
        await fs.pwrite(f.ino, 0, exp["file_data"])
        exp["small_xattr"] = b"small value"
        exp["big_xattr"] = data_pattern(2, 2000)        # > 512: out of line
        await fs.setxattr(f.ino, b"user.small", exp["small_xattr"])
        await fs.setxattr(f.ino, b"user.big", exp["big_xattr"])
        await fs.symlink(ROOT_INO, b"link", b"dir/file")
        many = await fs.mkdir(ROOT_INO, b"many", 0o755)
        await fs.commit()
        # Two files written block by block in turn: neither can grow in
        # place, so each gets NFRAG single-block extents.
        fa = await fs.create(ROOT_INO, b"fa", 0o644)
        fb = await fs.create(ROOT_INO, b"fb", 0o644)
        for i in range(NFRAG):
            await fs.pwrite(fa.ino, i * BLOCK_SIZE, bytes([i % 251 + 1]) * BLOCK_SIZE)
            await fs.pwrite(fb.ino, i * BLOCK_SIZE, bytes([i % 241 + 2]) * BLOCK_SIZE)
        names = {}
        for i in range(NMANY):
            name = b"n%03d" % i
            names[name] = (await fs.create(many.ino, name, 0o644)).ino
        async with fs.meta_lock:
            emap = await fs.extent_map(fa.ino)
        assert len(list(emap.iter_extents(0))) == NFRAG
        await fs.close()
    exp.update(dir=d.ino, file=f.ino, many=many.ino, fa=fa.ino, fb=fb.ino,
               names=names, first_many_ino=min(names.values()))
    return exp


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pristine") / "pristine.img")
    exp = trio.run(_populate, path)
    r = delafs("fsck", "-n", path)
    assert r.returncode == 0, output(r)
    return path, exp


@pytest.fixture
def img(pristine, tmp_path):
    """A private sparse copy of the populated image, and what it holds."""
    src, exp = pristine
    path = str(tmp_path / "img")
    sparse_copy(src, path)
    return path, exp


async def verify_contents(path: str, exp: dict) -> None:
    """Everything the image was populated with reads back intact."""
    with BlockDevice.open(path, readonly=True) as dev:
        fs = await Filesystem.open(dev)
        d = await fs.lookup(ROOT_INO, b"dir")
        f = await fs.lookup(d.ino, b"file")
        assert await fs.pread(f.ino, 0, 1 << 20) == exp["file_data"]
        assert await fs.getxattr(f.ino, b"user.small") == exp["small_xattr"]
        assert await fs.getxattr(f.ino, b"user.big") == exp["big_xattr"]
        lnk = await fs.lookup(ROOT_INO, b"link")
        assert stat.S_ISLNK(lnk.mode)
        assert await fs.readlink(lnk.ino) == b"dir/file"
        for name, byte0, ino in ((b"fa", 1, exp["fa"]), (b"fb", 2, exp["fb"])):
            assert (await fs.lookup(ROOT_INO, name)).ino == ino
            data = await fs.pread(ino, 0, NFRAG * BLOCK_SIZE)
            mod = 251 if name == b"fa" else 241
            assert data == b"".join(bytes([i % mod + byte0]) * BLOCK_SIZE for i in range(NFRAG))
        ents = []
        cookie = 0
        while True:
            batch = await fs.readdir(exp["many"], cookie)
            if not batch:
                break
            ents.extend(batch)
            cookie = batch[-1][3]
        assert {n: i for n, i, _, _ in ents} == exp["names"]


def assert_fsck_clean(path: str) -> None:
    for flag in ("-n", "-y"):
        r = delafs("fsck", flag, path)
        assert r.returncode == 0, f"fsck {flag}: {output(r)}"
        assert_no_traceback(r)


def assert_fsck_finds_and_repairs(path: str, message: str) -> None:
    """fsck -n reports ``message`` and exits 4; -y repairs it (exit 1,
    saying the same); then the image checks clean."""
    r = delafs("fsck", "-n", path)
    assert r.returncode == 4, output(r)
    assert message in output(r)
    r = delafs("fsck", "-y", path)
    assert r.returncode == 1, output(r)
    assert_no_traceback(r)
    assert message in output(r)
    assert_fsck_clean(path)


# ---------------------------------------------------------------------------
# Superblocks
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [40, 0], ids=["checksum", "magic"])
@pytest.mark.parametrize("which", ["primary", "secondary"])
async def test_one_bad_superblock_copy_is_repaired(img, which, offset):
    path, exp = img
    sb = read_sb(path)
    blk = 0 if which == "primary" else sb.sb2_block
    flip(path, blk, offset)      # a checksummed field (the uuid), or the magic

    r = delafs("fsck", "-n", path)
    assert r.returncode == 4, output(r)
    assert "superblock" in output(r) and f"block {blk}" in output(r)

    r = delafs("fsck", "-y", path)
    assert r.returncode == 1, output(r)
    assert_no_traceback(r)
    assert "superblock" in output(r) and f"block {blk}" in output(r)
    assert_fsck_clean(path)
    with BlockDevice.open(path, readonly=True) as dev:
        a, b = dev.read_sync(0, 1), dev.read_sync(sb.sb2_block, 1)
    assert a == b
    await verify_contents(path, exp)


@pytest.mark.parametrize("slot", [0, 1])
async def test_one_bad_journal_slot_is_reported_and_rewritten(img, slot):
    """The other slot still works, but a second failure would leave an
    image that cannot mount: fsck -n reports it, -y rewrites it."""
    path, exp = img
    sb = read_sb(path)
    blk = sb.journal_start + slot
    flip(path, blk, 100)
    r = delafs("fsck", "-n", path)
    assert r.returncode == 4 and f"journal superblock at block {blk}" in output(r), output(r)
    r = delafs("fsck", "-y", path)
    assert r.returncode == 1 and f"journal superblock slot at block {blk} rewritten" in r.stdout, output(r)
    assert_fsck_clean(path)
    with BlockDevice.open(path, readonly=True) as dev:
        scan = await journal_log.scan(dev, sb)
    assert not scan.bad_slots
    await verify_contents(path, exp)


async def test_library_opens_with_one_bad_superblock_copy(img):
    path, exp = img
    flip(path, 0, 40)
    await verify_contents(path, exp)     # falls back to the secondary copy


async def test_both_superblocks_bad(img):
    path, _ = img
    sb = read_sb(path)
    flip(path, 0, 40)
    flip(path, sb.sb2_block, 40)
    for flag in ("-n", "-y"):
        r = delafs("fsck", flag, path)
        assert r.returncode in (4, 8), output(r)
        assert_no_traceback(r)
        text = output(r)
        assert "superblock" in text
        assert "block 0" in text and f"block {sb.sb2_block}" in text, text
    with BlockDevice.open(path, readonly=True) as dev:
        with pytest.raises(CorruptionError, match="superblock"):
            await Filesystem.open(dev)


# ---------------------------------------------------------------------------
# The journal
# ---------------------------------------------------------------------------

async def _crash_with_log(path: str) -> None:
    """Commit three transactions and crash: nothing checkpointed."""
    with BlockDevice.open(path) as dev:
        fs = await Filesystem.open(dev)
        j1 = await fs.create(ROOT_INO, b"j1", 0o644)
        await fs.pwrite(j1.ino, 0, b"j1 data" * 100)
        await fs.commit()
        await fs.mkdir(ROOT_INO, b"j2", 0o755)
        await fs.commit()
        await fs.setxattr(ROOT_INO, b"user.j3", b"three")
        await fs.commit()
        # Crash: the device goes away without close() (no checkpoint).


async def _log_txns(path: str):
    with BlockDevice.open(path, readonly=True) as dev:
        sb = Superblock.decode(dev.read_sync(0, 1), 0, dev.nblocks)
        res = await journal_log.scan(dev, sb)
    return sb, res


@pytest.fixture
async def crashed(img):
    path, exp = img
    await _crash_with_log(path)
    sb, res = await _log_txns(path)
    assert len(res.txns) == 3, res
    # Baseline: a log of committed transactions is not an error.
    r = delafs("fsck", "-n", path)
    assert r.returncode == 0, output(r)
    return path, exp, sb, res


def _first_txn_block(sb, res, part: str) -> tuple[int, int]:
    """(block, byte offset) to damage in the FIRST logged transaction."""
    t = res.txns[0]

    def blk(i: int) -> int:                       # the log is circular
        return sb.log_start + (t.pos + i) % sb.log_blocks
    if part == "descriptor":
        return blk(0), TAGS_OFF + 3               # inside the first tag
    if part == "data block":
        return blk(1), 1000                       # the first block image
    return blk(t.length - 1), TAGS_OFF + 1        # commit record


@pytest.mark.parametrize("part", ["descriptor", "data block", "commit record"])
async def test_damaged_journal_record_is_corruption_not_torn_tail(crashed, part):
    path, _, sb, res = crashed
    blk, off = _first_txn_block(sb, res, part)
    flip(path, blk, off)
    r = delafs("fsck", "-n", path)
    assert r.returncode == 4, output(r)
    assert_no_traceback(r)
    text = output(r)
    assert "journal" in text and f"block {blk}" in text, text
    assert "not a torn write" in text
    # The library's scan agrees (fsck's view).
    with BlockDevice.open(path, readonly=True) as dev:
        scan = await journal_log.scan(dev, sb, look_past_end=True)
    assert scan.corruption is not None and scan.corruption.block == blk


async def test_torn_last_transaction_is_not_an_error(crashed):
    """The control case: damage in the LAST transaction is indistinguishable
    from a torn write, so fsck ignores it (recovery stops there)."""
    path, _, sb, res = crashed
    t = res.txns[-1]
    flip(path, sb.log_start + (t.pos + t.length - 1) % sb.log_blocks, TAGS_OFF + 1)
    r = delafs("fsck", "-n", path)
    assert r.returncode == 0, output(r)


async def test_library_open_refuses_damaged_journal(crashed):
    path, _, sb, res = crashed
    blk, off = _first_txn_block(sb, res, "data block")
    flip(path, blk, off)
    for readonly in (True, False):
        with BlockDevice.open(path, readonly=readonly) as dev:
            with pytest.raises(CorruptionError, match="journal"):
                fs = await Filesystem.open(dev)
                # If it did open, the committed work of transactions 2 and 3
                # is gone without a word:
                await fs.lookup(ROOT_INO, b"j2")


async def test_recovery_never_replays_stale_transactions(crashed):
    path, _, sb, res = crashed
    blk, off = _first_txn_block(sb, res, "data block")
    flip(path, blk, off)
    with BlockDevice.open(path) as dev:
        try:
            fs = await Filesystem.open(dev)
        except CorruptionError:
            return              # refusing the damaged log is a correct answer
        k = await fs.create(ROOT_INO, b"k1", 0o644)
        await fs.pwrite(k.ino, 0, b"k1 data" * 100)
        await fs.commit()       # durable: must survive the crash below
        # crash
    with BlockDevice.open(path, readonly=True) as dev:
        fs = await Filesystem.open(dev)
        names = {n for n, _, _, _ in await fs.readdir(ROOT_INO)}
        assert b"k1" in names, f"committed file lost; root holds {sorted(names)}"
        assert not names & {b"j1", b"j2"}, f"stale transactions replayed: {sorted(names)}"


async def test_a_lost_last_transaction_rolls_back_to_intact_data(img):
    """A committed transaction freed a file's blocks; before its checkpoint
    its log record is damaged, and recovery rolls back past it (it must: a
    damaged last record looks like a torn one).  The file is back, and its
    blocks must still hold its data: blocks a transaction freed are neither
    reused nor discarded until that transaction is written home."""
    path, exp = img
    with BlockDevice.open(path) as dev:
        fs = await Filesystem.open(dev)
        d = await fs.lookup(ROOT_INO, b"dir")
        f = await fs.lookup(d.ino, b"file")
        await fs.truncate(f.ino, 0)
        await fs.commit()
        new = await fs.create(ROOT_INO, b"new", 0o644)
        await fs.pwrite(new.ino, 0, b"N" * len(exp["file_data"]))     # may take the freed blocks
        # Crash: the new file's metadata is not committed, nothing checkpointed.
    sb, res = await _log_txns(path)
    t = res.txns[-1]
    flip(path, sb.log_start + (t.pos + t.length - 1) % sb.log_blocks, TAGS_OFF + 1)
    with BlockDevice.open(path) as dev:
        fs = await Filesystem.open(dev)
        d = await fs.lookup(ROOT_INO, b"dir")
        f = await fs.lookup(d.ino, b"file")
        assert f.size == len(exp["file_data"]), "the truncate should have been rolled back"
        assert await fs.pread(f.ino, 0, 1 << 20) == exp["file_data"]
        await fs.close()


# ---------------------------------------------------------------------------
# Btree leaves
# ---------------------------------------------------------------------------

def _inode_leaf(path, exp):
    first = exp["first_many_ino"]
    return leaf_of_only(path, lambda oid: oid >= first, T_INODE)


def _dirent_leaf(path, exp):
    return leaf_of_only(path, lambda oid: oid == exp["many"], T_DIRENT)


def _extent_leaf(path, exp):
    return leaf_of_only(path, lambda oid: oid == exp["fa"], T_EXTENT)


async def _touch_inode_leaf(fs, exp, leaf):
    ino = leaf.keys[len(leaf.keys) // 2][0]
    name = next(n for n, i in exp["names"].items() if i == ino)
    await fs.lookup(exp["many"], name)


async def _touch_dirent_leaf(fs, exp, leaf):
    _, _, name = decode_dirent(leaf.vals[0])
    await fs.lookup(exp["many"], name)


async def _touch_extent_leaf(fs, exp, leaf):
    await fs.pread(exp["fa"], 0, NFRAG * BLOCK_SIZE)


LEAVES = {
    "inode": (_inode_leaf, _touch_inode_leaf),
    "directory entry": (_dirent_leaf, _touch_dirent_leaf),
    "extent": (_extent_leaf, _touch_extent_leaf),
}


@pytest.mark.parametrize("kind", list(LEAVES))
@pytest.mark.parametrize("where", ["value", "item header"])
async def test_damaged_leaf(img, kind, where):
    path, exp = img
    find, touch = LEAVES[kind]
    leaf = find(path, exp)
    blk = leaf.blocknr
    # Values are packed from the end of the block down; the item directory
    # (key, value offset, length) follows the header.
    flip(path, blk, BLOCK_SIZE - 3 if where == "value" else HDR_SIZE + 21 + 9)

    r = delafs("fsck", "-n", path)
    assert r.returncode == 4, output(r)
    assert_no_traceback(r)
    assert f"btree node at block {blk}" in output(r), output(r)

    # The library: the open succeeds (the damage is off its path) and the
    # first operation touching the leaf fails with a CorruptionError naming it.
    with BlockDevice.open(path, readonly=True) as dev:
        fs = await Filesystem.open(dev)
        with pytest.raises(CorruptionError) as ei:
            await touch(fs, exp, leaf)
        assert ei.value.structure == "btree node" and ei.value.block == blk
        assert f"btree node at block {blk}" in str(ei.value)
        # Operations elsewhere keep working.
        d = await fs.lookup(ROOT_INO, b"dir")
        f = await fs.lookup(d.ino, b"file")
        assert await fs.pread(f.ino, 0, 1 << 20) == exp["file_data"]


async def test_damaged_leaf_read_write_open(img):
    """A read-write open: the failing lookup changes nothing and shuts
    nothing down; the image is no worse afterwards."""
    path, exp = img
    leaf = _dirent_leaf(path, exp)
    flip(path, leaf.blocknr, BLOCK_SIZE - 3)
    with BlockDevice.open(path) as dev:
        fs = await Filesystem.open(dev)
        with pytest.raises(CorruptionError, match=f"btree node at block {leaf.blocknr}"):
            await _touch_dirent_leaf(fs, exp, leaf)
        # The listing skips the damaged leaf: the other entries remain.
        listed = {n for n, _, _, _ in await fs.readdir(exp["many"], 0, 10_000)}
        assert listed < set(exp["names"]) and len(listed) >= len(exp["names"]) - len(leaf.keys)
        assert fs.shutdown is None
        await fs.close()
    r = delafs("fsck", "-n", path)
    assert r.returncode == 4 and f"btree node at block {leaf.blocknr}" in output(r)


async def test_fsck_yes_rebuilds_the_tree_around_a_damaged_extent_leaf(img):
    """-y salvages what is reachable, rebuilds the tree and leaves an image
    fsck -n calls clean; the files whose extents the leaf held lose those
    extents (holes), every other file reads as before."""
    path, exp = img
    leaf = _extent_leaf(path, exp)
    flip(path, leaf.blocknr, BLOCK_SIZE - 3)
    r = delafs("fsck", "-y", path)
    assert r.returncode == 1, output(r)
    assert_no_traceback(r)
    assert f"btree node at block {leaf.blocknr}" in output(r) and "B+tree rebuilt" in r.stdout
    assert_fsck_clean(path)
    with BlockDevice.open(path, readonly=True) as dev:
        fs = await Filesystem.open(dev)
        d = await fs.lookup(ROOT_INO, b"dir")
        f = await fs.lookup(d.ino, b"file")
        assert await fs.pread(f.ino, 0, 1 << 20) == exp["file_data"]


async def test_fsck_yes_drops_only_entries_of_inodes_lost_with_a_damaged_leaf(img):
    """A leaf holding only (whole) inodes is lost: -y drops the entries
    naming them and nothing else; every other name stays."""
    path, exp = img
    leaf = _inode_leaf(path, exp)
    lost = {k[0] for k in leaf.keys}
    flip(path, leaf.blocknr, BLOCK_SIZE - 3)
    r = delafs("fsck", "-y", path)
    assert r.returncode == 1, output(r)
    assert_fsck_clean(path)
    with BlockDevice.open(path, readonly=True) as dev:
        fs = await Filesystem.open(dev)
        names = set()
        cookie = 0
        while batch := await fs.readdir(exp["many"], cookie):
            names.update(n for n, _, _, _ in batch)
            cookie = batch[-1][3]
    assert names == {n for n, ino in exp["names"].items() if ino not in lost}


async def test_fsck_yes_remakes_an_inode_whose_other_items_survive(img):
    """The leaf holding fa's inode item is lost but most of its extents
    live in other leaves: -y makes the inode anew (a regular file, as its
    entry says, sized by its extents) so the surviving data stays reachable."""
    path, exp = img
    leaf = leaf_holding(path, (exp["fa"], T_INODE, 0))
    zero_block(path, leaf.blocknr)
    r = delafs("fsck", "-y", path)
    assert r.returncode == 1, output(r)
    assert f"inode {exp['fa']} was lost: made anew as a regular file" in r.stdout, r.stdout
    assert_fsck_clean(path)
    with BlockDevice.open(path, readonly=True) as dev:
        fs = await Filesystem.open(dev)
        fa = await fs.lookup(ROOT_INO, b"fa")
        assert stat.S_ISREG(fa.mode) and fa.size == NFRAG * BLOCK_SIZE
        last = NFRAG - 1
        assert await fs.pread(fa.ino, last * BLOCK_SIZE, BLOCK_SIZE) == bytes([last % 251 + 1]) * BLOCK_SIZE


def _bad_inode_record(node):
    v = bytearray(node.vals[0])
    v[0:2] = (7).to_bytes(2, "little")          # record version 7
    node.vals[0] = bytes(v)


def _bad_extent_record(node):
    v = bytearray(node.vals[0])
    v[12] = 9                                    # state 9: neither 2 nor 3
    node.vals[0] = bytes(v)


def _bad_dirent_record(node):
    node.vals[0] = node.vals[0][:5]              # shorter than (ino, type)


RECORDS = {
    # kind: (find the leaf, damage its item 0, what the error message names)
    "inode": (_inode_leaf, _bad_inode_record, "inode"),
    "extent": (_extent_leaf, _bad_extent_record, "extent record"),
    "dirent": (_dirent_leaf, _bad_dirent_record, "directory entry"),
}


async def _touch_first_item(fs, exp, leaf, kind):
    if kind == "inode":
        ino = leaf.keys[0][0]
        name = next(n for n, i in exp["names"].items() if i == ino)
        await fs.lookup(exp["many"], name)
    elif kind == "extent":
        await fs.pread(exp["fa"], 0, NFRAG * BLOCK_SIZE)
    else:
        # Listing skips a damaged leaf; a lookup of one of its names fails.
        off = leaf.keys[0][2]
        name = next(n for n in exp["names"] if dirent_range(name_hash(n, fs.salt))[0] <= off
                    < dirent_range(name_hash(n, fs.salt))[1])
        await fs.lookup(exp["many"], name)


@pytest.mark.parametrize("kind", list(RECORDS))
async def test_bad_item_record_in_a_valid_leaf(img, kind):
    path, exp = img
    find, damage, what = RECORDS[kind]
    leaf = find(path, exp)
    reseal_node(path, leaf.blocknr, damage)
    r = delafs("fsck", "-n", path)
    assert r.returncode == 4, output(r)
    assert_no_traceback(r)
    assert f"corrupt {what}" in output(r) and f"block {leaf.blocknr}" in output(r), output(r)
    with BlockDevice.open(path, readonly=True) as dev:
        fs = await Filesystem.open(dev)
        # The reader checks every item of a leaf it loads: the leaf is corrupt.
        with pytest.raises(CorruptionError, match=f"corrupt btree node at block {leaf.blocknr}: item"):
            await _touch_first_item(fs, exp, leaf, kind)


@pytest.mark.parametrize("kind", list(RECORDS))
async def test_bad_item_record_error_names_its_leaf(img, kind):
    path, exp = img
    find, damage, what = RECORDS[kind]
    leaf = find(path, exp)
    reseal_node(path, leaf.blocknr, damage)
    with BlockDevice.open(path, readonly=True) as dev:
        fs = await Filesystem.open(dev)
        with pytest.raises(CorruptionError) as ei:
            await _touch_first_item(fs, exp, leaf, kind)
    assert ei.value.block == leaf.blocknr, str(ei.value)


async def test_damaged_internal_node(img):
    path, exp = img
    with BlockDevice.open(path, readonly=True) as dev:
        sb = Superblock.decode(dev.read_sync(0, 1), 0, dev.nblocks)
        info = FsInfo.decode(dev.read_sync(sb.fsinfo_block, 1), sb.fsinfo_block)
    assert info.root_level >= 1
    flip(path, info.root_block, HDR_SIZE + 5)
    r = delafs("fsck", "-n", path)
    assert r.returncode == 4, output(r)
    assert f"btree node at block {info.root_block}" in output(r)
    with BlockDevice.open(path, readonly=True) as dev:
        with pytest.raises(CorruptionError, match=f"btree node at block {info.root_block}"):
            fs = await Filesystem.open(dev)
            await fs.lookup(ROOT_INO, b"dir")


# ---------------------------------------------------------------------------
# Bitmap and fsinfo
# ---------------------------------------------------------------------------

async def test_damaged_bitmap_block(img):
    path, _ = img
    sb = read_sb(path)
    blk = sb.bitmap_start
    flip(path, blk, HDR_SIZE + 100)
    r = delafs("fsck", "-n", path)
    assert r.returncode == 4, output(r)
    assert_no_traceback(r)
    assert f"bitmap block at block {blk}" in output(r), output(r)
    for readonly in (True, False):
        with BlockDevice.open(path, readonly=readonly) as dev:
            with pytest.raises(CorruptionError, match=f"bitmap block at block {blk}"):
                await Filesystem.open(dev)


async def test_bitmap_marking_the_fixed_layout_free_is_corruption(img):
    """A bitmap block resealed with a bit of the journal cleared: a valid
    checksum over content no allocator may trust.  Mount refuses it naming
    the block (it was a ValueError from the allocator), fsck -y rebuilds."""
    path, exp = img
    sb = read_sb(path)
    blk = sb.bitmap_start
    with BlockDevice.open(path) as dev:
        bits = decode_bitmap(dev.read_sync(blk, 1), blk)
        bits[0] &= ~(1 << 5)                      # block 5: the journal's log
        dev.write_sync(blk, [encode_bitmap(bits[:BLOCK_SIZE - HDR_SIZE], blk, 0)])
        dev.flush_sync()
    with BlockDevice.open(path, readonly=True) as dev:
        with pytest.raises(CorruptionError, match=f"bitmap block at block {blk}: block 5 of the fixed layout"):
            await Filesystem.open(dev)
    r = delafs("fsck", "-y", path)
    assert r.returncode == 1, output(r)
    assert_fsck_clean(path)
    await verify_contents(path, exp)


async def test_entry_redirected_to_an_inode_of_another_type_is_corruption(img):
    """An entry of /many resealed to name the directory /dir: its recorded
    type (a regular file) disagrees with the inode's, so lookup answers
    EIO instead of handing a directory out under a file's name."""
    path, exp = img
    leaf = _dirent_leaf(path, exp)

    def redirect(node):
        ino, dtype, name = decode_dirent(node.vals[0])
        node.vals[0] = exp["dir"].to_bytes(8, "little") + node.vals[0][8:]
    reseal_node(path, leaf.blocknr, redirect)
    name = decode_dirent(leaf.vals[0])[2]
    with BlockDevice.open(path, readonly=True) as dev:
        fs = await Filesystem.open(dev)
        with pytest.raises(CorruptionError, match=f"entry {name!r} is of type 8, inode {exp['dir']} of type 4"):
            await fs.lookup(exp["many"], name)


async def test_symlink_target_cut_short_is_corruption(img):
    """A symlink's inline target resealed 3 bytes shorter is well formed by
    itself; its inode's size tells: readlink answers EIO, not a target."""
    path, exp = img
    with BlockDevice.open(path, readonly=True) as dev:
        fs = await Filesystem.open(dev)
        ino = (await fs.lookup(ROOT_INO, b"link")).ino
    leaf = leaf_holding(path, (ino, T_SYMLINK, 0))
    i = leaf.keys.index((ino, T_SYMLINK, 0))

    def cut(node):
        node.vals[i] = node.vals[i][:-3]
    reseal_node(path, leaf.blocknr, cut)
    with BlockDevice.open(path, readonly=True) as dev:
        fs = await Filesystem.open(dev)
        with pytest.raises(CorruptionError, match=f"symlink {ino}: target of 5 bytes, the inode says 8"):
            await fs.readlink(ino)


async def test_fsck_yes_rebuilds_damaged_bitmap_block(img):
    path, exp = img
    sb = read_sb(path)
    flip(path, sb.bitmap_start, HDR_SIZE + 100)
    r = delafs("fsck", "-y", path)
    assert r.returncode == 1, output(r)
    assert_fsck_clean(path)
    await verify_contents(path, exp)


async def test_damaged_fsinfo_block(img):
    path, exp = img
    sb = read_sb(path)
    blk = sb.fsinfo_block
    flip(path, blk, HDR_SIZE + 2)
    with BlockDevice.open(path, readonly=True) as dev:
        with pytest.raises(CorruptionError, match=f"fsinfo block at block {blk}"):
            await Filesystem.open(dev)
    for flag, code in (("-n", 4), ("-y", 1)):
        r = delafs("fsck", flag, path)
        assert r.returncode == code, output(r)
        assert_no_traceback(r)
        assert f"fsinfo block at block {blk}" in output(r), output(r)
    # -y found the tree's leaves and rebuilt the fsinfo: nothing is lost.
    assert_fsck_clean(path)
    await verify_contents(path, exp)


async def test_library_report_matches_cli(img):
    """fsck.check's Report carries the same diagnosis as the command."""
    path, exp = img
    leaf = _inode_leaf(path, exp)
    flip(path, leaf.blocknr, BLOCK_SIZE - 3)
    report, text = await run_check(path, repair=False)
    assert report.exit_code == 4
    assert any(f"btree node at block {leaf.blocknr}" in e for e in report.errors)
    assert f"btree node at block {leaf.blocknr}" in text


# ---------------------------------------------------------------------------
# Not a delafs image at all
# ---------------------------------------------------------------------------

def _random_image(tmp_path) -> str:
    path = str(tmp_path / "random.img")
    with open(path, "wb") as f:
        f.write(random.Random(7).randbytes(8 << 20))
    return path


def _ext4_image(tmp_path) -> str:
    mkfs = shutil.which("mkfs.ext4")
    if mkfs is None:
        pytest.skip("mkfs.ext4 not installed")
    path = str(tmp_path / "ext4.img")
    subprocess.run([mkfs, "-q", "-F", path, "8M"], check=True, capture_output=True)
    return path


def _zero_image(tmp_path) -> str:
    path = str(tmp_path / "zero.img")
    BlockDevice.create_file(path, 8 << 20)
    return path


@pytest.mark.parametrize("make", [_random_image, _ext4_image, _zero_image],
                         ids=["random", "ext4", "zeros"])
async def test_not_a_delafs_image(tmp_path, make):
    path = make(tmp_path)
    before = open(path, "rb").read()
    for flag in ("-n", "-y", None):
        r = delafs("fsck", *([flag] if flag else []), path)
        assert r.returncode == 8, output(r)
        assert_no_traceback(r)
        assert "not a delafs image" in output(r), output(r)
    assert open(path, "rb").read() == before          # fsck wrote nothing
    for readonly in (True, False):
        with BlockDevice.open(path, readonly=readonly) as dev:
            with pytest.raises(NotDelafsError, match="not a delafs image"):
                await Filesystem.open(dev)


@pytest.mark.parametrize("size", [0, 100, BLOCK_SIZE])
async def test_truncated_image(tmp_path, size):
    """Too short to hold even a superblock: an operational error, cleanly."""
    path = str(tmp_path / "short.img")
    with open(path, "wb") as f:
        f.write(b"\0" * size)
    r = delafs("fsck", "-n", path)
    assert r.returncode == 8, output(r)
    assert_no_traceback(r)
    with BlockDevice.open(path, readonly=True) as dev:
        with pytest.raises(DelafsError):
            await Filesystem.open(dev)


# ---------------------------------------------------------------------------
# Repairs
# ---------------------------------------------------------------------------

async def test_leaked_block_is_freed(img):
    path, exp = img
    sb = read_sb(path)
    blk = sb.bitmap_start
    with BlockDevice.open(path) as dev:
        buf = dev.read_sync(blk, 1)
        seq, _ = unseal(buf, MAGIC_BITMAP, blk)
        bits = decode_bitmap(buf, blk)
        # The last free block of the data area: referenced by nothing.
        leak = next(b for b in range(sb.sb2_block - 1, sb.data_start, -1)
                    if not bits[b >> 3] >> (b & 7) & 1)
        bits[leak >> 3] |= 1 << (leak & 7)
        dev.write_sync(blk, [encode_bitmap(bits, blk, seq)])
        dev.flush_sync()

    assert_fsck_finds_and_repairs(path, f"block {leak} marked in use but not referenced")
    with BlockDevice.open(path, readonly=True) as dev:
        bits = decode_bitmap(dev.read_sync(blk, 1), blk)
    assert not bits[leak >> 3] >> (leak & 7) & 1
    await verify_contents(path, exp)


async def test_wrong_link_count_is_corrected(img):
    path, exp = img
    ino = exp["names"][b"n007"]
    with BlockDevice.open(path) as dev:
        fs = await Filesystem.open(dev)
        async with fs.transaction():
            inode = await fs.iget(ino)
            inode.nlink = 5
            await fs.log_inode(inode)
        await fs.close()

    r = delafs("fsck", "-n", path)
    assert r.returncode == 4, output(r)
    assert f"inode {ino}: link count 5, counted 1" in output(r)
    r = delafs("fsck", "-y", path)
    assert r.returncode == 1, output(r)
    assert_no_traceback(r)
    assert_fsck_clean(path)
    with BlockDevice.open(path, readonly=True) as dev:
        fs = await Filesystem.open(dev)
        assert (await fs.getattr(ino)).nlink == 1
    await verify_contents(path, exp)


async def _unlink_name_keep_inode(path: str, dir_ino: int, name: bytes) -> int:
    """Remove a directory entry but keep its inode: an unreachable inode."""
    with BlockDevice.open(path) as dev:
        fs = await Filesystem.open(dev)
        async with fs.transaction():
            d = await fs.iget(dir_ino)
            key, ino, _ = await fs.find_entry(dir_ino, name)
            await fs.tree.delete(key)
            d.size -= 1
            await fs.log_inode(d)
        await fs.close()
    return ino


async def test_unreachable_inode_goes_to_lost_found(img):
    path, exp = img
    d = exp["dir"]
    ino = await _unlink_name_keep_inode(path, d, b"file")
    assert ino == exp["file"]

    r = delafs("fsck", "-n", path)
    assert r.returncode == 4, output(r)
    assert f"inode {ino} is not reachable" in output(r)
    r = delafs("fsck", "-y", path)
    assert r.returncode == 1, output(r)
    assert_no_traceback(r)

    with BlockDevice.open(path, readonly=True) as dev:
        fs = await Filesystem.open(dev)
        lf = await fs.lookup(ROOT_INO, b"lost+found")
        assert stat.S_ISDIR(lf.mode)
        f = await fs.lookup(lf.ino, b"#%d" % ino)
        assert f.ino == ino and f.nlink == 1
        assert await fs.pread(ino, 0, 1 << 20) == exp["file_data"]
        assert await fs.getxattr(ino, b"user.big") == exp["big_xattr"]
        assert [e[0] for e in await fs.readdir(lf.ino)] == [b"#%d" % ino]


async def test_lost_found_repair_leaves_clean_image(img):
    path, exp = img
    await _unlink_name_keep_inode(path, exp["dir"], b"file")
    r = delafs("fsck", "-y", path)
    assert r.returncode == 1, output(r)
    r = delafs("fsck", "-n", path)
    assert r.returncode == 0, output(r)


async def test_unreachable_directory_goes_to_lost_found(img):
    """A directory subtree cut loose is reattached whole (only its top goes
    into lost+found), with correct link counts."""
    path, exp = img
    with BlockDevice.open(path) as dev:
        fs = await Filesystem.open(dev)
        sub = await fs.mkdir(exp["dir"], b"sub", 0o755)
        await fs.mkdir(sub.ino, b"subsub", 0o755)
        await fs.close()
    with BlockDevice.open(path) as dev:
        fs = await Filesystem.open(dev)
        async with fs.transaction():
            d = await fs.iget(exp["dir"])
            key, _, _ = await fs.find_entry(exp["dir"], b"sub")
            await fs.tree.delete(key)
            d.size -= 1
            d.nlink -= 1
            await fs.log_inode(d)
        await fs.close()
    r = delafs("fsck", "-y", path)
    assert r.returncode == 1, output(r)
    report, text = await run_check(path, repair=False)
    # Everything but the inode count (see the xfail above) must be clean.
    assert [e for e in report.errors if "inode count" not in e] == [], text
    with BlockDevice.open(path, readonly=True) as dev:
        fs = await Filesystem.open(dev)
        lf = await fs.lookup(ROOT_INO, b"lost+found")
        s = await fs.lookup(lf.ino, b"#%d" % sub.ino)
        assert s.nlink == 3 and s.parent == lf.ino
        assert (await fs.lookup(s.ino, b"subsub")).nlink == 2
        assert (await fs.getattr(lf.ino)).nlink == 3
        assert [e[0] for e in await fs.readdir(lf.ino)] == [b"#%d" % sub.ino]


async def test_dangling_entry_is_removed(img):
    """An entry naming an inode that does not exist: -y removes it."""
    path, exp = img
    ino = await _drop_inode_item(path, exp, b"n007")
    r = delafs("fsck", "-n", path)
    assert r.returncode == 4, output(r)
    assert f"names missing inode {ino}" in output(r)
    r = delafs("fsck", "-y", path)
    assert r.returncode == 1, output(r)
    with BlockDevice.open(path, readonly=True) as dev:
        fs = await Filesystem.open(dev)
        with pytest.raises(DelafsError):
            await fs.lookup(exp["many"], b"n007")
        assert (await fs.lookup(exp["many"], b"n008")).ino == exp["names"][b"n008"]


async def _drop_inode_item(path: str, exp: dict, name: bytes) -> int:
    """Delete an (empty) file's inode item but keep its directory entry."""
    ino = exp["names"][name]
    with BlockDevice.open(path) as dev:
        fs = await Filesystem.open(dev)
        async with fs.transaction():
            await fs.tree.delete((ino, T_INODE, 0))
            fs.info.inode_count -= 1
            fs.store.mark_dirty(fs.info)
        fs.inodes.pop(ino, None)
        await fs.close()
    return ino


async def test_dangling_entry_repair_leaves_clean_image(img):
    path, exp = img
    await _drop_inode_item(path, exp, b"n007")
    r = delafs("fsck", "-y", path)
    assert r.returncode == 1, output(r)
    r = delafs("fsck", "-n", path)
    assert r.returncode == 0, output(r)


async def _shrink_size_only(path: str, ino: int, size: int) -> None:
    """Log a smaller size and free nothing: what a shrinking truncate cut
    short by a crash left before it kept an orphan record."""
    with BlockDevice.open(path) as dev:
        fs = await Filesystem.open(dev)
        async with fs.transaction():
            inode = await fs.iget(ino)
            inode.size = size
            await fs.log_inode(inode)
        await fs.close()


async def test_written_extents_past_eof_are_freed(img):
    """Growing the file again would read them back (stale data), and
    nothing else would ever free them."""
    path, exp = img
    ino, keep = exp["fa"], 100
    await _shrink_size_only(path, ino, keep * BLOCK_SIZE - 10)
    with BlockDevice.open(path, readonly=True) as dev:
        free_before = (await Filesystem.open(dev)).statfs()["bfree"]

    assert_fsck_finds_and_repairs(path, f"inode {ino}: {NFRAG - keep} WRITTEN extent(s) past EOF")
    with BlockDevice.open(path) as dev:
        fs = await Filesystem.open(dev)
        assert fs.statfs()["bfree"] >= free_before + NFRAG - keep      # and leaves merged
        assert (await fs.getattr(ino)).blocks == keep
        assert await fs.pread(ino, 0, keep * BLOCK_SIZE) == b"".join(
            bytes([i % 251 + 1]) * BLOCK_SIZE for i in range(keep))[:keep * BLOCK_SIZE - 10]
        await fs.truncate(ino, NFRAG * BLOCK_SIZE)
        assert await fs.pread(ino, keep * BLOCK_SIZE, (NFRAG - keep) * BLOCK_SIZE) == \
            bytes((NFRAG - keep) * BLOCK_SIZE)
        await fs.close()
    assert_fsck_clean(path)


async def test_truncate_in_progress_is_left_to_the_mount(img):
    """An orphan record on a linked file is a truncate a crash cut short:
    the next mount finishes it, so its blocks past EOF are not damage."""
    path, exp = img
    ino = exp["fa"]
    await _shrink_size_only(path, ino, 0)
    with BlockDevice.open(path) as dev:
        fs = await Filesystem.open(dev)
        async with fs.transaction(items=1):
            await fs.tree.insert((0, T_ORPHAN, ino), b"")
        # Unmounted without the reaping a mount does first: a crash image.
        await fs.store.checkpoint()

    r = delafs("fsck", "-n", path)
    assert r.returncode == 0, output(r)
    assert_no_traceback(r)
    with BlockDevice.open(path) as dev:
        fs = await Filesystem.open(dev)
        assert (await fs.getattr(ino)).blocks == 0
        assert await fs.pread(ino, 0, 10) == b""
        await fs.close()
    assert_fsck_clean(path)
