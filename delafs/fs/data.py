"""The simple data path used before the page cache exists and by tools:
new blocks are allocated UNWRITTEN, written, flushed, then converted, so a
crash never exposes stale blocks; and truncate.

A mixin of :class:`~delafs.fs.filesystem.Filesystem`: every method runs
on the Filesystem and keeps its locking rules (public methods are whole
metadata operations under ``meta_lock``)."""

from __future__ import annotations

import errno
import logging

from ..lib.errors import FsError
from ..ondisk import (
    BLOCK_SHIFT,
    BLOCK_SIZE,
)
from .extent_map import ExtentMap, ExtState
from .inode import now_ns
from .items import EXTENT_ITEM_SIZE, Inode

log = logging.getLogger("delafs")


class DataOps:

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
        async with self.transaction(items=2 * count + 2, item_size=EXTENT_ITEM_SIZE, data=count):
            inode = await self.iget(ino)
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
            await self.allocate_unwritten(inode, emap, b0, count)
            for piece in emap.lookup_range(b0, count):
                off = (piece.fblock - b0) * BLOCK_SIZE
                await self.dev.write(piece.pblock, [memoryview(buf)[off:off + piece.length * BLOCK_SIZE]])
            await self.dev.flush()
            await self.convert_unwritten(ino, emap, b0, count)
            inode.size = max(inode.size, offset + len(data))
            inode.mtime = inode.ctime = now_ns()
            await self.log_inode(inode)
            return len(data)

    async def pread(self, ino: int, offset: int, size: int) -> bytes:
        async with self.transaction(write=False):
            inode = await self.iget(ino)
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

    async def truncate(self, ino: int, size: int, *, old_size: int | None = None,
                       zero_eof: bool = True) -> None:
        """Set the size; shrinking frees everything past the new EOF.

        ``old_size`` is the in-memory size before the change (the VFS
        i_size), when the caller has one: it runs ahead of the on-disk size
        while data is not yet written back, and the delalloc (and any blocks
        writeback allocated) past the new EOF must go even when the on-disk
        size is already below it.  Default: the on-disk size.

        ``zero_eof``: zero the tail of a WRITTEN block holding the new EOF
        on the device, read-modify-write, before logging the size.  A caller
        with a page cache passes False once it has zeroed that block and
        written it back itself: a write here, beside the cache's writeback
        of the same block, could land after it with older bytes."""
        if size < 0:
            raise FsError(errno.EINVAL, "negative size")
        if size > self.sb.max_file_size:
            raise FsError(errno.EFBIG, f"file size limit is {self.sb.max_file_size} bytes")
        # Two extent items, and the orphan record of a punch that may roll.
        async with self.transaction(items=3, item_size=EXTENT_ITEM_SIZE, pool=True):
            inode = await self.iget(ino)
            if not inode.is_reg:
                raise FsError(errno.EINVAL if not inode.is_dir else errno.EISDIR,
                              f"inode {ino} is not a regular file")
            if size < max(inode.size, old_size or 0):
                emap = await self.extent_map(ino)
                partial = size & (BLOCK_SIZE - 1)
                if partial and zero_eof:
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
                await self.log_inode(inode)
                # Delalloc past the new EOF only exists in memory: drop it
                # and its reservation.
                gone = emap.remove(first, (1 << 52) - first, (ExtState.DELALLOC,))
                if gone:
                    self.space.alloc.unreserve(sum(e.length + e.indlen for e in gone))
                # A punch that rolls commits the smaller size before the
                # blocks past it are free, and growing the file again would
                # read them back.  So the inode is on the orphan list from
                # the transaction that logs the size to the one where the
                # punch ends, and a crash in between leaves a truncate the
                # next mount finishes (ext4_setattr's orphan_add).  An
                # unlinked inode is listed already.
                listed = inode.nlink > 0 and self.punch_may_roll(emap, first, 1 << 52)
                if listed:
                    await self._orphan_add(ino)
                await self._itruncate_extents(inode)
                if listed:
                    await self._orphan_del(ino)
            inode.size = size
            inode.mtime = inode.ctime = now_ns()
            await self.log_inode(inode)

    async def _itruncate_extents(self, inode: Inode) -> None:
        """Free the allocated blocks past EOF, from the block holding none
        of the file on (xfs_itruncate_extents): the end of a shrinking
        truncate, and of one a crash cut short (at mount, or fsck -y).  May
        roll the transaction: the caller keeps the inode on the orphan list
        across it."""
        emap = await self.extent_map(inode.ino)
        first = (inode.size + BLOCK_SIZE - 1) >> BLOCK_SHIFT
        end = max((e.end for e in emap.iter_extents(first)), default=first)
        if end > first:
            await self._punch(inode, first, end - first)
