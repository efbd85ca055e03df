"""fuse/loop.py: pyfuse3's session loop takes turns with delafs's Mutex."""

import os
import types

import pyfuse3
import pytest
import trio
import trio.testing

from delafs.fuse import loop
from delafs.lib.locks import Mutex


@pytest.fixture
def pyfuse3_trio():
    """Whatever a test does to pyfuse3's ``trio``, the next test gets it back."""
    saved = pyfuse3.trio
    yield
    pyfuse3.trio = saved


def test_install_gives_pyfuse3_a_mutex_and_trio_for_everything_else(pyfuse3_trio):
    assert pyfuse3.trio is trio                         # the hook is there to take
    assert loop.install() and loop.installed()
    assert loop.install()                               # a second call changes nothing
    t = pyfuse3.trio
    made = loop.locks_made()
    assert isinstance(t.Lock(), Mutex)
    assert loop.locks_made() == made + 1
    # what pyfuse3 3.5's compiled loop and handlers look up on it
    assert t.lowlevel is trio.lowlevel
    assert t.open_nursery is trio.open_nursery
    assert t.ClosedResourceError is trio.ClosedResourceError
    assert t.from_thread is trio.from_thread
    with pytest.raises(AttributeError):
        t.no_such_thing


def test_install_leaves_a_replaced_trio_alone(pyfuse3_trio):
    """pyfuse3's asyncio mode puts its own module there: not ours to replace."""
    other = types.ModuleType("pyfuse3.asyncio")
    pyfuse3.trio = other
    assert not loop.install() and not loop.installed()
    assert pyfuse3.trio is other


async def test_readers_take_turns_as_in_pyfuse3s_loop(pyfuse3_trio):
    """pyfuse3's readers: under the lock, wait for the fd, read one request,
    let the next reader have the lock.  Each request is read exactly once,
    in order, the lock goes round all the readers, and a free lock is taken
    without a scheduler pass (a trio.Lock's acquire always made one)."""
    loop.install()
    lock = pyfuse3.trio.Lock()
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    got = []

    async def reader(name):
        while True:
            async with lock:
                try:
                    await pyfuse3.trio.lowlevel.wait_readable(rfd)
                except pyfuse3.trio.ClosedResourceError:
                    return
                byte = os.read(rfd, 1)
            if byte == b"q":
                return
            got.append((name, byte))
            await trio.sleep(0)                         # the handler's own awaits

    try:
        async with pyfuse3.trio.open_nursery() as n:
            for name in "abc":
                n.start_soon(reader, name)
            for i in range(30):
                os.write(wfd, bytes([65 + i % 26]))
                await trio.sleep(0.001)
            os.write(wfd, b"qqq")
    finally:
        os.close(rfd)
        os.close(wfd)
    assert [b for _, b in got] == [bytes([65 + i % 26]) for i in range(30)]
    assert {n for n, _ in got} == set("abc")            # the lock went round

    # taken free without yielding: the task is not stepped again in between
    me = trio.lowlevel.current_task()

    class Steps(trio.abc.Instrument):
        n = 0

        def before_task_step(self, task):
            self.n += task is me

    steps = Steps()
    trio.lowlevel.add_instrument(steps)
    try:
        async with lock:
            pass
        await trio.lowlevel.checkpoint()                # the control: one step
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert steps.n == 1


def _queued_readers(lock, rfd):
    """Readers as pyfuse3's _wait_fuse_readable: under the lock, leave if
    the session has exited, else wait for the fd.  Returns the reader, the
    list of how each ended and the session's exit flag."""
    ended = []
    exited = []

    async def reader(name):
        try:
            async with lock:
                if exited:
                    ended.append((name, "exited"))
                    return
                try:
                    await pyfuse3.trio.lowlevel.wait_readable(rfd)
                except pyfuse3.trio.ClosedResourceError:
                    ended.append((name, "closed"))
                    return
        except trio.Cancelled:
            ended.append((name, "cancelled"))
            raise

    return reader, ended, exited


async def _run_three_readers(lock, reader, rfd, wfd, end) -> None:
    """Start readers a, b and c; once one holds the lock and the others
    queue on it, ``end(nursery)``; wait for them all to leave."""
    try:
        async with trio.open_nursery() as n:
            for name in "abc":
                n.start_soon(reader, name)
            await trio.testing.wait_all_tasks_blocked()
            assert lock.locked()
            end(n)
    finally:
        os.close(rfd)
        os.close(wfd)


async def _lock_is_free(lock):
    assert not lock.locked()
    with trio.fail_after(1):                            # nobody left queued on it
        async with lock:
            pass


async def test_terminate_ends_the_holder_and_the_queued_readers(pyfuse3_trio):
    """pyfuse3.terminate() sets the session's exit flag and closes the fd
    under the reader holding the lock (notify_closing): that one leaves,
    and each reader queued behind it gets the lock, sees the flag and
    leaves too."""
    loop.install()
    lock = pyfuse3.trio.Lock()
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    reader, ended, exited = _queued_readers(lock, rfd)

    def terminate(_nursery):
        exited.append(True)
        pyfuse3.trio.lowlevel.notify_closing(rfd)

    await _run_three_readers(lock, reader, rfd, wfd, terminate)
    assert sorted(how for _, how in ended) == ["closed", "exited", "exited"]   # the holder: closed
    assert {name for name, _ in ended} == set("abc")
    await _lock_is_free(lock)


async def test_cancelling_the_loop_frees_the_lock_of_holder_and_queue(pyfuse3_trio):
    loop.install()
    lock = pyfuse3.trio.Lock()
    rfd, wfd = os.pipe()
    reader, ended, _ = _queued_readers(lock, rfd)
    await _run_three_readers(lock, reader, rfd, wfd, lambda n: n.cancel_scope.cancel())
    assert sorted(ended) == [("a", "cancelled"), ("b", "cancelled"), ("c", "cancelled")]
    await _lock_is_free(lock)
