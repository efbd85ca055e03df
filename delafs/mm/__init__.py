"""The page cache (layer 3), mm/ in the kernel.

    folio       Folio: blocks with per-block uptodate/dirty bits, the folio lock
    filemap     AddressSpace: one inode's folios, invalidate_lock, writeback
                waits, SEEK_DATA/HOLE over the cache, truncate, errseq
    pagecache   PageCache: the memory limit, LRU of clean folios, dirty
                accounting and throttling, the flusher
"""

from .filemap import AddressSpace
from .folio import MAX_FOLIO_BLOCKS, Folio
from .pagecache import PageCache

__all__ = ["MAX_FOLIO_BLOCKS", "AddressSpace", "Folio", "PageCache"]
