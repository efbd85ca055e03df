"""Round trip of a no-op to a worker thread and back, three ways.

    .venv/bin/python tools/iothread_bench.py [--calls N] [--rounds R]

trio.to_thread.run_sync; trio.lowlevel.start_thread_soon with the result
handed back through TrioToken.run_sync_soon (what delafs did before
block/iothread.py); and delafs.block.iothread.in_worker_thread.  The three
alternate within each round, so a noisy host hits them alike; the median of
the rounds is printed.  Every small device request pays one such trip.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from delafs.block.iothread import in_worker_thread  # noqa: E402


async def via_entry_queue(fn, *args):
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result):
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(functools.partial(fn, *args), deliver)
    return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)


WAYS = {
    "trio.to_thread.run_sync": trio.to_thread.run_sync,
    "start_thread_soon + run_sync_soon": via_entry_queue,
    "iothread.in_worker_thread": in_worker_thread,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="trips per way and round (default 2000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.rounds < 1:
        ap.error("--calls and --rounds must be at least 1")
    results: dict[str, list[float]] = {name: [] for name in WAYS}

    async def run():
        for way in WAYS.values():                   # warm the thread caches
            for _ in range(50):
                assert await way(int, 7) == 7
        for _ in range(args.rounds):
            for name, way in WAYS.items():
                t = time.perf_counter()
                for _ in range(args.calls):
                    await way(int)
                results[name].append((time.perf_counter() - t) / args.calls * 1e6)

    trio.run(run)
    for name, us in results.items():
        print(f"{name:36s} median {statistics.median(us):7.1f} us  "
              f"(min {min(us):.1f}, max {max(us):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
