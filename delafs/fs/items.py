"""Btree item types: keys and value codecs for inodes, directory entries,
xattrs, extents, symlink targets and the orphan list.

Keys are ``(objectid, type, offset)``; all items of an inode share its
number as objectid so they sort together.  Byte layouts are in
docs/ondisk.md.  Decoders raise CorruptionError naming the item's leaf.
"""

from __future__ import annotations

import hashlib
import operator
import stat
import struct
from dataclasses import dataclass, field

from ..lib.errors import CorruptionError

ORPHAN_OID = 0          # (0, T_ORPHAN, ino): inode ino has nlink 0 and is still open,
                        # or is in a shrinking truncate that rolls
T_INODE = 1
T_XATTR = 2
T_DIRENT = 3
T_EXTENT = 4
T_SYMLINK = 5
T_ORPHAN = 6

TYPE_NAMES = {T_INODE: "inode", T_XATTR: "xattr", T_DIRENT: "directory entry",
              T_EXTENT: "extent", T_SYMLINK: "symlink", T_ORPHAN: "orphan"}

# ---------------------------------------------------------------------------
# Inodes
# ---------------------------------------------------------------------------

_INODE = struct.Struct("<HHIIIIQqqqqQQQQI")
INODE_VERSION = 1

# Times are signed 64-bit nanoseconds since the epoch: 1677-09-21 to
# 2262-04-11.  Anything outside is clamped to the nearest end, as the VFS's
# timestamp_truncate() clamps to a filesystem's s_time_min/s_time_max (ext4
# without large inodes stops at 2038 the same way).
TIME_MIN_NS = -(1 << 63)
TIME_MAX_NS = (1 << 63) - 1
NLINK_MAX = (1 << 32) - 1       # the field's range; fs.LINK_MAX is the policy


def clamp_time(ns: int) -> int:
    return min(max(ns, TIME_MIN_NS), TIME_MAX_NS)


@dataclass(slots=True)
class Inode:
    """An inode as stored; ``ino`` is its key, not part of the value.

    ``parent`` is the containing directory of a directory (for ``..``), 0 for
    other types.  ``blocks`` counts data, xattr and symlink blocks (st_blocks
    in 4 KiB units).  Times are nanoseconds since the epoch.
    ``xattr_names`` is not stored: the names of the inode's xattrs once a
    lookup has listed them (None until then), so the getxattr the kernel
    sends before every write (security.capability) needs no tree search.
    """
    ino: int
    mode: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    size: int = 0
    atime: int = 0
    mtime: int = 0
    ctime: int = 0
    btime: int = 0
    generation: int = 0
    rdev: int = 0
    blocks: int = 0
    parent: int = 0
    flags: int = 0
    xattr_names: tuple | None = field(default=None, compare=False, repr=False)

    def encode(self) -> bytes:
        return _INODE.pack(INODE_VERSION, 0, self.mode, self.uid, self.gid, self.nlink,
                           self.size, self.atime, self.mtime, self.ctime, self.btime,
                           self.generation, self.rdev, self.blocks, self.parent, self.flags)

    @classmethod
    def decode(cls, ino: int, val: bytes, where: int | None = None) -> "Inode":
        if len(val) != _INODE.size:
            raise CorruptionError(f"inode {ino}", where, f"record of {len(val)} bytes")
        f = _INODE.unpack(val)
        if f[0] != INODE_VERSION:
            raise CorruptionError(f"inode {ino}", where, f"record version {f[0]}")
        return cls(ino, *f[2:])

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def copy(self) -> "Inode":
        return Inode(*_inode_fields(self))


# Every field in constructor order, read in C: copy() runs for every getattr.
_inode_fields = operator.attrgetter(*Inode.__slots__)


def dtype_of(mode: int) -> int:
    """The d_type of a mode: the S_IFMT bits shifted down (DT_REG = 8, ...)."""
    return stat.S_IFMT(mode) >> 12


# ---------------------------------------------------------------------------
# Directory entries
# ---------------------------------------------------------------------------
#
# The offset of a directory entry's key is its 54-bit name hash, shifted
# left 8 bits to leave room for 256 colliding names, plus DIRENT_BASE.  The
# readdir cookie of an entry is its offset + 1: a stable 63-bit value that
# no insert or delete of another name can change, and resuming a readdir at
# a cookie is a btree seek.  Cookies below DIRENT_BASE are free for "." and
# "..".

DIRENT_BASE = 16
HASH_BITS = 54
COLLISION_SLOTS = 256
_DIRENT = struct.Struct("<QB")


def name_hash(name: bytes, salt: bytes) -> int:
    """Keyed with the filesystem's UUID (ext4's hash seed) so that nobody can
    pick names that collide on every delafs image."""
    h = hashlib.blake2b(name, digest_size=8, key=salt).digest()
    return int.from_bytes(h, "little") >> (64 - HASH_BITS)


def dirent_range(h: int) -> tuple[int, int]:
    lo = (h << 8) + DIRENT_BASE
    return lo, lo + COLLISION_SLOTS


def encode_dirent(ino: int, dtype: int, name: bytes) -> bytes:
    return _DIRENT.pack(ino, dtype) + name


def decode_dirent(val: bytes, where: int | None = None) -> tuple[int, int, bytes]:
    if len(val) <= _DIRENT.size or len(val) > _DIRENT.size + 255:
        raise CorruptionError("directory entry", where, f"record of {len(val)} bytes")
    ino, dtype = _DIRENT.unpack_from(val)
    return ino, dtype, val[_DIRENT.size:]


# ---------------------------------------------------------------------------
# Extents
# ---------------------------------------------------------------------------

_EXTENT = struct.Struct("<QIB")
EXTENT_ITEM_SIZE = _EXTENT.size        # what an operation reserves per extent item
EXT_UNWRITTEN = 2
EXT_WRITTEN = 3
MAX_EXTENT_LEN = 2**32 - 1


def encode_extent(pblock: int, length: int, state: int) -> bytes:
    return _EXTENT.pack(pblock, length, state)


def decode_extent(val: bytes, where: int | None = None) -> tuple[int, int, int]:
    if len(val) != _EXTENT.size:
        raise CorruptionError("extent record", where, f"record of {len(val)} bytes")
    pblock, length, state = _EXTENT.unpack(val)
    if state not in (EXT_UNWRITTEN, EXT_WRITTEN) or length == 0:
        raise CorruptionError("extent record", where, f"state {state}, length {length}")
    return pblock, length, state


# ---------------------------------------------------------------------------
# Out-of-line values (large xattrs, long symlinks)
# ---------------------------------------------------------------------------
#
# A value too large for a btree item lives in a run of whole blocks; the
# item holds (block, nblocks, length, crc32c of the value), so the blocks
# need no header of their own and are still verified on every read.

_EXTVAL = struct.Struct("<QIII")
VAL_INLINE = 0
VAL_BLOCKS = 1


@dataclass(slots=True)
class OutOfLine:
    pblock: int
    nblocks: int
    length: int
    crc: int

    def encode(self) -> bytes:
        return _EXTVAL.pack(self.pblock, self.nblocks, self.length, self.crc)

    @classmethod
    def decode(cls, buf: bytes) -> "OutOfLine":
        return cls(*_EXTVAL.unpack_from(buf))


# ---------------------------------------------------------------------------
# Xattrs: key offset = (name hash << 8) + DIRENT_BASE + collision slot,
# exactly as for directory entries
# ---------------------------------------------------------------------------

XATTR_INLINE_MAX = 512
XATTR_VALUE_MAX = 65536


def encode_xattr(name: bytes, value: bytes | OutOfLine) -> bytes:
    if isinstance(value, OutOfLine):
        return bytes([VAL_BLOCKS, len(name)]) + name + value.encode()
    return bytes([VAL_INLINE, len(name)]) + name + value


def decode_xattr(val: bytes, where: int | None = None) -> tuple[bytes, bytes | OutOfLine]:
    if len(val) < 2 or len(val) < 2 + val[1]:
        raise CorruptionError("xattr record", where, "truncated")
    kind, nlen = val[0], val[1]
    name = val[2:2 + nlen]
    rest = val[2 + nlen:]
    if kind == VAL_INLINE:
        return name, rest
    if kind == VAL_BLOCKS and len(rest) == _EXTVAL.size:
        return name, OutOfLine.decode(rest)
    raise CorruptionError("xattr record", where, f"value kind {kind}")


# ---------------------------------------------------------------------------
# Symlink targets
# ---------------------------------------------------------------------------

SYMLINK_INLINE_MAX = 1000
SYMLINK_MAX = 4095


def encode_symlink(target: bytes | OutOfLine) -> bytes:
    if isinstance(target, OutOfLine):
        return bytes([VAL_BLOCKS]) + target.encode()
    return bytes([VAL_INLINE]) + target


def decode_symlink(val: bytes, where: int | None = None) -> bytes | OutOfLine:
    if val[:1] == bytes([VAL_INLINE]):
        return val[1:]
    if val[:1] == bytes([VAL_BLOCKS]) and len(val) == 1 + _EXTVAL.size:
        return OutOfLine.decode(val[1:])
    raise CorruptionError("symlink record", where, "bad encoding")


# ---------------------------------------------------------------------------
# Checking an item on its own
# ---------------------------------------------------------------------------

_FILE_TYPES = {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
               stat.S_IFIFO, stat.S_IFSOCK}
_DTYPES = {t >> 12 for t in _FILE_TYPES}
_KNOWN_TYPES = {T_INODE, T_XATTR, T_DIRENT, T_EXTENT, T_SYMLINK}


class ItemContext:
    """What an item is checked against: the name-hash salt (the UUID) and
    the blocks a reference may name ([data_start, data_end))."""

    __slots__ = ("salt", "data_start", "data_end", "max_file_blocks")

    def __init__(self, salt: bytes, data_start: int, data_end: int, max_file_blocks: int):
        self.salt = salt
        self.data_start = data_start
        self.data_end = data_end
        self.max_file_blocks = max_file_blocks

    def _blocks(self, pblock: int, n: int) -> str | None:
        if pblock < self.data_start or pblock + n > self.data_end:
            return f"blocks {pblock}..{pblock + n - 1} outside the data area"
        return None

    def problem(self, key: tuple[int, int, int], val: bytes) -> str | None:
        """What is wrong with one item by itself, or None.

        A checksum only proves a block is what was written; a bug can write
        a well-formed block of nonsense.  So every leaf a reader loads has
        each item checked here (the same checks fsck's pass 2 makes), and a
        failing leaf is corrupt: EIO, never another file's bytes."""
        oid, typ, off = key
        try:
            if oid == ORPHAN_OID:
                return None if typ == T_ORPHAN and not val else "not an orphan record"
            if typ not in _KNOWN_TYPES:
                return f"unknown item type {typ}"
            if typ == T_INODE:
                if off != 0:
                    return "inode key with an offset"
                inode = Inode.decode(oid, val)
                if stat.S_IFMT(inode.mode) not in _FILE_TYPES:
                    return f"mode {inode.mode:#o}"
            elif typ == T_EXTENT:
                pblock, length, _ = decode_extent(val)
                if off + length > self.max_file_blocks:
                    return "extent beyond the maximum file size"
                return self._blocks(pblock, length)
            elif typ in (T_DIRENT, T_XATTR):
                if typ == T_DIRENT:
                    ino, dtype, name = decode_dirent(val)
                    if ino <= ORPHAN_OID or dtype not in _DTYPES:
                        return f"entry names inode {ino} of type {dtype}"
                    if b"/" in name or b"\0" in name:
                        return f"invalid name {name!r}"
                else:
                    name, value = decode_xattr(val)
                    if isinstance(value, OutOfLine):
                        return self._blocks(value.pblock, value.nblocks)
                lo, hi = dirent_range(name_hash(name, self.salt))
                if not lo <= off < hi:
                    return f"key does not match the hash of its name {name!r}"
            elif typ == T_SYMLINK:
                if off != 0:
                    return "symlink key with an offset"
                target = decode_symlink(val)
                if isinstance(target, OutOfLine):
                    return self._blocks(target.pblock, target.nblocks)
                if not target or len(target) > SYMLINK_MAX:
                    return f"symlink target of {len(target)} bytes"
        except CorruptionError as e:
            return e.detail
        return None
