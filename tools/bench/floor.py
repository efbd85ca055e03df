#!/usr/bin/env python3
"""The Python floor: a minimal pyfuse3 + trio passthrough filesystem.

    python tools/bench/floor.py SOURCE_DIR MOUNTPOINT [--debug]

Every request is answered by the matching system call on SOURCE_DIR (a
directory on the host), nothing else: no cache, no journal, no allocation.
It is what the benchmark suite compares delafs with to show what pyfuse3
and FUSE cost before delafs does anything.  So it is set up like delafs's
daemon (delafs/fuse/daemon.py, delafs/fuse/options.py): FUSE options
``default_permissions`` and ``fsname=SOURCE_DIR``, entry and attribute
timeouts of 300 s, no writeback cache, ``keep_cache`` on open and create,
and the trio event loop.  Extended attributes pass through, so the kernel
asks the floor for security.capability before every write as it asks
delafs.  The system calls run synchronously inside the handlers (no
thread hop): the cheapest a Python daemon can answer.

Inode numbers are the host's (the source directory itself is inode 1, as
FUSE wants); ``paths`` maps each inode the kernel knows to its host path,
and forgets it when the kernel's lookup count drops to zero.  File handles
are host file descriptors.

It runs in the foreground until the mount goes away (``fusermount3 -u``,
``umount``) or SIGTERM/SIGINT arrives (then it unmounts itself), and exits 0.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat
import sys

import pyfuse3
import trio

TIMEOUT = 300.0          # delafs's default entry_timeout and attr_timeout
ROOT = pyfuse3.ROOT_INODE

log = logging.getLogger("floor")


def _fuse_errors(fn):
    """OSError -> FUSEError with the same errno; anything else -> EIO."""
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    wrapper.__name__ = fn.__name__
    return wrapper


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, source: str):
        super().__init__()
        self.source = os.path.abspath(source)
        self.root_host_ino = os.lstat(self.source).st_ino
        self.paths: dict[int, str] = {ROOT: self.source}
        self.lookups: dict[int, int] = {}
        self.open_fds: dict[int, int] = {}      # fh (host fd) -> inode
        self.dirs: dict[int, list] = {}          # directory handle -> listing
        self.next_dir_fh = 1

    # -- inodes and attributes -------------------------------------------------------

    def _ino(self, host_ino: int) -> int:
        return ROOT if host_ino == self.root_host_ino else host_ino

    def _path(self, ino: int) -> str:
        try:
            return self.paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _entry(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = self._ino(st.st_ino)
        e.generation = 0
        e.entry_timeout = TIMEOUT
        e.attr_timeout = TIMEOUT
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _remember(self, path: str, st: os.stat_result) -> pyfuse3.EntryAttributes:
        ino = self._ino(st.st_ino)
        self.paths[ino] = path
        self.lookups[ino] = self.lookups.get(ino, 0) + 1
        return self._entry(st)

    def _stat(self, ino: int) -> os.stat_result:
        try:
            return os.lstat(self._path(ino))
        except FileNotFoundError:
            # Unlinked but still open: ask the descriptor.
            for fd, i in self.open_fds.items():
                if i == ino:
                    return os.fstat(fd)
            raise

    def _chown_to_caller(self, path: str, ctx, *, follow: bool = True) -> None:
        if ctx is not None and (ctx.uid != os.geteuid() or ctx.gid != os.getegid()):
            os.chown(path, ctx.uid, ctx.gid, follow_symlinks=follow)

    # -- lookup, attributes ------------------------------------------------------------

    @_fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        path = self._child(parent_inode, name)
        return self._remember(path, os.lstat(path))

    @_fuse_errors
    async def forget(self, inode_list):
        for ino, n in inode_list:
            left = self.lookups.get(ino, 0) - n
            if left > 0:
                self.lookups[ino] = left
            else:
                self.lookups.pop(ino, None)
                if ino != ROOT and ino not in self.open_fds.values():
                    self.paths.pop(ino, None)

    @_fuse_errors
    async def getattr(self, inode, ctx=None):
        return self._entry(self._stat(inode))

    @_fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._path(inode)
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            else:
                os.truncate(path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.chown(path, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1, follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(path, ns=(atime, mtime), follow_symlinks=False)
        return self._entry(self._stat(inode))

    # Extended attributes pass through too: a daemon without them answers
    # ENOSYS once and the kernel stops asking, which would spare the floor
    # the GETXATTR(security.capability) every write(2) costs delafs.

    @_fuse_errors
    async def getxattr(self, inode, name, ctx):
        return os.getxattr(self._path(inode), name, follow_symlinks=False)

    @_fuse_errors
    async def setxattr(self, inode, name, value, ctx):
        os.setxattr(self._path(inode), name, value, follow_symlinks=False)

    @_fuse_errors
    async def listxattr(self, inode, ctx):
        return [os.fsencode(n) for n in os.listxattr(self._path(inode), follow_symlinks=False)]

    @_fuse_errors
    async def removexattr(self, inode, name, ctx):
        os.removexattr(self._path(inode), name, follow_symlinks=False)

    @_fuse_errors
    async def statfs(self, ctx):
        v = os.statvfs(self.source)
        s = pyfuse3.StatvfsData()
        s.f_bsize, s.f_frsize = v.f_bsize, v.f_frsize
        s.f_blocks, s.f_bfree, s.f_bavail = v.f_blocks, v.f_bfree, v.f_bavail
        s.f_files, s.f_ffree, s.f_favail = v.f_files, v.f_ffree, v.f_favail
        s.f_namemax = v.f_namemax
        return s

    # -- names -----------------------------------------------------------------------

    @_fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        os.mkdir(path, stat.S_IMODE(mode))
        self._chown_to_caller(path, ctx)
        return self._remember(path, os.lstat(path))

    @_fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        path = self._child(parent_inode, name)
        os.symlink(os.fsdecode(target), path)
        self._chown_to_caller(path, ctx, follow=False)
        return self._remember(path, os.lstat(path))

    @_fuse_errors
    async def readlink(self, inode, ctx):
        return os.fsencode(os.readlink(self._path(inode)))

    @_fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        os.unlink(self._child(parent_inode, name))

    @_fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        os.rmdir(self._child(parent_inode, name))

    @_fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        os.rename(old, new)
        # Paths the kernel may still use: the renamed inode and, for a
        # directory, everything known below it.
        prefix = old + os.sep
        for ino, p in list(self.paths.items()):
            if p == old:
                self.paths[ino] = new
            elif p.startswith(prefix):
                self.paths[ino] = new + p[len(old):]

    # -- directories -------------------------------------------------------------------

    @_fuse_errors
    async def opendir(self, inode, ctx):
        path = self._path(inode)
        listing = []
        with os.scandir(path) as it:
            for d in it:
                listing.append((os.fsencode(d.name), d.path, d.stat(follow_symlinks=False)))
        fh = self.next_dir_fh
        self.next_dir_fh += 1
        self.dirs[fh] = listing
        return fh

    @_fuse_errors
    async def readdir(self, fh, start_id, token):
        listing = self.dirs[fh]
        for i in range(start_id, len(listing)):
            name, path, st = listing[i]
            if not pyfuse3.readdir_reply(token, name, self._entry(st), i + 1):
                return
            self._remember(path, st)

    @_fuse_errors
    async def releasedir(self, fh):
        self.dirs.pop(fh, None)

    @_fuse_errors
    async def fsyncdir(self, fh, datasync):
        pass

    # -- files ---------------------------------------------------------------------------

    @staticmethod
    def _host_flags(flags: int) -> int:
        # The kernel sends every WRITE with its offset (O_APPEND included):
        # the host descriptor must not append on its own.
        return flags & ~(os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOCTTY)

    @_fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        fd = os.open(path, self._host_flags(flags) | os.O_CREAT | os.O_EXCL, stat.S_IMODE(mode))
        try:
            self._chown_to_caller(path, ctx)
            entry = self._remember(path, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        self.open_fds[fd] = entry.st_ino
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), entry

    @_fuse_errors
    async def open(self, inode, flags, ctx):
        fd = os.open(self._path(inode), self._host_flags(flags))
        self.open_fds[fd] = inode
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @_fuse_errors
    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    @_fuse_errors
    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    @_fuse_errors
    async def flush(self, fh):
        pass

    @_fuse_errors
    async def release(self, fh):
        ino = self.open_fds.pop(fh, None)
        os.close(fh)
        if ino is not None and ino not in self.lookups and ino not in self.open_fds.values():
            self.paths.pop(ino, None)

    @_fuse_errors
    async def fsync(self, fh, datasync):
        (os.fdatasync if datasync else os.fsync)(fh)


async def _serve() -> None:
    async with trio.open_nursery() as n:
        async def signals():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    pyfuse3.terminate()
                    return
        n.start_soon(signals)
        await pyfuse3.main()
        n.cancel_scope.cancel()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("--debug", action="store_true", help="FUSE debug output")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s floor[%(process)d] %(levelname)s %(message)s")
    ops = Passthrough(args.source)
    opts = set(pyfuse3.default_options) | {"default_permissions", f"fsname={ops.source}"}
    if args.debug:
        opts.add("debug")
    pyfuse3.init(ops, args.mountpoint, opts)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
