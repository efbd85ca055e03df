"""Trace events named like the kernel's iomap tracepoints.

Off by default and cheap when off: call sites test ``TRACE.on`` before
building any arguments::

    if TRACE.on:
        TRACE.emit("iomap_iter", ino=ino, pos=pos, length=length)

When on, events go to a bounded ring (``TRACE.events``) and, optionally, to
a callback (tests, ``delafs trace``).  Event names used by the engine:
iomap_iter, iomap_iter_dstmap, iomap_write_begin, iomap_write_end,
iomap_delalloc_punch, iomap_delalloc_scan, iomap_page_mkwrite,
iomap_read_folio, iomap_readahead, iomap_writepages, iomap_writeback_range,
iomap_add_to_ioend, iomap_ioend_submit, iomap_ioend_completion,
iomap_invalidate_folio, iomap_zero_range, iomap_truncate.
"""

from __future__ import annotations

import collections
from typing import Callable


class Tracer:
    def __init__(self, capacity: int = 65536):
        self.on = False
        self.events: collections.deque = collections.deque(maxlen=capacity)
        self.sink: Callable[[str, dict], None] | None = None
        self.counts: collections.Counter = collections.Counter()

    def enable(self, sink: Callable[[str, dict], None] | None = None) -> None:
        self.sink = sink
        self.on = True

    def disable(self) -> None:
        self.on = False
        self.sink = None

    def emit(self, name: str, **fields) -> None:
        self.counts[name] += 1
        self.events.append((name, fields))
        if self.sink is not None:
            self.sink(name, fields)

    def clear(self) -> None:
        self.events.clear()
        self.counts.clear()


TRACE = Tracer()
