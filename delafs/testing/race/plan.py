"""The workload of one schedule: which tasks, which operations, drawn from
its seed."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .consts import BS, MMAP_SLOT


@dataclass
class Plan:
    """Everything a schedule does, drawn from its seed."""
    nblocks: int                  # initial file size in blocks
    work: int                     # blocks [0, work) never leave EOF (mmap stores live there)
    setup: str                    # truncate | zerofill | zerofill_sync | prealloc | lowspace
    precache: bool                # read the file first: large clean folios
    cache_blocks: int | None      # small page cache (eviction) or None
    tags: dict[str, int]
    only: dict[str, tuple[str, ...]]
    tasks: list[tuple[str, list]] = field(default_factory=list)

    def describe(self) -> list[str]:
        lines = [f"file {self.nblocks} blocks (work region {self.work}), setup {self.setup}"
                 f"{', precached' if self.precache else ''}"
                 f"{f', cache {self.cache_blocks} blocks' if self.cache_blocks else ''}",
                 "errortags " + (", ".join(f"{k}={v}" + (f" (only {'/'.join(self.only[k])})"
                                                         if k in self.only else "")
                                          for k, v in sorted(self.tags.items()) if v) or "none")]
        for name, ops in self.tasks:
            lines.append(f"{name}: " + "; ".join(_op_str(op) for op in ops))
        return lines


def _op_str(op) -> str:
    kind = op[0]
    if kind == "pwrite":
        _, pos, data, fail_at = op
        s = f"pwrite({pos}, {len(data)})"
        return s + (f" unfaultable from {fail_at}" if fail_at is not None else "")
    if kind == "mmap":
        return f"mmap({op[1]}, {len(op[2])}{', chasing' if op[3] else ''})"
    if kind == "truncate":
        return f"truncate({op[1]})"
    if kind == "read":
        return f"read({op[1]}, {op[2]})"
    return kind


_PROFILES = {
    # What a mutant's workload needs for its bug to become observable.  The
    # plain explorer draws all of these too, only less often.
    "mkwrite_punches": dict(enospc=("mmap",), large=True, precache=True, setup="truncate",
                            placement="hot", mmaps=2),
    "no_writeback_discard": dict(enospc=("writeback",), writeback=True),
    "no_cookie_check": dict(enospc=("writeback",), writeback=True, large=True, small_cache=True,
                            placement="hot"),
    "punch_unwritten": dict(writeback=True, short=True, placement="hot", efault=3, mmaps=2),
    "per_folio_punch": dict(large=True, short=True, efault=5, efault_spans=[2, 4, 8],
                            fail_mid=True),
    "no_invalidate_lock": dict(short=True, efault=4, mmaps=2, chase=0.8),
    "no_eof_clamp": dict(extend=True, short=True, placement="hot", efault=3, mmaps=2),
}


def make_plan(seed: int, mutant_name: str | None = None) -> Plan:
    """The workload of schedule ``seed``: a pure function of the seed."""
    r = random.Random(f"delafs-race:{seed}:workload")
    prof = _PROFILES.get(mutant_name, {})
    nblocks = r.choice([8, 12, 16, 24, 32])
    work = nblocks - r.randint(2, max(2, nblocks // 4))
    setup = prof.get("setup") or r.choices(
        ["truncate", "zerofill", "zerofill_sync", "prealloc", "lowspace"], weights=[4, 2, 1, 2, 1])[0]
    precache = prof.get("precache") or r.random() < 0.3 or (prof.get("large") and r.random() < 0.5)
    small_cache = r.random() < (0.5 if prof.get("small_cache") else 0.2)
    cache_blocks = r.choice([6, 12, 24]) if small_cache else None
    tags = {
        "short_copy": r.choice([0, 2, 2, 3, 4, 6]) or (3 if prof.get("short") else 0),
        "stale_mapping": r.choice([0, 0, 3, 5, 8]),
        "copy_fault": r.choice([0, 0, 0, 6, 10]),
        "alloc_enospc": 0,
        "writeback_eio": r.choice([0] * 6 + [2, 4]),
    }
    only: dict[str, tuple[str, ...]] = {}
    if prof.get("enospc"):
        tags["alloc_enospc"] = r.choice([2, 3])
        only["alloc_enospc"] = prof["enospc"]
    elif r.random() < 0.3:
        tags["alloc_enospc"] = r.choice([2, 3, 5])
        only["alloc_enospc"] = r.choice([("mmap",), ("writeback",), ("writer",), ("mmap", "writer")])
    plan = Plan(nblocks, work, setup, precache, cache_blocks, tags, only)
    eof = nblocks * BS

    def marker(name: str, k: int, n: int) -> bytes:
        tag = f"<{name}#{k}>".encode()
        return (tag * (n // len(tag) + 1))[:n]

    # Often most ops hit a few "hot" blocks, so that writers, faults and
    # punches meet on the same blocks (holetest: every task has its own slot
    # in the same pages).
    # Or every task sweeps the same blocks in the same order (holetest's
    # threads walking the pages of one file), so they meet at blocks that
    # are still holes: the first one to arrive reserves, the others race it.
    hot = r.sample(range(work), min(work, r.randint(1, 3)))
    placement = prof.get("placement") or r.choices(["random", "hot", "sweep"], weights=[1, 2, 2])[0]
    hot_p = r.choice([0.5, 0.8]) if placement == "hot" else 0.0
    sweep_start = r.randrange(work)
    sweep_pos: dict[str, int] = {}

    def block(task: str = "") -> int:
        if placement == "sweep" and task:
            k = sweep_pos.get(task, 0)
            sweep_pos[task] = k + 1
            return (sweep_start + k) % work
        return r.choice(hot) if r.random() < hot_p else r.randrange(work)

    nwriters = r.choice([1, 2, 2])
    for w in range(nwriters):
        name = f"writer{w + 1}"
        slot = (0, 1024)[w]
        ops = []
        for k in range(r.randint(2, 5)):
            kind = r.choices(["slot", "multi", "aligned", "extend", "efault"],
                             weights=[5, 3, 3 if prof.get("large") else 1,
                                      2 if prof.get("extend") else 1, prof.get("efault", 2)])[0]
            fail_at = None
            if kind == "slot":
                pos = block(name) * BS + slot + r.randrange(0, 448)
                n = r.randint(8, 64)
            elif kind == "multi":
                b = block() if r.random() < 0.5 else r.randrange(work)
                span = r.randint(2, 8)
                pos = b * BS + r.randrange(0, BS)
                n = min(span * BS - r.randrange(0, BS), max(1, work * BS - pos))
            elif kind == "aligned":
                span = r.choice([2, 4, 8])
                b = r.randrange(max(1, work // span)) * span
                pos, n = b * BS, min(span, work - b) * BS
            elif kind == "extend":
                pos = r.randrange(work * BS, eof + BS)
                n = r.randint(100, 2 * BS)
            else:
                # The source cannot be faulted in from fail_at on: the write
                # stops there and punches the rest of its NEW delalloc (at
                # 0 it fails with EFAULT: a direct punch of its whole range).
                b = block(name)
                span = r.choice(prof.get("efault_spans", [1, 1, 2, 4]))
                pos = b * BS + r.randrange(0, BS) if span == 1 else (b & ~(span - 1)) * BS
                n = r.randint(8, span * BS)
                fail_at = r.choice([0, 0, r.randrange(1, n + 1)] if not prof.get("fail_mid")
                                   else [0, r.randrange(1, n + 1), r.randrange(1, n + 1)])
            ops.append(("pwrite", pos, marker(name, k, n), fail_at))
        plan.tasks.append((name, ops))
    nmmap = prof.get("mmaps") or r.choice([0, 1, 1, 1, 2])
    chase_p = prof.get("chase", r.choice([0.0, 0.3, 0.7]))
    for i in range(nmmap):
        ops = []
        half = (MMAP_SLOT[1] - MMAP_SLOT[0]) // 2
        base = MMAP_SLOT[0] + i * half
        for k in range(r.randint(2, 7)):
            pos = block(f"mmap{i + 1}") * BS + base + 16 * r.randrange(0, half // 16)
            n = r.randint(4, 16)
            # A chasing store goes, at run time, to a block some write is in
            # the middle of (if there is one): faults meet in-flight writes.
            ops.append(("mmap", pos, marker(f"m{i + 1}", k, n), r.random() < chase_p))
        plan.tasks.append((f"mmap{i + 1}", ops))
    if r.random() < 0.6:
        ops = []
        cur = eof
        for _ in range(r.randint(1, 2)):
            small = r.randrange(work * BS, cur + 1) if cur > work * BS else work * BS
            ops.append(("truncate", small))
            cur = r.choice([eof, r.randrange(small, eof + 1)])
            ops.append(("truncate", cur))
        plan.tasks.append(("truncate", ops))
    if prof.get("writeback") or r.random() < 0.8:
        ops = [r.choice(["writepages", "writepages", "writepages", "commit"])
               for _ in range(r.randint(2, 6))]
        if "writepages" not in ops:
            ops.append("writepages")
        plan.tasks.append(("writeback", [(o,) for o in ops]))
    if r.random() < 0.3:
        ops = []
        for _ in range(r.randint(1, 3)):
            pos = r.randrange(eof)
            ops.append(("read", pos, r.randint(1, 4 * BS)))
        plan.tasks.append(("reader", ops))
    return plan
