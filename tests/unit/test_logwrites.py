"""The write log (-o log_writes): what a device completed, in order, with
the marks between, read back as crashsim replays it."""

import pytest

from delafs.block import BLOCK_SIZE, BlockDevice
from delafs.block.logwrites import WriteLog, read_write_log
from delafs.testing.crashsim import build_image


async def test_events_and_marks_round_trip_and_replay(tmp_path):
    base = str(tmp_path / "base.img")
    BlockDevice.create_file(base, 1 << 20)
    live = str(tmp_path / "live.img")
    BlockDevice.create_file(live, 1 << 20)
    dev = BlockDevice.open(live)
    log = WriteLog(str(tmp_path / "w.log"))
    dev.recorder = log
    await dev.write(3, [b"a" * BLOCK_SIZE, b"b" * BLOCK_SIZE])
    assert log.mark("first") == 1
    await dev.flush()
    await dev.discard(3, 1)
    log.mark("second")
    log.close()
    dev.close()
    events, marks = read_write_log(str(tmp_path / "w.log"))
    assert events == [("write", 3, b"a" * BLOCK_SIZE + b"b" * BLOCK_SIZE), ("flush",), ("discard", 3, 1)]
    assert marks == [(1, "first"), (3, "second")]
    out = str(tmp_path / "out.img")
    build_image(base, events, out, upto=2)
    with open(out, "rb") as f:
        f.seek(3 * BLOCK_SIZE)
        assert f.read(2 * BLOCK_SIZE) == b"a" * BLOCK_SIZE + b"b" * BLOCK_SIZE


def test_a_record_cut_short_by_a_kill_ends_the_log(tmp_path):
    path = str(tmp_path / "w.log")
    log = WriteLog(path)
    log.events.append(("flush",))
    log.events.append(("write", 0, b"x" * BLOCK_SIZE))
    log.close()
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    events, marks = read_write_log(path)
    assert events == [("flush",)] and marks == []


def test_not_a_write_log(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a delafs write log"):
        read_write_log(str(path))
