"""How every delafs command reports an error: one line on stderr,
``delafs COMMAND: reason``, and a non-zero exit status (1 unless the
command documents others, e.g. fsck's 8)."""

from __future__ import annotations

import sys


def fail(cmd: str, msg: str, code: int = 1) -> int:
    print(f"delafs {cmd}: {msg}", file=sys.stderr)
    return code
