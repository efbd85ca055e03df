"""block/iothread.py: the worker threads every blocking device call runs in."""

import os
import random
import signal
import threading
import time

import pytest
import trio

from delafs.block import iothread
from delafs.block.iothread import in_worker_thread


def _io_threads() -> int:
    return sum(t.name == "delafs-io" and t.is_alive() for t in threading.enumerate())


async def test_results_and_exceptions_come_back_to_the_caller():
    assert await in_worker_thread(divmod, 17, 5) == (3, 2)
    assert await in_worker_thread(threading.get_ident) != threading.get_ident()
    with pytest.raises(ZeroDivisionError) as e:
        await in_worker_thread(divmod, 1, 0)
    assert any(frame.name == "_serve" for frame in e.traceback)    # raised in the worker


async def test_idle_workers_are_reused_and_at_most_max_idle_are_kept():
    first = await in_worker_thread(threading.get_ident)
    assert await in_worker_thread(threading.get_ident) == first

    many = iothread.MAX_IDLE + 3
    go = threading.Event()
    idents = set()

    def blocked():
        go.wait(10)
        idents.add(threading.get_ident())

    before = _io_threads()                      # the idle ones, at most MAX_IDLE
    async with trio.open_nursery() as n:
        for _ in range(many):
            n.start_soon(in_worker_thread, blocked)
        await trio.sleep(0.1)
        assert _io_threads() >= many
        go.set()
    assert len(idents) == many
    assert len(iothread._idle) == iothread.MAX_IDLE
    with trio.fail_after(5):
        while _io_threads() > max(before, iothread.MAX_IDLE):
            await trio.sleep(0.01)


async def test_a_cancelled_caller_gets_the_outcome_and_then_the_cancellation():
    """Never abandoned: the call returns what the job returned, and the
    cancellation arrives at the caller's next checkpoint."""
    started, release = threading.Event(), threading.Event()
    seen = []

    def job():
        started.set()
        release.wait(5)
        return "done"

    async def caller(scope):
        with scope:
            seen.append(await in_worker_thread(job))
            await trio.sleep(0)
            seen.append("not cancelled")

    scope = trio.CancelScope()
    async with trio.open_nursery() as n:
        n.start_soon(caller, scope)
        await trio.to_thread.run_sync(started.wait)
        scope.cancel()
        await trio.sleep(0.05)
        assert seen == []                       # still waiting for its job
        release.set()
    assert seen == ["done"] and scope.cancelled_caught


def test_a_forked_child_does_not_wait_for_its_parents_threads():
    """Threads do not survive fork: a child that reused the parent's idle
    workers would wait forever for a job nobody runs (delafs mount forks)."""
    trio.run(in_worker_thread, int)
    assert iothread._idle
    pid = os.fork()
    if pid == 0:                                # the child: exit 0 only if it works
        signal.alarm(10)
        try:
            ok = trio.run(in_worker_thread, divmod, 7, 2) == (3, 1)
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_an_interrupted_main_task_waits_for_its_job_then_raises():
    """Ctrl-C in an in-process run (tools, tests) raises KeyboardInterrupt
    out of the wait, but only once the system call is over."""
    started, release = threading.Event(), threading.Event()
    done = []

    def job():
        started.set()
        release.wait(5)
        done.append(True)

    def interrupt():
        started.wait(5)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        done.append("released")
        release.set()

    threading.Thread(target=interrupt).start()
    with pytest.raises(KeyboardInterrupt):
        trio.run(in_worker_thread, job)
    assert done == ["released", True]


def test_ctrl_c_at_any_moment_neither_hangs_nor_leaks_a_worker():
    """A SIGINT landing anywhere in a stream of trips, including just after
    the completion byte was read, interrupts the run promptly (a second one
    is never needed) and leaves no thread behind."""
    random.seed(31)
    threads = threading.active_count()
    hung = 0

    async def trips():
        while True:
            await in_worker_thread(int)

    for _ in range(40):
        over = threading.Event()

        def interrupt():
            nonlocal hung
            time.sleep(random.uniform(0.002, 0.01))
            os.kill(os.getpid(), signal.SIGINT)
            if not over.wait(1.0):
                hung += 1
                while not over.wait(0.2):
                    os.kill(os.getpid(), signal.SIGINT)

        t = threading.Thread(target=interrupt)
        t.start()
        with pytest.raises(KeyboardInterrupt):
            trio.run(trips)
        over.set()
        t.join()
    assert hung == 0
    assert threading.active_count() <= threads + iothread.MAX_IDLE

