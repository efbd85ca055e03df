"""A seeded, replayable corruption fuzzer for delafs images (issue 10).

    python -m tests.fuzz.corrupt --images 300 --seed 1 [--fuse 20] [--json out.json]
    python -m tests.fuzz.corrupt --seed 1 --index 17 --sources DIR     # replay one image

What it does, and why each part is there:

* **Source images** are made once by a real mount (``delafs mkfs``, ``delafs
  mount``, files written through the kernel), so the fuzzer damages the
  layouts delafs really writes, not ones a test assembled.  Two variants:
  ``clean`` (``delafs umount``) and ``pending`` (the same tree, remounted,
  changed in two committed transactions that were never checkpointed, then
  the daemon SIGKILLed), so journal records and replay are fuzzed too.  The
  expected tree (path -> type, contents or target, xattrs) is recorded while
  writing it.
* **Damage** hits metadata blocks only (superblock copies, journal slots and
  log records, bitmap, fsinfo, every reachable B+tree node): bytes flipped,
  the block zeroed or filled with random bytes, or a *resealed* edit that
  changes what a node, fsinfo or the bitmap says and recomputes its checksum
  (the "valid checksum, wrong content" case of a software or firmware bug).
  Image ``i`` of seed ``S`` is a pure function of ``(S, i)`` and the source
  images: ``random.Random(f"delafs-fuzz:{S}:{i}")`` picks the variant, the
  blocks, the kinds and every damaged byte.  mkfs gives each image a random
  UUID (which keys the directory hashes), so sources rebuilt from scratch
  hold the same files in a different block layout: keep them with
  ``--sources DIR`` for exact replays.
* **Each image** is checked in steps, each under a timeout (a timeout is a
  HANG): (a) ``fsck -n`` through the library; (b) a mount through the library
  (or, with ``--fuse N``, through the real daemon) that lists every
  directory and reads every file, symlink and xattr, compares them with the
  expected tree, writes a file and unmounts; (c) ``fsck -y`` then ``fsck -n``;
  (d) for one damaged leaf, that the repaired tree kept every item outside it.
  Images run in a pool of spawned worker processes, so a step stuck in a loop
  that never yields is still caught (the worker is killed) and the run uses
  every core.

The table splits the outcome by variant and by damaged structure; ``--json``
keeps one record per image.  The acceptance the tests assert is
:meth:`Result.acceptance_failures`.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import logging
import multiprocessing
import os
import pickle
import random
import select
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait as wait_connections
from pathlib import Path

import trio

# tests/ is where pytest's rootdir-relative imports start (the suite imports
# ``crash.workload`` and ``mounted.conftest`` that way); the command line
# (``python -m tests.fuzz.corrupt``) and the FUSE reader child need it too.
TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from mounted.conftest import (
    DELAFS,
    PYTHON,
    DelafsMount,
    is_our_daemon,
    pid_alive,
    run,
    wait_until,
    why_not_mountable,
)

from delafs.block import BlockDevice
from delafs.fs.btree import ITEM_HDR, Node, pack_key
from delafs.fs.filesystem import Filesystem
from delafs.fs.fsck import EXIT_UNCORRECTED, check
from delafs.fs.items import (
    T_DIRENT,
    T_EXTENT,
    T_INODE,
    T_ORPHAN,
    T_SYMLINK,
    T_XATTR,
    Inode,
    OutOfLine,
    decode_dirent,
    decode_extent,
    decode_symlink,
    decode_xattr,
)
from delafs.lib.errors import DelafsError, FsError
from delafs.log import journal as journal_log
from delafs.ondisk import (
    BITS_PER_BITMAP_BLOCK,
    BLOCK_SIZE,
    HDR_SIZE,
    MAGIC_BITMAP,
    MAGIC_FSINFO,
    MAGIC_NODE,
    ROOT_INO,
    STRUCT_NAMES,
    FsInfo,
    decode_bitmap,
    encode_bitmap,
    peek_magic,
    seal,
    unseal,
)
from delafs.testing.crashsim import sparse_copy
from delafs.vfs.mount import Mount

IMAGE_SIZE = "64M"
NEW_FILE = "fuzz-new-file"          # what step b writes after reading everything
READ_CHUNK = 128 << 10              # the FUSE adapter's usual READ size
LOST_FOUND = "lost+found"

STRUCTURES = ("superblock", "journal slot", "journal log", "bitmap", "fsinfo",
              "btree leaf", "btree internal")
# How often each structure is picked (among those a source has): nodes hold
# almost everything, so they get the most; the few fixed blocks still come
# up often enough to be covered in a CI-sized run.
STRUCTURE_WEIGHTS = {"btree leaf": 35, "btree internal": 10, "superblock": 10,
                     "journal slot": 10, "journal log": 15, "bitmap": 10, "fsinfo": 10}
RESEALABLE = ("bitmap", "fsinfo", "btree leaf", "btree internal")


@dataclass
class Limits:
    """Timeouts in seconds.  A healthy image takes well under a second per
    step, so each bound only ever fires on a real hang."""
    fsck: float = 30.0          # one fsck run
    mount: float = 30.0         # Filesystem.open
    op: float = 5.0             # one operation of the in-process walk
    unmount: float = 30.0       # writing the new file back and unmounting
    reader: float = 10.0        # FUSE mode: a reader making no progress
    image: float = 400.0        # the whole image, enforced by killing its worker


# ---------------------------------------------------------------------------
# The source tree
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One expected object: ``data`` is a file's contents or a symlink's target."""
    kind: str                                   # "file", "dir" or "symlink"
    data: bytes = b""
    xattrs: tuple[tuple[bytes, bytes], ...] = ()


State = dict[str, Entry]                        # relative path -> Entry


def populate(root: str, seed: int) -> State:
    """Write the source tree under ``root`` (a mount) through os.* calls and
    return what it should read back.  Everything comes from ``seed``."""
    rng = random.Random(f"delafs-fuzz-tree:{seed}")
    tree: State = {}

    def path(rel: str) -> str:
        return os.path.join(root, rel)

    def put_dir(rel: str, xattrs=()) -> None:
        os.mkdir(path(rel))
        for name, value in xattrs:
            os.setxattr(path(rel), name, value)
        tree[rel] = Entry("dir", b"", tuple(sorted(xattrs)))

    def put_file(rel: str, data: bytes, xattrs=()) -> None:
        with open(path(rel), "wb") as f:
            f.write(data)
        for name, value in xattrs:
            os.setxattr(path(rel), name, value)
        tree[rel] = Entry("file", data, tuple(sorted(xattrs)))

    def put_link(rel: str, target: str) -> None:
        os.symlink(target, path(rel))
        tree[rel] = Entry("symlink", target.encode())

    for d in ("src", "src/a", "src/a/b", "big", "links"):
        put_dir(d)
    put_dir("docs", [(b"user.dir", b"documents")])
    homes = ["", "src", "src/a", "src/a/b", "docs"]
    for i in range(100):
        # Log-uniform sizes, 16 bytes to 200 KiB, and a few empty files.
        size = 0 if i % 20 == 0 else min(200 << 10, int(2 ** rng.uniform(4, 17.7)))
        xattrs = []
        if i % 5 == 1:
            xattrs.append((b"user.note", rng.randbytes(rng.randrange(8, 200))))
        if i in (3, 42):            # > XATTR_INLINE_MAX: stored out of line
            xattrs.append((b"user.big", rng.randbytes(rng.randrange(600, 3000))))
        put_file(os.path.join(homes[i % 5], f"f{i:03d}"), rng.randbytes(size), xattrs)
    # ~300 names in one directory: its entries fill several leaves.
    for i in range(300):
        put_file(f"big/entry-{i:03d}-{'x' * rng.randrange(0, 40)}",
                 rng.randbytes(rng.randrange(0, 700)))
    for k in range(4):
        put_link(f"links/short{k}", f"../src/f{k * 5 + 1:03d}")
    # > SYMLINK_INLINE_MAX bytes: the target is stored out of line.
    put_link("links/long", "/".join(f"d{k:03d}" for k in range(300)))
    os.link(path("src/f001"), path("links/hard"))
    tree["links/hard"] = tree["src/f001"]
    # Sparse: data at 0 and at 10 MiB, a hole between.
    head, tail = rng.randbytes(4096), rng.randbytes(4096)
    with open(path("sparse"), "wb") as f:
        f.write(head)
        f.seek(10 << 20)
        f.write(tail)
    tree["sparse"] = Entry("file", head + bytes((10 << 20) - 4096) + tail)
    # Many extents: two files grown in turn, each append written back by
    # fsync and closed (which trims speculative preallocation), so their
    # blocks interleave.
    frags: dict[str, list[bytes]] = {"frag1": [], "frag2": []}
    for _ in range(48):
        for name, chunks in frags.items():
            chunk = rng.randbytes(4096)
            with open(path(name), "ab") as f:
                f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            chunks.append(chunk)
    for name, chunks in frags.items():
        tree[name] = Entry("file", b"".join(chunks))
    return tree


def pending_changes(root: str, seed: int, base: State) -> list[State]:
    """Change the tree in exactly two commits (an fsync of the root, then of
    a written file) and return the trees after each: [after 2, after 1].
    The mount runs with a commit interval far longer than this takes, so
    nothing else commits and nothing is checkpointed."""
    rng = random.Random(f"delafs-fuzz-pending:{seed}")
    s1 = dict(base)
    os.mkdir(os.path.join(root, "pending"))
    s1["pending"] = Entry("dir")
    open(os.path.join(root, "pending/empty"), "wb").close()
    s1["pending/empty"] = Entry("file")
    os.rename(os.path.join(root, "src/f006"), os.path.join(root, "src/f006.renamed"))
    s1["src/f006.renamed"] = s1.pop("src/f006")
    gone = sorted(p for p in base if p.startswith("big/"))
    os.unlink(os.path.join(root, gone[0]))
    del s1[gone[0]]
    os.symlink("../docs", os.path.join(root, "pending/link"))
    s1["pending/link"] = Entry("symlink", b"../docs")
    value = rng.randbytes(64)
    os.setxattr(os.path.join(root, "docs/f004"), b"user.pending", value)
    old = s1["docs/f004"]
    s1["docs/f004"] = Entry("file", old.data, tuple(sorted(old.xattrs + ((b"user.pending", value),))))
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)                                    # commit 1
    finally:
        os.close(fd)
    s2 = dict(s1)
    os.unlink(os.path.join(root, gone[1]))
    del s2[gone[1]]
    data = rng.randbytes(20000)
    with open(os.path.join(root, "pending/written"), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())                            # commit 2
    s2["pending/written"] = Entry("file", data)
    return [s2, s1]


# ---------------------------------------------------------------------------
# Source images and what is in them
# ---------------------------------------------------------------------------

Key = tuple[int, int, int]


@dataclass(frozen=True)
class Target:
    structure: str
    block: int
    note: str = ""


@dataclass
class Source:
    """A pristine source image and everything the fuzzer needs to know about it.

    ``states`` are the trees a correct mount may show, the expected one first;
    the pending variant may also show the tree before its last transaction
    (or both) when a journal record is damaged: a damaged last transaction is
    indistinguishable from a torn commit, which recovery rightly drops.
    ``items`` is the B+tree as a mount sees it (journal overlaid), ``nodes``
    each reachable node's level and keys."""
    variant: str
    image: str
    states: list[State]
    targets: list[Target]
    items: dict[Key, bytes]
    nodes: dict[int, tuple[int, list[Key]]]
    data_blocks: list[int]
    txns: int
    nblocks: int
    data_start: int
    bitmap_start: int


async def _open_view(dev) -> tuple[Filesystem, dict[int, Node], list[str]]:
    """A read-only Filesystem (journal overlaid in memory), every node of its
    tree that can be read, and why the others could not.  Unlike
    BTree.walk, which stops at the first bad node, a bad node only hides
    its own subtree here (as in fsck's pass 1): the loss check must see
    every item a damaged node does not hide."""
    fs = await Filesystem.open(dev, readonly=True)
    nodes: dict[int, Node] = {}
    bad: list[str] = []
    stack = [(fs.info.root_block, fs.info.root_level)]
    while stack:
        blk, level = stack.pop()
        if blk in nodes:
            bad.append(f"node {blk} is referenced twice")
            continue
        try:
            node = await fs.tree.node(blk)
        except DelafsError as e:
            bad.append(str(e))
            continue
        if node.level != level:
            bad.append(f"node {blk}: level {node.level}, expected {level}")
            continue
        nodes[blk] = node
        if not node.is_leaf:
            stack.extend((child, level - 1) for child in node.vals)
    return fs, nodes, bad


def _items(nodes: dict[int, Node]) -> dict[Key, bytes]:
    return {k: v for n in nodes.values() if n.is_leaf for k, v in zip(n.keys, n.vals)}


async def _inspect(path: str, variant: str) -> tuple:
    with BlockDevice.open(path, readonly=True) as dev:
        fs, nodes, bad = await _open_view(dev)
        assert not bad, f"the source image {path} has unreadable nodes: {bad}"
        sb = fs.sb
        scan = await journal_log.scan(dev, sb, look_past_end=True)
        overlay = set(fs.store.pending)     # blocks whose home copy replay rewrites
        targets = [Target("superblock", 0, "primary"),
                   Target("superblock", sb.sb2_block, "secondary"),
                   Target("journal slot", sb.journal_start, "slot A"),
                   Target("journal slot", sb.journal_start + 1, "slot B")]
        for txn in scan.txns:
            for k in range(txn.length):
                blk = sb.log_start + (txn.pos + k) % sb.log_blocks
                magic = peek_magic(await dev.read(blk, 1))
                what = STRUCT_NAMES.get(magic, "block image")
                targets.append(Target("journal log", blk, f"{what} of transaction {txn.seq}"))
        # Damage to a home block that replay overwrites would change nothing.
        for i in range(sb.bitmap_blocks):
            if sb.bitmap_start + i not in overlay:
                targets.append(Target("bitmap", sb.bitmap_start + i))
        if sb.fsinfo_block not in overlay:
            targets.append(Target("fsinfo", sb.fsinfo_block))
        for blk, node in sorted(nodes.items()):
            if blk not in overlay:
                targets.append(Target("btree leaf" if node.is_leaf else "btree internal", blk,
                                      f"level {node.level}, {len(node.keys)} entries"))
        items = _items(nodes)
        data_blocks = sorted(decode_extent(v)[0] for k, v in items.items() if k[1] == T_EXTENT)
        node_keys = {blk: (n.level, list(n.keys)) for blk, n in nodes.items()}
        geometry = (sb.nblocks, sb.data_start, sb.bitmap_start)
        return targets, items, node_keys, data_blocks, len(scan.txns), geometry


def build_sources(workdir: str, seed: int, mnt_base: str | None = None) -> dict[str, Source]:
    """Make the two source images with real mounts (needs root and /dev/fuse)."""
    why = why_not_mountable()
    if why:
        raise RuntimeError(why)
    mnt_base = mnt_base or workdir
    os.makedirs(workdir, exist_ok=True)
    clean = os.path.join(workdir, "clean.img")
    pending = os.path.join(workdir, "pending.img")
    run([DELAFS, "mkfs", clean, "--size", IMAGE_SIZE, "-q"])
    m = DelafsMount(clean, tempfile.mkdtemp(prefix="fuzz-src-", dir=mnt_base), "",
                    os.path.join(workdir, "clean-daemon.log"))
    try:
        m.mount()
        base = populate(m.mnt, seed)
        m.umount()
    finally:
        m.cleanup()
        os.rmdir(m.mnt)
    assert not m.tracebacks(), m.tracebacks()
    sparse_copy(clean, pending)
    p = DelafsMount(pending, tempfile.mkdtemp(prefix="fuzz-src-", dir=mnt_base),
                    "commit_interval=3600", os.path.join(workdir, "pending-daemon.log"))
    try:
        p.mount()
        after = pending_changes(p.mnt, seed, base)
        pid = p.pid
        os.kill(pid, signal.SIGKILL)            # the daemon we started, and only it
        assert wait_until(lambda: not pid_alive(pid), 30), f"daemon {pid} survived SIGKILL"
        p.forget_daemon()
    finally:
        p.cleanup()
        os.rmdir(p.mnt)
    assert not p.tracebacks(), p.tracebacks()
    sources = {}
    for variant, image, states in (("clean", clean, [base]), ("pending", pending, after + [base])):
        report = trio.run(_fsck, image, False)
        assert report["exit"] == 0, f"the {variant} source image is not clean: {report}"
        targets, items, nodes, data_blocks, txns, geometry = trio.run(_inspect, image, variant)
        if variant == "pending" and txns != 2:
            raise AssertionError(f"the pending source holds {txns} committed transactions, not 2: "
                                 "something else committed or checkpointed")
        sources[variant] = Source(variant, image, states, targets, items, nodes, data_blocks,
                                  txns, *geometry)
    return sources


def cached_sources(directory: str | os.PathLike, seed: int, mnt_base: str | None = None) -> dict[str, Source]:
    """The source images of ``seed`` in ``directory``, built on first use."""
    directory = str(directory)
    index = os.path.join(directory, f"sources-{seed}.pickle")
    if os.path.exists(index):
        with open(index, "rb") as f:
            return pickle.load(f)
    sources = build_sources(os.path.join(directory, f"seed-{seed}"), seed, mnt_base)
    with open(index + ".tmp", "wb") as f:
        pickle.dump(sources, f)
    os.replace(index + ".tmp", index)
    return sources


# ---------------------------------------------------------------------------
# Damage
# ---------------------------------------------------------------------------

@dataclass
class Damage:
    structure: str
    block: int
    kind: str                   # flip, zero, random, resealed
    note: str                   # what the block is
    rng_seed: int               # everything the damage draws comes from this
    detail: str = ""            # filled in when applied: what exactly changed

    def describe(self) -> str:
        what = f"{self.structure} {self.block}" + (f" ({self.note})" if self.note else "")
        return f"{what}: {self.kind}" + (f", {self.detail}" if self.detail else "")


@dataclass
class Plan:
    seed: int
    index: int
    variant: str
    damages: list[Damage]
    fuse: bool = False

    @property
    def structure(self) -> str:
        """The table row of this image: what was damaged, if one block was."""
        return self.damages[0].structure if len(self.damages) == 1 else "multiple blocks"


def plan_image(seed: int, index: int, sources: dict[str, Source], fuse: bool = False) -> Plan:
    """Which source, blocks and kinds image ``index`` gets: a function of
    (seed, index) and the sources' target lists only."""
    rng = random.Random(f"delafs-fuzz:{seed}:{index}")
    variant = rng.choice(sorted(sources))
    by_structure: dict[str, list[Target]] = defaultdict(list)
    for t in sources[variant].targets:
        by_structure[t.structure].append(t)
    names = [s for s in STRUCTURES if by_structure[s]]
    weights = [STRUCTURE_WEIGHTS[s] for s in names]
    count = rng.choices((1, 2, 3), (80, 15, 5))[0]
    chosen: list[Target] = []
    while len(chosen) < count:
        t = rng.choice(by_structure[rng.choices(names, weights)[0]])
        # Both superblock copies gone is not damage fsck can repair (it
        # says so, exit 8): leave that to the unit tests.
        if t in chosen or (t.structure == "superblock" and any(c.structure == "superblock" for c in chosen)):
            continue
        chosen.append(t)
    damages = []
    for t in chosen:
        if t.structure in RESEALABLE:
            kind = rng.choices(("flip", "zero", "random", "resealed"), (30, 15, 15, 40))[0]
        else:
            kind = rng.choices(("flip", "zero", "random"), (45, 30, 25))[0]
        damages.append(Damage(t.structure, t.block, kind, t.note, rng.getrandbits(64)))
    return Plan(seed, index, variant, damages, fuse)


def apply_damage(path: str, src: Source, d: Damage) -> None:
    """Damage one block of the image file at ``path`` in place."""
    r = random.Random(d.rng_seed)
    fd = os.open(path, os.O_RDWR)
    try:
        buf = bytearray(os.pread(fd, BLOCK_SIZE, d.block * BLOCK_SIZE).ljust(BLOCK_SIZE, b"\0"))
        if d.kind == "flip":
            offs = sorted(r.sample(range(BLOCK_SIZE), r.randint(1, 8)))
            for o in offs:
                buf[o] ^= r.randrange(1, 256)
            d.detail = f"bytes at {offs}"
        elif d.kind == "zero":
            buf = bytearray(BLOCK_SIZE)
        elif d.kind == "random":
            buf = bytearray(r.randbytes(BLOCK_SIZE))
        else:
            buf, d.detail = _reseal(bytes(buf), d, src, r)
        os.pwrite(fd, bytes(buf), d.block * BLOCK_SIZE)
    finally:
        os.close(fd)


# -- resealed edits: content changed, checksum valid ----------------------------------

def _reseal(buf: bytes, d: Damage, src: Source, r: random.Random) -> tuple[bytes, str]:
    if d.structure == "fsinfo":
        return _edit_fsinfo(buf, d.block, src, r)
    if d.structure == "bitmap":
        return _edit_bitmap(buf, d.block, src, r)
    seq, aux = unseal(buf, MAGIC_NODE, d.block)
    node = Node.decode(buf, d.block)
    edits = _LEAF_EDITS if node.is_leaf else _INTERNAL_EDITS
    order = r.sample(edits, len(edits))
    for edit in order:
        out = edit(node, bytearray(buf), seq, aux, src, r)
        if out is not None:
            return out
    raise AssertionError(f"no edit applies to node {d.block}")


def _encode(node: Node, seq: int, detail: str) -> tuple[bytes, str]:
    return node.encode(seq), detail


def _edit_item_type(node, buf, seq, aux, src, r):
    i = r.randrange(len(node.keys))
    o, t, off = node.keys[i]
    new = r.choice([0, 7, 100, 255] + [x for x in (T_INODE, T_XATTR, T_DIRENT, T_EXTENT, T_SYMLINK) if x != t])
    node.pkeys[i] = pack_key((o, new, off))
    return _encode(node, seq, f"item type: item {i} {(o, t, off)} type {t} -> {new}")


def _edit_key_swap(node, buf, seq, aux, src, r):
    if len(node.keys) < 2:
        return None
    i, j = sorted(r.sample(range(len(node.keys)), 2))
    node.pkeys[i], node.pkeys[j] = node.pkeys[j], node.pkeys[i]
    return _encode(node, seq, f"key swap: entries {i} and {j}")


def _edit_key_duplicate(node, buf, seq, aux, src, r):
    if len(node.keys) < 2:
        return None
    i = r.randrange(1, len(node.keys))
    node.pkeys[i] = node.pkeys[i - 1]
    return _encode(node, seq, f"key duplicate: entry {i} = entry {i - 1} {node.keys[i]}")


def _edit_count(node, buf, seq, aux, src, r):
    n = len(node.keys)
    new = max(0, n + r.choice((-2, -1, 1, 2)))
    if new == n:
        return None
    return seal(buf, MAGIC_NODE, node.blocknr, seq, node.level | new << 8), f"item count {n} -> {new}"


def _edit_level(node, buf, seq, aux, src, r):
    new = r.choice([x for x in (0, 1, 2, 17) if x != node.level])
    return seal(buf, MAGIC_NODE, node.blocknr, seq, new | len(node.keys) << 8), \
        f"level {node.level} -> {new}"


def _inline_rest(key, val) -> bool:
    """The item's value runs to its end: an inline xattr value or symlink
    target, with no length of its own."""
    try:
        if key[1] == T_XATTR:
            return not isinstance(decode_xattr(val)[1], OutOfLine)
        if key[1] == T_SYMLINK:
            return not isinstance(decode_symlink(val), OutOfLine)
    except DelafsError:
        pass
    return False


def _edit_value_length(node, buf, seq, aux, src, r):
    # A resealed leaf that gives an inline xattr value or symlink target
    # another length gives it another value, which no reader can tell from
    # the real one (like a resealed file size): such an edit measures
    # nothing about delafs's checks, so it picks the other items.
    keys = node.keys
    told = [i for i, (k, v) in enumerate(zip(keys, node.vals)) if not _inline_rest(k, v)]
    if not told:
        return None
    i = r.choice(told)
    at = HDR_SIZE + i * ITEM_HDR + ITEM_HDR - 2             # the entry's u16 value length
    (vlen,) = struct.unpack_from("<H", buf, at)
    new = max(0, vlen + r.choice((-16, -3, -1, 1, 5, 40)))
    struct.pack_into("<H", buf, at, new)
    return seal(buf, MAGIC_NODE, node.blocknr, seq, aux), \
        f"value length: item {i} {node.keys[i]} {vlen} -> {new}"


def _edit_value(node, buf, seq, aux, src, r):
    """Change one field of one item's value to something a checker can
    tell is wrong (an undetectable change, e.g. of a file size, is not
    corruption anyone could report)."""
    order = r.sample(range(len(node.keys)), len(node.keys))
    for i in order:
        out = _value_edit(node.keys[i], node.vals[i], src, r)
        if out is not None:
            node.vals[i], what = out
            return _encode(node, seq, f"value: item {i} {node.keys[i]}: {what}")
    return None


def _value_edit(key: Key, val: bytes, src: Source, r: random.Random):
    t = key[1]
    v = bytearray(val)
    if t == T_INODE:
        inode = Inode.decode(key[0], val)
        choice = r.choice(("version", "nlink", "blocks", "file type"))
        if choice == "version":
            struct.pack_into("<H", v, 0, 2)
            return bytes(v), "inode record version 2"
        if choice == "nlink":
            inode.nlink += r.randint(1, 3)
        elif choice == "blocks":
            inode.blocks += r.choice((-1, 1, 7))
            if inode.blocks < 0:
                return None
        else:
            new = r.choice([m for m in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK) if m != stat.S_IFMT(inode.mode)])
            inode.mode = new | stat.S_IMODE(inode.mode)
        return inode.encode(), f"inode {choice} changed"
    if t == T_DIRENT:
        ino, dtype, name = decode_dirent(val)
        choice = r.choice(("name byte", "missing inode", "other inode", "d_type"))
        if choice == "name byte":
            j = 9 + r.randrange(len(name))
            v[j] = r.choice([c for c in b"abcdefghijklmnopqrstuvwxyz0123456789" if c != v[j]])
        elif choice == "missing inode":
            struct.pack_into("<Q", v, 0, (1 << 40) + r.randrange(1 << 20))
        elif choice == "other inode":
            same = [k[0] for k, iv in src.items.items() if k[1] == T_INODE and k[0] != ino
                    and (stat.S_IFMT(Inode.decode(k[0], iv).mode) >> 12) == dtype]
            if not same:
                return None
            struct.pack_into("<Q", v, 0, r.choice(same))
        else:
            v[8] = r.choice([x for x in (4, 8, 10) if x != dtype])
        return bytes(v), f"directory entry {choice}"
    if t == T_XATTR:
        name, value = decode_xattr(val)
        choices = ["value kind", "name byte"] + (["value crc"] if isinstance(value, OutOfLine) else [])
        choice = r.choice(choices)
        if choice == "value kind":
            v[0] = 7
        elif choice == "name byte":
            j = 2 + r.randrange(len(name))
            v[j] ^= 0x20 if chr(v[j]).isalpha() else 0x01
        else:
            v[-1] ^= 0xFF
        return bytes(v), f"xattr {choice}"
    if t == T_EXTENT:
        choice = r.choice(("state", "length 0", "into metadata", "beyond device"))
        if choice == "state":
            v[12] = r.choice((0, 1, 7))
        elif choice == "length 0":
            struct.pack_into("<I", v, 8, 0)
        elif choice == "into metadata":
            struct.pack_into("<Q", v, 0, r.randrange(0, src.data_start))
        else:
            struct.pack_into("<Q", v, 0, src.nblocks + r.randrange(1, 1 << 20))
        return bytes(v), f"extent {choice}"
    if t == T_SYMLINK:
        target = decode_symlink(val)
        if isinstance(target, OutOfLine) and r.random() < 0.5:
            v[-1] ^= 0xFF
            return bytes(v), "symlink out-of-line crc"
        v[0] = 7
        return bytes(v), "symlink encoding"
    return None


def _edit_child(node, buf, seq, aux, src, r):
    j = r.randrange(len(node.keys))
    old = node.vals[j]
    siblings = [b for b, (lvl, _) in src.nodes.items() if lvl == node.level - 1 and b != old]
    choice = r.choice(("sibling", "data block", "fixed block", "beyond device"))
    if choice == "sibling" and siblings:
        new = r.choice(siblings)
    elif choice == "data block" and src.data_blocks:
        new = r.choice(src.data_blocks)
    elif choice == "beyond device":
        new = src.nblocks + r.randrange(1, 1 << 20)
    else:
        choice, new = "fixed block", r.randrange(0, src.data_start)
    node.vals[j] = new
    return _encode(node, seq, f"child pointer {j}: {old} -> {new} ({choice})")


def _edit_separator(node, buf, seq, aux, src, r):
    if len(node.keys) < 2:
        return None
    j = r.randrange(1, len(node.keys))
    o, t, off = node.keys[j]
    node.pkeys[j] = pack_key((o, t, off + r.choice((1, 1 << 8, 1 << 40))))
    return _encode(node, seq, f"separator key {j}: {(o, t, off)} -> {node.keys[j]}")


_LEAF_EDITS = [_edit_item_type, _edit_key_swap, _edit_key_duplicate, _edit_value,
               _edit_value_length, _edit_count, _edit_level]
_INTERNAL_EDITS = [_edit_child, _edit_key_swap, _edit_key_duplicate, _edit_separator,
                   _edit_count, _edit_level]


def _edit_fsinfo(buf: bytes, blk: int, src: Source, r: random.Random) -> tuple[bytes, str]:
    seq, _ = unseal(buf, MAGIC_FSINFO, blk)
    info = FsInfo.decode(buf, blk)
    choice = r.choice(("root block", "root level", "used blocks", "inode count", "next inode"))
    if choice == "root block":
        others = [b for b in src.nodes if b != info.root_block]
        info.root_block = r.choice(others + src.data_blocks[:50] + [0, src.nblocks + 7])
    elif choice == "root level":
        info.root_level = r.choice([x for x in (0, 1, 2, 3) if x != info.root_level])
    elif choice == "used blocks":
        info.used_blocks += r.choice((-50, -1, 1, 50))
    elif choice == "inode count":
        info.inode_count += r.choice((-5, -1, 1, 5))
    else:
        top = max(k[0] for k in src.items if k[1] == T_INODE)
        info.next_ino = r.randint(2, top)
    return info.encode(blk, seq), f"fsinfo {choice}"


def _edit_bitmap(buf: bytes, blk: int, src: Source, r: random.Random) -> tuple[bytes, str]:
    seq, _ = unseal(buf, MAGIC_BITMAP, blk)
    bits = decode_bitmap(buf, blk)
    n = r.randint(1, 16)
    # Half of the bits are blocks in use (marking one free lets it be handed
    # out twice), the rest anywhere on the device.
    used = src.data_blocks + list(src.nodes)
    flipped = sorted({r.choice(used) if used and r.random() < 0.5
                      else r.randrange(src.nblocks) for _ in range(n)})
    base = (blk - src.bitmap_start) * BITS_PER_BITMAP_BLOCK
    for b in flipped:
        j = b - base
        if 0 <= j < BITS_PER_BITMAP_BLOCK:
            bits[j >> 3] ^= 1 << (j & 7)
    return encode_bitmap(bits, blk, seq), f"bitmap bits of blocks {flipped[:8]} flipped"


# ---------------------------------------------------------------------------
# Step b: what a reader sees, compared with the expected trees
# ---------------------------------------------------------------------------
#
# Both walkers (the in-process one and the FUSE reader child) produce the
# same observations, one dict per path:
#   path, listed (the directory listing named it), kind ("file", "dir",
#   "symlink", "other", "missing" or None when it could not be looked up),
#   size + sha (what reading the file returned), target (hex), xattrs
#   ({name hex: value hex or None}), errors (["op: ERRNO", ...]).

def _children(states: list[State]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for s in states:
        for p in s:
            out[os.path.dirname(p)].add(os.path.basename(p))
    return out


def _read_caps(states: list[State]) -> dict[str, int]:
    """How much of each file to read: a damaged size must not make a reader
    read zeros for ever, and one block past the longest expected contents
    is enough to see that it is wrong."""
    caps: dict[str, int] = {}
    for s in states:
        for p, e in s.items():
            if e.kind == "file":
                caps[p] = max(caps.get(p, 0), len(e.data) + BLOCK_SIZE)
    return caps


def _errname(e: BaseException) -> str:
    code = getattr(e, "errno", None)
    return errno.errorcode.get(code, str(code)) if code else type(e).__name__


def _kind(mode: int) -> str:
    return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}.get(
        stat.S_IFMT(mode), "other")


def compare(observations: list[dict], states: list[State]) -> dict:
    """Judge observations against the acceptable trees.  WRONG DATA is
    anything returned that no acceptable tree has: a name, a type, file
    bytes (a prefix when a read failed half-way), a target, an xattr.
    Errors and missing names are allowed and counted."""
    wrong: list[str] = []
    errors: list[str] = []
    missing = 0
    for o in observations:
        p = o["path"]
        errors += [f"{p or '/'}: {e}" for e in o.get("errors", ())]
        kind = o.get("kind")
        cands = [s[p] for s in states if p in s]
        if kind == "missing":
            if o.get("listed"):
                errors.append(f"{p}: listed, but lookup says ENOENT")
            else:
                missing += 1
            continue
        if p and not cands and (o.get("listed") or kind):
            wrong.append(f"{p}: listed, but the source never had it")
            continue
        if kind is None or not p:
            continue
        cands = [c for c in cands if c.kind == kind]
        if not cands:
            have = sorted({s[p].kind for s in states if p in s})
            wrong.append(f"{p}: is a {kind}, the source has a {'/'.join(have)}")
            continue
        if "sha" in o:
            n, complete = o["size"], not any(e.startswith("read") for e in o.get("errors", ()))
            if not any(hashlib.sha256(c.data[:n]).hexdigest() == o["sha"] and (len(c.data) == n or not complete)
                       for c in cands):
                # A journal record lost after its transaction was durable
                # rolls the tree back past a commit whose freed blocks may
                # have been reused or discarded since: say so.
                older = " (an older committed state: the newest no longer has these bytes)" \
                    if states[0].get(p) not in cands else ""
                wrong.append(f"{p}: {n} bytes read differ from the source ({len(cands[0].data)} bytes){older}")
        if "target" in o and not any(c.data.hex() == o["target"] for c in cands):
            wrong.append(f"{p}: symlink target differs from the source")
        for name_hex, value_hex in o.get("xattrs", {}).items():
            name = bytes.fromhex(name_hex)
            known = [dict(c.xattrs).get(name) for c in cands]
            if all(v is None for v in known):
                wrong.append(f"{p}: xattr {name!r} the source never had")
            elif value_hex is not None and not any(v is not None and v.hex() == value_hex for v in known):
                wrong.append(f"{p}: xattr {name!r} differs from the source")
    # Samples and counts: a listing that fails can cost hundreds of errors.
    return {"wrong": wrong[:10], "nwrong": len(wrong), "errors": errors[:10],
            "nerrors": len(errors), "missing": missing}


class Hang(Exception):
    """A step did not finish within its limit."""


async def _walk_library(m: Mount, states: list[State], limit: float) -> list[dict]:
    """List, stat and read everything through the Filesystem and Mount as the
    FUSE adapter drives them (readdir in batches of 128, lookup, open, READs
    of 128 KiB, release, readlink, listxattr/getxattr).  Names the source
    has are looked up even when the listing fails or leaves them out, as
    a user who knows the path would.  DelafsError is an answer (an errno);
    anything else propagates and is a TRACEBACK.  One task makes every
    call, so a lock a failed request left held shows up as the lock
    debugging's RuntimeError "(deadlock)" when the next request of this
    task takes it (a TRACEBACK here; through the daemon, whose requests
    are separate tasks, the same bug is a HANG)."""
    fs = m.fs

    where = "/"

    async def op(fn, *args, **kw):
        try:
            with trio.fail_after(limit):
                return await fn(*args, **kw)
        except trio.TooSlowError:
            raise Hang(f"{fn.__name__} of {where} did not return within {limit}s") from None

    children, caps = _children(states), _read_caps(states)
    obs: list[dict] = []
    queue = [("", ROOT_INO)]
    while queue:
        d, dino = queue.pop(0)
        where = d or "/"
        listed: set[str] = set()
        try:
            cookie = 0
            while batch := await op(fs.readdir, dino, cookie, 128):
                for name, _ino, _dtype, cookie in batch:
                    listed.add(os.fsdecode(name))
        except DelafsError as e:
            obs.append({"path": d, "listed": True, "kind": None, "errors": [f"readdir: {_errname(e)}"]})
        for name in sorted(listed | children.get(d, set())):
            if not d and name in (LOST_FOUND, NEW_FILE):
                continue
            rel = where = f"{d}/{name}" if d else name
            o: dict = {"path": rel, "listed": name in listed, "errors": []}
            obs.append(o)
            try:
                inode = await op(fs.lookup, dino, os.fsencode(name))
                inode = await op(m.getattr, inode.ino)
            except FsError as e:
                o["kind"] = "missing" if e.errno == errno.ENOENT else None
                if e.errno != errno.ENOENT:
                    o["errors"].append(f"lookup: {_errname(e)}")
                continue
            except DelafsError as e:
                o["kind"] = None
                o["errors"].append(f"lookup: {_errname(e)}")
                continue
            o["kind"] = _kind(inode.mode)
            if o["kind"] == "file":
                await _read_library(m, inode.ino, caps.get(rel, 1 << 20), o, op)
            elif o["kind"] == "symlink":
                try:
                    o["target"] = (await op(fs.readlink, inode.ino)).hex()
                except DelafsError as e:
                    o["errors"].append(f"readlink: {_errname(e)}")
            o["xattrs"] = {}
            try:
                names = await op(fs.listxattr, inode.ino)
            except DelafsError as e:
                o["errors"].append(f"listxattr: {_errname(e)}")
                names = []
            for xname in names:
                try:
                    o["xattrs"][xname.hex()] = (await op(fs.getxattr, inode.ino, xname)).hex()
                except DelafsError as e:
                    o["xattrs"][xname.hex()] = None
                    o["errors"].append(f"getxattr {xname!r}: {_errname(e)}")
            if o["kind"] == "dir":
                queue.append((rel, inode.ino))
    return obs


async def _read_library(m: Mount, ino: int, cap: int, o: dict, op) -> None:
    h = hashlib.sha256()
    size = 0
    try:
        f = await op(m.open, ino, write=False)
    except DelafsError as e:
        o["errors"].append(f"open: {_errname(e)}")
        return
    try:
        while size < cap:
            data = await op(m.read, f, size, READ_CHUNK)
            if not data:
                break
            h.update(data)
            size += len(data)
    except DelafsError as e:
        o["errors"].append(f"read at {size}: {_errname(e)}")
        # A user retries a failed read: the first failure must not have
        # left anything locked that the second waits for.
        try:
            await op(m.read, f, size, READ_CHUNK)
        except DelafsError as e:
            o["errors"].append(f"read again at {size}: {_errname(e)}")
    finally:
        o["size"], o["sha"] = size, h.hexdigest()
        try:
            await op(m.release, f)
        except DelafsError as e:
            o["errors"].append(f"release: {_errname(e)}")


def _new_file_data(index: int) -> bytes:
    return random.Random(f"delafs-fuzz-new:{index}").randbytes(100 << 10)


async def _mount_library(path: str, states: list[State], index: int, limits: Limits) -> dict:
    """Step b in-process: open, walk, write a file, fsync, unmount."""
    res: dict = {"refused": None, "hang": None, "traceback": None, "write": None, "unmount": None}
    dev = BlockDevice.open(path)
    try:
        try:
            with trio.fail_after(limits.mount):
                fs = await Filesystem.open(dev)
        except DelafsError as e:
            res["refused"] = str(e)
            return res
        except trio.TooSlowError:
            res["hang"] = f"Filesystem.open did not return within {limits.mount}s"
            return res
        m = Mount(fs)
        async with trio.open_nursery() as nursery:
            await m.start(nursery)
            try:
                obs = await _walk_library(m, states, limits.op)
                res.update(compare(obs, states))
                res["write"] = await _write_library(m, index, limits.op)
                try:
                    with trio.fail_after(limits.unmount):
                        await m.unmount()
                    res["unmount"] = "ok"
                except DelafsError as e:
                    res["unmount"] = _errname(e)
                except trio.TooSlowError:
                    raise Hang(f"unmount did not return within {limits.unmount}s") from None
            except Hang as e:
                # The mount is wedged: a daemon in this state would be
                # killed, so nothing more is tried on it.
                res["hang"] = str(e)
            except Exception:
                res["traceback"] = traceback.format_exc()
            nursery.cancel_scope.cancel()
    finally:
        dev.close()
    return res


async def _write_library(m: Mount, index: int, limit: float) -> str:
    fs = m.fs
    try:
        with trio.fail_after(limit):
            inode = await fs.create(ROOT_INO, NEW_FILE.encode(), stat.S_IFREG | 0o644)
            f = await m.open(inode.ino, write=True)
            try:
                await m.write(f, 0, _new_file_data(index))
                await m.fsync(f)
            finally:
                await m.release(f)
        return "ok"
    except DelafsError as e:
        return _errname(e)
    except trio.TooSlowError:
        raise Hang(f"writing {NEW_FILE} did not finish within {limit}s") from None


# -- step b through the real daemon ------------------------------------------------------

def fuse_reader(mnt: str, expected_file: str) -> int:
    """The child process of FUSE mode: walk the mount with os.* calls,
    printing one observation per line as it goes (the parent calls a
    reader that prints nothing for too long stuck), then write a file."""
    with open(expected_file) as f:
        exp = json.load(f)
    children, caps, index = exp["children"], exp["caps"], exp["index"]

    def emit(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    queue = [""]
    while queue:
        d = queue.pop(0)
        listed: set[str] = set()
        try:
            listed = set(os.listdir(os.path.join(mnt, d)))
        except OSError as e:
            emit({"path": d, "listed": True, "kind": None, "errors": [f"readdir: {_errname(e)}"]})
        for name in sorted(listed | set(children.get(d, ()))):
            if not d and name in (LOST_FOUND, NEW_FILE):
                continue
            rel = f"{d}/{name}" if d else name
            full = os.path.join(mnt, rel)
            o: dict = {"path": rel, "listed": name in listed, "errors": []}
            emit({"progress": rel})
            try:
                st = os.lstat(full)
            except OSError as e:
                o["kind"] = "missing" if e.errno == errno.ENOENT else None
                if e.errno != errno.ENOENT:
                    o["errors"].append(f"lookup: {_errname(e)}")
                emit(o)
                continue
            o["kind"] = _kind(st.st_mode)
            if o["kind"] == "file":
                h, size = hashlib.sha256(), 0
                try:
                    with open(full, "rb", buffering=0) as f:
                        while size < caps.get(rel, 1 << 20):
                            data = f.read(READ_CHUNK)
                            if not data:
                                break
                            h.update(data)
                            size += len(data)
                except OSError as e:
                    o["errors"].append(f"read at {size}: {_errname(e)}")
                    try:            # a user retries a failed read (see _read_library)
                        with open(full, "rb", buffering=0) as f:
                            f.seek(size)
                            f.read(READ_CHUNK)
                    except OSError as e:
                        o["errors"].append(f"read again at {size}: {_errname(e)}")
                o["size"], o["sha"] = size, h.hexdigest()
            elif o["kind"] == "symlink":
                try:
                    o["target"] = os.fsencode(os.readlink(full)).hex()
                except OSError as e:
                    o["errors"].append(f"readlink: {_errname(e)}")
            o["xattrs"] = {}
            try:
                names = os.listxattr(full, follow_symlinks=False)
            except OSError as e:
                o["errors"].append(f"listxattr: {_errname(e)}")
                names = []
            for xname in names:
                try:
                    o["xattrs"][xname.encode().hex()] = os.getxattr(full, xname, follow_symlinks=False).hex()
                except OSError as e:
                    o["xattrs"][xname.encode().hex()] = None
                    o["errors"].append(f"getxattr {xname!r}: {_errname(e)}")
            emit(o)
            if o["kind"] == "dir":
                queue.append(rel)
    try:
        with open(os.path.join(mnt, NEW_FILE), "wb") as f:
            f.write(_new_file_data(index))
            f.flush()
            os.fsync(f.fileno())
        emit({"write": "ok"})
    except OSError as e:
        emit({"write": _errname(e)})
    emit({"done": True})
    return 0


def _read_lines(proc: subprocess.Popen, idle: float) -> tuple[list[dict], bool]:
    """Observations from the reader; True if it printed nothing for ``idle`` seconds."""
    fd = proc.stdout.fileno()
    buf = b""
    lines: list[dict] = []
    while True:
        ready, _, _ = select.select([fd], [], [], idle)
        if not ready:
            return lines, True
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return lines, False
        *complete, buf = (buf + chunk).split(b"\n")
        lines += [json.loads(line) for line in complete if line]


def _mount_fuse(path: str, states: list[State], index: int, ctx: Context) -> dict:
    """Step b through the real daemon: delafs mount, the reader child,
    delafs umount; a stuck reader is a HANG (the daemon is killed, the
    mount lazily detached).  The daemon's log is searched for tracebacks."""
    res: dict = {"refused": None, "hang": None, "traceback": None, "write": None,
                 "unmount": None, "daemon_tracebacks": 0}
    mnt = tempfile.mkdtemp(prefix=f"img{index}-", dir=ctx.mnt_base)
    m = DelafsMount(path, mnt, "", path + ".daemon.log")
    state_file = os.path.join(ctx.workdir, f"fuse-{index}.json")
    try:
        try:
            m.mount()
        except AssertionError as e:
            res["refused"] = str(e).splitlines()[0]
            return res
        with open(state_file, "w") as f:
            json.dump({"mnt": mnt, "pid": m.pid, "image": path}, f)
        expected = path + ".expected.json"
        with open(expected, "w") as f:
            json.dump({"children": {k: sorted(v) for k, v in _children(states).items()},
                       "caps": _read_caps(states), "index": index}, f)
        with open(path + ".reader.err", "wb") as err:
            proc = subprocess.Popen([PYTHON, __file__, "--read-mount", mnt, expected],
                                    stdout=subprocess.PIPE, stderr=err)
            lines, stuck = _read_lines(proc, ctx.limits.reader)
            obs = [o for o in lines if "path" in o]
            res.update(compare(obs, states))
            res["write"] = next((o["write"] for o in lines if "write" in o), None)
            if stuck:
                last = next((o["progress"] for o in reversed(lines) if "progress" in o), "the start")
                res["hang"] = f"reader stuck for {ctx.limits.reader}s at {last}"
                if m.pid and is_our_daemon(m.pid, m.image):
                    os.kill(m.pid, signal.SIGKILL)
                    wait_until(lambda: not pid_alive(m.pid), 10)
                m.forget_daemon()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            else:
                proc.wait()
        if not stuck and not any("done" in o for o in lines):
            with open(path + ".reader.err", errors="replace") as f:
                res["traceback"] = "FUSE reader failed:\n" + f.read()[-3000:]
        if not stuck:
            try:
                m.umount()
                res["unmount"] = "ok"
            except (AssertionError, subprocess.TimeoutExpired) as e:
                res["unmount"] = str(e).splitlines()[0]
    finally:
        m.cleanup()
        log = m.tracebacks()
        res["daemon_tracebacks"] = log.count(TRACEBACK)
        if log:
            res["traceback"] = (res["traceback"] or "") + "in the daemon's log:\n" + _last_traceback(log)
        for leftover in (state_file, path + ".expected.json", path + ".reader.err", path + ".daemon.log"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        if not os.listdir(mnt):
            os.rmdir(mnt)
    return res


TRACEBACK = "Traceback (most recent call last)"


def _last_traceback(text: str) -> str:
    """The last traceback in a log, up to its exception line."""
    lines = text[text.rindex(TRACEBACK):].splitlines()
    for i, line in enumerate(lines[1:], 1):
        if line and not line[0].isspace():
            return "\n".join(lines[:i + 1])
    return "\n".join(lines)


def _cleanup_fuse(workdir: str, index: int) -> None:
    """After killing a worker in the middle of a FUSE-mode image: its daemon
    (only if the pid still is a delafs daemon of that image) and its mount."""
    state_file = os.path.join(workdir, f"fuse-{index}.json")
    if not os.path.exists(state_file):
        return
    with open(state_file) as f:
        st = json.load(f)
    if pid_alive(st["pid"]) and is_our_daemon(st["pid"], st["image"]):
        os.kill(st["pid"], signal.SIGKILL)
        wait_until(lambda: not pid_alive(st["pid"]), 10)
    subprocess.run(["fusermount3", "-u", "-z", st["mnt"]], capture_output=True, check=False)
    os.unlink(state_file)


# ---------------------------------------------------------------------------
# Steps a, c, d and one whole image
# ---------------------------------------------------------------------------

async def _fsck(path: str, repair: bool) -> dict:
    with BlockDevice.open(path, readonly=not repair) as dev:
        report = await check(dev, repair=repair, out=io.StringIO())
    return {"exit": report.exit_code, "errors": report.errors[:5], "nerrors": len(report.errors),
            "fixed": len(report.fixed)}


async def _loss(path: str, src: Source, leaf: int) -> list[str]:
    """Items of the pristine tree outside the damaged leaf that the repaired
    tree no longer holds (or holds with another value; inode items are
    exempt, repair fixes their link counts and sizes).  Items that only
    make sense with an inode the leaf held whole (entries naming it, its
    orphan record) are consequences of the leaf, not extra loss; an inode
    whose other items live elsewhere is made anew by repair, so those
    items and the entries naming it must survive."""
    held = set(src.nodes[leaf][1])
    outside = {k[0] for k in src.items if k not in held}
    lost_inodes = {k[0] for k in held if k[1] == T_INODE} - outside
    try:
        with BlockDevice.open(path, readonly=True) as dev:
            _, nodes, _ = await _open_view(dev)
    except DelafsError as e:
        return [f"repaired image unreadable: {e}"]
    after = _items(nodes)
    out = []
    for key, value in src.items.items():
        if key in held or key[0] in lost_inodes:
            continue
        if key[1] == T_DIRENT and decode_dirent(value)[0] in lost_inodes:
            continue
        if key[1] == T_ORPHAN and key[2] in lost_inodes:
            continue
        if key not in after:
            out.append(f"item {key} lost")
        elif key[1] != T_INODE and after[key] != value:
            out.append(f"item {key} changed")
    return out


def _step(fn, *args, timeout: float) -> dict:
    """Run one async step in its own trio run: a timeout is a hang, any
    exception escaping it a traceback."""
    async def main():
        with trio.fail_after(timeout):
            return await fn(*args)
    try:
        return trio.run(main)
    except trio.TooSlowError:
        return {"hang": f"{fn.__name__} did not finish within {timeout}s"}
    except Exception:
        return {"traceback": traceback.format_exc()}


@dataclass
class Context:
    """Everything a worker needs, sent to it once."""
    seed: int
    sources: dict[str, Source]
    workdir: str
    limits: Limits
    mnt_base: str


def check_image(plan: Plan, ctx: Context) -> dict:
    """Damage a sparse copy of the source as planned and run steps a-d."""
    src = ctx.sources[plan.variant]
    path = os.path.join(ctx.workdir, f"image-{plan.index}.img")
    t0 = time.monotonic()
    rec: dict = {"seed": plan.seed, "index": plan.index, "variant": plan.variant,
                 "mode": "fuse" if plan.fuse else "library", "structure": plan.structure}
    sparse_copy(src.image, path)
    try:
        for d in plan.damages:
            apply_damage(path, src, d)
        rec["damage"] = [asdict(d) | {"text": d.describe()} for d in plan.damages]
        lim = ctx.limits
        rec["fsck_n"] = _step(_fsck, path, False, timeout=lim.fsck)
        # A journal record damaged: the trees before the last transactions
        # are correct answers too (see Source).
        states = src.states if any(d.structure == "journal log" for d in plan.damages) else src.states[:1]
        if plan.fuse:
            rec["mount"] = _mount_fuse(path, states, plan.index, ctx)
        else:
            budget = lim.mount + lim.unmount + lim.op * 4 + 120
            rec["mount"] = _step(_mount_library, path, states, plan.index, lim, timeout=budget)
        rec["fsck_y"] = _step(_fsck, path, True, timeout=lim.fsck)
        rec["fsck_n2"] = _step(_fsck, path, False, timeout=lim.fsck)
        if len(plan.damages) == 1 and plan.damages[0].structure == "btree leaf" \
                and "hang" not in rec["fsck_y"] and "traceback" not in rec["fsck_y"]:
            rec["loss"] = _step(_loss, path, src, plan.damages[0].block, timeout=lim.fsck)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    rec["seconds"] = round(time.monotonic() - t0, 3)
    return classify(rec)


def classify(rec: dict) -> dict:
    """The outcome columns of one record, and the reasons it fails acceptance."""
    steps = {k: rec.get(k) or {} for k in ("fsck_n", "mount", "fsck_y", "fsck_n2")}
    mount = steps["mount"]
    loss = rec.get("loss")
    if isinstance(loss, dict):          # the loss step itself hung or raised
        steps["loss"] = loss
        loss = []
    rec["hangs"] = [k for k, v in steps.items() if v.get("hang")]
    rec["tracebacks"] = [k for k, v in steps.items() if v.get("traceback")]
    rec["refused"] = bool(mount.get("refused"))
    rec["eio"] = mount.get("nerrors", 0) > 0
    rec["wrong"] = mount.get("nwrong", 0)
    # A resealed entry naming another inode of the same type is a valid
    # reference swapped for another: no reader can tell without back
    # pointers (fsck finds it by the link counts).  Its one wrong path is
    # counted apart, never more than one.
    redirect = any(d.get("detail", "").endswith("directory entry other inode")
                   for d in rec.get("damage", ()))
    rec["redirected"] = 1 if redirect and rec["wrong"] == 1 else 0
    rec["wrong"] -= rec["redirected"]
    rec["loss_violations"] = len(loss or ())
    y = steps["fsck_y"]
    rec["converged"] = steps["fsck_n2"].get("exit") == 0
    rec["exit4"] = y.get("exit") == EXIT_UNCORRECTED
    rec["exit4_reason"] = rec["exit4"] and bool(y.get("errors"))
    rec["umount_failed"] = rec["mode"] == "fuse" and not mount.get("refused") \
        and not mount.get("hang") and mount.get("unmount") != "ok"
    why = []
    why += [f"hang in {k}: {steps[k]['hang']}" for k in rec["hangs"]]
    why += [f"traceback in {k}: {steps[k]['traceback'].strip().splitlines()[-1]}" for k in rec["tracebacks"]]
    if rec["wrong"]:
        why.append(f"wrong data: {'; '.join(mount['wrong'][:3])}")
    if rec["loss_violations"]:
        why.append(f"loss: {rec['loss_violations']} items ({'; '.join(loss[:3])})")
    if rec["exit4"] and not rec["exit4_reason"]:
        why.append("fsck -y exited 4 without naming an error")
    if not rec["converged"] and not rec["exit4_reason"]:
        why.append(f"fsck -y did not converge (exit {y.get('exit')}, then fsck -n exit "
                   f"{steps['fsck_n2'].get('exit')}: {'; '.join(steps['fsck_n2'].get('errors', [])[:2])})")
    if rec["umount_failed"]:
        why.append(f"delafs umount failed: {mount.get('unmount')}")
    rec["failures"] = why
    return rec


# ---------------------------------------------------------------------------
# The worker pool
# ---------------------------------------------------------------------------

class _LogTail(logging.Handler):
    """What delafs logs while one image is checked (errors it met, a
    shutdown): kept in the record instead of cluttering the terminal."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}"[:500])


def _worker_main(conn, ctx_file: str) -> None:
    with open(ctx_file, "rb") as f:
        ctx = pickle.load(f)
    log = logging.getLogger("delafs")
    log.propagate = False
    log.setLevel(logging.INFO)
    while (plan := conn.recv()) is not None:
        tail = _LogTail()
        log.addHandler(tail)
        try:
            rec = check_image(plan, ctx)
        except Exception:
            rec = classify({"seed": plan.seed, "index": plan.index, "variant": plan.variant,
                            "mode": "fuse" if plan.fuse else "library",
                            "structure": plan.structure,
                            "mount": {"traceback": "the fuzzer itself failed:\n" + traceback.format_exc()}})
        log.removeHandler(tail)
        rec["log"] = tail.lines[-20:]
        conn.send(rec)


class _Worker:
    def __init__(self, mp, ctx_file: str):
        self.conn, child = mp.Pipe()
        self.proc = mp.Process(target=_worker_main, args=(child, ctx_file), daemon=True)
        self.proc.start()
        child.close()
        self.plan: Plan | None = None
        self.deadline = 0.0

    def stop(self) -> None:
        """Kill this worker (our own child process) and reap it."""
        self.proc.kill()
        self.proc.join(10)


def _run_pool(plans: list[Plan], ctx: Context, jobs: int, progress) -> list[dict]:
    """Run the plans on ``jobs`` spawned workers (spawned, not forked: the
    caller may be a pytest process with threads).  A worker that does not
    answer within Limits.image is killed and its image recorded as a hang."""
    mp = multiprocessing.get_context("spawn")
    ctx_file = os.path.join(ctx.workdir, "context.pickle")
    with open(ctx_file, "wb") as f:
        pickle.dump(ctx, f)
    todo = list(reversed(plans))
    workers = [_Worker(mp, ctx_file) for _ in range(max(1, min(jobs, len(plans))))]
    records: list[dict] = []
    try:
        while todo or any(w.plan for w in workers):
            for w in workers:
                if w.plan is None and todo:
                    w.plan = todo.pop()
                    w.deadline = time.monotonic() + ctx.limits.image
                    w.conn.send(w.plan)
            busy = [w for w in workers if w.plan]
            timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = wait_connections([w.conn for w in busy], timeout)
            for i, w in enumerate(workers):
                if not w.plan:
                    continue
                rec = None
                if w.conn in ready:
                    try:
                        rec = w.conn.recv()
                    except EOFError:
                        rec = _lost_record(w.plan, "traceback", f"worker died (exit {w.proc.exitcode})")
                elif time.monotonic() >= w.deadline:
                    rec = _lost_record(w.plan, "hang", f"the image took longer than {ctx.limits.image}s: worker killed")
                else:
                    continue
                if not w.proc.is_alive() or rec.get("lost"):
                    w.stop()
                    if w.plan.fuse:
                        _cleanup_fuse(ctx.workdir, w.plan.index)
                    workers[i] = w = _Worker(mp, ctx_file)
                w.plan = None
                records.append(rec)
                progress(rec, len(records), len(plans))
    finally:
        for w in workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
            w.proc.join(30)
            if w.proc.is_alive():
                w.stop()
    return sorted(records, key=lambda r: r["index"])


def _lost_record(plan: Plan, what: str, why: str) -> dict:
    return classify({"seed": plan.seed, "index": plan.index, "variant": plan.variant,
                     "mode": "fuse" if plan.fuse else "library", "structure": plan.structure,
                     "damage": [asdict(d) | {"text": d.describe()} for d in plan.damages],
                     "mount": {what: why}, "lost": True})


# ---------------------------------------------------------------------------
# The run, the table, acceptance
# ---------------------------------------------------------------------------

COLUMNS = ["images", "refused", "EIO", "wrong", "redirected", "hangs", "tracebacks", "converged",
           "exit 4 (reason)", "unexplained", "loss", "umount fail"]


@dataclass
class Result:
    records: list[dict]
    replay: str                     # the command line that replays an image, {index} left open
    sources_dir: str | None = None

    def rows(self) -> list[tuple[str, list[dict]]]:
        groups: list[tuple[str, list[dict]]] = [("all", self.records)]
        for key, label in (("variant", "variant"), ("mode", "step b"), ("structure", "")):
            values = sorted({r[key] for r in self.records})
            if key == "mode" and len(values) < 2:
                continue
            groups += [(f"{label} {v}".strip(), [r for r in self.records if r[key] == v]) for v in values]
        return groups

    @staticmethod
    def _cells(recs: list[dict]) -> list[str]:
        n = len(recs)
        conv = sum(r["converged"] for r in recs)
        exit4 = sum(r["exit4"] for r in recs)
        return [str(n), str(sum(r["refused"] for r in recs)), str(sum(r["eio"] for r in recs)),
                str(sum(r["wrong"] > 0 for r in recs)), str(sum(r["redirected"] for r in recs)),
                str(sum(bool(r["hangs"]) for r in recs)),
                str(sum(bool(r["tracebacks"]) for r in recs)),
                f"{conv} ({100 * conv / n:.1f}%)" if n else "0",
                f"{exit4} ({sum(r['exit4_reason'] for r in recs)})",
                str(sum((not r["converged"]) and not r["exit4_reason"] for r in recs)),
                str(sum(r["loss_violations"] > 0 for r in recs)),
                str(sum(r["umount_failed"] for r in recs))]

    def table(self) -> str:
        rows = [(label, self._cells(recs)) for label, recs in self.rows()]
        w0 = max(len(label) for label, _ in rows)
        widths = [max(len(c), *(len(cells[i]) for _, cells in rows)) for i, c in enumerate(COLUMNS)]
        lines = [" " * w0 + "  " + "  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths))]
        for label, cells in rows:
            lines.append(label.ljust(w0) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths)))
        legend = ("images counted per column; EIO: some request answered an error (allowed); "
                  "converged: fsck -n clean after fsck -y; exit 4 (reason): fsck -y exit 4 "
                  "(of them with errors named); unexplained: not converged and no exit 4 with a "
                  "reason; loss: items outside one damaged leaf lost by repair; redirected: an "
                  "entry resealed to name another inode of the same type, which no reader can "
                  "tell (its one path reads that inode)")
        return "\n".join(lines) + "\n" + legend

    def failures(self) -> list[str]:
        out = []
        for r in self.records:
            if r["failures"]:
                what = "; ".join(d["text"] for d in r.get("damage", ())) or r["structure"]
                fuse = f" --fuse {r['index'] + 1}" if r["mode"] == "fuse" else ""
                out.append(f"image {r['index']} ({r['variant']}, {what}): {' | '.join(r['failures'])}\n"
                           f"    replay: {self.replay.format(index=r['index'])}{fuse}")
        return out

    def acceptance_failures(self) -> list[str]:
        """Issue 10's acceptance: 0 hangs, tracebacks, wrong data and loss
        violations; fsck -y converges on >= 95 % of the images and each of
        the rest exits 4 naming what it could not save; delafs umount
        always unmounts."""
        recs = self.records
        n = len(recs)
        bad = []
        for what, count in (("hangs", sum(bool(r["hangs"]) for r in recs)),
                            ("tracebacks", sum(bool(r["tracebacks"]) for r in recs)),
                            ("images with wrong data", sum(r["wrong"] > 0 for r in recs)),
                            ("loss violations", sum(r["loss_violations"] > 0 for r in recs)),
                            ("failed delafs umounts", sum(r["umount_failed"] for r in recs)),
                            ("non-converged images without fsck -y exit 4 and a reason",
                             sum((not r["converged"]) and not r["exit4_reason"] for r in recs)),
                            ("fsck -y exit 4 without a reason",
                             sum(r["exit4"] and not r["exit4_reason"] for r in recs))):
            if count:
                bad.append(f"{count} {what}")
        conv = sum(r["converged"] for r in recs)
        if n and conv < 0.95 * n:
            bad.append(f"fsck -y converged on {conv} of {n} images ({100 * conv / n:.1f}% < 95%)")
        return bad

    def summary(self) -> dict:
        return {label: dict(zip(COLUMNS, self._cells(recs))) for label, recs in self.rows()}


def run_fuzz(*, seed: int, images: int = 0, indices: list[int] | None = None, fuse: int = 0,
             sources: dict[str, Source], workdir: str, jobs: int | None = None,
             limits: Limits | None = None, mnt_base: str | None = None,
             sources_dir: str | None = None, json_path: str | None = None,
             progress=None) -> Result:
    """Fuzz images ``range(images)`` (or ``indices``); those with index <
    ``fuse`` do step b through the real daemon."""
    os.makedirs(workdir, exist_ok=True)
    ctx = Context(seed, sources, workdir, limits or Limits(), mnt_base or workdir)
    plans = [plan_image(seed, i, sources, fuse=i < fuse) for i in (indices if indices is not None else range(images))]
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    python = os.path.relpath(PYTHON, TESTS.parent) if PYTHON.startswith(str(TESTS.parent)) else PYTHON
    replay = f"{python} -m tests.fuzz.corrupt --seed {seed} --index {{index}}" + \
        (f" --sources {sources_dir}" if sources_dir else "")
    t0 = time.monotonic()
    records = _run_pool(plans, ctx, jobs, progress or (lambda rec, done, total: None))
    result = Result(records, replay, sources_dir)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"seed": seed, "images": len(records), "seconds": round(time.monotonic() - t0, 1),
                       "summary": result.summary(), "acceptance_failures": result.acceptance_failures(),
                       "records": records}, f, indent=1, default=str)
    return result


_last_progress = [0.0]


def _print_progress(rec: dict, done: int, total: int) -> None:
    if rec["failures"] or done == total or time.monotonic() - _last_progress[0] > 10:
        _last_progress[0] = time.monotonic()
        flag = f"  image {rec['index']}: {' | '.join(rec['failures'])[:200]}" if rec["failures"] else ""
        print(f"[{done}/{total}]{flag}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--read-mount"]:
        return fuse_reader(argv[1], argv[2])
    p = argparse.ArgumentParser(prog="python -m tests.fuzz.corrupt", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=300, help="fuzz images 0..N-1 (default 300)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--index", type=int, action="append", help="only this image (repeatable): a replay")
    p.add_argument("--fuse", type=int, default=0, metavar="N",
                   help="images with index < N do step b through the real daemon")
    p.add_argument("--json", metavar="FILE", help="write every per-image record here")
    p.add_argument("--jobs", type=int, help="worker processes (default: the cores, at most 4)")
    p.add_argument("--sources", metavar="DIR",
                   help="keep (or reuse) the source images here: needed for an exact replay")
    p.add_argument("--workdir", metavar="DIR", help="where the damaged copies go (default: a temporary dir)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="delafs-fuzz-") as tmp:
        sources_dir = args.sources or os.path.join(tmp, "sources")
        t0 = time.monotonic()
        sources = cached_sources(sources_dir, args.seed, mnt_base=tmp)
        print(f"source images ready ({time.monotonic() - t0:.1f}s)", file=sys.stderr)
        t0 = time.monotonic()
        result = run_fuzz(seed=args.seed, images=args.images, indices=args.index, fuse=args.fuse,
                          sources=sources, workdir=args.workdir or os.path.join(tmp, "work"),
                          jobs=args.jobs, mnt_base=tmp, sources_dir=args.sources,
                          json_path=args.json, progress=_print_progress)
        took = time.monotonic() - t0
    print(result.table())
    n = len(result.records)
    print(f"\n{n} images in {took:.1f}s ({took / max(n, 1):.2f}s each, wall clock)")
    failures = result.failures()
    if failures:
        print(f"\n{len(failures)} images fail acceptance:")
        print("\n".join(failures))
        if not args.sources:
            print("(the source images are gone: pass --sources DIR to keep them for exact replays)")
    bad = result.acceptance_failures()
    print("\nacceptance: " + ("met" if not bad else "NOT met: " + "; ".join(bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
