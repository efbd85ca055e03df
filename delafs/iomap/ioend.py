"""Building ioends (fs/iomap/ioend.c): the generic half of writeback that
the filesystem's ``writeback_range`` calls once it has mapped a range.

An ioend is a run of file bytes contiguous on disk with one mapping type;
a range that continues the current ioend (same inode and type, next file
offset at the next disk address) extends it, anything else starts a new
one, and so does an ioend that reached ``MAX_IOEND_BYTES`` (the kernel
caps an ioend's size so completion work stays bounded).  The filesystem
keeps what only it can do: submitting the ioends and completing them.
"""

from __future__ import annotations

from .types import Ioend, IomapType, WritebackCtx

MAX_IOEND_BYTES = 8 << 20


def add_to_ioend(wpc: WritebackCtx, folio, pos: int, n: int, addr: int, typ: IomapType) -> None:
    """Queue ``n`` bytes of ``folio`` at file offset ``pos``, mapped at disk
    byte ``addr`` with type ``typ`` (iomap_add_to_ioend)."""
    off = pos - folio.pos
    # One copy (a memoryview slice, then bytes): the ioend must not see
    # stores that land in the folio after it was cleaned for I/O.
    data = bytes(memoryview(folio.data)[off:off + n])
    io = wpc.ioend
    if io is None or not io.contiguous(wpc.inode.ino, pos, addr, typ) or io.size >= MAX_IOEND_BYTES:
        if io is not None:
            wpc.ready.append(io)
        io = wpc.ioend = Ioend(wpc.inode.ino, pos, addr, typ)
    io.bufs.append(data)
    io.size += n
    wpc.queued += n
    if not io.folios or io.folios[-1] is not folio:
        io.folios.append(folio)
