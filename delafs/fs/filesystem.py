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
import contextlib
import errno
import logging
import stat
import time
from collections import OrderedDict

import trio

from ..lib.errors import CorruptionError, DelafsError, FsError, NotDelafsError
from ..log import journal as journal_log
from ..log.metabuf import MetaStore
from ..ondisk import (
    BITS_PER_BITMAP_BLOCK,
    BLOCK_SHIFT,
    BLOCK_SIZE,
    MAX_NAME_LEN,
    ROOT_INO,
    SB_STATE_CLEAN,
    SB_STATE_DIRTY,
    FsInfo,
    Superblock,
    crc32c,
    encode_bitmap,
    fixed_ranges,
    make_geometry,
)
from .btree import BTree, Node, worst_case_nodes
from .extent_map import Extent, ExtentMap, ExtState
from .items import (
    COLLISION_SLOTS,
    EXT_UNWRITTEN,
    EXT_WRITTEN,
    MAX_EXTENT_LEN,
    NLINK_MAX,
    ORPHAN_OID,
    SYMLINK_INLINE_MAX,
    SYMLINK_MAX,
    T_DIRENT,
    T_EXTENT,
    T_INODE,
    T_ORPHAN,
    T_SYMLINK,
    T_XATTR,
    XATTR_INLINE_MAX,
    XATTR_VALUE_MAX,
    Inode,
    OutOfLine,
    clamp_time,
    decode_dirent,
    decode_extent,
    decode_symlink,
    decode_xattr,
    dirent_range,
    dtype_of,
    encode_dirent,
    encode_extent,
    encode_symlink,
    encode_xattr,
    name_hash,
)
from .space import Space, data_blocks, initial_bitmap, set_bits

log = logging.getLogger("delafs")

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4     # leave a whiteout (a 0/0 character device) at the old name
XATTR_CREATE = 1
XATTR_REPLACE = 2

_STATE_TO_DISK = {ExtState.UNWRITTEN: EXT_UNWRITTEN, ExtState.WRITTEN: EXT_WRITTEN}
_DISK_TO_STATE = {EXT_UNWRITTEN: ExtState.UNWRITTEN, EXT_WRITTEN: ExtState.WRITTEN}
_INODE_ITEM = len(Inode(0, 0).encode())
_EXTENT_ITEM = 13

# Most names an inode may have (and subdirectories plus two a directory
# may count): the on-disk field's range.  Past it link(2), mkdir(2) and
# rename(2) fail with EMLINK before changing anything.
LINK_MAX = NLINK_MAX
RELATIME_NS = 24 * 3600 * 10**9     # relatime still moves an atime this old


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


def _now() -> int:
    return time.time_ns()


def _check_xattr(name: bytes, value: bytes) -> None:
    if not name or len(name) > 255:
        raise FsError(errno.ERANGE, "xattr name must be 1..255 bytes")
    if len(value) > XATTR_VALUE_MAX:
        raise FsError(errno.E2BIG, f"xattr value of {len(value)} bytes (max {XATTR_VALUE_MAX})")


def _xattr_blocks(value: bytes) -> int:
    """Blocks a value stored out of line takes (0: it fits in its item)."""
    return 0 if len(value) <= XATTR_INLINE_MAX else -(-len(value) // BLOCK_SIZE)


def _check_nlink(inode: Inode) -> None:
    """``inode`` is about to gain a link (a name, or a subdirectory's "..")."""
    if inode.nlink >= LINK_MAX:
        raise FsError(errno.EMLINK, f"inode {inode.ino} has {inode.nlink} links, the most it may have")


def check_name(name: bytes) -> None:
    if not name or name in (b".", b".."):
        raise FsError(errno.EINVAL, f"invalid name {name!r}")
    if len(name) > MAX_NAME_LEN:
        raise FsError(errno.ENAMETOOLONG, f"name of {len(name)} bytes (max {MAX_NAME_LEN})")
    if b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, f"name {name!r} contains '/' or NUL")


class Filesystem:
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
        self.tree = BTree(store, info, space.alloc_node, space.free_node)
        info.store = store
        self.inodes: OrderedDict[int, Inode] = OrderedDict()
        self.inode_cache_size = 65536
        self.dirty_times: set[int] = set()
        self._emap_loads = 0
        self.emaps: dict[int, ExtentMap] = {}
        self.open_counts: dict[int, int] = {}
        self.shutdown: str | None = None
        self.salt = sb.uuid
        self.stats = {"ops": 0, "rolls": 0, "orphans_recovered": 0}

    # ======================================================================
    # Format, open, close
    # ======================================================================

    @staticmethod
    async def format(dev, *, log_blocks: int | None = None, label: bytes = b"") -> Superblock:
        """Write an empty filesystem: root directory, empty journal."""
        sb = make_geometry(dev.nblocks, log_blocks=log_blocks, label=label, now_ns=_now())
        # Old contents (another filesystem, an earlier delafs) are discarded
        # so a file image starts sparse; correctness never relies on it.
        await dev.discard(0, dev.nblocks)
        root_node = sb.data_start
        bits = initial_bitmap(sb)
        set_bits(bits[root_node // BITS_PER_BITMAP_BLOCK], root_node % BITS_PER_BITMAP_BLOCK, 1, True)
        now = _now()
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
    async def read_superblock(dev) -> tuple[Superblock, list[DelafsError]]:
        """The primary superblock, or the secondary if the primary is bad.
        Returns the problems met on the way (for fsck and mount warnings)."""
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
    async def open(cls, dev, *, readonly: bool = False, cache_blocks: int = 8192,
                   metadata_reserve: int | None = None) -> "Filesystem":
        """Open an image: replay the journal, load the allocator, reap orphans.

        Read-only opens replay the journal into memory only (the image is
        not written at all)."""
        sb, _ = await cls.read_superblock(dev)
        readonly = readonly or dev.readonly or sb.read_only_features
        meta_lock = trio.Lock()
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
        store.on_durable = space.on_durable
        fs = cls(dev, sb, store, info, space, readonly=readonly)
        if not readonly:
            sb.state = SB_STATE_DIRTY
            sb.mount_count += 1
            sb.last_mount_ns = _now()
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
        self.sb.last_clean_ns = _now()
        await self._write_superblocks()

    async def commit(self) -> int:
        """Make every completed operation durable (the journal's fsync)."""
        self._check_alive()
        await self._write_dirty_times()
        try:
            seq = await self.store.commit()
        except BaseException as e:
            self._shut_down(f"journal commit failed: {e}")
            raise
        await self._discard()
        return seq

    async def sync(self) -> None:
        """Commit and checkpoint: everything home, the log empty."""
        self._check_alive()
        await self._write_dirty_times()
        try:
            await self.store.checkpoint()
        except BaseException as e:
            self._shut_down(f"checkpoint failed: {e}")
            raise
        await self._discard()

    async def _discard(self) -> None:
        """Discard the runs whose freeing has become durable.

        ``on_durable`` made them allocatable at once, so by now writeback may
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

    def _check_alive(self) -> None:
        if self.shutdown:
            raise FsError(errno.EIO, f"filesystem is shut down: {self.shutdown}")

    def _shut_down(self, why: str) -> None:
        if not self.shutdown:
            self.shutdown = why
            log.error("filesystem shut down: %s; every later change fails with EIO, "
                      "the journal keeps what was committed (replayed at the next mount)", why)

    @contextlib.asynccontextmanager
    async def _op(self, *, items: int = 0, item_size: int = 128, data: int = 0,
                  write: bool = True, pool: bool = False):
        """Frame one metadata operation.

        ``items`` btree items may be inserted and ``data`` blocks allocated;
        their worst case is reserved up front so the operation fails with
        ENOSPC before it changes anything.  ``pool`` lets an operation that
        frees space (unlink, rmdir) dip into the metadata reserve when the
        filesystem is full.
        """
        async with self.meta_lock:
            self._check_alive()
            if write and self.readonly:
                raise FsError(errno.EROFS, "filesystem is mounted read-only")
            need = data + (worst_case_nodes(items, item_size, self.tree.levels) if items else 0)
            fallback = "available"
            if need:
                try:
                    self.space.alloc.reserve(need)
                except FsError:
                    if not pool:
                        raise
                    fallback, need = "metadata_reserve", 0
            before = self.store.changes
            self.space.begin_op(need, fallback)
            try:
                yield
            except BaseException as e:
                if self.store.changes != before:
                    self._shut_down(f"{type(e).__name__} in the middle of an update: {e}")
                raise
            finally:
                self.space.end_op()
                self.stats["ops"] += 1
                self.store.evict()
                self._evict_inodes()
            if len(self.store.dirty) > self.store.roll_threshold:
                await self.store.commit_locked()

    # ======================================================================
    # Inodes
    # ======================================================================

    async def _iget(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is not None:
            self.inodes.move_to_end(ino)
            return inode
        item = await self.tree.lookup_item((ino, T_INODE, 0))
        if item is None:
            raise FsError(errno.ENOENT, f"inode {ino} does not exist")
        inode = Inode.decode(ino, *item)
        self.inodes[ino] = inode
        return inode

    async def _iwrite(self, inode: Inode) -> None:
        await self.tree.update((inode.ino, T_INODE, 0), inode.encode())
        self.dirty_times.discard(inode.ino)

    def _evict_inodes(self) -> None:
        excess = len(self.inodes) - self.inode_cache_size
        if excess <= 0:
            return
        # Oldest first; an inode whose times are not in the tree yet stays.
        victims = [ino for ino in self.inodes if ino not in self.dirty_times][:excess]
        for ino in victims:
            del self.inodes[ino]
            emap = self.emaps.get(ino)
            if emap is not None and emap.count_state(ExtState.DELALLOC) == 0:
                del self.emaps[ino]

    async def file_update_time(self, ino: int) -> None:
        """Stamp mtime and ctime of a file being written (the VFS's
        file_update_time, called by write(2) and page_mkwrite).

        This is on the path of every write, so it costs one dict lookup: the
        cached inode changes at once (getattr sees it) and the tree gets it
        at the next commit -- the periodic one, fsync's, or unmount's -- as
        the kernel writes an I_DIRTY_SYNC inode back later rather than
        logging each stamp."""
        inode = self.inodes.get(ino)
        if inode is None:
            await self.getattr(ino)             # loads it into the cache
            inode = self.inodes[ino]
        self._check_alive()
        inode.mtime = inode.ctime = _now()
        self.dirty_times.add(ino)

    async def update_atime(self, ino: int, *, strict: bool) -> None:
        """Stamp atime of a file read or a directory listed, kept like
        file_update_time's stamps.  Unless ``strict``, relatime's rule
        (relatime_need_update): only when atime is not newer than mtime or
        ctime, or a day old."""
        inode = self.inodes.get(ino)
        if inode is None:
            await self.getattr(ino)
            inode = self.inodes[ino]
        now = _now()
        if not strict and inode.atime > inode.mtime and inode.atime > inode.ctime \
                and now - inode.atime < RELATIME_NS:
            return
        self._check_alive()
        inode.atime = now
        self.dirty_times.add(ino)

    def has_changes(self) -> bool:
        """Anything a commit would write."""
        return bool(self.dirty_times) or self.store.has_changes()

    async def _write_dirty_times(self) -> None:
        if not self.dirty_times or self.readonly:
            return
        async with self._op():
            for ino in list(self.dirty_times):
                inode = self.inodes.get(ino)
                if inode is None:               # destroyed since
                    self.dirty_times.discard(ino)
                    continue
                await self._iwrite(inode)

    async def _new_inode(self, mode: int, uid: int, gid: int, *, rdev: int = 0,
                         parent: int = 0) -> Inode:
        now = _now()
        ino = self.info.next_ino
        inode = Inode(ino, mode, uid, gid, nlink=2 if stat.S_ISDIR(mode) else 1,
                      atime=now, mtime=now, ctime=now, btime=now,
                      generation=self.info.next_generation, rdev=rdev, parent=parent)
        self.info.next_ino += 1
        self.info.next_generation += 1
        self.info.inode_count += 1
        self.store.mark_dirty(self.info)
        await self.tree.insert((ino, T_INODE, 0), inode.encode())
        self.inodes[ino] = inode
        return inode

    def attach_errortags(self, tags) -> None:
        """Fault injection below the filesystem: ``log_eio`` fails journal
        writes, ``flush_eio`` the device's cache flushes."""
        self.dev.errortags = tags
        if self.store.journal is not None:
            self.store.journal.errortags = tags

    def root_as_cached(self) -> Inode:
        """The root inode without any I/O (a shut-down filesystem answers
        nothing else): the cached copy, or its mkfs shape."""
        root = self.inodes.get(ROOT_INO)
        if root is not None:
            return root.copy()
        return Inode(ROOT_INO, stat.S_IFDIR | 0o755, nlink=2, generation=1, parent=ROOT_INO)

    def stat_blocks(self, inode: Inode) -> int:
        """Allocated blocks plus delalloc ones: st_blocks counts the space a
        file will take, as XFS reports di_nblocks + if_delalloc."""
        emap = self.emaps.get(inode.ino)
        return inode.blocks + (emap.count_state(ExtState.DELALLOC) if emap else 0)

    async def getattr(self, ino: int) -> Inode:
        async with self._op(write=False):
            return (await self._iget(ino)).copy()

    async def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None,
                      atime: int | None = None, mtime: int | None = None,
                      ctime: int | None = None) -> Inode:
        if size is not None:
            await self.truncate(ino, size)
        async with self._op():
            inode = await self._iget(ino)
            if mode is not None:
                inode.mode = stat.S_IFMT(inode.mode) | stat.S_IMODE(mode)
            if uid is not None:
                inode.uid = uid
            if gid is not None:
                inode.gid = gid
            # Times outside the on-disk range are clamped (items.clamp_time)
            # before anything changes; the reply shows what was stored.
            if atime is not None:
                inode.atime = clamp_time(atime)
            if mtime is not None:
                inode.mtime = clamp_time(mtime)
            inode.ctime = clamp_time(ctime) if ctime is not None else _now()
            await self._iwrite(inode)
            return inode.copy()

    # ======================================================================
    # Directories
    # ======================================================================

    async def _find(self, dir_ino: int, name: bytes) -> tuple[tuple, int, int] | None:
        """(key, child ino, dtype) of ``name`` in the directory, or None."""
        lo, hi = dirent_range(name_hash(name, self.salt))
        for key, val, blk in await self.tree.scan((dir_ino, T_DIRENT, lo), (dir_ino, T_DIRENT, hi),
                                                  with_block=True):
            ino, dtype, ename = decode_dirent(val, blk)
            if ename == name:
                return key, ino, dtype
        return None

    async def _dir(self, ino: int) -> Inode:
        inode = await self._iget(ino)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR, f"inode {ino} is not a directory")
        if inode.nlink == 0:
            raise FsError(errno.ENOENT, f"directory {ino} has been removed")
        return inode

    async def _add_entry(self, dir_inode: Inode, name: bytes, child: Inode) -> None:
        lo, hi = dirent_range(name_hash(name, self.salt))
        used = {k[2] for k, _ in await self.tree.scan((dir_inode.ino, T_DIRENT, lo),
                                                      (dir_inode.ino, T_DIRENT, hi))}
        off = next((o for o in range(lo, hi) if o not in used), None)
        if off is None:
            raise FsError(errno.ENOSPC, f"more than {COLLISION_SLOTS} names share a hash")
        await self.tree.insert((dir_inode.ino, T_DIRENT, off),
                               encode_dirent(child.ino, dtype_of(child.mode), name))
        dir_inode.size += 1
        dir_inode.mtime = dir_inode.ctime = _now()

    async def lookup(self, dir_ino: int, name: bytes) -> Inode:
        async with self._op(write=False):
            await self._dir(dir_ino)
            found = await self._find(dir_ino, name)
            if found is None:
                raise FsError(errno.ENOENT)
            return (await self._iget(found[1])).copy()

    async def _check_new_name(self, dir_ino: int, name: bytes) -> Inode:
        check_name(name)
        d = await self._dir(dir_ino)
        if await self._find(dir_ino, name) is not None:
            raise FsError(errno.EEXIST, f"{name!r} exists")
        return d

    async def create(self, dir_ino: int, name: bytes, mode: int, uid: int = 0, gid: int = 0,
                     rdev: int = 0, xattrs: dict[bytes, bytes] | None = None) -> Inode:
        """Create a regular file, fifo, socket or device node, with
        ``xattrs`` (inherited ACLs) in the same transaction."""
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise FsError(errno.EINVAL, "use mkdir/symlink")
        if not stat.S_IFMT(mode):
            mode |= stat.S_IFREG
        return await self._create(dir_ino, name, mode, uid, gid, rdev=rdev, xattrs=xattrs)

    async def mkdir(self, dir_ino: int, name: bytes, mode: int, uid: int = 0, gid: int = 0,
                    xattrs: dict[bytes, bytes] | None = None) -> Inode:
        return await self._create(dir_ino, name, stat.S_IFDIR | stat.S_IMODE(mode), uid, gid,
                                  xattrs=xattrs)

    async def _create(self, dir_ino: int, name: bytes, mode: int, uid: int, gid: int, *,
                      rdev: int = 0, xattrs: dict[bytes, bytes] | None) -> Inode:
        xattrs = xattrs or {}
        for k, v in xattrs.items():
            _check_xattr(k, v)
        is_dir = stat.S_ISDIR(mode)
        async with self._op(items=2 + len(xattrs), data=sum(map(_xattr_blocks, xattrs.values()))):
            d = await self._check_new_name(dir_ino, name)
            if is_dir:
                _check_nlink(d)
            inode = await self._new_inode(mode, uid, gid, rdev=rdev, parent=dir_ino if is_dir else 0)
            for k, v in xattrs.items():
                await self._set_xattr(inode, k, v)
            if xattrs:
                await self._iwrite(inode)       # out-of-line values count in its blocks
            await self._add_entry(d, name, inode)
            if is_dir:
                d.nlink += 1
            await self._iwrite(d)
            return inode.copy()

    async def symlink(self, dir_ino: int, name: bytes, target: bytes, uid: int = 0, gid: int = 0) -> Inode:
        if not target or len(target) > SYMLINK_MAX or b"\0" in target:
            raise FsError(errno.ENAMETOOLONG if len(target) > SYMLINK_MAX else errno.EINVAL,
                          "invalid symlink target")
        nblocks = 0 if len(target) <= SYMLINK_INLINE_MAX else -(-len(target) // BLOCK_SIZE)
        async with self._op(items=3, data=nblocks):
            d = await self._check_new_name(dir_ino, name)
            inode = await self._new_inode(stat.S_IFLNK | 0o777, uid, gid)
            inode.size = len(target)
            value: bytes | OutOfLine = target
            if nblocks:
                value = await self._write_out_of_line(inode, target)
            await self.tree.insert((inode.ino, T_SYMLINK, 0), encode_symlink(value))
            await self._iwrite(inode)
            await self._add_entry(d, name, inode)
            await self._iwrite(d)
            return inode.copy()

    async def readlink(self, ino: int) -> bytes:
        async with self._op(write=False):
            inode = await self._iget(ino)
            if not inode.is_symlink:
                raise FsError(errno.EINVAL, f"inode {ino} is not a symlink")
            val = await self.tree.lookup((ino, T_SYMLINK, 0))
            if val is None:
                raise CorruptionError(f"symlink {ino}", None, "target record missing")
            target = decode_symlink(val)
            if isinstance(target, OutOfLine):
                target = await self._read_out_of_line(target, f"symlink {ino} target")
            return target

    async def link(self, ino: int, dir_ino: int, name: bytes) -> Inode:
        async with self._op(items=1):
            d = await self._check_new_name(dir_ino, name)
            inode = await self._iget(ino)
            if inode.is_dir:
                raise FsError(errno.EPERM, "hard links to directories are not allowed")
            if inode.nlink == 0:
                raise FsError(errno.ENOENT, "inode has been unlinked")
            _check_nlink(inode)
            inode.nlink += 1
            inode.ctime = _now()
            await self._iwrite(inode)
            await self._add_entry(d, name, inode)
            await self._iwrite(d)
            return inode.copy()

    async def _remove_entry(self, d: Inode, key: tuple) -> None:
        await self.tree.delete(key)
        d.size -= 1
        d.mtime = d.ctime = _now()

    async def _drop_link(self, inode: Inode) -> None:
        """One name of ``inode`` is gone: free it or make it an orphan."""
        inode.nlink -= 1
        inode.ctime = _now()
        await self._iwrite(inode)
        if inode.nlink > 0:
            return
        # On the orphan list in the same transaction as the last name goes:
        # a crash, or a destroy that rolls its transaction, leaves an inode
        # that recovery finds and frees, never a leaked one.
        await self.tree.insert((ORPHAN_OID, T_ORPHAN, inode.ino), b"")
        if not self.open_counts.get(inode.ino):
            await self._destroy(inode)

    async def _lookup_entry(self, dir_ino: int, name: bytes) -> tuple[Inode, tuple, Inode]:
        """(directory, entry key, inode) of an existing name."""
        d = await self._dir(dir_ino)
        found = await self._find(dir_ino, name)
        if found is None:
            raise FsError(errno.ENOENT)
        return d, found[0], await self._iget(found[1])

    async def unlink(self, dir_ino: int, name: bytes) -> None:
        async with self._op(items=1, pool=True):
            d, key, inode = await self._lookup_entry(dir_ino, name)
            if inode.is_dir:
                raise FsError(errno.EISDIR, f"{name!r} is a directory")
            await self._remove_entry(d, key)
            await self._iwrite(d)
            await self._drop_link(inode)

    async def rmdir(self, dir_ino: int, name: bytes) -> None:
        async with self._op(items=1, pool=True):
            d, key, inode = await self._lookup_entry(dir_ino, name)
            if not inode.is_dir:
                raise FsError(errno.ENOTDIR, f"{name!r} is not a directory")
            if inode.size:
                raise FsError(errno.ENOTEMPTY, f"{name!r} is not empty")
            await self._remove_entry(d, key)
            d.nlink -= 1
            await self._iwrite(d)
            inode.nlink = 1
            await self._drop_link(inode)

    async def _is_ancestor(self, anc: int, ino: int) -> bool:
        while True:
            if ino == anc:
                return True
            if ino == ROOT_INO:
                return False
            ino = (await self._iget(ino)).parent

    async def rename(self, odir: int, oname: bytes, ndir: int, nname: bytes, flags: int = 0,
                     *, uid: int = 0, gid: int = 0) -> None:
        """rename(2)/renameat2(2); ``uid``/``gid`` own a RENAME_WHITEOUT's whiteout."""
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or (
                flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT)):
            raise FsError(errno.EINVAL, f"bad rename flags {flags:#x}")
        check_name(nname)
        whiteout = bool(flags & RENAME_WHITEOUT)
        async with self._op(items=4 if whiteout else 2, pool=True):
            od = await self._dir(odir)
            nd = await self._dir(ndir)
            src = await self._find(odir, oname)
            if src is None:
                raise FsError(errno.ENOENT)
            dst = await self._find(ndir, nname)
            if src == dst or (odir == ndir and oname == nname):
                return
            sinode = await self._iget(src[1])
            if flags & RENAME_EXCHANGE:
                if dst is None:
                    raise FsError(errno.ENOENT)
                await self._exchange(od, src, sinode, nd, dst, oname, nname)
                return
            if dst is not None and flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if sinode.is_dir and odir != ndir and await self._is_ancestor(sinode.ino, ndir):
                raise FsError(errno.EINVAL, "cannot move a directory into itself")
            if sinode.is_dir and odir != ndir:
                _check_nlink(nd)
            dinode = None
            if dst is not None:
                dinode = await self._iget(dst[1])
                if sinode.ino == dinode.ino:
                    # Two names of one file: POSIX says do nothing.
                    return
                if dinode.is_dir and not sinode.is_dir:
                    raise FsError(errno.EISDIR)
                if sinode.is_dir and not dinode.is_dir:
                    raise FsError(errno.ENOTDIR)
                if dinode.is_dir and dinode.size:
                    raise FsError(errno.ENOTEMPTY)
                await self._remove_entry(nd, dst[0])
            await self._remove_entry(od, src[0])
            await self._add_entry(nd, nname, sinode)
            if whiteout:
                # What overlayfs reads as "deleted here": created in the
                # same transaction, so no one ever sees the name missing.
                wo = await self._new_inode(stat.S_IFCHR, uid, gid, rdev=0)
                await self._add_entry(od, oname, wo)
            if sinode.is_dir and odir != ndir:
                od.nlink -= 1
                nd.nlink += 1
                sinode.parent = ndir
            sinode.ctime = _now()
            await self._iwrite(sinode)
            await self._iwrite(od)
            if nd is not od:
                await self._iwrite(nd)
            if dinode is not None:
                if dinode.is_dir:
                    nd.nlink -= 1
                    await self._iwrite(nd)
                    dinode.nlink = 1
                await self._drop_link(dinode)

    async def _exchange(self, od, src, sinode, nd, dst, oname, nname) -> None:
        dinode = await self._iget(dst[1])
        for inode, other in ((sinode, nd), (dinode, od)):
            if inode.is_dir and other.ino != inode.parent and await self._is_ancestor(inode.ino, other.ino):
                raise FsError(errno.EINVAL, "cannot move a directory into itself")
        if od.ino != nd.ino and sinode.is_dir != dinode.is_dir:
            _check_nlink(nd if sinode.is_dir else od)     # it gains a subdirectory
        await self.tree.update(src[0], encode_dirent(dinode.ino, dtype_of(dinode.mode), oname))
        await self.tree.update(dst[0], encode_dirent(sinode.ino, dtype_of(sinode.mode), nname))
        if od.ino != nd.ino:
            for inode, newparent, oldparent in ((sinode, nd, od), (dinode, od, nd)):
                if inode.is_dir:
                    inode.parent = newparent.ino
                    newparent.nlink += 1
                    oldparent.nlink -= 1
        now = _now()
        for inode in {id(x): x for x in (sinode, dinode, od, nd)}.values():
            inode.ctime = now
            await self._iwrite(inode)

    async def readdir(self, dir_ino: int, cookie: int = 0, limit: int = 1024) -> list[tuple[bytes, int, int, int]]:
        """Entries after ``cookie`` as (name, ino, dtype, next cookie).

        Cookies are the entries' key offsets + 1: stable across inserts and
        deletes of other names.  "." and ".." are the VFS adapter's business.
        """
        async with self._op(write=False):
            await self._dir(dir_ino)
            out = []
            for key, val, blk in await self.tree.scan((dir_ino, T_DIRENT, cookie),
                                                      (dir_ino, T_DIRENT + 1, 0), limit,
                                                      with_block=True):
                ino, dtype, name = decode_dirent(val, blk)
                out.append((name, ino, dtype, key[2] + 1))
            return out

    # ======================================================================
    # Xattrs
    # ======================================================================

    async def _find_xattr(self, ino: int, name: bytes):
        lo, hi = dirent_range(name_hash(name, self.salt))
        for key, val, blk in await self.tree.scan((ino, T_XATTR, lo), (ino, T_XATTR, hi),
                                                  with_block=True):
            xname, value = decode_xattr(val, blk)
            if xname == name:
                return key, value
        return None

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        _check_xattr(name, value)
        async with self._op(items=1, data=_xattr_blocks(value)):
            inode = await self._iget(ino)
            found = await self._find_xattr(ino, name)
            if found and flags & XATTR_CREATE:
                raise FsError(errno.EEXIST)
            if not found and flags & XATTR_REPLACE:
                raise FsError(errno.ENODATA)
            await self._set_xattr(inode, name, value, found)
            inode.ctime = _now()
            await self._iwrite(inode)

    async def _set_xattr(self, inode: Inode, name: bytes, value: bytes, found=None) -> None:
        """Store one xattr item; ``found`` is the existing one (_find_xattr).
        The caller's operation reserved an item and _xattr_blocks(value)."""
        stored: bytes | OutOfLine = value
        if _xattr_blocks(value):
            stored = await self._write_out_of_line(inode, value)
        item = encode_xattr(name, stored)
        if found:
            await self.tree.update(found[0], item)
            if isinstance(found[1], OutOfLine):
                self._free_out_of_line(inode, found[1])
            return
        ino = inode.ino
        lo, hi = dirent_range(name_hash(name, self.salt))
        used = {k[2] for k, _ in await self.tree.scan((ino, T_XATTR, lo), (ino, T_XATTR, hi))}
        off = next((o for o in range(lo, hi) if o not in used), None)
        if off is None:
            raise FsError(errno.ENOSPC, "too many xattr names share a hash")
        await self.tree.insert((ino, T_XATTR, off), item)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        async with self._op(write=False):
            await self._iget(ino)
            found = await self._find_xattr(ino, name)
            if found is None:
                raise FsError(errno.ENODATA)
            value = found[1]
            if isinstance(value, OutOfLine):
                value = await self._read_out_of_line(value, f"xattr {name!r} of inode {ino}")
            return value

    async def listxattr(self, ino: int) -> list[bytes]:
        async with self._op(write=False):
            await self._iget(ino)
            items = await self.tree.scan((ino, T_XATTR, 0), (ino, T_XATTR + 1, 0))
            return [decode_xattr(v)[0] for _, v in items]

    async def removexattr(self, ino: int, name: bytes) -> None:
        async with self._op(pool=True):
            inode = await self._iget(ino)
            found = await self._find_xattr(ino, name)
            if found is None:
                raise FsError(errno.ENODATA)
            await self.tree.delete(found[0])
            if isinstance(found[1], OutOfLine):
                self._free_out_of_line(inode, found[1])
            inode.ctime = _now()
            await self._iwrite(inode)

    async def _write_out_of_line(self, inode: Inode, value: bytes) -> OutOfLine:
        """Store a large value in whole blocks of its own.  The blocks are
        written and flushed before the item naming them can commit."""
        nblocks = -(-len(value) // BLOCK_SIZE)
        start, n = self.space.take(nblocks, None, minlen=nblocks)
        padded = value + bytes(nblocks * BLOCK_SIZE - len(value))
        await self.dev.write(start, [padded])
        await self.dev.flush()
        inode.blocks += n
        return OutOfLine(start, n, len(value), crc32c(value))

    async def _read_out_of_line(self, ref: OutOfLine, what: str) -> bytes:
        buf = await self.dev.read(ref.pblock, ref.nblocks)
        value = bytes(buf[:ref.length])
        if crc32c(value) != ref.crc:
            raise CorruptionError(what, ref.pblock, "value checksum mismatch")
        return value

    def _free_out_of_line(self, inode: Inode, ref: OutOfLine) -> None:
        self.space.free(ref.pblock, ref.nblocks)
        inode.blocks -= ref.nblocks

    # ======================================================================
    # Extents
    # ======================================================================

    async def extent_map(self, ino: int) -> ExtentMap:
        """The inode's in-memory extent map, loaded from the tree on first use.
        Caller holds meta_lock."""
        emap = self.emaps.get(ino)
        if emap is None:
            emap = ExtentMap()
            # A mapping taken from an earlier copy of this map (since
            # evicted) must look stale: each load starts the cookie in a
            # range of its own, above every value an earlier copy reached.
            self._emap_loads += 1
            emap.cookie = self._emap_loads << 40
            for key, val, blk in await self.tree.scan((ino, T_EXTENT, 0), (ino, T_EXTENT + 1, 0),
                                                      with_block=True):
                pblock, length, state = decode_extent(val, blk)
                emap.set(Extent(key[2], length, _DISK_TO_STATE[state], pblock))
            self.emaps[ino] = emap
        return emap

    async def _sync_extents(self, ino: int, emap: ExtentMap, lo: int, hi: int) -> None:
        """Make the tree's extent items agree with the map after the map
        changed in [lo, hi).  The items touching the edges are rewritten too,
        since the map may have split or merged them."""
        r0, r1 = lo, hi
        if lo > 0:
            prev = await self.tree.lookup_le((ino, T_EXTENT, lo - 1))
            if prev and prev[0][:2] == (ino, T_EXTENT):
                r0 = min(r0, prev[0][2])
            m = emap.extent_at(lo - 1)
            if m is not None:
                r0 = min(r0, m.fblock)
        last = await self.tree.lookup_le((ino, T_EXTENT, hi))
        if last and last[0][:2] == (ino, T_EXTENT):
            r1 = max(r1, last[0][2] + decode_extent(last[1])[1])
        m = emap.extent_at(hi)
        if m is not None:
            r1 = max(r1, m.end)
        for key, _ in await self.tree.scan((ino, T_EXTENT, r0), (ino, T_EXTENT, r1)):
            await self.tree.delete(key)
        for ext in emap.iter_extents(r0, r1):
            if ext.state not in _STATE_TO_DISK:
                continue
            f, p, n = ext.fblock, ext.pblock, ext.length
            while n:
                k = min(n, MAX_EXTENT_LEN)
                await self.tree.insert((ino, T_EXTENT, f), encode_extent(p, k, _STATE_TO_DISK[ext.state]))
                f, p, n = f + k, p + k, n - k

    async def _allocate_range(self, inode: Inode, emap: ExtentMap, fblock: int, count: int,
                              *, one_run: bool = False) -> int:
        """Allocate UNWRITTEN blocks over the holes of [fblock, fblock+count)
        and return how many.  The caller reserved ``count`` blocks in the
        operation.  ``one_run`` stops after the first contiguous run, which
        must start at ``fblock`` (a hole): xfs_bmapi_write hands iomap one
        mapping, and a caller that may have to free what it allocated
        (iomap_end of a failed write) is only ever told of that one."""
        done = 0
        for piece in emap.lookup_range(fblock, count):
            if piece.state != ExtState.HOLE:
                continue
            f, n = piece.fblock, piece.length
            while n:
                goal = self._goal(emap, f)
                start, got = self.space.take(n, goal)
                emap.set(Extent(f, got, ExtState.UNWRITTEN, start))
                inode.blocks += got
                f, n, done = f + got, n - got, done + got
                if one_run:
                    break
            if one_run:
                break
        await self._sync_extents(inode.ino, emap, fblock, fblock + count)
        return done

    @staticmethod
    def _goal(emap: ExtentMap, fblock: int) -> int | None:
        """Where the previous extent's disk blocks end: allocate next to them."""
        if fblock == 0:
            return None
        prev = emap.lookup(fblock - 1)
        if prev.state in _STATE_TO_DISK:
            return prev.pblock + 1
        return None

    async def _convert(self, ino: int, emap: ExtentMap, fblock: int, count: int) -> None:
        """UNWRITTEN -> WRITTEN over the range (the data is on stable storage)."""
        for piece in emap.lookup_range(fblock, count):
            if piece.state == ExtState.UNWRITTEN:
                emap.set(Extent(piece.fblock, piece.length, ExtState.WRITTEN, piece.pblock))
        await self._sync_extents(ino, emap, fblock, fblock + count)

    async def _punch(self, inode: Inode, fblock: int, count: int) -> None:
        """Free the UNWRITTEN/WRITTEN blocks of the range, rolling the
        transaction every few hundred changed blocks so that punching a
        file with a million extents never needs a huge transaction."""
        emap = await self.extent_map(inode.ino)
        end = fblock + count
        while fblock < end:
            batch_end = fblock
            n = 0
            for ext in emap.iter_extents(fblock, end):
                batch_end = ext.end
                n += 1
                if n >= 64:
                    break
            else:
                batch_end = end
            removed = emap.remove(fblock, batch_end - fblock,
                                  (ExtState.UNWRITTEN, ExtState.WRITTEN))
            for ext in removed:
                self.space.free(ext.pblock, ext.length)
                inode.blocks -= ext.length
            await self._sync_extents(inode.ino, emap, fblock, batch_end)
            await self._iwrite(inode)
            fblock = batch_end
            if len(self.store.dirty) > self.store.roll_threshold and fblock < end:
                self.stats["rolls"] += 1
                await self.store.commit_locked()

    async def allocate(self, ino: int, fblock: int, count: int) -> None:
        """fallocate's allocation: UNWRITTEN blocks over the holes of the
        range (delalloc and existing extents are left as they are)."""
        if (fblock + count) << BLOCK_SHIFT > self.sb.max_file_size:
            raise FsError(errno.EFBIG, f"file size limit is {self.sb.max_file_size} bytes")
        async with self._op(items=2 * count + 2, item_size=_EXTENT_ITEM, data=count):
            inode = await self._iget(ino)
            if not inode.is_reg:
                raise FsError(errno.ENODEV, f"inode {ino} is not a regular file")
            emap = await self.extent_map(ino)
            holes = sum(e.length for e in emap.lookup_range(fblock, count) if e.state == ExtState.HOLE)
            if holes:
                await self._allocate_range(inode, emap, fblock, count)
                await self._iwrite(inode)

    async def punch_hole(self, ino: int, fblock: int, count: int) -> None:
        """Free every block of the range: delalloc (its reservation returns)
        and allocated extents (through the journal)."""
        async with self._op(items=2, item_size=_EXTENT_ITEM, pool=True):
            inode = await self._iget(ino)
            emap = await self.extent_map(ino)
            gone = emap.remove(fblock, count, (ExtState.DELALLOC,))
            if gone:
                self.space.alloc.unreserve(sum(e.length + e.indlen for e in gone))
            await self._punch(inode, fblock, count)

    async def map_blocks(self, ino: int, fblock: int, count: int) -> list[Extent]:
        async with self._op(write=False):
            return (await self.extent_map(ino)).lookup_range(fblock, count)

    # ======================================================================
    # Data: the simple allocate-write-flush-convert path
    # ======================================================================

    async def _read_blocks(self, emap: ExtentMap, fblock: int, count: int) -> bytearray:
        out = bytearray(count * BLOCK_SIZE)
        for piece in emap.lookup_range(fblock, count):
            if piece.state == ExtState.WRITTEN:
                off = (piece.fblock - fblock) * BLOCK_SIZE
                out[off:off + piece.length * BLOCK_SIZE] = await self.dev.read(piece.pblock, piece.length)
        return out

    async def pwrite(self, ino: int, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset``, durably allocated: new blocks are
        UNWRITTEN until the data is flushed, then converted."""
        if offset < 0:
            raise FsError(errno.EINVAL, "negative offset")
        if offset + len(data) > self.sb.max_file_size:
            raise FsError(errno.EFBIG, f"file size limit is {self.sb.max_file_size} bytes")
        if not data:
            return 0
        b0 = offset >> BLOCK_SHIFT
        b1 = (offset + len(data) + BLOCK_SIZE - 1) >> BLOCK_SHIFT
        count = b1 - b0
        async with self._op(items=2 * count + 2, item_size=_EXTENT_ITEM, data=count):
            inode = await self._iget(ino)
            if not inode.is_reg:
                raise FsError(errno.EINVAL, f"inode {ino} is not a regular file")
            emap = await self.extent_map(ino)
            buf = bytearray(count * BLOCK_SIZE)
            head = offset - (b0 << BLOCK_SHIFT)
            tail = (b1 << BLOCK_SHIFT) - (offset + len(data))
            # Partial blocks at either end keep the bytes around the write.
            if head:
                buf[:BLOCK_SIZE] = await self._read_blocks(emap, b0, 1)
            if tail and (count > 1 or not head):
                buf[-BLOCK_SIZE:] = await self._read_blocks(emap, b1 - 1, 1)
            buf[head:head + len(data)] = data
            await self._allocate_range(inode, emap, b0, count)
            for piece in emap.lookup_range(b0, count):
                off = (piece.fblock - b0) * BLOCK_SIZE
                await self.dev.write(piece.pblock, [memoryview(buf)[off:off + piece.length * BLOCK_SIZE]])
            await self.dev.flush()
            await self._convert(ino, emap, b0, count)
            inode.size = max(inode.size, offset + len(data))
            inode.mtime = inode.ctime = _now()
            await self._iwrite(inode)
            return len(data)

    async def pread(self, ino: int, offset: int, size: int) -> bytes:
        async with self._op(write=False):
            inode = await self._iget(ino)
            if not inode.is_reg:
                raise FsError(errno.EINVAL, f"inode {ino} is not a regular file")
            end = min(inode.size, offset + size)
            if offset >= end:
                return b""
            b0 = offset >> BLOCK_SHIFT
            b1 = (end + BLOCK_SIZE - 1) >> BLOCK_SHIFT
            buf = await self._read_blocks(await self.extent_map(ino), b0, b1 - b0)
            start = offset - (b0 << BLOCK_SHIFT)
            return bytes(buf[start:start + end - offset])

    async def truncate(self, ino: int, size: int, *, old_size: int | None = None) -> None:
        """Set the size; shrinking frees everything past the new EOF.

        ``old_size`` is the in-memory size before the change (the VFS
        i_size), when the caller has one: it runs ahead of the on-disk size
        while data is not yet written back, and the delalloc (and any blocks
        writeback allocated) past the new EOF must go even when the on-disk
        size is already below it.  Default: the on-disk size."""
        if size < 0:
            raise FsError(errno.EINVAL, "negative size")
        if size > self.sb.max_file_size:
            raise FsError(errno.EFBIG, f"file size limit is {self.sb.max_file_size} bytes")
        async with self._op(items=2, item_size=_EXTENT_ITEM, pool=True):
            inode = await self._iget(ino)
            if not inode.is_reg:
                raise FsError(errno.EINVAL if not inode.is_dir else errno.EISDIR,
                              f"inode {ino} is not a regular file")
            if size < max(inode.size, old_size or 0):
                emap = await self.extent_map(ino)
                partial = size & (BLOCK_SIZE - 1)
                if partial:
                    # Zero the tail of the last block now, so growing the file
                    # later can never bring old bytes back.
                    blk = size >> BLOCK_SHIFT
                    m = emap.lookup(blk)
                    if m.state == ExtState.WRITTEN:
                        data = bytearray(await self.dev.read(m.pblock, 1))
                        data[partial:] = bytes(BLOCK_SIZE - partial)
                        await self.dev.write(m.pblock, [data])
                        await self.dev.flush()
                first = (size + BLOCK_SIZE - 1) >> BLOCK_SHIFT
                inode.size = size
                await self._iwrite(inode)
                # Delalloc past the new EOF only exists in memory: drop it
                # and its reservation.
                gone = emap.remove(first, (1 << 52) - first, (ExtState.DELALLOC,))
                if gone:
                    self.space.alloc.unreserve(sum(e.length + e.indlen for e in gone))
                end = max((e.end for e in emap.iter_extents(first)), default=first)
                if end > first:
                    await self._punch(inode, first, end - first)
            inode.size = size
            inode.mtime = inode.ctime = _now()
            await self._iwrite(inode)

    # ======================================================================
    # Open files and orphans
    # ======================================================================

    def open_ref(self, ino: int) -> None:
        """An open file holds the inode: unlinking it makes an orphan."""
        self.open_counts[ino] = self.open_counts.get(ino, 0) + 1

    async def close_ref(self, ino: int) -> None:
        n = self.open_counts.get(ino, 0) - 1
        if n > 0:
            self.open_counts[ino] = n
            return
        self.open_counts.pop(ino, None)
        async with self._op(pool=True):
            try:
                inode = await self._iget(ino)
            except FsError:
                return
            if inode.nlink == 0:
                await self._destroy(inode)

    async def _destroy(self, inode: Inode) -> None:
        """Free everything an unlinked, unopened inode owns."""
        ino = inode.ino
        if inode.is_reg:
            emap = await self.extent_map(ino)
            gone = emap.remove(0, 1 << 62, (ExtState.DELALLOC,))
            if gone:
                # Data that never reached the disk: its reservation returns.
                self.space.alloc.unreserve(sum(e.length + e.indlen for e in gone))
            end = max((e.end for e in emap.iter_extents(0)), default=0)
            if end:
                await self._punch(inode, 0, end)
        for key, val in await self.tree.scan((ino, T_XATTR, 0), (ino, T_XATTR + 1, 0)):
            _, value = decode_xattr(val)
            if isinstance(value, OutOfLine):
                self._free_out_of_line(inode, value)
            await self.tree.delete(key)
        if inode.is_symlink:
            val = await self.tree.lookup((ino, T_SYMLINK, 0))
            if val is not None:
                target = decode_symlink(val)
                if isinstance(target, OutOfLine):
                    self._free_out_of_line(inode, target)
                await self.tree.delete((ino, T_SYMLINK, 0))
        await self.tree.delete((ino, T_INODE, 0))
        await self.tree.delete((ORPHAN_OID, T_ORPHAN, ino))
        self.info.inode_count -= 1
        self.store.mark_dirty(self.info)
        self.inodes.pop(ino, None)
        self.dirty_times.discard(ino)
        self.emaps.pop(ino, None)

    async def _reap_orphans(self) -> None:
        """At mount nothing is open: free every inode left on the orphan list."""
        async with self._op(pool=True):
            while True:
                items = await self.tree.scan((ORPHAN_OID, T_ORPHAN, 0), (ORPHAN_OID, T_ORPHAN + 1, 0), 64)
                if not items:
                    break
                for key, _ in items:
                    try:
                        inode = await self._iget(key[2])
                    except FsError:
                        await self.tree.delete(key)
                        continue
                    if inode.nlink == 0:
                        await self._destroy(inode)       # removes the orphan record too
                        self.stats["orphans_recovered"] += 1
                    else:
                        await self.tree.delete(key)
                    if len(self.store.dirty) > self.store.roll_threshold:
                        await self.store.commit_locked()
        await self.commit()

    # ======================================================================
    # Whole filesystem
    # ======================================================================

    def statfs(self) -> dict:
        """Free space net of reservations.  Busy blocks (freed by a
        transaction not yet durable) count as free, as XFS's free counter
        does: they are free as soon as the next commit lands, and df should
        not lag behind rm by a commit interval."""
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
