"""A mounted delafs: the filesystem, the page cache and the engine together,
with the VFS-level file operations the FUSE adapter calls (and tests drive
directly).  This is the part of the kernel between a system call and
fs/iomap: inode table, open file descriptions, i_rwsem, the ENOSPC retry,
fsync, the flusher and the periodic journal commit.

The file operations take ``i_rwsem`` and call the engine; only the engine
takes ``invalidate_lock`` and folio locks; only the filesystem takes
``meta_lock``.  See locks.py for the order.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

import trio

from ..fs.dir import RENAME_EXCHANGE
from ..fs.extent_map import Extent, ExtState
from ..fs.filesystem import Filesystem
from ..fs.iomap_ops import FsIomapOps
from ..iomap.buffered_io import Engine, IovIter
from ..iomap.types import POINTS, VInode
from ..iomap.writeback import writepages
from ..lib.errors import DelafsError, FsError
from ..lib.errortag import ErrorTags
from ..lib.errseq import ErrSeqCursor
from ..lib.units import BLOCK_SHIFT, BLOCK_SIZE
from ..mm.pagecache import PageCache

log = logging.getLogger("delafs")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


#: delafs top's column precedence: the most transient state first.
_STRIP_ORDER = [ExtState.DELALLOC, ExtState.UNWRITTEN, ExtState.WRITTEN, ExtState.HOLE]
_CACHE_ORDER = ["writeback", "dirty", "stale", "uptodate", "none"]


class OpenFile:
    """An open file description: its errseq cursor (so each description
    sees a writeback error once) and whether it may write."""

    __slots__ = ("inode", "writable", "errseq")

    def __init__(self, inode: VInode, writable: bool):
        self.inode = inode
        self.writable = writable
        self.errseq = ErrSeqCursor(inode.mapping.wb_err)


class Mount:
    """Attributes:
      fs         the Filesystem (layers 4-6)
      cache      the PageCache
      ops        FsIomapOps (the filesystem's iomap/writeback callbacks)
      engine     the iomap Engine
      errortags  fault injection shared by all of them
      inodes     ino -> VInode, for inodes in use
      commit_interval  seconds between background journal commits
      stamp_cmtime     write(2) stamps mtime/ctime; off when the kernel's
                       writeback cache owns them (it sends them in SETATTR)
      atime            "relative" (relatime, the default), "strict" or "none"
                       (noatime); diratime: directories' atime moves too
    """

    def __init__(self, fs: Filesystem, *, cache_size: int = 256 << 20,
                 dirty_limit: int | None = None, dirty_expire: float = 5.0,
                 writeback_interval: float = 1.0, commit_interval: float = 5.0,
                 punch_mode: str = "scan", errortags: ErrorTags | None = None,
                 writeback_cache: bool = False, atime: str = "relative", diratime: bool = True):
        if atime not in ("relative", "strict", "none"):
            raise ValueError(f"atime policy must be relative, strict or none, not {atime!r}")
        self.fs = fs
        self.errortags = errortags or ErrorTags()
        fs.attach_errortags(self.errortags)
        self.cache = PageCache(cache_size=cache_size, dirty_limit=dirty_limit,
                               dirty_expire=dirty_expire, writeback_interval=writeback_interval)
        self.ops = FsIomapOps(fs, self.errortags)
        self.engine = Engine(self.cache, self.ops, self.errortags, punch_mode=punch_mode)
        self.inodes: dict[int, VInode] = {}
        self.commit_interval = commit_interval
        self.stamp_cmtime = not writeback_cache
        self.atime = atime
        self.diratime = diratime
        self._nursery = None

    # -- lifetime -------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the flusher and the periodic commit in ``nursery``."""
        self._nursery = nursery
        nursery.start_soon(self.cache.run_flusher, self._flush_mapping)
        nursery.start_soon(self._committer)

    async def _flush_mapping(self, mapping, expired_only: bool) -> None:
        inode = self.inodes.get(mapping.ino)
        if inode is None:
            return
        cutoff = trio.current_time() - self.cache.dirty_expire if expired_only else None
        await writepages(self.engine, inode, sync=False, expired_before=cutoff)

    async def _committer(self) -> None:
        """Bound what a crash can lose: commit the journal every few seconds.
        A commit is never cancelled halfway (a failed commit shuts the
        filesystem down); cancellation takes effect while it sleeps."""
        while True:
            await trio.sleep(self.commit_interval)
            if self.fs.has_changes() and not self.fs.shutdown:
                with trio.CancelScope(shield=True):
                    try:
                        await self.fs.commit()
                    except Exception:
                        log.exception("background journal commit failed")

    async def stop_background(self) -> None:
        """Before the nursery of start() is cancelled: let the flusher finish
        the pass it is in (its queued ioends reach the device)."""
        with trio.CancelScope(shield=True):
            await self.cache.stop_flusher()

    async def unmount(self) -> None:
        """Write everything back, commit, checkpoint, mark the image clean.
        If this final flush lost data (a writeback error during it), raise
        an FsError, after the image is closed clean: what did reach it is
        consistent.  Earlier errors are not its to report (fsync or syncfs
        did, or the log line of the pass that failed)."""
        cursor = ErrSeqCursor(self.cache.wb_err)
        await self._write_back_all()
        self.cache.stop()
        await self.fs.close()
        err = self.cache.wb_err.check_and_advance(cursor)
        if err:
            raise FsError(err, f"the final flush lost data: writeback failed ({os.strerror(err)})")

    # -- inodes -----------------------------------------------------------------

    async def iget(self, ino: int) -> VInode:
        inode = self.inodes.get(ino)
        if inode is None:
            attr = await self.fs.getattr(ino)
            # Look again, as iget5_locked does under the hash lock: another
            # request may have instantiated the inode while getattr waited,
            # and a second VInode would keep its own size and i_rwsem over
            # the shared mapping (writeback would clip to the wrong EOF).
            inode = self.inodes.get(ino)
            if inode is None:
                inode = VInode(ino, attr.size, self.cache.mapping(ino))
                self.inodes[ino] = inode
        return inode

    async def evict_if_unlinked(self, ino: int) -> None:
        """The last reference to ``ino`` is going (evict_inode): if it has no
        names left, its cached pages go, writeback included, before the
        filesystem frees its blocks, so they are never written back into
        space another file may own by then."""
        try:
            unlinked = (await self.fs.getattr(ino)).nlink == 0
        except FsError:
            unlinked = True
        except DelafsError:         # unreadable: keep its pages, writeback decides
            unlinked = False
        vi = self.inodes.get(ino)
        if unlinked and vi is not None:
            async with vi.i_rwsem.exclusive():
                async with vi.mapping.invalidate_lock.exclusive():
                    await vi.mapping.truncate_range(0, None)
            self.inodes.pop(ino, None)

    def evict_clean(self, ino: int) -> bool:
        """The kernel forgot a linked inode that no file holds open: let it
        go if nothing of it is in flight, as the kernel's inode eviction
        truncates a clean inode's pages and frees it.  Without this every
        inode ever touched kept its VInode, its AddressSpace and its clean
        folios for the life of the mount.  Dirty data, writeback, a held
        lock or an in-memory size the filesystem has not seen keep it (the
        next FORGET is the next chance).  Synchronous: nothing reaches the
        inode between the checks and the drop.  Returns whether it went."""
        vi = self.inodes.get(ino)
        if vi is None:
            return False
        mapping = vi.mapping
        if (vi.writers or mapping.nrdirty or mapping.nrwriteback
                or not vi.i_rwsem.idle or not mapping.invalidate_lock.idle
                or self.fs.cached_size(ino) != vi.size):
            return False
        locked = []
        for folio in mapping.folios.values():
            if not folio.trylock():
                for f in locked:
                    f.unlock()
                return False
            locked.append(folio)
        for folio in locked:
            mapping.remove(folio)
            folio.unlock()
        del self.inodes[ino]
        self.cache.forget_mapping(ino)
        return True

    # -- inspection (delafs bmap, top): read-only snapshots -------------------------

    async def _inspected(self, ino: int):
        """A regular file's extent map, cache mapping (or None) and size
        (the in-memory one: data not yet written back counts), under the
        caller's read transaction."""
        inode = await self.fs.iget(ino)
        if not inode.is_reg:
            raise FsError(errno.EINVAL, f"inode {ino} is not a regular file")
        emap = await self.fs.extent_map(ino)
        vi = self.inodes.get(ino)
        return emap, self.cache.find_mapping(ino), vi.size if vi is not None else inode.size

    async def bmap(self, ino: int) -> dict:
        """xfs_getbmap with the page cache laid over it: every extent from
        block 0 to the end of the file or of its last extent (holes
        included, post-EOF preallocation too), and the cache's runs.  Both
        maps are read in one step with no await between them, so they show
        the same instant."""
        async with self.fs.transaction(write=False):
            emap, mapping, size = await self._inspected(ino)
            stored = list(emap.iter_extents())
            cache = mapping.cache_runs() if mapping is not None else []
        end = max((size + BLOCK_SIZE - 1) >> BLOCK_SHIFT, stored[-1].end if stored else 0)
        extents, pos = [], 0
        for ext in stored + [Extent(end, 0, ExtState.HOLE)]:
            if ext.fblock > pos:
                extents.append({"fblock": pos, "blocks": ext.fblock - pos, "state": "HOLE", "pblock": None})
            if ext.length:
                extents.append({"fblock": ext.fblock, "blocks": ext.length, "state": ext.state.name,
                                "pblock": ext.pblock})
            pos = ext.end
        return {"ino": ino, "size": size, "block_size": BLOCK_SIZE, "extents": extents,
                "cache": [{"fblock": f, "blocks": n, "state": st} for f, n, st in cache]}

    async def bmap_strip(self, ino: int, width: int, *, per_column: int = 64) -> dict:
        """The extent map and the cache squeezed into ``width`` columns
        (``delafs top``).  A column names the most transient state present
        in its range, so a short-lived state is never hidden by the scale:
        DELALLOC before UNWRITTEN before WRITTEN before HOLE, and writeback
        before dirty before uptodate/stale before not cached.  Each column
        looks at no more than ``per_column`` extents and folios, so a map of
        a million extents costs what a small one does (and may show such a
        column inexactly)."""
        async with self.fs.transaction(write=False):
            emap, mapping, size = await self._inspected(ino)
            nblocks = (size + BLOCK_SIZE - 1) >> BLOCK_SHIFT
            per = max(1, -(-nblocks // width))
            extents, cache = [], []
            for col in range(min(width, -(-nblocks // per))):
                lo, hi = col * per, min((col + 1) * per, nblocks)
                seen = list(emap.iter_extents(lo, hi, per_column))
                states = {e.state for e in seen}
                if sum(e.length for e in seen) < hi - lo:
                    states.add(ExtState.HOLE)
                extents.append(min(states, key=_STRIP_ORDER.index).name)
                runs = mapping.cache_runs(lo, hi, per_column) if mapping is not None else []
                cstates = {r[2] for r in runs}
                if sum(r[1] for r in runs) < hi - lo:
                    cstates.add("none")
                cache.append(min(cstates, key=_CACHE_ORDER.index))
        return {"ino": ino, "size": size, "blocks_per_column": per, "extents": extents, "cache": cache,
                "delalloc_blocks": emap.count_state(ExtState.DELALLOC),
                "dirty_blocks": mapping.nrdirty if mapping is not None else 0,
                "writeback_folios": mapping.nrwriteback if mapping is not None else 0,
                "cached_blocks": mapping.nrpages if mapping is not None else 0}

    def busiest(self, n: int) -> list[int]:
        """The ``n`` inodes with the most blocks dirty, under writeback or
        delalloc, then the most cached: the files ``delafs top`` shows."""
        score: dict[int, list[int]] = {}
        for mapping in self.cache.mappings():
            if mapping.nrpages:
                score[mapping.ino] = [mapping.nrdirty + mapping.nrwriteback, mapping.nrpages]
        for ino, delalloc in self.fs.delalloc_blocks().items():
            score.setdefault(ino, [0, 0])[0] += delalloc
        return sorted(score, key=lambda i: (score[i][0], score[i][1], -i), reverse=True)[:n]

    async def getattr(self, ino: int):
        attr = await self.fs.getattr(ino)
        inode = self.inodes.get(ino)
        if inode is not None:
            attr.size = inode.size
        return attr

    # -- file operations ------------------------------------------------------------

    async def open(self, ino: int, *, write: bool) -> OpenFile:
        inode = await self.iget(ino)
        self.fs.open_ref(ino)
        if write:
            inode.writers += 1
        return OpenFile(inode, write)

    async def release(self, f: OpenFile) -> None:
        inode = f.inode
        if f.writable:
            inode.writers -= 1
            if inode.writers == 0:
                async with inode.i_rwsem.exclusive():
                    await self.ops.trim_prealloc(inode)
        if inode.truncated:
            # xfs_release's early writeout: a file truncated and rewritten
            # without fsync (`>` in a shell) would otherwise be empty after
            # a crash once the truncate is committed and before the flusher
            # writes the new data.
            inode.truncated = False
            if inode.mapping.nrdirty:
                await writepages(self.engine, inode, sync=False)
        await self.fs.close_ref(inode.ino)

    async def rename(self, odir: int, oname: bytes, ndir: int, nname: bytes, flags: int = 0,
                     *, uid: int = 0, gid: int = 0) -> None:
        """rename(2).  A regular file renamed over another has its data
        written back first (ext4's auto_da_alloc), so its conversion is
        logged before the rename and no commit can hold the new name without
        the data: a file written and renamed over another without fsync
        would otherwise be empty after a crash.  The rename reports errors;
        the flush only tries."""
        if not flags & RENAME_EXCHANGE:
            await self._flush_before_replace(odir, oname, ndir, nname)
        await self.fs.rename(odir, oname, ndir, nname, flags, uid=uid, gid=gid)

    async def _flush_before_replace(self, odir: int, oname: bytes, ndir: int, nname: bytes) -> None:
        try:
            target = await self.fs.lookup(ndir, nname)
            if not stat.S_ISREG(target.mode):
                return
            source = await self.fs.lookup(odir, oname)
        except FsError:
            return
        inode = self.inodes.get(source.ino) if stat.S_ISREG(source.mode) else None
        if inode is not None and (inode.mapping.nrdirty or inode.mapping.nrwriteback):
            await writepages(self.engine, inode, sync=True)
            await inode.mapping.wait_writeback_range()

    async def write(self, f: OpenFile, pos: int, data, *, append: bool = False) -> int:
        """write(2): buffered, through the engine.  ENOSPC retry: if the
        reservation fails before any byte went in, drop the locks, write
        everything back (delalloc's worst-case metadata reservations shrink
        to what allocation really used, and busy blocks become free at the
        checkpoint) and try once more.

        ``data`` may also be an :class:`IovIter` (the race explorer passes
        one that records when its bytes land in the page cache)."""
        if not f.writable:
            raise FsError(errno.EBADF, "file not open for writing")
        if self.errortags.active:
            await self.errortags.delay("delay_write")
        for attempt in (0, 1):
            try:
                async with f.inode.i_rwsem.exclusive():
                    if self.stamp_cmtime and not attempt:
                        await self.fs.file_update_time(f.inode.ino)
                    if append:
                        pos = f.inode.size
                    if pos + len(data) > self.fs.sb.max_file_size:
                        raise FsError(errno.EFBIG, "file too large")
                    src = data if isinstance(data, IovIter) else IovIter(data, self.errortags)
                    return await self.engine.iomap_file_buffered_write(f.inode, pos, src)
            except FsError as e:
                if e.errno != errno.ENOSPC or attempt:
                    raise
            await self._write_back_all()
            await self.fs.sync()        # the checkpoint returns busy blocks
        raise AssertionError("unreachable")

    async def read(self, f: OpenFile, pos: int, size: int) -> bytes:
        async with f.inode.i_rwsem.shared():
            data = await self.engine.buffered_read(f.inode, pos, size)
        await self.touch_atime(f.inode.ino)
        return data

    async def touch_atime(self, ino: int, *, is_dir: bool = False) -> None:
        """The VFS's touch_atime() under this mount's policy.  A FUSE kernel
        leaves atime to the daemon and only sees what reaches it: reads
        served from the kernel's page cache never do."""
        if self.atime == "none" or (is_dir and not self.diratime) or self.fs.readonly:
            return
        await self.fs.update_atime(ino, strict=self.atime == "strict")

    async def truncate(self, ino: int, size: int) -> None:
        inode = await self.iget(ino)
        if size > self.fs.sb.max_file_size:
            raise FsError(errno.EFBIG, "file too large")
        async with inode.i_rwsem.exclusive():
            old = inode.size        # ahead of the on-disk size until writeback catches up
            if size < old:
                inode.truncated = True
            await self.engine.iomap_truncate(
                inode, size, lambda s, zero_eof: self.fs.truncate(ino, s, old_size=old, zero_eof=zero_eof))
            if size == old:
                # truncate(2), ftruncate(2) and O_TRUNC stamp the times even
                # when the size does not change (the filesystem stamps them
                # when it does).
                await self.fs.file_update_time(ino)

    async def fallocate(self, ino: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) at engine level (pyfuse3 cannot pass it through FUSE).

        0: allocate UNWRITTEN blocks over holes, growing the size unless
        FALLOC_FL_KEEP_SIZE.  PUNCH_HOLE (with KEEP_SIZE): zero the partial
        blocks at the edges through the cache, drop the cache over the whole
        blocks and free them.  ZERO_RANGE: the same, then allocate UNWRITTEN
        blocks in their place (reads return zeros without a data write)."""
        if offset < 0 or length <= 0:
            raise FsError(errno.EINVAL, "bad fallocate range")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise FsError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} is not supported")
        if mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
            raise FsError(errno.EINVAL, "PUNCH_HOLE needs KEEP_SIZE")
        inode = await self.iget(ino)
        end = offset + length
        if end > self.fs.sb.max_file_size:
            raise FsError(errno.EFBIG, "file too large")
        b0 = (offset + BLOCK_SIZE - 1) >> BLOCK_SHIFT
        b1 = end >> BLOCK_SHIFT
        async with inode.i_rwsem.exclusive():
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                mapping = inode.mapping
                async with mapping.invalidate_lock.exclusive():
                    zend = min(end, inode.size)
                    if offset < zend:
                        head_end = min(zend, b0 << BLOCK_SHIFT)
                        if offset < head_end:
                            await self.engine.iomap_zero_range(inode, offset, head_end - offset)
                        tail_start = max(offset, b1 << BLOCK_SHIFT)
                        if tail_start < zend and b1 >= b0:
                            await self.engine.iomap_zero_range(inode, tail_start, zend - tail_start)
                    if b1 > b0:
                        await mapping.truncate_range(b0 << BLOCK_SHIFT, b1 << BLOCK_SHIFT)
                        await self.fs.punch_hole(ino, b0, b1 - b0)
                        if mode & FALLOC_FL_ZERO_RANGE:
                            await self.fs.allocate(ino, b0, b1 - b0)
            else:
                first = offset >> BLOCK_SHIFT
                await self.fs.allocate(ino, first, ((end + BLOCK_SIZE - 1) >> BLOCK_SHIFT) - first)
            if not mode & FALLOC_FL_KEEP_SIZE and end > inode.size:
                # As for a truncate up: speculative delalloc the new EOF
                # covers would never be written back or trimmed.  Nothing
                # past the old EOF is dirty, so all of it goes.
                old_eof = (inode.size + BLOCK_SIZE - 1) & ~(BLOCK_SIZE - 1)
                if end > old_eof:
                    await self.ops.punch(inode, old_eof, end - old_eof)
                    first = old_eof >> BLOCK_SHIFT
                    await self.fs.allocate(ino, first, ((end + BLOCK_SIZE - 1) >> BLOCK_SHIFT) - first)
                inode.size = end
                await self.fs.truncate(ino, end)

    async def fsync(self, f: OpenFile, datasync: bool = False) -> None:
        """Write back, wait, commit the journal (which flushes the device),
        then report a writeback error once per description (errseq).
        ``datasync`` leaves timestamps out of the commit, and when nothing
        else changed there is nothing to commit: writeback's own flush made
        the data durable."""
        inode = f.inode
        await writepages(self.engine, inode, sync=True)
        await inode.mapping.wait_writeback_range()
        await self.fs.commit(times=not datasync)
        err = inode.mapping.wb_err.check_and_advance(f.errseq)
        if err:
            raise FsError(err, "writeback error")

    async def fsyncdir(self) -> None:
        """fsync of a directory: its names live only in the journal, and a
        commit makes every name change before it durable."""
        await self.fs.commit()

    async def syncfs(self) -> int:
        """Write back and commit everything; return the errno of a writeback
        error that happened before or during it which no syncfs has
        reported yet (0 if none): syncfs(2)'s report from s_wb_err."""
        cursor = ErrSeqCursor(self.cache.wb_err, unreported=True)
        await self._write_back_all()
        return self.cache.wb_err.check_and_advance(cursor)

    async def _write_back_all(self) -> None:
        """sync_filesystem without the report: what a flush of the
        filesystem's own (ENOSPC, unmount) runs, leaving s_wb_err to
        syncfs."""
        for inode in list(self.inodes.values()):
            if inode.mapping.nrdirty:
                await writepages(self.engine, inode, sync=True)
            await inode.mapping.wait_writeback_range()
        await self.fs.commit()

    # -- the fault path, driven in-process (FUSE never shows it to a daemon) ----------

    async def mmap_write(self, ino: int, pos: int, data: bytes) -> None:
        """Store ``data`` through a shared writable mapping: a read fault
        instantiates the folio, a write fault (page_mkwrite) reserves and
        dirties it, then the bytes land while the folio is locked.  The
        store must stay inside one folio and inside EOF."""
        inode = await self.iget(ino)
        b = pos >> BLOCK_SHIFT
        if pos + len(data) > inode.size:
            raise FsError(errno.EFAULT, "store beyond EOF (SIGBUS)")
        while True:
            await self._read_fault(inode, b)
            # The read fault returns; the store faults again for write access.
            if POINTS.explorer is not None:
                await POINTS.hit("mmap_write_fault")
            if self.stamp_cmtime:
                await self.fs.file_update_time(ino)     # as the fault handler does
            try:
                folio = await self.engine.iomap_page_mkwrite(inode, b)
            except FsError as e:
                if e.errno == errno.EFAULT and inode.mapping.lookup(b) is None:
                    continue            # evicted or truncated between the faults: fault again
                raise
            try:
                if pos + len(data) > folio.end:
                    raise FsError(errno.EINVAL, "store crosses a folio boundary")
                folio.data[pos - folio.pos:pos - folio.pos + len(data)] = data
            finally:
                folio.unlock()
            return

    async def _read_fault(self, inode: VInode, block: int) -> None:
        mapping = inode.mapping
        async with mapping.invalidate_lock.shared():
            await self.engine.read_cache_folio(inode, block)

    def statistics(self) -> dict:
        return {"engine": dict(self.engine.stats), "iomap": dict(self.ops.stats),
                "cache": self.cache.statistics(), "errortags": self.errortags.statistics(),
                **self.fs.statistics()}

