"""Open references and the orphan list: an inode with no names that is
still open is listed in the tree, so a crash cannot leak it, and so is a
file while a shrinking truncate that rolls frees its blocks; recovery
reaps the list at mount, freeing the first and finishing the second
(xfs_inode.c's unlinked list, ext4's orphan list for truncate).

A mixin of :class:`~delafs.fs.filesystem.Filesystem`: every method runs
on the Filesystem and keeps its locking rules (public methods are whole
metadata operations under ``meta_lock``)."""

from __future__ import annotations

import logging

from ..lib.errors import DelafsError, FsError
from .extent_map import ExtState
from .items import (
    ORPHAN_OID,
    T_INODE,
    T_ORPHAN,
    T_SYMLINK,
    T_XATTR,
    Inode,
    OutOfLine,
    decode_symlink,
    decode_xattr,
)

log = logging.getLogger("delafs")


class OrphanOps:

    def open_ref(self, ino: int) -> None:
        """An open file holds the inode: unlinking it makes an orphan."""
        self.open_counts[ino] = self.open_counts.get(ino, 0) + 1

    async def close_ref(self, ino: int) -> None:
        n = self.open_counts.get(ino, 0) - 1
        if n > 0:
            self.open_counts[ino] = n
            return
        self.open_counts.pop(ino, None)
        if self.readonly:
            return          # nothing can be freed; the next writable mount reaps orphans
        async with self.transaction(pool=True):
            try:
                inode = await self.iget(ino)
            except DelafsError:     # gone, or unreadable: nothing to free here
                return
            if inode.nlink == 0:
                await self._destroy(inode)

    async def _orphan_add(self, ino: int) -> None:
        """List the inode for recovery (ext4_orphan_add): an unlinked inode
        that is still open, or a shrinking truncate that may commit its
        smaller size before it has freed the blocks past it."""
        await self.tree.insert((ORPHAN_OID, T_ORPHAN, ino), b"")

    async def _orphan_del(self, ino: int) -> None:
        await self.tree.delete((ORPHAN_OID, T_ORPHAN, ino))

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
        await self._orphan_del(ino)
        self.info.inode_count -= 1
        self.store.mark_dirty(self.info)
        self.inodes.pop(ino, None)
        self.dirty_times.discard(ino)
        self.emaps.pop(ino, None)

    async def _reap_orphans(self) -> None:
        """At mount nothing is open: free every inode left on the orphan
        list.  A listed inode that still has a name is a truncate a crash
        cut short between its rolls: free what it had not freed yet, the
        blocks past EOF (as ext4_orphan_cleanup truncates a linked inode)."""
        async with self.transaction(pool=True):
            while True:
                items = await self.tree.scan((ORPHAN_OID, T_ORPHAN, 0), (ORPHAN_OID, T_ORPHAN + 1, 0), 64)
                if not items:
                    break
                for key, _ in items:
                    try:
                        inode = await self.iget(key[2])
                    except FsError:
                        await self.tree.delete(key)
                        continue
                    if inode.nlink == 0:
                        await self._destroy(inode)       # removes the orphan record too
                        self.stats["orphans_recovered"] += 1
                    else:
                        if inode.is_reg:
                            await self._itruncate_extents(inode)
                            self.stats["truncates_recovered"] += 1
                        await self._orphan_del(inode.ino)
                    await self.roll_if_full()
        await self.commit()
