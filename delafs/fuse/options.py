"""Mount options (``delafs mount -o ...``), parsed once into a typed record.

Options delafs itself understands are fields; the few that go to the
kernel unchanged are collected in ``fuse``.  Anything else is refused, so
a typo never silently does nothing.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from ..lib.errortag import TAGS
from ..lib.units import parse_size

# Size options and their smallest value (a cache smaller than a large folio
# thrashes; a dirty limit of 0 throttles every write).
_SIZE_OPTS = {"cache_size": 1 << 20, "dirty_limit": 4096}
# Seconds, and the smallest value: an interval of 0 makes the flusher or
# the committer loop without sleeping.
_FLOAT_OPTS = {"dirty_expire": 0.0, "writeback_interval": 0.01, "commit_interval": 0.01,
               "lock_wait": 0.0, "entry_timeout": 0.0, "attr_timeout": 0.0}
_MAX_SECONDS = 366 * 86400.0
_PATH_OPTS = {"log", "log_writes"}
_FUSE_FLAGS = {"allow_other", "default_permissions", "dev", "suid", "nodev", "nosuid",
               "ro", "rw", "noatime", "atime", "exec", "noexec"}
# What a FUSE mount does anyway: accepted and dropped (libfuse 3 refuses
# them by name).  libfuse 3 cannot pass strictatime or nodiratime either:
# the daemon implements them itself (_OWN_FLAGS); lazytime is refused like
# any unknown option.
_DEFAULT_FLAGS = {"rw", "relatime"}
_OWN_FLAGS = {"writeback_cache", "mkfs", "acl", "debug",
              # atime is the daemon's (the kernel only invalidates its cached
              # atime after a READ or READDIR); libfuse 3 cannot pass these
              "strictatime", "nodiratime"}
# subtype=NAME makes the kernel type fuse.NAME (df -T, /proc/mounts).  Off
# by default: xfstests with FSTYP=fuse expects the type to read plain fuse.
# The name ends up in the mount table, whose fields are separated by spaces
# and whose options by commas: keep it to a plain word.
_SUBTYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+.-]*")
# read_ahead=SIZE: the mount's readahead window (see Daemon.set_read_ahead).
_READ_AHEAD_MAX = 1 << 30


def _size(item: str, key: str, val: str) -> int:
    try:
        n = parse_size(val)
    except ValueError:
        n = -1
    if n < _SIZE_OPTS[key]:
        raise ValueError(f"bad {item!r}: {key}=SIZE takes a size of at least {_SIZE_OPTS[key]} bytes "
                         f"(e.g. {key}=64M)")
    return n


def _seconds(item: str, key: str, val: str) -> float:
    try:
        x = float(val)
    except ValueError:
        x = math.nan
    if not (_FLOAT_OPTS[key] <= x <= _MAX_SECONDS):      # nan fails every comparison
        raise ValueError(f"bad {item!r}: {key}=SECONDS takes a number from {_FLOAT_OPTS[key]:g} "
                         f"to {_MAX_SECONDS:g}")
    return x


def _read_ahead(item: str, val: str) -> int:
    try:
        n = parse_size(val)
    except ValueError:
        n = 0
    if not (0 < n <= _READ_AHEAD_MAX and n % 4096 == 0):
        raise ValueError(f"bad {item!r}: read_ahead=SIZE is the mount's readahead window, a multiple "
                         f"of 4 KiB up to 1 GiB (e.g. read_ahead=1M)")
    return n


# Passed to Mount when given; Mount's defaults otherwise.
_MOUNT_KW = ("cache_size", "dirty_limit", "dirty_expire", "writeback_interval", "commit_interval")


@dataclass
class MountOptions:
    """Everything ``-o`` can say.  None means "the component's default"."""

    cache_size: int | None = None
    dirty_limit: int | None = None
    dirty_expire: float | None = None
    writeback_interval: float | None = None
    commit_interval: float | None = None
    lock_wait: float = 30.0
    entry_timeout: float | None = None
    attr_timeout: float | None = None
    read_ahead: int | None = None
    punch: str = "scan"
    log: str | None = None
    log_writes: str | None = None
    tags: dict[str, int] = field(default_factory=dict)
    fuse: frozenset[str] = frozenset({"default_permissions"})
    writeback_cache: bool = False
    mkfs: bool = False
    acl: bool = False
    debug: bool = False
    strictatime: bool = False
    nodiratime: bool = False

    @classmethod
    def parse(cls, text: str | None) -> "MountOptions":
        """``a=1,b,c=x`` -> MountOptions; ValueError names what is wrong."""
        kw: dict = {}
        tags: dict[str, int] = {}
        fuse = {"default_permissions"}
        for item in filter(None, (p.strip() for p in (text or "").split(","))):
            key, sep, val = item.partition("=")
            if key in _SIZE_OPTS and sep:
                kw[key] = _size(item, key, val)
            elif key in _FLOAT_OPTS and sep:
                kw[key] = _seconds(item, key, val)
            elif key == "read_ahead":
                kw["read_ahead"] = _read_ahead(item, val)
            elif key == "punch" and val in ("scan", "legacy"):
                kw["punch"] = val
            elif key in _PATH_OPTS and sep and val:
                kw[key] = os.path.abspath(val)
            elif key in TAGS and sep and val.isdigit():
                tags[key] = int(val)
            elif key == "subtype":
                if not (sep and _SUBTYPE.fullmatch(val)):
                    raise ValueError(f"bad subtype {val!r} in {item!r}: a name of letters, "
                                     f"digits and _+.- (e.g. subtype=delafs for type fuse.delafs)")
                fuse.add(item)
            elif key in _DEFAULT_FLAGS and not sep:
                continue
            elif key in _FUSE_FLAGS and not sep:
                fuse.add(key)
            elif key in _OWN_FLAGS and not sep:
                kw[key] = True
            else:
                raise ValueError(f"unknown or malformed mount option {item!r}")
        opts = cls(tags=tags, fuse=frozenset(fuse), **kw)
        if opts.strictatime and "noatime" in opts.fuse:
            raise ValueError("noatime and strictatime contradict each other")
        return opts

    @property
    def readonly(self) -> bool:
        return "ro" in self.fuse

    @property
    def atime(self) -> str:
        """The daemon's atime policy: strict, none or relative (relatime)."""
        return "strict" if self.strictatime else "none" if "noatime" in self.fuse else "relative"

    def mount_kwargs(self) -> dict:
        """The keyword arguments of :class:`~delafs.vfs.mount.Mount` these set."""
        return {k: getattr(self, k) for k in _MOUNT_KW if getattr(self, k) is not None}

    def timeouts(self) -> dict:
        """entry_timeout/attr_timeout for the adapter, where given."""
        return {k: getattr(self, k) for k in ("entry_timeout", "attr_timeout")
                if getattr(self, k) is not None}
