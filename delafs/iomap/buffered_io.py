"""The iomap buffered I/O engine (fs/iomap/buffered-io.c in spirit).

Entry points and the locks their callers hold:

  iomap_file_buffered_write  i_rwsem exclusive; takes invalidate_lock exclusive to
                             zero the old EOF block's tail before a write past it
  iomap_page_mkwrite         nothing; takes invalidate_lock shared + folio lock
  buffered_read              i_rwsem shared; takes invalidate_lock shared
  iomap_truncate             i_rwsem exclusive; takes invalidate_lock exclusive
  iomap_zero_range           i_rwsem exclusive, invalidate_lock exclusive
  iomap_seek_data / _hole    i_rwsem shared
  punch_delalloc             i_rwsem; takes invalidate_lock exclusive

The write iteration.  ``iomap_begin`` maps [pos, pos+len): over a hole the
filesystem reserves DELALLOC and flags the mapping NEW.  For each folio:
fault the source in (before any folio lock: it may sleep), lock the folio,
check the mapping is still valid (validity cookie), read in partial blocks
that are not uptodate, copy (atomically: no await while the folio is locked
for the copy), mark blocks uptodate and dirty, move i_size.  A short copy
or a stale mapping ends the iteration early; the unused tail of a NEW
delalloc mapping is then punched with the dirty-folio scan of
:meth:`Engine.punch_delalloc`, and the iterator maps the rest.  The write
returns short only when an iteration makes no progress because the source
cannot be faulted in.

The punch (seed 000).  Under invalidate_lock exclusive, the cached data of
[start, min(EOF, end)) is found with seek_data/seek_hole; DELALLOC under
dirty *blocks* is kept (it is what writeback will allocate from), every
other part of the range is punched, and everything past EOF is always
punched.  The ``legacy`` mode instead truncates the page cache over the
range and punches all of it, which destroys dirty data a racing page fault
put there: kept so tests and ``delafs race`` can show the loss.
"""

from __future__ import annotations

import errno
import logging

from ..lib import locks as _locks
from ..lib.errors import DelafsError, FsError
from ..lib.errortag import ErrorTags
from ..lib.trace import TRACE
from ..lib.units import BLOCK_SHIFT, BLOCK_SIZE, round_down, round_up
from .iter import IomapIter
from .types import (
    IOMAP_F_NEW,
    IOMAP_FAULT,
    IOMAP_REPORT,
    IOMAP_WRITE,
    IOMAP_ZERO,
    POINTS,
    Iomap,
    IomapType,
    VInode,
)
from .writeback import writepages

DEFAULT_FOLIO_BLOCKS = 16        # 64 KiB folios for ordinary writes
LARGE_FOLIO_BLOCKS = 256         # 1 MiB folios for large aligned writes
READAHEAD_MAX_BLOCKS = 256

log = logging.getLogger("delafs")




def folio_hint(nbytes: int, pos: int) -> int:
    """Folio size (in blocks) for an access of ``nbytes`` at ``pos``: large
    aligned writes get large folios, everything else at most 64 KiB."""
    nblocks = max(1, (nbytes + BLOCK_SIZE - 1) >> BLOCK_SHIFT)
    cap = LARGE_FOLIO_BLOCKS if nblocks >= LARGE_FOLIO_BLOCKS else DEFAULT_FOLIO_BLOCKS
    hint = 1
    while hint * 2 <= min(nblocks, cap):
        hint *= 2
    return hint


class IovIter:
    """The source of a write (iov_iter): bytes plus the two ways a real
    user buffer can fail, driven by errortags.

    ``fault_in(n)`` is fault_in_iov_iter_readable: how many bytes can be
    read without faulting (0 when ``copy_fault`` fires).  ``copy_to`` is the
    atomic copy into a locked folio; ``short_copy`` makes it stop early, as
    a copy_from_user hitting an unmapped page does.
    """

    __slots__ = ("data", "off", "tags")

    def __init__(self, data, tags: ErrorTags | None = None):
        self.data = memoryview(data).cast("B")
        self.off = 0
        self.tags = tags

    def __len__(self) -> int:
        return len(self.data) - self.off

    def fault_in(self, n: int) -> int:
        if self.tags is not None and self.tags.fires("copy_fault"):
            return 0
        return min(n, len(self))

    def copy_to(self, buf: bytearray, off: int, n: int) -> int:
        if self.tags is not None and n > 1 and self.tags.fires("short_copy"):
            n = self.tags.rng.randrange(n)
        buf[off:off + n] = self.data[self.off:self.off + n]
        self.off += n
        return n

    def revert(self, n: int) -> None:
        self.off -= n


class Engine:
    """One filesystem's instance of the engine.

    Attributes:
      cache       the PageCache (layer 3)
      ops         the filesystem's IomapOps/WritebackOps (delafs.fs.FsIomapOps)
      errortags   shared fault-injection table
      punch_mode  "scan" (seed 000) or "legacy" (truncate, then punch all)
      stats       counters for ``delafs stat``
    """

    def __init__(self, cache, ops, errortags: ErrorTags, *, punch_mode: str = "scan"):
        if punch_mode not in ("scan", "legacy"):
            raise ValueError(f"punch mode must be scan or legacy, not {punch_mode!r}")
        self.cache = cache
        self.ops = ops
        self.errortags = errortags
        self.punch_mode = punch_mode
        self.stats = {"writes": 0, "bytes_written": 0, "iomap_iters": 0, "short_copies": 0,
                      "stale_mappings": 0, "short_writes": 0, "punches": 0,
                      "punch_ranges": 0, "page_mkwrites": 0, "reads": 0, "read_folios": 0,
                      "readahead_folios": 0}
        self._ra: dict[int, int] = {}     # ino -> byte offset where the last read ended

    # ==================================================================
    # Buffered write
    # ==================================================================

    async def iomap_file_buffered_write(self, inode: VInode, pos: int, src: IovIter) -> int:
        """Write ``src`` at ``pos`` through the page cache; return bytes written."""
        if _locks.DEBUG_LOCKS:
            inode.i_rwsem.assert_held("exclusive")
        self.stats["writes"] += 1
        total = len(src)
        written = 0
        old = inode.size
        if total and pos > old and old & (BLOCK_SIZE - 1):
            # xfs_file_write_zero_eof: the bytes past EOF in its block read
            # as zeros once the file grows over them, whatever a store
            # through a mapping left there (the kernel lets one land past
            # EOF inside the EOF page; writeback never writes it).
            async with inode.mapping.invalidate_lock.exclusive():
                await self.iomap_zero_range(inode, old, min(pos, round_up(old)) - old)
        gap = round_down(pos) - round_up(inode.size)
        if total and gap > 0:
            # A write past EOF leaves a gap the new EOF will cover: the
            # speculative preallocation there stops being post-EOF, and
            # nothing would ever write it back or trim it.  No block past
            # the old EOF is dirty, so all delalloc in the gap goes (XFS
            # zeroes the gap through the cache instead, xfs_file_write_zero_eof).
            await self.ops.punch(inode, round_up(inode.size), gap)
        it = IomapIter(self.ops, inode, pos, total, IOMAP_WRITE, yield_point="iomap_begin")
        while True:
            try:
                if not await it.next():
                    break
            except FsError:
                if written:
                    break
                raise
            iomap, pos, mapped = it.iomap, it.pos, it.length
            self.stats["iomap_iters"] += 1
            if TRACE.on:
                TRACE.emit("iomap_iter", ino=inode.ino, pos=pos, length=mapped,
                           type=iomap.type.name, new=bool(iomap.flags & IOMAP_F_NEW))
            processed, why = await self._write_iter(inode, iomap, pos, mapped, src)
            if processed < mapped and iomap.type == IomapType.DELALLOC and iomap.flags & IOMAP_F_NEW:
                # iomap_last_written_block: with nothing written the block
                # holding pos is unused too (a NEW mapping starts at a hole,
                # so no one else's data is there); otherwise the block the
                # copy ended in holds data and stays.
                start = round_up(pos + processed) if processed else round_down(pos)
                await self.punch_delalloc(inode, start, round_up(pos + mapped))
            it.processed = processed
            written += processed
            if why == "fault":
                self.stats["short_writes"] += 1
                it.stop = True
            elif why in ("stale", "short"):
                # Map again: the mapping changed, or a short copy (which may
                # have copied nothing) ended this iteration early.
                it.stale = True
        self.stats["bytes_written"] += written
        if not written and total:
            raise FsError(errno.EFAULT, "the source buffer could not be faulted in")
        return written

    async def _write_iter(self, inode: VInode, iomap: Iomap, pos: int, length: int,
                          src: IovIter) -> tuple[int, str | None]:
        """Copy into folios over one mapping.  Returns (bytes processed, why
        it stopped early: "short", "stale", "fault" or None)."""
        mapping = inode.mapping
        processed = 0
        while processed < length:
            folio_bytes = length - processed
            await self.cache.balance_dirty_pages(mapping)
            # Faulting the source in may sleep (a page fault on the user buffer).
            if POINTS.explorer is not None:
                await POINTS.hit("fault_in")
            if src.fault_in(min(folio_bytes, BLOCK_SIZE)) == 0:
                return processed, "fault"
            if self.errortags.active:
                await self.errortags.delay("delay_write_begin")
            if POINTS.explorer is not None:
                await POINTS.hit("write_begin")
            folio = await self.write_begin(inode, iomap, pos, folio_bytes)
            if folio is None:
                self.stats["stale_mappings"] += 1
                return processed, "stale"
            off = pos - folio.pos
            n = min(folio_bytes, folio.end - pos)
            copied = src.copy_to(folio.data, off, n)
            copied = self.write_end(inode, folio, pos, n, copied, src)
            folio.unlock()
            processed += copied
            pos += copied
            if copied < n:
                self.stats["short_copies"] += 1
                return processed, "short"
        return processed, None

    async def write_begin(self, inode: VInode, iomap: Iomap, pos: int, length: int):
        """Get the folio for ``pos`` locked and ready for a copy of up to
        ``length`` bytes, or None if the mapping went stale meanwhile."""
        mapping = inode.mapping
        folio = await mapping.get_folio(pos >> BLOCK_SHIFT, create=True,
                                        nblocks_hint=folio_hint(length, pos))
        if POINTS.explorer is not None:
            await POINTS.hit("write_begin_locked")
        if not self.ops.iomap_valid(inode, iomap):
            folio.unlock()
            return None
        end = min(pos + length, folio.end)
        # Partial blocks must hold their old bytes before the copy lands.
        try:
            for b in {pos >> BLOCK_SHIFT, (end - 1) >> BLOCK_SHIFT}:
                bstart = b << BLOCK_SHIFT
                fully = pos <= bstart and end >= bstart + BLOCK_SIZE
                i = b - folio.index
                if fully or folio.is_uptodate(i, 1):
                    continue
                await self._fill_block(inode, iomap, folio, b)
        except BaseException:
            folio.unlock()
            raise
        if TRACE.on:
            TRACE.emit("iomap_write_begin", ino=inode.ino, pos=pos, length=end - pos)
        return folio

    async def _fill_block(self, inode: VInode, iomap: Iomap, folio, b: int) -> None:
        """Make one block uptodate from its mapping (disk or zeros)."""
        i = b - folio.index
        off = i << BLOCK_SHIFT
        bstart = b << BLOCK_SHIFT
        if (iomap.type == IomapType.MAPPED and not iomap.flags & IOMAP_F_NEW
                and iomap.offset <= bstart < iomap.end and bstart < inode.size):
            await self.ops.read_blocks(iomap.addr + bstart - iomap.offset,
                                       [memoryview(folio.data)[off:off + BLOCK_SIZE]])
        else:
            folio.data[off:off + BLOCK_SIZE] = bytes(BLOCK_SIZE)
        folio.set_uptodate(i, 1)

    def write_end(self, inode: VInode, folio, pos: int, length: int, copied: int,
                  src: IovIter) -> int:
        """Account a copy of ``copied`` of ``length`` bytes (folio locked).

        A block the copy only partly reached that was not uptodate before
        holds garbage past the copy: back the copy up to that block's start
        (the retry will read it in), as __iomap_write_end refuses a short
        copy into a folio that is not uptodate."""
        end = pos + copied
        if copied < length and end & (BLOCK_SIZE - 1):
            b = end >> BLOCK_SHIFT
            if not folio.is_uptodate(b - folio.index, 1) and end > (b << BLOCK_SHIFT):
                keep = max(pos, b << BLOCK_SHIFT)
                src.revert(end - keep)
                end = keep
                copied = end - pos
        if copied == 0:
            return 0
        first = pos >> BLOCK_SHIFT
        last = (end - 1) >> BLOCK_SHIFT
        folio.set_uptodate(first - folio.index, last - first + 1)
        folio.mark_dirty(first - folio.index, last - first + 1)
        if end > inode.size:
            inode.size = end
        if TRACE.on:
            TRACE.emit("iomap_write_end", ino=inode.ino, pos=pos, copied=copied)
        return copied

    # ==================================================================
    # The delalloc punch (seed 000)
    # ==================================================================

    async def punch_delalloc(self, inode: VInode, start: int, end: int) -> None:
        """Release the stale delalloc of [start, end) after a short write."""
        if start >= end:
            return
        self.stats["punches"] += 1
        mapping = inode.mapping
        async with mapping.invalidate_lock.exclusive():
            if self.errortags.active:
                await self.errortags.delay("delay_punch")
            if POINTS.explorer is not None:
                await POINTS.hit("punch_locked")
            if self.punch_mode == "legacy":
                await mapping.truncate_range(start, end)
                await self._punch(inode, start, end)
                return
            await self.delalloc_release(inode, start, end)

    async def _punch(self, inode: VInode, start: int, end: int) -> None:
        self.stats["punch_ranges"] += 1
        if TRACE.on:
            TRACE.emit("iomap_delalloc_punch", ino=inode.ino, pos=start, length=end - start)
        # The filesystem's punch takes its inode lock (it may sleep).
        if POINTS.explorer is not None:
            await POINTS.hit("delalloc_punch")
        await self.ops.punch(inode, start, end - start)

    async def delalloc_release(self, inode: VInode, start: int, end: int) -> None:
        """iomap_write_delalloc_release: keep delalloc under dirty blocks,
        punch the rest.  invalidate_lock held exclusive by the caller.

        Intervals are half-open [start, end) throughout: seek_data gives the
        start of a data range and seek_hole its end, so no +1/-1 appears.
        The cache scan stops at EOF: cached data beyond it (a fault that
        straddled EOF) must not keep delalloc alive, because writeback never
        writes past EOF and would never convert it."""
        if _locks.DEBUG_LOCKS:
            inode.mapping.invalidate_lock.assert_held("exclusive")
        await self.delalloc_release_range(inode, start, min(round_up(inode.size), end), end)

    async def delalloc_release_range(self, inode: VInode, start: int, scan_end: int,
                                     end: int) -> None:
        """The body of delalloc_release: scan the cached data ranges of
        [start, scan_end) (SEEK_DATA to SEEK_HOLE), keeping delalloc under
        dirty blocks, and punch everything else up to ``end``."""
        mapping = inode.mapping
        punch_start = start
        pos = start
        while pos < scan_end:
            pos = mapping.seek_data(pos, scan_end)
            if pos >= scan_end:
                break
            data_end = mapping.seek_hole(pos, scan_end)
            punch_start = await self.delalloc_scan(inode, punch_start, pos, data_end)
            pos = data_end
        if punch_start < end:
            await self._punch(inode, punch_start, end)

    async def delalloc_scan(self, inode: VInode, punch_start: int, start: int, end: int) -> int:
        """iomap_write_delalloc_scan: walk the folios of the cached range
        [start, end), punch up to each dirty block run and skip past it.
        Returns the new punch start."""
        mapping = inode.mapping
        while start < end:
            folio = mapping.lookup(start >> BLOCK_SHIFT)
            if folio is None:
                start = round_down(start) + BLOCK_SIZE
                continue
            await folio.lock()
            try:
                if folio.mapping is not mapping or not folio.contains(start >> BLOCK_SHIFT):
                    continue
                if POINTS.explorer is not None:
                    await POINTS.hit("delalloc_scan_folio")
                lo = max(start, folio.pos)
                hi = min(end, folio.end)
                for first, n in self.dirty_runs(folio):
                    d0 = max(lo, (folio.index + first) << BLOCK_SHIFT)
                    d1 = min(hi, (folio.index + first + n) << BLOCK_SHIFT)
                    if d0 >= d1:
                        continue
                    if d0 > punch_start:
                        # A failed punch (shutdown, cancellation) must not
                        # leave the folio locked: hence the finally.
                        await self._punch(inode, punch_start, d0)
                    punch_start = d1
                start = folio.end
            finally:
                folio.unlock()
        return punch_start

    @staticmethod
    def dirty_runs(folio) -> list[tuple[int, int]]:
        """The runs of a folio the punch must keep (iomap_write_delalloc_ifs_punch):
        block granularity, since inside a dirty large folio clean blocks
        hold stale delalloc too and are punched."""
        return folio.dirty_segments()

    # ==================================================================
    # Page faults
    # ==================================================================

    async def iomap_page_mkwrite(self, inode: VInode, block: int):
        """A write fault on the folio holding ``block``: reserve its holes
        (all or nothing), mark it dirty.  Returns the folio *locked*, as the
        kernel returns VM_FAULT_LOCKED; the caller stores and unlocks.
        Never punches: a failed fault has reserved nothing (seed 001)."""
        mapping = inode.mapping
        self.stats["page_mkwrites"] += 1
        async with mapping.invalidate_lock.shared():
            if self.errortags.active:
                await self.errortags.delay("delay_fault")
            folio = await mapping.get_folio(block, create=False)
            if folio is None or folio.pos >= inode.size:
                if folio is not None:
                    folio.unlock()
                raise FsError(errno.EFAULT, "page fault beyond EOF or on an uncached page (SIGBUS)")
            if POINTS.explorer is not None:
                await POINTS.hit("page_mkwrite_locked")
            end = min(folio.end, round_up(inode.size))
            pos = folio.pos
            try:
                it = IomapIter(self.ops, inode, pos, end - pos, IOMAP_WRITE | IOMAP_FAULT)
                while await it.next():
                    it.processed = it.length        # reserved all of it, or raised
                nblocks = (end - folio.pos) >> BLOCK_SHIFT
                if not folio.is_uptodate(0, nblocks):
                    await self.read_folio(inode, folio)
                folio.mark_dirty(0, nblocks)
            except BaseException:
                try:
                    await self.page_mkwrite_error(inode, folio, end)
                finally:
                    folio.unlock()
                raise
            if TRACE.on:
                TRACE.emit("iomap_page_mkwrite", ino=inode.ino, pos=folio.pos, length=end - folio.pos)
            return folio

    async def page_mkwrite_error(self, inode: VInode, folio, end: int) -> None:
        """The error path of a write fault (iomap_page_mkwrite's).  It has
        nothing to clean up: its reservation was
        all or nothing, and punching here would remove delalloc that other
        writers' dirty data in the folio still needs (seed 001)."""

    # ==================================================================
    # Reads
    # ==================================================================

    async def read_folio(self, inode: VInode, folio) -> None:
        """Make every block of a locked folio uptodate (iomap_read_folio).

        The blocks below EOF that are not uptodate are mapped with one
        IomapIter over the span from the first to the last of them (as
        iomap_adjust_read_range trims the range); inside each mapping only
        those blocks are filled (cached data wins), one device read per run.
        Blocks past EOF read as zeros without a mapping."""
        self.stats["read_folios"] += 1
        nb = folio.nblocks
        below = max(0, min(nb, ((inode.size + BLOCK_SIZE - 1) >> BLOCK_SHIFT) - folio.index))
        missing = ~folio.uptodate_mask & ((1 << nb) - 1)
        todo = missing & ((1 << below) - 1)
        if todo:
            first, last = (todo & -todo).bit_length() - 1, todo.bit_length()
            it = IomapIter(self.ops, inode, (folio.index + first) << BLOCK_SHIFT,
                           (last - first) << BLOCK_SHIFT, 0)
            while await it.next():
                await self._read_folio_iter(folio, it.iomap, it.pos, it.length)
                it.processed = it.length
        tail = missing >> below << below
        if tail:
            t = (tail & -tail).bit_length() - 1
            folio.data[t << BLOCK_SHIFT:] = bytes((nb - t) << BLOCK_SHIFT)
            folio.set_uptodate(t, nb - t)
        if TRACE.on:
            TRACE.emit("iomap_read_folio", ino=inode.ino, pos=folio.pos, length=folio.end - folio.pos)

    async def read_cache_folio(self, inode: VInode, block: int, nblocks_hint: int = 1):
        """The folio holding ``block``, uptodate and unlocked (read_cache_folio).

        A read that fails still unlocks the folio, as the kernel's read_folio
        completion always does: the folio stays !uptodate for the next reader
        to try again, and nobody waits for a lock no one will release."""
        folio = await inode.mapping.get_folio(block, create=True, nblocks_hint=nblocks_hint)
        try:
            if not folio.is_uptodate(0, folio.nblocks):
                await self.read_folio(inode, folio)
        finally:
            folio.unlock()
        return folio

    async def _read_folio_iter(self, folio, iomap: Iomap, pos: int, length: int) -> None:
        """iomap_readpage_iter: fill the blocks of [pos, pos+length) that are
        not uptodate from one mapping, a device read per run of them."""
        b = pos >> BLOCK_SHIFT
        i = b - folio.index
        n = length >> BLOCK_SHIFT
        j = 0
        while j < n:
            if folio.is_uptodate(i + j, 1):
                j += 1
                continue
            k = j + 1
            while k < n and not folio.is_uptodate(i + k, 1):
                k += 1
            off = (i + j) << BLOCK_SHIFT
            size = (k - j) << BLOCK_SHIFT
            if iomap.type == IomapType.MAPPED:
                await self.ops.read_blocks(iomap.addr + ((b + j) << BLOCK_SHIFT) - iomap.offset,
                                           [memoryview(folio.data)[off:off + size]])
            else:
                folio.data[off:off + size] = bytes(size)
            folio.set_uptodate(i + j, k - j)
            j = k

    async def buffered_read(self, inode: VInode, pos: int, size: int) -> bytes:
        """Read through the page cache (filemap_read).  The folios missing
        from the request, and from the readahead window after it when the
        reads are sequential, are read in batches first (_readahead); the
        copy then takes every byte from uptodate folios, reading any folio
        that still is not (a partial one, or one whose readahead failed)."""
        self.stats["reads"] += 1
        end = min(pos + size, inode.size)
        if pos >= end:
            return b""
        mapping = inode.mapping
        parts = []
        async with mapping.invalidate_lock.shared():
            first = pos >> BLOCK_SHIFT
            last = (end + BLOCK_SIZE - 1) >> BLOCK_SHIFT
            ahead = 0
            if self._ra.get(inode.ino) == pos:
                # Sequential: keep a window of up to four requests cached
                # ahead, topped up a whole window at a time once half of it
                # has been consumed (the kernel's PG_readahead marker), so
                # the device sees large reads, not one small read per request.
                window = min(READAHEAD_MAX_BLOCKS, max(16, 4 * (last - first)))
                cached = self._cached_run(mapping, last, window)
                if cached < window // 2:
                    if cached:
                        await self._readahead(inode, last + cached, window)
                    else:
                        ahead = window
            await self._readahead(inode, first, last - first + ahead)
            cur = pos
            while cur < end:
                b = cur >> BLOCK_SHIFT
                folio = mapping.lookup(b)
                # Every block the copy below takes from this folio must be
                # uptodate, not only the first (filemap_range_uptodate): a
                # short copy leaves blocks of a large folio holding garbage.
                if folio is None or not folio.is_uptodate(
                        b - folio.index, ((min(end, folio.end) - 1) >> BLOCK_SHIFT) - b + 1):
                    folio = await self.read_cache_folio(inode, b, folio_hint(end - cur, cur))
                stop = min(end, folio.end)
                # A copy now: the folio may change once this task waits.
                parts.append(bytes(memoryview(folio.data)[cur - folio.pos:stop - folio.pos]))
                self.cache.mark_accessed(folio)
                cur = stop
        self._ra[inode.ino] = end
        # i_size may have shrunk while we copied: never return bytes past it.
        keep = max(0, min(end, inode.size) - pos)
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        return out if len(out) == keep else out[:keep]

    @staticmethod
    def _cached_run(mapping, block: int, limit: int) -> int:
        """How many blocks from ``block`` on (at most ``limit``) are cached."""
        n = 0
        while n < limit:
            folio = mapping.lookup(block + n)
            if folio is None:
                break
            n = folio.index + folio.nblocks - block
        return min(n, limit)

    async def _readahead(self, inode: VInode, first: int, nblocks: int) -> None:
        """page_cache_ra_unbounded: add the folios missing from [first,
        first+nblocks) (clipped to EOF), locked, and read each run of them
        as one batch (iomap_readahead).  Errors are not reported here: the
        folios stay !uptodate and the read that needs them retries and
        reports (as the kernel's readahead never fails a read itself)."""
        mapping = inode.mapping
        b = first
        stop = min(first + nblocks, (inode.size + BLOCK_SIZE - 1) >> BLOCK_SHIFT)
        batch = []
        while b < stop:
            folio = mapping.lookup(b)
            if folio is None:
                # New, so locked without a wait; nothing awaited since the lookup.
                folio = mapping.add_folio(b, folio_hint((stop - b) << BLOCK_SHIFT, b << BLOCK_SHIFT))
                batch.append(folio)
                self.stats["readahead_folios"] += 1
            elif batch:
                await self._read_batch(inode, batch)
                batch = []
            b = folio.index + folio.nblocks
        if batch:
            await self._read_batch(inode, batch)

    async def _read_batch(self, inode: VInode, folios: list) -> None:
        """iomap_readahead over new locked folios of consecutive blocks: one
        IomapIter over their span, one device read per mapping straight into
        the folios.  Unlocks them all, uptodate only if it all worked."""
        start, end = folios[0].pos, folios[-1].end
        try:
            eof = min(end, round_up(inode.size))
            if eof > start:
                it = IomapIter(self.ops, inode, start, eof - start, 0)
                while await it.next():
                    lo, hi = it.pos, it.pos + it.length
                    views = [memoryview(f.data)[max(lo, f.pos) - f.pos:min(hi, f.end) - f.pos]
                             for f in folios if f.pos < hi and f.end > lo]
                    if it.iomap.type == IomapType.MAPPED:
                        await self.ops.read_blocks(it.iomap.addr + lo - it.iomap.offset, views)
                    else:
                        for v in views:
                            v[:] = bytes(len(v))
                    it.processed = it.length
            for f in folios:
                if f.end > eof:
                    f.data[max(0, eof - f.pos):] = bytes(f.end - max(eof, f.pos))
                f.set_uptodate(0, f.nblocks)
        except DelafsError as e:
            log.debug("readahead of inode %d [%d, %d): %s", inode.ino, start, end, e)
        finally:
            for f in folios:
                f.unlock()
        if TRACE.on:
            TRACE.emit("iomap_readahead", ino=inode.ino, pos=start, length=end - start)

    # ==================================================================
    # Zeroing and truncate
    # ==================================================================

    async def iomap_zero_range(self, inode: VInode, pos: int, length: int) -> None:
        """Zero [pos, pos+length) of cached or written data (holes and
        unwritten extents already read as zeros and are left alone)."""
        it = IomapIter(self.ops, inode, pos, length, IOMAP_ZERO)
        while await it.next():
            start, stop = it.pos, it.pos + it.length
            if it.iomap.type in (IomapType.HOLE, IomapType.UNWRITTEN):
                # Nothing on disk to hide; only cached bytes need zeroing,
                # unless writeback holds older bytes for it (then remap).
                done = await self._zero_cached(inode, start, stop)
                it.processed = done - start
                it.stale = done < stop
            else:
                # Returns early if the mapping went stale: map again here,
                # it may have become a hole (writeback discarded it).
                done = await self._zero_through_cache(inode, it.iomap, start, stop)
                it.processed = done - start
                it.stale = done < stop
        pos = it.pos
        if TRACE.on:
            TRACE.emit("iomap_zero_range", ino=inode.ino, pos=pos, length=length)

    async def _zero_cached(self, inode: VInode, pos: int, end: int) -> int:
        """Zero the cached bytes of [pos, end), a HOLE or UNWRITTEN mapping.
        Returns where it stopped: before ``end`` at a folio under writeback,
        which it waited for.  That folio's ioend carries the bytes it had
        when it was queued, and its completion turns the block WRITTEN:
        zeroing only the cache would leave those bytes on disk under a clean
        folio.  The caller maps again (the kernel's iomap_zero_range flushes
        such a range before it maps it)."""
        mapping = inode.mapping
        for folio in mapping.iter_folios(pos >> BLOCK_SHIFT, (end + BLOCK_SIZE - 1) >> BLOCK_SHIFT):
            await folio.lock()
            if folio.mapping is mapping:
                if folio.writeback:
                    folio.unlock()
                    await folio.wait_writeback()
                    return max(pos, folio.pos)
                a, b = max(pos, folio.pos), min(end, folio.end)
                folio.data[a - folio.pos:b - folio.pos] = bytes(b - a)
            folio.unlock()
        return end

    async def _zero_through_cache(self, inode: VInode, iomap: Iomap, pos: int, end: int) -> int:
        """Zero and dirty [pos, end) of a DELALLOC or MAPPED mapping through
        the cache; returns where it stopped (before ``end`` if the mapping
        went stale: the caller maps again, and must not dirty blocks the new
        mapping says are a hole)."""
        mapping = inode.mapping
        while pos < end:
            folio = await self.write_begin(inode, iomap, pos, end - pos)
            if folio is None:       # stale: let the caller remap
                return pos
            stop = min(end, folio.end)
            folio.data[pos - folio.pos:stop - folio.pos] = bytes(stop - pos)
            first = pos >> BLOCK_SHIFT
            last = (stop - 1) >> BLOCK_SHIFT
            folio.set_uptodate(first - folio.index, last - first + 1)
            folio.mark_dirty(first - folio.index, last - first + 1)
            folio.unlock()
            pos = stop
        del mapping
        return pos

    async def iomap_truncate(self, inode: VInode, size: int, fs_truncate) -> None:
        """Change i_size.  Shrinking zeroes the tail of the new last block
        and writes it back, drops the cache beyond it and lets the filesystem
        free the blocks (``fs_truncate(size, zero_eof)``: delalloc punched,
        extents freed through the journal; ``zero_eof`` asks it to zero the
        EOF block's tail on disk itself, only when that writeback failed).
        Growing zeroes the old partial last block so the bytes past the old
        EOF read as zeros."""
        if _locks.DEBUG_LOCKS:
            inode.i_rwsem.assert_held("exclusive")
        mapping = inode.mapping
        old = inode.size
        async with mapping.invalidate_lock.exclusive():
            if POINTS.explorer is not None:
                await POINTS.hit("truncate_locked")
            # An ioend in flight over the EOF block carries the bytes it had
            # when it was queued: zeroing the cached tail now would be
            # undone at its completion, and an UNWRITTEN block it holds is
            # skipped by the zeroing.  Wait for it first, as
            # truncate_pagecache and XFS's setattr do.
            await mapping.wait_writeback_range(min(size, old) >> BLOCK_SHIFT)
            if size < old:
                zero_eof = False
                if size & (BLOCK_SIZE - 1):
                    await self.iomap_zero_range(inode, size, round_up(size) - size)
                inode.size = size
                await mapping.truncate_range(round_up(size), max(round_up(old), round_up(size)) + (1 << 40))
                if size & (BLOCK_SIZE - 1):
                    zero_eof = not await self._write_eof_block(inode, size)
                await fs_truncate(size, zero_eof)
            elif size > old:
                if old & (BLOCK_SIZE - 1):
                    await self.iomap_zero_range(inode, old, round_up(old) - old)
                inode.size = size
                # Speculative preallocation the new EOF now covers is no
                # longer post-EOF: nothing would ever write it back or trim
                # it, so it would hold its reservation forever.  Nothing past
                # the old EOF is dirty: every delalloc block there goes.
                if round_up(size) > round_up(old):
                    await self.ops.punch(inode, round_up(old), round_up(size) - round_up(old))
                await fs_truncate(size, False)
        if TRACE.on:
            TRACE.emit("iomap_truncate", ino=inode.ino, old=old, new=size)

    async def _write_eof_block(self, inode: VInode, size: int) -> bool:
        """Write the zeroed EOF block back through the cache and wait for
        it, before the filesystem logs the smaller size: after a crash the
        bytes past the new EOF must be zeros on disk (XFS's setattr writes
        and waits for the block it zeroed).  Through the cache, never beside
        it: a background pass that mapped the extent earlier may be about to
        write this folio, and two writers of one block land in any order.
        False if the writeback failed (the error is the mapping's, for fsync)."""
        before = inode.mapping.wb_err.sample()
        await writepages(self, inode, sync=True, start=round_down(size), end=size)
        await inode.mapping.wait_writeback_range(size >> BLOCK_SHIFT, (size >> BLOCK_SHIFT) + 1)
        return inode.mapping.wb_err.sample() == before

    # ==================================================================
    # SEEK_DATA / SEEK_HOLE over page cache + extent map
    # ==================================================================

    async def iomap_seek(self, inode: VInode, pos: int, whence_data: bool) -> int:
        """lseek SEEK_DATA (whence_data) or SEEK_HOLE: unwritten and
        delalloc extents count as data only where the page cache holds
        uptodate blocks (iomap_seek_data's page-cache lookup)."""
        size = inode.size
        if pos >= size:
            raise FsError(errno.ENXIO, "offset beyond EOF")
        mapping = inode.mapping
        found = None
        it = IomapIter(self.ops, inode, pos, size - pos, IOMAP_REPORT)
        while await it.next():
            cur, stop = it.pos, it.pos + it.length
            it.processed = it.length
            if it.iomap.type == IomapType.MAPPED:
                if whence_data:
                    found = cur
            elif it.iomap.type == IomapType.HOLE:
                if not whence_data:
                    found = cur
            else:
                d = mapping.seek_data(cur, stop)
                if whence_data and d < stop:
                    found = d
                if not whence_data:
                    h = mapping.seek_hole(cur, stop)
                    if h < stop:
                        found = h
            it.stop = found is not None
        if found is not None:
            return found
        if whence_data:
            raise FsError(errno.ENXIO, "no data after offset")
        return size
