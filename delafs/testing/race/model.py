"""What the workload expects: per-task fault injection, the byte-level model
of the file, and the source buffer a task copies from."""

from __future__ import annotations

from ...iomap.buffered_io import IovIter
from ...lib.errortag import ErrorTags
from ...ondisk import BLOCK_SHIFT
from .scheduler import Scheduler


class RaceErrorTags(ErrorTags):
    """ErrorTags whose tags can be limited to some tasks (by name prefix), so
    a workload injects, say, ENOSPC into page faults but not into writeback."""

    def __init__(self, seed, sched: Scheduler):
        super().__init__(seed)
        self.sched = sched
        self.only: dict[str, tuple[str, ...]] = {}

    def fires(self, tag: str) -> bool:
        if not self.active:
            return False
        prefixes = self.only.get(tag)
        if prefixes is not None:
            info = self.sched.info()
            if info is None or not info.name.startswith(prefixes):
                return False
        return super().fires(tag)

    async def delay(self, tag: str) -> None:
        # Real sleeps would make the run depend on time; they stay off.
        return None

    def clear(self) -> None:
        for t in self.values:
            self.values[t] = 0
        self.active = False



class Model:
    """What the file must contain: updated at the instant bytes land in the
    page cache (a buffered-write copy, an mmap store) or a truncate returns,
    which under trio's single thread is a total order."""

    def __init__(self, size: int, cap: int):
        self.cap = cap
        self.data = bytearray(cap)
        self.amb = bytearray(cap)       # 1: a failed writeback may have lost this byte
        self.size = size
        self.events: list[tuple[int, str, int, int]] = []   # (step, who, pos, len)
        self.failed_writeback = False

    def land(self, pos: int, data, who: str, step: int) -> None:
        n = len(data)
        assert pos + n <= self.cap, (pos, n, self.cap)
        self.data[pos:pos + n] = data
        self.amb[pos:pos + n] = bytes(n)
        self.events.append((step, who, pos, n))

    def truncate(self, size: int) -> None:
        if size < self.size:
            self.data[size:self.size] = bytes(self.size - size)
            self.amb[size:self.size] = bytes(self.size - size)
        self.size = size

    def ambiguous(self, lo: int, hi: int) -> None:
        self.failed_writeback = True
        lo, hi = max(0, lo), min(self.cap, hi)
        if lo < hi:
            self.amb[lo:hi] = b"\x01" * (hi - lo)

    def short_ok(self, disk_size: int) -> bool:
        """After a failed writeback the on-disk size may lag the in-memory
        one (only completed ioends move it): acceptable if nothing certain
        but zeros lies past it."""
        if not self.failed_writeback or disk_size > self.size:
            return False
        for off in range(disk_size, self.size):
            if self.data[off] and not self.amb[off]:
                return False
        return True

    def who(self, off: int) -> str:
        for step, who, pos, n in reversed(self.events):
            if pos <= off < pos + n:
                return f"{who} at step {step}"
        return "nobody (zeros)"

    def compare(self, got: bytes, where: str, *, allow_short: bool = False) -> str | None:
        size = self.size
        if allow_short and len(got) < size and self.short_ok(len(got)):
            size = len(got)
        exp = bytearray(self.data[:size])
        amb = self.amb
        i = amb.find(1, 0, size)
        while i != -1:
            j = amb.find(0, i, size)
            if j == -1:
                j = size
            exp[i:j] = got[i:j] if len(got) >= j else exp[i:j]
            i = amb.find(1, j, size)
        if len(got) == size and got == exp:
            return None
        n = min(len(got), size)
        off = next((k for k in range(n) if got[k] != exp[k]), n)
        if off == n and len(got) != size:
            return f"{where}: file size {len(got)}, expected {size}"
        end = off
        while end < n and got[end] != exp[end]:
            end += 1
        return (f"{where}: bytes [{off}, {end}) of the file (block {off >> BLOCK_SHIFT}) read "
                f"{bytes(got[off:min(end, off + 12)])!r}..., expected "
                f"{bytes(exp[off:min(end, off + 12)])!r}... written by {self.who(off)}")


class RaceIovIter(IovIter):
    """A write source that records, at the instant of each copy into a folio,
    which file bytes it put there (and takes them back on revert)."""

    __slots__ = ("pos", "model", "who", "sched", "fail_at", "kept", "_undo")

    def __init__(self, data, tags, pos: int, model: Model, who: str, sched: Scheduler,
                 fail_at: int | None = None):
        super().__init__(data, tags)
        self.pos = pos
        self.model = model
        self.who = who
        self.sched = sched
        self.fail_at = fail_at        # source offset from which it cannot be faulted in
        self.kept = 0
        self._undo = None

    def fault_in(self, n: int) -> int:
        if self.fail_at is not None and self.off >= self.fail_at:
            return 0
        return super().fault_in(n)

    def copy_to(self, buf, off: int, n: int) -> int:
        start = self.off
        copied = super().copy_to(buf, off, n)
        fpos = self.pos + start
        m = self.model
        self._undo = (fpos, bytes(m.data[fpos:fpos + copied]), bytes(m.amb[fpos:fpos + copied]))
        m.land(fpos, self.data[start:start + copied], self.who, self.sched.step)
        self.kept += copied
        return copied

    def revert(self, n: int) -> None:
        super().revert(n)
        if n:
            fpos, old, oldamb = self._undo
            end = fpos + len(old)
            self.model.data[end - n:end] = old[len(old) - n:]
            self.model.amb[end - n:end] = oldamb[len(oldamb) - n:]
            self.kept -= n
