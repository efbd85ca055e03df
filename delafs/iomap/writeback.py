"""Writeback (fs/iomap/buffered-io.c's writeback half, seed 003).

``writepages`` walks a file's dirty folios in file order.  Each folio is
locked (never i_rwsem, never invalidate_lock), its dirty bits are taken
for I/O and it is put under writeback; every dirty block range inside EOF
goes to the filesystem's ``writeback_range``, which maps a prefix,
queues it on an ioend and returns the bytes it handled, the caller looping
over the rest.  Adjacent ranges merge into one ioend, written with one
vectored write.  ``writeback_submit`` writes the ioends and completes
them: only after the writes are UNWRITTEN extents converted and the
on-disk size moved, and the journal flushes the device before it commits
that conversion, so a crash never exposes stale blocks.

The walk submits as it goes, as the kernel sends each ioend off once the
next range cannot join it: here once ``WRITEBACK_BATCH`` bytes are queued,
between folios, so one worker-thread trip still carries many small
ioends.  An ioend holds a copy of its folios' data, and those folios stay
under writeback until it completes: queuing a whole pass held a copy of
everything dirty in the file at once.

A failed ``writeback_range`` has already discarded the folio's delalloc
(under the folio lock alone); the error is recorded in the mapping's
errseq and reported by the next fsync of every open description that
existed when it happened.
"""

from __future__ import annotations

import errno
import logging

from ..lib.errors import FsError
from ..lib.trace import TRACE
from ..lib.units import BLOCK_SHIFT, BLOCK_SIZE
from .types import POINTS, VInode, WritebackCtx

log = logging.getLogger("delafs")

#: Queued ioend bytes at which a writeback walk submits before mapping more
#: (one ioend's cap): bounds the copies and folios a pass holds under I/O.
WRITEBACK_BATCH = 8 << 20


async def writepages(engine, inode: VInode, *, sync: bool, start: int = 0,
                     end: int | None = None, expired_before: float | None = None) -> int:
    """Write back the dirty folios of [start, end); with ``sync`` wait for
    folios already under writeback (WB_SYNC_ALL) instead of skipping them.
    ``expired_before`` limits a background pass to folios dirtied earlier.
    Returns the number of folios written."""
    mapping = inode.mapping
    ops = engine.ops
    wpc = WritebackCtx(inode, sync)
    first = start >> BLOCK_SHIFT
    last = None if end is None else (end + BLOCK_SIZE - 1) >> BLOCK_SHIFT
    under_io = []
    written = 0
    if TRACE.on:
        TRACE.emit("iomap_writepages", ino=inode.ino, sync=sync)
    try:
        for folio in mapping.dirty_folios(first, last):
            if expired_before is not None:
                # The list was taken before any await: a folio cleaned since
                # has no dirtied_when any more.
                when = folio.dirtied_when
                if when is None or when > expired_before:
                    continue
            if POINTS.explorer is not None:
                await POINTS.hit("writepages_folio")
            await POINTS.cond_resched()
            await folio.lock()
            if folio.mapping is not mapping or not folio.test_dirty():
                folio.unlock()
                continue
            if folio.writeback:
                if not sync:
                    folio.unlock()
                    continue
                try:
                    await folio.wait_writeback()
                except BaseException:       # cancelled: not with the folio locked
                    folio.unlock()
                    raise
            try:
                if await writeback_folio(engine, wpc, folio):
                    under_io.append(folio)
            except BaseException:
                if folio.writeback:         # started by us: end it below
                    under_io.append(folio)
                raise
            written += 1
            if wpc.queued >= WRITEBACK_BATCH:
                await _submit(ops, wpc, under_io)
    finally:
        # Whatever was queued reaches the disk even if the walk failed:
        # those folios are already clean, so skipping the submit would
        # end their writeback with their data written nowhere.
        await _submit(ops, wpc, under_io)
    if wpc.error:
        # Once per pass, not per ioend (the kernel rate-limits its line):
        # nobody may ever fsync this file, and unmount reports only its own.
        log.error("writeback of inode %d failed (%s): data lost; fsync and delafs sync report it",
                  inode.ino, errno.errorcode.get(wpc.error, wpc.error))
    return written


async def _submit(ops, wpc: WritebackCtx, under_io: list) -> None:
    """Write and complete every queued ioend, then end the writeback of the
    folios they came from (all of them: the walk is between folios)."""
    try:
        if POINTS.explorer is not None:
            await POINTS.hit("writeback_submit")
        await ops.writeback_submit(wpc)
    finally:
        wpc.queued = 0
        for folio in under_io:
            folio.end_writeback()
        under_io.clear()


async def writeback_folio(engine, wpc: WritebackCtx, folio) -> bool:
    """Hand one locked, dirty folio's blocks to writeback_range; unlock it.
    Returns True if the folio was put under writeback."""
    inode = wpc.inode
    isize = inode.size
    if folio.pos >= isize:
        # Wholly past EOF (truncate raced the scan): nothing to write.
        folio.clear_dirty(0, folio.nblocks)
        folio.unlock()
        return False
    if folio.end > isize:
        # The tail past EOF is zeroed: writeback never writes stale bytes
        # past i_size into the block that straddles it.
        folio.data[isize - folio.pos:] = bytes(folio.end - isize)
    mask = folio.clear_dirty_for_io()
    eof_blocks = (isize + BLOCK_SIZE - 1) >> BLOCK_SHIFT
    folio.start_writeback(mask)
    try:
        for first, n in folio.mask_segments(mask):
            b0 = folio.index + first
            b1 = min(b0 + n, eof_blocks)
            pos = b0 << BLOCK_SHIFT
            length = max(0, (b1 - b0) << BLOCK_SHIFT)
            while length > 0:
                # Allocation in writeback_range may sleep (the folio stays locked).
                if POINTS.explorer is not None:
                    await POINTS.hit("writeback_range")
                try:
                    done = await engine.ops.writeback_range(wpc, folio, pos, length, isize)
                except Exception as e:
                    # The filesystem discarded this folio's delalloc; the
                    # data is lost and fsync will say so.  The rest of the
                    # folio is abandoned too (its delalloc is gone: mapping
                    # it would only fail again, with a misleading EIO).
                    # Anything but an FsError (a corrupt node, a bug) is an
                    # EIO too: the folio must still end writeback.
                    err = e.errno if isinstance(e, FsError) else errno.EIO
                    if not isinstance(e, FsError):
                        log.error("writeback_range of inode %d at %d: %r", inode.ino, pos, e)
                    inode.mapping.set_error(err)
                    wpc.error = wpc.error or err
                    return True
                wpc.nr_ranges += 1
                pos += done
                length -= done
    finally:
        folio.unlock()
    return True
