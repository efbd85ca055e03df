"""The per-inode in-memory extent map: file block -> state (and device block).

This is the incore extent tree of XFS (the "iext" tree) reduced to what the
iomap engine needs: ``iomap_begin`` looks a file range up here, buffered
writes add DELALLOC extents, writeback turns them into UNWRITTEN ones with
real blocks, I/O completion turns those WRITTEN, and punch/truncate remove
them. It is on the hot path of every write, so lookups are O(log n) bisects
(in C) and nothing is copied that a caller does not receive; the extents
themselves are packed records in :mod:`delafs.fs.iext_tree`, so a file of a
million extents costs tens of MiB, not hundreds.

Ranges are half-open ``[fblock, fblock + length)`` in filesystem blocks, as
everywhere in delafs: adjacent ranges then share a boundary value and a
split needs no +1/-1 arithmetic.

Definitions:

HOLE
    No block and no reservation; reads return zeroes. Never stored: the
    absence of an extent is the hole, so the map stays small for sparse files.
DELALLOC
    Delayed allocation: data sits dirty in the page cache, space is reserved
    but no device block is chosen yet. ``indlen`` is the worst-case metadata
    (extent records, tree splits) reserved with it, as XFS keeps the
    "indirect length" in the startblock field of a delalloc extent.
UNWRITTEN
    Device blocks are allocated but their contents are not known to be on
    the device; reads return zeroes, so stale data is never exposed.
WRITTEN
    Device blocks hold the file's data.
validity cookie
    :attr:`ExtentMap.cookie` changes on every change of the map. The iomap
    engine samples it in ``iomap_begin`` and compares it under the folio
    lock: a different value means the mapping it holds may be stale (for
    instance writeback converted or a punch removed the range meanwhile),
    as XFS's sequence counter in ``iomap_valid``.

Splitting the metadata reservation (indlen): when a DELALLOC extent is cut
into pieces (by :meth:`ExtentMap.set` over part of it, by
:meth:`ExtentMap.remove`, or when a lookup returns part of it), its ``indlen``
is divided among the pieces in proportion to their lengths, rounding down,
and the last piece gets the remainder. The total is preserved exactly, so
pieces handed back to the caller carry precisely the reservation they held
and the caller can unreserve it. Merging adds indlens. A piece may end up
with less metadata reservation than its worst case now needs (XFS has the
same problem when it splits an indirect-block reservation); the filesystem
tops it up or trims it afterwards, the map only keeps the books.
"""

from __future__ import annotations

import enum
from collections.abc import Container, Iterator
from dataclasses import dataclass

from .iext_tree import IextTree, Record

#: End of the file block space: a hole with nothing after it runs up to here.
MAX_FBLOCK = 2**63


class ExtState(enum.IntEnum):
    HOLE = 0
    DELALLOC = 1
    UNWRITTEN = 2
    WRITTEN = 3


_DELALLOC = ExtState.DELALLOC
_HOLE = ExtState.HOLE


@dataclass(slots=True)
class Extent:
    """A run of file blocks in one state.

    ``pblock`` is the device block of ``fblock`` for UNWRITTEN and WRITTEN
    extents and None otherwise; ``indlen`` is the metadata reservation of a
    DELALLOC extent and 0 otherwise.
    """

    fblock: int
    length: int
    state: ExtState
    pblock: int | None = None
    indlen: int = 0

    @property
    def end(self) -> int:
        return self.fblock + self.length


def _mergeable(left: Extent, right: Extent) -> bool:
    """Whether ``right``, which starts where ``left`` ends, may join it:
    delalloc has no placement to disagree on; mapped extents must continue
    on the device too."""
    if left.state != right.state:
        return False
    return left.state == _DELALLOC or left.pblock + left.length == right.pblock


def _piece(ext: Extent, start: int, end: int) -> Extent:
    """A new Extent for ``[start, end)`` of ``ext`` (inside it), with the
    pblock and the indlen share that piece gets when ``ext`` is cut there."""
    offset = start - ext.fblock
    pblock = None if ext.pblock is None else ext.pblock + offset
    return Extent(start, end - start, ext.state, pblock, _indlen_shares(ext, start, end)[1])


def _indlen_shares(ext: Extent, start: int, end: int) -> tuple[int, int, int]:
    """Split ``ext.indlen`` over the pieces ``[fblock, start)``,
    ``[start, end)`` and ``[end, ext.end)``: proportional, rounded down,
    remainder to the last non-empty piece (an empty piece gets 0)."""
    total = ext.indlen
    if not total:
        return 0, 0, 0
    length = ext.length
    left = total * (start - ext.fblock) // length
    if end == ext.end:
        return left, total - left, 0
    mid = total * (end - start) // length
    return left, mid, total - left - mid


class ExtentMap:
    """The extent map of one inode.

    Attributes (guarded by the inode's extent-map lock, below the folio lock
    in the order of DESIGN.md; every method is synchronous, so a call is
    atomic under trio):

    ``cookie``
        The validity cookie: incremented by every :meth:`set` or
        :meth:`remove` that changed the map, and only by those.
    ``_tree``
        IextTree ``fblock -> record``. Stored extents never overlap, are
        never empty, are never HOLE, and no two touching extents are
        mergeable (see :func:`_mergeable`), so each map content has exactly
        one representation. Callers get new Extent objects, never the store.
    ``_counts``
        Blocks per state, indexed by ExtState, kept current so that
        :meth:`count_state` is O(1).
    """

    __slots__ = ("cookie", "_tree", "_counts")

    def __init__(self) -> None:
        self.cookie = 0
        self._tree = IextTree()
        self._counts = [0, 0, 0, 0]

    def __len__(self) -> int:
        return len(self._tree)

    def count_state(self, state: ExtState) -> int:
        if state == _HOLE:
            raise ValueError("holes are not stored; their extent is unbounded")
        return self._counts[state]

    # -- lookups -----------------------------------------------------------

    def lookup(self, fblock: int, limit: int | None = None) -> Extent:
        """The mapping at ``fblock``, as a new Extent starting there.

        If a stored extent contains ``fblock``, its part from ``fblock`` on;
        else a HOLE up to the next stored extent, or up to ``MAX_FBLOCK``
        when none follows. With ``limit`` the result is also cut to at most
        ``limit`` blocks, mapped or not (iomap_begin asks for a bounded
        range).
        """
        if limit is not None and limit < 1:
            raise ValueError(f"lookup limit {limit} < 1")
        rec, nxt = self._tree.floor_and_next(fblock)
        if rec is not None:
            end = rec[0] + rec[1]
            if end > fblock:
                if limit is not None and fblock + limit < end:
                    end = fblock + limit
                return _piece(_extent(rec), fblock, end)
        end = MAX_FBLOCK if nxt is None else nxt
        if limit is not None and fblock + limit < end:
            end = fblock + limit
        return Extent(fblock, end - fblock, _HOLE)

    def extent_at(self, fblock: int) -> Extent | None:
        """A copy of the whole stored extent containing ``fblock``, or None."""
        rec = self._tree.floor(fblock)
        if rec is not None and rec[0] + rec[1] > fblock:
            return _extent(rec)
        return None

    def set_indlen(self, fblock: int, indlen: int) -> None:
        """Replace the indlen of the DELALLOC extent starting at ``fblock``
        (the filesystem trims it after a merge).  The mapping itself is
        unchanged, so the cookie is too."""
        rec = self._tree.get(fblock)
        if rec is None:
            raise KeyError(fblock)
        if rec[2] != _DELALLOC or indlen < 0:
            raise ValueError(f"cannot set indlen {indlen} on {_extent(rec)}")
        self._tree.put(fblock, rec[1], rec[2], None, indlen)

    def lookup_range(self, fblock: int, count: int) -> list[Extent]:
        """New Extents covering exactly ``[fblock, fblock + count)`` in
        order, HOLE pieces included."""
        if count < 0:
            raise ValueError(f"negative count {count}")
        out = []
        pos, end = fblock, fblock + count
        for ext in self.iter_extents(fblock, end):
            if ext.fblock > pos:
                out.append(Extent(pos, ext.fblock - pos, _HOLE))
            out.append(ext)
            pos = ext.fblock + ext.length
        if pos < end:
            out.append(Extent(pos, end - pos, _HOLE))
        return out

    def iter_extents(self, fblock: int = 0, end: int | None = None,
                     limit: int | None = None) -> Iterator[Extent]:
        """New Extents for the stored extents overlapping ``[fblock, end)``
        (``end`` None: to the end of the file space), clipped to it; with
        ``limit``, only the first ``limit`` of them (and only as many
        records looked at).

        Do not change the map while iterating.
        """
        if end is None:
            end = MAX_FBLOCK
        if end <= fblock:
            return
        for ext in self._overlapping(fblock, end, limit):
            e_end = ext.fblock + ext.length
            if ext.fblock >= fblock and e_end <= end:
                yield ext
            else:
                yield _piece(ext, max(ext.fblock, fblock), min(e_end, end))

    # -- changes -----------------------------------------------------------

    def set(self, ext: Extent) -> list[Extent]:
        """Map ``[ext.fblock, ext.end)`` as ``ext`` says, replacing whatever
        was there, and merge with mergeable neighbours. Setting a HOLE is
        :meth:`remove` of the range.

        Returns the replaced pieces (stored extents clipped to the range, in
        order, each with its indlen share) so the caller can settle their
        reservations, e.g. writeback converting DELALLOC to UNWRITTEN
        releases the ``indlen`` the allocation did not use. ``ext`` itself is
        copied, never stored.
        """
        fblock, length, state = ext.fblock, ext.length, ext.state
        if length < 1 or fblock < 0 or fblock + length > MAX_FBLOCK:
            raise ValueError(f"bad extent range ({fblock}, {length})")
        if state == _HOLE:
            return self.remove(fblock, length)
        if (ext.pblock is None) != (state == _DELALLOC):
            raise ValueError(f"{state.name} extent with pblock {ext.pblock}")
        if ext.indlen < 0 or (ext.indlen and state != _DELALLOC):
            raise ValueError(f"{state.name} extent with indlen {ext.indlen}")
        new = Extent(fblock, length, ExtState(state), ext.pblock, ext.indlen)
        replaced = self._cut_out(fblock, fblock + length, None)
        # A replacement by an identical extent leaves the same map behind
        # (the representation is canonical and the indlen total unchanged),
        # so the cached mappings of iomap stay valid.
        if len(replaced) != 1 or replaced[0] != new:
            self.cookie += 1
        self._insert(new)
        return replaced

    def remove(
        self, fblock: int, count: int, states: Container[ExtState] | None = None
    ) -> list[Extent]:
        """Remove the parts of ``[fblock, fblock + count)`` whose state is in
        ``states`` (None: all), splitting extents at the range edges.

        Returns the removed pieces, in order, each with its indlen share.
        """
        if count < 0:
            raise ValueError(f"negative count {count}")
        if not count:
            return []
        removed = self._cut_out(fblock, fblock + count, states)
        if removed:
            self.cookie += 1
        return removed

    # -- verification ------------------------------------------------------

    def check(self) -> None:
        """Verify every invariant; raise AssertionError saying which broke."""

        def fail(msg: str) -> None:
            raise AssertionError(f"extent map: {msg}")

        self._tree.check()
        counts = [0, 0, 0, 0]
        prev = None
        for rec in self._tree:
            if rec[2] not in _STORED:
                fail(f"record {rec} has a state that is never stored")
            ext = _extent(rec)
            if ext.length < 1:
                fail(f"{ext} is empty")
            if (ext.pblock is None) != (ext.state == _DELALLOC):
                fail(f"{ext} pblock presence does not match its state")
            if ext.indlen and ext.state != _DELALLOC:
                fail(f"{ext} has a bad indlen")
            if prev is not None:
                if prev.end > ext.fblock:
                    fail(f"{prev} overlaps {ext}")
                if prev.end == ext.fblock and _mergeable(prev, ext):
                    fail(f"{prev} and {ext} are not merged")
            counts[ext.state] += ext.length
            prev = ext
        if counts != self._counts:
            fail(f"state counters {self._counts} != recount {counts}")

    # -- internals ---------------------------------------------------------

    def _overlapping(self, start: int, end: int, limit: int | None = None) -> list[Extent]:
        """The stored extents overlapping ``[start, end)``, whole, in order
        (the first ``limit`` of them)."""
        tree = self._tree
        out = []
        rec = tree.floor(start - 1)
        if rec is not None and rec[0] + rec[1] > start:
            out.append(_extent(rec))
        if limit is not None:
            limit = max(0, limit - len(out))
        out.extend(map(_extent, tree.range(start, end, limit)))
        return out

    def _store(self, ext: Extent) -> None:
        self._tree.put(ext.fblock, ext.length, ext.state, ext.pblock, ext.indlen)

    def _cut_out(self, start: int, end: int, states: Container[ExtState] | None) -> list[Extent]:
        """Remove ``[start, end)`` of the extents whose state is in
        ``states`` and return the removed pieces. Removal never makes two
        stored extents touch that did not touch before, so no merge follows.
        """
        tree = self._tree
        counts = self._counts
        removed = []
        for ext in self._overlapping(start, end):
            if states is not None and ext.state not in states:
                continue
            key = ext.fblock
            ext_end = key + ext.length
            cut_start = key if key > start else start
            cut_end = ext_end if ext_end < end else end
            counts[ext.state] -= cut_end - cut_start
            if cut_start == key and cut_end == ext_end:
                tree.pop(key)
                removed.append(ext)
                continue
            left, mid, right = _indlen_shares(ext, cut_start, cut_end)
            pblock = ext.pblock
            if cut_end < ext_end:
                tree.put(cut_end, ext_end - cut_end, ext.state,
                         None if pblock is None else pblock + cut_end - key, right)
            removed.append(
                Extent(
                    cut_start,
                    cut_end - cut_start,
                    ext.state,
                    None if pblock is None else pblock + cut_start - key,
                    mid,
                )
            )
            if cut_start > key:
                tree.put(key, cut_start - key, ext.state, pblock, left)
            else:
                tree.pop(key)
        return removed

    def _insert(self, new: Extent) -> None:
        """Store ``new`` over a range known to be empty, merging it with the
        extents touching its edges when they are mergeable."""
        tree = self._tree
        self._counts[new.state] += new.length
        rec = tree.floor(new.fblock - 1)
        if rec is not None and rec[0] + rec[1] == new.fblock:
            left = _extent(rec)
            if _mergeable(left, new):
                left.length += new.length
                left.indlen += new.indlen
                new = left
        rec = tree.get(new.fblock + new.length)
        if rec is not None:
            right = _extent(rec)
            if _mergeable(new, right):
                tree.pop(right.fblock)
                new.length += right.length
                new.indlen += right.indlen
        self._store(new)


_STATES = tuple(ExtState)
_STORED = frozenset((ExtState.DELALLOC, ExtState.UNWRITTEN, ExtState.WRITTEN))


def _extent(rec: Record) -> Extent:
    """A new Extent for a record of the tree."""
    return Extent(rec[0], rec[1], _STATES[rec[2]], rec[3], rec[4])
