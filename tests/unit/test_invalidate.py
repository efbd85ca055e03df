"""fuse/invalidate.py without a kernel: the invalidation is a fake that
blocks in its thread until the test lets it go."""

from __future__ import annotations

import threading

import trio

from delafs.fuse import invalidate
from delafs.fuse.invalidate import KernelCacheInvalidator


class Gate:
    """A fake invalidate_inode: records each call, then blocks until the
    test opens that inode's gate (once per call)."""

    def __init__(self):
        self.calls: list[int] = []
        self.entered = threading.Semaphore(0)
        self.gates: dict[int, threading.Semaphore] = {}
        self.lock = threading.Lock()

    def _gate(self, ino: int) -> threading.Semaphore:
        with self.lock:
            return self.gates.setdefault(ino, threading.Semaphore(0))

    def __call__(self, ino: int) -> None:
        self.calls.append(ino)
        self.entered.release()
        self._gate(ino).acquire()

    def open(self, ino: int) -> None:
        self._gate(ino).release()

    async def wait_entered(self) -> None:
        with trio.fail_after(5):
            await trio.to_thread.run_sync(self.entered.acquire, abandon_on_cancel=True)


async def test_a_reply_waits_for_a_quick_invalidation():
    inv = KernelCacheInvalidator(invalidate=lambda ino: None)
    await inv.after_direct_write(7)
    assert inv.stats == {"invalidations": 1, "invalidations_run": 1, "invalidations_late": 0}
    assert not inv.running and not inv.next


async def test_writes_during_a_running_invalidation_share_the_next_and_replies_never_wait_long():
    gate = Gate()
    inv = KernelCacheInvalidator(invalidate=gate)
    # The first write starts an invalidation that does not finish: its
    # reply goes after INVALIDATE_WAIT, late.
    await inv.after_direct_write(5)
    await gate.wait_entered()
    assert inv.running == {5} and inv.stats["invalidations_late"] == 1
    # Three writes land while it runs: none starts a thread, all share one
    # invalidation that starts after them (the running one may already
    # have passed their pages).  Another inode is not held up.
    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(inv.after_direct_write, 5)
        n.start_soon(inv.after_direct_write, 6)
    await gate.wait_entered()
    assert sorted(gate.calls) == [5, 6]
    assert set(inv.next) == {5} and inv.running == {5, 6}
    assert inv.stats == {"invalidations": 5, "invalidations_run": 2, "invalidations_late": 5}
    # The running one of inode 5 ends: the shared one starts at once.
    gate.open(5)
    await gate.wait_entered()
    assert sorted(gate.calls) == [5, 5, 6] and not inv.next
    gate.open(5)
    gate.open(6)
    with trio.fail_after(5):
        while inv.running:
            await trio.sleep(0.001)
    assert inv.stats["invalidations_run"] == 3 and not inv.next


async def test_a_write_waits_for_the_shared_invalidation_when_it_is_quick(monkeypatch):
    """A write that joins a pending invalidation is answered once that one
    ends, not late, when it ends within INVALIDATE_WAIT."""
    monkeypatch.setattr(invalidate, "INVALIDATE_WAIT", 10.0)
    gate = Gate()
    inv = KernelCacheInvalidator(invalidate=gate)
    done = []

    async def write(tag):
        await inv.after_direct_write(9)
        done.append(tag)

    async with trio.open_nursery() as n:
        n.start_soon(write, "first")
        await gate.wait_entered()
        n.start_soon(write, "second")        # waits for the next invalidation
        await trio.sleep(0.01)
        gate.open(9)                         # first ends, second's starts
        await gate.wait_entered()
        await trio.sleep(0.01)
        assert done == ["first"]             # second still waits for its own
        gate.open(9)
    assert done == ["first", "second"]
    assert inv.stats == {"invalidations": 2, "invalidations_run": 2, "invalidations_late": 0}
