"""Extended attributes, inline or out of line (xfs_attr.c).

A mixin of :class:`~delafs.fs.filesystem.Filesystem`: every method runs
on the Filesystem and keeps its locking rules (public methods are whole
metadata operations under ``meta_lock``)."""

from __future__ import annotations

import errno

from ..lib.errors import CorruptionError, FsError
from ..ondisk import (
    BLOCK_SIZE,
    crc32c,
)
from .inode import now_ns
from .items import (
    T_XATTR,
    XATTR_INLINE_MAX,
    XATTR_VALUE_MAX,
    Inode,
    OutOfLine,
    decode_xattr,
    dirent_range,
    encode_xattr,
    name_hash,
)


def check_xattr(name: bytes, value: bytes) -> None:
    if not name or len(name) > 255:
        raise FsError(errno.ERANGE, "xattr name must be 1..255 bytes")
    if len(value) > XATTR_VALUE_MAX:
        raise FsError(errno.E2BIG, f"xattr value of {len(value)} bytes (max {XATTR_VALUE_MAX})")


def xattr_blocks(value: bytes) -> int:
    """Blocks a value stored out of line takes (0: it fits in its item)."""
    return 0 if len(value) <= XATTR_INLINE_MAX else -(-len(value) // BLOCK_SIZE)

XATTR_CREATE = 1
XATTR_REPLACE = 2


class XattrOps:

    async def _find_xattr(self, ino: int, name: bytes):
        lo, hi = dirent_range(name_hash(name, self.salt))
        for key, val, blk in await self.tree.scan((ino, T_XATTR, lo), (ino, T_XATTR, hi),
                                                  with_block=True):
            xname, value = decode_xattr(val, blk)
            if xname == name:
                return key, value
        return None

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        check_xattr(name, value)
        async with self.transaction(items=1, data=xattr_blocks(value)):
            inode = await self.iget(ino)
            found = await self._find_xattr(ino, name)
            if found and flags & XATTR_CREATE:
                raise FsError(errno.EEXIST)
            if not found and flags & XATTR_REPLACE:
                raise FsError(errno.ENODATA)
            await self._set_xattr(inode, name, value, found)
            inode.ctime = now_ns()
            await self.log_inode(inode)

    async def _set_xattr(self, inode: Inode, name: bytes, value: bytes, found=None) -> None:
        """Store one xattr item; ``found`` is the existing one (_find_xattr).
        The caller's operation reserved an item and xattr_blocks(value)."""
        inode.xattr_names = None        # before any await: getxattr's fast path reads it
        stored: bytes | OutOfLine = value
        if xattr_blocks(value):
            stored = await self._write_out_of_line(inode, value)
        item = encode_xattr(name, stored)
        if found:
            await self.tree.update(found[0], item)
            if isinstance(found[1], OutOfLine):
                self._free_out_of_line(inode, found[1])
            return
        ino = inode.ino
        lo, hi = dirent_range(name_hash(name, self.salt))
        used = {k[2] for k, _ in await self.tree.scan((ino, T_XATTR, lo), (ino, T_XATTR, hi))}
        off = next((o for o in range(lo, hi) if o not in used), None)
        if off is None:
            raise FsError(errno.ENOSPC, "too many xattr names share a hash")
        await self.tree.insert((ino, T_XATTR, off), item)

    def xattr_known_absent(self, ino: int, name: bytes) -> bool:
        """Does the cached inode say it has no xattr ``name``?  No lock, no
        tree: the kernel asks for security.capability before every
        write(2), and the answer is almost always "none"."""
        inode = self.inodes.get(ino)
        return (inode is not None and inode.xattr_names is not None
                and name not in inode.xattr_names and not self.shutdown)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        if self.xattr_known_absent(ino, name):
            raise FsError(errno.ENODATA)
        async with self.transaction(write=False):
            inode = await self.iget(ino)
            if name not in await self._xattr_names(inode):
                raise FsError(errno.ENODATA)
            found = await self._find_xattr(ino, name)
            if found is None:
                raise FsError(errno.ENODATA)
            value = found[1]
            if isinstance(value, OutOfLine):
                value = await self._read_out_of_line(value, f"xattr {name!r} of inode {ino}")
            return value

    async def listxattr(self, ino: int) -> list[bytes]:
        async with self.transaction(write=False):
            return list(await self._xattr_names(await self.iget(ino)))

    async def _xattr_names(self, inode: Inode) -> tuple:
        """The inode's xattr names in key order, listed once and kept."""
        if inode.xattr_names is None:
            ino = inode.ino
            items = await self.tree.scan((ino, T_XATTR, 0), (ino, T_XATTR + 1, 0))
            inode.xattr_names = tuple(decode_xattr(v)[0] for _, v in items)
        return inode.xattr_names

    async def removexattr(self, ino: int, name: bytes) -> None:
        async with self.transaction(pool=True):
            inode = await self.iget(ino)
            inode.xattr_names = None
            found = await self._find_xattr(ino, name)
            if found is None:
                raise FsError(errno.ENODATA)
            await self.tree.delete(found[0])
            if isinstance(found[1], OutOfLine):
                self._free_out_of_line(inode, found[1])
            inode.ctime = now_ns()
            await self.log_inode(inode)

    async def _write_out_of_line(self, inode: Inode, value: bytes) -> OutOfLine:
        """Store a large value in whole blocks of its own.  The blocks are
        written and flushed before the item naming them can commit."""
        nblocks = -(-len(value) // BLOCK_SIZE)
        start, n = self.space.take(nblocks, None, minlen=nblocks)
        padded = value + bytes(nblocks * BLOCK_SIZE - len(value))
        await self.dev.write(start, [padded])
        await self.dev.flush()
        inode.blocks += n
        return OutOfLine(start, n, len(value), crc32c(value))

    async def _read_out_of_line(self, ref: OutOfLine, what: str) -> bytes:
        buf = await self.dev.read(ref.pblock, ref.nblocks)
        value = bytes(buf[:ref.length])
        if crc32c(value) != ref.crc:
            raise CorruptionError(what, ref.pblock, "value checksum mismatch")
        return value

    def _free_out_of_line(self, inode: Inode, ref: OutOfLine) -> None:
        self.space.free(ref.pblock, ref.nblocks)
        inode.blocks -= ref.nblocks
