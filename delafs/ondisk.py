"""On-disk format v1: byte layouts, checksums and the rules for reading them.

docs/ondisk.md is the prose description of everything here; the two must
change together.  All integers are little-endian.  Every structure carries a
CRC-32C (Castagnoli, the polynomial ext4, XFS and btrfs use for metadata;
computed by the ``crc32c`` package, hardware-accelerated where the CPU has
SSE4.2/ARMv8 CRC) over the whole block with its own checksum field zeroed.

Image layout (block numbers, block size 4096)::

    0                      superblock, primary copy
    1, 2                   journal superblock slots A and B (written alternately)
    3 .. 2+L               journal log area of L blocks (circular)
    bitmap_start ..        free-space bitmap, one bit per device block
    fsinfo_block           the journaled root of all other metadata
    data_start ..          allocatable: btree nodes, file data, large xattrs
    nblocks - 1            superblock, secondary copy

Verification is done here, at decode time, so no caller ever sees a block
that failed it: a bad block raises :class:`CorruptionError` naming the
structure and block number.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass

import crc32c as _crc32c

from .lib.errors import CorruptionError, IncompatibleError, NotDelafsError
from .lib.units import BLOCK_SHIFT, BLOCK_SIZE

FORMAT_VERSION = 1

# Files are limited so that byte offsets and block counts stay well inside
# a signed 64-bit off_t: 2**52 bytes (4 PiB).  Extent items hold at most
# 2**32 - 1 blocks each; longer runs are stored as several items.
MAX_FILE_SIZE = 1 << 52
MAX_FILE_BLOCKS = MAX_FILE_SIZE >> BLOCK_SHIFT
MAX_NAME_LEN = 255
ROOT_INO = 1


def crc32c(data, value: int = 0) -> int:
    return _crc32c.crc32c(data, value)


def block_crc(buf: bytes | bytearray | memoryview, crc_off: int) -> int:
    """CRC-32C of a block with the 4-byte checksum field at crc_off as zero."""
    c = crc32c(memoryview(buf)[:crc_off])
    c = crc32c(b"\0\0\0\0", c)
    return crc32c(memoryview(buf)[crc_off + 4:], c)


# --------------------------------------------------------------------------
# Superblock
# --------------------------------------------------------------------------

SB_MAGIC = b"DELAFSv1"
SB_STATE_CLEAN = 1
SB_STATE_DIRTY = 2

# Feature flags.  The rule for bits this code does not know (as ext4):
#   compat     - ignore them;
#   ro_compat  - the image may be read but must not be written: mount ro;
#   incompat   - refuse the image.
FEATURE_COMPAT_KNOWN = 0
FEATURE_RO_COMPAT_KNOWN = 0
FEATURE_INCOMPAT_KNOWN = 0

_SB = struct.Struct(
    "<8s"   # magic
    "I"     # crc32c (of the whole 4096-byte block, this field zeroed)
    "I"     # format version
    "16s"   # uuid
    "I"     # block size
    "I"     # state: 1 clean, 2 dirty (mounted or crashed)
    "Q"     # nblocks: device size in blocks when formatted
    "Q"     # journal_start (first journal superblock slot)
    "Q"     # journal_blocks (slots + log area)
    "Q"     # bitmap_start
    "Q"     # bitmap_blocks
    "Q"     # fsinfo_block
    "Q"     # data_start
    "Q"     # feature_compat
    "Q"     # feature_ro_compat
    "Q"     # feature_incompat
    "Q"     # max_file_size
    "q"     # mkfs_time_ns
    "q"     # last_mount_ns
    "q"     # last_clean_ns
    "Q"     # mount_count
    "64s"   # label
)
SB_CRC_OFF = 8


@dataclass
class Superblock:
    uuid: bytes
    nblocks: int
    journal_start: int
    journal_blocks: int
    bitmap_start: int
    bitmap_blocks: int
    fsinfo_block: int
    data_start: int
    state: int = SB_STATE_CLEAN
    version: int = FORMAT_VERSION
    block_size: int = BLOCK_SIZE
    feature_compat: int = 0
    feature_ro_compat: int = 0
    feature_incompat: int = 0
    max_file_size: int = MAX_FILE_SIZE
    mkfs_time_ns: int = 0
    last_mount_ns: int = 0
    last_clean_ns: int = 0
    mount_count: int = 0
    label: bytes = b""

    @property
    def sb2_block(self) -> int:
        return self.nblocks - 1

    @property
    def log_start(self) -> int:
        return self.journal_start + 2

    @property
    def log_blocks(self) -> int:
        return self.journal_blocks - 2

    def encode(self) -> bytes:
        buf = bytearray(BLOCK_SIZE)
        _SB.pack_into(
            buf, 0, SB_MAGIC, 0, self.version, self.uuid, self.block_size,
            self.state, self.nblocks, self.journal_start, self.journal_blocks,
            self.bitmap_start, self.bitmap_blocks, self.fsinfo_block,
            self.data_start, self.feature_compat, self.feature_ro_compat,
            self.feature_incompat, self.max_file_size, self.mkfs_time_ns,
            self.last_mount_ns, self.last_clean_ns, self.mount_count,
            self.label[:64])
        struct.pack_into("<I", buf, SB_CRC_OFF, block_crc(buf, SB_CRC_OFF))
        return bytes(buf)

    @classmethod
    def decode(cls, buf: bytes, blk: int, dev_blocks: int | None = None) -> "Superblock":
        """Parse and verify.  NotDelafsError if the magic is absent (some other
        content), CorruptionError for a delafs superblock that fails checks."""
        if len(buf) < BLOCK_SIZE:
            raise CorruptionError("superblock", blk, "short read")
        f = _SB.unpack_from(buf, 0)
        if f[0] != SB_MAGIC:
            raise NotDelafsError(f"no delafs superblock at block {blk}")
        if f[1] != block_crc(buf, SB_CRC_OFF):
            raise CorruptionError("superblock", blk, "checksum mismatch")
        sb = cls(uuid=f[3], block_size=f[4], state=f[5], nblocks=f[6],
                 journal_start=f[7], journal_blocks=f[8], bitmap_start=f[9],
                 bitmap_blocks=f[10], fsinfo_block=f[11], data_start=f[12],
                 feature_compat=f[13], feature_ro_compat=f[14],
                 feature_incompat=f[15], max_file_size=f[16],
                 mkfs_time_ns=f[17], last_mount_ns=f[18], last_clean_ns=f[19],
                 mount_count=f[20], label=f[21].rstrip(b"\0"), version=f[2])
        if sb.version != FORMAT_VERSION:
            raise IncompatibleError(
                f"superblock at block {blk}: format version {sb.version} is not supported (this is v{FORMAT_VERSION})")
        if sb.feature_incompat & ~FEATURE_INCOMPAT_KNOWN:
            raise IncompatibleError(
                f"superblock at block {blk}: unknown incompatible features "
                f"{sb.feature_incompat & ~FEATURE_INCOMPAT_KNOWN:#x}")
        sb._check_geometry(blk, dev_blocks)
        return sb

    def _check_geometry(self, blk: int, dev_blocks: int | None) -> None:
        def bad(why):
            raise CorruptionError("superblock", blk, why)
        if self.block_size != BLOCK_SIZE:
            bad(f"block size {self.block_size} (only {BLOCK_SIZE} is supported)")
        if self.nblocks < MIN_BLOCKS:
            bad(f"{self.nblocks} blocks is below the minimum {MIN_BLOCKS}")
        if dev_blocks is not None and self.nblocks > dev_blocks:
            bad(f"filesystem has {self.nblocks} blocks but the device only {dev_blocks}")
        if not (self.journal_start == 1 and self.journal_blocks >= MIN_LOG_BLOCKS + 2
                and self.bitmap_start == self.journal_start + self.journal_blocks
                and self.bitmap_blocks == bitmap_blocks_for(self.nblocks)
                and self.fsinfo_block == self.bitmap_start + self.bitmap_blocks
                and self.data_start == self.fsinfo_block + 1
                and self.data_start < self.nblocks - 1):
            bad("inconsistent geometry")
        if self.state not in (SB_STATE_CLEAN, SB_STATE_DIRTY):
            bad(f"unknown state {self.state}")
        if not (0 < self.max_file_size <= MAX_FILE_SIZE and self.max_file_size % BLOCK_SIZE == 0):
            bad(f"maximum file size {self.max_file_size}")

    @property
    def read_only_features(self) -> bool:
        """True if unknown ro_compat bits mean we may only read the image."""
        return bool(self.feature_ro_compat & ~FEATURE_RO_COMPAT_KNOWN)


# --------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------

MIN_LOG_BLOCKS = 256
MIN_BLOCKS = 1024          # 4 MiB
HDR_SIZE = 32
BITS_PER_BITMAP_BLOCK = (BLOCK_SIZE - HDR_SIZE) * 8


def bitmap_blocks_for(nblocks: int) -> int:
    return -(-nblocks // BITS_PER_BITMAP_BLOCK)


def default_log_blocks(nblocks: int) -> int:
    """1/64 of the device, clamped to [1 MiB, 128 MiB] of log."""
    return max(MIN_LOG_BLOCKS, min(nblocks // 64, 32768))


def make_geometry(nblocks: int, *, log_blocks: int | None = None,
                  label: bytes = b"", now_ns: int = 0) -> Superblock:
    if nblocks < MIN_BLOCKS:
        raise ValueError(f"device too small: {nblocks} blocks, at least {MIN_BLOCKS} needed")
    log_blocks = log_blocks or default_log_blocks(nblocks)
    if log_blocks < MIN_LOG_BLOCKS:
        raise ValueError(f"journal too small: {log_blocks} blocks (minimum {MIN_LOG_BLOCKS})")
    jstart = 1
    jblocks = log_blocks + 2
    bstart = jstart + jblocks
    bblocks = bitmap_blocks_for(nblocks)
    fsinfo = bstart + bblocks
    data_start = fsinfo + 1
    if data_start + 64 >= nblocks - 1:
        raise ValueError("device too small for the journal and metadata")
    return Superblock(uuid=uuidlib.uuid4().bytes, nblocks=nblocks,
                      journal_start=jstart, journal_blocks=jblocks,
                      bitmap_start=bstart, bitmap_blocks=bblocks,
                      fsinfo_block=fsinfo, data_start=data_start,
                      mkfs_time_ns=now_ns, label=label)


# --------------------------------------------------------------------------
# Common metadata block header (every block but the superblock)
# --------------------------------------------------------------------------
#
#   0  magic    u32
#   4  crc32c   u32   whole block, this field zeroed
#   8  blocknr  u64   where the block belongs: catches misdirected writes
#  16  seq      u64   journal transaction that last wrote the block
#  24  aux      u64   structure-specific (see each structure)

_HDR = struct.Struct("<IIQQQ")
HDR_CRC_OFF = 4

MAGIC_JSB = 0x4A534231      # journal superblock slot   'JSB1'
MAGIC_JDESC = 0x4A444553    # journal descriptor        'JDES'
MAGIC_JCOMMIT = 0x4A434D54  # journal commit            'JCMT'
MAGIC_BITMAP = 0x424D4150   # free-space bitmap         'BMAP'
MAGIC_FSINFO = 0x46494E46   # fsinfo                    'FINF'
MAGIC_NODE = 0x4E4F4445     # btree node                'NODE'

STRUCT_NAMES = {
    MAGIC_JSB: "journal superblock",
    MAGIC_JDESC: "journal descriptor",
    MAGIC_JCOMMIT: "journal commit record",
    MAGIC_BITMAP: "free-space bitmap block",
    MAGIC_FSINFO: "fsinfo block",
    MAGIC_NODE: "btree node",
}


def seal(buf: bytearray, magic: int, blocknr: int, seq: int, aux: int = 0) -> bytes:
    """Fill in the header of a metadata block and checksum it."""
    _HDR.pack_into(buf, 0, magic, 0, blocknr, seq, aux)
    struct.pack_into("<I", buf, HDR_CRC_OFF, block_crc(buf, HDR_CRC_OFF))
    return bytes(buf)


def unseal(buf: bytes, magic: int, blocknr: int) -> tuple[int, int]:
    """Verify a metadata block's header and checksum; return (seq, aux)."""
    name = STRUCT_NAMES[magic]
    if len(buf) != BLOCK_SIZE:
        raise CorruptionError(name, blocknr, "short read")
    m, crc, bnr, seq, aux = _HDR.unpack_from(buf, 0)
    if m != magic:
        what = STRUCT_NAMES.get(m)
        detail = f"found a {what}" if what else f"bad magic {m:#010x}"
        raise CorruptionError(name, blocknr, detail)
    if crc != block_crc(buf, HDR_CRC_OFF):
        raise CorruptionError(name, blocknr, "checksum mismatch")
    if bnr != blocknr:
        raise CorruptionError(name, blocknr, f"block claims to be block {bnr} (misdirected write)")
    return seq, aux


def peek_magic(buf: bytes) -> int:
    return struct.unpack_from("<I", buf, 0)[0]


# --------------------------------------------------------------------------
# fsinfo: the journaled root of the metadata
# --------------------------------------------------------------------------

_FSINFO = struct.Struct("<QBQQQQ")


@dataclass
class FsInfo:
    """Counters and roots that change with ordinary metadata updates.

    Kept out of the superblock so that updating them is just another
    journaled block and the superblock stays (nearly) static.
    """
    root_block: int = 0       # btree root
    root_level: int = 0       # 0 = the root is a leaf
    next_ino: int = ROOT_INO + 1
    next_generation: int = 1
    used_blocks: int = 0      # allocated blocks, metadata + data, fixed regions included
    inode_count: int = 0

    def encode(self, blocknr: int, seq: int) -> bytes:
        buf = bytearray(BLOCK_SIZE)
        _FSINFO.pack_into(buf, HDR_SIZE, self.root_block, self.root_level,
                          self.next_ino, self.next_generation,
                          self.used_blocks, self.inode_count)
        return seal(buf, MAGIC_FSINFO, blocknr, seq)

    @classmethod
    def decode(cls, buf: bytes, blocknr: int) -> "FsInfo":
        unseal(buf, MAGIC_FSINFO, blocknr)
        return cls(*_FSINFO.unpack_from(buf, HDR_SIZE))


# --------------------------------------------------------------------------
# Bitmap blocks
# --------------------------------------------------------------------------

def encode_bitmap(bits: bytes | bytearray, blocknr: int, seq: int) -> bytes:
    buf = bytearray(BLOCK_SIZE)
    buf[HDR_SIZE:HDR_SIZE + len(bits)] = bits
    return seal(buf, MAGIC_BITMAP, blocknr, seq)


def decode_bitmap(buf: bytes, blocknr: int) -> bytearray:
    unseal(buf, MAGIC_BITMAP, blocknr)
    return bytearray(buf[HDR_SIZE:])


def fixed_ranges(sb: Superblock) -> list[tuple[int, int]]:
    """(start, length) of the blocks the layout owns: never allocatable."""
    return [(0, sb.data_start), (sb.sb2_block, 1)]
