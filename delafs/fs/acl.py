"""POSIX ACLs as the kernel hands them to a FUSE daemon: the binary
system.posix_acl_access / _default xattr values, and the rules a disk
filesystem applies to them (posix_acl_update_mode, posix_acl_chmod,
posix_acl_create).

Whether or not FUSE_POSIX_ACL is negotiated (-o acl), the
kernel hands system.posix_acl_* to the daemon as xattrs and leaves keeping
the mode and the access ACL in step to it (fs/fuse/acl.c: "Fuse userspace
is responsible for updating access permissions in the inode").  So, as
posix_acl_update_mode() and posix_acl_chmod() do in a disk filesystem:
setting an access ACL sets the permission bits, an ACL the mode says
entirely is not stored, and chmod rewrites a stored one.  With -o acl a
new inode inherits its directory's default ACL (acl_create).

What a daemon cannot do through pyfuse3 3.5: it cannot ask for
FUSE_DONT_MASK, so the kernel has applied the umask to a new inode's mode
before CREATE/MKDIR/MKNOD arrives, even when a default ACL should have
replaced the umask; the bits it removed are gone (docs/posix.md).
"""

from __future__ import annotations

import errno
import struct

from ..lib.errors import FsError

ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20


def acl_entries(value: bytes) -> list[list[int]]:
    if len(value) < 4 or (len(value) - 4) % 8 or struct.unpack_from("<I", value)[0] != _ACL_VERSION:
        raise FsError(errno.EINVAL, "malformed POSIX ACL")
    ents = [list(struct.unpack_from("<HHI", value, off)) for off in range(4, len(value), 8)]
    tags = [t for t, _, _ in ents]
    if any(t not in (_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER)
           for t in tags) or any(tags.count(t) != 1 for t in (_ACL_USER_OBJ, _ACL_GROUP_OBJ, _ACL_OTHER)):
        raise FsError(errno.EINVAL, "malformed POSIX ACL")
    return ents


def acl_mode(value: bytes) -> tuple[int, bool]:
    """posix_acl_equiv_mode(): the permission bits an access ACL implies (the
    group bits are the mask's when there is one) and whether the ACL says
    nothing more than those bits do."""
    perm = {t: p & 7 for t, p, _ in acl_entries(value)}
    group = perm.get(_ACL_MASK, perm[_ACL_GROUP_OBJ])
    equiv = not any(t in perm for t in (_ACL_USER, _ACL_GROUP, _ACL_MASK))
    return perm[_ACL_USER_OBJ] << 6 | group << 3 | perm[_ACL_OTHER], equiv


def _encode(ents: list[list[int]]) -> bytes:
    return struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in ents)


def acl_create(default: bytes, mode: int) -> tuple[int, bytes | None]:
    """posix_acl_create() and its create_masq: a new inode under a directory
    with ``default`` ACL.  The ACL's owner, other and mask (or owning
    group) entries are cut down to the requested permission bits and the
    bits to the entries; returns the new mode and the access ACL to store
    (None when the mode says all of it)."""
    ents = acl_entries(default)
    bits = mode & 0o777
    extended = False
    group_obj = mask = None
    for e in ents:
        if e[0] == _ACL_USER_OBJ:
            e[1] &= (bits >> 6) | ~7
            bits &= (e[1] << 6) | ~0o700
        elif e[0] == _ACL_OTHER:
            e[1] &= bits | ~7
            bits &= e[1] | ~7
        elif e[0] == _ACL_GROUP_OBJ:
            group_obj = e
        elif e[0] == _ACL_MASK:
            mask = e
            extended = True
        else:
            extended = True
    g = mask if mask is not None else group_obj
    g[1] &= (bits >> 3) | ~7
    bits &= (g[1] << 3) | ~0o070
    return (mode & ~0o777) | bits, _encode(ents) if extended else None


def acl_chmod(value: bytes, mode: int) -> bytes:
    """posix_acl_chmod(): the owner, mask (or owning group) and other entries
    take the new permission bits."""
    ents = acl_entries(value)
    has_mask = any(t == _ACL_MASK for t, _, _ in ents)
    for e in ents:
        if e[0] == _ACL_USER_OBJ:
            e[1] = (mode >> 6) & 7
        elif e[0] == (_ACL_MASK if has_mask else _ACL_GROUP_OBJ):
            e[1] = (mode >> 3) & 7
        elif e[0] == _ACL_OTHER:
            e[1] = mode & 7
    return _encode(ents)
