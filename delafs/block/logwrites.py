"""A log of every completed device request, kept in a file as it happens:
Linux's dm-log-writes target in spirit, for crash testing a running daemon.

``delafs mount -o log_writes=PATH`` attaches a :class:`WriteLog` to the
image.  Each write (with its data), flush and discard is appended to PATH
once the device has completed it, with one write(2) per record: what the
daemon logged survives its SIGKILL, and a record a kill cut short ends
the log.  A test (or a person) adds *marks* through the control file
(``mark LABEL``) at the moments a program got a promise, an fsync or a
commit returned; :func:`read_write_log` gives the events back in the form
:mod:`delafs.testing.crashsim` replays, with the position of every mark, so each
crash image can be checked against the promises made before its last flush.
xfstests does the same with dm-log-writes and ``_log_writes_mark``.

The log must start with the image: mount a copy of the base image that
``read_write_log``'s events are replayed on.
"""

from __future__ import annotations

import os
import struct

MAGIC = b"delafs-log-writes 1\n"
_REC = struct.Struct("<BQQ")            # kind, block or 0, length or count
_WRITE, _FLUSH, _DISCARD, _MARK = 1, 2, 3, 4


class _Appender:
    """The ``events`` list of a Recorder, written through to the file."""

    def __init__(self, fd: int):
        self.fd = fd
        self.count = 0

    def append(self, ev: tuple) -> None:
        kind = ev[0]
        if kind == "write":
            rec = _REC.pack(_WRITE, ev[1], len(ev[2])) + ev[2]
        elif kind == "flush":
            rec = _REC.pack(_FLUSH, 0, 0)
        elif kind == "discard":
            rec = _REC.pack(_DISCARD, ev[1], ev[2])
        else:
            raise ValueError(f"unknown device event {kind!r}")
        self._write(rec)
        self.count += 1

    def _write(self, rec: bytes) -> None:
        # O_APPEND makes one write(2) atomic against the device's worker
        # threads; a short write would leave a torn record, so say so.
        n = os.write(self.fd, rec)
        if n != len(rec):
            raise OSError(f"write log: short write ({n} of {len(rec)} bytes)")

    def __len__(self) -> int:
        return self.count


class WriteLog:
    """A Recorder (``dev.recorder = WriteLog(path)``) that keeps its events
    in ``path`` instead of memory."""

    def __init__(self, path: str):
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.write(fd, MAGIC)
        self.events = _Appender(fd)

    def mark(self, label: str) -> int:
        """Record ``label`` after every event completed so far; returns the
        number of events before it."""
        data = label.encode()
        self.events._write(_REC.pack(_MARK, 0, len(data)) + data)
        return self.events.count

    def close(self) -> None:
        if self.events.fd >= 0:
            os.close(self.events.fd)
            self.events.fd = -1


def read_write_log(path: str) -> tuple[list[tuple], list[tuple[int, str]]]:
    """The events of a log (as :class:`~delafs.block.recorder.Recorder` holds
    them) and its marks as ``(events before the mark, label)``.  A record
    cut off at the end of the file (the daemon was killed inside a write)
    ends the log; anything else that does not parse is an error."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path} is not a delafs write log")
    events: list[tuple] = []
    marks: list[tuple[int, str]] = []
    off = len(MAGIC)
    while off + _REC.size <= len(data):
        kind, a, n = _REC.unpack_from(data, off)
        off += _REC.size
        if kind == _WRITE:
            if off + n > len(data):
                break
            events.append(("write", a, data[off:off + n]))
            off += n
        elif kind == _FLUSH:
            events.append(("flush",))
        elif kind == _DISCARD:
            events.append(("discard", a, n))
        elif kind == _MARK:
            if off + n > len(data):
                break
            marks.append((len(events), data[off:off + n].decode()))
            off += n
        else:
            raise ValueError(f"{path}: bad record kind {kind} at byte {off - _REC.size}")
    return events, marks
