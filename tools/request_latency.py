"""Per-call latency of the system calls behind a small write, on any directory.

    python tools/request_latency.py DIR [--calls N]

On a FUSE mount each call below is one request round trip or more: a 4 KiB
pwrite(2) is GETXATTR(security.capability) then WRITE, so the pwrite figure
minus the getxattr one is what a WRITE costs.  Run it on delafs and on the
Python floor (tools/bench/floor.py) to see what the engine adds per request:
    python tools/request_latency.py /mnt/delafs
    python tools/request_latency.py /mnt/floor
It creates DIR/request-latency.tmp (1 MiB, fsynced first) and removes it.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from delafs.cli.fail import SIGPIPE_STATUS, reader_gone  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="a directory on the filesystem to measure")
    ap.add_argument("--calls", type=int, default=4000, help="calls per measurement (default 4000)")
    args = ap.parse_args(argv)
    if args.calls < 1:
        ap.error("--calls must be at least 1")
    if not os.path.isdir(args.dir):
        ap.error(f"{args.dir}: not a directory")
    path = os.path.join(args.dir, "request-latency.tmp")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, bytes(1 << 20), 0)
        os.fsync(fd)
        block = b"y" * 4096
        rng = random.Random(1)

        def getxattr():
            try:
                os.getxattr(path, "security.capability")
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                    raise

        calls = {
            "getxattr(security.capability)": getxattr,
            "fstat": lambda: os.fstat(fd),
            "pwrite 4 KiB, same offset": lambda: os.pwrite(fd, block, 8192),
            "pwrite 4 KiB, random offset": lambda: os.pwrite(fd, block, rng.randrange(256) * 4096),
            "pread 4 KiB, cached": lambda: os.pread(fd, 4096, 8192),
            "stat": lambda: os.stat(path),
        }
        for name, call in calls.items():
            for _ in range(min(200, args.calls)):
                call()
            t = time.perf_counter()
            for _ in range(args.calls):
                call()
            print(f"{name:30s} {(time.perf_counter() - t) / args.calls * 1e6:8.1f} us", flush=True)
    finally:
        os.close(fd)
        os.unlink(path)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        reader_gone()       # end quietly, as the delafs command does
        sys.exit(SIGPIPE_STATUS)
