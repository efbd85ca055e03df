"""The filesystem (layer 4): inodes, directories, xattrs, symlinks, extents,
the orphan list, and space accounting, on top of the btree and the journal.

Every public coroutine is one metadata operation: it takes ``meta_lock`` for
its whole length, so the journal's snapshot never sees half of one.  Before
changing anything an operation reserves the worst-case number of blocks it
can need (XFS's transaction reservation), so ENOSPC is reported before any
change; an error after a change has been made (an I/O error, a corrupt
block) shuts the filesystem down, as XFS does when it cancels a dirty
transaction: the partial change is never committed, and the journal keeps
the image consistent.

Data I/O here is the simple, synchronous-to-the-caller path used before the
page cache exists and by tools: new blocks are allocated UNWRITTEN, the data
is written and flushed, and only then are they converted to WRITTEN, so a
crash never exposes stale blocks.  The iomap engine (buffered writes,
delalloc) sits above the same extent primitives.

Lock order (the whole of it is documented in docs/design.md):
    i_rwsem -> invalidate_lock -> folio lock -> meta_lock -> commit_lock
"""

from __future__ import annotations

import bisect
import errno
import logging
import stat
from collections import OrderedDict

from ..lib.errors import CorruptionError, DelafsError, FsError, NotDelafsError
from ..lib.locks import Mutex, ki_protected
from ..log import journal as journal_log
from ..log.metabuf import CACHE_BLOCKS, MetaStore
from ..ondisk import (
    BITS_PER_BITMAP_BLOCK,
    BLOCK_SIZE,
    MAX_FILE_BLOCKS,
    MAX_NAME_LEN,
    MIN_BLOCKS,
    ROOT_INO,
    SB_MAGIC,
    SB_STATE_CLEAN,
    SB_STATE_DIRTY,
    FsInfo,
    Superblock,
    encode_bitmap,
    fixed_ranges,
    make_geometry,
)
from .bmap import BmapOps
from .btree import BTree, Node, worst_case_nodes
from .data import DataOps
from .dir import DirOps
from .extent_map import ExtentMap
from .inode import InodeOps, now_ns
from .items import (
    T_INODE,
    Inode,
    ItemContext,
)
from .orphan import OrphanOps
from .space import Space, data_blocks, initial_bitmap, set_bits
from .xattr import XattrOps

log = logging.getLogger("delafs")

class FsInfoBlock(FsInfo):
    """FsInfo as a cached metadata block (it needs a block number)."""

    blocknr: int = 0

    def encode(self, seq: int) -> bytes:  # type: ignore[override]
        return FsInfo.encode(self, self.blocknr, seq)

    def root_changed(self) -> None:
        self.store.mark_dirty(self)

    @classmethod
    def load(cls, buf: bytes, blk: int) -> "FsInfoBlock":
        fi = FsInfo.decode(buf, blk)
        obj = cls(**fi.__dict__)
        obj.blocknr = blk
        return obj


class Filesystem(InodeOps, DirOps, XattrOps, BmapOps, DataOps, OrphanOps):
    """An open delafs image.

    Attributes (all guarded by ``meta_lock`` unless noted):
      dev        the BlockDevice
      sb         the superblock (as read at open)
      info       the fsinfo block: btree root, counters
      store      MetaStore: metadata cache + running transaction
      tree       the btree of all items
      space      allocator + bitmap
      inodes     LRU cache ino -> Inode, written through to the tree, except
                 for the times write(2) stamps (see file_update_time)
      dirty_times  inos whose cached Inode has times not yet in the tree;
                 pinned in the cache, written by the next commit
      emaps      ino -> ExtentMap, loaded on first use of a file's mapping
      open_counts ino -> references held by open files (orphan handling)
      shutdown   set after a failure left a half-done change: every later
                 operation fails with EIO and nothing more is committed
    """

    def __init__(self, dev, sb: Superblock, store: MetaStore, info: FsInfoBlock,
                 space: Space, *, readonly: bool):
        self.dev = dev
        self.sb = sb
        self.store = store
        self.info = info
        self.space = space
        self.readonly = readonly
        self.meta_lock = store.meta_lock
        # A log write that fails on any path (a roll inside an operation, a
        # checkpoint for space, a commit) leaves a hole in the log: stop.
        store.on_failure = self.shut_down
        self.tree = BTree(store, info, space.alloc_node, space.free_node,
                          ItemContext(sb.uuid, sb.data_start, sb.sb2_block, MAX_FILE_BLOCKS).problem)
        info.store = store
        self.inodes: OrderedDict[int, Inode] = OrderedDict()
        self.inode_cache_size = 65536
        self.dirty_times: set[int] = set()
        self._emap_loads = 0
        self.emaps: dict[int, ExtentMap] = {}
        self.open_counts: dict[int, int] = {}
        self.shutdown: str | None = None
        self.salt = sb.uuid
        self.stats = {"ops": 0, "rolls": 0, "orphans_recovered": 0,
                      "truncates_recovered": 0}
    # ======================================================================
    # Format, open, close
    # ======================================================================

    @staticmethod
    async def format(dev, *, log_blocks: int | None = None, label: bytes = b"") -> Superblock:
        """Write an empty filesystem: root directory, empty journal."""
        sb = make_geometry(dev.nblocks, log_blocks=log_blocks, label=label, now_ns=now_ns())
        # Old contents (another filesystem, an earlier delafs) are discarded
        # so a file image starts sparse; correctness never relies on it.
        await dev.discard(0, dev.nblocks)
        root_node = sb.data_start
        bits = initial_bitmap(sb)
        set_bits(bits[root_node // BITS_PER_BITMAP_BLOCK], root_node % BITS_PER_BITMAP_BLOCK, 1, True)
        now = now_ns()
        root = Inode(ROOT_INO, stat.S_IFDIR | 0o755, nlink=2, atime=now, mtime=now,
                     ctime=now, btime=now, generation=1, parent=ROOT_INO)
        leaf = Node(root_node, 0, [(ROOT_INO, T_INODE, 0)], [root.encode()])
        info = FsInfo(root_block=root_node, root_level=0, next_ino=ROOT_INO + 1,
                      next_generation=2,
                      used_blocks=sum(n for _, n in fixed_ranges(sb)) + 1,
                      inode_count=1)
        await dev.write(sb.journal_start, journal_log.initial_jsb_blocks(sb))
        await dev.write(sb.bitmap_start, [encode_bitmap(b, sb.bitmap_start + i, 0)
                                          for i, b in enumerate(bits)])
        await dev.write(sb.fsinfo_block, [info.encode(sb.fsinfo_block, 0)])
        await dev.write(root_node, [leaf.encode(0)])
        await dev.flush()
        # The superblocks go last: a crash during mkfs leaves no valid image.
        img = sb.encode()
        await dev.write(0, [img])
        await dev.write(sb.sb2_block, [img])
        await dev.flush()
        return sb

    @staticmethod
    async def refuse_too_small(dev) -> None:
        """NotDelafsError for a device smaller than mkfs ever makes, unless
        block 0 still says delafs: that is an image cut short, damage the
        superblock checks describe.  Without this an empty file would be
        reported as a corrupt superblock (a read of block -1)."""
        if dev.nblocks >= MIN_BLOCKS:
            return
        if dev.nblocks and (await dev.read(0, 1))[:len(SB_MAGIC)] == SB_MAGIC:
            return
        raise NotDelafsError(f"{dev.path} is not a delafs image (too small: {dev.size} bytes)")

    @staticmethod
    async def read_superblock(dev) -> tuple[Superblock, list[DelafsError]]:
        """The primary superblock, or the secondary if the primary is bad.
        Returns the problems met on the way (for fsck and mount warnings)."""
        await Filesystem.refuse_too_small(dev)
        problems: list[DelafsError] = []
        try:
            sb = Superblock.decode(await dev.read(0, 1), 0, dev.nblocks)
        except NotDelafsError as e:
            problems.append(e)
            sb = None
        except (CorruptionError, DelafsError) as e:
            problems.append(e)
            sb = None
        if sb is not None:
            try:
                Superblock.decode(await dev.read(sb.sb2_block, 1), sb.sb2_block, dev.nblocks)
            except DelafsError as e:
                problems.append(e)
            return sb, problems
        try:
            sb = Superblock.decode(await dev.read(dev.nblocks - 1, 1), dev.nblocks - 1, dev.nblocks)
        except NotDelafsError:
            if isinstance(problems[0], NotDelafsError):
                raise NotDelafsError(f"{dev.path} is not a delafs image (no superblock found)")
            raise problems[0]
        except DelafsError as e:
            raise CorruptionError("superblock", 0,
                                  f"both copies are bad: {problems[0]}; {e}") from None
        return sb, problems

    @classmethod
    async def open(cls, dev, *, readonly: bool = False, cache_blocks: int = CACHE_BLOCKS,
                   metadata_reserve: int | None = None) -> "Filesystem":
        """Open an image: replay the journal, load the allocator, reap orphans.

        Read-only opens replay the journal into memory only (the image is
        not written at all)."""
        sb, _ = await cls.read_superblock(dev)
        readonly = readonly or dev.readonly or sb.read_only_features
        meta_lock = Mutex()
        if readonly:
            scan = await journal_log.scan(dev, sb, look_past_end=True)
            if scan.corruption is not None:
                raise CorruptionError(scan.corruption.structure, scan.corruption.block,
                                      scan.corruption.detail + "; committed transactions follow it")
            overlay = journal_log.replay_images(scan.txns)
            store = MetaStore(dev, None, meta_lock, cache_blocks=cache_blocks, overlay=overlay)
        else:
            journal, _ = await journal_log.recover(dev, sb)
            store = MetaStore(dev, journal, meta_lock, cache_blocks=cache_blocks)
        info = await store.get(sb.fsinfo_block, FsInfoBlock.load)
        if metadata_reserve is None:
            metadata_reserve = min(1024, max(16, data_blocks(sb) // 256))
        space = await Space.load(store, sb, info, metadata_reserve=metadata_reserve)
        store.on_home = space.on_home
        fs = cls(dev, sb, store, info, space, readonly=readonly)
        if not readonly:
            sb.state = SB_STATE_DIRTY
            sb.mount_count += 1
            sb.last_mount_ns = now_ns()
            await fs._write_superblocks()
            await fs._reap_orphans()
        return fs

    async def _write_superblocks(self) -> None:
        img = self.sb.encode()
        await self.dev.write(0, [img])
        await self.dev.write(self.sb.sb2_block, [img])
        await self.dev.flush()

    async def close(self) -> None:
        """Clean unmount: commit, checkpoint, mark the image clean."""
        if self.readonly or self.shutdown:
            return
        await self.sync()
        self.sb.state = SB_STATE_CLEAN
        self.sb.last_clean_ns = now_ns()
        await self._write_superblocks()

    async def commit(self, *, times: bool = True) -> int:
        """Make every completed operation durable (the journal's fsync).
        Without ``times`` the timestamps only stamped in memory stay there
        (fdatasync: they are not needed to read the data back)."""
        self.check_alive()
        if times:
            await self._write_dirty_times()
        seq = await self.store.commit()     # a failed log write shuts us down (on_failure)
        if self.dev.unflushed:
            # Nothing (more) to commit, but data was written since the last
            # flush: an fdatasync of an overwrite needs only this.
            await self.dev.flush()
        await self._discard()
        return seq

    async def roll_if_full(self) -> None:
        """Inside a long operation (meta_lock held, the changes so far
        consistent on their own, no decoded block held): trim the metadata
        cache, which otherwise waits for the operation's end, and commit
        the running transaction once it holds ``roll_threshold`` dirty
        blocks.  So a punch of a million extents or a writeback pass over
        thousands of scattered blocks never keeps every block it read or
        dirtied decoded until its end."""
        if self.store.should_roll():
            self.stats["rolls"] += 1
            await self.store.commit_locked()
        self.store.evict()          # after the commit: what it wrote is clean now

    async def sync(self) -> None:
        """Commit and checkpoint: everything home, the log empty."""
        self.check_alive()
        await self._write_dirty_times()
        await self.store.checkpoint()       # likewise
        await self._discard()

    async def _discard(self) -> None:
        """Discard the runs whose freeing has become durable.

        ``on_home`` made them allocatable at once, so by now writeback may
        have allocated some of them again and written new data there, which
        a discard would wipe (a punched hole in an image reads as zeros).
        So only the parts still free are discarded, under meta_lock, which
        every allocation holds: nothing can take them while the discard is in
        flight."""
        if not self.space.discards:
            return
        async with self.meta_lock:
            runs, self.space.discards = self.space.discards, []
            # Decide first, then discard: the free index may grow while a
            # discard is in flight (a commit releasing busy blocks), never
            # shrink (allocation needs meta_lock).
            free = list(self.space.alloc.free_extents())
            starts = [s for s, _ in free]
            todo = []
            for start, n in runs:
                end = start + n
                i = max(bisect.bisect_right(starts, start) - 1, 0)
                while i < len(free) and free[i][0] < end:
                    lo, hi = max(start, free[i][0]), min(end, free[i][0] + free[i][1])
                    if lo < hi:
                        todo.append((lo, hi - lo))
                    i += 1
            for start, n in todo:
                await self.dev.discard(start, n)

    # ======================================================================
    # Operation framing: locking, reservation, shutdown
    # ======================================================================

    def check_alive(self, *, write: bool = False) -> None:
        if self.shutdown:
            raise FsError(errno.EIO, f"filesystem is shut down: {self.shutdown}")
        if write and self.readonly:
            raise FsError(errno.EROFS, "filesystem is mounted read-only")

    def shut_down(self, why: str) -> None:
        if not self.shutdown:
            self.shutdown = why
            log.error("filesystem shut down: %s; every later change fails with EIO, "
                      "the journal keeps what was committed (replayed at the next mount)", why)

    def transaction(self, *, items: int = 0, item_size: int = 128, data: int = 0,
                    write: bool = True, pool: bool = False) -> "_Transaction":
        """Frame one metadata operation: ``async with fs.transaction(...):``.

        ``items`` btree items may be inserted and ``data`` blocks allocated;
        their worst case is reserved up front so the operation fails with
        ENOSPC before it changes anything.  ``pool`` lets an operation that
        frees space (unlink, rmdir) dip into the metadata reserve when the
        filesystem is full.
        """
        return _Transaction(self, items, item_size, data, write, pool)

    # ======================================================================
    # Whole filesystem
    # ======================================================================

    def statfs(self) -> dict:
        """Free space net of reservations.  Busy blocks (freed by a
        transaction not yet checkpointed) count as free, as XFS's free
        counter does: an allocation short of space checkpoints to get them
        back, and df should not lag behind rm."""
        a = self.space.alloc
        free = a.available + a.busy
        return {"bsize": BLOCK_SIZE, "blocks": a.total, "bfree": free,
                "bavail": free, "files": self.info.inode_count + free,
                "ffree": free, "namemax": MAX_NAME_LEN,
                "inodes": self.info.inode_count}

    def statistics(self) -> dict:
        return {"space": self.space.alloc.statistics(), "meta": self.store.statistics(),
                "dev": self.dev.statistics(), "fs": dict(self.stats),
                "journal": dict(self.store.journal.stats) if self.store.journal else {}}


class _Transaction:
    """The context of Filesystem.transaction: a class, not a generator,
    because every read, write and getattr goes through one."""

    __slots__ = ("fs", "items", "item_size", "data", "write", "pool", "before")

    def __init__(self, fs: Filesystem, items: int, item_size: int, data: int,
                 write: bool, pool: bool):
        self.fs = fs
        self.items = items
        self.item_size = item_size
        self.data = data
        self.write = write
        self.pool = pool

    # meta_lock is taken in one and released in the other, by hand: a
    # Ctrl-C between bytecodes there would leave it held.
    @ki_protected
    async def __aenter__(self) -> None:
        fs = self.fs
        await fs.meta_lock.acquire()
        try:
            fs.check_alive(write=self.write)
            need = self.data + (worst_case_nodes(self.items, self.item_size, fs.tree.levels)
                                if self.items else 0)
            fallback = "available"
            if need:
                try:
                    fs.space.alloc.reserve(need)
                except FsError:
                    if fs.space.alloc.busy and not fs.readonly:
                        # Freed blocks come back at the checkpoint (XFS
                        # forces the log for its busy extents the same way).
                        await fs.store.checkpoint_locked()
                    try:
                        fs.space.alloc.reserve(need)
                    except FsError:
                        if not self.pool:
                            raise
                        fallback, need = "metadata_reserve", 0
        except BaseException:
            fs.meta_lock.release()
            raise
        self.before = fs.store.changes
        fs.space.begin_op(need, fallback)

    @ki_protected
    async def __aexit__(self, typ, exc, tb) -> bool:
        fs = self.fs
        try:
            if exc is not None and fs.store.changes != self.before:
                fs.shut_down(f"{typ.__name__} in the middle of an update: {exc}")
            fs.space.end_op()
            fs.stats["ops"] += 1
            fs._evict_inodes()
            if exc is None and fs.store.should_roll():
                await fs.store.commit_locked()
            fs.store.evict()        # after a commit: what it wrote is clean now
        finally:
            fs.meta_lock.release()
        return False
