"""Worker threads for the block layer's blocking system calls.

pread, pwrite and fdatasync block, and the event loop that serves every FUSE
request must not: each device request runs in a worker thread while the task
that made it waits.  On a small request the trip there and back costs more
than the system call, so the trip is built for latency (round trip of a no-op
on a 2-vCPU VM, medians, ``python tools/iothread_bench.py``):
trio.to_thread.run_sync 186-203 us; trio.lowlevel.start_thread_soon with the
result handed back through ``TrioToken.run_sync_soon`` 101-115 us, because
that wakes the loop, runs trio's entry-queue task, and only then reschedules
the waiter; here 65-87 us.  Each
worker signals completion on its own pipe and the waiting task sleeps in
``wait_readable`` on it, so the completion is one epoll event that wakes that
task directly.

A request is never abandoned: a cancelled caller still waits for its system
call (a write must not be half-way onto the image when its caller returns),
and the cancellation is delivered at the caller's next checkpoint.  The FUSE
request queue and writeback bound how many workers exist; idle ones are kept
up to ``MAX_IDLE`` and reused most-recently-idle first.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

import trio

MAX_IDLE = 8


class _Worker:
    """One thread, a lock it waits on for a job, and a pipe it signals on."""

    __slots__ = ("_rfd", "_wfd", "_go", "_job", "_ok", "_value", "done")

    def __init__(self) -> None:
        self._rfd, self._wfd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._rfd, False)
        self._go = threading.Lock()
        self._go.acquire()
        self._job: Callable | None = None
        self._ok = True
        self._value = None
        self.done = True                    # no job given, or its completion read
        try:
            threading.Thread(target=self._serve, name="delafs-io", daemon=True).start()
        except BaseException:
            self.close()
            raise

    def _serve(self) -> None:
        while True:
            self._go.acquire()
            job, self._job = self._job, None
            if job is None:
                break
            try:
                self._value, self._ok = job(), True
            except BaseException as e:      # handed to the waiting task
                self._value, self._ok = e, False
            del job
            os.write(self._wfd, b"\0")
        self.close()

    def close(self) -> None:
        os.close(self._rfd)
        os.close(self._wfd)

    def retire(self) -> None:
        self._go.release()                  # with no job: the thread ends

    @trio.lowlevel.enable_ki_protection
    async def run(self, job: Callable) -> tuple[bool, object]:
        """Run ``job`` here and wait for it: (True, its result) or (False,
        its exception).  Protected from KeyboardInterrupt between bytecodes,
        so one can only arrive at a wait, never between reading the
        completion byte and ``done``."""
        self.done = False
        self._job = job
        self._go.release()
        interrupt = None
        try:
            await self._wait_done()
        except trio.Cancelled:
            # Wait on and hand the outcome back: the caller's cancel scope
            # stays cancelled, so its next checkpoint raises.  Shielding
            # every wait instead would cost ~20 us a trip.
            pass
        except KeyboardInterrupt as e:      # in trio's main task: after the job
            interrupt = e
        if not self.done:
            with trio.CancelScope(shield=True):
                while not self.done:
                    try:
                        await self._wait_done()
                    except KeyboardInterrupt as e:
                        interrupt = interrupt or e
        outcome = self._ok, self._value
        self._value = None
        if interrupt is not None:
            raise interrupt
        return outcome

    async def _wait_done(self) -> None:
        try:
            os.read(self._rfd, 1)
        except BlockingIOError:
            pass
        else:
            self.done = True
            # Still a schedule point, and a cancel point: a Ctrl-C pending
            # for trio's main task is delivered at one, so a stream of trips
            # that never wait cannot hold it off (run() handles both).
            await trio.lowlevel.checkpoint()
            return
        while True:
            await trio.lowlevel.wait_readable(self._rfd)
            try:
                os.read(self._rfd, 1)
            except BlockingIOError:
                continue
            self.done = True
            return


_idle: list[_Worker] = []


def _forget_after_fork() -> None:
    # The threads did not survive the fork; their pipes are the child's own.
    for w in _idle:
        w.close()
    _idle.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


@trio.lowlevel.enable_ki_protection
async def in_worker_thread(fn: Callable, *args):
    """``await fn(*args)`` in a worker thread: the result, or its exception.
    Never abandoned (see the module's docstring)."""
    try:
        worker = _idle.pop()
    except IndexError:
        worker = _Worker()
    try:
        ok, value = await worker.run(lambda: fn(*args))
    finally:
        # A worker whose byte was not read is still busy: never reused.
        if worker.done:
            if len(_idle) < MAX_IDLE:
                _idle.append(worker)
            else:
                worker.retire()
    if ok:
        return value
    try:
        raise value
    finally:
        del value               # the traceback holds this frame: no cycle through it
