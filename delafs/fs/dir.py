"""Directories: names, create/mkdir/mknod/symlink/link, unlink/rmdir,
rename with its flags, readdir (xfs_dir2 and the namespace half of xfs_inode.c).

A mixin of :class:`~delafs.fs.filesystem.Filesystem`: every method runs
on the Filesystem and keeps its locking rules (public methods are whole
metadata operations under ``meta_lock``)."""

from __future__ import annotations

import errno
import logging
import stat

from ..lib.errors import CorruptionError, DelafsError, FsError
from ..ondisk import (
    BLOCK_SIZE,
    MAX_NAME_LEN,
    ROOT_INO,
)
from .inode import now_ns
from .items import (
    COLLISION_SLOTS,
    NLINK_MAX,
    SYMLINK_INLINE_MAX,
    SYMLINK_MAX,
    T_DIRENT,
    T_SYMLINK,
    Inode,
    OutOfLine,
    decode_dirent,
    decode_symlink,
    dirent_range,
    dtype_of,
    encode_dirent,
    encode_symlink,
    name_hash,
)
from .xattr import check_xattr, xattr_blocks

log = logging.getLogger("delafs")

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4     # leave a whiteout (a 0/0 character device) at the old name

# Most names an inode may have (and subdirectories plus two a directory
# may count): the on-disk field's range.  Past it link(2), mkdir(2) and
# rename(2) fail with EMLINK before changing anything.
LINK_MAX = NLINK_MAX

def _check_nlink(inode: Inode) -> None:
    """``inode`` is about to gain a link (a name, or a subdirectory's "..")."""
    if inode.nlink >= LINK_MAX:
        raise FsError(errno.EMLINK, f"inode {inode.ino} has {inode.nlink} links, the most it may have")

def check_name(name: bytes) -> None:
    if not name or name in (b".", b".."):
        raise FsError(errno.EINVAL, f"invalid name {name!r}")
    if len(name) > MAX_NAME_LEN:
        raise FsError(errno.ENAMETOOLONG, f"name of {len(name)} bytes (max {MAX_NAME_LEN})")
    if b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, f"name {name!r} contains '/' or NUL")


class DirOps:

    async def find_entry(self, dir_ino: int, name: bytes) -> tuple[tuple, int, int] | None:
        """(key, child ino, dtype) of ``name`` in the directory, or None."""
        lo, hi = dirent_range(name_hash(name, self.salt))
        for key, val, blk in await self.tree.scan((dir_ino, T_DIRENT, lo), (dir_ino, T_DIRENT, hi),
                                                  with_block=True):
            ino, dtype, ename = decode_dirent(val, blk)
            if ename == name:
                return key, ino, dtype
        return None

    async def _dir(self, ino: int) -> Inode:
        inode = await self.iget(ino)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR, f"inode {ino} is not a directory")
        if inode.nlink == 0:
            raise FsError(errno.ENOENT, f"directory {ino} has been removed")
        return inode

    async def add_entry(self, dir_inode: Inode, name: bytes, child: Inode) -> None:
        lo, hi = dirent_range(name_hash(name, self.salt))
        used = {k[2] for k, _ in await self.tree.scan((dir_inode.ino, T_DIRENT, lo),
                                                      (dir_inode.ino, T_DIRENT, hi))}
        off = next((o for o in range(lo, hi) if o not in used), None)
        if off is None:
            raise FsError(errno.ENOSPC, f"more than {COLLISION_SLOTS} names share a hash")
        await self.tree.insert((dir_inode.ino, T_DIRENT, off),
                               encode_dirent(child.ino, dtype_of(child.mode), name))
        dir_inode.size += 1
        dir_inode.mtime = dir_inode.ctime = now_ns()

    async def lookup(self, dir_ino: int, name: bytes) -> Inode:
        if len(name) > MAX_NAME_LEN:
            # The kernel passes names up to 1,024 bytes to a FUSE daemon;
            # ext4_lookup answers a longer one than it stores like this.
            raise FsError(errno.ENAMETOOLONG, f"name of {len(name)} bytes (max {MAX_NAME_LEN})")
        async with self.transaction(write=False):
            await self._dir(dir_ino)
            found = await self.find_entry(dir_ino, name)
            if found is None:
                raise FsError(errno.ENOENT)
            inode = await self.iget(found[1])
            if dtype_of(inode.mode) != found[2]:
                # An entry redirected to another inode (a bug wrote it): the
                # type it recorded is the one check a reader can make.
                raise CorruptionError(f"directory {dir_ino}", None,
                                      f"entry {name!r} is of type {found[2]}, inode {inode.ino} of type "
                                      f"{dtype_of(inode.mode)}")
            return inode.copy()

    async def _check_new_name(self, dir_ino: int, name: bytes) -> Inode:
        check_name(name)
        d = await self._dir(dir_ino)
        if await self.find_entry(dir_ino, name) is not None:
            raise FsError(errno.EEXIST, f"{name!r} exists")
        return d

    async def create(self, dir_ino: int, name: bytes, mode: int, uid: int = 0, gid: int = 0,
                     rdev: int = 0, xattrs: dict[bytes, bytes] | None = None) -> Inode:
        """Create a regular file, fifo, socket or device node, with
        ``xattrs`` (inherited ACLs) in the same transaction."""
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise FsError(errno.EINVAL, "use mkdir/symlink")
        if not stat.S_IFMT(mode):
            mode |= stat.S_IFREG
        return await self._create(dir_ino, name, mode, uid, gid, rdev=rdev, xattrs=xattrs)

    async def mkdir(self, dir_ino: int, name: bytes, mode: int, uid: int = 0, gid: int = 0,
                    xattrs: dict[bytes, bytes] | None = None) -> Inode:
        return await self._create(dir_ino, name, stat.S_IFDIR | stat.S_IMODE(mode), uid, gid,
                                  xattrs=xattrs)

    async def _create(self, dir_ino: int, name: bytes, mode: int, uid: int, gid: int, *,
                      rdev: int = 0, xattrs: dict[bytes, bytes] | None) -> Inode:
        xattrs = xattrs or {}
        for k, v in xattrs.items():
            check_xattr(k, v)
        is_dir = stat.S_ISDIR(mode)
        async with self.transaction(items=2 + len(xattrs), data=sum(map(xattr_blocks, xattrs.values()))):
            d = await self._check_new_name(dir_ino, name)
            if is_dir:
                _check_nlink(d)
            inode = await self._new_inode(mode, uid, gid, rdev=rdev, parent=dir_ino if is_dir else 0)
            for k, v in xattrs.items():
                await self._set_xattr(inode, k, v)
            if xattrs:
                await self.log_inode(inode)       # out-of-line values count in its blocks
            await self.add_entry(d, name, inode)
            if is_dir:
                d.nlink += 1
            await self.log_inode(d)
            return inode.copy()

    async def symlink(self, dir_ino: int, name: bytes, target: bytes, uid: int = 0, gid: int = 0) -> Inode:
        if not target or len(target) > SYMLINK_MAX or b"\0" in target:
            raise FsError(errno.ENAMETOOLONG if len(target) > SYMLINK_MAX else errno.EINVAL,
                          "invalid symlink target")
        nblocks = 0 if len(target) <= SYMLINK_INLINE_MAX else -(-len(target) // BLOCK_SIZE)
        async with self.transaction(items=3, data=nblocks):
            d = await self._check_new_name(dir_ino, name)
            inode = await self._new_inode(stat.S_IFLNK | 0o777, uid, gid)
            inode.size = len(target)
            value: bytes | OutOfLine = target
            if nblocks:
                value = await self._write_out_of_line(inode, target)
            await self.tree.insert((inode.ino, T_SYMLINK, 0), encode_symlink(value))
            await self.log_inode(inode)
            await self.add_entry(d, name, inode)
            await self.log_inode(d)
            return inode.copy()

    async def readlink(self, ino: int) -> bytes:
        async with self.transaction(write=False):
            inode = await self.iget(ino)
            if not inode.is_symlink:
                raise FsError(errno.EINVAL, f"inode {ino} is not a symlink")
            val = await self.tree.lookup((ino, T_SYMLINK, 0))
            if val is None:
                raise CorruptionError(f"symlink {ino}", None, "target record missing")
            target = decode_symlink(val)
            if isinstance(target, OutOfLine):
                target = await self._read_out_of_line(target, f"symlink {ino} target")
            if len(target) != inode.size:
                # The inode records the target's length: a record that
                # was cut short (and resealed) must not read as a target.
                raise CorruptionError(f"symlink {ino}", None,
                                      f"target of {len(target)} bytes, the inode says {inode.size}")
            return target

    async def link(self, ino: int, dir_ino: int, name: bytes) -> Inode:
        async with self.transaction(items=1):
            d = await self._check_new_name(dir_ino, name)
            inode = await self.iget(ino)
            if inode.is_dir:
                raise FsError(errno.EPERM, "hard links to directories are not allowed")
            if inode.nlink == 0:
                raise FsError(errno.ENOENT, "inode has been unlinked")
            _check_nlink(inode)
            inode.nlink += 1
            inode.ctime = now_ns()
            await self.log_inode(inode)
            await self.add_entry(d, name, inode)
            await self.log_inode(d)
            return inode.copy()

    async def _remove_entry(self, d: Inode, key: tuple) -> None:
        await self.tree.delete(key)
        d.size -= 1
        d.mtime = d.ctime = now_ns()

    async def _drop_link(self, inode: Inode) -> None:
        """One name of ``inode`` is gone: free it or make it an orphan."""
        inode.nlink -= 1
        inode.ctime = now_ns()
        await self.log_inode(inode)
        if inode.nlink > 0:
            return
        # On the orphan list in the same transaction as the last name goes:
        # a crash, or a destroy that rolls its transaction, leaves an inode
        # that recovery finds and frees, never a leaked one.
        await self._orphan_add(inode.ino)
        if not self.open_counts.get(inode.ino):
            await self._destroy(inode)

    async def _lookup_entry(self, dir_ino: int, name: bytes) -> tuple[Inode, tuple, Inode]:
        """(directory, entry key, inode) of an existing name."""
        d = await self._dir(dir_ino)
        found = await self.find_entry(dir_ino, name)
        if found is None:
            raise FsError(errno.ENOENT)
        return d, found[0], await self.iget(found[1])

    async def unlink(self, dir_ino: int, name: bytes) -> None:
        async with self.transaction(items=1, pool=True):
            d, key, inode = await self._lookup_entry(dir_ino, name)
            if inode.is_dir:
                raise FsError(errno.EISDIR, f"{name!r} is a directory")
            await self._remove_entry(d, key)
            await self.log_inode(d)
            await self._drop_link(inode)

    async def rmdir(self, dir_ino: int, name: bytes) -> None:
        async with self.transaction(items=1, pool=True):
            d, key, inode = await self._lookup_entry(dir_ino, name)
            if not inode.is_dir:
                raise FsError(errno.ENOTDIR, f"{name!r} is not a directory")
            if inode.size:
                raise FsError(errno.ENOTEMPTY, f"{name!r} is not empty")
            await self._remove_entry(d, key)
            d.nlink -= 1
            await self.log_inode(d)
            inode.nlink = 1
            await self._drop_link(inode)

    async def _is_ancestor(self, anc: int, ino: int) -> bool:
        while True:
            if ino == anc:
                return True
            if ino == ROOT_INO:
                return False
            ino = (await self.iget(ino)).parent

    async def rename(self, odir: int, oname: bytes, ndir: int, nname: bytes, flags: int = 0,
                     *, uid: int = 0, gid: int = 0) -> None:
        """rename(2)/renameat2(2); ``uid``/``gid`` own a RENAME_WHITEOUT's whiteout."""
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or (
                flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT)):
            raise FsError(errno.EINVAL, f"bad rename flags {flags:#x}")
        check_name(nname)
        whiteout = bool(flags & RENAME_WHITEOUT)
        async with self.transaction(items=4 if whiteout else 2, pool=True):
            od = await self._dir(odir)
            nd = await self._dir(ndir)
            src = await self.find_entry(odir, oname)
            if src is None:
                raise FsError(errno.ENOENT)
            dst = await self.find_entry(ndir, nname)
            if src == dst or (odir == ndir and oname == nname):
                return
            sinode = await self.iget(src[1])
            if flags & RENAME_EXCHANGE:
                if dst is None:
                    raise FsError(errno.ENOENT)
                await self._exchange(od, src, sinode, nd, dst, oname, nname)
                return
            if dst is not None and flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if sinode.is_dir and odir != ndir and await self._is_ancestor(sinode.ino, ndir):
                raise FsError(errno.EINVAL, "cannot move a directory into itself")
            if sinode.is_dir and odir != ndir:
                _check_nlink(nd)
            dinode = None
            if dst is not None:
                dinode = await self.iget(dst[1])
                if sinode.ino == dinode.ino:
                    # Two names of one file: POSIX says do nothing.
                    return
                if dinode.is_dir and not sinode.is_dir:
                    raise FsError(errno.EISDIR)
                if sinode.is_dir and not dinode.is_dir:
                    raise FsError(errno.ENOTDIR)
                if dinode.is_dir and dinode.size:
                    raise FsError(errno.ENOTEMPTY)
                await self._remove_entry(nd, dst[0])
            await self._remove_entry(od, src[0])
            await self.add_entry(nd, nname, sinode)
            if whiteout:
                # What overlayfs reads as "deleted here": created in the
                # same transaction, so no one ever sees the name missing.
                wo = await self._new_inode(stat.S_IFCHR, uid, gid, rdev=0)
                await self.add_entry(od, oname, wo)
            if sinode.is_dir and odir != ndir:
                od.nlink -= 1
                nd.nlink += 1
                sinode.parent = ndir
            sinode.ctime = now_ns()
            await self.log_inode(sinode)
            await self.log_inode(od)
            if nd is not od:
                await self.log_inode(nd)
            if dinode is not None:
                if dinode.is_dir:
                    nd.nlink -= 1
                    await self.log_inode(nd)
                    dinode.nlink = 1
                await self._drop_link(dinode)

    async def _exchange(self, od, src, sinode, nd, dst, oname, nname) -> None:
        dinode = await self.iget(dst[1])
        for inode, other in ((sinode, nd), (dinode, od)):
            if inode.is_dir and other.ino != inode.parent and await self._is_ancestor(inode.ino, other.ino):
                raise FsError(errno.EINVAL, "cannot move a directory into itself")
        if od.ino != nd.ino and sinode.is_dir != dinode.is_dir:
            _check_nlink(nd if sinode.is_dir else od)     # it gains a subdirectory
        await self.tree.update(src[0], encode_dirent(dinode.ino, dtype_of(dinode.mode), oname))
        await self.tree.update(dst[0], encode_dirent(sinode.ino, dtype_of(sinode.mode), nname))
        if od.ino != nd.ino:
            for inode, newparent, oldparent in ((sinode, nd, od), (dinode, od, nd)):
                if inode.is_dir:
                    inode.parent = newparent.ino
                    newparent.nlink += 1
                    oldparent.nlink -= 1
        now = now_ns()
        for inode in {id(x): x for x in (sinode, dinode, od, nd)}.values():
            inode.ctime = now
            if inode is od or inode is nd:      # their entries changed
                inode.mtime = now
            await self.log_inode(inode)

    @staticmethod
    def _damaged_dir(dir_ino: int):
        def report(e: CorruptionError) -> None:
            log.error("directory %d: entries lost to %s", dir_ino, e)
        return report

    async def readdir(self, dir_ino: int, cookie: int = 0, limit: int = 1024) -> list[tuple[bytes, int, int, int]]:
        """Entries after ``cookie`` as (name, ino, dtype, next cookie).

        Cookies are the entries' key offsets + 1: stable across inserts and
        deletes of other names.  "." and ".." are the VFS adapter's business.
        """
        async with self.transaction(write=False):
            return await self._scan_dir(dir_ino, cookie, limit)

    async def _scan_dir(self, dir_ino: int, cookie: int, limit: int) -> list[tuple[bytes, int, int, int]]:
        await self._dir(dir_ino)
        out = []
        # A damaged leaf costs the entries it held, not the listing (as
        # ext4 and XFS list what they can read of a damaged directory).
        for key, val, blk in await self.tree.scan((dir_ino, T_DIRENT, cookie),
                                                  (dir_ino, T_DIRENT + 1, 0), limit,
                                                  with_block=True, on_damage=self._damaged_dir(dir_ino)):
            ino, dtype, name = decode_dirent(val, blk)
            out.append((name, ino, dtype, key[2] + 1))
        return out

    async def readdir_plus(self, dir_ino: int, cookie: int = 0, limit: int = 32) -> list[tuple]:
        """readdir with each entry's inode, in one transaction (FUSE's
        READDIRPLUS wants both; a transaction per entry was most of a
        listing's cost): (name, ino, dtype, next cookie, inode), where inode
        is a copy, or the error reading it gave (an entry whose inode is
        damaged, or whose type disagrees with it, is still listed)."""
        async with self.transaction(write=False):
            out = []
            for name, ino, dtype, nxt in await self._scan_dir(dir_ino, cookie, limit):
                try:
                    inode = (await self.iget(ino)).copy()
                    if dtype_of(inode.mode) != dtype:
                        raise CorruptionError(f"directory {dir_ino}", None,
                                              f"entry {name!r} disagrees with inode {ino}'s type")
                except DelafsError as e:
                    inode = e
                out.append((name, ino, dtype, nxt, inode))
            return out
