"""The iomap engine (layer 2), fs/iomap/ in the kernel: filesystem-agnostic
buffered I/O over the page cache, talking to the filesystem only through
IomapOps and WritebackOps.

    types         iomap.h: Iomap, flags, the ops protocols, Ioend, VInode
    buffered_io   buffered-io.c: the write loop, the delalloc punch, page_mkwrite,
                  read_folio/readahead, zeroing and truncate of partial blocks
    writeback     writepages -> writeback_folio -> writeback_range -> submit
    iter          IomapIter: the begin -> work -> end -> advance driver the write,
                  zero, page_mkwrite, seek and read loops share (fs/iomap/iter.c)
    ioend         add_to_ioend: the merge rules and size cap of ioends, which the
                  filesystem's writeback_range calls (fs/iomap/ioend.c)
"""

from .buffered_io import Engine, IovIter
from .ioend import MAX_IOEND_BYTES, add_to_ioend
from .iter import IomapIter
from .types import (
    IOMAP_F_NEW,
    IOMAP_FAULT,
    IOMAP_REPORT,
    IOMAP_WRITE,
    IOMAP_ZERO,
    Ioend,
    Iomap,
    IomapOps,
    IomapType,
    VInode,
    WritebackCtx,
    WritebackOps,
)
from .writeback import writepages

__all__ = ["MAX_IOEND_BYTES", "IomapIter", "add_to_ioend", "IOMAP_FAULT", "IOMAP_F_NEW", "IOMAP_REPORT", "IOMAP_WRITE", "IOMAP_ZERO", "Engine",
           "Iomap", "IomapOps", "IomapType", "Ioend", "IovIter", "VInode", "WritebackCtx",
           "WritebackOps", "writepages"]
