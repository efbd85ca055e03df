"""Mutants: deliberately broken engines the explorer must catch, each a
replacement of one engine or filesystem method."""

from __future__ import annotations

import contextlib

from ...fs.aops import FsWritebackOps
from ...fs.extent_map import ExtState
from ...fs.iomap_ops import FsIomapOps
from ...iomap.buffered_io import Engine
from ...iomap.types import POINTS
from ...lib.units import round_up
from ...ondisk import BLOCK_SHIFT
from .consts import BS

MUTANTS = {
    "no_invalidate_lock": "the delalloc punch scans the page cache without invalidate_lock",
    "no_eof_clamp": "the punch scan runs to the end of the range, not min(EOF, end)",
    "mkwrite_punches": "a failing page_mkwrite punches the delalloc of the range it was mapping",
    "punch_unwritten": "the punch callback also removes UNWRITTEN extents",
    "no_cookie_check": "iomap_valid always says the mapping is current",
    "no_writeback_discard": "a failed writeback_range leaves the folio's delalloc in place",
    "per_folio_punch": "the scan keeps delalloc under every block of a dirty folio (folio granular)",
}

_mutant_stats = {"scans": 0, "scans_with_dirty_past_eof": 0}


async def _release_body(self: Engine, inode, start: int, end: int, *, clamp: bool) -> None:
    """Engine.delalloc_release without its lock assertion, EOF clamp optional."""
    mapping = inode.mapping
    punch_start = start
    scan_end = min(round_up(inode.size), end) if clamp else end
    _mutant_stats["scans"] += 1
    eof = round_up(inode.size)
    for folio in mapping.iter_folios(eof >> BLOCK_SHIFT, (end + BS - 1) >> BLOCK_SHIFT):
        if any(max(eof, start) <= ((folio.index + f) << BLOCK_SHIFT) < end
               for f, _ in folio.dirty_segments()):
            _mutant_stats["scans_with_dirty_past_eof"] += 1
            break
    pos = start
    while pos < scan_end:
        pos = mapping.seek_data(pos, scan_end)
        if pos >= scan_end:
            break
        data_end = mapping.seek_hole(pos, scan_end)
        punch_start = await self._delalloc_scan(inode, punch_start, pos, data_end)
        pos = data_end
    if punch_start < end:
        await self._punch(inode, punch_start, end)


async def _m_punch_delalloc_nolock(self: Engine, inode, start: int, end: int) -> None:
    if start >= end:
        return
    self.stats["punches"] += 1
    # MUTANT: no invalidate_lock, so faults may instantiate and dirty folios
    # the scan has already passed.
    await POINTS.hit("punch_locked")
    await _release_body(self, inode, start, end, clamp=True)


async def _m_release_noclamp(self: Engine, inode, start: int, end: int) -> None:
    await _release_body(self, inode, start, end, clamp=False)


async def _m_page_mkwrite_failed_punches(self: Engine, inode, folio, end: int) -> None:
    # MUTANT: the old iomap_end error path of the fault punched the range it
    # was mapping, delalloc that others' dirty data needs.
    await self.ops.punch(inode, folio.pos, end - folio.pos)


def _m_punch_locked_unwritten(self: FsIomapOps, ino: int, pos: int, length: int) -> int:
    emap = self.fs.emaps.get(ino)
    if emap is None:
        return 0
    first = pos >> BLOCK_SHIFT
    last = (pos + length + BS - 1) >> BLOCK_SHIFT
    # MUTANT: UNWRITTEN extents go too (their blocks are simply forgotten).
    removed = emap.remove(first, last - first, (ExtState.DELALLOC, ExtState.UNWRITTEN))
    dela = [e for e in removed if e.state == ExtState.DELALLOC]
    n = sum(e.length for e in dela)
    if dela:
        self.fs.space.alloc.unreserve(n + sum(e.indlen for e in dela))
        self.stats["delalloc_punched"] += n
    return n


def _m_iomap_valid_always(self: FsIomapOps, inode, iomap) -> bool:
    return True                          # MUTANT: no validity cookie check


def _m_discard_folio_noop(self: FsWritebackOps, ino: int, folio) -> None:
    pass                                 # MUTANT: no discard of the folio's delalloc


async def _m_delalloc_scan_per_folio(self: Engine, inode, punch_start: int, start: int,
                                     end: int) -> int:
    mapping = inode.mapping
    while start < end:
        folio = mapping.lookup(start >> BLOCK_SHIFT)
        if folio is None:
            start = (start & ~(BS - 1)) + BS
            continue
        await folio.lock()
        if folio.mapping is not mapping or not folio.contains(start >> BLOCK_SHIFT):
            folio.unlock()
            continue
        await POINTS.hit("delalloc_scan_folio")
        # MUTANT: a dirty folio protects all its blocks (folio_test_dirty).
        if folio.test_dirty():
            if start > punch_start:
                await self._punch(inode, punch_start, start)
            punch_start = min(end, folio.end)
        start = folio.end
        folio.unlock()
    return punch_start


_MUTANT_PATCHES = {
    "no_invalidate_lock": [(Engine, "punch_delalloc", _m_punch_delalloc_nolock)],
    "no_eof_clamp": [(Engine, "delalloc_release", _m_release_noclamp)],
    "mkwrite_punches": [(Engine, "_page_mkwrite_failed", _m_page_mkwrite_failed_punches)],
    "punch_unwritten": [(FsIomapOps, "_punch_locked", _m_punch_locked_unwritten)],
    "no_cookie_check": [(FsIomapOps, "iomap_valid", _m_iomap_valid_always)],
    "no_writeback_discard": [(FsWritebackOps, "discard_folio", _m_discard_folio_noop)],
    "per_folio_punch": [(Engine, "_delalloc_scan", _m_delalloc_scan_per_folio)],
}
assert set(_MUTANT_PATCHES) == set(MUTANTS)


@contextlib.contextmanager
def mutant(name: str | None):
    """Monkeypatch the engine into mutant ``name`` for the duration."""
    if name is None:
        yield
        return
    if name not in MUTANTS:
        raise ValueError(f"unknown mutant {name!r} (known: {', '.join(MUTANTS)})")
    saved = [(cls, attr, cls.__dict__[attr]) for cls, attr, _ in _MUTANT_PATCHES[name]]
    try:
        for cls, attr, fn in _MUTANT_PATCHES[name]:
            setattr(cls, attr, fn)
        yield
    finally:
        for cls, attr, fn in saved:
            setattr(cls, attr, fn)
