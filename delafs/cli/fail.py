"""How every delafs command reports an error: one line on stderr,
``delafs COMMAND: reason``, and a non-zero exit status (1 unless the
command documents others, e.g. fsck's 8); and how one ends quietly when
the reader of its output has gone."""

from __future__ import annotations

import os
import sys

#: The exit status of a process killed by SIGPIPE, as a shell reports it.
SIGPIPE_STATUS = 128 + 13


def fail(cmd: str, msg: str, code: int = 1) -> int:
    # Messages relayed from elsewhere (mount(8), the daemon) may span lines;
    # a second line without the prefix would break scripts that grep for it.
    msg = "; ".join(line.strip() for line in msg.splitlines() if line.strip())
    print(f"delafs {cmd}: {msg}", file=sys.stderr)
    return code


def reader_gone() -> None:
    """The reader of stdout went away (``| head``, a closed pager): point
    stdout at /dev/null, so that the flush at exit does not raise again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
