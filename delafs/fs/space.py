"""Free space on disk: the bitmap, kept in step with the in-memory allocator.

The bitmap has one bit per device block (1 = in use) in checksummed blocks.
It never needs space of its own, so allocating a btree node can never
recurse into allocating blocks for free-space records.  The whole bitmap is
read at mount (32 KiB per GiB of device) to build the allocator's by-start
and by-size indices; that cost depends on the device size, not on the number
of files.

A block freed by transaction N is cleared in the bitmap in N but stays busy
in the allocator until N is written home (``on_home``, at the checkpoint);
only then may it be reused or discarded.  Durable is not enough: while N's
records are in the log, damage to them rolls recovery back past N (a
damaged last record looks like a torn one), and the old owner's metadata
points at the blocks again, so they must still hold its data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..lib.errors import CorruptionError
from ..ondisk import (
    BITS_PER_BITMAP_BLOCK,
    BLOCK_SIZE,
    HDR_SIZE,
    FsInfo,
    Superblock,
    decode_bitmap,
    encode_bitmap,
    fixed_ranges,
)
from .alloc import Allocator

_FREE_BYTES = re.compile(rb"\x00+")
_USED_BYTES = re.compile(rb"\xff+")


@dataclass
class BitmapBlock:
    blocknr: int
    bits: bytearray

    def encode(self, seq: int) -> bytes:
        return encode_bitmap(self.bits, self.blocknr, seq)


def set_bits(bits: bytearray, first: int, count: int, value: bool) -> None:
    """Set or clear ``count`` bits from bit ``first`` (LSB-first in each byte)."""
    end = first + count
    while first < end and first & 7:
        _bit(bits, first, value)
        first += 1
    whole = (end - first) >> 3
    if whole > 0:
        bits[first >> 3:(first >> 3) + whole] = (b"\xff" if value else b"\x00") * whole
        first += whole << 3
    while first < end:
        _bit(bits, first, value)
        first += 1


def _bit(bits: bytearray, i: int, value: bool) -> None:
    if value:
        bits[i >> 3] |= 1 << (i & 7)
    else:
        bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF


def test_bit(bits: bytes, i: int) -> bool:
    return bool(bits[i >> 3] >> (i & 7) & 1)


def free_runs(bits: bytes, base: int, nbits: int):
    """Yield (base + start, length) runs of clear bits among the first ``nbits``.

    Whole 0x00 and 0xFF bytes are skipped with a regex match, so a mostly
    empty or mostly full bitmap costs a few matches, not a loop per bit."""
    nbytes = -(-nbits // 8)
    run = None
    i = 0
    while i < nbits:
        byte = bits[i >> 3]
        if not i & 7 and byte in (0, 0xFF):
            m = (_FREE_BYTES if byte == 0 else _USED_BYTES).match(bits, i >> 3, nbytes)
            end = min(m.end() * 8, nbits)
            if byte == 0:
                if run is None:
                    run = i
            elif run is not None:
                yield base + run, i - run
                run = None
            i = end
            continue
        if byte >> (i & 7) & 1:
            if run is not None:
                yield base + run, i - run
                run = None
        elif run is None:
            run = i
        i += 1
    if run is not None:
        yield base + run, nbits - run


def merge_runs(runs):
    out = []
    for s, n in runs:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((s, n))
    return out


class Space:
    """Allocator + bitmap.  Every method runs under the filesystem's meta_lock.

    Attributes:
      alloc       the in-memory Allocator (indices, busy extents, accounting)
      bitmap      all BitmapBlock objects, resident
      op_budget   blocks the running operation reserved and has not used yet
      fallback    the budget allocations use once op_budget is spent
    """

    def __init__(self, store, sb: Superblock, info: FsInfo, bitmap: list[BitmapBlock],
                 alloc: Allocator):
        self.store = store
        self.sb = sb
        self.info = info
        self.bitmap = bitmap
        self.alloc = alloc
        self.op_budget = 0
        self.fallback = "available"
        self.discards: list[tuple[int, int]] = []

    @classmethod
    async def load(cls, store, sb: Superblock, info: FsInfo, *, metadata_reserve: int) -> "Space":
        bitmap = []
        runs = []
        for i in range(sb.bitmap_blocks):
            blk = sb.bitmap_start + i
            img = store.pending.get(blk) or await store.dev.read(blk, 1)
            bm = BitmapBlock(blk, decode_bitmap(img, blk))
            bitmap.append(bm)
            base = i * BITS_PER_BITMAP_BLOCK
            nbits = min(BITS_PER_BITMAP_BLOCK, sb.nblocks - base)
            runs.extend(free_runs(bm.bits, base, nbits))
        runs = merge_runs(runs)
        for start, n in runs:
            if start < sb.data_start or start + n > sb.sb2_block:
                bad = start if start < sb.data_start else sb.sb2_block
                raise CorruptionError("free-space bitmap block", sb.bitmap_start + bad // BITS_PER_BITMAP_BLOCK,
                                      f"block {bad} of the fixed layout is marked free")
        alloc = Allocator(data_blocks(sb), runs, first=sb.data_start)
        alloc.refill_metadata_reserve(metadata_reserve)
        return cls(store, sb, info, bitmap, alloc)

    # -- bitmap ----------------------------------------------------------------

    def _mark(self, start: int, count: int, used: bool) -> None:
        while count:
            i, off = divmod(start, BITS_PER_BITMAP_BLOCK)
            n = min(count, BITS_PER_BITMAP_BLOCK - off)
            bm = self.bitmap[i]
            set_bits(bm.bits, off, n, used)
            self.store.mark_dirty(bm)
            start += n
            count -= n

    def is_used_on_disk(self, blk: int) -> bool:
        i, off = divmod(blk, BITS_PER_BITMAP_BLOCK)
        return test_bit(self.bitmap[i].bits, off)

    # -- allocation --------------------------------------------------------------

    def allocate(self, count: int, goal: int | None = None, *, minlen: int = 1,
                 source: str = "available") -> tuple[int, int]:
        start, n = self.alloc.allocate(count, goal, minlen=minlen, source=source)
        self._mark(start, n, True)
        self.info.used_blocks += n
        self.store.mark_dirty(self.info)
        return start, n

    def free(self, start: int, count: int) -> None:
        self.alloc.free(start, count, self.store.running_seq)
        self._mark(start, count, False)
        self.info.used_blocks -= count
        self.store.mark_dirty(self.info)

    # -- the current operation's reservation ----------------------------------

    def begin_op(self, reserved: int, fallback: str) -> None:
        """An operation reserved ``reserved`` blocks (already taken from
        available); allocations draw on them first, then on ``fallback``."""
        self.op_budget = reserved
        self.fallback = fallback

    def end_op(self) -> None:
        """Give back what the operation reserved and did not use."""
        if self.op_budget:
            self.alloc.unreserve(self.op_budget)
        self.op_budget = 0
        self.fallback = "available"

    def take(self, count: int, goal: int | None, *, minlen: int = 1) -> tuple[int, int]:
        """Allocate for the current operation, charging its reservation."""
        if self.op_budget >= count:
            start, n = self.allocate(count, goal, minlen=minlen, source="reserved")
            self.op_budget -= n
            return start, n
        return self.allocate(count, goal, minlen=minlen, source=self.fallback)

    def alloc_node(self, goal: int) -> int:
        return self.take(1, goal)[0]

    def free_node(self, blk: int) -> None:
        self.free(blk, 1)

    def on_home(self, seq: int) -> None:
        """Transactions up to ``seq`` are checkpointed: their freed blocks
        may be reused now, and discarded."""
        self.discards.extend(self.alloc.release_busy(seq))


def data_blocks(sb: Superblock) -> int:
    """Blocks the allocator accounts for: the device less the fixed layout."""
    return sb.nblocks - sum(n for _, n in fixed_ranges(sb))


def initial_bitmap(sb: Superblock) -> list[bytearray]:
    """Bitmap contents of a fresh filesystem: only the fixed layout is used."""
    bits = [bytearray(BLOCK_SIZE - HDR_SIZE) for _ in range(sb.bitmap_blocks)]
    for start, n in fixed_ranges(sb):
        while n:
            i, off = divmod(start, BITS_PER_BITMAP_BLOCK)
            k = min(n, BITS_PER_BITMAP_BLOCK - off)
            set_bits(bits[i], off, k, True)
            start += k
            n -= k
    # Bits past the end of the device are "used" so they are never handed out.
    last = sb.bitmap_blocks - 1
    tail_start = sb.nblocks - last * BITS_PER_BITMAP_BLOCK
    set_bits(bits[last], tail_start, BITS_PER_BITMAP_BLOCK - tail_start, True)
    return bits
