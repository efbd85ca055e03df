"""The store under :class:`~delafs.fs.extent_map.ExtentMap`: a two-level
B+tree of packed extent records, as XFS's incore extent tree (the "iext
tree") keeps fixed-size records in small leaves instead of one object per
extent.

Why packed: a ``SortedDict`` of ``Extent`` objects cost about 260 bytes per
extent (a dict slot, a sorted-key slot, a 72-byte object and its integers),
so a file of one million extents held 250 MiB of map. Here a record is one
slot in each of four typed arrays of its leaf, 25 bytes, and a leaf of up to
``LEAF_MAX`` records adds a few hundred bytes.

A record is the tuple ``(fblock, length, state, pblock, indlen)``: ``state``
an int (the ExtState value), ``pblock`` None for delalloc. Only delalloc
extents have an ``indlen`` (the metadata reserved for their conversion),
and at most the dirty data's worth of them exist at a time, so nonzero
indlens live in a dict by fblock instead of a column every record pays
for. The tree knows nothing of states or merging; it is an ordered map
from ``fblock`` to the rest, and ExtentMap keeps its invariants on top of it.

Layout: ``_leaves[i]`` holds records in ``fblock`` order, ``_firsts[i]`` is
the first fblock of ``_leaves[i]``; no leaf is empty. A lookup bisects
``_firsts`` and then the leaf's fblock array, both in C.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterator

#: Records per leaf before it splits in two; 256 keeps an insert's memmove
#: short and the leaf overhead under 2 bytes per record.
LEAF_MAX = 256
#: A leaf shorter than this joins a neighbour (after punches emptied most of it).
LEAF_MIN = LEAF_MAX // 4

_FB, _LN, _PB, _ST = range(4)
_NO_PBLOCK = -1

Record = tuple[int, int, int, "int | None", int]


def _new_leaf() -> list[array]:
    # fblock, length, pblock (-1: none), state
    return [array("Q"), array("Q"), array("q"), array("B")]


class IextTree:
    """An ordered map ``fblock -> record`` in packed leaves. Synchronous;
    the caller (ExtentMap) holds the inode's extent-map lock."""

    __slots__ = ("_firsts", "_leaves", "_n", "_indlen")

    def __init__(self) -> None:
        self._firsts: list[int] = []
        self._leaves: list[list[array]] = []
        self._n = 0
        self._indlen: dict[int, int] = {}     # fblock -> indlen, where not 0

    def _record(self, leaf: list[array], i: int) -> Record:
        fb, pb = leaf[_FB][i], leaf[_PB][i]
        return (fb, leaf[_LN][i], leaf[_ST][i], None if pb == _NO_PBLOCK else pb,
                self._indlen.get(fb, 0))

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Record]:
        for leaf in self._leaves:
            for i in range(len(leaf[_FB])):
                yield self._record(leaf, i)

    # -- lookups -----------------------------------------------------------

    def _find(self, key: int) -> tuple[int, int]:
        """``(leaf, i)``: ``i`` is the position in that leaf of the first
        record after ``key``; the record at ``i - 1``, if any, is the last
        one at or before ``key``."""
        li = bisect_right(self._firsts, key) - 1
        if li < 0:
            return 0, 0
        return li, bisect_right(self._leaves[li][_FB], key)

    def floor(self, key: int) -> Record | None:
        """The record with the greatest fblock <= ``key``."""
        if not self._n:
            return None
        li, i = self._find(key)
        return self._record(self._leaves[li], i - 1) if i else None

    def floor_and_next(self, key: int) -> tuple[Record | None, int | None]:
        """:meth:`floor` and the first fblock after ``key`` (None if none),
        from one descent."""
        if not self._n:
            return None, None
        li, i = self._find(key)
        leaf = self._leaves[li]
        rec = self._record(leaf, i - 1) if i else None
        if i < len(leaf[_FB]):
            return rec, leaf[_FB][i]
        if li + 1 < len(self._leaves):
            return rec, self._firsts[li + 1]
        return rec, None

    def get(self, key: int) -> Record | None:
        rec = self.floor(key)
        return rec if rec is not None and rec[0] == key else None

    def range(self, start: int, end: int, limit: int | None = None) -> list[Record]:
        """The records with ``start <= fblock < end``, in order (the first
        ``limit`` of them)."""
        out: list[Record] = []
        if not self._n or end <= start or limit == 0:
            return out
        li, i = self._find(start - 1)
        leaves = self._leaves
        while li < len(leaves):
            leaf = leaves[li]
            fbs = leaf[_FB]
            for j in range(i, len(fbs)):
                if fbs[j] >= end:
                    return out
                out.append(self._record(leaf, j))
                if limit is not None and len(out) >= limit:
                    return out
            li, i = li + 1, 0
        return out

    # -- changes -----------------------------------------------------------

    def put(self, fblock: int, length: int, state: int, pblock: int | None, indlen: int) -> None:
        """Store the record, replacing the one at ``fblock`` if there is one."""
        pb = _NO_PBLOCK if pblock is None else pblock
        if indlen:
            self._indlen[fblock] = indlen
        else:
            self._indlen.pop(fblock, None)
        if not self._n:
            self._leaves = [_new_leaf()]
            self._firsts = [fblock]
            li, i = 0, 0
        else:
            li, i = self._find(fblock)
            leaf = self._leaves[li]
            if i and leaf[_FB][i - 1] == fblock:
                i -= 1
                leaf[_LN][i] = length
                leaf[_PB][i] = pb
                leaf[_ST][i] = state
                return
            if fblock < self._firsts[li]:        # only ever before the first leaf's first record
                self._firsts[li] = fblock
        leaf = self._leaves[li]
        for arr, v in zip(leaf, (fblock, length, pb, state)):
            arr.insert(i, v)
        self._n += 1
        if len(leaf[_FB]) > LEAF_MAX:
            self._split(li)

    def pop(self, fblock: int) -> None:
        """Remove the record at ``fblock``, which must exist."""
        li, i = self._find(fblock)
        if not i or self._leaves[li][_FB][i - 1] != fblock:
            raise KeyError(fblock)
        leaf = self._leaves[li]
        for arr in leaf:
            del arr[i - 1]
        self._indlen.pop(fblock, None)
        self._n -= 1
        n = len(leaf[_FB])
        if not n:
            del self._leaves[li]
            del self._firsts[li]
            return
        self._firsts[li] = leaf[_FB][0]
        if n < LEAF_MIN and len(self._leaves) > 1:
            self._join(li if li else 1)

    def _split(self, li: int) -> None:
        leaf = self._leaves[li]
        half = len(leaf[_FB]) // 2
        right = [arr[half:] for arr in leaf]
        for arr in leaf:
            del arr[half:]
        self._leaves.insert(li + 1, right)
        self._firsts.insert(li + 1, right[_FB][0])

    def _join(self, li: int) -> None:
        """Append leaf ``li`` to leaf ``li - 1`` (and split the result if it
        is now too long)."""
        left, right = self._leaves[li - 1], self._leaves[li]
        for a, b in zip(left, right):
            a.extend(b)
        del self._leaves[li]
        del self._firsts[li]
        if len(left[_FB]) > LEAF_MAX:
            self._split(li - 1)

    def check(self) -> None:
        """Verify the tree's own shape; raise AssertionError saying what broke."""
        n = 0
        prev = -1
        if len(self._firsts) != len(self._leaves):
            raise AssertionError("iext tree: leaf index and leaves differ in length")
        for first, leaf in zip(self._firsts, self._leaves):
            sizes = {len(arr) for arr in leaf}
            if len(sizes) != 1 or not leaf[_FB]:
                raise AssertionError(f"iext tree: leaf arrays of lengths {sizes}")
            if leaf[_FB][0] != first:
                raise AssertionError(f"iext tree: leaf indexed at {first} starts at {leaf[_FB][0]}")
            for fb in leaf[_FB]:
                if fb <= prev:
                    raise AssertionError(f"iext tree: key {fb} after {prev}")
                prev = fb
            n += len(leaf[_FB])
        if n != self._n:
            raise AssertionError(f"iext tree: counts {self._n} records, holds {n}")
        for fb, il in self._indlen.items():
            if not il or self.get(fb) is None:
                raise AssertionError(f"iext tree: indlen {il} kept for fblock {fb}")
