"""Tests of delafs.fs.extent_map: lookups, set/remove with splits and merges,
indlen conservation and the validity cookie."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from delafs.fs.extent_map import MAX_FBLOCK, Extent, ExtentMap, ExtState

H, D, U, W = ExtState.HOLE, ExtState.DELALLOC, ExtState.UNWRITTEN, ExtState.WRITTEN


def stored(m: ExtentMap) -> list[tuple]:
    return [(e.fblock, e.length, e.state, e.pblock, e.indlen) for e in m.iter_extents()]


# -- lookups -------------------------------------------------------------------


def test_empty_map_is_one_infinite_hole():
    m = ExtentMap()
    assert m.lookup(5) == Extent(5, MAX_FBLOCK - 5, H)
    assert m.lookup(5, limit=3) == Extent(5, 3, H)
    assert m.lookup_range(2, 4) == [Extent(2, 4, H)]
    assert m.lookup_range(2, 0) == []
    assert len(m) == 0
    m.check()


def test_lookup_clips_and_copies():
    m = ExtentMap()
    m.set(Extent(10, 10, W, pblock=100))
    got = m.lookup(13)
    assert got == Extent(13, 7, W, 103)
    got.length = 1  # a copy: the map is unaffected
    assert m.lookup(10) == Extent(10, 10, W, 100)
    assert m.lookup(13, limit=2) == Extent(13, 2, W, 103)
    assert m.lookup(13, limit=50) == Extent(13, 7, W, 103)
    assert m.lookup(4) == Extent(4, 6, H)
    assert m.lookup(4, limit=3) == Extent(4, 3, H)
    assert m.lookup(20) == Extent(20, MAX_FBLOCK - 20, H)
    with pytest.raises(ValueError):
        m.lookup(4, limit=0)


def test_lookup_range_includes_holes():
    m = ExtentMap()
    m.set(Extent(2, 2, D, indlen=2))
    m.set(Extent(6, 2, U, pblock=50))
    assert m.lookup_range(0, 10) == [
        Extent(0, 2, H),
        Extent(2, 2, D, indlen=2),
        Extent(4, 2, H),
        Extent(6, 2, U, 50),
        Extent(8, 2, H),
    ]
    assert m.lookup_range(3, 4) == [Extent(3, 1, D, indlen=1), Extent(4, 2, H), Extent(6, 1, U, 50)]


def test_iter_extents_clips_to_range():
    m = ExtentMap()
    m.set(Extent(0, 10, W, pblock=0))
    m.set(Extent(20, 10, W, pblock=50))
    assert list(m.iter_extents(5, 25)) == [Extent(5, 5, W, 5), Extent(20, 5, W, 50)]
    assert list(m.iter_extents(10, 20)) == []
    assert list(m.iter_extents(25)) == [Extent(25, 5, W, 55)]


# -- set -----------------------------------------------------------------------


def test_set_splits_the_extent_underneath():
    m = ExtentMap()
    m.set(Extent(0, 10, W, pblock=100))
    replaced = m.set(Extent(3, 4, U, pblock=500))
    assert replaced == [Extent(3, 4, W, 103)]
    assert stored(m) == [(0, 3, W, 100, 0), (3, 4, U, 500, 0), (7, 3, W, 107, 0)]
    assert m.count_state(W) == 6 and m.count_state(U) == 4
    m.check()


def test_set_replaces_several_extents():
    m = ExtentMap()
    m.set(Extent(0, 4, W, pblock=100))
    m.set(Extent(6, 2, U, pblock=300))
    m.set(Extent(10, 4, D, indlen=4))
    replaced = m.set(Extent(2, 10, W, pblock=700))
    assert replaced == [Extent(2, 2, W, 102), Extent(6, 2, U, 300), Extent(10, 2, D, indlen=2)]
    assert stored(m) == [(0, 2, W, 100, 0), (2, 10, W, 700, 0), (12, 2, D, None, 2)]
    m.check()


def test_delalloc_always_merges_and_sums_indlen():
    m = ExtentMap()
    m.set(Extent(0, 4, D, indlen=3))
    m.set(Extent(8, 4, D, indlen=2))
    m.set(Extent(4, 4, D, indlen=1))
    assert stored(m) == [(0, 12, D, None, 6)]
    assert len(m) == 1 and m.count_state(D) == 12
    m.check()


def test_mapped_extents_merge_only_when_contiguous_on_device():
    m = ExtentMap()
    m.set(Extent(0, 4, W, pblock=100))
    m.set(Extent(4, 4, W, pblock=104))
    assert stored(m) == [(0, 8, W, 100, 0)]
    m.set(Extent(8, 4, W, pblock=200))  # not contiguous on the device
    m.set(Extent(12, 4, U, pblock=204))  # contiguous but another state
    assert stored(m) == [(0, 8, W, 100, 0), (8, 4, W, 200, 0), (12, 4, U, 204, 0)]
    # Converting unwritten to written merges it with its left neighbour.
    m.set(Extent(12, 4, W, pblock=204))
    assert stored(m) == [(0, 8, W, 100, 0), (8, 8, W, 200, 0)]
    m.check()


def test_set_merges_back_after_partial_conversion():
    m = ExtentMap()
    m.set(Extent(0, 8, U, pblock=40))
    m.set(Extent(0, 3, W, pblock=40))
    m.set(Extent(5, 3, W, pblock=45))
    assert stored(m) == [(0, 3, W, 40, 0), (3, 2, U, 43, 0), (5, 3, W, 45, 0)]
    m.set(Extent(3, 2, W, pblock=43))
    assert stored(m) == [(0, 8, W, 40, 0)]
    m.check()


def test_set_hole_is_remove():
    m = ExtentMap()
    m.set(Extent(0, 10, D, indlen=10))
    removed = m.set(Extent(2, 3, H))
    assert removed == [Extent(2, 3, D, indlen=3)]
    assert stored(m) == [(0, 2, D, None, 2), (5, 5, D, None, 5)]


def test_set_copies_its_argument():
    m = ExtentMap()
    ext = Extent(0, 4, W, pblock=8)
    m.set(ext)
    ext.length = 100
    assert stored(m) == [(0, 4, W, 8, 0)]


@pytest.mark.parametrize(
    "ext",
    [
        Extent(0, 0, W, 1),
        Extent(-1, 2, W, 1),
        Extent(0, 2, W),
        Extent(0, 2, U),
        Extent(0, 2, D, pblock=3),
        Extent(0, 2, W, 1, indlen=1),
        Extent(0, 2, D, indlen=-1),
    ],
)
def test_set_rejects_bad_extents(ext):
    m = ExtentMap()
    with pytest.raises(ValueError):
        m.set(ext)
    assert m.cookie == 0 and len(m) == 0


# -- remove --------------------------------------------------------------------


def test_remove_splits_and_returns_pieces():
    m = ExtentMap()
    m.set(Extent(0, 10, W, pblock=100))
    m.set(Extent(10, 5, D, indlen=5))
    removed = m.remove(8, 4)
    assert removed == [Extent(8, 2, W, 108), Extent(10, 2, D, indlen=2)]
    assert stored(m) == [(0, 8, W, 100, 0), (12, 3, D, None, 3)]
    assert m.remove(20, 5) == []
    m.check()


def test_remove_filtered_by_state():
    m = ExtentMap()
    m.set(Extent(0, 4, D, indlen=1))
    m.set(Extent(4, 4, U, pblock=10))
    m.set(Extent(8, 4, D, indlen=1))
    removed = m.remove(2, 8, states={D})
    # The remainder of each split goes to the last piece.
    assert removed == [Extent(2, 2, D, indlen=1), Extent(8, 2, D, indlen=0)]
    assert stored(m) == [(0, 2, D, None, 0), (4, 4, U, 10, 0), (10, 2, D, None, 1)]
    m.check()


def test_indlen_split_proportional_with_remainder_last():
    m = ExtentMap()
    m.set(Extent(0, 10, D, indlen=7))
    # Pieces 0..3, 3..6, 6..10 get 7*3//10=2, 7*3//10=2, and 7-4=3.
    assert m.remove(3, 3) == [Extent(3, 3, D, indlen=2)]
    assert stored(m) == [(0, 3, D, None, 2), (6, 4, D, None, 3)]
    # A lookup reports the share the piece would get if cut there.
    assert m.lookup(7) == Extent(7, 3, D, indlen=3 - 3 * 1 // 4)
    assert m.lookup(6, limit=1) == Extent(6, 1, D, indlen=0)


def test_remove_returns_what_lookup_range_reports():
    m = ExtentMap()
    m.set(Extent(0, 13, D, indlen=11))
    pieces = m.lookup_range(2, 7)
    assert pieces == [Extent(2, 7, D, indlen=11 * 7 // 13)]
    assert m.remove(2, 7) == pieces
    assert stored(m) == [(0, 2, D, None, 11 * 2 // 13), (9, 4, D, None, 11 - 1 - 5)]


# -- cookie and counters ---------------------------------------------------------


def test_cookie_changes_on_every_change_only():
    m = ExtentMap()
    c = m.cookie
    m.set(Extent(0, 8, W, pblock=16))
    assert m.cookie != c
    c = m.cookie
    m.set(Extent(2, 2, W, pblock=18))  # identical content: no change
    assert m.cookie == c
    m.remove(10, 5)  # nothing there
    assert m.cookie == c
    m.remove(0, 8, states={D})  # nothing of that state
    assert m.cookie == c
    m.set(Extent(2, 2, U, pblock=18))
    assert m.cookie != c
    c = m.cookie
    m.remove(0, 1)
    assert m.cookie != c


def test_cookie_changes_when_only_indlen_changes():
    m = ExtentMap()
    m.set(Extent(0, 4, D, indlen=1))
    c = m.cookie
    m.set(Extent(0, 4, D, indlen=3))
    assert m.cookie != c
    assert stored(m) == [(0, 4, D, None, 3)]


def test_count_state():
    m = ExtentMap()
    m.set(Extent(0, 5, D, indlen=1))
    m.set(Extent(10, 3, W, pblock=1))
    m.set(Extent(20, 2, U, pblock=9))
    assert (m.count_state(D), m.count_state(U), m.count_state(W)) == (5, 2, 3)
    m.remove(0, 100)
    assert (m.count_state(D), m.count_state(U), m.count_state(W)) == (0, 0, 0)
    with pytest.raises(ValueError):
        m.count_state(H)


def test_check_detects_corruption():
    m = ExtentMap()
    m.set(Extent(0, 4, W, pblock=1))
    m.set(Extent(4, 4, U, pblock=5))
    m._tree.put(0, 4, U, 1, 0)          # behind the map's back
    with pytest.raises(AssertionError, match="not merged"):
        m.check()


# -- property test ---------------------------------------------------------------

SPAN = 48
STATES = st.sampled_from([H, D, U, W])


class ExtentMapMachine(RuleBasedStateMachine):
    """Random set/remove sequences against a per-block model.

    The model maps each block to ``(state, pblock)``; pblocks are drawn as
    ``fblock + base`` with few bases so that contiguous neighbours, and thus
    merges, are common.
    """

    def __init__(self):
        super().__init__()
        self.m = ExtentMap()
        self.model: dict[int, tuple[ExtState, int | None]] = {}
        self.indlen_in = 0
        self.indlen_out = 0

    def apply(self, fn, *args) -> list[Extent]:
        before, cookie = dict(self.model), self.m.cookie
        out = fn(*args)
        self.after = (before, cookie)
        self.indlen_out += sum(e.indlen for e in out)
        return out

    def check_cookie(self):
        before, cookie = self.after
        if self.model != before:
            assert self.m.cookie != cookie

    @rule(
        fblock=st.integers(0, SPAN - 1),
        length=st.integers(1, 12),
        state=STATES,
        base=st.sampled_from([100, 200]),
        indlen=st.integers(0, 9),
    )
    def set(self, fblock, length, state, base, indlen):
        pblock = fblock + base if state in (U, W) else None
        indlen = indlen if state == D else 0
        ext = Extent(fblock, length, state, pblock, indlen)
        expect = [e for e in self.m.lookup_range(fblock, length) if e.state != H]
        self.indlen_in += indlen
        assert self.apply(self.m.set, ext) == expect
        for b in range(fblock, fblock + length):
            if state == H:
                self.model.pop(b, None)
            else:
                self.model[b] = (state, None if pblock is None else pblock + b - fblock)
        self.check_cookie()

    @rule(
        fblock=st.integers(0, SPAN - 1),
        count=st.integers(0, 16),
        states=st.none() | st.sets(st.sampled_from([D, U, W]), min_size=1),
    )
    def remove(self, fblock, count, states):
        expect = [
            e for e in self.m.lookup_range(fblock, count) if e.state != H and (states is None or e.state in states)
        ]
        out = self.apply(self.m.remove, fblock, count, states)
        assert out == expect
        for b in range(fblock, fblock + count):
            if b in self.model and (states is None or self.model[b][0] in states):
                del self.model[b]
        self.check_cookie()

    @rule(fblock=st.integers(0, SPAN + 12), limit=st.none() | st.integers(1, 20))
    def lookup(self, fblock, limit):
        ext = self.m.lookup(fblock, limit)
        assert ext.fblock == fblock and ext.length >= 1
        if limit is not None:
            assert ext.length <= limit
        for b in range(fblock, min(ext.end, SPAN + 20)):
            state, pblock = self.model.get(b, (H, None))
            assert state == ext.state
            assert pblock == (None if ext.pblock is None else ext.pblock + b - fblock)
        nxt = ext.end
        if nxt < SPAN + 20 and (limit is None or ext.length < limit):
            # The extent ends where the mapping changes.
            here = self.model.get(nxt - 1, (H, None))
            there = self.model.get(nxt, (H, None))
            assert here[0] != there[0] or (here[0] in (U, W) and here[1] + 1 != there[1])

    @invariant()
    def matches_model(self):
        self.m.check()
        pieces = self.m.lookup_range(0, SPAN + 20)
        assert sum(e.length for e in pieces) == SPAN + 20
        for ext in pieces:
            for b in range(ext.fblock, ext.end):
                pblock = None if ext.pblock is None else ext.pblock + b - ext.fblock
                assert self.model.get(b, (H, None)) == (ext.state, pblock)
        for state in (D, U, W):
            assert self.m.count_state(state) == sum(1 for s, _ in self.model.values() if s == state)

    @invariant()
    def indlen_conserved(self):
        held = sum(e.indlen for e in self.m.iter_extents())
        assert held + self.indlen_out == self.indlen_in


ExtentMapMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestExtentMapMachine = ExtentMapMachine.TestCase
