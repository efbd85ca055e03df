"""errortag: named fault-injection points, switchable at run time.

Modelled on XFS's errortag: every tag has a value, 0 meaning off.  For a
failure tag the value N means "fire on about one call in N" (1 = always);
for a ``delay_*`` tag it is a delay in milliseconds at that point, to widen
a race window.  Decisions come from a private, seedable RNG so a test (or
the race explorer) replays the same failures from the same seed.

Tags are set from Python (``errortags.set("short_copy", 3)``), parsed from
a mount option string (``short_copy=3,stale_mapping=5``) and, with the
daemon, at run time through the control channel.
"""

from __future__ import annotations

import random

from .trace import TRACE

TAGS: dict[str, str] = {
    "short_copy": "the copy into a locked folio comes up short (the iteration ends early and is retried)",
    "copy_fault": "the source buffer cannot be faulted in (the write returns short)",
    "stale_mapping": "the validity cookie changes after iomap_begin (the mapping is refetched)",
    "writeback_eio": "the data write of an ioend fails with EIO",
    "alloc_enospc": "a delalloc reservation or block allocation fails with ENOSPC",
    "log_eio": "a journal write fails with EIO (the filesystem shuts down)",
    "flush_eio": "a device cache flush fails with EIO (after writeback fsync reports it; in the journal the filesystem shuts down)",
    "handler_bug": "a FUSE request (not one of the control file's) raises an unexpected exception in the adapter (the caller must get EIO and the daemon keep serving)",
    "delay_write": "milliseconds a write waits before taking i_rwsem (widens the window between a direct write's submission and its application)",
    "delay_write_begin": "milliseconds to sleep before locking a folio in write_begin",
    "delay_punch": "milliseconds to sleep inside the delalloc punch scan",
    "delay_writeback": "milliseconds to sleep before submitting an ioend",
    "delay_fault": "milliseconds to sleep in page_mkwrite before reserving",
}


class ErrorTags:
    """The tag table of one filesystem instance.

    Attributes:
      values  tag -> int (0 = off)
      hits    tag -> how many times the tag fired
      rng     random.Random used for every decision (seed it to replay)
    """

    def __init__(self, seed: int | None = None):
        self.values: dict[str, int] = dict.fromkeys(TAGS, 0)
        self.hits: dict[str, int] = dict.fromkeys(TAGS, 0)
        self.rng = random.Random(seed)
        self.active = False        # any tag set: the one check on hot paths

    def set(self, tag: str, value: int) -> None:
        if tag not in TAGS:
            raise ValueError(f"unknown errortag {tag!r} (known: {', '.join(sorted(TAGS))})")
        if value < 0:
            raise ValueError(f"errortag {tag} value must be >= 0")
        self.values[tag] = value
        self.active = any(self.values.values())

    def parse(self, spec: str) -> None:
        """Apply ``tag=value,tag=value`` (a mount option or a control write)."""
        for part in filter(None, (p.strip() for p in spec.split(","))):
            tag, sep, val = part.partition("=")
            if not sep or not val.strip().isdigit():
                raise ValueError(f"bad errortag setting {part!r} (want TAG=N)")
            self.set(tag.strip(), int(val))

    def fires(self, tag: str) -> bool:
        """Should failure tag ``tag`` fire now?"""
        if not self.active:
            return False
        n = self.values[tag]
        if n and (n == 1 or self.rng.randrange(n) == 0):
            self.hits[tag] += 1
            if TRACE.on:
                TRACE.emit("errortag", tag=tag, value=n)
            return True
        return False

    async def delay(self, tag: str) -> None:
        """Call sites test ``active`` first, so a delay tag costs nothing
        more than that while every tag is off."""
        if self.active and self.values[tag]:
            self.hits[tag] += 1
            import trio  # here, not above: the CLI's control commands load this module without trio
            await trio.sleep(self.values[tag] / 1000)

    def statistics(self) -> dict:
        return {t: {"value": v, "hits": self.hits[t]} for t, v in self.values.items() if v or self.hits[t]}
