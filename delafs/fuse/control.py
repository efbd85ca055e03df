"""The control channel: how ``delafs sync``, ``stat``, ``inject``, ``umount``
and tests talk to a running daemon.

A hidden file, ``MOUNTPOINT/.delafs-control``, in the root of every mount.
A client opens it read-write, writes one command and reads the reply back
on the same open file description (the adapter keeps the reply per file
handle).  Reading without writing returns the ``stat`` JSON.  A command
that fails is answered with its errno on the write (EINVAL for bad input,
EIO from a shut-down filesystem).

Commands:

    sync              write everything back and commit (syncfs + journal) --
                      what the daemon holds: the client first has the kernel
                      write back its own (write_back_kernel_pages);
                      fails with the errno of a writeback error no sync has
                      reported yet (syncfs(2)'s report: the data is lost)
    stat              counters of every layer, as JSON
    inject TAG=N ...  set errortags; replies with their hit counters (JSON)
    mark LABEL        with -o log_writes: record LABEL in the write log and
                      reply with the number of device events before it

Both sides are here: :class:`ControlHandler` runs in the daemon,
:func:`control_command` is the client.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import os

from ..lib.errors import FsError

log = logging.getLogger("delafs")

CONTROL_NAME = b".delafs-control"
CONTROL_INO = 2**63 - 2          # never allocated: inode numbers grow from 2


class ControlHandler:
    """The daemon's side: ``await handler(data)`` runs one command."""

    def __init__(self, daemon):
        self.daemon = daemon

    async def __call__(self, data: bytes) -> bytes:
        words = data.decode(errors="replace").split()
        if not words:
            raise FsError(errno.EINVAL, "empty control command")
        cmd, args = words[0], words[1:]
        handler = getattr(self, f"cmd_{cmd}", None)
        if handler is None:
            raise FsError(errno.EINVAL, f"unknown control command {cmd!r}")
        return await handler(args)

    async def cmd_sync(self, args: list[str]) -> bytes:
        m = self.daemon.m
        err = await m.syncfs()
        await m.fs.sync()
        if err:
            log.error("sync: writeback failed since the last sync (%s): data was lost", os.strerror(err))
            raise FsError(err, "writeback failed since the last sync: data is lost")
        return b"ok\n"

    async def cmd_inject(self, args: list[str]) -> bytes:
        tags = self.daemon.m.errortags
        for a in args:
            try:
                tags.parse(a)
            except ValueError as e:
                raise FsError(errno.EINVAL, str(e)) from None
        return json.dumps(tags.statistics()).encode() + b"\n"

    async def cmd_mark(self, args: list[str]) -> bytes:
        from ..block.logwrites import WriteLog  # not above: the block package loads trio, the CLI need not
        recorder = self.daemon.dev.recorder
        if not isinstance(recorder, WriteLog):
            raise FsError(errno.EINVAL, "mark needs a mount with -o log_writes=FILE")
        if len(args) != 1:
            raise FsError(errno.EINVAL, "mark takes one label (no spaces)")
        return b"%d\n" % recorder.mark(args[0])

    async def cmd_stat(self, args: list[str]) -> bytes:
        return json.dumps(self.daemon.statistics(), indent=1).encode() + b"\n"


class NotMounted(Exception):
    """The path is not the root of a mounted delafs."""


class DaemonGone(NotMounted):
    """A FUSE mount whose daemon died (kill -9): every access is ENOTCONN
    until someone unmounts it."""


def control_path(mountpoint: str) -> str:
    path = os.path.join(mountpoint, CONTROL_NAME.decode())
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise DaemonGone(f"{mountpoint}: the daemon is gone ({e.strerror}); `delafs umount "
                             f"{mountpoint}` clears the mount, the journal replays at the next mount") from None
        raise NotMounted(f"{mountpoint} is not a mounted delafs (no control file)") from None
    return path


def control_command(mountpoint: str, command: str) -> str:
    """Send one command and return the reply.  OSError carries the errno
    the daemon answered; NotMounted if there is no control file."""
    # stat only reads (the reply of an open file nothing was written to),
    # so it also works where nothing may be written: a read-only mount.
    query = command == "stat"
    fd = os.open(control_path(mountpoint), os.O_RDONLY if query else os.O_RDWR)
    try:
        if not query:
            os.write(fd, command.encode())
        out = b""
        while chunk := os.pread(fd, 65536, len(out)):
            out += chunk
        return out.decode()
    finally:
        os.close(fd)


def write_back_kernel_pages(mountpoint: str) -> None:
    """syncfs(2) on the mount: the kernel writes back the pages it holds
    dirty there (what -o writeback_cache let it cache, stores through
    shared mappings) as WRITEs the daemon answers, and waits for them.  No
    FUSE daemon sees a program's written data before that, so a sync that
    is to cover it starts here.  (The kernel sends FUSE_SYNCFS only to
    virtiofs.)  OSError: the kernel's report, e.g. EIO for a WRITE of its
    writeback that failed; the kernel wrote back all it could regardless.

    The wait covers the WRITEs since FUSE writeback keeps pages under
    writeback until the daemon answers (the 2025 rework, around Linux
    6.16); older kernels copied each page to a temporary one and ended its
    writeback at once, so there syncfs(2) can return with WRITEs queued."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc().syncfs(fd) != 0:        # the os module has sync() only
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
