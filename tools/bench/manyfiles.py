#!/usr/bin/env python3
"""One phase of the many-files run of ``--scale``: create (empty files,
opened with O_CREAT and closed), stat or unlink N files f0000000... in DIR.
Prints JSON: files, seconds.  Run by the runner as a child with a timeout.

    python tools/bench/manyfiles.py create|stat|unlink DIR N
"""

import json
import os
import sys
import time


def main() -> int:
    phase, d, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    names = [os.path.join(d, f"f{i:07d}") for i in range(n)]
    t0 = time.perf_counter()
    if phase == "create":
        for p in names:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    elif phase == "stat":
        for p in names:
            os.stat(p)
    elif phase == "unlink":
        for p in names:
            os.unlink(p)
    else:
        print(f"unknown phase {phase}", file=sys.stderr)
        return 2
    print(json.dumps({"files": n, "seconds": time.perf_counter() - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
