"""Exceptions shared by every layer.

Everything that can go wrong in a way a user should read derives from
:class:`DelafsError`; tools print ``str(exc)`` and never a traceback.
Errors that map to an errno carry it, so the FUSE adapter can reply with it.
"""

from __future__ import annotations

import errno
import os


class DelafsError(Exception):
    """Base class; ``errno`` is what a FUSE reply or a tool exit should use."""

    errno = errno.EIO

    def __init__(self, msg: str = "", *, err: int | None = None):
        super().__init__(msg or os.strerror(err if err is not None else self.errno))
        if err is not None:
            self.errno = err


class FsError(DelafsError):
    """An ordinary POSIX error (ENOENT, ENOSPC, EEXIST, ...)."""

    def __init__(self, err: int, msg: str = ""):
        super().__init__(msg or os.strerror(err), err=err)


class CorruptionError(DelafsError):
    """An on-disk structure failed verification (checksum, magic, bounds).

    ``structure`` names what was being read ("superblock", "btree node",
    "journal descriptor", ...) and ``block`` the block number it lives at, so
    the message always says where to look.
    """

    errno = errno.EUCLEAN

    def __init__(self, structure: str, block: int | None, detail: str):
        where = f" at block {block}" if block is not None else ""
        super().__init__(f"corrupt {structure}{where}: {detail}")
        self.structure = structure
        self.block = block
        self.detail = detail


class NotDelafsError(DelafsError):
    """The image carries no delafs superblock at all."""

    errno = errno.EINVAL


class IncompatibleError(DelafsError):
    """The image uses a format version or incompat feature we don't know."""

    errno = errno.EINVAL


def enospc(msg: str = "no space left on device") -> FsError:
    return FsError(errno.ENOSPC, msg)
