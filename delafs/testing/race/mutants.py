"""Mutants: deliberately broken engines the explorer must catch.  Each
replaces one public seam of the engine or the filesystem (a method, or the
punch's state set) and calls the real code for the rest: no copies of
engine functions here."""

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


def _count_dirty_past_eof(inode, start: int, end: int) -> None:
    """For no_eof_clamp's equivalence: did this scan meet a dirty block
    past EOF (the only thing the clamp could change)?"""
    _mutant_stats["scans"] += 1
    eof = round_up(inode.size)
    for folio in inode.mapping.iter_folios(eof >> BLOCK_SHIFT, (end + BS - 1) >> BLOCK_SHIFT):
        if any(max(eof, start) <= ((folio.index + f) << BLOCK_SHIFT) < end
               for f, _ in folio.dirty_segments()):
            _mutant_stats["scans_with_dirty_past_eof"] += 1
            return


async def _m_punch_delalloc_nolock(self: Engine, inode, start: int, end: int) -> None:
    if start >= end:
        return
    self.stats["punches"] += 1
    # MUTANT: no invalidate_lock, so faults may instantiate and dirty folios
    # the scan has already passed.
    await POINTS.hit("punch_locked")
    await self.delalloc_release_range(inode, start, min(round_up(inode.size), end), end)


async def _m_release_noclamp(self: Engine, inode, start: int, end: int) -> None:
    # MUTANT: the scan runs to the end of the range, past EOF.
    _count_dirty_past_eof(inode, start, end)
    await self.delalloc_release_range(inode, start, end, end)


async def _m_page_mkwrite_failed_punches(self: Engine, inode, folio, end: int) -> None:
    # MUTANT: the old iomap_end error path of the fault punched the range it
    # was mapping, delalloc that others' dirty data needs.
    await self.ops.punch(inode, folio.pos, end - folio.pos)


def _m_iomap_valid_always(self: FsIomapOps, inode, iomap) -> bool:
    return True                          # MUTANT: no validity cookie check


def _m_discard_folio_noop(self: FsWritebackOps, ino: int, folio) -> None:
    pass                                 # MUTANT: no discard of the folio's delalloc


def _m_dirty_runs_per_folio(folio) -> list[tuple[int, int]]:
    # MUTANT: a dirty folio protects all its blocks (folio_test_dirty).
    return [(0, folio.nblocks)] if folio.test_dirty() else []


_MUTANT_PATCHES = {
    "no_invalidate_lock": [(Engine, "punch_delalloc", _m_punch_delalloc_nolock)],
    "no_eof_clamp": [(Engine, "delalloc_release", _m_release_noclamp)],
    "mkwrite_punches": [(Engine, "page_mkwrite_error", _m_page_mkwrite_failed_punches)],
    # MUTANT: UNWRITTEN extents go too (their blocks are simply forgotten).
    "punch_unwritten": [(FsIomapOps, "PUNCH_STATES", (ExtState.DELALLOC, ExtState.UNWRITTEN))],
    "no_cookie_check": [(FsIomapOps, "iomap_valid", _m_iomap_valid_always)],
    "no_writeback_discard": [(FsWritebackOps, "discard_folio", _m_discard_folio_noop)],
    "per_folio_punch": [(Engine, "dirty_runs", staticmethod(_m_dirty_runs_per_folio))],
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
