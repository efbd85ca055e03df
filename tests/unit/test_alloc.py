"""Tests of delafs.fs.alloc: placement policy, budgets, busy extents, books."""

from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from delafs.fs.alloc import Allocator
from delafs.lib.errors import FsError


def identity(a: Allocator) -> None:
    assert a.total == a.free_blocks + a.used
    assert a.total == a.available + a.used + a.reserved + a.metadata_reserve
    assert a.available >= 0 and a.reserved >= 0


def snapshot(a: Allocator):
    return a.statistics(), list(a.free_extents())


def assert_enospc(fn, *args, **kwargs):
    with pytest.raises(FsError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == errno.ENOSPC


# -- construction ------------------------------------------------------------


def test_init_merges_unsorted_adjacent_runs():
    a = Allocator(100, [(20, 5), (0, 10), (10, 10), (50, 10)])
    assert list(a.free_extents()) == [(0, 25), (50, 10)]
    assert a.free_blocks == 35 and a.used == 65 and a.available == 35
    a.check()


@pytest.mark.parametrize(
    "runs",
    [[(0, 10), (5, 10)], [(0, 0)], [(-1, 3)], [(95, 10)]],
)
def test_init_rejects_bad_runs(runs):
    with pytest.raises(ValueError):
        Allocator(100, runs)


def test_area_with_offset():
    a = Allocator(50, [(100, 50)], first=100)
    assert a.first == 100
    assert a.allocate(10) == (100, 10)
    with pytest.raises(ValueError):
        a.free(90, 5, seq=1)
    a.free(100, 10, seq=1)
    a.check()


def test_init_fills_metadata_reserve_as_far_as_it_goes():
    a = Allocator(100, [(0, 40)], metadata_reserve=8)
    assert a.metadata_reserve == 8 and a.available == 32
    full = Allocator(100, [(0, 5)], metadata_reserve=8)
    assert full.metadata_reserve == 5 and full.available == 0
    full.check()


# -- placement -----------------------------------------------------------------


def test_goal_inside_free_extent_allocates_at_goal():
    a = Allocator(100, [(0, 100)])
    assert a.allocate(10, goal=37) == (37, 10)
    assert list(a.free_extents()) == [(0, 37), (47, 53)]
    a.check()


def test_goal_takes_what_the_extent_allows():
    a = Allocator(100, [(0, 20), (50, 50)])
    # 15..20 holds 5 blocks; that satisfies minlen 1, so it is used even
    # though a larger extent exists elsewhere: extending in place wins.
    assert a.allocate(10, goal=15) == (15, 5)


def test_goal_too_short_for_minlen_falls_back_to_best_fit():
    a = Allocator(100, [(0, 20), (50, 50)])
    assert a.allocate(10, goal=15, minlen=10) == (0, 10)


def test_goal_outside_free_space_uses_best_fit():
    a = Allocator(100, [(0, 5), (10, 30), (60, 12)])
    assert a.allocate(10, goal=7) == (60, 10)


def test_best_fit_smallest_sufficient_extent():
    a = Allocator(100, [(0, 30), (40, 8), (60, 12), (80, 10)])
    assert a.allocate(9) == (80, 9)
    assert a.allocate(8) == (40, 8)


def test_best_fit_ties_lowest_start_without_goal():
    a = Allocator(100, [(60, 10), (0, 10), (30, 10)])
    assert a.allocate(5) == (0, 5)


def test_best_fit_ties_closest_to_goal():
    a = Allocator(100, [(0, 10), (30, 10), (60, 10), (90, 10)])
    assert a.allocate(5, goal=55) == (60, 5)
    assert a.allocate(10, goal=25) == (30, 10)
    # Equal distance: the lower start.
    b = Allocator(100, [(0, 10), (40, 10)])
    assert b.allocate(10, goal=20) == (0, 10)


def test_partial_allocation_from_largest_extent():
    a = Allocator(100, [(0, 4), (10, 7), (30, 6)])
    assert a.allocate(20) == (10, 7)
    assert a.allocate(20, minlen=6) == (30, 6)


def test_partial_allocation_respects_minlen():
    a = Allocator(100, [(0, 4), (10, 7)])
    before = snapshot(a)
    assert_enospc(a.allocate, 20, minlen=8)
    assert snapshot(a) == before


def test_no_free_space_enospc():
    a = Allocator(10, [])
    assert_enospc(a.allocate, 1)
    a.check()


@pytest.mark.parametrize(
    "kwargs", [{"count": 0}, {"count": 5, "minlen": 6}, {"count": 5, "minlen": 0}, {"count": 1, "source": "bogus"}]
)
def test_bad_requests_are_value_errors(kwargs):
    a = Allocator(100, [(0, 100)])
    with pytest.raises(ValueError):
        a.allocate(**kwargs)


# -- budgets -------------------------------------------------------------------


def test_reserve_unreserve():
    a = Allocator(100, [(0, 100)])
    a.reserve(30)
    assert a.reserved == 30 and a.available == 70
    a.reserve(0)
    assert a.reserved == 30
    a.unreserve(10)
    assert a.reserved == 20 and a.available == 80
    identity(a)


def test_reserve_enospc_changes_nothing():
    a = Allocator(100, [(0, 100)], metadata_reserve=10)
    a.reserve(85)
    before = snapshot(a)
    assert_enospc(a.reserve, 6)
    assert snapshot(a) == before


def test_reserve_and_unreserve_reject_bugs():
    a = Allocator(100, [(0, 100)])
    a.reserve(5)
    with pytest.raises(ValueError):
        a.reserve(-1)
    with pytest.raises(ValueError):
        a.unreserve(-1)
    with pytest.raises(ValueError):
        a.unreserve(6)
    assert a.reserved == 5


def test_reserve_may_dip_into_metadata_reserve_when_asked():
    a = Allocator(100, [(0, 100)], metadata_reserve=10)
    a.reserve(88)
    assert_enospc(a.reserve, 5)
    a.reserve(5, from_metadata_reserve=True)
    assert a.available == 0 and a.metadata_reserve == 7 and a.reserved == 93
    assert_enospc(a.reserve, 8, from_metadata_reserve=True)
    identity(a)
    a.check()


def test_available_allocation_does_not_eat_reservations():
    a = Allocator(100, [(0, 100)])
    a.reserve(95)
    # Capped at what is available.
    assert a.allocate(10) == (0, 5)
    assert a.available == 0 and a.reserved == 95
    assert_enospc(a.allocate, 1)
    identity(a)


def test_available_cap_below_minlen_enospc():
    a = Allocator(100, [(0, 100)])
    a.reserve(97)
    before = snapshot(a)
    assert_enospc(a.allocate, 5, minlen=4)
    assert snapshot(a) == before


def test_allocate_from_reserved():
    a = Allocator(100, [(0, 100)])
    a.reserve(20)
    start, length = a.allocate(12, source="reserved")
    assert length == 12 and a.reserved == 8 and a.available == 80
    identity(a)
    with pytest.raises(ValueError):
        a.allocate(9, source="reserved")
    assert a.reserved == 8


def test_partial_allocation_from_reserved_keeps_the_rest_reserved():
    a = Allocator(100, [(0, 6), (50, 6)])
    a.reserve(10)
    assert a.allocate(10, source="reserved") == (0, 6)
    assert a.reserved == 4
    identity(a)


def test_allocate_from_metadata_reserve():
    a = Allocator(100, [(0, 100)], metadata_reserve=4)
    a.reserve(96)
    assert_enospc(a.allocate, 1)
    assert a.allocate(1, source="metadata_reserve")[1] == 1
    assert a.metadata_reserve == 3
    assert a.allocate(5, source="metadata_reserve")[1] == 3
    assert a.metadata_reserve == 0
    assert_enospc(a.allocate, 1, source="metadata_reserve")
    identity(a)
    a.check()


def test_refill_metadata_reserve():
    a = Allocator(100, [(0, 100)])
    assert a.refill_metadata_reserve(10) == 10
    assert a.metadata_reserve == 10 and a.available == 90
    assert a.refill_metadata_reserve(10) == 0
    assert a.refill_metadata_reserve(5) == 0
    assert a.metadata_reserve == 10
    a.reserve(85)
    assert a.refill_metadata_reserve(20) == 5
    assert a.metadata_reserve == 15 and a.available == 0
    identity(a)


def test_freed_blocks_refill_a_drawn_metadata_reserve_first():
    """Space that comes back tops the pool up before it is available again
    (xfs_add_freecounter refills m_resblks first): otherwise every draw
    on the pool, by an unlink on a full filesystem or a writeback split,
    would leave the books showing more free space than mkfs made."""
    a = Allocator(100, [(0, 100)], metadata_reserve=10)
    a.reserve(90)
    start, n = a.allocate(4, source="metadata_reserve")
    assert a.metadata_reserve == 6
    a.free(start, n, seq=1)
    a.release_busy(1)
    assert a.metadata_reserve == 10 and a.available == 0
    a.unreserve(30)
    assert a.metadata_reserve == 10 and a.available == 30
    a.reserve(3, from_metadata_reserve=True)        # available first: pool untouched
    a.reserve(29, from_metadata_reserve=True)       # 27 available, 2 from the pool
    assert a.metadata_reserve == 8 and a.available == 0
    a.unreserve(5)
    assert a.metadata_reserve == 10 and a.available == 3
    identity(a)
    a.check()


def test_mark_used():
    a = Allocator(100, [(0, 100)])
    a.mark_used(40, 10)
    assert list(a.free_extents()) == [(0, 40), (50, 50)]
    assert a.used == 10
    before = snapshot(a)
    for run in [(45, 10), (35, 10), (120, 1), (0, 0)]:
        with pytest.raises(ValueError):
            a.mark_used(*run)
    assert snapshot(a) == before
    a.reserve(a.available - 3)
    with pytest.raises(ValueError):
        a.mark_used(0, 4)
    a.check()


# -- busy extents ----------------------------------------------------------------


def test_freed_blocks_stay_busy_until_durable():
    a = Allocator(20, [(0, 20)])
    assert a.allocate(20) == (0, 20)
    a.free(5, 5, seq=7)
    assert a.is_busy(5) and a.is_busy(9) and not a.is_busy(10) and not a.is_free(5)
    assert a.busy == 5 and a.used == 20 and a.free_blocks == 0 and a.available == 0
    assert_enospc(a.allocate, 1)
    assert a.release_busy(6) == []
    assert_enospc(a.allocate, 1)
    assert a.release_busy(7) == [(5, 5)]
    assert not a.is_busy(5) and a.is_free(5)
    assert a.busy == 0 and a.used == 15 and a.free_blocks == 5
    assert a.allocate(5) == (5, 5)
    a.check()


def test_release_merges_with_free_neighbours_and_returns_merged_runs():
    a = Allocator(30, [(0, 30)])
    a.allocate(30)
    a.free(0, 5, seq=1)
    a.release_busy(1)
    a.free(5, 3, seq=2)
    a.free(8, 2, seq=3)
    a.free(20, 10, seq=3)
    a.free(12, 2, seq=9)
    assert a.release_busy(3) == [(5, 5), (20, 10)]
    assert list(a.free_extents()) == [(0, 10), (20, 10)]
    assert a.statistics()["free_extents"] == 2
    a.check()
    a.free(10, 2, seq=10)
    assert a.release_busy(10) == [(10, 4)]
    a.free(14, 6, seq=11)
    a.release_busy(11)
    assert list(a.free_extents()) == [(0, 30)]
    a.check()


@pytest.mark.parametrize("run", [(3, 2), (9, 2), (12, 1), (15, 10), (28, 5), (-1, 1), (1, 0)])
def test_double_free_and_out_of_area_are_value_errors(run):
    a = Allocator(30, [(0, 30)])
    a.allocate(20)  # 0..20 used, 20..30 free
    a.free(2, 8, seq=1)
    a.release_busy(1)  # 2..10 free again
    a.free(10, 5, seq=2)  # 10..15 busy
    before = snapshot(a), a.busy
    with pytest.raises(ValueError):
        a.free(*run, seq=3)
    assert (snapshot(a), a.busy) == before


def test_statistics():
    a = Allocator(100, [(0, 50), (60, 10)], metadata_reserve=5)
    a.reserve(7)
    a.allocate(3)
    a.free(60, 2, seq=1)
    assert a.statistics() == {
        "total": 100,
        "free": 57,
        "available": 45,
        "used": 43,
        "reserved": 7,
        "metadata_reserve": 5,
        "busy": 2,
        "free_extents": 2,
        "largest_free": 50,
    }


def test_check_detects_corruption():
    a = Allocator(100, [(0, 50)])
    a._free += 1
    with pytest.raises(AssertionError, match="free counter"):
        a.check()
    b = Allocator(100, [(0, 50)])
    b._by_size.add((3, 60))
    with pytest.raises(AssertionError, match="indices disagree"):
        b.check()


# -- property test ---------------------------------------------------------------

AREA = 64
FAILED = object()


class AllocatorMachine(RuleBasedStateMachine):
    """Random sequences of every operation against a per-block model.

    The model knows which blocks we allocated (``owned``), which are busy
    and under which seq, and which were used from the start. Every call that
    fails must leave the allocator exactly as it was.
    """

    @initialize(
        preused=st.sets(st.integers(0, AREA - 1), max_size=AREA // 4),
        pool=st.integers(0, 8),
    )
    def setup(self, preused, pool):
        # One-block runs: the constructor must merge them.
        runs = [(b, 1) for b in range(AREA) if b not in preused]
        self.a = Allocator(AREA, runs, metadata_reserve=pool)
        self.preused = preused
        self.owned: set[int] = set()
        self.busy: dict[int, int] = {}  # block -> seq
        self.seq = 1
        self.durable = 0

    def attempt(self, fn, *args, **kwargs):
        """Call; on failure check that nothing changed and return FAILED."""
        before = snapshot(self.a), self.a.busy
        try:
            return fn(*args, **kwargs)
        except (FsError, ValueError) as exc:
            if isinstance(exc, FsError):
                assert exc.errno == errno.ENOSPC
            assert (snapshot(self.a), self.a.busy) == before
            return FAILED

    @rule(n=st.integers(0, 40), pool=st.booleans())
    def reserve(self, n, pool):
        avail, mres, reserved = self.a.available, self.a.metadata_reserve, self.a.reserved
        fits = n <= avail + (mres if pool else 0)
        assert (self.attempt(self.a.reserve, n, from_metadata_reserve=pool) is not FAILED) == fits
        if fits:
            assert self.a.reserved == reserved + n
            assert self.a.metadata_reserve == mres - max(0, n - avail)

    @rule(data=st.data())
    def unreserve(self, data):
        n = data.draw(st.integers(0, self.a.reserved + 2))
        too_much = n > self.a.reserved
        assert (self.attempt(self.a.unreserve, n) is FAILED) == too_much

    @rule(
        count=st.integers(1, 20),
        goal=st.none() | st.integers(0, AREA - 1),
        data=st.data(),
        source=st.sampled_from(["available", "reserved", "metadata_reserve"]),
    )
    def allocate(self, count, goal, data, source):
        minlen = data.draw(st.integers(1, count))
        budget = {
            "available": self.a.available,
            "reserved": self.a.reserved,
            "metadata_reserve": self.a.metadata_reserve,
        }[source]
        largest = self.a.statistics()["largest_free"]
        must_fail = (
            (source == "reserved" and count > budget)
            or min(count, budget) < minlen
            or largest < minlen
        )
        got = self.attempt(self.a.allocate, count, goal, minlen=minlen, source=source)
        assert (got is FAILED) == must_fail
        if got is FAILED:
            return
        start, length = got
        assert minlen <= length <= min(count, budget)
        blocks = set(range(start, start + length))
        assert not blocks & self.owned, "block allocated twice"
        assert not blocks & set(self.busy), "busy block reused"
        assert not blocks & self.preused
        self.owned |= blocks
        after = {
            "available": self.a.available,
            "reserved": self.a.reserved,
            "metadata_reserve": self.a.metadata_reserve,
        }[source]
        assert after == budget - length

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def free(self, data):
        blk = data.draw(st.sampled_from(sorted(self.owned)))
        length = 1
        while blk + length in self.owned and length < data.draw(st.integers(1, 8)):
            length += 1
        self.a.free(blk, length, self.seq)
        for b in range(blk, blk + length):
            self.owned.remove(b)
            self.busy[b] = self.seq

    @rule(blk=st.integers(-2, AREA + 1))
    def double_free(self, blk):
        if 0 <= blk < AREA and not self.a.is_free(blk) and not self.a.is_busy(blk):
            return  # a used block: freeing it would be legal
        assert self.attempt(self.a.free, blk, 1, self.seq) is FAILED

    @rule()
    def commit(self):
        self.seq += 1

    @rule(data=st.data())
    def release(self, data):
        upto = data.draw(st.integers(self.durable, self.seq))
        runs = self.a.release_busy(upto)
        released = {b for s, n in runs for b in range(s, s + n)}
        expect = {b for b, s in self.busy.items() if s <= upto}
        assert released == expect
        for i in range(1, len(runs)):
            assert runs[i - 1][0] + runs[i - 1][1] < runs[i][0]
        for b in expect:
            del self.busy[b]
        self.durable = upto

    @rule(level=st.integers(0, 16))
    def refill(self, level):
        pool, avail = self.a.metadata_reserve, self.a.available
        moved = self.a.refill_metadata_reserve(level)
        assert moved == max(0, min(level - pool, avail))
        assert self.a.metadata_reserve == pool + moved

    @invariant()
    def books_balance(self):
        identity(self.a)
        self.a.check()
        assert self.a.busy == len(self.busy)
        for b in range(AREA):
            expect_free = b not in self.owned and b not in self.busy and b not in self.preused
            assert self.a.is_free(b) == expect_free
            assert self.a.is_busy(b) == (b in self.busy)


AllocatorMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestAllocatorMachine = AllocatorMachine.TestCase
