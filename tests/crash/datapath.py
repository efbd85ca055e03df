"""A crash harness over the real data path: page cache, flusher,
writeback_range, ioend completion and the journal, all running.

The crash suite in ``workload.py`` drives ``Filesystem.pwrite``, which never
goes through the page cache; this one runs the whole in-process stack
(:class:`~delafs.vfs.mount.Mount`: engine, page cache with its flusher at a
short dirty expiry, writeback, periodic commits) on a device whose
:class:`~delafs.block.device.Recorder` logs every completed write and flush.
``crashsim`` then builds the images a power cut could leave: every flush
boundary, and cuts inside the unflushed window with writes dropped,
reordered and torn at sector granularity (the device's volatile cache).

The promise oracle.  Each worker owns one file and writes whole blocks
whose every 16 bytes carry (file, block, version), so any sector read back
names the write it came from.  A promise is what an fsync or fdatasync
that *returned* guarantees: the blocks and size the file had when the call
began.  It binds every crash image whose event prefix includes the call's
return, whatever the device did with its cache after it (a correct fsync
ends in a flush, so such an image's durable part covers it): every sector of a promised block must hold
the promised version or a version written after the promise began (an
in-place overwrite may reach the disk at any time), or zeros if a truncate
after the promise cut the block off; the size must be at least what the
promise saw, unless such a truncate shrank it.  Any sector of any file,
promised or not, must hold one of that block's own versions or zeros:
never another file's data, never stale blocks.  fsck must be clean.

A namespace worker creates, renames and unlinks among a pool of names in
one directory and fsyncs it: each directory fsync promises the names it
saw, present or gone, until a later operation touches them.  It also
unlinks files while they are open, writes and fsyncs them after, and
closes them: their blocks are freed only after their pages and writeback,
and their data (tagged with file ids of their own) must never turn up in
the workers' files.
"""

from __future__ import annotations

import errno
import io
import random
import shutil
import struct
from dataclasses import dataclass, field

import trio

from delafs.block import BLOCK_SIZE, Recorder
from delafs.fs.filesystem import Filesystem
from delafs.fs.fsck import check
from delafs.lib.errors import FsError
from delafs.lib.errortag import ErrorTags
from delafs.testing.crashsim import build_image, crash_cuts, flush_points
from delafs.vfs.mount import Mount

from .workload import InlineDevice, format_image

ROOT = 1
SECTOR = 512
_TAG = struct.Struct("<IIQ")        # file id, block, version: 16 bytes


def block_data(fid: int, blk: int, ver: int) -> bytes:
    return _TAG.pack(fid, blk, ver) * (BLOCK_SIZE // _TAG.size)


def sector_tag(sec: bytes) -> tuple[int, int, int] | None:
    """(fid, blk, ver) of a sector written by the workload, None for zeros;
    raises ValueError for anything else."""
    if not any(sec):
        return None
    tag = sec[:_TAG.size]
    if tag * (len(sec) // _TAG.size) != sec:
        raise ValueError("not a workload sector")
    return _TAG.unpack(tag)


@dataclass
class Promise:
    ev: int                  # recorder events when fsync returned
    seq: int                 # operation counter when fsync began
    blocks: dict[int, int]   # block -> version at that moment
    size: int
    unknown: frozenset = frozenset()     # blocks a reported error left unknown


@dataclass
class FileModel:
    fid: int
    name: bytes
    ino: int = 0
    blocks: dict[int, int] = field(default_factory=dict)    # what the page cache holds
    size: int = 0
    writes: list[tuple[int, int, int]] = field(default_factory=list)   # (seq, blk, ver)
    truncs: list[tuple[int, int]] = field(default_factory=list)        # (seq, size)
    promises: list[Promise] = field(default_factory=list)
    errors: int = 0                                                    # fsyncs that reported one
    unknown: set[int] = field(default_factory=set)    # blocks whose writeback failed


@dataclass
class DirPromise:
    ev: int                  # recorder events when the directory fsync returned
    seq: int                 # operation counter when it began
    names: frozenset         # the names the directory held then


@dataclass
class DirModel:
    """The namespace worker's directory: which of its pool of names exist."""
    ino: int = 0
    names: set[bytes] = field(default_factory=set)
    touches: list[tuple[int, bytes]] = field(default_factory=list)   # (seq, name)
    promises: list[DirPromise] = field(default_factory=list)
    orphans: int = 0         # files unlinked while open, written and fsynced after


@dataclass
class Run:
    """A recorded workload: the base image, the event stream and the model."""
    base: str
    events: list
    files: list[FileModel]
    stats: dict
    dir: DirModel | None = None


class Harness:
    """Records one workload: ``nfiles`` workers (one file each) on a fresh
    image with a Recorder, ending in a crash or a clean unmount (``finish``)."""

    def __init__(self, workdir, *, seed: int, nfiles: int = 3, ops_per_file: int = 40,
                 max_blocks: int = 24, delay_writeback: int = 0, writeback_eio: int = 0,
                 finish: str = "crash", nblocks: int = 4096, namespace: bool = True,
                 commit_interval: float = 0.05):
        self.workdir = workdir
        self.seed = seed
        self.nfiles = nfiles
        self.ops_per_file = ops_per_file
        self.max_blocks = max_blocks
        self.delay_writeback = delay_writeback
        self.writeback_eio = writeback_eio
        if finish not in ("crash", "unmount"):
            raise ValueError(f"finish must be crash or unmount, not {finish!r}")
        self.finish = finish
        self.nblocks = nblocks
        self.namespace = namespace
        self.commit_interval = commit_interval
        self.seq = 0
        self.ver = 0

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def record(self) -> Run:
        base = str(self.workdir / "base.img")
        await format_image(base, self.nblocks, seed=self.seed)
        files = [FileModel(i + 1, b"f%d" % (i + 1)) for i in range(self.nfiles)]
        dm = DirModel() if self.namespace else None
        with InlineDevice.open(base) as dev:        # the empty files are in the base image
            fs = await Filesystem.open(dev)
            for fm in files:
                fm.ino = (await fs.create(ROOT, fm.name, 0o644)).ino
            if dm is not None:
                dm.ino = (await fs.mkdir(ROOT, b"d", 0o755)).ino
            await fs.close()
        live = str(self.workdir / "live.img")
        shutil.copyfile(base, live)
        dev = InlineDevice.open(live)
        dev.recorder = Recorder()
        try:
            fs = await Filesystem.open(dev)
            tags = ErrorTags(seed=self.seed)
            if self.delay_writeback:
                tags.set("delay_writeback", self.delay_writeback)
            if self.writeback_eio:
                tags.set("writeback_eio", self.writeback_eio)
            m = Mount(fs, dirty_expire=0.003, writeback_interval=0.002, commit_interval=self.commit_interval,
                      errortags=tags)
            async with trio.open_nursery() as n:
                await m.start(n)
                async with trio.open_nursery() as workers:
                    for fm in files:
                        workers.start_soon(self._worker, m, fm, random.Random(self.seed * 1000 + fm.fid))
                    if dm is not None:
                        workers.start_soon(self._namespace_worker, m, dm, random.Random(self.seed * 1000))
                stats = {"engine": dict(m.engine.stats), "iomap": dict(m.ops.stats)}
                if self.finish == "unmount":
                    m.errortags.set("writeback_eio", 0)
                    # Unmount while the flusher holds ioends (with
                    # delay_writeback): a last write to every file, taken.
                    rng = random.Random(self.seed)
                    for fm in files:
                        f = await m.open(fm.ino, write=True)
                        await self._write(m, f, fm, rng)
                        await m.release(f)
                    mappings = [(await m.iget(fm.ino)).mapping for fm in files]
                    with trio.move_on_after(1):
                        while not any(mp.nrwriteback for mp in mappings):
                            await trio.sleep(0.001)
                    # A clean unmount promises everything written before it.
                    finals = [(fm, Promise(0, self._next_seq(), dict(fm.blocks), fm.size))
                              for fm in files]
                # What the daemon does when the kernel lets go (daemon.serve).
                await m.stop_background()
                n.cancel_scope.cancel()
            if self.finish == "unmount":
                await m.unmount()
                for fm, p in finals:
                    p.ev = len(dev.recorder.events)
                    fm.promises.append(p)
        finally:
            dev.close()         # a crash: no unmount
        return Run(base, dev.recorder.events, files, stats, dm)

    async def _namespace_worker(self, m: Mount, dm: DirModel, rng: random.Random) -> None:
        """Creates, renames and unlinks among a small pool of names, files
        unlinked while open (written and fsynced after, then evicted), and
        directory fsyncs, each a promise of the names the directory held."""
        pool = [b"n%d" % i for i in range(8)]
        for _ in range(self.ops_per_file):
            r = rng.random()
            name = rng.choice(pool)
            if r < 0.25:
                if name not in dm.names:
                    dm.touches.append((self._next_seq(), name))
                    await m.fs.create(dm.ino, name, 0o644)
                    dm.names.add(name)
            elif r < 0.45:
                if dm.names:
                    old = rng.choice(sorted(dm.names))
                    if old != name:
                        seq = self._next_seq()
                        dm.touches += [(seq, old), (seq, name)]
                        await m.fs.rename(dm.ino, old, dm.ino, name)
                        dm.names.discard(old)
                        dm.names.add(name)
            elif r < 0.6:
                if name in dm.names:
                    dm.touches.append((self._next_seq(), name))
                    await m.fs.unlink(dm.ino, name)
                    dm.names.discard(name)
            elif r < 0.75:
                await self._orphan(m, dm, name, rng)
            else:
                seq = self._next_seq()
                names = frozenset(dm.names)
                await m.fsyncdir()
                dm.promises.append(DirPromise(len(m.fs.dev.recorder.events), seq, names))

    async def _orphan(self, m: Mount, dm: DirModel, name: bytes, rng: random.Random) -> None:
        """Open a file, unlink it, keep writing and fsyncing it, close it:
        its blocks go only after its cached pages and writeback have, and
        its data must never turn up in another file."""
        dm.touches.append((self._next_seq(), name))
        if name not in dm.names:
            await m.fs.create(dm.ino, name, 0o644)
        ino = (await m.fs.lookup(dm.ino, name)).ino
        f = await m.open(ino, write=True)
        fid = 1000 + dm.orphans
        dm.orphans += 1
        for blk in range(rng.randint(1, 6)):
            self.ver += 1
            await m.write(f, blk * BLOCK_SIZE, block_data(fid, blk, self.ver))
        await m.fs.unlink(dm.ino, name)
        dm.names.discard(name)
        for blk in range(rng.randint(1, 6)):
            self.ver += 1
            await m.write(f, blk * BLOCK_SIZE, block_data(fid, blk, self.ver))
        if rng.random() < 0.5:
            await trio.sleep(0.005)         # the flusher takes some of it
        if rng.random() < 0.5:
            try:
                await m.fsync(f)
            except FsError:
                pass                        # injected writeback EIO: nothing to promise
        # The last close of a file with no names: its pages and writeback
        # go first, then its blocks (the adapter's release does the same).
        await m.evict_if_unlinked(ino)
        await m.release(f)                  # closed dirty half the time

    async def _worker(self, m: Mount, fm: FileModel, rng: random.Random) -> None:
        f = await m.open(fm.ino, write=True)
        for _ in range(self.ops_per_file):
            r = rng.random()
            if r < 0.55:
                await self._write(m, f, fm, rng)
            elif r < 0.8:
                await self._fsync(m, f, fm, datasync=rng.random() < 0.4)
            elif r < 0.87:
                await self._truncate(m, fm, rng)
            elif r < 0.94:
                # The window fsync must cover: the flusher has taken this
                # write's folios and (with delay_writeback) holds their ioend.
                await self._write(m, f, fm, rng)
                mapping = (await m.iget(fm.ino)).mapping
                with trio.move_on_after(0.5):
                    while not mapping.nrwriteback:
                        await trio.sleep(0.001)
                await self._fsync(m, f, fm, datasync=rng.random() < 0.4)
            else:
                await trio.sleep(rng.random() * 0.01)     # let the flusher take folios
        if self.finish == "crash":
            await self._fsync(m, f, fm, datasync=False)
        await m.release(f)

    async def _write(self, m: Mount, f, fm: FileModel, rng: random.Random) -> None:
        first = rng.randrange(self.max_blocks)
        count = rng.randint(1, 4)
        seq = self._next_seq()
        data = []
        for b in range(first, first + count):
            self.ver += 1
            data.append(block_data(fm.fid, b, self.ver))
            fm.writes.append((seq, b, self.ver))
        await m.write(f, first * BLOCK_SIZE, b"".join(data))
        for b, d in zip(range(first, first + count), data):
            fm.blocks[b] = _TAG.unpack(d[:_TAG.size])[2]
            fm.unknown.discard(b)
        fm.size = max(fm.size, (first + count) * BLOCK_SIZE)

    async def _truncate(self, m: Mount, fm: FileModel, rng: random.Random) -> None:
        size = rng.randrange(self.max_blocks + 1) * BLOCK_SIZE
        seq = self._next_seq()
        fm.truncs.append((seq, size))
        await m.truncate(fm.ino, size)
        fm.blocks = {b: v for b, v in fm.blocks.items() if b * BLOCK_SIZE < size}
        fm.unknown = {b for b in fm.unknown if b * BLOCK_SIZE < size}
        fm.size = size

    async def _fsync(self, m: Mount, f, fm: FileModel, *, datasync: bool) -> None:
        seq = self._next_seq()
        snap = Promise(0, seq, dict(fm.blocks), fm.size, frozenset(fm.unknown))
        try:
            await m.fsync(f, datasync)
        except FsError:
            # A writeback error, reported once: nothing is promised, and
            # the data of the failed writeback is gone for good (its folios
            # are clean), so later promises cover only later writes.
            fm.unknown |= set(fm.blocks)
            fm.blocks.clear()
            fm.size = 0
            fm.errors += 1
            return
        snap.ev = len(m.fs.dev.recorder.events)
        fm.promises.append(snap)


# ---------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------

def check_file(fm: FileModel, upto: int, size: int, data: bytes) -> list[str]:
    """What is wrong with the recovered ``data`` of one file."""
    bad = []
    p = max((p for p in fm.promises if p.ev <= upto), key=lambda p: (p.ev, p.seq), default=None)
    versions: dict[int, set[int]] = {}
    for _, b, v in fm.writes:
        versions.setdefault(b, set()).add(v)
    if p is not None:
        later_truncs = [s for seq, s in fm.truncs if seq > p.seq]
        floor = min([p.size, *later_truncs])
        if size < floor:
            bad.append(f"size {size} < {floor} promised at ev {p.ev}")
    for off in range(0, len(data), SECTOR):
        blk = off // BLOCK_SIZE
        try:
            tag = sector_tag(data[off:off + SECTOR])
        except ValueError:
            bad.append(f"block {blk} sector {off % BLOCK_SIZE // SECTOR}: bytes no write put there")
            continue
        if tag is not None and (tag[0] != fm.fid or tag[1] != blk or tag[2] not in versions.get(blk, ())):
            bad.append(f"block {blk}: holds {tag}, not one of this block's versions")
            continue
        if p is None or blk * BLOCK_SIZE >= p.size or blk in p.unknown:
            continue
        allowed = {v for seq, b, v in fm.writes if b == blk and seq > p.seq}
        if blk in p.blocks:
            allowed.add(p.blocks[blk])
        zero_ok = blk not in p.blocks or any(s <= blk * BLOCK_SIZE for seq, s in fm.truncs if seq > p.seq)
        if tag is None and not zero_ok:
            bad.append(f"block {blk}: zeros where version {p.blocks[blk]} was promised (ev {p.ev})")
        elif tag is not None and tag[2] not in allowed:
            bad.append(f"block {blk}: version {tag[2]}, promised {p.blocks.get(blk)} (ev {p.ev})")
    return bad


async def check_image(path: str, run: Run, upto: int) -> list[str]:
    out = io.StringIO()
    with InlineDevice.open(path) as dev:
        report = await check(dev, repair=False, out=out)
    if report.exit_code != 0:
        return [f"fsck exit {report.exit_code}: {out.getvalue()[-2000:]}"]
    bad = []
    with InlineDevice.open(path) as dev:
        fs = await Filesystem.open(dev)
        for fm in run.files:
            try:
                inode = await fs.lookup(ROOT, fm.name)
            except FsError as e:
                if e.errno == errno.ENOENT:
                    bad.append(f"{fm.name.decode()}: missing")
                    continue
                raise
            data = await fs.pread(inode.ino, 0, inode.size)
            bad += [f"{fm.name.decode()}: {b}" for b in check_file(fm, upto, inode.size, data)]
        if run.dir is not None:
            names = {e[0] for e in await fs.readdir(run.dir.ino)}
            bad += [f"d: {b}" for b in check_dir(run.dir, upto, names)]
    return bad


def check_dir(dm: DirModel, upto: int, names: set[bytes]) -> list[str]:
    """The names of the latest directory promise made before the crash: each one no later
    operation touched must be there, and each name it lacked, absent."""
    p = max((p for p in dm.promises if p.ev <= upto), key=lambda p: (p.ev, p.seq), default=None)
    if p is None:
        return []
    later = {n for seq, n in dm.touches if seq > p.seq}
    bad = []
    for name in {n for _, n in dm.touches} - later:
        if (name in p.names) != (name in names):
            bad.append(f"{name.decode()} is {'present' if name in names else 'missing'}, "
                       f"a directory fsync (ev {p.ev}) saw it {'present' if name in p.names else 'gone'}")
    return bad


@dataclass
class Verdict:
    images: int = 0
    violations: list[str] = field(default_factory=list)
    promises: int = 0


async def check_run(run: Run, workdir, *, seed: int, variants_per_point: int = 2,
                    max_images: int | None = None, stop_at_first: bool = False) -> Verdict:
    rng = random.Random(seed)
    # Every flush, and the instant each promise returned: a promise kept
    # only by a flush that came later is caught by the cut just before it.
    promised_at = {p.ev for fm in run.files for p in fm.promises}
    if run.dir is not None:
        promised_at |= {p.ev for p in run.dir.promises}
    points = sorted(set(flush_points(run.events)) | promised_at)
    cuts = crash_cuts(run.events, rng, variants_per_point=variants_per_point, points=points)
    if max_images is not None and len(cuts) > max_images:
        cuts = sorted(rng.sample(cuts, max_images), key=lambda c: c.upto)
    v = Verdict(promises=sum(len(fm.promises) for fm in run.files)
                + (len(run.dir.promises) if run.dir is not None else 0))
    dest = str(workdir / "crash.img")
    for cut in cuts:
        extra = {"rng": random.Random(cut.seed)} if cut.opts else {}
        build_image(run.base, run.events, dest, upto=cut.upto, **cut.opts, **extra)
        v.images += 1
        for b in await check_image(dest, run, cut.upto):
            v.violations.append(f"[{cut.label}, upto {cut.upto}] {b}")
        if v.violations and stop_at_first:
            break
    return v
