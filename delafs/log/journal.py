"""The metadata journal: a circular log of whole-block images (JBD2's model).

A transaction is the set of metadata blocks changed since the previous one,
written to the log as::

    descriptor(seq, tags...)  data blocks...  [descriptor  data...]  commit(seq)

Each tag names a home block and carries the CRC-32C of its image; a tag may
instead *revoke* a block (it was freed: older images of it in the log must not
be replayed over whatever the block holds next).  The commit record carries a
CRC chained over every tag, so a transaction is valid only if its commit
record and every image in it are intact.  All of it is written and then
flushed once; a crash in between leaves a transaction that fails
verification, and recovery stops there: the torn tail is ignored.

Cost bound: a transaction that changes k metadata blocks and revokes r
uses ``k + max(1, ceil((k + r) / TAGS_PER_DESC)) + 1`` log blocks, so
changing one metadata block costs 3 log blocks, whatever the size of the
file or directory.

The journal superblock (two alternating slots, the newer valid one wins, so
a torn slot write loses nothing) records the *tail*: the oldest transaction
whose images may not yet be at their home locations.  A checkpoint writes
every committed image home, flushes, and moves the tail to the head.
Recovery replays the valid transactions from the tail, in order, honouring
revokes, then checkpoints.

Commits are serialized (one in flight at a time), so a valid transaction N+1
after an invalid transaction N can only mean corruption, never a torn write;
:func:`scan` reports that case so fsck can name the damaged record.
"""

from __future__ import annotations

import errno
import struct
import time
from dataclasses import dataclass, field

from ..lib.errors import CorruptionError, DelafsError, FsError
from ..ondisk import (
    BLOCK_SIZE,
    HDR_SIZE,
    MAGIC_JCOMMIT,
    MAGIC_JDESC,
    MAGIC_JSB,
    Superblock,
    crc32c,
    peek_magic,
    seal,
    unseal,
)

_TAG = struct.Struct("<QII")          # home block, crc32c of image, flags
TAG_REVOKE = 1
UUID_SIZE = 16
# Descriptors and commit records start with the filesystem's UUID: records
# left on the device by an earlier filesystem never pass for ours.
TAGS_OFF = HDR_SIZE + UUID_SIZE
TAGS_PER_DESC = (BLOCK_SIZE - TAGS_OFF) // _TAG.size
_JSB = struct.Struct("<QQ16s")        # tail_pos, tail_seq, fs uuid
_COMMIT = struct.Struct("<IIq")       # tag crc chain, ntags, commit time


def log_blocks_needed(nimages: int, nrevokes: int = 0) -> int:
    ntags = nimages + nrevokes
    return nimages + max(1, -(-ntags // TAGS_PER_DESC)) + 1


@dataclass
class Transaction:
    """One transaction as found in the log."""
    seq: int
    pos: int                      # log position of its first descriptor
    length: int                   # log blocks it occupies
    images: dict[int, bytes] = field(default_factory=dict)
    revokes: set[int] = field(default_factory=set)


@dataclass
class ScanResult:
    tail_pos: int
    tail_seq: int
    jsb_slot: int                 # which slot held the tail (0 or 1)
    jsb_gen: int
    txns: list[Transaction]
    end_pos: int                  # log position after the last valid transaction
    end_reason: str               # why the scan stopped
    corruption: CorruptionError | None = None   # a damaged record with valid ones after it
    bad_slots: list[CorruptionError] = field(default_factory=list)


class _Stop(Exception):
    def __init__(self, reason: str, block: int | None = None, structure: str = "journal record"):
        super().__init__(reason)
        self.reason = reason
        self.block = block
        self.structure = structure


class Journal:
    """Writes transactions and checkpoints; owns the head/tail of the log.

    Attributes (all guarded by the caller's commit serialization; see
    metabuf.MetaStore, which is the only user):
      head_pos, next_seq   where and with which sequence the next commit goes
      tail_pos, tail_seq   oldest transaction not yet checkpointed
      jsb_gen              generation of the newest journal superblock slot
    """

    def __init__(self, dev, sb: Superblock, scan: ScanResult):
        self.dev = dev
        self.sb = sb
        self.L = sb.log_blocks
        self.tail_pos = scan.tail_pos
        self.tail_seq = scan.tail_seq
        self.head_pos = scan.end_pos
        # After replayed transactions, skip a sequence number past anything a
        # torn commit may have left (recovery then moves the tail there).  An
        # empty log continues at the tail's own sequence number, which is
        # what the next recovery will look for.
        self.next_seq = (scan.txns[-1].seq + 2) if scan.txns else scan.tail_seq
        self.jsb_gen = scan.jsb_gen
        self.stats = {"commits": 0, "log_blocks_written": 0, "checkpoints": 0}
        self.errortags = None           # set by Filesystem.attach_errortags

    # -- geometry -----------------------------------------------------------

    def _blk(self, pos: int) -> int:
        return self.sb.log_start + pos % self.L

    def used(self) -> int:
        return (self.head_pos - self.tail_pos) % self.L

    def free(self) -> int:
        # One block is kept unused so head == tail always means "empty".
        return self.L - 1 - self.used()

    # -- writing --------------------------------------------------------------

    def build(self, seq: int, images: dict[int, bytes], revokes: set[int]) -> list[tuple[int, bytes]]:
        """Lay out one transaction as (log position offset, block) pairs."""
        tags = [(home, crc32c(img), 0, img) for home, img in images.items()]
        tags += [(home, 0, TAG_REVOKE, None) for home in sorted(revokes)]
        out: list[bytes] = []
        chain = 0
        pos = self.head_pos
        for i in range(0, max(len(tags), 1), TAGS_PER_DESC):
            group = tags[i:i + TAGS_PER_DESC]
            desc = bytearray(BLOCK_SIZE)
            desc[HDR_SIZE:TAGS_OFF] = self.sb.uuid
            off = TAGS_OFF
            for home, crc, flags, _ in group:
                _TAG.pack_into(desc, off, home, crc, flags)
                off += _TAG.size
            chain = crc32c(desc[TAGS_OFF:off], chain)
            out.append(seal(desc, MAGIC_JDESC, self._blk(pos + len(out)), seq, len(group)))
            out.extend(img for _, _, flags, img in group if not flags & TAG_REVOKE)
        commit = bytearray(BLOCK_SIZE)
        commit[HDR_SIZE:TAGS_OFF] = self.sb.uuid
        _COMMIT.pack_into(commit, TAGS_OFF, chain, len(tags), time.time_ns())
        out.append(seal(commit, MAGIC_JCOMMIT, self._blk(pos + len(out)), seq, len(out) + 1))
        return out

    async def write_transaction(self, seq: int, images: dict[int, bytes], revokes: set[int]) -> None:
        """Write one transaction at the head and flush: it is durable on return.

        Data written before it (writeback's ioends, whose completion this
        transaction may carry) is flushed first, as XFS's log writes carry
        REQ_PREFLUSH: that flush is what lets a conversion to WRITTEN commit
        only after the data it exposes, without a flush per writeback pass.
        The caller has made room (see MetaStore.commit): a transaction never
        overwrites the tail.
        """
        blocks = self.build(seq, images, revokes)
        if self.errortags is not None and self.errortags.fires("log_eio"):
            raise FsError(errno.EIO, "injected journal write error (log_eio)")
        if len(blocks) > self.free():
            raise DelafsError(f"journal full: transaction of {len(blocks)} blocks, {self.free()} free")
        # Runs that don't cross the end of the circular area, written as one
        # request with its flushes (see BlockDevice.write_fua).
        runs = []
        i = 0
        while i < len(blocks):
            pos = (self.head_pos + i) % self.L
            n = min(len(blocks) - i, self.L - pos)
            runs.append((self.sb.log_start + pos, blocks[i:i + n]))
            i += n
        await self.dev.write_fua(runs, preflush=self.dev.unflushed)
        self.head_pos = (self.head_pos + len(blocks)) % self.L
        self.stats["commits"] += 1
        self.stats["log_blocks_written"] += len(blocks)

    async def write_tail(self, tail_pos: int, tail_seq: int) -> None:
        """Record a new tail in the older journal superblock slot, then flush."""
        self.jsb_gen += 1
        slot = self.jsb_gen % 2
        blk = self.sb.journal_start + slot
        img = encode_jsb(blk, self.jsb_gen, tail_pos, tail_seq, self.sb.uuid)
        await self.dev.write_fua([(blk, [img])], preflush=False)
        self.tail_pos, self.tail_seq = tail_pos, tail_seq

    async def checkpoint(self, pending: dict[int, bytes]) -> None:
        """Write committed images home and retire every transaction in the log."""
        if pending:
            await self.dev.write_fua(list(_runs(sorted(pending.items()))), preflush=False)
        if self.tail_pos != self.head_pos or self.tail_seq != self.next_seq:
            await self.write_tail(self.head_pos, self.next_seq)
        self.stats["checkpoints"] += 1


def _runs(items: list[tuple[int, bytes]]):
    """Group (block, image) pairs sorted by block into contiguous runs."""
    start = None
    run: list[bytes] = []
    for blk, img in items:
        if start is not None and blk == start + len(run):
            run.append(img)
            continue
        if run:
            yield start, run
        start, run = blk, [img]
    if run:
        yield start, run


def encode_jsb(blk: int, gen: int, tail_pos: int, tail_seq: int, uuid: bytes) -> bytes:
    buf = bytearray(BLOCK_SIZE)
    _JSB.pack_into(buf, HDR_SIZE, tail_pos, tail_seq, uuid)
    return seal(buf, MAGIC_JSB, blk, gen)


def initial_jsb_blocks(sb: Superblock) -> list[bytes]:
    """The two slots as mkfs writes them: an empty log starting at seq 1.
    Generation g lives in slot g % 2, so the next write (generation 2) goes
    to slot 0 and never overwrites the newest valid slot."""
    a = encode_jsb(sb.journal_start, 0, 0, 1, sb.uuid)
    b = encode_jsb(sb.journal_start + 1, 1, 0, 1, sb.uuid)
    return [a, b]


# --------------------------------------------------------------------------
# Reading the log: shared by mount-time recovery and fsck
# --------------------------------------------------------------------------

async def scan(dev, sb: Superblock, *, look_past_end: bool = False) -> ScanResult:
    """Find the valid transactions from the tail.

    With ``look_past_end`` (fsck), an invalid record is checked against what
    follows it: a valid transaction with the next sequence number after it
    means the record was damaged after being written, which is corruption,
    not a torn tail.
    """
    slots = []
    bad = []
    for slot in (0, 1):
        blk = sb.journal_start + slot
        buf = await dev.read(blk, 1)
        try:
            gen, _ = unseal(buf, MAGIC_JSB, blk)
        except CorruptionError as e:
            bad.append(e)
            continue
        tail_pos, tail_seq, uuid = _JSB.unpack_from(buf, HDR_SIZE)
        if uuid != sb.uuid:
            bad.append(CorruptionError("journal superblock", blk, "belongs to another filesystem (uuid)"))
            continue
        if tail_pos >= sb.log_blocks:
            bad.append(CorruptionError("journal superblock", blk, f"tail {tail_pos} outside the log"))
            continue
        slots.append((gen, slot, tail_pos, tail_seq))
    if not slots:
        raise CorruptionError("journal superblock", sb.journal_start,
                              "both slots are invalid: " + "; ".join(str(e) for e in bad))
    gen, slot, tail_pos, tail_seq = max(slots)
    L = sb.log_blocks
    reader = _LogReader(dev, sb)
    txns: list[Transaction] = []
    pos, seq = tail_pos, tail_seq
    consumed = 0
    reason = "end of log"
    corruption = None
    while True:
        try:
            txn = await reader.read_txn(pos, seq)
        except _Stop as stop:
            reason = stop.reason
            if look_past_end and stop.block is not None:
                if await reader.valid_txn_after(pos, seq + 1, L - consumed):
                    corruption = CorruptionError(stop.structure, stop.block, stop.reason)
            break
        if consumed + txn.length >= L:
            reason = "log wrapped onto its tail"
            break
        txns.append(txn)
        consumed += txn.length
        pos = (pos + txn.length) % L
        seq += 1
    return ScanResult(tail_pos, tail_seq, slot, gen, txns, pos, reason, corruption, bad)


class _LogReader:
    def __init__(self, dev, sb: Superblock):
        self.dev = dev
        self.sb = sb
        self.L = sb.log_blocks

    async def read(self, pos: int, n: int) -> list[bytes]:
        out = []
        while n:
            p = pos % self.L
            k = min(n, self.L - p)
            buf = await self.dev.read(self.sb.log_start + p, k)
            out.extend(buf[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] for i in range(k))
            pos += k
            n -= k
        return out

    async def read_txn(self, pos: int, seq: int) -> Transaction:
        txn = Transaction(seq, pos % self.L, 0)
        chain = 0
        ntags = 0
        cur = pos
        while True:
            blk = self.sb.log_start + cur % self.L
            (buf,) = await self.read(cur, 1)
            magic = peek_magic(buf)
            if magic == MAGIC_JCOMMIT and txn.length:
                try:
                    bseq, nblocks = unseal(buf, MAGIC_JCOMMIT, blk)
                except CorruptionError as e:
                    raise _Stop(e.detail, blk, "journal commit record")
                if bseq != seq or buf[HDR_SIZE:TAGS_OFF] != self.sb.uuid:
                    raise _Stop(f"commit record for seq {bseq}, expected {seq}", None)
                cchain, cntags, _ = _COMMIT.unpack_from(buf, TAGS_OFF)
                if cchain != chain or cntags != ntags or nblocks != txn.length + 1:
                    raise _Stop(f"commit record of transaction {seq} does not match its descriptors",
                                blk, "journal commit record")
                txn.length += 1
                return txn
            if magic != MAGIC_JDESC:
                # Not a record of this transaction at all: the end of the log
                # (or a torn write of its first block).
                raise _Stop(f"no descriptor for transaction {seq}" if not txn.length
                            else f"transaction {seq} has no commit record",
                            blk if txn.length else None)
            try:
                bseq, count = unseal(buf, MAGIC_JDESC, blk)
            except CorruptionError as e:
                raise _Stop(e.detail, blk, "journal descriptor")
            if bseq != seq or buf[HDR_SIZE:TAGS_OFF] != self.sb.uuid:
                raise _Stop(f"descriptor of seq {bseq}, expected {seq}", None)
            if count > TAGS_PER_DESC:
                raise _Stop(f"descriptor claims {count} tags", blk, "journal descriptor")
            chain = crc32c(buf[TAGS_OFF:TAGS_OFF + count * _TAG.size], chain)
            ntags += count
            tags = [_TAG.unpack_from(buf, TAGS_OFF + i * _TAG.size) for i in range(count)]
            data_tags = [t for t in tags if not t[2] & TAG_REVOKE]
            images = await self.read(cur + 1, len(data_tags))
            for i, (home, crc, flags) in enumerate(data_tags):
                if crc32c(images[i]) != crc:
                    raise _Stop(f"image of block {home} in transaction {seq} fails its checksum",
                                self.sb.log_start + (cur + 1 + i) % self.L, "journal data block")
                if home >= self.sb.nblocks:
                    raise _Stop(f"tag names block {home} beyond the device", blk, "journal descriptor")
                txn.images[home] = bytes(images[i])
                txn.revokes.discard(home)
            for home, _, flags in tags:
                if flags & TAG_REVOKE:
                    if home >= self.sb.nblocks:
                        raise _Stop(f"revoke of block {home} beyond the device", blk, "journal descriptor")
                    txn.revokes.add(home)
            txn.length += 1 + len(data_tags)
            cur += 1 + len(data_tags)
            if txn.length >= self.L:
                raise _Stop("transaction longer than the log", blk, "journal descriptor")

    async def valid_txn_after(self, pos: int, seq: int, limit: int) -> bool:
        blocks: list[bytes] = []
        for off in range(1, max(limit, 1)):
            p = pos + off
            if not blocks:
                blocks = await self.read(p, min(256, limit - off))
                blocks.reverse()
            buf = blocks.pop()
            if peek_magic(buf) != MAGIC_JDESC:
                continue
            try:
                bseq, _ = unseal(buf, MAGIC_JDESC, self.sb.log_start + p % self.L)
            except CorruptionError:
                continue
            if bseq != seq or buf[HDR_SIZE:TAGS_OFF] != self.sb.uuid:
                continue
            try:
                await self.read_txn(p, seq)
                return True
            except _Stop:
                continue
        return False


async def _max_seq(dev, sb: Superblock) -> int:
    """The highest sequence number of any record of ours anywhere in the log."""
    best = 0
    L = sb.log_blocks
    chunk = 256
    for start in range(0, L, chunk):
        n = min(chunk, L - start)
        buf = await dev.read(sb.log_start + start, n)
        for i in range(n):
            blk = bytes(buf[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])
            if peek_magic(blk) in (MAGIC_JDESC, MAGIC_JCOMMIT) and blk[HDR_SIZE:TAGS_OFF] == sb.uuid:
                best = max(best, struct.unpack_from("<Q", blk, 16)[0])
    return best


async def reset(dev, sb: Superblock) -> int:
    """Make the log empty, past every sequence number it holds, so no old
    record is ever replayed: fsck -y's answer to two lost journal superblock
    slots (without a tail nothing in the log can be trusted; what it held
    that was not yet written home is lost, as e2fsck's clearing of a
    damaged journal loses it).  Returns the new tail sequence."""
    seq = await _max_seq(dev, sb) + 2
    for gen in (0, 1):
        blk = sb.journal_start + gen
        await dev.write(blk, [encode_jsb(blk, gen, 0, seq, sb.uuid)])
    await dev.flush()
    return seq


def replay_images(txns: list[Transaction]) -> dict[int, bytes]:
    """The final image of every block the valid transactions carry.

    A revoke in transaction R hides the images of that block in transactions
    up to and including R (the block was freed and may since hold data).
    """
    revoked: dict[int, int] = {}
    for t in txns:
        for home in t.revokes:
            revoked[home] = t.seq
    out: dict[int, bytes] = {}
    for t in txns:
        for home, img in t.images.items():
            if revoked.get(home, -1) >= t.seq:
                continue
            out[home] = img
    return out


async def recover(dev, sb: Superblock, *, discard_damaged: bool = False) -> tuple["Journal", int]:
    """Replay the log into the home locations; return the journal and how
    many transactions were replayed.  The log is empty afterwards.

    A damaged record followed by valid transactions is corruption, not a
    torn tail: recovery refuses it (replaying the prefix would silently drop
    committed transactions, and leaving the rest in the log would let a
    later recovery replay them over newer state).  fsck -y passes
    ``discard_damaged``: the valid prefix is replayed and the log is reset
    past every sequence number it holds."""
    res = await scan(dev, sb, look_past_end=True)
    if res.corruption is not None and not discard_damaged:
        raise CorruptionError(res.corruption.structure, res.corruption.block,
                              res.corruption.detail + "; committed transactions follow it "
                              "(run delafs fsck -y to replay what is intact)")
    j = Journal(dev, sb, res)
    if res.corruption is not None:
        j.next_seq = max(j.next_seq, await _max_seq(dev, sb) + 2)
        images = replay_images(res.txns)
        for start, run in _runs(sorted(images.items())):
            await dev.write(start, run)
        await dev.flush()
        await j.write_tail(j.head_pos, j.next_seq)
        return j, len(res.txns)
    if res.txns:
        images = replay_images(res.txns)
        if images:
            for start, run in _runs(sorted(images.items())):
                await dev.write(start, run)
            await dev.flush()
        await j.write_tail(j.head_pos, j.next_seq)
    return j, len(res.txns)
