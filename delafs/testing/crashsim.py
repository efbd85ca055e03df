"""Crash simulation: the images a power cut could leave behind.

A crash test runs a workload on a :class:`~delafs.block.device.BlockDevice` whose
:class:`~delafs.block.recorder.Recorder` logs every completed write, flush and
discard.  This module replays prefixes of that stream onto copies of the image
as it was before the workload, to produce the states a disk could be in had
power failed at that point:

* Everything before the last flush of the prefix is durable: those writes are
  applied in order, and those discards punch holes.
* Everything after it (the *unflushed window*) may or may not have reached the
  media, in any order, and a write may have been cut off mid-way.  A disk
  promises atomicity only per 512-byte sector, so a torn write keeps a prefix
  of whole blocks and possibly the first sectors of the next block.

The filesystem is correct if, mounted (and log-replayed) on any such image,
fsck passes and everything an fsync promised is there.

All randomness comes from a caller-supplied :class:`random.Random`, so a
failing image is rebuilt exactly from the seed in its label.
"""

from __future__ import annotations

import errno
import os
import random
from dataclasses import dataclass
from typing import Iterator

from ..block import BLOCK_SIZE, BlockDevice

SECTOR_SIZE = 512
SECTORS_PER_BLOCK = BLOCK_SIZE // SECTOR_SIZE

# copy_file_range refuses these on some kernel/filesystem pairs; fall back to a
# plain read/write copy, which always works.
_COPY_FALLBACK = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})
_COPY_CHUNK = 1 << 20


def sparse_copy(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` (replacing it) without filling in its holes.

    Only the data extents found with ``SEEK_DATA``/``SEEK_HOLE`` are copied,
    so a mostly-empty 64 MiB test image costs what it holds, not 64 MiB.
    Explicitly written zeros stay allocated; that changes nothing a reader of
    the image can see.
    """
    with open(src, "rb") as fsrc, open(dst, "wb") as fdst:
        sfd, dfd = fsrc.fileno(), fdst.fileno()
        size = os.fstat(sfd).st_size
        os.ftruncate(dfd, size)
        offset = 0
        while offset < size:
            try:
                start = os.lseek(sfd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole remains
                    break
                raise
            end = os.lseek(sfd, start, os.SEEK_HOLE)
            _copy_range(sfd, dfd, start, end - start)
            offset = end


def _copy_range(sfd: int, dfd: int, offset: int, length: int) -> None:
    done = 0
    while done < length:
        pos = offset + done
        try:
            n = os.copy_file_range(sfd, dfd, length - done, pos, pos)
        except OSError as e:
            if e.errno not in _COPY_FALLBACK:
                raise
            n = 0
        if n == 0:
            chunk = os.pread(sfd, min(_COPY_CHUNK, length - done), pos)
            if not chunk:  # the source shrank under us
                return
            n = os.pwrite(dfd, chunk, pos)
        done += n


def snapshot(path: str, dest: str | None = None) -> str:
    """Capture the image before the workload, as the base for :func:`build_image`.

    The snapshot is a sparse copy of the file (default name ``path + '.base'``),
    not an in-memory map: :func:`build_image` starts every crash image from a
    file copy anyway, and a copy also works for images too big to hold in
    memory.  Returns the snapshot's path.
    """
    dest = dest if dest is not None else f"{path}.base"
    sparse_copy(path, dest)
    return dest


def flush_points(events: list) -> list[int]:
    """Prefix lengths at which a crash loses nothing that was flushed.

    Returns, in increasing order, 0 (before any I/O), every ``i`` such that
    ``events[i - 1]`` is a flush, and ``len(events)`` (the whole stream, whose
    tail may be unflushed).
    """
    points = {0, len(events)}
    points.update(i + 1 for i, ev in enumerate(events) if ev[0] == "flush")
    return sorted(points)


def build_image(
    base_path: str,
    events: list,
    dest_path: str,
    *,
    upto: int,
    drop_after_last_flush: float = 0.0,
    reorder: bool = False,
    tear: bool = False,
    rng: random.Random | None = None,
) -> None:
    """Write to ``dest_path`` the image left by a crash after ``events[:upto]``.

    The durable part (up to the prefix's last flush) is applied exactly.  In
    the unflushed window after it:

    * each write is dropped with probability ``drop_after_last_flush``;
    * each discard is kept or dropped with even odds (an unflushed discard may
      or may not have reached the media);
    * ``reorder`` applies the survivors in a random order;
    * ``tear`` applies one surviving write only partly: a random prefix of
      its whole blocks, plus, half the time, the first 1-7 sectors of the next
      block.

    With no options and no discards in the window, the whole prefix is simply
    applied in order.  ``rng`` defaults to ``random.Random(0)`` so that a call
    without one is still reproducible.
    """
    if not 0 <= upto <= len(events):
        raise ValueError(f"upto={upto} outside 0..{len(events)}")
    rng = rng if rng is not None else random.Random(0)
    prefix = events[:upto]
    last_flush = max((i for i, ev in enumerate(prefix) if ev[0] == "flush"), default=-1)
    durable, window = prefix[: last_flush + 1], prefix[last_flush + 1 :]

    window = [
        ev
        for ev in window
        if not (ev[0] == "write" and rng.random() < drop_after_last_flush)
        and not (ev[0] == "discard" and rng.random() < 0.5)
    ]
    if reorder:
        rng.shuffle(window)
    torn = None
    if tear:
        writes = [i for i, ev in enumerate(window) if ev[0] == "write"]
        if writes:
            torn = rng.choice(writes)

    sparse_copy(base_path, dest_path)
    with BlockDevice.open(dest_path) as dev:
        for ev in durable:
            _apply(dev, ev)
        for i, ev in enumerate(window):
            if i == torn:
                _apply_torn(dev, ev, rng)
            else:
                _apply(dev, ev)


def _apply(dev: BlockDevice, ev: tuple) -> None:
    if ev[0] == "write":
        dev.write_sync(ev[1], [ev[2]])
    elif ev[0] == "discard":
        dev.discard_sync(ev[1], ev[2])


def _apply_torn(dev: BlockDevice, ev: tuple, rng: random.Random) -> None:
    """Apply a write cut off at a sector boundary strictly inside it."""
    _, blk, data = ev
    nblocks = len(data) // BLOCK_SIZE
    whole = rng.randrange(nblocks)
    if whole:
        dev.write_sync(blk, [data[: whole * BLOCK_SIZE]])
    if rng.random() < 0.5:
        sectors = rng.randint(1, SECTORS_PER_BLOCK - 1)
        cut = sectors * SECTOR_SIZE
        old = dev.read_sync(blk + whole, 1)
        start = whole * BLOCK_SIZE
        dev.write_sync(blk + whole, [data[start : start + cut] + old[cut:]])


@dataclass
class Cut:
    """One crash image of a matrix: the first ``upto`` recorded events,
    with ``opts`` for :func:`build_image` and the seed of its RNG."""
    upto: int
    label: str
    opts: dict
    seed: int = 0


def crash_cuts(events: list, rng: random.Random, *, variants_per_point: int = 2,
               points: list[int] | None = None) -> list[Cut]:
    """Plan a crash matrix over ``events``: the clean cut at every flush
    point (or at each of ``points``), then ``variants_per_point`` cuts
    part-way through the window up to the next flush, each with a random mix
    of reordering, dropping and tearing.

    A label such as ``"flush#3+5ev reorder tear (seed 17)"`` reads: the
    durable state after the third flush, plus a crash 5 events into the
    following window; :func:`build_image` with the same cut, options and
    ``random.Random(17)`` rebuilds the image."""
    if points is None:
        points = flush_points(events)
    flush_index = [i for i, ev in enumerate(events) if ev[0] == "flush"]
    cuts = []
    for nflushed, point in enumerate(points):
        # Every point but possibly the last follows a flush (or is the start).
        after_flush = point == 0 or events[point - 1][0] == "flush"
        label = f"flush#{nflushed}" if after_flush else "end"
        cuts.append(Cut(point, label, {}))
        # The window runs from this point to the next flush (excluded).
        window_end = next((i for i in flush_index if i >= point), len(events))
        if window_end == point:
            continue
        for _ in range(variants_per_point):
            upto = rng.randint(point + 1, window_end)
            seed = rng.randrange(2**32)
            opts = {
                "reorder": rng.random() < 0.5,
                "drop_after_last_flush": rng.choice((0.0, 0.25, 0.5)),
                "tear": rng.random() < 0.5,
            }
            cuts.append(Cut(upto, f"{label}+{upto - point}ev{_describe(opts)} (seed {seed})",
                            opts, seed))
    return cuts


def crash_images(
    base_path: str,
    events: list,
    workdir: str,
    *,
    rng: random.Random,
    variants_per_point: int = 2,
) -> Iterator[tuple[str, str]]:
    """Yield ``(label, image_path)`` for the matrix of :func:`crash_cuts`.

    Images are written to distinct files in ``workdir`` and left there; the
    caller owns the directory.
    """
    os.makedirs(workdir, exist_ok=True)
    for serial, cut in enumerate(crash_cuts(events, rng, variants_per_point=variants_per_point), 1):
        path = os.path.join(workdir, f"crash-{serial:05d}.img")
        extra = {"rng": random.Random(cut.seed)} if cut.opts else {}
        build_image(base_path, events, path, upto=cut.upto, **cut.opts, **extra)
        yield cut.label, path


def _describe(opts: dict) -> str:
    parts = []
    if opts["reorder"]:
        parts.append("reorder")
    if opts["drop_after_last_flush"]:
        parts.append(f"drop={opts['drop_after_last_flush']}")
    if opts["tear"]:
        parts.append("tear")
    return "".join(" " + p for p in parts)
