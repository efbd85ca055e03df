"""The pieces under delafs bmap/trace/top, in-process: the trace stream's
subscriptions, the bmap and strip snapshots, the busiest-file ranking."""

from __future__ import annotations

import pathlib
import re

from delafs.block.memory import MemoryDevice
from delafs.fs.filesystem import Filesystem
from delafs.lib.errortag import ErrorTags
from delafs.lib.trace import EVENTS, TRACE, Subscription, Tracer
from delafs.ondisk import ROOT_INO
from delafs.vfs.mount import Mount

BS = 4096
SRC = pathlib.Path(__file__).resolve().parents[2] / "delafs"


def test_every_emitted_event_is_listed():
    """delafs trace --event validates names against EVENTS: an event the
    engine emits under another name could never be asked for."""
    emitted = set()
    for path in SRC.rglob("*.py"):
        emitted |= set(re.findall(r'TRACE\.emit\("(\w+)"', path.read_text()))
    assert emitted, "no TRACE.emit call found"
    assert emitted <= set(EVENTS), emitted - set(EVENTS)
    assert set(EVENTS) - emitted == set(), "listed but never emitted"


def test_a_subscription_filters_and_counts_what_it_drops():
    t = Tracer()
    assert not t.on
    sub = Subscription({"a"}, ino=5, capacity=3)
    t.subscribe(sub)
    assert t.on and not t.recording
    for i in range(10):
        t.emit("a", ino=5, i=i)
        t.emit("a", ino=6, i=i)
        t.emit("b", ino=5, i=i)
    got, dropped = sub.drain()
    assert [f["i"] for _, _, f in got] == [0, 1, 2] and dropped == 7
    assert sub.drain() == ([], 0)
    assert not t.events, "a subscriber alone must not fill the recording ring"
    t.unsubscribe(sub)
    assert not t.on


async def _mount():
    dev = MemoryDevice(64 << 20)
    await Filesystem.format(dev)
    fs = await Filesystem.open(dev)
    m = Mount(fs, errortags=ErrorTags(seed=1))
    return m


async def test_bmap_and_strip_follow_a_write_through_writeback():
    m = await _mount()
    ino = (await m.fs.create(ROOT_INO, b"f", 0o644)).ino
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"a" * (4 * BS))
    await m.write(f, 12 * BS, b"b" * BS)
    b = await m.bmap(ino)
    # The write past EOF reserved speculative preallocation beyond it
    # (blocks 13..19): bmap shows it, as xfs_bmap shows post-EOF blocks.
    assert [(e["fblock"], e["blocks"], e["state"]) for e in b["extents"]] == [
        (0, 4, "DELALLOC"), (4, 8, "HOLE"), (12, 8, "DELALLOC")]
    assert b["size"] == 13 * BS
    assert [(c["fblock"], c["blocks"], c["state"]) for c in b["cache"]] == [(0, 4, "dirty"), (12, 1, "dirty")]

    strip = await m.bmap_strip(ino, 13)
    assert strip["extents"] == ["DELALLOC"] * 4 + ["HOLE"] * 8 + ["DELALLOC"]
    assert strip["cache"] == ["dirty"] * 4 + ["none"] * 8 + ["dirty"]
    # Squeezed: a column shows the most transient state in its range.
    assert (await m.bmap_strip(ino, 2))["extents"] == ["DELALLOC", "DELALLOC"]
    assert m.busiest(5) == [ino]

    await m.fsync(f)
    b = await m.bmap(ino)
    assert [(e["fblock"], e["blocks"], e["state"]) for e in b["extents"]][:3] == [
        (0, 4, "WRITTEN"), (4, 8, "HOLE"), (12, 1, "WRITTEN")]
    # Writeback stops at EOF: the preallocation past it is still delalloc.
    assert all(e["state"] == "DELALLOC" and e["fblock"] >= 13 for e in b["extents"][3:])
    assert {c["state"] for c in b["cache"]} == {"uptodate"}
    strip = await m.bmap_strip(ino, 13)
    assert set(strip["extents"]) == {"WRITTEN", "HOLE"}
    await m.release(f)


async def test_trace_shows_conversion_and_fired_errortags():
    m = await _mount()
    ino = (await m.fs.create(ROOT_INO, b"f", 0o644)).ino
    sub = Subscription()
    TRACE.subscribe(sub)
    try:
        f = await m.open(ino, write=True)
        m.errortags.set("short_copy", 2)
        await m.write(f, 0, b"x" * (2 * BS))
        m.errortags.set("short_copy", 0)
        await m.fsync(f)
        await m.release(f)
    finally:
        TRACE.unsubscribe(sub)
    names = [name for _, name, _ in sub.drain()[0]]
    assert "errortag" in names and "iomap_delalloc_punch" in names
    assert names.index("xfs_map_blocks_alloc") < names.index("iomap_ioend_submit") \
        < names.index("xfs_unwritten_convert")
