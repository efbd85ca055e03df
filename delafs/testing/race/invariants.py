"""DESIGN.md's per-block invariants, checked after every step (and by the
engine tests on a quiescent filesystem)."""

from __future__ import annotations

from ...fs.extent_map import ExtState
from ...ondisk import BLOCK_SHIFT
from ...vfs.mount import Mount
from .consts import BS


def invariant_violations(m: Mount, exempt=None, *, limit: int = 5) -> list[str]:
    """DESIGN.md's per-block invariants; returns messages (empty if all hold).

    ``exempt(ino, block)`` -> True for blocks where an operation is in
    progress: the "no DELALLOC under a clean or absent cache block" rule does
    not apply to them (everything else always does).  With ``exempt`` None the
    filesystem must be quiescent."""
    out: list[str] = []
    fs = m.fs
    a = fs.space.alloc
    try:
        a.check()
    except (AssertionError, ValueError) as e:
        out.append(str(e))
    if a.total != a.available + a.used + a.reserved + a.metadata_reserve:
        out.append(f"space: total {a.total} != available {a.available} + used {a.used} + "
                   f"reserved {a.reserved} + metadata reserve {a.metadata_reserve}")
    try:
        m.cache.verify()
    except AssertionError as e:
        out.append(f"page cache: {e}")
    reserved = 0
    for ino in sorted(fs.emaps):
        emap = fs.emaps[ino]
        try:
            emap.check()
        except AssertionError as e:
            out.append(f"inode {ino}: {e}")
        inode = m.inodes.get(ino)
        mapping = inode.mapping if inode else None
        pre = m.ops.prealloc_start(ino)
        eof_blocks = (inode.size + BS - 1) >> BLOCK_SHIFT if inode is not None else None
        for ext in emap.iter_extents(0):
            if ext.state != ExtState.DELALLOC:
                continue
            reserved += ext.length + ext.indlen
            for b in range(ext.fblock, ext.end):
                folio = mapping.lookup(b) if mapping else None
                if folio is not None and folio.dirty_blocks(b - folio.index, 1):
                    continue
                if pre is not None and b >= pre and eof_blocks is not None and b >= eof_blocks:
                    continue            # speculative preallocation, trimmed at close
                if folio is not None and folio._owner is not None:
                    continue            # someone is working on this folio
                if exempt is not None and exempt(ino, b):
                    continue
                state = "absent" if folio is None else "clean"
                out.append(f"stale delalloc: inode {ino} block {b} is DELALLOC under a {state} "
                           f"cache block (eof block {eof_blocks})")
                break
            if len(out) >= limit:
                return out
        if mapping:
            for folio in mapping.dirty_folios():
                for first, n in folio.dirty_segments():
                    for b in range(folio.index + first, folio.index + first + n):
                        st = emap.lookup(b).state
                        if st == ExtState.HOLE:
                            out.append(f"dirty block {b} of inode {ino} lies over a HOLE "
                                       "(dirty data without a space reservation)")
                            break
                        if eof_blocks is not None and b >= eof_blocks and not (
                                exempt is not None and exempt(ino, b)):
                            out.append(f"dirty block {b} of inode {ino} lies past EOF "
                                       f"(eof block {eof_blocks}): writeback would drop it")
                            break
                if len(out) >= limit:
                    return out
    if reserved != a.reserved:
        out.append(f"reservations: allocator has {a.reserved} blocks reserved, delalloc "
                   f"extents hold {reserved} (data + indlen)")
    return out
