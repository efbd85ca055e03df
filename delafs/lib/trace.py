"""Trace events named like the kernel's iomap and XFS tracepoints.

Off by default and cheap when off: call sites test ``TRACE.on`` before
building any arguments::

    if TRACE.on:
        TRACE.emit("iomap_iter", ino=ino, pos=pos, length=length)

Two kinds of listener turn it on:

- ``enable(sink)``: every event goes to a bounded ring (``TRACE.events``)
  and to ``sink`` (the golden-log tests).
- ``subscribe(Subscription(...))``: a filtered, bounded queue per reader
  (``delafs trace``).  A reader that does not keep up loses events, counted
  in its ``dropped``, and never slows the engine beyond the append: like a
  perf ring buffer, not like a pipe.

Every event name the engine emits is in :data:`EVENTS`.
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Collection

#: name -> where it fires.  Call sites must use these names (a test checks).
EVENTS = {
    "iomap_iter": "one mapping of a buffered write (iomap_begin's answer)",
    "iomap_write_begin": "a folio locked and made ready for a copy",
    "iomap_write_end": "the copy into a folio done (copied bytes; 0 = short)",
    "iomap_delalloc_punch": "stale delalloc punched after a short or failed write",
    "xfs_delalloc_punch": "the filesystem's punch of one delalloc range",
    "iomap_page_mkwrite": "a shared-mapping write fault made a folio dirty",
    "iomap_read_folio": "a folio read from the image",
    "iomap_readahead": "a readahead batch",
    "iomap_zero_range": "a range zeroed in the cache (truncate, extend)",
    "iomap_truncate": "the page cache cut to a new size",
    "iomap_writepages": "a writeback pass over one inode",
    "iomap_writeback_range": "one dirty range mapped for writeback",
    "xfs_map_blocks_alloc": "delalloc converted to UNWRITTEN blocks at writeback",
    "iomap_ioend_submit": "an ioend sent to the device",
    "iomap_ioend_completion": "an ioend completed",
    "xfs_unwritten_convert": "UNWRITTEN converted to WRITTEN at ioend completion",
    "errortag": "an injected fault fired",
}


class Subscription:
    """One reader's view of the stream: events passing its filters, at most
    ``capacity`` waiting; the rest counted in ``dropped``."""

    def __init__(self, events: Collection[str] | None = None, ino: int | None = None,
                 capacity: int = 8192):
        self.events = frozenset(events) if events else None
        self.ino = ino
        self.capacity = capacity
        self.queue: collections.deque = collections.deque()
        self.dropped = 0

    def offer(self, name: str, fields: dict) -> None:
        if self.events is not None and name not in self.events:
            return
        if self.ino is not None and fields.get("ino") != self.ino:
            return
        if len(self.queue) >= self.capacity:
            self.dropped += 1
            return
        self.queue.append((time.monotonic(), name, fields))

    def drain(self) -> tuple[list, int]:
        """The events waiting and the number dropped since the last drain."""
        out = list(self.queue)
        self.queue.clear()
        dropped, self.dropped = self.dropped, 0
        return out, dropped


class Tracer:
    def __init__(self, capacity: int = 65536):
        self.on = False
        self.recording = False
        self.events: collections.deque = collections.deque(maxlen=capacity)
        self.sink: Callable[[str, dict], None] | None = None
        self.counts: collections.Counter = collections.Counter()
        self.subscribers: list[Subscription] = []

    def _update(self) -> None:
        self.on = self.recording or bool(self.subscribers)

    def enable(self, sink: Callable[[str, dict], None] | None = None) -> None:
        self.sink = sink
        self.recording = True
        self._update()

    def disable(self) -> None:
        self.recording = False
        self.sink = None
        self._update()

    def subscribe(self, sub: Subscription) -> None:
        self.subscribers.append(sub)
        self._update()

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)
        self._update()

    def emit(self, name: str, **fields) -> None:
        if self.recording:
            self.counts[name] += 1
            self.events.append((name, fields))
            if self.sink is not None:
                self.sink(name, fields)
        for sub in self.subscribers:
            sub.offer(name, fields)

    def clear(self) -> None:
        self.events.clear()
        self.counts.clear()


TRACE = Tracer()
