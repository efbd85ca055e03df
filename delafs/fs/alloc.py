"""Free-space allocation and space accounting.

The filesystem layer owns one :class:`Allocator` for its data area. It plays
the part of XFS's free-space btrees plus the superblock counters: it knows
which blocks are free, hands out contiguous runs near a goal, and keeps the
books that make delayed allocation safe.

Definitions (all counts are in filesystem blocks):

free
    Blocks in a free extent: physically unused and reusable right now.
busy
    Blocks freed by a transaction that is not yet written home. A crash
    (or a damaged log record) could still roll the free back, and the old
    owner's metadata would then point at them again, so they must be
    neither reused nor discarded until that transaction is checkpointed
    (XFS's "busy extents", kept here past the commit). They are still
    counted as used.
reserved
    Blocks promised to delalloc data that has no physical location yet: the
    data blocks plus the worst-case metadata (extent records, tree splits)
    their later allocation may need. Writeback allocates against this
    promise and so never meets ENOSPC.
metadata reserve
    A global pool held back from everyone (XFS's reserve pool, ``m_resblks``)
    so that operations which only *free* space, such as unlink splitting a
    tree node, and the top-up of a delalloc extent's metadata reservation
    after a split, cannot fail with ENOSPC. Taking from it is always
    explicit.
available
    ``free - reserved - metadata_reserve``: what ``statfs`` reports and what
    new reservations and plain allocations come from.

The books balance after every call, including failed ones (a failed call
changes nothing)::

    total == free + used                      (used includes busy)
    total == available + used + reserved + metadata_reserve

Locking: every method is synchronous and never awaits, so under trio each call
is atomic. The filesystem's allocator lock (last in the lock order of
DESIGN.md) is only needed to make a *sequence* of calls atomic across an
await.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sortedcontainers import SortedDict, SortedList

from ..lib.errors import enospc


class Allocator:
    """Free-space indices and the space counters of one allocation area.

    The area is the block range ``[first, first + total)``; block numbers are
    absolute device block numbers. Blocks of the area outside every free and
    busy extent are used.

    Attributes (all private, read through properties):

    ``_by_start``
        SortedDict ``start -> length`` of free extents, like XFS's bnobt:
        finds the extent containing a goal block and the neighbours to merge
        with. Extents never overlap and are never adjacent (always merged).
    ``_by_size``
        SortedList of ``(length, start)`` over the same extents, like XFS's
        cntbt: finds the best fit in O(log n). Always agrees with
        ``_by_start``.
    ``_busy``
        SortedDict ``start -> (length, seq)`` of busy extents; ``seq`` is the
        transaction that freed them. Disjoint from the free extents.
    ``_busy_by_seq``
        SortedDict ``seq -> [start, ...]``, so :meth:`release_busy` finds
        what became durable without scanning every busy extent.
    ``_free``, ``_used``, ``_busy_blocks``, ``_reserved``, ``_metadata_reserve``
        The counters described in the module docstring.
    """

    def __init__(
        self,
        total: int,
        free_extents: Iterable[tuple[int, int]],
        *,
        metadata_reserve: int = 0,
        first: int = 0,
    ):
        """Build the indices from ``(start, length)`` runs.

        The runs may come in any order and may touch (a bitmap scan yields
        them that way); touching runs are merged. Overlapping runs, empty
        runs and runs outside the area are a caller bug (ValueError).
        ``metadata_reserve`` is filled from the free space as far as it goes:
        mounting a full filesystem must not fail, it just starts with a
        smaller pool (:meth:`refill_metadata_reserve` tops it up later).
        """
        if total < 0:
            raise ValueError(f"negative total {total}")
        if metadata_reserve < 0:
            raise ValueError(f"negative metadata reserve {metadata_reserve}")
        self._first = first
        self._total = total
        self._by_start: SortedDict = SortedDict()
        self._by_size: SortedList = SortedList()
        self._busy: SortedDict = SortedDict()
        self._busy_by_seq: SortedDict = SortedDict()
        self._free = 0
        self._busy_blocks = 0
        self._reserved = 0
        self._metadata_reserve = 0
        self._metadata_reserve_target = 0

        prev_end = None
        for start, length in sorted(free_extents):
            self._check_bounds(start, length)
            if prev_end is not None and start < prev_end:
                raise ValueError(f"free extent ({start}, {length}) overlaps block {prev_end - 1}")
            self._add_free(start, length)
            prev_end = start + length
        self._used = total - self._free
        self.refill_metadata_reserve(metadata_reserve)

    # -- counters ----------------------------------------------------------

    @property
    def first(self) -> int:
        return self._first

    @property
    def total(self) -> int:
        return self._total

    @property
    def free_blocks(self) -> int:
        return self._free

    @property
    def used(self) -> int:
        return self._used

    @property
    def reserved(self) -> int:
        return self._reserved

    @property
    def metadata_reserve(self) -> int:
        return self._metadata_reserve

    @property
    def busy(self) -> int:
        return self._busy_blocks

    @property
    def available(self) -> int:
        return self._free - self._reserved - self._metadata_reserve

    # -- reservations ------------------------------------------------------

    def reserve(self, nblocks: int, *, from_metadata_reserve: bool = False) -> None:
        """Reserve ``nblocks`` for delalloc (data and worst-case metadata).

        With ``from_metadata_reserve`` the reservation may dip into the
        metadata reserve pool when available space is short: that is how the
        filesystem tops up a delalloc extent's metadata reservation after a
        split, which must not fail (XFS passes ``rsvd`` for the same reason).
        Available space is used first, so the pool only shrinks when it must.
        """
        if nblocks < 0:
            raise ValueError(f"negative reservation {nblocks}")
        avail = self.available
        if nblocks <= avail:
            self._reserved += nblocks
            return
        if not from_metadata_reserve or nblocks > avail + self._metadata_reserve:
            raise enospc(f"cannot reserve {nblocks} blocks, {avail} available")
        self._metadata_reserve -= nblocks - avail
        self._reserved += nblocks

    def unreserve(self, nblocks: int) -> None:
        """Give back part of the delalloc reservations (to available)."""
        if nblocks < 0:
            raise ValueError(f"negative unreservation {nblocks}")
        if nblocks > self._reserved:
            raise ValueError(f"unreserving {nblocks} blocks but only {self._reserved} reserved")
        self._reserved -= nblocks
        self._replenish()

    def refill_metadata_reserve(self, target: int) -> int:
        """Move up to ``target - metadata_reserve`` blocks from available
        into the pool; return how many moved. Never shrinks the pool.
        ``target`` becomes the level the pool is kept at from now on."""
        self._metadata_reserve_target = max(self._metadata_reserve_target, target)
        moved = max(0, min(target - self._metadata_reserve, self.available))
        self._metadata_reserve += moved
        return moved

    # -- allocation --------------------------------------------------------

    def allocate(
        self,
        count: int,
        goal: int | None = None,
        *,
        minlen: int = 1,
        source: str = "available",
    ) -> tuple[int, int]:
        """Allocate one contiguous run of ``minlen..count`` blocks.

        Returns ``(start, length)``. Placement, in order:

        1. ``goal`` inside a free extent: start exactly at ``goal`` (extending
           a file in place keeps it contiguous), taking as much of that
           extent as allowed, if that is at least ``minlen``;
        2. the smallest free extent that holds the whole request (best fit
           keeps large extents whole for large requests); among equals the
           one starting closest to ``goal`` (lowest start without a goal);
           the run starts at the extent's start;
        3. otherwise the largest free extent, partially, if it holds
           ``minlen`` (same tie rule);
        4. otherwise ENOSPC.

        ``source`` names the budget that pays:

        ``"available"``
            unreserved space; the request is capped at ``available`` (it must
            not eat other writers' reservations), ENOSPC if that is below
            ``minlen``.
        ``"reserved"``
            the caller holds a delalloc reservation covering ``count``
            (ValueError if ``count > reserved``: that is an accounting bug,
            not a full disk); ``reserved`` drops by the length allocated and
            the caller keeps the rest of its reservation.
        ``"metadata_reserve"``
            the pool; capped at the pool size, ENOSPC below ``minlen``.
        """
        if count < 1 or minlen < 1 or minlen > count:
            raise ValueError(f"bad allocation request count={count} minlen={minlen}")
        if source == "available":
            count = min(count, self.available)
        elif source == "metadata_reserve":
            count = min(count, self._metadata_reserve)
        elif source == "reserved":
            if count > self._reserved:
                raise ValueError(f"allocating {count} reserved blocks but only {self._reserved} reserved")
        else:
            raise ValueError(f"unknown allocation source {source!r}")
        if count < minlen:
            raise enospc(f"no {minlen} blocks left in {source} space")
        start, length = self._find(count, goal, minlen)
        self._take(start, length)
        if source == "reserved":
            self._reserved -= length
        elif source == "metadata_reserve":
            self._metadata_reserve -= length
        return start, length

    def mark_used(self, start: int, length: int) -> None:
        """Take a specific run out of free space (log replay, fixed metadata).

        Charged like an allocation from available space but without capping:
        the run is known to be in use already. The run must be entirely free
        (ValueError otherwise), and it must fit in available space
        (ValueError otherwise): marking known allocations happens before any
        reservation exists, so a shortfall is a caller bug.
        """
        self._check_bounds(start, length)
        idx = self._by_start.bisect_right(start) - 1
        if idx < 0:
            raise ValueError(f"run ({start}, {length}) is not free")
        fstart, flen = self._by_start.peekitem(idx)
        if fstart + flen < start + length:
            raise ValueError(f"run ({start}, {length}) is not free")
        if length > self.available:
            raise ValueError(f"marking {length} blocks used but only {self.available} available")
        self._take(start, length)

    def free(self, start: int, length: int, seq: int) -> None:
        """Free a run on behalf of transaction ``seq``; it stays busy (and
        used) until :meth:`release_busy` says ``seq`` is durable.

        Freeing blocks outside the area, or already free or busy, is a bug
        (a double free would hand one block to two owners): ValueError.
        """
        self._check_bounds(start, length)
        end = start + length
        if self._overlaps_free(start, end):
            raise ValueError(f"freeing ({start}, {length}): already free")
        if self._overlaps_busy(start, end):
            raise ValueError(f"freeing ({start}, {length}): already freed, still busy")
        self._busy[start] = (length, seq)
        starts = self._busy_by_seq.get(seq)
        if starts is None:
            self._busy_by_seq[seq] = [start]
        else:
            starts.append(start)
        self._busy_blocks += length

    def release_busy(self, durable_seq: int) -> list[tuple[int, int]]:
        """Transactions up to ``durable_seq`` are on disk: make their busy
        extents free. Returns the released runs, sorted and with touching
        runs merged, so the caller can discard them from the device."""
        released = []
        for seq in list(self._busy_by_seq.irange(maximum=durable_seq)):
            for start in self._busy_by_seq.pop(seq):
                length, _ = self._busy.pop(start)
                released.append((start, length))
        released.sort()
        runs: list[tuple[int, int]] = []
        for start, length in released:
            self._busy_blocks -= length
            self._used -= length
            self._add_free(start, length)
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1] = (runs[-1][0], runs[-1][1] + length)
            else:
                runs.append((start, length))
        self._replenish()
        return runs

    def _replenish(self) -> None:
        """Space coming back refills a drawn pool before it becomes
        available (xfs_add_freecounter refills m_resblks first); without
        this, each draw on the pool would show up as extra free space once
        the blocks it paid for are freed."""
        short = self._metadata_reserve_target - self._metadata_reserve
        if short > 0:
            self._metadata_reserve += max(0, min(short, self.available))

    # -- queries -----------------------------------------------------------

    def is_free(self, blk: int) -> bool:
        idx = self._by_start.bisect_right(blk) - 1
        if idx < 0:
            return False
        start, length = self._by_start.peekitem(idx)
        return blk < start + length

    def is_busy(self, blk: int) -> bool:
        idx = self._busy.bisect_right(blk) - 1
        if idx < 0:
            return False
        start, (length, _) = self._busy.peekitem(idx)
        return blk < start + length

    def free_extents(self) -> Iterator[tuple[int, int]]:
        """Free (not busy) extents in start order."""
        return iter(self._by_start.items())

    def statistics(self) -> dict:
        return {
            "total": self._total,
            "free": self._free,
            "available": self.available,
            "used": self._used,
            "reserved": self._reserved,
            "metadata_reserve": self._metadata_reserve,
            "busy": self._busy_blocks,
            "free_extents": len(self._by_start),
            "largest_free": self._by_size[-1][0] if self._by_size else 0,
        }

    def check(self) -> None:
        """Verify every invariant; raise AssertionError saying which broke."""

        def fail(msg: str) -> None:
            raise AssertionError(f"allocator: {msg}")

        area_end = self._first + self._total
        by_size = {(length, start) for start, length in self._by_start.items()}
        if len(by_size) != len(self._by_size) or by_size != set(self._by_size):
            fail("by-start and by-size indices disagree")
        free = 0
        prev_end = None
        for start, length in self._by_start.items():
            if length < 1:
                fail(f"free extent ({start}, {length}) is empty")
            if start < self._first or start + length > area_end:
                fail(f"free extent ({start}, {length}) outside the area")
            if prev_end is not None and start < prev_end:
                fail(f"free extent ({start}, {length}) overlaps its predecessor")
            if prev_end == start:
                fail(f"free extent ({start}, {length}) not merged with its predecessor")
            prev_end = start + length
            free += length
        if free != self._free:
            fail(f"free counter {self._free} != sum of free extents {free}")

        busy = 0
        prev_end = None
        for start, (length, seq) in self._busy.items():
            if length < 1 or start < self._first or start + length > area_end:
                fail(f"busy extent ({start}, {length}) empty or outside the area")
            if prev_end is not None and start < prev_end:
                fail(f"busy extent ({start}, {length}) overlaps its predecessor")
            if self._overlaps_free(start, start + length):
                fail(f"busy extent ({start}, {length}) overlaps free space")
            if start not in self._busy_by_seq.get(seq, ()):
                fail(f"busy extent ({start}, {length}) missing from its seq {seq}")
            prev_end = start + length
            busy += length
        if sum(len(starts) for starts in self._busy_by_seq.values()) != len(self._busy):
            fail("busy-by-seq index disagrees with the busy extents")
        if busy != self._busy_blocks:
            fail(f"busy counter {self._busy_blocks} != sum of busy extents {busy}")

        if self._total != self._free + self._used:
            fail(f"total {self._total} != free {self._free} + used {self._used}")
        if self._used < self._busy_blocks:
            fail(f"used {self._used} < busy {self._busy_blocks}")
        if self._reserved < 0 or self._metadata_reserve < 0:
            fail(f"negative reserved {self._reserved} or metadata reserve {self._metadata_reserve}")
        if self.available < 0:
            fail(f"available is negative: {self.available}")

    # -- internals ---------------------------------------------------------

    def _check_bounds(self, start: int, length: int) -> None:
        if length < 1:
            raise ValueError(f"empty or negative run ({start}, {length})")
        if start < self._first or start + length > self._first + self._total:
            raise ValueError(
                f"run ({start}, {length}) outside the area [{self._first}, {self._first + self._total})"
            )

    def _overlaps_free(self, start: int, end: int) -> bool:
        # Runs are disjoint and sorted, so only the last one starting
        # before `end` can reach into [start, end).
        idx = self._by_start.bisect_left(end) - 1
        if idx < 0:
            return False
        fstart, flen = self._by_start.peekitem(idx)
        return fstart + flen > start

    def _overlaps_busy(self, start: int, end: int) -> bool:
        idx = self._busy.bisect_left(end) - 1
        if idx < 0:
            return False
        bstart, (blen, _) = self._busy.peekitem(idx)
        return bstart + blen > start

    def _find(self, count: int, goal: int | None, minlen: int) -> tuple[int, int]:
        """Choose where to allocate (the policy of :meth:`allocate`)."""
        if goal is not None:
            idx = self._by_start.bisect_right(goal) - 1
            if idx >= 0:
                start, length = self._by_start.peekitem(idx)
                n = min(count, start + length - goal)
                if n >= minlen:
                    return goal, n
        by_size = self._by_size
        idx = by_size.bisect_left((count,))
        if idx < len(by_size):
            return self._closest(by_size[idx][0], goal), count
        if by_size and by_size[-1][0] >= minlen:
            length = by_size[-1][0]
            return self._closest(length, goal), length
        raise enospc(f"no free extent of {minlen} blocks")

    def _closest(self, length: int, goal: int | None) -> int:
        """Start of the free extent of exactly ``length`` blocks that starts
        closest to ``goal`` (the lowest start without a goal, or on a tie)."""
        by_size = self._by_size
        if goal is None:
            return by_size[by_size.bisect_left((length,))][1]
        idx = by_size.bisect_left((length, goal))
        best = None
        for i in (idx - 1, idx):
            if 0 <= i < len(by_size) and by_size[i][0] == length:
                start = by_size[i][1]
                if best is None or abs(start - goal) < abs(best - goal):
                    best = start
        return best

    def _take(self, start: int, length: int) -> None:
        """Remove ``[start, start+length)``, which lies inside one free
        extent, from the free indices and count it as used."""
        idx = self._by_start.bisect_right(start) - 1
        fstart, flen = self._by_start.popitem(idx)
        self._by_size.remove((flen, fstart))
        if fstart < start:
            self._by_start[fstart] = start - fstart
            self._by_size.add((start - fstart, fstart))
        end, fend = start + length, fstart + flen
        if end < fend:
            self._by_start[end] = fend - end
            self._by_size.add((fend - end, end))
        self._free -= length
        self._used += length

    def _add_free(self, start: int, length: int) -> None:
        """Insert a run into the free indices, merging with free neighbours."""
        by_start, by_size = self._by_start, self._by_size
        self._free += length
        idx = by_start.bisect_left(start) - 1
        if idx >= 0:
            lstart, llen = by_start.peekitem(idx)
            if lstart + llen == start:
                del by_start[lstart]
                by_size.remove((llen, lstart))
                start, length = lstart, length + llen
        end = start + length
        rlen = by_start.pop(end, None)
        if rlen is not None:
            by_size.remove((rlen, end))
            length += rlen
        by_start[start] = length
        by_size.add((length, start))
