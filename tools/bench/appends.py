#!/usr/bin/env python3
"""The appends job (xfstests generic/069's pattern): one process opens a
file with O_APPEND and makes 4-byte writes for SECONDS, then fsyncs and
checks the file's size.  Prints JSON: writes, seconds (the writes only),
fsync_seconds.  Run by the benchmark runner as a child with a timeout.

    python tools/bench/appends.py FILE SECONDS
"""

import json
import os
import sys
import time


def main() -> int:
    path, seconds = sys.argv[1], float(sys.argv[2])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    data = b"abcd"
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    try:
        # Check the clock every 64 writes: a 4-byte write can take a microsecond.
        while True:
            for _ in range(64):
                os.write(fd, data)
            n += 64
            if time.perf_counter() >= deadline:
                break
        t1 = time.perf_counter()
        os.fsync(fd)
        t2 = time.perf_counter()
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size != 4 * n:
        print(f"appends: {n} writes of 4 bytes but the file has {size} bytes", file=sys.stderr)
        return 1
    print(json.dumps({"writes": n, "seconds": t1 - t0, "fsync_seconds": t2 - t1}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
