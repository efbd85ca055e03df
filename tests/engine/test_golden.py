"""Golden logs: what fixed single-task workloads do to the device, and the
trace events on the way, byte for byte.

They pin behaviour across refactors that must not change it (moving code
between modules, merging the iteration loops): each workload runs on an
in-memory device with no background task, so the order of device writes,
flushes and discards and of the trace events is deterministic.  Block
numbers and lengths are logged, not contents (inode times and the mkfs
UUID differ run to run).

Regenerate after an intended change with ``DELAFS_UPDATE_GOLDEN=1`` and
say in the commit why the log moved.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from delafs.block.memory import MemoryDevice
from delafs.fs.filesystem import Filesystem
from delafs.lib.errortag import ErrorTags
from delafs.lib.trace import TRACE
from delafs.vfs.mount import Mount

GOLDEN = Path(__file__).parent / "golden"
BS = 4096
ROOT = 1


class Log:
    """Device requests and trace events, in the order they happened."""

    def __init__(self):
        self.lines: list[str] = []
        self.events = self          # a Recorder's ``events``

    def append(self, ev: tuple) -> None:
        if ev[0] == "write":
            self.lines.append(f"dev write {ev[1]} +{len(ev[2]) // BS}")
        elif ev[0] == "flush":
            self.lines.append("dev flush")
        else:
            self.lines.append(f"dev discard {ev[1]} +{ev[2]}")

    def trace(self, name: str, fields: dict) -> None:
        self.lines.append(" ".join([name, *(f"{k}={fields[k]}" for k in sorted(fields))]))


async def run_workload(name: str, body) -> str:
    dev = MemoryDevice(16 << 20)
    await Filesystem.format(dev)
    fs = await Filesystem.open(dev)
    m = Mount(fs, errortags=ErrorTags(seed=7))
    ino = (await fs.create(ROOT, b"f", 0o644)).ino
    await fs.commit()
    log = Log()
    dev.recorder = log
    TRACE.clear()
    TRACE.enable(log.trace)
    try:
        await body(m, ino)
    finally:
        TRACE.disable()
    return "\n".join([f"# {name}", *log.lines]) + "\n"


async def w_write(m, ino):
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"a" * (3 * BS))
    await m.write(f, 5000, b"b" * 10000)
    await m.write(f, 0, b"c" * 100, append=True)
    await m.fsync(f)
    await m.release(f)


async def w_short_copy(m, ino):
    f = await m.open(ino, write=True)
    m.errortags.set("short_copy", 2)
    await m.write(f, 0, b"s" * (6 * BS + 123))
    m.errortags.set("short_copy", 0)
    m.errortags.set("copy_fault", 1)
    with pytest.raises(Exception):
        await m.write(f, 10 * BS, b"x" * BS)
    m.errortags.set("copy_fault", 0)
    await m.fsync(f)
    await m.release(f)


async def w_truncate(m, ino):
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"t" * (8 * BS))
    await m.fsync(f)
    await m.truncate(ino, 3 * BS + 17)
    await m.write(f, 6 * BS, b"u" * 50)
    await m.truncate(ino, 12 * BS)
    await m.fsync(f)
    await m.release(f)


async def w_fsync(m, ino):
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"1" * (4 * BS))
    await m.fsync(f)
    await m.write(f, BS, b"2" * BS)
    await m.fsync(f, True)
    await m.fsync(f)
    await m.release(f)


async def w_mmap_write(m, ino):
    await m.truncate(ino, 8 * BS)
    await m.mmap_write(ino, 2 * BS + 10, b"m" * 100)
    await m.mmap_write(ino, 5 * BS, b"n" * BS)
    f = await m.open(ino, write=False)
    await m.fsync(f)
    await m.release(f)


async def w_readahead(m, ino):
    f = await m.open(ino, write=True)
    await m.write(f, 0, b"r" * (40 * BS))
    await m.fsync(f)
    await m.release(f)
    inode = await m.iget(ino)
    async with inode.mapping.invalidate_lock.exclusive():
        await inode.mapping.truncate_range(0, None)     # drop the cache: reads go to the device
    f = await m.open(ino, write=False)
    for off in range(0, 40 * BS, 8 * BS):
        assert await m.read(f, off, 8 * BS) == b"r" * (8 * BS)
    await m.release(f)


WORKLOADS = {"write": w_write, "short_copy": w_short_copy, "truncate": w_truncate,
             "fsync": w_fsync, "mmap_write": w_mmap_write, "readahead": w_readahead}


@pytest.mark.parametrize("name", sorted(WORKLOADS))
async def test_golden_log(name):
    text = await run_workload(name, WORKLOADS[name])
    path = GOLDEN / f"{name}.log"
    if os.environ.get("DELAFS_UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden log {path.name}: run with DELAFS_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name}: the device/trace sequence moved (see {path})"


@pytest.mark.parametrize("name", sorted(WORKLOADS))
async def test_golden_workloads_are_deterministic(name):
    """A golden log that changed from run to run could not pin anything."""
    assert await run_workload(name, WORKLOADS[name]) == await run_workload(name, WORKLOADS[name])
