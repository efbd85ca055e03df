"""Shared helpers of the crash-consistency tests.

* :func:`logical_snapshot` walks a mounted :class:`~delafs.fs.filesystem.Filesystem`
  from the root and returns what a user can observe: per path the type,
  mode, inode number, link count, size, a hash of the contents (files) or the
  target (symlinks), and the extended attributes.
* :class:`Workload` is a seeded generator of metadata and data operations
  that keeps its own model of the namespace, so it never needs to re-read the
  tree to pick its next operation.
* :func:`record_workload` runs a workload on a device with a
  :class:`~delafs.block.device.Recorder` attached, commits every few operations
  and returns a :class:`Trace`: every state that became durable, with the
  position in the event stream where its commit started and where its
  journal flush completed, plus every in-place data version written after it.
* :func:`delafs.testing.crashsim.crash_cuts` (re-exported here) lists the crash
  matrix of a stream, keeping each cut's prefix length.
* :func:`verify_crash_image` runs fsck -n on a crash image, mounts it
  read-only (in-memory replay) and read-write (recovery), checks that both
  see the same tree and that it is a committed state allowed at that cut,
  and runs fsck again after a clean unmount.

Data blocks are written in place (DESIGN, "Durability model"): an overwrite
of blocks a file already owns may reach the disk before the metadata of the
operation commits.  The comparison therefore matches the *metadata* of the
recovered tree exactly against one committed state, and the contents of each
file 512-byte sector by sector against that state or any in-place version of
the same inode written after it and before the cut.  Anything else (a stale
block of a deleted file, zeros where data was committed, a torn sector of a
file that was never rewritten) fails.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import stat
import types
import uuid
from dataclasses import dataclass, field

import trio

from delafs import ondisk
from delafs.block import BLOCK_SIZE, BlockDevice, Recorder
from delafs.fs.filesystem import Filesystem
from delafs.fs.fsck import check
from delafs.fs.items import dtype_of
from delafs.lib.errors import FsError
from delafs.testing.crashsim import Cut, build_image, crash_cuts, flush_points  # noqa: F401 (re-exported)

ROOT = 1
SECTOR = 512


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


class InlineDevice(BlockDevice):
    """A BlockDevice whose async I/O runs inline instead of in a worker thread.

    Checking a crash image is hundreds of one-block reads (journal scan,
    btree walk); the thread hop per read dominated the test's run time, and
    so did fdatasync of the throw-away image on the host, which ``flush``
    skips.  The filesystem sees the same device semantics (every request
    completes in order before the call returns): only the scheduling
    differs, and every call is still a trio checkpoint.
    """

    async def read(self, blk, count):
        await trio.lowlevel.checkpoint()
        return self.read_sync(blk, count)

    async def write(self, blk, bufs):
        await trio.lowlevel.checkpoint()
        self.write_sync(blk, bufs)

    async def flush(self):
        # The order of requests is all a crash image's checker needs; making
        # a throw-away file durable on the host only costs time.
        await trio.lowlevel.checkpoint()
        self.note_flushed(self.writes_done())
        if self.recorder is not None:
            self.recorder.events.append(("flush",))

    async def write_fua(self, writes, *, preflush):
        if preflush:
            await self.flush()
        for blk, bufs in writes:
            await self.write(blk, bufs)
        await self.flush()

    async def discard(self, blk, count):
        await trio.lowlevel.checkpoint()
        self.discard_sync(blk, count)


# ---------------------------------------------------------------------------
# Logical snapshot
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """What a user sees of one path.  ``payload`` is the content hash of a
    regular file, the target of a symlink, None for a directory."""

    kind: str
    mode: int
    ino: int
    nlink: int
    size: int
    payload: object
    xattrs: tuple

    def meta(self) -> tuple:
        """Everything but a regular file's contents."""
        return (self.kind, self.mode, self.ino, self.nlink, self.size,
                None if self.kind == "reg" else self.payload, self.xattrs)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "reg"
    if stat.S_ISLNK(mode):
        return "lnk"
    return "other"


async def readdir_all(fs: Filesystem, ino: int) -> list[tuple[bytes, int, int]]:
    out = []
    cookie = 0
    while True:
        batch = await fs.readdir(ino, cookie, 64)
        if not batch:
            return out
        for name, child, dtype, nxt in batch:
            out.append((name, child, dtype))
            cookie = nxt


async def logical_snapshot(fs: Filesystem, contents: dict[str, bytes] | None = None) -> dict[bytes, Entry]:
    """Walk the tree from the root: ``{path: Entry}`` (root is ``b"/"``).

    File contents are read with ``pread`` and hashed; when ``contents`` is
    given, every file's bytes are stored in it under their hash (the crash
    checker needs them to compare sector by sector).
    """
    snap: dict[bytes, Entry] = {}

    async def entry(inode) -> Entry:
        ino = inode.ino
        kind = _kind(inode.mode)
        payload = None
        if kind == "reg":
            data = await fs.pread(ino, 0, inode.size)
            assert len(data) == inode.size, f"inode {ino}: pread {len(data)} of {inode.size} bytes"
            payload = sha(data)
            if contents is not None:
                contents.setdefault(payload, data)
        elif kind == "lnk":
            payload = await fs.readlink(ino)
        xattrs = []
        for name in await fs.listxattr(ino):
            xattrs.append((name, sha(await fs.getxattr(ino, name))))
        return Entry(kind, inode.mode, ino, inode.nlink, inode.size, payload, tuple(sorted(xattrs)))

    async def walk(path: bytes, ino: int) -> None:
        for name, child, dtype in await readdir_all(fs, ino):
            cpath = (path.rstrip(b"/") + b"/" + name)
            looked = await fs.lookup(ino, name)
            assert looked.ino == child, f"{cpath!r}: readdir says {child}, lookup {looked.ino}"
            e = await entry(looked)
            assert dtype == dtype_of(e.mode), f"{cpath!r}: d_type {dtype} for mode {e.mode:o}"
            snap[cpath] = e
            if e.kind == "dir":
                await walk(cpath, child)

    snap[b"/"] = await entry(await fs.getattr(ROOT))
    await walk(b"/", ROOT)
    return snap


def meta_of(snap: dict[bytes, Entry]) -> dict[bytes, tuple]:
    return {p: e.meta() for p, e in snap.items()}


def describe_diff(a: dict[bytes, Entry], b: dict[bytes, Entry], limit: int = 8) -> str:
    lines = []
    for p in sorted(set(a) | set(b)):
        if a.get(p) != b.get(p):
            lines.append(f"  {p!r}: {a.get(p)} != {b.get(p)}")
            if len(lines) >= limit:
                lines.append("  ...")
                break
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Workload generator
# ---------------------------------------------------------------------------

SMALL_XATTR = (1, 200)
BIG_XATTR = (600, 9000)          # > XATTR_INLINE_MAX (512): out of line
LONG_SYMLINK = (1100, 4000)      # > SYMLINK_INLINE_MAX (1000): out of line


@dataclass
class OpResult:
    desc: str
    ino: int | None = None       # a regular file whose contents changed (or may have)
    ok: bool = True


class Workload:
    """A seeded stream of filesystem operations over a small namespace.

    The model is ``paths: {path: (kind, ino)}`` (root ``b"/"`` included);
    hard links are several paths with one ino.  Names are drawn from small
    pools so that renames replace, links collide and directories fill up
    and empty again.  Operations the filesystem refuses (ENOTEMPTY, EINVAL
    for a directory moved into itself, ...) are allowed and must change
    nothing: the model is only updated on success.
    """

    def __init__(self, fs: Filesystem, rng: random.Random, *, max_file: int = 96 * 1024,
                 max_entries: int = 60):
        self.fs = fs
        self.rng = rng
        self.max_file = max_file
        self.max_entries = max_entries
        self.paths: dict[bytes, tuple[str, int]] = {b"/": ("dir", ROOT)}
        self.sizes: dict[int, int] = {}
        self.xattrs: dict[int, set[bytes]] = {}
        # Inodes held open (fs.open_ref): unlinking the last name of one
        # makes an orphan, freed on close or reaped by the next mount.
        self.opened: list[int] = []

    @classmethod
    async def attach(cls, fs: Filesystem, rng: random.Random, **kw) -> "Workload":
        """A workload continuing on an existing tree (after a reopen)."""
        w = cls(fs, rng, **kw)
        snap = await logical_snapshot(fs)
        w.paths = {p: (e.kind, e.ino) for p, e in snap.items()}
        w.sizes = {e.ino: e.size for e in snap.values() if e.kind == "reg"}
        w.xattrs = {e.ino: {n for n, _ in e.xattrs} for e in snap.values()}
        return w

    # -- model helpers --------------------------------------------------------

    def _of(self, *kinds: str) -> list[bytes]:
        return sorted(p for p, (k, _) in self.paths.items() if k in kinds)

    @staticmethod
    def _split(path: bytes) -> tuple[bytes, bytes]:
        parent, _, name = path.rpartition(b"/")
        return parent or b"/", name

    @staticmethod
    def _join(parent: bytes, name: bytes) -> bytes:
        return parent.rstrip(b"/") + b"/" + name

    def _ino(self, path: bytes) -> int:
        return self.paths[path][1]

    def _pick_new_path(self, prefix: bytes) -> tuple[bytes, bytes, bytes]:
        parent = self.rng.choice(self._of("dir"))
        name = prefix + str(self.rng.randrange(12)).encode()
        return parent, name, self._join(parent, name)

    def _data(self, n: int) -> bytes:
        # Compressible-looking but position-dependent and unique per write.
        tag = self.rng.randbytes(8)
        reps = -(-n // 16)
        body = b"".join(tag + i.to_bytes(8, "little") for i in range(reps))
        return body[:n]

    def _forget(self, path: bytes) -> None:
        kind, ino = self.paths.pop(path)
        if kind == "dir":
            for p in [p for p in self.paths if p.startswith(path + b"/")]:
                del self.paths[p]
        if not any(i == ino for _, i in self.paths.values()):
            self.sizes.pop(ino, None)
            self.xattrs.pop(ino, None)

    # -- operations -------------------------------------------------------------

    async def step(self) -> OpResult:
        full = len(self.paths) >= self.max_entries
        files = self._of("reg")
        ops = [
            ("mkdir", 0 if full else 3),
            ("create", 0 if full else 6),
            ("pwrite", 14 if files else 0),
            ("truncate", 3 if files else 0),
            ("unlink", 4 if self._of("reg", "lnk") else 0),
            ("rmdir", 1 if len(self._of("dir")) > 1 else 0),
            ("rename", 4 if len(self.paths) > 1 else 0),
            ("link", 0 if full or not files else 2),
            ("symlink", 0 if full else 2),
            ("setxattr", 4),
            ("removexattr", 2 if any(self.xattrs.values()) else 0),
            ("chmod", 1),
            ("exchange", 1 if len(self.paths) > 2 else 0),
            ("open", 2 if files else 0),
            ("close", 2 if self.opened else 0),
        ]
        names = [n for n, w in ops if w]
        weights = [w for _, w in ops if w]
        op = self.rng.choices(names, weights)[0]
        try:
            return await getattr(self, "_op_" + op)()
        except FsError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EINVAL, errno.EEXIST, errno.EISDIR,
                           errno.ENOTDIR, errno.ENOENT, errno.ENOSPC):
                assert self.fs.shutdown is None, f"refused {op} shut the filesystem down: {e}"
                return OpResult(f"{op} refused ({errno.errorcode[e.errno]})", ok=False)
            raise

    async def _op_mkdir(self) -> OpResult:
        parent, name, path = self._pick_new_path(b"d")
        inode = await self.fs.mkdir(self._ino(parent), name, 0o755)
        self.paths[path] = ("dir", inode.ino)
        return OpResult(f"mkdir {path!r}")

    async def _op_create(self) -> OpResult:
        parent, name, path = self._pick_new_path(b"f")
        inode = await self.fs.create(self._ino(parent), name, stat.S_IFREG | 0o644)
        self.paths[path] = ("reg", inode.ino)
        self.sizes[inode.ino] = 0
        return OpResult(f"create {path!r}")

    async def _op_pwrite(self) -> OpResult:
        path = self.rng.choice(self._of("reg"))
        ino = self._ino(path)
        size = self.sizes.get(ino, 0)
        r = self.rng.random()
        if r < 0.25:
            length = self.rng.randint(1, 300)                       # tiny
        elif r < 0.5:
            length = self.rng.randint(300, BLOCK_SIZE - 1)           # partial block
        elif r < 0.65:
            length = BLOCK_SIZE * self.rng.randint(1, 3)             # whole blocks
        else:
            length = self.rng.randint(2 * BLOCK_SIZE, 12 * BLOCK_SIZE)  # multi-block, odd
        where = self.rng.random()
        if where < 0.35 or size == 0:
            off = size                                                # append
        elif where < 0.7:
            off = self.rng.randrange(size)                            # overwrite (in place)
        elif where < 0.85:
            off = self.rng.randrange(0, max(size, 1), BLOCK_SIZE)     # aligned overwrite
        else:
            off = size + self.rng.randint(1, 3 * BLOCK_SIZE)          # past EOF: leaves a hole
        if off + length > self.max_file:
            off = max(0, self.max_file - length - self.rng.randrange(BLOCK_SIZE))
        data = self._data(length)
        await self.fs.pwrite(ino, off, data)
        self.sizes[ino] = max(size, off + length)
        return OpResult(f"pwrite {path!r} [{off}, +{length})", ino)

    async def _op_truncate(self) -> OpResult:
        path = self.rng.choice(self._of("reg"))
        ino = self._ino(path)
        size = self.sizes.get(ino, 0)
        r = self.rng.random()
        if r < 0.15 or size == 0:
            new = 0 if size else self.rng.randint(1, 3 * BLOCK_SIZE)
        elif r < 0.75:
            new = self.rng.randrange(size)                            # shrink, usually unaligned
        else:
            new = min(self.max_file, size + self.rng.randint(1, 2 * BLOCK_SIZE))  # extend
        await self.fs.truncate(ino, new)
        self.sizes[ino] = new
        return OpResult(f"truncate {path!r} {size} -> {new}", ino)

    async def _op_unlink(self) -> OpResult:
        path = self.rng.choice(self._of("reg", "lnk"))
        parent, name = self._split(path)
        await self.fs.unlink(self._ino(parent), name)
        self._forget(path)
        return OpResult(f"unlink {path!r}")

    async def _op_rmdir(self) -> OpResult:
        dirs = [d for d in self._of("dir") if d != b"/"]
        empty = [d for d in dirs if not any(p.startswith(d + b"/") for p in self.paths)]
        path = self.rng.choice(empty if empty and self.rng.random() < 0.8 else dirs)
        parent, name = self._split(path)
        await self.fs.rmdir(self._ino(parent), name)
        self._forget(path)
        return OpResult(f"rmdir {path!r}")

    async def _op_rename(self) -> OpResult:
        src = self.rng.choice([p for p in self.paths if p != b"/"])
        skind, sino = self.paths[src]
        if self.rng.random() < 0.4:
            # Onto an existing name of the same kind (replace).
            same = [p for p, (k, _) in self.paths.items() if k == skind and p not in (src, b"/")]
            dst = self.rng.choice(same) if same else self._pick_new_path(b"r")[2]
        else:
            dst = self._pick_new_path(b"r" if self.rng.random() < 0.5 else src.rpartition(b"/")[2][:1])[2]
        if dst == src:
            return OpResult("rename to itself", ok=False)
        (op_, on), (np_, nn) = self._split(src), self._split(dst)
        if np_ not in self.paths:
            return OpResult("rename into a vanished dir", ok=False)
        await self.fs.rename(self._ino(op_), on, self._ino(np_), nn, 0)
        if dst in self.paths:
            if self.paths[dst][1] == sino:
                return OpResult(f"rename {src!r} -> {dst!r} (same inode: no-op)")
            self._forget(dst)
        moved = {p: v for p, v in self.paths.items() if p == src or p.startswith(src + b"/")}
        for p in moved:
            del self.paths[p]
        for p, v in moved.items():
            self.paths[dst + p[len(src):]] = v
        return OpResult(f"rename {src!r} -> {dst!r}")

    async def _op_link(self) -> OpResult:
        src = self.rng.choice(self._of("reg"))
        parent, name, path = self._pick_new_path(b"l")
        await self.fs.link(self._ino(src), self._ino(parent), name)
        self.paths[path] = ("reg", self._ino(src))
        return OpResult(f"link {src!r} -> {path!r}")

    async def _op_symlink(self) -> OpResult:
        parent, name, path = self._pick_new_path(b"s")
        if self.rng.random() < 0.3:
            n = self.rng.randint(*LONG_SYMLINK)
        else:
            n = self.rng.randint(1, 200)
        target = (b"../" + self.rng.randbytes(8).hex().encode()) * (n // 19 + 1)
        target = target[:n]
        inode = await self.fs.symlink(self._ino(parent), name, target)
        self.paths[path] = ("lnk", inode.ino)
        return OpResult(f"symlink {path!r} ({n} bytes)")

    async def _op_setxattr(self) -> OpResult:
        path = self.rng.choice(sorted(self.paths))
        ino = self._ino(path)
        name = b"user.x" + str(self.rng.randrange(5)).encode()
        big = self.rng.random() < 0.35
        n = self.rng.randint(*(BIG_XATTR if big else SMALL_XATTR))
        await self.fs.setxattr(ino, name, self._data(n))
        self.xattrs.setdefault(ino, set()).add(name)
        return OpResult(f"setxattr {path!r} {name!r} ({n} bytes)")

    async def _op_removexattr(self) -> OpResult:
        path = self.rng.choice([p for p, (_, i) in self.paths.items() if self.xattrs.get(i)])
        ino = self._ino(path)
        name = self.rng.choice(sorted(self.xattrs[ino]))
        await self.fs.removexattr(ino, name)
        self.xattrs[ino].discard(name)
        return OpResult(f"removexattr {path!r} {name!r}")

    async def _op_open(self) -> OpResult:
        path = self.rng.choice(self._of("reg"))
        self.fs.open_ref(self._ino(path))
        self.opened.append(self._ino(path))
        return OpResult(f"open {path!r}")

    async def _op_close(self) -> OpResult:
        ino = self.opened.pop(self.rng.randrange(len(self.opened)))
        orphan = not any(i == ino for _, i in self.paths.values())
        await self.fs.close_ref(ino)
        return OpResult(f"close inode {ino}{' (orphan freed)' if orphan else ''}")

    async def _op_exchange(self) -> OpResult:
        cands = [p for p in self.paths if p != b"/"]
        a, b = self.rng.sample(cands, 2)
        if a.startswith(b + b"/") or b.startswith(a + b"/"):
            return OpResult("exchange of an ancestor: skipped", ok=False)
        (ap, an), (bp, bn) = self._split(a), self._split(b)
        await self.fs.rename(self._ino(ap), an, self._ino(bp), bn, 2)  # RENAME_EXCHANGE
        under_a = {p: v for p, v in self.paths.items() if p == a or p.startswith(a + b"/")}
        under_b = {p: v for p, v in self.paths.items() if p == b or p.startswith(b + b"/")}
        for p in list(under_a) + list(under_b):
            del self.paths[p]
        for p, v in under_a.items():
            self.paths[b + p[len(a):]] = v
        for p, v in under_b.items():
            self.paths[a + p[len(b):]] = v
        return OpResult(f"exchange {a!r} <-> {b!r}")

    async def _op_chmod(self) -> OpResult:
        path = self.rng.choice(sorted(self.paths))
        mode = self.rng.choice((0o600, 0o644, 0o700, 0o755, 0o750, 0o1777))
        await self.fs.setattr(self._ino(path), mode=mode)
        return OpResult(f"chmod {path!r} {mode:o}")


# ---------------------------------------------------------------------------
# Recording a workload
# ---------------------------------------------------------------------------


@dataclass
class Committed:
    """A state that became durable.

    ``ev_start``: len(events) when the commit (or the operation whose
    transaction rolled) began: no event of it lies before.  ``ev_flush``:
    the index in events of the flush that made its journal transaction
    durable (-1 for the formatted image).  ``ops``: operations completed
    when the state was taken.
    """

    snap: dict[bytes, Entry]
    ev_start: int
    ev_flush: int
    ops: int
    seq: int
    explicit: bool


@dataclass
class Version:
    """The contents of ``ino`` after operation number ``op`` (which began
    at event ``ev_start``): an in-place write of it may reach the disk
    before its metadata commits."""

    op: int
    ev_start: int
    ino: int
    digest: str


@dataclass
class Trace:
    commits: list[Committed] = field(default_factory=list)
    versions: list[Version] = field(default_factory=list)
    contents: dict[str, bytes] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    head_positions: list[int] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def wraps(self) -> int:
        """How many times the journal head went round the end of the log."""
        hp = self.head_positions
        return sum(1 for a, b in zip(hp, hp[1:]) if b < a)


def last_flush(events: list) -> int:
    for i in range(len(events) - 1, -1, -1):
        if events[i][0] == "flush":
            return i
    return -1


class Recording:
    """Runs operations on ``fs`` and keeps a :class:`Trace` of the durable
    states, given the recorder attached to its device."""

    def __init__(self, fs: Filesystem, recorder: Recorder, *, initial: dict[bytes, Entry] | None = None):
        self.fs = fs
        self.rec = recorder
        self.trace = Trace()
        self.nops = 0
        self.journal = fs.store.journal
        snap = initial if initial is not None else {}
        self.trace.commits.append(Committed(snap, -1, -1, 0, 0, True))
        self.trace.head_positions.append(self.journal.head_pos)

    @property
    def events(self) -> list:
        return self.rec.events

    async def initial_state(self) -> None:
        """Replace the placeholder state 0 with a snapshot of the tree as it
        is now (call before any operation)."""
        self.trace.commits[0].snap = await logical_snapshot(self.fs, self.trace.contents)

    async def op(self, coro_fn, *args) -> OpResult | None:
        """Run one operation; record its contents version and any commit it
        rolled on its own."""
        ev_start = len(self.events)
        seq0 = self.fs.store.durable_seq
        rolls0 = self.fs.stats["rolls"]
        res = await coro_fn(*args)
        self.nops += 1
        assert self.fs.stats["rolls"] == rolls0, "an operation rolled its transaction mid-way"
        if isinstance(res, OpResult):
            self.trace.log.append(res.desc)
            if res.ino is not None:
                inode = await self.fs.getattr(res.ino)
                data = await self.fs.pread(res.ino, 0, inode.size)
                d = sha(data)
                self.trace.contents.setdefault(d, data)
                self.trace.versions.append(Version(self.nops, ev_start, res.ino, d))
        if self.fs.store.durable_seq != seq0:
            # The operation rolled a transaction at its end: that state is
            # durable as well as the explicitly committed ones.
            await self._record(ev_start, explicit=False)
        return res

    async def commit(self) -> int:
        ev_start = len(self.events)
        seq0 = self.fs.store.durable_seq
        seq = await self.fs.commit()
        if seq != seq0:
            await self._record(ev_start, explicit=True)
        return seq

    async def sync(self) -> None:
        """Commit and checkpoint.  The state's flush is taken as the last
        one of the sync (after the checkpoint): later than its journal
        flush, so the bound it gives is only more conservative."""
        ev_start = len(self.events)
        seq0 = self.fs.store.durable_seq
        await self.fs.sync()
        if self.fs.store.durable_seq != seq0:
            await self._record(ev_start, explicit=True)

    async def close(self) -> None:
        """Clean unmount; the tree it leaves is the last committed state."""
        snap = await logical_snapshot(self.fs, self.trace.contents)
        ev_start = len(self.events)
        seq0 = self.fs.store.durable_seq
        await self.fs.close()
        if self.fs.store.durable_seq != seq0:
            self.trace.commits.append(Committed(snap, ev_start, last_flush(self.events), self.nops,
                                                self.fs.store.durable_seq, True))
            self.trace.head_positions.append(self.journal.head_pos)

    async def _record(self, ev_start: int, *, explicit: bool) -> None:
        flush = last_flush(self.events)
        assert flush >= ev_start, "a commit returned without a flush"
        snap = await logical_snapshot(self.fs, self.trace.contents)
        self.trace.commits.append(Committed(snap, ev_start, flush, self.nops,
                                            self.fs.store.durable_seq, explicit))
        self.trace.head_positions.append(self.journal.head_pos)


async def format_image(path: str, nblocks: int, *, log_blocks: int = 256, seed: int | None = 0) -> None:
    """mkfs.  The filesystem UUID salts the directory-entry hashes, so it
    decides the btree layout and with it every block allocation: a fixed
    ``seed`` makes the whole run (and a failure) reproducible."""
    BlockDevice.create_file(path, nblocks * BLOCK_SIZE)
    with BlockDevice.open(path) as dev:
        if seed is None:
            await Filesystem.format(dev, log_blocks=log_blocks)
            return
        fixed = uuid.UUID(bytes=random.Random(seed).randbytes(16), version=4)
        # Only make_geometry's view of the uuid module is replaced.
        real = ondisk.uuidlib
        ondisk.uuidlib = types.SimpleNamespace(uuid4=lambda: fixed)
        try:
            await Filesystem.format(dev, log_blocks=log_blocks)
        finally:
            ondisk.uuidlib = real


async def record_workload(path: str, *, seed: int, nops: int, commit_every: tuple[int, int] = (1, 4),
                          max_file: int = 96 * 1024, max_entries: int = 60,
                          finish: str = "crash", device=None) -> tuple[list, Trace]:
    """Open the formatted image at ``path``, run ``nops`` random operations
    with a recorder attached from the open on, committing (now and then
    syncing) every few, and end with a crash (``finish="crash"``: no close)
    or a clean unmount (``"close"``)."""
    rng = random.Random(seed)
    dev = (device or InlineDevice).open(path)
    dev.recorder = Recorder()
    try:
        fs = await Filesystem.open(dev)
        rec = Recording(fs, dev.recorder)
        await rec.initial_state()
        w = Workload(fs, rng, max_file=max_file, max_entries=max_entries)
        until_commit = rng.randint(*commit_every)
        while rec.nops < nops:
            await rec.op(w.step)
            until_commit -= 1
            if until_commit == 0:
                if rng.random() < 0.05:
                    await rec.sync()
                else:
                    await rec.commit()
                until_commit = rng.randint(*commit_every)
                # The model and the tree agree (so a refused operation
                # changed nothing, and the generator knows what it works on).
                last = rec.trace.commits[-1].snap
                if rec.trace.commits[-1].ops == rec.nops:
                    assert {p: (e.kind, e.ino) for p, e in last.items()} == w.paths, \
                        f"model and tree differ after {rec.trace.log[-5:]}"
        # The tail of the stream: a few uncommitted operations...
        for _ in range(3):
            await rec.op(w.step)
        rec.trace.stats = dict(fs.store.journal.stats)
        if finish == "close":
            # ...then a clean unmount, or a crash right there.
            await rec.close()
        return dev.recorder.events, rec.trace
    finally:
        dev.close()      # a crash: fs.close() is never called


# ---------------------------------------------------------------------------
# Checking a crash image
# ---------------------------------------------------------------------------


def allowed_range(trace: Trace, upto: int) -> tuple[int, int]:
    """Indices ``lo..hi`` of the committed states a crash after
    ``events[:upto]`` may recover to: at least every state whose journal
    flush is in the prefix, at most those whose commit had begun."""
    lo = max(i for i, c in enumerate(trace.commits) if c.ev_flush < upto)
    hi = max(i for i, c in enumerate(trace.commits) if c.ev_start < upto)
    return lo, max(lo, hi)


def _content_ok(recovered: bytes, candidates: list[bytes]) -> bool:
    """Every sector of ``recovered`` equals that sector of some candidate
    (zero-padded past the candidate's end)."""
    if any(recovered == c[:len(recovered)] for c in candidates if len(c) >= len(recovered)):
        return True
    for off in range(0, len(recovered), SECTOR):
        sec = recovered[off:off + SECTOR]
        if not any(sec == (c[off:off + SECTOR] + bytes(SECTOR))[:len(sec)] for c in candidates):
            return False
    return True


def match_state(trace: Trace, upto: int, snap: dict[bytes, Entry],
                contents: dict[str, bytes]) -> tuple[int, bool]:
    """Find the committed state the recovered ``snap`` is.

    Returns ``(index, exact)``: ``exact`` is False when a file's contents
    differ from the state but are explained by in-place writes issued
    after it and before the cut.  Raises AssertionError otherwise.
    """
    lo, hi = allowed_range(trace, upto)
    meta = meta_of(snap)
    problems = []
    for j in range(hi, lo - 1, -1):
        state = trace.commits[j]
        if meta_of(state.snap) != meta:
            continue
        if all(e.payload == state.snap[p].payload for p, e in snap.items()):
            return j, True
        # In-place data: versions written by operations after state j that
        # began before the cut.
        later = [v for v in trace.versions if v.op > state.ops and v.ev_start < upto]
        bad = []
        for p, e in snap.items():
            if e.kind != "reg" or e.payload == state.snap[p].payload:
                continue
            cands = [trace.contents[state.snap[p].payload]]
            cands += [trace.contents[v.digest] for v in later if v.ino == e.ino]
            if not _content_ok(contents[e.payload], cands):
                bad.append(p)
        if not bad:
            return j, False
        problems.append(f"state {j}: metadata matches but contents of {bad} do not")
    # Nothing matched: say how far the closest allowed state is.
    best = min(range(lo, hi + 1), key=lambda j: len(set(meta_of(trace.commits[j].snap).items()) ^ set(meta.items())))
    raise AssertionError(
        f"recovered state matches no committed state in {lo}..{hi} (of {len(trace.commits)})\n"
        + "\n".join(problems)
        + f"\nclosest, state {best} (expected) vs recovered:\n"
        + describe_diff(trace.commits[best].snap, snap))


async def fsck_clean(path: str, what: str) -> None:
    out = io.StringIO()
    with InlineDevice.open(path) as dev:
        report = await check(dev, repair=False, out=out)
    assert report.exit_code == 0, f"fsck of {what}: exit {report.exit_code}\n{out.getvalue()}"


@dataclass
class CheckStats:
    images: int = 0
    exact: int = 0
    in_place: int = 0
    states: set = field(default_factory=set)


async def verify_crash_image(path: str, trace: Trace, upto: int, label: str,
                             stats: CheckStats | None = None, *, readonly_too: bool = True) -> int:
    """fsck the raw image, mount it read-only (in-memory replay), recover
    it, check both see the same tree and that it is a committed state,
    close cleanly and fsck again.  Returns the index of the committed
    state recovered."""
    try:
        await fsck_clean(path, f"raw crash image {label}")
        ro_snap = None
        if readonly_too:
            # A read-only mount replays the log in memory only.
            with InlineDevice.open(path, readonly=True) as dev:
                fs = await Filesystem.open(dev)
                assert fs.readonly
                ro_snap = await logical_snapshot(fs)
        contents: dict[str, bytes] = {}
        with InlineDevice.open(path) as dev:
            fs = await Filesystem.open(dev)
            snap = await logical_snapshot(fs, contents)
            if ro_snap is not None:
                assert ro_snap == snap, ("read-only mount (in-memory replay) and recovery differ:\n"
                                         + describe_diff(ro_snap, snap))
            j, exact = match_state(trace, upto, snap, contents)
            fs.space.alloc.check()
            st = fs.space.alloc.statistics()
            # Busy blocks are free on disk but held in memory until the
            # transaction that freed them is checkpointed.
            assert st["used"] - st["busy"] == fs.info.used_blocks - (fs.sb.nblocks - st["total"]), (
                f"allocator used {st} vs fsinfo used_blocks {fs.info.used_blocks}")
            await fs.close()
        await fsck_clean(path, f"recovered image {label}")
    except AssertionError as e:
        raise AssertionError(f"crash image {label} (cut at event {upto}): {e}") from None
    if stats is not None:
        stats.images += 1
        stats.states.add(j)
        if exact:
            stats.exact += 1
        else:
            stats.in_place += 1
    return j




def build_cut(base: str, events: list, dest: str, cut: Cut) -> None:
    build_image(base, events, dest, upto=cut.upto, rng=random.Random(cut.seed), **cut.opts)


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
