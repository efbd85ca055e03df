"""The stream of completed device requests, for crash simulation."""

from __future__ import annotations


class Recorder:
    """The stream of completed device requests, for crash simulation.

    Attributes:
        events: ``('write', blk, data)``, ``('flush',)`` and
            ``('discard', blk, count)`` tuples in completion order.  A request
            is appended after its syscall returned successfully, so a write
            that raced with a flush may be listed after it: that only makes
            the crash model assume less durability than the disk gave.
    """

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def clear(self) -> None:
        self.events.clear()
