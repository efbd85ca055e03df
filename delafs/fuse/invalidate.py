"""Dropping the kernel's cached pages of a file after a direct write.

A direct write bypasses the kernel's page cache.  For a synchronous one
the kernel invalidates the written range itself once the WRITE returns
(kiocb_invalidate_post_direct_write); for an asynchronous one FUSE does
not, so pages a buffered reader cached while it was in flight would stay
stale.  The daemon asks the kernel to drop them (FUSE_NOTIFY_INVAL_INODE)
before it answers such a write, best effort, as the kernel's own
post-write invalidation is.

The kernel's invalidation locks every cached page of the file, waits for
pages under writeback and launders dirty mmap pages with WRITEs of its
own, and each of those waits for the daemon to answer requests, possibly
the very WRITE being answered.  So:

- it runs in a thread, and a write's reply waits for it at most
  ``INVALIDATE_WAIT``: past that the write is answered and the
  invalidation completes after it (counted as late).  That wait must stay
  short.  Under xfstests generic/095's mix of mmap, buffered and direct
  I/O on two files, half the invalidations are slow, and a slow one lasts
  about as long as the wait, whatever the wait: they wait in the kernel
  for folio locks and for laundering WRITEs, behind requests that are
  themselves waiting out INVALIDATE_WAIT.  The mix took 67-75 s with
  100 ms, 17 s with 20 ms, 10 s with 10 ms, 6.5 s with 5 ms (fuse2fs,
  which does not invalidate: 1 s).  Raising the connection's max_background
  from 12 to 200 changed nothing, so the kernel's background-request
  limit is not what they queue behind;
- one invalidation of an inode runs at a time, and every write that
  arrives while it runs shares the next one (which starts after them all
  landed), instead of a thread each fighting the others for the same
  pages' locks.  So the threads are at most one per inode with direct
  writes in flight.

pyfuse3 can only invalidate a whole inode.  A ranged FUSE_NOTIFY_INVAL_INODE
(written to /dev/fuse beside pyfuse3) would buy little: the kernel drops a
notified inode's cached attributes whatever the range
(fuse_reverse_inval_inode), and with auto_inval_data, which libfuse turns
on and pyfuse3 cannot turn off, the next attribute refresh sees the mtime
the write moved and drops every cached page of the file anyway.
"""

from __future__ import annotations

import errno
import functools
import logging

import pyfuse3
import trio

log = logging.getLogger("delafs")

#: How long a direct WRITE's reply waits for the kernel to drop its cached
#: pages (seconds).  An uncontended invalidation takes ~0.1 ms.
INVALIDATE_WAIT = 0.01


def invalidate_inode(ino: int) -> None:
    """In a worker thread: drop the kernel's cached pages and attributes of
    ``ino``.  ENOENT: the kernel no longer knows the inode."""
    try:
        pyfuse3.invalidate_inode(ino)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warning("invalidating the kernel's cache of inode %d: %s", ino, e)


class KernelCacheInvalidator:
    """Per inode, at most one invalidation running and one waiting to start.

    Attributes:
      running   inodes whose invalidation is in a thread now
      next      ino -> the Event of the invalidation that starts once the
                running one ends (every write that arrived meanwhile waits
                for it)
      stats     requests, runs (threads started), late (replies that did not
                wait for the end)
    """

    def __init__(self, invalidate=invalidate_inode):
        self._invalidate = invalidate
        self.running: set[int] = set()
        self.next: dict[int, trio.Event] = {}
        self.stats = {"invalidations": 0, "invalidations_run": 0, "invalidations_late": 0}

    async def after_direct_write(self, ino: int) -> None:
        """Have the kernel drop ``ino``'s cached pages, waiting at most
        INVALIDATE_WAIT for it."""
        self.stats["invalidations"] += 1
        done = self.next.get(ino)
        if done is None:
            done = self.next[ino] = trio.Event()
            if ino not in self.running:
                self._start(ino)
        with trio.move_on_after(INVALIDATE_WAIT) as wait:
            await done.wait()
        if wait.cancelled_caught:
            self.stats["invalidations_late"] += 1

    def _start(self, ino: int) -> None:
        done = self.next.pop(ino)
        self.running.add(ino)
        self.stats["invalidations_run"] += 1
        token = trio.lowlevel.current_trio_token()

        def deliver(_outcome) -> None:
            # In the thread.  After the event loop ended (unmount) nothing
            # waits any more.
            try:
                token.run_sync_soon(self._finished, ino, done)
            except trio.RunFinishedError:
                pass

        # A thread of its own, not one of the device's: one stuck in the
        # kernel must never hold a thread the daemon's I/O needs.
        trio.lowlevel.start_thread_soon(functools.partial(self._invalidate, ino), deliver)

    def _finished(self, ino: int, done: trio.Event) -> None:
        self.running.discard(ino)
        done.set()
        if ino in self.next:
            self._start(ino)
