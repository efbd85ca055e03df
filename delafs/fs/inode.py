"""Inodes: the inode cache written through to the tree, times, attributes
(xfs_inode.c, xfs_iops.c's setattr).

A mixin of :class:`~delafs.fs.filesystem.Filesystem`: every method runs
on the Filesystem and keeps its locking rules (public methods are whole
metadata operations under ``meta_lock``)."""

from __future__ import annotations

import errno
import itertools
import logging
import stat
import time

from ..lib.errors import CorruptionError, FsError
from ..lib.locks import assert_owned
from ..ondisk import (
    ROOT_INO,
)
from .extent_map import ExtState
from .items import (
    T_INODE,
    Inode,
    clamp_time,
)

log = logging.getLogger("delafs")

_INODE_ITEM = len(Inode(0, 0).encode())

RELATIME_NS = 24 * 3600 * 10**9     # relatime still moves an atime this old

def now_ns() -> int:
    return time.time_ns()


class InodeOps:

    async def iget(self, ino: int) -> Inode:
        # The find-then-insert below is atomic only under meta_lock.
        assert_owned(self.meta_lock, "iget")
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

    def cached_size(self, ino: int) -> int | None:
        """The size of ``ino`` if its inode is cached, else None (never
        reads the tree: for callers that must not sleep)."""
        inode = self.inodes.get(ino)
        return None if inode is None else inode.size

    async def log_inode(self, inode: Inode) -> None:
        # Copied, then marked clean, before the update may wait for a node
        # read: a stamp landing meanwhile (file_update_time takes no lock)
        # marks it dirty again, as I_DIRTY_SYNC set after the copy does.
        data = inode.encode()
        self.dirty_times.discard(inode.ino)
        try:
            await self.tree.update((inode.ino, T_INODE, 0), data)
        except BaseException:
            self.dirty_times.add(inode.ino)
            raise

    def _evict_inodes(self) -> None:
        excess = len(self.inodes) - self.inode_cache_size
        if excess <= 0:
            return
        # Oldest first; an inode whose times are not in the tree yet stays.
        # Lazily: the cache holds 65536 inodes and an operation evicts one
        # or two, so listing them all made every operation O(cache).
        dirty = self.dirty_times
        victims = list(itertools.islice((ino for ino in self.inodes if ino not in dirty), excess))
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
        self.check_alive()
        inode.mtime = inode.ctime = now_ns()
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
        now = now_ns()
        if not strict and inode.atime > inode.mtime and inode.atime > inode.ctime \
                and now - inode.atime < RELATIME_NS:
            return
        self.check_alive()
        inode.atime = now
        self.dirty_times.add(ino)

    def has_changes(self) -> bool:
        """Anything a commit would write."""
        return bool(self.dirty_times) or self.store.has_changes()

    async def _write_dirty_times(self) -> None:
        if not self.dirty_times or self.readonly:
            return
        async with self.transaction():
            for ino in list(self.dirty_times):
                inode = self.inodes.get(ino)
                if inode is None:               # destroyed since
                    self.dirty_times.discard(ino)
                    continue
                await self.log_inode(inode)
                # Thousands of stamped inodes (a first read of each file
                # under relatime) would outgrow the log in one transaction.
                await self.roll_if_full()

    async def _new_inode(self, mode: int, uid: int, gid: int, *, rdev: int = 0,
                         parent: int = 0) -> Inode:
        now = now_ns()
        ino = self.info.next_ino
        if await self.tree.lookup((ino, T_INODE, 0)) is not None:
            # Only a damaged fsinfo block hands out a number in use.
            raise CorruptionError("fsinfo block", self.sb.fsinfo_block,
                                  f"next inode number {ino} is already in use")
        inode = Inode(ino, mode, uid, gid, nlink=2 if stat.S_ISDIR(mode) else 1,
                      atime=now, mtime=now, ctime=now, btime=now,
                      generation=self.info.next_generation, rdev=rdev, parent=parent)
        self.info.next_ino += 1
        self.info.next_generation += 1
        self.info.inode_count += 1
        self.store.mark_dirty(self.info)
        await self.tree.insert((ino, T_INODE, 0), inode.encode())
        # No xattrs yet (any set at creation reset this): the kernel's
        # GETXATTR(security.capability) before the first write needs no scan.
        inode.xattr_names = ()
        self.inodes[ino] = inode
        if inode.is_reg:
            # Nothing to load: a new file has no extents (its first write
            # would otherwise scan the tree for them).
            self.emaps[ino] = self._new_extent_map()
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
        async with self.transaction(write=False):
            return (await self.iget(ino)).copy()

    async def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None,
                      atime: int | None = None, mtime: int | None = None,
                      ctime: int | None = None) -> Inode:
        if size is not None:
            await self.truncate(ino, size)
        async with self.transaction():
            inode = await self.iget(ino)
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
            inode.ctime = clamp_time(ctime) if ctime is not None else now_ns()
            await self.log_inode(inode)
            return inode.copy()
