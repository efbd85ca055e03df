"""The VFS adapter (layer 1): pyfuse3 requests -> Mount / Filesystem calls.

No storage logic lives here: requests are translated, i_rwsem is taken by
the Mount's file operations, errors become errno replies.  Every handler
runs inside :func:`_reply`, so an unexpected exception is logged with its
traceback and answered with EIO instead of killing the daemon.

What pyfuse3 3.5 lets a daemon see (see docs/engine.md): page faults are
handled by the kernel and arrive here only as READs and later WRITEs; there
is no fallocate, lseek (SEEK_DATA/HOLE), ioctl or syncfs handler, setxattr
carries no XATTR_CREATE/REPLACE flags, and sync(1) never reaches us.  So a
hidden control file (the protocol is in control.py; this adapter only
serves the file) is how ``delafs sync``, ``stat`` and ``inject`` talk to a
mounted filesystem.

Inode numbers are the format's persistent ones (the root is 1, as FUSE
wants) with their generation, so they are stable across remounts.  The
kernel's lookup counts are kept exactly (lookup, create, readdirplus
entries, forget); an unlinked inode lives while the kernel knows it or a
file is open, and the orphan list makes a crash in between harmless.
"""

from __future__ import annotations

import collections
import errno
import functools
import json
import logging
import os
import stat

import pyfuse3
import trio

from ..fs.acl import ACL_ACCESS, ACL_DEFAULT, acl_chmod, acl_create, acl_entries, acl_mode
from ..fs.dir import RENAME_WHITEOUT
from ..fs.items import Inode
from ..lib.errors import CorruptionError, DelafsError, FsError
from ..ondisk import BLOCK_SIZE, ROOT_INO
from ..vfs.mount import Mount, OpenFile
from .control import CONTROL_INO, CONTROL_NAME
from .invalidate import KernelCacheInvalidator

log = logging.getLogger("delafs")

ENTRY_TIMEOUT = 300.0            # we are the only writer of the image
ATTR_TIMEOUT = 300.0
# Entries (with their inodes) fetched per batch by readdir: a READDIRPLUS
# reply fills one 4 KiB page, ~25 entries of ~150 bytes; a seekdir reader
# (xfstests generic/676) asks for a page at each of its random offsets.
READDIR_BATCH = 32



# Handlers whose first argument is a file handle (the others take an inode).
_FH_HANDLERS = frozenset({"read", "write", "flush", "release", "fsync"})


def _reply(fn):
    """Map delafs errors to FUSE errors; never let an exception escape:
    once the daemon has taken a request the kernel waits for its answer
    (through SIGKILL), so every path must end in a reply."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        try:
            if self.m.errortags.active and self._handler_bug(name, args):
                raise RuntimeError(f"handler_bug errortag in {name}")
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except CorruptionError as e:
            log.error("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except DelafsError as e:
            log.error("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception:
            log.exception("unexpected error in %s%r", fn.__name__, args[:3])
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


CAP_FSETID = 4
CAP_SYS_ADMIN = 21

#: The xattr namespaces a local filesystem knows (ext4's handlers); FUSE
#: passes every name through, so the daemon refuses the rest, as they do.
_XATTR_NAMESPACES = frozenset({b"user", b"trusted", b"security", b"system"})


def _size_bucket(n: int) -> int:
    """The smallest power of two >= n (n > 0; 1 for an empty request)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _proc_status(ctx) -> dict[str, str]:
    """The /proc status fields of the process behind a request: FUSE passes
    only its uid, gid and pid (pyfuse3 no setxattr flags, so not the
    kernel's FUSE_SETXATTR_ACL_KILL_SGID either).  Empty for a process
    already gone, which then has no groups and no capabilities."""
    try:
        with open(f"/proc/{ctx.pid}/status") as f:
            return dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return {}


def _capable(ctx, cap: int, fields: dict[str, str] | None = None) -> bool:
    fields = _proc_status(ctx) if fields is None else fields
    return bool(int(fields.get("CapEff", "0").strip() or "0", 16) >> cap & 1)


def _in_group_or_capable(ctx, gid: int) -> bool:
    """The kernel's in_group_or_capable() for the process behind a request:
    is ``gid`` its fsgid or a supplementary group, or has it CAP_FSETID?"""
    if ctx.gid == gid:
        return True
    fields = _proc_status(ctx)
    return str(gid) in fields.get("Groups", "").split() or _capable(ctx, CAP_FSETID, fields)


def _suid_sgid_to_drop(ctx, attr) -> int:
    """setattr_should_drop_suidgid(): the S_ISUID/S_ISGID bits a truncate
    or write by this caller must clear (0 for root, with CAP_FSETID)."""
    mode = attr.mode
    if not stat.S_ISREG(mode) or not mode & (stat.S_ISUID | stat.S_ISGID):
        return 0
    kill = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not _in_group_or_capable(ctx, attr.gid)):
        kill |= stat.S_ISGID
    return kill if kill and not _capable(ctx, CAP_FSETID) else 0


class _Dir:
    __slots__ = ("ino",)

    def __init__(self, ino: int):
        self.ino = ino


class Operations(pyfuse3.Operations):
    """Attributes:
      m          the Mount (page cache + engine + filesystem)
      lookups    ino -> kernel lookup count
      files      fh -> OpenFile; dirs: fh -> _Dir
      direct     fhs opened with O_DIRECT: their writes invalidate the
                 kernel's cached pages of the inode (fuse/invalidate.py)
      invalidator  runs those invalidations
      control    a callable handling writes to the control file
    """

    enable_writeback_cache = False

    def __init__(self, m: Mount, *, control=None, entry_timeout: float = ENTRY_TIMEOUT,
                 attr_timeout: float = ATTR_TIMEOUT):
        super().__init__()
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.m = m
        self.fs = m.fs
        self.lookups: dict[int, int] = {}
        self.files: dict[int, OpenFile | _Dir | str] = {}
        self.direct: set[int] = set()
        self.invalidator = KernelCacheInvalidator()
        self.stats = {"evicted_inodes": 0}
        # READ and WRITE requests by size (a power of two at least as large):
        # the kernel, not the reader, sizes them (its readahead window, its
        # writeback), and the per-request cost is what a Python daemon pays.
        self.request_sizes: dict[str, collections.Counter] = {
            "read": collections.Counter(), "write": collections.Counter()}
        self._next_fh = 1
        self.control = control
        self.control_out: dict[int, bytes] = {}

    def _handler_bug(self, name: str, args: tuple) -> bool:
        """Should the handler_bug errortag fail this request?  Never the
        control file's (the test turning the tag off needs it) nor a forget
        (which has no reply to carry an error)."""
        if name == "forget" or not args:
            return False
        first = args[0]
        if name in _FH_HANDLERS:
            if self.files.get(first) == "control":
                return False
        elif first == CONTROL_INO or (len(args) > 1 and args[1] == CONTROL_NAME):
            return False
        return self.m.errortags.fires("handler_bug")

    # -- attributes ------------------------------------------------------------

    def _entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode.ino
        # The kernel wants the root's generation to be 0 (it warns "root
        # generation should be zero"); its on-disk one is 1.
        e.generation = inode.generation if inode.ino != ROOT_INO else 0
        e.entry_timeout = self.entry_timeout
        e.attr_timeout = self.attr_timeout
        e.st_mode = inode.mode
        e.st_nlink = inode.nlink
        e.st_uid = inode.uid
        e.st_gid = inode.gid
        e.st_rdev = inode.rdev
        vi = self.m.inodes.get(inode.ino)
        e.st_size = vi.size if vi is not None and inode.is_reg else inode.size
        e.st_blksize = BLOCK_SIZE
        e.st_blocks = self.fs.stat_blocks(inode) * (BLOCK_SIZE // 512)
        e.st_atime_ns = inode.atime
        e.st_mtime_ns = inode.mtime
        e.st_ctime_ns = inode.ctime
        e.st_birthtime_ns = inode.btime
        return e


    def _control_entry(self) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = CONTROL_INO
        e.st_mode = stat.S_IFREG | 0o600
        e.st_nlink = 1
        e.st_size = 0
        e.entry_timeout = 0
        e.attr_timeout = 0
        e.st_blksize = BLOCK_SIZE
        return e

    def _unreadable_entry(self, ino: int, dtype: int) -> pyfuse3.EntryAttributes:
        """A directory entry whose inode cannot be read: listed with its
        type and nothing else, never cached, so a stat of it asks again
        and gets EIO (ls shows it with question marks, as on ext4)."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.st_mode = dtype << 12
        e.entry_timeout = 0
        e.attr_timeout = 0
        e.st_blksize = BLOCK_SIZE
        return e

    def _remember_ino(self, ino: int) -> None:
        """The kernel now knows ``ino`` once more."""
        n = self.lookups.get(ino, 0)
        self.lookups[ino] = n + 1
        if n == 0:
            self.fs.open_ref(ino)

    async def _remember(self, inode: Inode) -> pyfuse3.EntryAttributes:
        self._remember_ino(inode.ino)
        return self._entry(inode)

    async def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.getattr(ino))

    # -- lookup / forget -------------------------------------------------------------

    @_reply
    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == ROOT_INO and name == CONTROL_NAME:
            return self._control_entry()
        if name == b".":
            inode = await self.fs.getattr(parent_inode)
        elif name == b"..":
            p = await self.fs.getattr(parent_inode)
            inode = await self.fs.getattr(p.parent or ROOT_INO)
        else:
            inode = await self.fs.lookup(parent_inode, name)
        return await self._remember(inode)

    async def forget(self, inode_list):
        """FORGET has no reply to carry an error, and pyfuse3 does not catch
        one from this handler: it ends the session loop, the daemon exits
        and the mount goes away.  So not @_reply: every error is logged, per
        inode, and the rest of the list still forgotten."""
        for ino, n in inode_list:
            if ino == CONTROL_INO:
                continue
            left = self.lookups.get(ino, 0) - n
            if left > 0:
                self.lookups[ino] = left
                continue
            self.lookups.pop(ino, None)
            try:
                await self._drop_inode(ino)
            except Exception as e:
                if isinstance(e, DelafsError):
                    log.warning("forgetting inode %d: %s", ino, e)
                else:
                    log.exception("forgetting inode %d", ino)

    async def _drop_inode(self, ino: int) -> None:
        """The kernel forgot the inode: drop its reference (the filesystem
        frees an unlinked inode once no reference is left) and, if it is
        still unused, its clean pages and in-memory inode."""
        await self._evict_if_unlinked(ino)
        await self.fs.close_ref(ino)
        if self._unused(ino) and self.m.evict_clean(ino):
            self.stats["evicted_inodes"] += 1

    def _unused(self, ino: int) -> bool:
        """The kernel no longer knows the inode and no file holds it open."""
        return ino not in self.lookups and not any(
            isinstance(f, OpenFile) and f.inode.ino == ino for f in self.files.values())

    async def _evict_if_unlinked(self, ino: int) -> None:
        if self._unused(ino):
            await self.m.evict_if_unlinked(ino)

    # -- attributes ---------------------------------------------------------------------

    @_reply
    async def getattr(self, inode, ctx=None):
        if inode == CONTROL_INO:
            return self._control_entry()
        if inode == ROOT_INO and self.fs.shutdown:
            # After a shutdown everything fails with EIO (as XFS's getattr
            # does), but the kernel needs the root's attributes to walk to
            # the control file, and delafs umount/stat must still get there.
            return self._entry(self.fs.root_as_cached())
        return await self._attr(inode)

    @_reply
    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode == CONTROL_INO:
            return self._control_entry()
        if fields.update_size:
            await self.m.truncate(inode, attr.st_size)
        kw = {}
        if fields.update_mode:
            kw["mode"] = attr.st_mode
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_atime:
            kw["atime"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime"] = attr.st_mtime_ns
        if fields.update_ctime:
            kw["ctime"] = attr.st_ctime_ns
        # Always stamps ctime: a SETATTR with no field set is chown(f, -1,
        # -1), whose ATTR_CTIME FUSE passes only under writeback_cache.
        new = await self.fs.setattr(inode, **kw)
        if fields.update_mode:
            await self._acl_follow_mode(inode, new.mode)
        return self._entry(new)

    async def _acl_follow_mode(self, ino: int, mode: int) -> None:
        try:
            acl = await self.fs.getxattr(ino, ACL_ACCESS)
        except FsError as e:
            if e.errno == errno.ENODATA:
                return
            raise
        await self.fs.setxattr(ino, ACL_ACCESS, acl_chmod(acl, mode))

    @_reply
    async def access(self, inode, mode, ctx):
        # default_permissions makes the kernel check modes; we only say the
        # inode exists.
        if inode != CONTROL_INO:
            await self.fs.getattr(inode)
        return True

    # -- namespace -----------------------------------------------------------------------

    def _new_owner(self, parent: Inode, ctx, mode: int) -> tuple[int, int, int]:
        """BSD group semantics under a setgid directory, as Linux does."""
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        return ctx.uid, gid, mode

    async def _inherit_acl(self, parent: int, mode: int) -> tuple[int, dict[bytes, bytes]]:
        """posix_acl_create(): with -o acl, a new inode under a directory
        with a default ACL takes its mode and access ACL from it (a new
        directory the default ACL too).  Symlinks have no ACLs."""
        if not self.enable_acl or stat.S_ISLNK(mode):
            return mode, {}
        try:
            default = await self.fs.getxattr(parent, ACL_DEFAULT)
        except FsError as e:
            if e.errno == errno.ENODATA:
                return mode, {}
            raise
        mode, access = acl_create(default, mode)
        xattrs = {ACL_DEFAULT: default} if stat.S_ISDIR(mode) else {}
        if access is not None:
            xattrs[ACL_ACCESS] = access
        return mode, xattrs

    def _refuse_control(self, parent: int, name: bytes) -> None:
        if parent == ROOT_INO and name == CONTROL_NAME:
            raise FsError(errno.EEXIST, "reserved name")

    @_reply
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self._refuse_control(parent_inode, name)
        parent = await self.fs.getattr(parent_inode)
        uid, gid, mode = self._new_owner(parent, ctx, mode)
        mode, xattrs = await self._inherit_acl(parent_inode, mode)
        inode = await self.fs.create(parent_inode, name, mode, uid, gid, rdev=rdev, xattrs=xattrs)
        return await self._remember(inode)

    @_reply
    async def mkdir(self, parent_inode, name, mode, ctx):
        self._refuse_control(parent_inode, name)
        parent = await self.fs.getattr(parent_inode)
        uid, gid, mode = self._new_owner(parent, ctx, stat.S_IFDIR | mode)
        mode, xattrs = await self._inherit_acl(parent_inode, mode)
        inode = await self.fs.mkdir(parent_inode, name, mode, uid, gid, xattrs=xattrs)
        return await self._remember(inode)

    @_reply
    async def symlink(self, parent_inode, name, target, ctx):
        self._refuse_control(parent_inode, name)
        parent = await self.fs.getattr(parent_inode)
        uid, gid, _ = self._new_owner(parent, ctx, stat.S_IFLNK)
        inode = await self.fs.symlink(parent_inode, name, target, uid, gid)
        return await self._remember(inode)

    @_reply
    async def readlink(self, inode, ctx):
        return await self.fs.readlink(inode)

    @_reply
    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._refuse_control(new_parent_inode, new_name)
        return await self._remember(await self.fs.link(inode, new_parent_inode, new_name))

    @_reply
    async def unlink(self, parent_inode, name, ctx):
        if parent_inode == ROOT_INO and name == CONTROL_NAME:
            raise FsError(errno.EPERM, "the control file cannot be removed")
        await self.fs.unlink(parent_inode, name)

    @_reply
    async def rmdir(self, parent_inode, name, ctx):
        await self.fs.rmdir(parent_inode, name)

    @_reply
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        for p, n in ((parent_inode_old, name_old), (parent_inode_new, name_new)):
            if p == ROOT_INO and n == CONTROL_NAME:
                raise FsError(errno.EPERM, "the control file cannot be renamed")
        uid = gid = 0
        if flags & RENAME_WHITEOUT:     # the whiteout is the caller's, as a mknod would be
            uid, gid, _ = self._new_owner(await self.fs.getattr(parent_inode_old), ctx, stat.S_IFCHR)
        await self.m.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags,
                            uid=uid, gid=gid)

    # -- directories ------------------------------------------------------------------------

    def _new_fh(self, obj) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.files[fh] = obj
        return fh

    @_reply
    async def opendir(self, inode, ctx):
        attr = await self.fs.getattr(inode)
        if not attr.is_dir:
            raise FsError(errno.ENOTDIR)
        return self._new_fh(_Dir(inode))

    @_reply
    async def readdir(self, fh, start_id, token):
        d = self.files[fh]
        if start_id == 0:
            await self.m.touch_atime(d.ino, is_dir=True)
        if start_id < 1:
            if not pyfuse3.readdir_reply(token, b".", await self._attr(d.ino), 1):
                return
        if start_id < 2:
            parent = (await self.fs.getattr(d.ino)).parent or ROOT_INO
            if not pyfuse3.readdir_reply(token, b"..", await self._attr(parent), 2):
                return
        cookie = max(start_id, 0) if start_id > 2 else 0
        replied = False         # entries counted as lookups in this reply
        while True:
            try:
                entries = await self.fs.readdir_plus(d.ino, cookie, READDIR_BATCH)
            except DelafsError:
                if replied:
                    # An error reply would make the kernel drop the entries
                    # already in this one, which count as lookups here: end
                    # the reply; the READDIR from this cookie gets the error.
                    return
                raise
            if not entries:
                return
            for name, ino, dtype, nxt, inode in entries:
                if isinstance(inode, FsError):          # gone (a dangling entry)
                    cookie = nxt
                    continue
                attr = (self._unreadable_entry(ino, dtype) if isinstance(inode, DelafsError)
                        else self._entry(inode))
                if not pyfuse3.readdir_reply(token, name, attr, nxt):
                    return
                self._remember_ino(ino)
                replied = True
                cookie = nxt

    @_reply
    async def releasedir(self, fh):
        self.files.pop(fh, None)

    @_reply
    async def fsyncdir(self, fh, datasync):
        await self.m.fsyncdir()

    # -- files ----------------------------------------------------------------------------------

    @_reply
    async def open(self, inode, flags, ctx):
        if inode == CONTROL_INO:
            fi = pyfuse3.FileInfo(fh=self._new_fh("control"), direct_io=True, nonseekable=False)
            return fi
        attr = await self.fs.getattr(inode)
        if attr.is_dir:
            raise FsError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        f = await self.m.open(inode, write=writable)
        if flags & os.O_TRUNC:
            # Atomic O_TRUNC is negotiated: no SETATTR follows, so truncate
            # here, against the in-memory size (data not yet written back
            # counts), stamping the times even of an empty file.  The
            # kernel has already checked write permission for O_TRUNC, and
            # dropped the mode change that kills setuid/setgid with it.
            try:
                kill = _suid_sgid_to_drop(ctx, attr)
                if kill:
                    await self.fs.setattr(inode, mode=attr.mode & ~kill)
                await self.m.truncate(inode, 0)
            except BaseException:
                await self.m.release(f)
                raise
        fh = self._new_fh(f)
        if flags & os.O_DIRECT:
            self.direct.add(fh)
        # strictatime: every open drops the kernel's cached pages, so that
        # reads reach the daemon and move atime.
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.m.atime != "strict")

    @_reply
    async def create(self, parent_inode, name, mode, flags, ctx):
        self._refuse_control(parent_inode, name)
        parent = await self.fs.getattr(parent_inode)
        uid, gid, mode = self._new_owner(parent, ctx, mode)
        mode, xattrs = await self._inherit_acl(parent_inode, mode)
        inode = await self.fs.create(parent_inode, name, mode, uid, gid, xattrs=xattrs)
        f = await self.m.open(inode.ino, write=True)
        entry = await self._remember(inode)     # the kernel has it only if this succeeds
        fh = self._new_fh(f)
        if flags & os.O_DIRECT:
            self.direct.add(fh)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), entry

    @_reply
    async def read(self, fh, off, size):
        f = self.files[fh]
        if f == "control":
            data = self.control_out.get(fh)
            if data is None:
                data = (await self.control(b"stat") if self.control is not None
                        else json.dumps(self.m_statistics(), indent=1).encode() + b"\n")
                self.control_out[fh] = data
            return data[off:off + size]
        self.request_sizes["read"][_size_bucket(size)] += 1
        return await self.m.read(f, off, size)

    @_reply
    async def write(self, fh, off, buf):
        f = self.files[fh]
        if f == "control":
            if self.control is None:
                raise FsError(errno.EOPNOTSUPP)
            self.control_out[fh] = await self.control(bytes(buf))
            return len(buf)
        self.request_sizes["write"][_size_bucket(len(buf))] += 1
        n = await self.m.write(f, off, buf)
        if fh in self.direct:
            await self.invalidator.after_direct_write(f.inode.ino)
        return n

    @_reply
    async def flush(self, fh):
        pass

    @_reply
    async def release(self, fh):
        f = self.files.pop(fh, None)
        self.control_out.pop(fh, None)
        self.direct.discard(fh)
        if isinstance(f, OpenFile):
            await self._evict_if_unlinked(f.inode.ino)
            await self.m.release(f)

    @_reply
    async def fsync(self, fh, datasync):
        f = self.files[fh]
        if isinstance(f, OpenFile):
            await self.m.fsync(f, datasync)

    # -- xattrs --------------------------------------------------------------------------------

    def _check_xattr_name(self, name: bytes) -> None:
        """The names a local filesystem would take (xattr_resolve_name): a
        known namespace and a non-empty name in it; of system.*, the POSIX
        ACLs, and only with -o acl (without it the kernel would not enforce
        them: ext4 mounted noacl refuses them as well)."""
        ns, dot, rest = name.partition(b".")
        if not dot or ns not in _XATTR_NAMESPACES:
            raise FsError(errno.EOPNOTSUPP)
        if not rest:
            raise FsError(errno.EINVAL)
        if ns == b"system" and (name not in (ACL_ACCESS, ACL_DEFAULT) or not self.enable_acl):
            raise FsError(errno.EOPNOTSUPP)

    @_reply
    async def setxattr(self, inode, name, value, ctx):
        if inode == CONTROL_INO:
            raise FsError(errno.EOPNOTSUPP)
        self._check_xattr_name(name)
        if name == ACL_DEFAULT:
            acl_entries(value)
            if not (await self.fs.getattr(inode)).is_dir:
                raise FsError(errno.EACCES, "default ACLs belong to directories")
        if name == ACL_ACCESS:
            bits, equiv = acl_mode(value)
            old = await self.fs.getattr(inode)
            mode = (old.mode & ~0o777) | bits
            if mode & stat.S_ISGID and not _in_group_or_capable(ctx, old.gid):
                mode &= ~stat.S_ISGID           # posix_acl_update_mode()
            await self.fs.setattr(inode, mode=mode)
            if equiv:
                try:
                    await self.fs.removexattr(inode, name)
                except FsError as e:
                    if e.errno != errno.ENODATA:
                        raise
                return
        await self.fs.setxattr(inode, name, value)

    @_reply
    async def getxattr(self, inode, name, ctx):
        if inode == CONTROL_INO:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        self._check_xattr_name(name)
        if self.fs.xattr_known_absent(inode, name):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        try:
            return await self.fs.getxattr(inode, name)
        except FsError as e:
            if e.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @_reply
    async def listxattr(self, inode, ctx):
        if inode == CONTROL_INO:
            return []
        names = await self.fs.listxattr(inode)
        # As the local filesystems list them: trusted.* only to
        # CAP_SYS_ADMIN, the ACLs only where they are enforced.
        if any(n.startswith(b"trusted.") for n in names) and not _capable(ctx, CAP_SYS_ADMIN):
            names = [n for n in names if not n.startswith(b"trusted.")]
        if not self.enable_acl:
            names = [n for n in names if not n.startswith(b"system.")]
        return names

    @_reply
    async def removexattr(self, inode, name, ctx):
        if inode == CONTROL_INO:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        self._check_xattr_name(name)
        try:
            await self.fs.removexattr(inode, name)
        except FsError as e:
            if e.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    # -- whole filesystem ---------------------------------------------------------------------

    @_reply
    async def statfs(self, ctx):
        s = self.fs.statfs()
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = BLOCK_SIZE
        st.f_blocks = s["blocks"]
        st.f_bfree = s["bfree"]
        st.f_bavail = s["bavail"]
        st.f_files = s["files"]
        st.f_ffree = s["ffree"]
        st.f_favail = s["ffree"]
        st.f_namemax = s["namemax"]
        return st

    def m_statistics(self) -> dict:
        stats = self.m.statistics()
        stats["vfs"] = {"known_inodes": len(self.lookups), "open_files": len(self.files),
                        "cached_inodes": len(self.m.inodes), **self.stats,
                        **self.invalidator.stats}
        stats["fuse"] = {"request_sizes": {op: sorted(c.items()) for op, c in self.request_sizes.items()}}
        return stats

