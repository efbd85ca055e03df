#!/usr/bin/env python3
"""In-process benchmark of the delafs iomap engine (no FUSE, no kernel).

    python tools/engine_bench.py [--dir DIR] [--size 256M] [--cache-size 512M]
                                 [--runtime-cap SECONDS] [--json OUT]
                                 [--punch scan|legacy] [--keep]

It creates a sparse image in DIR (default /var/tmp: /tmp may be tmpfs),
formats it, opens a Mount with its flusher and periodic journal commit
running in a trio nursery (as tests/engine/conftest.py's Rig does) and
drives the Mount's file operations directly, each workload on a fresh file:

  seq_write      1 MiB writes from offset 0 up to SIZE, then fsync
  rand_write     4 KiB writes at seeded random block-aligned offsets of a
                 SIZE/4 file that was first written sequentially and
                 fsynced (untimed): overwrites of allocated blocks; then fsync
  rand_write_sparse  the same writes into a SIZE/4 file that is one hole
                 (truncated up, never written): every write reserves
                 delalloc; the fsync allocates and converts it
  seq_read       1 MiB reads of the seq_write file, cold: after syncfs the
                 page cache is dropped (PageCache.shrink(0)) and, unless
                 --warm-host, the image's host page cache too
                 (POSIX_FADV_DONTNEED), so reads go to the device
  rand_read      4 KiB reads at seeded random offsets of the same file,
                 cold in the same way
  appends        4-byte O_APPEND writes into a new file (generic/069's
                 pattern; as many as the random workloads make), then
                 fsync; the file is read back and checked
  smallfiles     fio's smallfiles job in process: files of 16 KiB, each
                 created, written in four 4 KiB writes and fsynced (as many
                 writes as the random workloads make); ops are the writes,
                 as fio counts them; the files are read back and checked

Times are wall-clock (time.perf_counter) and include the final fsync of the
write workloads (the table also shows the fsync share).  For each workload
it reports MiB/s, ops/s and the engine counters that moved (from
Mount.statistics(): short copies, stale mappings, delalloc punches, ioends
and their average size, iomap iterations, folios read, device requests and
their average size, throttling).
Reads are checked against what was written.

``--runtime-cap`` bounds each workload's timed loop: when it is reached the
workload stops early, the table says so (``capped``) and the rates are those
of the operations that ran.  ``--random-ops`` sets the number of random
operations (default: one per block of the SIZE/4 file).

DELAFS_DEBUG_LOCKS (lock-ownership assertions, on by default) costs time on
the hot paths; ``--no-debug-locks`` turns it off for the run, and the output
always says which it was.  ``--profile N`` runs everything under cProfile
and prints the N functions with the most own time.

The image is removed at the end unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

from delafs.lib import locks, units

ROOT_INO = 1
MiB = 1 << 20
BLOCK = 4096
SEQ_CHUNK = 1 * MiB
RAND_CHUNK = BLOCK

WORKLOADS = ("seq_write", "rand_write", "rand_write_sparse", "seq_read", "rand_read", "appends",
             "smallfiles")
SMALL_WRITES = 4                # per file, RAND_CHUNK each
APPEND_CHUNK = b"abcd"



def parse_size(text: str) -> int:
    try:
        return units.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="In-process benchmark of the delafs iomap engine.",
        epilog="Workloads: " + ", ".join(WORKLOADS))
    p.add_argument("--dir", default="/var/tmp",
                   help="where the sparse image is created (default /var/tmp)")
    p.add_argument("--size", type=parse_size, default=parse_size("256M"),
                   help="size of the sequential file; random workloads use SIZE/4 (default 256M)")
    p.add_argument("--cache-size", type=parse_size, default=parse_size("512M"),
                   help="page-cache size of the Mount (default 512M; dirty limit is a quarter)")
    p.add_argument("--runtime-cap", type=float, default=30.0, metavar="SECONDS",
                   help="stop each workload's timed loop after this many seconds (default 30)")
    p.add_argument("--random-ops", type=int, default=None, metavar="N",
                   help="operations per random workload (default: blocks in SIZE/4)")
    p.add_argument("--seed", type=int, default=1, help="seed of the random offsets (default 1)")
    p.add_argument("--punch", choices=("scan", "legacy"), default="scan",
                   help="the engine's delalloc punch mode (default scan)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="comma-separated subset to run (default: all)")
    p.add_argument("--warm-host", action="store_true",
                   help="do not drop the image's host page cache before the read workloads")
    p.add_argument("--no-debug-locks", action="store_true",
                   help="turn the lock assertions off for this run (lib.locks.DEBUG_LOCKS)")
    p.add_argument("--fsck", action="store_true", help="fsck the image after the unmount")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--keep", action="store_true", help="keep the image file at the end")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="run under cProfile and print the top N functions by own time")
    args = p.parse_args(argv)
    wl = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in wl if w not in WORKLOADS]
    if bad:
        p.error(f"unknown workload(s) {', '.join(bad)}; known: {', '.join(WORKLOADS)}")
    args.workloads = wl
    if args.size < 4 * SEQ_CHUNK or args.size % SEQ_CHUNK:
        p.error("--size must be a multiple of 1M and at least 4M")
    if args.runtime_cap <= 0:
        p.error("--runtime-cap must be positive")
    if args.random_ops is not None and args.random_ops <= 0:
        p.error("--random-ops must be positive")
    if not os.path.isdir(args.dir):
        p.error(f"--dir {args.dir} is not a directory")
    return args


# ---------------------------------------------------------------------------
# Data patterns: every 1 MiB chunk carries its index, so a misplaced read shows
# ---------------------------------------------------------------------------

class Pattern:
    def __init__(self, seed: int):
        self.base = random.Random(seed).randbytes(SEQ_CHUNK)

    def chunk(self, index: int) -> bytes:
        return index.to_bytes(8, "little") + self.base[8:]

    def expected(self, pos: int, n: int) -> bytes:
        """The bytes the sequential file holds at [pos, pos+n), n <= 1 MiB,
        not crossing a chunk boundary."""
        index, off = divmod(pos, SEQ_CHUNK)
        return self.chunk(index)[off:off + n] if off < 8 else self.base[off:off + n]


# ---------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------

def flat_stats(m) -> dict[str, int]:
    """The numeric counters of Mount.statistics(), flattened."""
    s = m.statistics()
    out = {}
    for group in ("engine", "iomap", "cache", "dev", "fs", "journal"):
        for k, v in (s.get(group) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{group}.{k}"] = v
    return out


# Counters that are levels, not events: their delta means nothing.
_LEVELS = {"cache.cache_size", "cache.dirty_limit", "cache.dirty_background",
           "cache.cached_bytes", "cache.dirty_bytes", "cache.writeback_bytes",
           "cache.folios", "cache.lru_folios", "cache.mappings", "cache.dirty_mappings",
           "cache.throttled_now"}


def stats_delta(before: dict, after: dict) -> dict:
    d = {}
    for k, v in after.items():
        if k in _LEVELS:
            continue
        dv = v - before.get(k, 0)
        if dv:
            d[k] = dv
    return d


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------

class Bench:
    def __init__(self, m, args, image_path: str):
        self.m = m
        self.args = args
        self.image_path = image_path
        self.pattern = Pattern(args.seed)
        self.nfiles = 0
        self.seq_ino = None
        self.seq_size = 0
        self.results: list[dict] = []

    @property
    def rand_file_size(self) -> int:
        return self.args.size // 4

    @property
    def rand_ops(self) -> int:
        return self.args.random_ops or self.rand_file_size // RAND_CHUNK

    async def new_file(self, name: str) -> int:
        self.nfiles += 1
        inode = await self.m.fs.create(ROOT_INO, f"{name}.{self.nfiles}".encode(), 0o644)
        return inode.ino

    async def drop_caches(self) -> None:
        """Write everything back, then empty delafs's page cache and (unless
        --warm-host) the host's cache of the image file."""
        m = self.m
        await m.syncfs()
        m.cache.shrink(0)
        if not self.args.warm_host and hasattr(os, "posix_fadvise"):
            fd = os.open(self.image_path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def record(self, name: str, *, ops: int, planned: int, nbytes: int, secs: float,
               fsync_secs: float = 0.0, capped: bool, before: dict, note: str = "",
               errors: int = 0, op_bytes: int | None = None) -> dict:
        delta = stats_delta(before, flat_stats(self.m))
        ioends = delta.get("iomap.ioends", 0)
        r = {
            "workload": name,
            "ops": ops,
            "planned_ops": planned,
            "op_bytes": op_bytes or (SEQ_CHUNK if name.startswith("seq") else RAND_CHUNK),
            "bytes": nbytes,
            "seconds": round(secs, 4),
            "fsync_seconds": round(fsync_secs, 4),
            "mib_per_s": round(nbytes / MiB / secs, 2) if secs > 0 else None,
            "ops_per_s": round(ops / secs, 1) if secs > 0 else None,
            "capped": capped,
            "verify_errors": errors,
            "short_copies": delta.get("engine.short_copies", 0),
            "stale_mappings": delta.get("engine.stale_mappings", 0),
            "punches": delta.get("engine.punches", 0),
            "ioends": ioends,
            "avg_ioend_bytes": round(delta.get("iomap.ioend_bytes", 0) / ioends) if ioends else 0,
            "note": note,
            "counters": delta,
        }
        if capped:
            r["note"] = (f"capped at {self.args.runtime_cap:g}s: {ops} of {planned} ops"
                         + (f"; {note}" if note else ""))
        self.results.append(r)
        return r

    async def _until_cap(self, items, op, t0: float) -> tuple[int, bool]:
        """Await ``op(item)`` for each item until --runtime-cap after t0;
        returns (ops done, capped)."""
        deadline = t0 + self.args.runtime_cap
        ops = 0
        for item in items:
            if time.perf_counter() >= deadline:
                return ops, True
            await op(item)
            ops += 1
        return ops, False

    # -- writes ---------------------------------------------------------------

    async def _seq_fill(self, f, size: int, deadline: float | None) -> tuple[int, bool]:
        """Write chunks 0.. up to size; returns (ops done, capped)."""
        m, pat = self.m, self.pattern
        n = size // SEQ_CHUNK
        for i in range(n):
            if deadline is not None and time.perf_counter() >= deadline:
                return i, True
            await m.write(f, i * SEQ_CHUNK, pat.chunk(i))
        return n, False

    async def seq_write(self, *, timed: bool = True) -> None:
        m = self.m
        ino = await self.new_file("seq")
        f = await m.open(ino, write=True)
        planned = self.args.size // SEQ_CHUNK
        before = flat_stats(m)
        t0 = time.perf_counter()
        ops, capped = await self._seq_fill(f, self.args.size,
                                           t0 + self.args.runtime_cap if timed else None)
        t1 = time.perf_counter()
        await m.fsync(f)
        t2 = time.perf_counter()
        await m.release(f)
        self.seq_ino, self.seq_size = ino, ops * SEQ_CHUNK
        if timed:
            self.record("seq_write", ops=ops, planned=planned, nbytes=ops * SEQ_CHUNK,
                        secs=t2 - t0, fsync_secs=t2 - t1, capped=capped, before=before,
                        note="1 MiB appends into a new file (delalloc, large folios)")

    async def _rand_write(self, name: str, *, prefill: bool) -> None:
        m, args = self.m, self.args
        ino = await self.new_file(name)
        f = await m.open(ino, write=True)
        fsize = self.rand_file_size
        if prefill:
            await self._seq_fill(f, fsize, None)
            await m.fsync(f)
            note = "overwrite of allocated blocks"
        else:
            await m.truncate(ino, fsize)
            note = "into a hole: delalloc reservations"
        nblocks = fsize // RAND_CHUNK
        rng = random.Random(args.seed + 1)
        planned = self.rand_ops
        offsets = [rng.randrange(nblocks) * RAND_CHUNK for _ in range(planned)]
        src = self.pattern.base
        before = flat_stats(m)
        t0 = time.perf_counter()

        async def write(off):
            o = off % SEQ_CHUNK
            await m.write(f, off, src[o:o + RAND_CHUNK])

        ops, capped = await self._until_cap(offsets, write, t0)
        t1 = time.perf_counter()
        await m.fsync(f)
        t2 = time.perf_counter()
        await m.release(f)
        distinct = len(set(offsets[:ops]))
        self.record(name, ops=ops, planned=planned, nbytes=ops * RAND_CHUNK, secs=t2 - t0,
                    fsync_secs=t2 - t1, capped=capped, before=before,
                    note=f"{note}; {distinct} distinct blocks")

    async def rand_write(self) -> None:
        await self._rand_write("rand_write", prefill=True)

    async def rand_write_sparse(self) -> None:
        await self._rand_write("rand_write_sparse", prefill=False)

    # -- reads ----------------------------------------------------------------

    async def _need_seq_file(self) -> None:
        if self.seq_ino is None:
            await self.seq_write(timed=False)

    async def seq_read(self) -> None:
        await self._need_seq_file()
        m = self.m
        await self.drop_caches()
        f = await m.open(self.seq_ino, write=False)
        planned = self.seq_size // SEQ_CHUNK
        before = flat_stats(m)
        errors = 0
        t0 = time.perf_counter()
        deadline = t0 + self.args.runtime_cap
        ops, nbytes, capped = 0, 0, False
        for i in range(planned):
            if time.perf_counter() >= deadline:
                capped = True
                break
            data = await m.read(f, i * SEQ_CHUNK, SEQ_CHUNK)
            nbytes += len(data)
            ops += 1
            if data != self.pattern.chunk(i):
                errors += 1
        secs = time.perf_counter() - t0
        await m.release(f)
        self.record("seq_read", ops=ops, planned=planned, nbytes=nbytes, secs=secs,
                    capped=capped, before=before, errors=errors,
                    note="cold" + ("" if self.args.warm_host else " (host cache dropped too)"))

    async def rand_read(self) -> None:
        await self._need_seq_file()
        m = self.m
        await self.drop_caches()
        f = await m.open(self.seq_ino, write=False)
        nblocks = self.seq_size // RAND_CHUNK
        rng = random.Random(self.args.seed + 2)
        planned = self.rand_ops
        offsets = [rng.randrange(nblocks) * RAND_CHUNK for _ in range(planned)]
        before = flat_stats(m)
        errors = 0
        t0 = time.perf_counter()
        deadline = t0 + self.args.runtime_cap
        ops, nbytes, capped = 0, 0, False
        for off in offsets:
            if time.perf_counter() >= deadline:
                capped = True
                break
            data = await m.read(f, off, RAND_CHUNK)
            nbytes += len(data)
            ops += 1
            if data != self.pattern.expected(off, RAND_CHUNK):
                errors += 1
        secs = time.perf_counter() - t0
        await m.release(f)
        distinct = len(set(offsets[:ops]))
        self.record("rand_read", ops=ops, planned=planned, nbytes=nbytes, secs=secs,
                    capped=capped, before=before, errors=errors,
                    note=f"cold, over the SIZE file; {distinct} distinct blocks")

    # -- small appends ----------------------------------------------------------

    async def appends(self) -> None:
        m = self.m
        ino = await self.new_file("appends")
        f = await m.open(ino, write=True)
        planned = self.rand_ops
        before = flat_stats(m)
        t0 = time.perf_counter()

        async def append(_):
            await m.write(f, 0, APPEND_CHUNK, append=True)

        ops, capped = await self._until_cap(range(planned), append, t0)
        t1 = time.perf_counter()
        await m.fsync(f)
        t2 = time.perf_counter()
        n = len(APPEND_CHUNK)
        errors = int(await m.read(f, 0, ops * n + 1) != APPEND_CHUNK * ops)
        await m.release(f)
        self.record("appends", ops=ops, planned=planned, nbytes=ops * n, secs=t2 - t0,
                    fsync_secs=t2 - t1, capped=capped, before=before, errors=errors, op_bytes=n,
                    note="4-byte O_APPEND writes into a new file")

    # -- small files, each fsynced ----------------------------------------------

    async def smallfiles(self) -> None:
        m = self.m
        files = max(1, self.rand_ops // SMALL_WRITES)
        src = self.pattern.base
        made = []

        def piece(i: int) -> bytes:
            o = i * 64 % (SEQ_CHUNK - RAND_CHUNK)
            return src[o:o + RAND_CHUNK]

        async def one(i):
            f = await m.open(await self.new_file("small"), write=True)
            for k in range(SMALL_WRITES):
                await m.write(f, k * RAND_CHUNK, piece(i + k))
            await m.fsync(f)
            await m.release(f)
            made.append(f.inode.ino)

        before = flat_stats(m)
        t0 = time.perf_counter()
        done, capped = await self._until_cap(range(files), one, t0)
        secs = time.perf_counter() - t0
        errors = 0
        for i, ino in enumerate(made):
            f = await m.open(ino, write=False)
            want = b"".join(piece(i + k) for k in range(SMALL_WRITES))
            errors += await m.read(f, 0, len(want) + 1) != want
            await m.release(f)
        ops = done * SMALL_WRITES
        r = self.record("smallfiles", ops=ops, planned=files * SMALL_WRITES, nbytes=ops * RAND_CHUNK,
                        secs=secs, capped=capped, before=before, errors=errors,
                        note=f"{done} files of {SMALL_WRITES} x 4K, each fsynced")
        flushes = r["counters"].get("dev.flushes", 0)
        r["note"] += f"; {flushes / max(done, 1):.2f} device flushes per file"


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------

async def run(args) -> dict:
    import trio

    from delafs.block import BlockDevice
    from delafs.fs.filesystem import Filesystem
    from delafs.vfs.mount import Mount

    # The files: SIZE + SIZE/4 + SIZE/4, plus journal, metadata and slack
    # so the allocator never nears the low-space (non-delalloc) fallback.
    image_size = 2 * args.size + 128 * MiB
    path = os.path.join(args.dir, f"delafs-engine-bench-{os.getpid()}.img")
    BlockDevice.create_file(path, image_size)
    dev = BlockDevice.open(path)
    result: dict = {}
    fsck_code = None
    try:
        await Filesystem.format(dev)
        fs = await Filesystem.open(dev)
        m = Mount(fs, cache_size=args.cache_size, punch_mode=args.punch)
        bench = Bench(m, args, path)
        t_start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            await m.start(nursery)
            try:
                for name in args.workloads:
                    await getattr(bench, name)()
                    r = bench.results[-1]
                    print(f"  {name:<18} done in {r['seconds']:.2f}s", file=sys.stderr, flush=True)
                await m.unmount()
            finally:
                nursery.cancel_scope.cancel()
        total = time.perf_counter() - t_start
        if args.fsck:
            import io

            from delafs.fs.fsck import check
            dev.close()
            with BlockDevice.open(path, readonly=True) as rdev:
                out = io.StringIO()
                fsck_code = (await check(rdev, repair=False, out=out)).exit_code
        result = {
            "config": {
                "size": args.size, "cache_size": args.cache_size,
                "dirty_limit": m.cache.dirty_limit, "runtime_cap": args.runtime_cap,
                "random_ops": bench.rand_ops, "seed": args.seed, "punch": args.punch,
                "image": path, "image_size": image_size, "host_cache_dropped": not args.warm_host,
                "debug_locks": bool(locks.DEBUG_LOCKS), "python": platform.python_version(),
            },
            "total_seconds": round(total, 2),
            "fsck_exit_code": fsck_code,
            "results": bench.results,
        }
    finally:
        dev.close()
        if not args.keep:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    return result


def fmt_table(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"delafs engine bench: size {cfg['size'] // MiB} MiB, cache {cfg['cache_size'] // MiB} MiB "
        f"(dirty limit {cfg['dirty_limit'] // MiB} MiB), random ops {cfg['random_ops']}, "
        f"punch {cfg['punch']}, debug_locks {'on' if cfg['debug_locks'] else 'off'}, "
        f"cap {cfg['runtime_cap']:g}s, python {cfg['python']}",
        f"image {cfg['image']} ({cfg['image_size'] // MiB} MiB sparse); "
        f"host cache {'dropped' if cfg['host_cache_dropped'] else 'kept'} before reads",
        "",
    ]
    hdr = ("workload", "op", "ops", "MiB", "secs", "fsync s", "MiB/s", "ops/s",
           "short", "stale", "punch", "ioends", "avg ioend")
    rows = []
    for r in result["results"]:
        b = r["op_bytes"]
        op = f"{b}B" if b < 1024 else f"{b // 1024}K" if b < MiB else f"{b // MiB}M"
        avg = r["avg_ioend_bytes"]
        rows.append((
            r["workload"] + (" *" if r["capped"] else ""), op, str(r["ops"]),
            f"{r['bytes'] / MiB:.1f}", f"{r['seconds']:.2f}",
            f"{r['fsync_seconds']:.2f}" if r["fsync_seconds"] else "-",
            f"{r['mib_per_s']:.1f}" if r["mib_per_s"] is not None else "-",
            f"{r['ops_per_s']:.0f}" if r["ops_per_s"] is not None else "-",
            str(r["short_copies"]), str(r["stale_mappings"]), str(r["punches"]), str(r["ioends"]),
            (f"{avg / MiB:.2f}M" if avg >= MiB else f"{avg / 1024:.0f}K") if avg else "-",
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(hdr)]
    left = {0, 1}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    lines.append(line(hdr))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(line(row) for row in rows)
    lines.append("")
    for r in result["results"]:
        c = r["counters"]
        extra = [f"{k.split('.', 1)[1]}={c[k]}" for k in (
            "engine.iomap_iters", "engine.read_folios", "engine.readahead_folios",
            "iomap.writeback_ranges", "iomap.delalloc_reserved", "iomap.delalloc_converted",
            "iomap.delalloc_punched", "cache.throttled", "cache.evictions",
            "dev.reads", "dev.writes", "dev.flushes") if c.get(k)]
        for kind in ("read", "write"):
            n = c.get(f"dev.{kind}s", 0)
            blocks = c.get("dev.blocks_read" if kind == "read" else "dev.blocks_written", 0)
            if n:
                extra.append(f"avg_dev_{kind}={blocks * BLOCK // n // 1024}K")
        verify = f"; VERIFY ERRORS {r['verify_errors']}" if r["verify_errors"] else ""
        lines.append(f"  {r['workload']}: {r['note']}{verify}")
        if extra:
            lines.append("      " + " ".join(extra))
    lines.append("  short = short copies, stale = stale mappings (validity cookie changed), "
                 "punch = delalloc punches")
    if any(r["capped"] for r in result["results"]):
        lines.append("  * stopped by --runtime-cap: fewer ops than planned, rates are for the ops run")
    lines.append(f"total {result['total_seconds']:.1f}s"
                 + ("" if result["fsck_exit_code"] is None else f"; fsck exit {result['fsck_exit_code']}"))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.no_debug_locks:
        # Read at call time, as the daemon sets it (fuse/daemon.py).
        locks.DEBUG_LOCKS = False
    import trio

    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        result = prof.runcall(trio.run, run, args)
        pstats.Stats(prof, stream=sys.stderr).sort_stats(os.environ.get("DELAFS_PROFILE_SORT", "tottime")).print_stats(args.profile)
    else:
        result = trio.run(run, args)
    print(fmt_table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
            fh.write("\n")
    bad = sum(r["verify_errors"] for r in result["results"])
    if bad or result["fsck_exit_code"] not in (None, 0):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
