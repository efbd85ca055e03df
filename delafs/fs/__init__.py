"""The on-disk filesystem (layer 4), the "xfs/ext4" role.

    filesystem   Filesystem: format/open, transactions, inodes, directories,
                 xattrs, extents, orphans, statfs
    items        the btree items (inode, dirent, extent, xattr, orphan)
    btree        the one metadata btree
    alloc        Allocator: free space and its accounting (bnobt/cntbt + counters)
    space        Space: the allocator kept in step with the on-disk bitmap
    extent_map   ExtentMap: per-inode extents, HOLE/DELALLOC/UNWRITTEN/WRITTEN
    acl          POSIX ACL xattrs (posix_acl_create, chmod)
    iomap_ops    its iomap_begin/iomap_end, punch and writeback_range, ioend
                 completion (xfs_iomap.c and xfs_aops.c)
    fsck         the offline checker and repairer
"""

from .extent_map import Extent, ExtentMap, ExtState
from .filesystem import (
                         RENAME_EXCHANGE,
                         RENAME_NOREPLACE,
                         RENAME_WHITEOUT,
                         XATTR_CREATE,
                         XATTR_REPLACE,
                         Filesystem,
)
from .iomap_ops import FsIomapOps

__all__ = ["RENAME_EXCHANGE", "RENAME_NOREPLACE", "RENAME_WHITEOUT", "XATTR_CREATE",
           "XATTR_REPLACE", "ExtState", "Extent", "ExtentMap", "Filesystem", "FsIomapOps"]
