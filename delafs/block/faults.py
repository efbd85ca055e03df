"""Injected device errors: a request fails with a chosen errno before any
I/O is issued, so a failed request never changes the image (the test hook
of every device)."""

from __future__ import annotations

import errno
import itertools
import threading
from dataclasses import dataclass

from ..lib.errors import FsError

FAULT_OPS = frozenset({"read", "write", "flush", "discard"})


@dataclass
class _Fault:
    op: str
    start: int
    end: int | None  # exclusive; None = to the end of the device
    error: int
    remaining: int | None  # None = fires forever


class FaultTable:
    """Requests that must fail, keyed by operation and block range.

    A request fails if its operation matches a rule and its block range
    overlaps the rule's ``[start, start+count)`` (for ``flush`` the range is
    ignored: a flush has none).  The first matching rule, in insertion order,
    fires.  The failure is raised before the device is touched, the way the
    kernel's ``should_fail`` hooks fail a bio before submission, so a failed
    write leaves the old contents in place.

    Attributes:
        fired: how many requests have been failed so far.

    Rules are added from the trio thread while worker threads check them, so a
    private lock guards the rule dict and ``fired``.  ``__len__`` reads the
    dict without it: the hot path only needs "is it empty", and a request that
    races with ``add`` may legitimately go either way.
    """

    def __init__(self) -> None:
        self._rules: dict[int, _Fault] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.fired = 0

    def __len__(self) -> int:
        return len(self._rules)

    def add(
        self,
        op: str,
        start: int = 0,
        count: int | None = None,
        *,
        error: int = errno.EIO,
        times: int | None = None,
    ) -> int:
        """Make ``op`` requests overlapping the range fail with ``error``.

        ``count=None`` covers everything from ``start`` to the end of the
        device; ``times=None`` keeps the rule forever, otherwise it is removed
        after firing ``times`` times.  Returns an id for :meth:`remove`.
        """
        if op not in FAULT_OPS:
            raise ValueError(f"unknown fault op {op!r}; expected one of {sorted(FAULT_OPS)}")
        if start < 0 or (count is not None and count <= 0):
            raise ValueError(f"bad fault range start={start} count={count}")
        if times is not None and times <= 0:
            raise ValueError(f"times must be positive or None, got {times}")
        end = None if count is None else start + count
        with self._lock:
            fid = next(self._ids)
            self._rules[fid] = _Fault(op, start, end, error, times)
        return fid

    def remove(self, fid: int) -> None:
        """Drop one rule; a rule that already expired is silently ignored."""
        with self._lock:
            self._rules.pop(fid, None)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def check(self, op: str, blk: int, count: int) -> None:
        """Raise the injected FsError if a rule matches this request."""
        with self._lock:
            for fid, rule in self._rules.items():
                if rule.op != op:
                    continue
                if op == "flush":
                    where = ""
                else:
                    first = max(blk, rule.start)
                    if count <= 0 or first >= blk + count or (
                        rule.end is not None and first >= rule.end
                    ):
                        continue
                    where = f" at block {first}"
                self.fired += 1
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        del self._rules[fid]
                name = errno.errorcode.get(rule.error, str(rule.error))
                raise FsError(rule.error, f"injected {op} error ({name}){where}")
