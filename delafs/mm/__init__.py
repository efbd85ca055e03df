"""The page cache (layer 3), mm/ in the kernel: folios with per-block
uptodate and dirty state and their locks, the per-inode address space
(filemap: lookup, truncate, SEEK_DATA/HOLE, the invalidate lock, errseq),
the cache's memory limit, LRU and dirty throttling, and the flusher.
"""

from .pagecache import AddressSpace, ErrSeq, ErrSeqCursor, Folio, PageCache

__all__ = ["AddressSpace", "ErrSeq", "ErrSeqCursor", "Folio", "PageCache"]
