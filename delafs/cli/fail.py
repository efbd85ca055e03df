"""How every delafs command reports an error: one line on stderr,
``delafs COMMAND: reason``, and a non-zero exit status (1 unless the
command documents others, e.g. fsck's 8)."""

from __future__ import annotations

import sys


def fail(cmd: str, msg: str, code: int = 1) -> int:
    # Messages relayed from elsewhere (mount(8), the daemon) may span lines;
    # a second line without the prefix would break scripts that grep for it.
    msg = "; ".join(line.strip() for line in msg.splitlines() if line.strip())
    print(f"delafs {cmd}: {msg}", file=sys.stderr)
    return code
