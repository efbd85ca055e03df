"""pyfuse3's session loop, given delafs's own lock.

pyfuse3.main() serves /dev/fuse from a pool of trio tasks that take turns
reading it: each takes a lock, waits for the fd to become readable, reads
one request, passes the lock on and handles the request.  The lock is a
trio.Lock, whose uncontended acquire still goes through the scheduler (a
cancel-shielded checkpoint) and registers its owner for breakage, so every
request paid a scheduler pass and that bookkeeping before it was read.

pyfuse3 reaches trio through its module global ``trio`` at each use; its
asyncio mode (pyfuse3.asyncio.enable) replaces that global with a stand-in
module, and so does :func:`install`: a module that is trio in everything
but ``Lock``, which makes a :class:`~delafs.lib.locks.Mutex` (FIFO,
hand-off, no yield when free, KI-protected like trio's).  pyfuse3 3.2 to
3.5 (the versions read) use that lock only in ``async with``, held by one
task at a time, never recursively and never with another lock held, and
look nothing else up on trio but ``lowlevel``, ``open_nursery``,
``from_thread`` and ``ClosedResourceError``.  Up to 3.4 the lock is made
by pyfuse3.init(), from 3.5 on a reader's first turn: install first.

What a trio.Lock has and this does not: if its holder ended without
releasing it, the waiters got BrokenResourceError and pyfuse3.main()
failed; with a Mutex they would wait.  A holder can only end that way on
a KeyboardInterrupt between the lock's enter and the ``try`` that pyfuse3
compiles around it, and the daemon takes signals through a receiver.

Measured in process on pyfuse3's pattern (three readers taking turns
at a pipe, one byte a request): ~17,000 fewer instructions a request
(cachegrind) and 39-49 -> 33-35 us a turn.  On the mount that is a few
per cent of a request, below this host's noise in ten alternating pairs
of a fixed-count 4 KiB random write.  The benchmark floor
(tools/bench/floor.py) stays bare pyfuse3.
"""

from __future__ import annotations

import types

import pyfuse3
import trio

from ..lib.locks import Mutex

__all__ = ["install", "installed", "locks_made"]

_made = 0


def _lock() -> Mutex:
    global _made
    _made += 1
    return Mutex()


class _TrioForPyfuse3(types.ModuleType):
    """trio, except ``Lock``.  What pyfuse3 looks up once a request is a
    plain attribute; anything else falls through to trio."""

    Lock = staticmethod(_lock)
    lowlevel = trio.lowlevel
    open_nursery = staticmethod(trio.open_nursery)
    from_thread = trio.from_thread
    ClosedResourceError = trio.ClosedResourceError

    def __getattr__(self, name: str):
        return getattr(trio, name)


_module = _TrioForPyfuse3("delafs.fuse.loop.trio", __doc__)


def install() -> bool:
    """Give pyfuse3's session loop a :class:`Mutex` for its read lock;
    call before pyfuse3.init().  Leaves pyfuse3 alone (False) unless its
    ``trio`` is trio itself: in asyncio mode, or under a pyfuse3 that has
    no such global."""
    current = getattr(pyfuse3, "trio", None)
    if current is _module:
        return True
    if current is not trio:
        return False
    pyfuse3.trio = _module
    return True


def installed() -> bool:
    return getattr(pyfuse3, "trio", None) is _module


def locks_made() -> int:
    """How many locks pyfuse3 has made through :func:`install`'s module:
    one per session once it has served (the daemon's statistics say
    whether its loop runs on a Mutex)."""
    return _made
