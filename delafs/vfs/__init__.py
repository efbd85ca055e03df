"""The file operations layer the FUSE adapter calls (the VFS's role): open
files, read/write/truncate/fallocate/fsync through the iomap engine and the
page cache, page faults, eviction, and the flusher and journal committer.
"""

from .mount import Mount, OpenFile

__all__ = ["Mount", "OpenFile"]
