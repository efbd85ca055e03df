"""RWSemaphore: the i_rwsem / invalidate_lock primitive."""

import pytest
import trio
import trio.testing

from delafs.lib import locks
from delafs.lib.locks import RWSemaphore


@pytest.fixture(autouse=True)
def _debug_locks(monkeypatch):
    """These tests check the DEBUG_LOCKS assertions: force them on even if
    the environment turned them off."""
    monkeypatch.setattr(locks, "DEBUG_LOCKS", True)


async def test_shared_holders_run_concurrently():
    sem = RWSemaphore("t")
    inside = 0
    peak = 0

    async def reader():
        nonlocal inside, peak
        async with sem.shared():
            inside += 1
            peak = max(peak, inside)
            await trio.sleep(0.01)
            inside -= 1

    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(reader)
    assert peak == 5
    assert not sem.locked
    assert sem.statistics()["acquisitions_shared"] == 5


async def test_exclusive_excludes_everyone():
    sem = RWSemaphore("t")
    log = []

    async def writer(i):
        async with sem.exclusive():
            log.append(("in", i))
            await trio.sleep(0.01)
            log.append(("out", i))

    async def reader(i):
        async with sem.shared():
            log.append(("rin", i))
            await trio.sleep(0.01)
            log.append(("rout", i))

    async with trio.open_nursery() as n:
        for i in range(3):
            n.start_soon(writer, i)
            n.start_soon(reader, i)
    # Every exclusive section is immediately followed by its own exit.
    for k, ev in enumerate(log):
        if ev[0] == "in":
            assert log[k + 1] == ("out", ev[1])
    assert not sem.locked


async def test_writer_preference_and_fifo():
    sem = RWSemaphore("t")
    order = []
    release_first = trio.Event()

    async def first_reader():
        async with sem.shared():
            await release_first.wait()

    async def writer():
        async with sem.exclusive():
            order.append("W")
            await trio.sleep(0)

    async def late_reader(tag):
        async with sem.shared():
            order.append(tag)

    async with trio.open_nursery() as n:
        n.start_soon(first_reader)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        st = sem.statistics()
        assert st["waiting_writers"] == 1 and st["readers"] == 1
        # A reader arriving after the waiting writer must wait, although
        # the lock is only held shared.
        n.start_soon(late_reader, "R1")
        n.start_soon(late_reader, "R2")
        await trio.testing.wait_all_tasks_blocked()
        assert order == []
        assert sem.statistics()["waiting_readers"] == 2
        with pytest.raises(trio.WouldBlock):
            sem.acquire_shared_nowait()
        release_first.set()
    # R1 and R2 are granted together (trio may run them in either order).
    assert order[0] == "W" and sorted(order[1:]) == ["R1", "R2"]


async def test_queued_readers_behind_writer_are_granted_together():
    sem = RWSemaphore("t")
    inside = 0
    peak = 0

    async def reader():
        nonlocal inside, peak
        async with sem.shared():
            inside += 1
            peak = max(peak, inside)
            await trio.sleep(0.01)
            inside -= 1

    await sem.acquire_exclusive()
    async with trio.open_nursery() as n:
        for _ in range(4):
            n.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        sem.release_exclusive()
    assert peak == 4


async def test_cancelled_writer_leaves_lock_usable():
    sem = RWSemaphore("t")
    got = []
    await sem.acquire_shared()

    async def waiting_writer(cancel_scope_box):
        with trio.CancelScope() as cs:
            cancel_scope_box.append(cs)
            await sem.acquire_exclusive()
            got.append("writer")            # pragma: no cover - cancelled
            sem.release_exclusive()

    async def reader():
        async with sem.shared():
            got.append("reader")

    box = []
    async with trio.open_nursery() as n:
        n.start_soon(waiting_writer, box)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(reader)                 # queues behind the writer
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        box[0].cancel()                      # writer leaves: reader is granted
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["reader"]
    st = sem.statistics()
    assert st["waiting_writers"] == 0 and st["cancelled_waits"] == 1
    sem.release_shared()
    assert not sem.locked
    async with sem.exclusive():
        assert sem.held_exclusive_by_current()


async def test_cancelled_reader_leaves_lock_usable():
    sem = RWSemaphore("t")
    await sem.acquire_exclusive()

    async def impatient_reader():
        with trio.move_on_after(0.01) as cs:
            await sem.acquire_shared()
        assert cs.cancelled_caught

    async with trio.open_nursery() as n:
        n.start_soon(impatient_reader)
    assert sem.statistics()["waiting_readers"] == 0
    sem.release_exclusive()
    async with sem.shared():
        assert sem.held_shared_by_current()


async def test_cancel_before_acquire_raises_without_taking():
    sem = RWSemaphore("t")
    with trio.CancelScope() as cs:
        cs.cancel()
        await sem.acquire_exclusive()
    assert cs.cancelled_caught
    assert not sem.locked


async def test_release_without_hold_raises():
    sem = RWSemaphore("t")
    with pytest.raises(RuntimeError):
        sem.release_shared()
    with pytest.raises(RuntimeError):
        sem.release_exclusive()
    await sem.acquire_shared()
    with pytest.raises(RuntimeError):
        sem.release_exclusive()
    sem.release_shared()

    # Another task cannot release our exclusive hold.
    await sem.acquire_exclusive()
    errors = []

    async def intruder():
        try:
            sem.release_exclusive()
        except RuntimeError as e:
            errors.append(e)

    async with trio.open_nursery() as n:
        n.start_soon(intruder)
    assert len(errors) == 1 and "t" in str(errors[0])
    assert sem.held_exclusive_by_current()
    sem.release_exclusive()


async def test_not_recursive():
    sem = RWSemaphore("t")
    async with sem.shared():
        with pytest.raises(RuntimeError):
            await sem.acquire_shared()
        with pytest.raises(RuntimeError):
            await sem.acquire_exclusive()
    async with sem.exclusive():
        with pytest.raises(RuntimeError):
            await sem.acquire_shared()
        with pytest.raises(RuntimeError):
            sem.acquire_exclusive_nowait()


async def test_assert_held(monkeypatch):
    sem = RWSemaphore("inv")
    with pytest.raises(AssertionError, match="inv"):
        sem.assert_held("shared")
    async with sem.shared():
        sem.assert_held("shared")
        with pytest.raises(AssertionError):
            sem.assert_held("exclusive")
        assert sem.held_shared_by_current() and not sem.held_exclusive_by_current()
    async with sem.exclusive():
        sem.assert_held("exclusive")
        sem.assert_held("shared")          # exclusive satisfies shared
        assert not sem.held_shared_by_current()
    with pytest.raises(ValueError):
        sem.assert_held("bogus")

    # Held by another task does not count.
    ev = trio.Event()
    async with trio.open_nursery() as n:
        async def holder():
            async with sem.exclusive():
                await ev.wait()
        n.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        assert sem.locked
        with pytest.raises(AssertionError):
            sem.assert_held("shared")
        ev.set()

    monkeypatch.setattr(locks, "DEBUG_LOCKS", False)
    sem.assert_held("exclusive")           # production: no check


async def test_nowait_variants():
    sem = RWSemaphore("t")
    sem.acquire_shared_nowait()

    async def other():
        with pytest.raises(trio.WouldBlock):
            sem.acquire_exclusive_nowait()
        sem.acquire_shared_nowait()          # shared with shared is fine
        sem.release_shared()

    async with trio.open_nursery() as n:
        n.start_soon(other)
    sem.release_shared()
    sem.acquire_exclusive_nowait()
    sem.release_exclusive()


async def test_statistics_and_repr():
    sem = RWSemaphore("invalidate_lock[7]")
    async with sem.exclusive():
        st = sem.statistics()
        assert st["writer"] is not None and st["readers"] == 0
        assert "invalidate_lock[7]" in repr(sem)
    st = sem.statistics()
    assert st == {"name": "invalidate_lock[7]", "readers": 0, "writer": None,
                  "waiting_readers": 0, "waiting_writers": 0,
                  "acquisitions_shared": 0, "acquisitions_exclusive": 1,
                  "contended": 0, "cancelled_waits": 0}


def test_debug_flag_env(monkeypatch):
    monkeypatch.delenv("DELAFS_DEBUG_LOCKS", raising=False)
    assert locks.env_flag("DELAFS_DEBUG_LOCKS", True) is True
    for off in ("0", "off", "False", "no"):
        monkeypatch.setenv("DELAFS_DEBUG_LOCKS", off)
        assert locks.env_flag("DELAFS_DEBUG_LOCKS", True) is False
    monkeypatch.setenv("DELAFS_DEBUG_LOCKS", "1")
    assert locks.env_flag("DELAFS_DEBUG_LOCKS", True) is True


async def test_meta_lock_preconditions_are_asserted(tmp_path):
    """extent_map, the btree's changes and the writeback discard say
    "caller holds meta_lock": with DEBUG_LOCKS a call without it fails at
    once instead of racing."""
    from delafs.block import BlockDevice
    from delafs.fs import Filesystem
    path = str(tmp_path / "img")
    BlockDevice.create_file(path, 16 << 20)
    with BlockDevice.open(path) as dev:
        await Filesystem.format(dev)
        fs = await Filesystem.open(dev)
        ino = (await fs.create(1, b"f", 0o644)).ino
        with pytest.raises(AssertionError, match="extent_map called without holding its lock"):
            await fs.extent_map(ino)
        async with fs.meta_lock:
            await fs.extent_map(ino)
        with pytest.raises(AssertionError, match="BTree.delete called without holding its lock"):
            await fs.tree.delete((ino, 1, 0))
        await fs.close()


def test_an_idle_rwsemaphore_is_small():
    """Every inode has two (i_rwsem, invalidate_lock): with a deque and a
    counters dict each, an inode's locks took 2.2 KiB, a fifth of what a
    cached inode costs the daemon.  An uncontended lock has no deque."""
    import tracemalloc

    from delafs.lib.locks import RWSemaphore
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    sems = [RWSemaphore(f"i_rwsem[{i}]") for i in range(1000)]
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    per_lock = sum(s.size_diff for s in after.compare_to(before, "filename")) / len(sems)
    assert per_lock < 500, per_lock
    assert sems[0].statistics()["contended"] == 0


# -- Mutex (meta_lock, commit_lock) ----------------------------------------------


async def test_mutex_hands_off_in_arrival_order():
    """A release hands the lock to the longest waiter before it runs: a
    task arriving just after the release queues behind the waiters."""
    from delafs.lib.locks import Mutex
    m = Mutex()
    order = []

    async def waiter(name):
        async with m:
            order.append(name)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as n:
        await m.acquire()
        n.start_soon(waiter, "b")
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(waiter, "c")
        await trio.testing.wait_all_tasks_blocked()
        m.release()
        assert m.locked()                  # already b's
        n.start_soon(waiter, "d")
    assert order == ["b", "c", "d"]
    assert not m.locked()


async def test_mutex_uncontended_acquire_does_not_yield():
    from delafs.lib.locks import Mutex
    m = Mutex()
    ran = []

    async def other():
        ran.append(1)

    async with trio.open_nursery() as n:
        n.start_soon(other)
        async with m:
            pass
        await m.acquire()
        m.release()
        assert ran == []                   # nobody else got to run
        await trio.testing.wait_all_tasks_blocked()
        assert ran == [1]


async def test_mutex_cancelled_waiter_leaves_the_queue():
    from delafs.lib.locks import Mutex
    m = Mutex()
    scope = trio.CancelScope()

    async def w():
        with scope:
            await m.acquire()
            raise AssertionError("a cancelled waiter got the lock")

    async with trio.open_nursery() as n:
        await m.acquire()
        n.start_soon(w)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        m.release()
        assert not m.locked()
        async with m:                      # and it is usable
            assert m.locked()


async def test_mutex_cancel_before_acquire_raises_without_taking():
    from delafs.lib.locks import Mutex
    m = Mutex()
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await m.acquire()
    assert not m.locked()


async def test_mutex_misuse_raises():
    from delafs.lib.locks import Mutex, assert_owned
    m = Mutex()
    with pytest.raises(RuntimeError):
        m.release()                        # not held
    async with m:
        with pytest.raises(RuntimeError):
            await m.acquire()              # not recursive
        assert_owned(m, "f")

        async def other():
            with pytest.raises(RuntimeError):
                m.release()                # held by someone else
            with pytest.raises(AssertionError, match="g called without holding its lock"):
                assert_owned(m, "g")
        async with trio.open_nursery() as n:
            n.start_soon(other)
    with pytest.raises(AssertionError):
        assert_owned(m, "h")


async def test_lock_hand_offs_are_ki_protected(monkeypatch):
    """A Ctrl-C is raised between any two bytecodes of unprotected code: one
    landing in a release after the lock was handed to a waiter but before
    the waiter was woken would leave it owning a lock it never learns of,
    and the teardown that follows the Ctrl-C hangs on it.  So every
    hand-off runs KI-protected."""
    from delafs.lib.locks import Mutex
    real = trio.lowlevel.reschedule
    unprotected = []

    def reschedule(task, *args):
        if not trio.lowlevel.currently_ki_protected():
            unprotected.append(task)
        real(task, *args)

    monkeypatch.setattr(trio.lowlevel, "reschedule", reschedule)
    m, sem = Mutex(), RWSemaphore("t")

    async def use_all():
        async with m:
            await trio.lowlevel.checkpoint()
        async with sem.exclusive():
            await trio.lowlevel.checkpoint()
        async with sem.shared():
            await trio.lowlevel.checkpoint()
        async with sem.exclusive():
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(use_all)
    assert sem.statistics()["contended"] > 0
    assert unprotected == []


async def test_folio_lock_hand_off_is_ki_protected():
    """The folio lock hands off as the locks above do (unpark, then the new
    owner recorded): a Ctrl-C between the two would wake a waiter that
    does not own the folio."""
    from delafs.mm.folio import Folio
    seen = []

    class Lot:
        """A ParkingLot (which cannot be subclassed) that notes whether
        its unpark was called KI-protected."""
        def __init__(self):
            self.lot = trio.lowlevel.ParkingLot()

        def __bool__(self):
            return bool(self.lot)

        async def park(self):
            await self.lot.park()

        def unpark(self, *args, **kwargs):
            seen.append(trio.lowlevel.currently_ki_protected())
            return self.lot.unpark(*args, **kwargs)

    f = Folio(None, 0, 1)
    f._lot = Lot()

    async def locker():
        await f.lock()
        await trio.lowlevel.checkpoint()
        f.unlock()

    async with trio.open_nursery() as n:
        f.lock_new()
        n.start_soon(locker)
        n.start_soon(locker)
        await trio.testing.wait_all_tasks_blocked()
        f.unlock()
    assert seen and all(seen), seen
    assert not f.locked


@pytest.mark.parametrize("kind", ["mutex", "exclusive", "shared"])
def test_ctrl_c_as_a_lock_is_left_still_releases_it(kind):
    """Python checks for signals as a coroutine starts, so a Ctrl-C can be
    raised at the first instruction of ``__aexit__``, before it releases.
    Unprotected, the lock stayed held by a task that was gone, and the
    teardown after the Ctrl-C (a shielded commit that takes meta_lock)
    would wait for it forever."""
    import signal
    import sys

    from delafs.lib.locks import Mutex, _Guard
    lock = Mutex() if kind == "mutex" else RWSemaphore("t")
    aexit = (Mutex if kind == "mutex" else _Guard).__aexit__.__code__
    fired = []

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code is aexit and not fired:
            fired.append(True)
            signal.raise_signal(signal.SIGINT)

    async def holder():
        cm = lock if kind == "mutex" else getattr(lock, kind)()
        async with cm:
            await trio.sleep(0.01)
            sys.settrace(tracer)
        sys.settrace(None)

    # A background job of a non-interactive shell starts with SIGINT
    # ignored, and trio then installs no handler of its own.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            trio.run(holder)
    finally:
        sys.settrace(None)
        signal.signal(signal.SIGINT, old)
    assert fired
    assert not (lock.locked() if kind == "mutex" else lock.locked)


async def test_every_mutex_acquire_runs_ki_protected(tmp_path, monkeypatch):
    """Code that takes meta_lock or commit_lock by hand (acquire, then a
    try whose finally releases) has a gap between the two where an
    unprotected Ctrl-C would leave the lock held.  Every caller of
    Mutex.acquire and Mutex.release, ``async with`` or by hand, must run
    KI-protected: a write, an fsync, a read and a rename through the engine
    check it."""
    import sys

    from delafs.block import BlockDevice
    from delafs.fs import Filesystem
    from delafs.lib.locks import Mutex
    from delafs.vfs.mount import Mount

    real_acquire, real_release = Mutex.acquire, Mutex.release
    callers = {}

    def note_caller():
        # Called from an unprotected wrapper: the answer is the caller's.
        caller = sys._getframe(2).f_code.co_qualname
        callers[caller] = callers.get(caller, True) and trio.lowlevel.currently_ki_protected()

    async def acquire(self):
        note_caller()
        await real_acquire(self)

    def release(self):
        note_caller()
        real_release(self)

    monkeypatch.setattr(Mutex, "acquire", acquire)
    monkeypatch.setattr(Mutex, "release", release)
    path = str(tmp_path / "img")
    BlockDevice.create_file(path, 32 << 20)
    with BlockDevice.open(path) as dev:
        await Filesystem.format(dev)
        fs = await Filesystem.open(dev)
        m = Mount(fs, cache_size=8 << 20)
        async with trio.open_nursery() as n:
            await m.start(n)
            ino = (await fs.create(1, b"f", 0o644)).ino
            f = await m.open(ino, write=True)
            await m.write(f, 0, b"x" * 10000)
            await m.fsync(f)
            assert await m.read(f, 0, 5) == b"xxxxx"
            await m.release(f)
            await m.rename(1, b"f", 1, b"g")
            await m.syncfs()
            await m.unmount()
            n.cancel_scope.cancel()
    unprotected = sorted(c for c, ok in callers.items() if not ok)
    assert callers and unprotected == []


async def test_mutex_granted_to_a_waiter_cancelled_before_it_runs():
    """A waiter the lock was handed to owns it even if its scope is
    cancelled before it runs: acquire returns, the cancellation arrives at
    its next checkpoint, and ``async with`` releases on the way out."""
    from delafs.lib.locks import Mutex
    m = Mutex()
    scope = trio.CancelScope()
    got = []

    async def w():
        with scope:
            async with m:
                got.append(True)
                await trio.lowlevel.checkpoint()
                raise AssertionError("not cancelled")

    async with trio.open_nursery() as n:
        await m.acquire()
        n.start_soon(w)
        await trio.testing.wait_all_tasks_blocked()
        m.release()                        # handed to w, which has not run yet
        scope.cancel()
    assert got == [True] and scope.cancelled_caught
    assert not m.locked()


async def test_a_commit_cancelled_while_waiting_for_commit_lock_loses_nothing(rig):
    """A commit granted meta_lock while its scope was being cancelled used
    to freeze the running transaction and then meet the cancellation at
    commit_lock: the frozen transaction was dropped, unwritten, and the
    next commit took the following sequence number, where recovery stops
    at the gap.  Nothing is frozen before both locks are held now."""
    from delafs.ondisk import ROOT_INO
    m = await rig.mount(format=True)
    fs = m.fs
    store = fs.store
    await fs.commit()
    ino = (await fs.create(ROOT_INO, b"made-before", 0o644)).ino
    scope = trio.CancelScope()

    async def committer():
        with scope:
            await store.commit()

    async with trio.open_nursery() as n:
        await store.commit_lock.acquire()      # a commit's write in flight
        await store.meta_lock.acquire()        # an operation in progress
        n.start_soon(committer)
        await trio.testing.wait_all_tasks_blocked()
        store.meta_lock.release()              # handed to the committer...
        scope.cancel()                         # ...cancelled before it runs
        await trio.testing.wait_all_tasks_blocked()
        store.commit_lock.release()
    assert scope.cancelled_caught
    assert store.failed is None
    await fs.commit()
    await rig.crash()
    m = await rig.mount()                      # recovery replays the log
    assert (await m.fs.lookup(ROOT_INO, b"made-before")).ino == ino
    await rig.unmount()
    await rig.fsck()
