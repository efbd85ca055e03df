"""The packed store under the extent map: ordered-map behaviour through leaf
splits and joins, and what a record costs."""

import random
import tracemalloc

import pytest

from delafs.fs.extent_map import Extent, ExtentMap, ExtState
from delafs.fs.iext_tree import LEAF_MAX, IextTree


def _model_floor(model: dict, key: int):
    keys = [k for k in model if k <= key]
    return (max(keys),) + model[max(keys)] if keys else None


def test_random_puts_and_pops_match_a_dict_through_splits_and_joins():
    rng = random.Random(7)
    tree, model = IextTree(), {}
    for step in range(12 * LEAF_MAX):
        key = rng.randrange(0, 8 * LEAF_MAX)
        if model and rng.random() < 0.4:
            key = rng.choice(list(model))
            tree.pop(key)
            del model[key]
        else:
            val = (rng.randrange(1, 1 << 40), rng.choice((1, 2, 3)), rng.choice((None, rng.randrange(1 << 50))),
                   rng.randrange(100))
            tree.put(key, *val)
            model[key] = val
        if step % 97 == 0:
            tree.check()
            probe = rng.randrange(-1, 8 * LEAF_MAX + 1)
            assert tree.floor(probe) == _model_floor(model, probe)
    tree.check()
    assert len(tree) == len(model)
    assert list(tree) == [(k,) + model[k] for k in sorted(model)]
    lo, hi = 2 * LEAF_MAX, 5 * LEAF_MAX
    assert tree.range(lo, hi) == [(k,) + model[k] for k in sorted(model) if lo <= k < hi]
    assert tree.range(lo, hi, limit=3) == [(k,) + model[k] for k in sorted(model) if lo <= k < hi][:3]
    # Empty it completely: every leaf goes, and the tree is usable again.
    for key in list(model):
        tree.pop(key)
    tree.check()
    assert len(tree) == 0 and tree.floor(10**9) is None and tree.floor_and_next(0) == (None, None)
    tree.put(5, 1, 3, 9, 0)
    assert tree.floor_and_next(4) == (None, 5)


def test_pop_of_a_missing_key_raises():
    tree = IextTree()
    with pytest.raises(KeyError):
        tree.pop(3)
    tree.put(4, 1, 1, None, 0)
    with pytest.raises(KeyError):
        tree.pop(3)


def test_next_key_crosses_leaves():
    tree = IextTree()
    for k in range(0, 4 * LEAF_MAX, 2):
        tree.put(k, 1, 3, k, 0)
    for k in range(1, 4 * LEAF_MAX - 2, 2):
        rec, nxt = tree.floor_and_next(k)
        assert rec[0] == k - 1 and nxt == k + 1


def test_an_extent_costs_tens_of_bytes_not_hundreds():
    # A file of a million extents must fit beside the page cache (issue 11:
    # RSS <= cache + 150 MiB); a SortedDict of Extent objects took ~260 B each.
    n = 20_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        m = ExtentMap()
        for i in range(n):
            m.set(Extent(2 * i, 1, ExtState.WRITTEN, pblock=10**9 + 3 * i))
        per_extent = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert len(m) == n
    assert per_extent < 48, f"{per_extent:.0f} bytes per extent"


def test_a_written_extent_does_not_pay_for_a_delalloc_reservation():
    """Only delalloc extents carry an indlen, and at most the dirty data's
    worth exist at once; a column of them cost every one of a million
    written extents 8 bytes.  Random inserts, as the sparse job makes."""
    n = 20_000
    order = list(range(n))
    random.Random(3).shuffle(order)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        m = ExtentMap()
        for i in order:
            m.set(Extent(2 * i, 1, ExtState.WRITTEN, pblock=10**9 + 3 * i))
        per_extent = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert per_extent < 32, f"{per_extent:.0f} bytes per extent"     # 38 with the column
    tree = IextTree()
    tree.put(8, 4, 2, None, 3)                 # delalloc: its indlen is kept
    tree.put(20, 1, 3, 99, 0)
    assert tree.get(8) == (8, 4, 2, None, 3) and tree.get(20) == (20, 1, 3, 99, 0)
    tree.put(8, 4, 3, 50, 0)                   # converted in place: the indlen goes
    assert tree.get(8) == (8, 4, 3, 50, 0)
    tree.put(9, 2, 2, None, 5)
    tree.pop(9)
    tree.check()
    assert tree.get(9) is None and not tree._indlen
