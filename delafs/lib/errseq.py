"""Writeback error reporting with errseq_t semantics (lib/errseq.c): an
error is reported by fsync once to every open file description that was
open when it happened."""

from __future__ import annotations


class ErrSeq:
    """Writeback error reporting with errseq_t semantics (lib/errseq.c's idea).

    A sequence of error events: each ``set`` records an errno and moves the
    counter; an open file description holds an ErrSeqCursor, and
    ``check_and_advance`` (at fsync) reports to it the newest errno if any
    error happened since it last looked -- once per description, however
    many errors there were.

    Two deliberate differences from the kernel.  ``sample`` (at open)
    returns the current position, so errors from before the open are never
    reported to that description; errseq_sample instead hands out a cookie
    *before* an error nobody has seen yet, so the next opener inherits it
    (delafs reports an error only to descriptions that were open when it
    happened -- a later opener did not write the lost data).  And every
    error moves the counter: the kernel collapses errors nobody has seen
    into one event to save counter bits, which is only sound with its
    sample rule (a description opened between two unseen errors would
    otherwise miss the second).

    Attributes: _seq (event counter, 0 = never an error), _errno (newest
    errno), _seen (some description has reported the newest event; for
    statistics).  No lock: every method is synchronous.
    """

    __slots__ = ("_seq", "_errno", "_seen")

    def __init__(self):
        self._seq = 0
        self._errno = 0
        self._seen = False

    def set(self, err: int) -> None:
        """Record a writeback error (an errno, either sign; 0 is ignored)."""
        if not err:
            return
        self._seq += 1
        self._errno = abs(err)
        self._seen = False

    def sample(self) -> int:
        """Cookie for a new file description: errors so far are not its."""
        return self._seq

    def sample_unreported(self) -> int:
        """errseq_sample's own rule, for syncfs: a cookie from before the
        newest error if no check has reported it yet, so that error is
        reported by the next check_and_advance."""
        return self._seq - 1 if self._seq and not self._seen else self._seq

    def check(self, cursor: "ErrSeqCursor") -> int:
        """The errno of an error since the cursor's cookie, or 0; no advance."""
        return self._errno if cursor.cookie != self._seq else 0

    def check_and_advance(self, cursor: "ErrSeqCursor") -> int:
        """At fsync: the errno of an error since the cursor's cookie (0 if
        none), and advance the cursor so it is reported once."""
        if cursor.cookie == self._seq:
            return 0
        self._seen = True
        cursor.cookie = self._seq
        return self._errno

    @property
    def errno(self) -> int:
        """The newest recorded errno (0 if none), regardless of cursors."""
        return self._errno

    @property
    def seen(self) -> bool:
        return self._seen

    def __repr__(self) -> str:
        return f"<ErrSeq seq={self._seq} errno={self._errno} seen={self._seen}>"


class ErrSeqCursor:
    """One per open file description: the ErrSeq cookie sampled at open."""

    __slots__ = ("cookie",)

    def __init__(self, errseq: ErrSeq, *, unreported: bool = False):
        self.cookie = errseq.sample_unreported() if unreported else errseq.sample()
