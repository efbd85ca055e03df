"""The on-disk filesystem (layer 4), the "xfs/ext4" role.

    filesystem   Filesystem: format/open/close, commit, the operation frame
                 (meta_lock, reservation, shutdown), statfs; its methods come
                 from one mixin per concern:
    inode        the inode cache, times, getattr/setattr
    dir          names: create, link, unlink, rename, readdir
    xattr        extended attributes
    bmap         extent maps <-> the tree: allocate, convert, punch
    data         the simple allocate-write-flush-convert data path, truncate
    orphan       open references and the orphan list
    items        the btree items (inode, dirent, extent, xattr, orphan)
    btree        the one metadata btree
    alloc        Allocator: free space and its accounting (bnobt/cntbt + counters)
    space        Space: the allocator kept in step with the on-disk bitmap
    extent_map   ExtentMap: per-inode extents, HOLE/DELALLOC/UNWRITTEN/WRITTEN
    acl          POSIX ACL xattrs (posix_acl_create, chmod)
    iomap_ops    its iomap_begin/iomap_end, the punch, preallocation (xfs_iomap.c)
    aops         its writeback_range, submit and completion (xfs_aops.c)
    fsck         the offline checker and repairer
"""

from .dir import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT
from .extent_map import Extent, ExtentMap, ExtState
from .filesystem import Filesystem
from .iomap_ops import FsIomapOps
from .xattr import XATTR_CREATE, XATTR_REPLACE

__all__ = ["RENAME_EXCHANGE", "RENAME_NOREPLACE", "RENAME_WHITEOUT", "XATTR_CREATE",
           "XATTR_REPLACE", "ExtState", "Extent", "ExtentMap", "Filesystem", "FsIomapOps"]
