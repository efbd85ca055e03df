"""The iomap vocabulary: mappings, iteration flags, the filesystem protocols
and the VFS inode the engine works on (include/linux/iomap.h in spirit).

The engine (buffered_io.py, writeback.py) is filesystem-agnostic: it talks
to the filesystem only through :class:`IomapOps` and :class:`WritebackOps`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

import trio

from ..lib.locks import RWSemaphore


class IomapType(enum.IntEnum):
    HOLE = 0          # no blocks, no reservation: reads as zeros
    DELALLOC = 1      # reserved, not allocated: reads as zeros unless cached
    MAPPED = 2        # allocated and written
    UNWRITTEN = 3     # allocated, reads as zeros until converted


# iomap flags (set by iomap_begin)
IOMAP_F_NEW = 1 << 0          # the filesystem just created this mapping (reserved/allocated it)

# iteration flags (what the caller is doing)
IOMAP_WRITE = 1 << 0
IOMAP_ZERO = 1 << 1
IOMAP_FAULT = 1 << 2
IOMAP_REPORT = 1 << 3         # seek/fiemap: map only, never allocate


@dataclass(slots=True)
class Iomap:
    """A mapping of the byte range [offset, offset + length).

    ``addr`` is the disk byte address of ``offset`` for MAPPED/UNWRITTEN.
    ``validity_cookie`` is the extent map's sequence number when the
    mapping was made: if it changed by the time a folio is locked, the
    mapping may be stale (seed 002's ext4 sequence counter, XFS's
    iomap_valid)."""
    offset: int
    length: int
    type: IomapType
    addr: int | None = None
    flags: int = 0
    validity_cookie: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length


class VInode:
    """The VFS inode as the engine sees it (struct inode).

    Attributes:
      ino       inode number
      size      i_size: the in-memory file size (the on-disk size may lag
                until writeback completes); changed under i_rwsem exclusive,
                or by writeback completion which only reads it
      mapping   the page cache's AddressSpace for this file
      i_rwsem   per-inode shared/exclusive lock, the outermost in the order
      writers   open descriptions with write access (post-EOF preallocation
                is trimmed when the last one closes)
      truncated a shrinking truncate since the last close, whose new data
                the next close starts writing back (XFS_ITRUNCATED)
    """

    __slots__ = ("ino", "size", "mapping", "i_rwsem", "writers", "truncated", "private")

    def __init__(self, ino: int, size: int, mapping):
        self.ino = ino
        self.size = size
        self.mapping = mapping
        self.i_rwsem = RWSemaphore(f"i_rwsem[{ino}]")
        self.writers = 0
        self.truncated = False
        self.private = None


class IomapOps(Protocol):
    """What a filesystem provides to the buffered I/O paths."""

    async def iomap_begin(self, inode: VInode, pos: int, length: int, flags: int) -> Iomap:
        """Map [pos, pos+length); for IOMAP_WRITE reserve DELALLOC over holes
        (IOMAP_F_NEW when it did).  With IOMAP_FAULT the whole range is
        reserved or nothing is (page_mkwrite never punches)."""

    async def iomap_end(self, inode: VInode, pos: int, length: int, written: int,
                        flags: int, iomap: Iomap) -> None:
        """The iteration processed ``written`` of ``length`` bytes."""

    def iomap_valid(self, inode: VInode, iomap: Iomap) -> bool:
        """Is the mapping still current (validity cookie unchanged)?"""

    async def punch(self, inode: VInode, pos: int, length: int) -> None:
        """Remove DELALLOC extents (only those) from [pos, pos+length),
        atomically, returning their reservation.  Called with a folio lock
        possibly held: must never lock a folio itself."""

    async def read_blocks(self, addr: int, views) -> None:
        """Read the blocks at disk byte address ``addr`` into ``views``
        (memoryviews of folio data, each a whole number of blocks)."""


@dataclass
class Ioend:
    """A run of file bytes contiguous on disk with one mapping type, built
    from folio ranges (iomap_ioend)."""
    ino: int
    offset: int                   # file byte offset
    addr: int                     # disk byte address
    type: IomapType
    size: int = 0
    bufs: list = field(default_factory=list)
    folios: list = field(default_factory=list)

    def contiguous(self, ino: int, offset: int, addr: int, type_: IomapType) -> bool:
        return (ino == self.ino and type_ == self.type and offset == self.offset + self.size
                and addr == self.addr + self.size)


@dataclass
class WritebackCtx:
    """Per-writepages state (iomap_writepage_ctx): the ioend being built,
    the ioends ready to submit, and the cached mapping of the filesystem."""
    inode: VInode
    sync: bool = False
    ioend: Ioend | None = None
    ready: list[Ioend] = field(default_factory=list)
    iomap: Iomap | None = None
    error: int = 0
    nr_ranges: int = 0
    queued: int = 0             # bytes queued on ioends since the last submit


class WritebackOps(Protocol):
    async def writeback_range(self, wpc: WritebackCtx, folio, pos: int, length: int,
                              end_pos: int) -> int:
        """Map and queue a prefix of [pos, pos+length) of the folio's dirty
        data; return the bytes handled (> 0).  On failure discard the
        folio's DELALLOC under the folio lock alone and raise."""

    async def writeback_submit(self, wpc: WritebackCtx) -> None:
        """Write the ready ioends and complete them (convert UNWRITTEN
        extents and move the on-disk size in one transaction, which the
        journal commits only after a device flush)."""


# --------------------------------------------------------------------------
# Named yield points for the race explorer
# --------------------------------------------------------------------------

# Long enough that the checkpoint (about 7 us) costs under 1 % of a walk,
# short enough that a request waits no longer than a disk would make it.
RESCHED_SLICE = 0.001


class YieldPoints:
    """The engine awaits ``POINTS.hit(name)`` where the kernel could sleep.
    The race explorer installs a chooser as ``explorer`` that parks the task
    there and resumes tasks in an order drawn from its own RNG.  Without one
    a point does nothing, and every call site tests ``POINTS.explorer is not
    None`` first: the points stay in the code users run, at the price of one
    attribute test rather than a coroutine per point."""

    def __init__(self):
        self.explorer = None
        self._resched_at = 0.0

    async def hit(self, name: str) -> None:
        if self.explorer is not None:
            await self.explorer.point(name)

    async def cond_resched(self) -> None:
        """The kernel's cond_resched() in a long walk: give the event loop a
        turn once it has not had one for RESCHED_SLICE.  The walk shares its
        thread with every FUSE request, and a writeback pass over thousands
        of folios that never yields holds each of them for the whole pass.
        Under the race explorer this does nothing: it schedules only at the
        named points, and a stray checkpoint would make its runs depend on
        the clock."""
        if self.explorer is None:
            now = time.perf_counter()
            if now >= self._resched_at:
                self._resched_at = now + RESCHED_SLICE
                await trio.lowlevel.checkpoint()


POINTS = YieldPoints()
