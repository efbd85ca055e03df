"""crashsim: crash images built from a recorded write/flush stream."""

from __future__ import annotations

import os
import random

import pytest

from delafs.block import BLOCK_SIZE, BlockDevice, Recorder
from delafs.testing.crashsim import (
    SECTOR_SIZE,
    build_image,
    crash_images,
    flush_points,
    snapshot,
    sparse_copy,
)

NBLOCKS = 64


def block(fill: int, n: int = 1) -> bytes:
    return bytes([fill]) * (BLOCK_SIZE * n)


def read_all(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    return [data[i : i + BLOCK_SIZE] for i in range(0, len(data), BLOCK_SIZE)]


@pytest.fixture
def base(tmp_path):
    """An image with some pre-workload content, its snapshot, and a recorded run."""
    path = str(tmp_path / "image")
    BlockDevice.create_file(path, NBLOCKS * BLOCK_SIZE)
    with BlockDevice.open(path) as dev:
        dev.write_sync(40, [block(0xEE, 4)])
    base_path = snapshot(path, str(tmp_path / "base"))
    return path, base_path


def record(path, workload) -> list:
    with BlockDevice.open(path) as dev:
        dev.recorder = Recorder()
        workload(dev)
        return dev.recorder.events


def workload(dev):
    """Two flushed epochs, then an unflushed window of writes and a discard."""
    dev.write_sync(0, [block(1, 2)])
    dev.flush_sync()  # events[1]
    dev.write_sync(2, [block(2)])
    dev.discard_sync(40, 2)
    dev.write_sync(3, [block(3)])
    dev.flush_sync()  # events[5]
    dev.write_sync(10, [block(10, 3)])
    dev.write_sync(13, [block(13)])
    dev.write_sync(0, [block(0x99)])  # overwrite of flushed data
    dev.discard_sync(42, 2)


@pytest.fixture
def run(base):
    path, base_path = base
    return base_path, record(path, workload)


def test_snapshot_is_sparse_and_identical(base, tmp_path):
    path, base_path = base
    assert read_all(base_path) == read_all(path)
    assert os.stat(base_path).st_size == NBLOCKS * BLOCK_SIZE
    assert os.stat(base_path).st_blocks * 512 <= 8 * BLOCK_SIZE


def test_sparse_copy_replaces_destination(base, tmp_path):
    path, _ = base
    dst = str(tmp_path / "dst")
    with open(dst, "wb") as f:
        f.write(b"\xff" * (NBLOCKS * 2 * BLOCK_SIZE))
    sparse_copy(path, dst)
    assert read_all(dst) == read_all(path)


def test_flush_points(run):
    _, events = run
    assert len(events) == 10
    assert flush_points(events) == [0, 2, 6, 10]
    assert flush_points([]) == [0]
    assert flush_points([("flush",)]) == [0, 1]


def test_prefix_at_flush_boundary_holds_exactly_the_flushed_writes(run, tmp_path):
    base_path, events = run
    dest = str(tmp_path / "crash")
    expected = read_all(base_path)

    build_image(base_path, events, dest, upto=0)
    assert read_all(dest) == expected

    build_image(base_path, events, dest, upto=2)
    expected[0:2] = [block(1)] * 2
    assert read_all(dest) == expected

    build_image(base_path, events, dest, upto=6)
    expected[2], expected[3] = block(2), block(3)
    expected[40:42] = [block(0)] * 2  # the flushed discard reads as zeros
    assert read_all(dest) == expected


def test_full_prefix_without_options_applies_writes_in_order(run, tmp_path):
    base_path, events = run
    dest = str(tmp_path / "crash")
    build_image(base_path, events, dest, upto=9)  # stop before the unflushed discard
    img = read_all(dest)
    assert img[0] == block(0x99)
    assert img[10:14] == [block(10)] * 3 + [block(13)]
    assert img[42:44] == [block(0xEE)] * 2


def flushed_state(base_path, events, tmp_path):
    dest = str(tmp_path / "flushed")
    build_image(base_path, events, dest, upto=6)
    return read_all(dest)


def window_block_values(i: int) -> set[bytes]:
    """What block i may hold after a crash in the last window."""
    full = {0: {block(1), block(0x99)}, 13: {block(0), block(13)}, 42: {block(0xEE), block(0)}}
    full.update({b: {block(0), block(10)} for b in (10, 11, 12)})
    full[43] = full[42]
    return full.get(i, set())


@pytest.mark.parametrize("seed", range(20))
def test_variants_only_touch_the_unflushed_window(run, tmp_path, seed):
    base_path, events = run
    flushed = flushed_state(base_path, events, tmp_path)
    dest = str(tmp_path / "crash")
    build_image(
        base_path,
        events,
        dest,
        upto=len(events),
        drop_after_last_flush=0.5,
        reorder=True,
        tear=True,
        rng=random.Random(seed),
    )
    img = read_all(dest)
    for i, (got, durable) in enumerate(zip(img, flushed)):
        allowed = window_block_values(i)
        if not allowed:
            assert got == durable, f"block {i} outside the window changed"
            continue
        # A torn block is a sector-wise mix of the old and the new contents.
        for s in range(0, BLOCK_SIZE, SECTOR_SIZE):
            assert {got[s : s + SECTOR_SIZE]} <= {v[s : s + SECTOR_SIZE] for v in allowed}


def test_drop_everything_leaves_the_flushed_state(run, tmp_path):
    base_path, events = run
    flushed = flushed_state(base_path, events, tmp_path)
    dest = str(tmp_path / "crash")
    # Probability 1 drops every write; upto=9 stops before the unflushed discard.
    build_image(base_path, events, dest, upto=9, drop_after_last_flush=1.0)
    assert read_all(dest) == flushed


def test_reorder_can_lose_an_overwrite_order(tmp_path):
    """Two unflushed writes to one block: reordering exposes either value."""
    path = str(tmp_path / "image")
    BlockDevice.create_file(path, 4 * BLOCK_SIZE)
    base_path = snapshot(path)
    assert base_path == path + ".base"

    def overwrite(dev):
        dev.write_sync(0, [block(1)])
        dev.write_sync(0, [block(2)])

    events = record(path, overwrite)
    seen = set()
    for seed in range(30):
        dest = str(tmp_path / "crash")
        build_image(base_path, events, dest, upto=2, reorder=True, rng=random.Random(seed))
        seen.add(read_all(dest)[0])
    assert seen == {block(1), block(2)}


def test_tear_is_partial_and_sector_granular(tmp_path):
    path = str(tmp_path / "image")
    BlockDevice.create_file(path, 8 * BLOCK_SIZE)
    base_path = snapshot(path)
    events = record(path, lambda dev: dev.write_sync(0, [block(7, 4)]))
    outcomes = set()
    for seed in range(60):
        dest = str(tmp_path / "crash")
        build_image(base_path, events, dest, upto=1, tear=True, rng=random.Random(seed))
        data = b"".join(read_all(dest)[:4])
        written = len(data.rstrip(b"\0"))
        assert data[:written] == b"\7" * written  # a prefix of the write
        assert written % SECTOR_SIZE == 0 and written < 4 * BLOCK_SIZE  # strictly partial
        outcomes.add(written)
    assert any(w % BLOCK_SIZE for w in outcomes)  # some tear inside a block
    assert any(w and w % BLOCK_SIZE == 0 for w in outcomes)  # some on a block boundary


def test_unflushed_discard_is_kept_or_not(run, tmp_path):
    base_path, events = run
    seen = set()
    for seed in range(20):
        dest = str(tmp_path / "crash")
        build_image(base_path, events, dest, upto=10, rng=random.Random(seed))
        seen.add(read_all(dest)[42])
    assert seen == {block(0), block(0xEE)}


def test_build_is_deterministic_for_a_seed(run, tmp_path):
    base_path, events = run
    opts = dict(upto=10, drop_after_last_flush=0.5, reorder=True, tear=True)
    images = []
    for name in ("a", "b"):
        dest = str(tmp_path / name)
        build_image(base_path, events, dest, rng=random.Random(1234), **opts)
        images.append(read_all(dest))
    assert images[0] == images[1]


def test_upto_out_of_range(run, tmp_path):
    base_path, events = run
    with pytest.raises(ValueError):
        build_image(base_path, events, str(tmp_path / "x"), upto=len(events) + 1)


def test_crash_images_matrix(run, tmp_path):
    base_path, events = run
    workdir = str(tmp_path / "matrix")
    results = list(crash_images(base_path, events, workdir, rng=random.Random(5)))
    labels = [label for label, _ in results]
    # Clean cuts at every flush point, plus two variants for each non-empty window.
    assert [l for l in labels if "+" not in l] == ["flush#0", "flush#1", "flush#2", "end"]
    assert len(labels) == 4 + 3 * 2
    assert len({p for _, p in results}) == len(results)
    assert all(os.path.dirname(p) == workdir and os.path.exists(p) for _, p in results)
    for label, path in results:
        if label.startswith("flush#0+"):
            img = read_all(path)
            # Cut inside the first window: only blocks 0..1 can differ from base.
            assert img[2:] == read_all(base_path)[2:]
    clean = dict(results)
    assert read_all(clean["flush#2"]) == flushed_state(base_path, events, tmp_path)


def test_crash_images_labels_replay(run, tmp_path):
    """A variant's label carries everything needed to rebuild it."""
    base_path, events = run
    results = list(crash_images(base_path, events, str(tmp_path / "m"), rng=random.Random(9)))
    for label, path in results:
        if "+" not in label:
            continue
        head, _, rest = label.partition("+")
        point = flush_points(events)[int(head.removeprefix("flush#"))]
        cut, *flags = rest.split(" (seed ")[0].split()
        seed = int(rest.split("(seed ")[1].rstrip(")"))
        drop = next((float(f.split("=")[1]) for f in flags if f.startswith("drop=")), 0.0)
        dest = str(tmp_path / "replay")
        build_image(
            base_path,
            events,
            dest,
            upto=point + int(cut.removesuffix("ev")),
            reorder="reorder" in flags,
            tear="tear" in flags,
            drop_after_last_flush=drop,
            rng=random.Random(seed),
        )
        assert read_all(dest) == read_all(path), label


def test_crash_images_deterministic(run, tmp_path):
    base_path, events = run
    runs = []
    for name in ("a", "b"):
        out = crash_images(base_path, events, str(tmp_path / name), rng=random.Random(3))
        runs.append([(label, read_all(p)) for label, p in out])
    assert runs[0] == runs[1]
