"""Giving freed memory back to the system.

The page cache frees and allocates folio buffers of mixed sizes all the
time, among metadata images, arrays and lists.  glibc's malloc keeps the
holes this leaves inside its heap and by itself returns only the top of it,
so once the cache has turned over a few times the daemon's RSS sits tens of
MiB above what it uses: 62 MiB in the one-million-write sparse job, at 528
MiB RSS.  ``malloc_trim(0)`` also releases the whole free pages in the
middle of the heap.  It takes 15-50 ms on a 400 MiB heap, so the flusher
calls it from a worker thread, and only after the cache has evicted
``TRIM_AFTER`` bytes since the previous call.

There is no kernel counterpart: the kernel's page cache frees pages to the
buddy allocator, which has no such holes.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: Evicted bytes after which the flusher trims the heap.
TRIM_AFTER = 64 << 20


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):       # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _malloc_trim()


def trim() -> bool:
    """Return the heap's free pages to the system; False where the C
    library cannot.  Blocks for milliseconds: call it in a worker thread."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
