"""The filesystem's writeback ops (xfs_aops.c in spirit): writeback_range
maps a dirty range, converting delalloc to UNWRITTEN blocks, and queues it
with iomap's add_to_ioend; submit writes the ioends and completes them:
UNWRITTEN becomes WRITTEN and the on-disk size moves, in one metadata
operation, only after the data writes completed.  The transaction cannot
commit before the data is durable: the journal flushes the device first
(log/journal.py, REQ_PREFLUSH).  A range that
cannot be mapped has its folio's delalloc discarded under the folio lock
(xfs_discard_folio).

Writeback takes neither i_rwsem nor invalidate_lock; every entry takes the
filesystem's ``meta_lock`` (below the folio lock in the lock order).
"""

from __future__ import annotations

import errno
import logging

from ..iomap.ioend import add_to_ioend
from ..iomap.types import (
    Ioend,
    IomapType,
    VInode,
    WritebackCtx,
)
from ..lib.errors import FsError
from ..lib.locks import assert_owned
from ..lib.trace import TRACE
from ..lib.units import BLOCK_SHIFT, BLOCK_SIZE
from .extent_map import Extent, ExtState
from .items import EXTENT_ITEM_SIZE

log = logging.getLogger("delafs")

EXT_TO_IOMAP = {ExtState.HOLE: IomapType.HOLE, ExtState.DELALLOC: IomapType.DELALLOC,
                ExtState.UNWRITTEN: IomapType.UNWRITTEN, ExtState.WRITTEN: IomapType.MAPPED}


class FsWritebackOps:
    """WritebackOps of a Filesystem: FsIomapOps inherits them and holds the
    state they use (``fs``, ``errortags``, ``stats``)."""


    async def writeback_range(self, wpc: WritebackCtx, folio, pos: int, length: int,
                              end_pos: int) -> int:
        """Map a prefix of [pos, pos+length) and queue it on an ioend."""
        fs = self.fs
        inode = wpc.inode
        self.stats["writeback_ranges"] += 1
        cached = wpc.iomap
        if cached is not None and cached.offset <= pos < cached.end and not fs.shutdown:
            if self.wb_mapping_valid(inode, cached):
                n = min(length, cached.end - pos)
                add_to_ioend(wpc, folio, pos, n, cached.addr + pos - cached.offset, cached.type)
                if TRACE.on:
                    TRACE.emit("iomap_writeback_range", ino=inode.ino, pos=pos, length=n,
                               type=cached.type.name)
                return n
        async with fs.meta_lock:
            try:
                fs.check_alive()
                emap = await fs.extent_map(inode.ino)
                fblock = pos >> BLOCK_SHIFT
                ext = emap.lookup(fblock)      # the rest of the extent: the cached mapping
                if ext.state == ExtState.DELALLOC:
                    if self.errortags.fires("alloc_enospc"):
                        raise FsError(errno.ENOSPC, "injected allocation failure in writeback")
                    ext = await self._convert_delalloc(inode, emap, fblock, end_pos)
                elif ext.state == ExtState.HOLE:
                    raise FsError(errno.EIO, f"inode {inode.ino}: dirty block {fblock} has no mapping")
            except BaseException:
                self.discard_folio(inode.ino, folio)
                self.stats["writeback_errors"] += 1
                raise
            wpc.iomap = self._iomap(ext, emap.cookie, 0)
            # No request runs between the conversions of an fsync's walk
            # to roll the transaction for it.
            await fs.roll_if_full()
        n = min(length, (ext.end << BLOCK_SHIFT) - pos)
        addr = (ext.pblock << BLOCK_SHIFT) + (pos - (ext.fblock << BLOCK_SHIFT))
        typ = EXT_TO_IOMAP[ext.state]
        add_to_ioend(wpc, folio, pos, n, addr, typ)
        if TRACE.on:
            TRACE.emit("iomap_writeback_range", ino=inode.ino, pos=pos, length=n, type=typ.name)
        return n

    def wb_mapping_valid(self, inode: VInode, iomap) -> bool:
        """xfs_imap_valid: the mapping writeback cached in its context still
        holds if the extent map has not changed since it was made (its
        cookie); then a range inside it needs no lock and no lookup."""
        emap = self.fs.emaps.get(inode.ino)
        return emap is not None and emap.cookie == iomap.validity_cookie

    def discard_folio(self, ino: int, folio) -> None:
        """xfs_discard_folio: drop the folio's delalloc after writeback
        failed to map it, under the folio lock alone (meta_lock is held by
        the caller): no transaction, so it works even at ENOSPC."""
        assert_owned(self.fs.meta_lock, "discard_folio")
        folio.assert_locked()
        self.punch_locked(ino, folio.pos, folio.end - folio.pos)
        self.stats["discards"] += 1

    async def _convert_delalloc(self, inode: VInode, emap, fblock: int, end_pos: int) -> Extent:
        """Allocate real blocks for the delalloc extent at ``fblock`` (as much
        of it as is contiguous on disk, never past EOF) as UNWRITTEN."""
        fs = self.fs
        ext = emap.extent_at(fblock)
        eof = (end_pos + BLOCK_SIZE - 1) >> BLOCK_SHIFT
        n = min(ext.end, max(eof, fblock + 1)) - fblock
        start, got = fs.space.allocate(n, fs.alloc_goal(emap, fblock), source="reserved")
        replaced = emap.set(Extent(fblock, got, ExtState.UNWRITTEN, start))
        indlen = sum(e.indlen for e in replaced)
        # The converted piece's indlen pays for the btree nodes its item
        # needs; what is left goes back, and the metadata reserve covers a
        # shortfall (indlen was split by proportion, not by need).
        fs.space.begin_op(indlen, "metadata_reserve")
        try:
            fsinode = await fs.iget(inode.ino)
            fsinode.blocks += got
            await fs.sync_extents(inode.ino, emap, fblock, fblock + got)
            await fs.log_inode(fsinode)
        except BaseException as e:
            # The allocator and the extent map have changed and the tree
            # may have, in the running transaction: nothing may commit it
            # (XFS shuts down when a dirty transaction is cancelled).
            fs.shut_down(f"delalloc conversion of inode {inode.ino} failed halfway: {e!r}")
            raise
        finally:
            fs.space.end_op()
        self.stats["delalloc_converted"] += got
        if TRACE.on:
            TRACE.emit("xfs_map_blocks_alloc", ino=inode.ino, fblock=fblock, blocks=got, pblock=start)
        return emap.lookup(fblock)

    async def writeback_submit(self, wpc: WritebackCtx) -> None:
        """Write every ioend, then complete: convert UNWRITTEN to WRITTEN
        and move the on-disk size, in one metadata operation of the running
        transaction.  No flush here: the journal flushes before it writes
        the commit that carries the conversion (Journal.write_transaction),
        and fsync's commit flushes what nothing else did."""
        if wpc.ioend is not None:
            wpc.ready.append(wpc.ioend)
            wpc.ioend = None
        ioends, wpc.ready = wpc.ready, []
        if not ioends:
            return
        fs = self.fs
        queued = []
        for io in ioends:
            self.stats["ioends"] += 1
            self.stats["ioend_bytes"] += io.size
            if self.errortags.active:
                await self.errortags.delay("delay_writeback")
            if self.errortags.fires("writeback_eio"):
                self._ioend_failed(wpc, io, FsError(errno.EIO, "injected writeback I/O error"))
            else:
                queued.append(io)
            if TRACE.on:
                TRACE.emit("iomap_ioend_submit", ino=io.ino, offset=io.offset, size=io.size)
        if not queued:
            return
        try:
            errors = await fs.dev.submit([(io.addr >> BLOCK_SHIFT, io.bufs) for io in queued])
        except Exception as e:          # not an I/O error: a bug, or a closed device
            errors = [e] * len(queued)
        done = []
        for io, err in zip(queued, errors):
            if err is None:
                done.append(io)
            else:
                self._ioend_failed(wpc, io, err)
        if done:
            await self._complete(wpc.inode, done)

    def _ioend_failed(self, wpc: WritebackCtx, io: Ioend, e: Exception) -> None:
        err = e.errno if isinstance(e, FsError) else errno.EIO
        if not isinstance(e, FsError):
            log.error("writeback of inode %d at %d: %r", io.ino, io.offset, e)
        wpc.error = wpc.error or err
        wpc.inode.mapping.set_error(err)
        self.stats["writeback_errors"] += 1

    async def _complete(self, inode: VInode, ioends: list[Ioend]) -> None:
        """The data writes completed: make them visible to recovery, in a
        transaction the journal commits only after flushing them.  An
        overwrite of written blocks inside the on-disk size changes nothing
        (so an fdatasync after it needs no journal commit)."""
        fs = self.fs
        fsinode = fs.inodes.get(inode.ino)
        if (fsinode is not None and all(io.type != IomapType.UNWRITTEN for io in ioends)
                and max(io.offset + io.size for io in ioends) <= fsinode.size):
            for io in ioends:
                if TRACE.on:
                    TRACE.emit("iomap_ioend_completion", ino=io.ino, offset=io.offset, size=io.size)
            return
        async with fs.transaction(items=2 * len(ioends) + 1, item_size=EXTENT_ITEM_SIZE, pool=True):
            emap = await fs.extent_map(inode.ino)
            fsinode = await fs.iget(inode.ino)
            end = 0
            for io in ioends:
                first = io.offset >> BLOCK_SHIFT
                count = (io.size + BLOCK_SIZE - 1) >> BLOCK_SHIFT
                if io.type == IomapType.UNWRITTEN:
                    await fs.convert_unwritten(inode.ino, emap, first, count)
                end = max(end, io.offset + io.size)
                if TRACE.on:
                    TRACE.emit("iomap_ioend_completion", ino=io.ino, offset=io.offset, size=io.size)
                if fs.store.should_roll():
                    # A rolled commit carries the size up to what is done,
                    # as a shorter batch would have (ioends are in file order).
                    await self._set_disk_size(fsinode, inode, end)
                await fs.roll_if_full()
            await self._set_disk_size(fsinode, inode, end)

    async def _set_disk_size(self, fsinode, inode: VInode, end: int) -> None:
        """xfs_setfilesize: move the on-disk size up to ``end`` (never past
        the in-memory size) and log the inode."""
        new_size = min(inode.size, end)
        if new_size > fsinode.size:
            fsinode.size = new_size
        await self.fs.log_inode(fsinode)
