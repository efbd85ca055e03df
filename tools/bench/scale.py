"""``--scale``: how delafs behaves as things grow (long; ``--scale-small F``
multiplies every size and count by F).

- seqwrite: one file of 1, 4 and 16 GiB written sequentially in 1 MiB
  writes with end_fsync (the seqwrite job file), on ext4, fuse2fs and
  delafs: seconds, MiB/s and the daemon's peak RSS over the mount.
- files: create (then sync), stat (after a remount and drop_caches: every
  lookup reaches the daemon) and unlink of 10k and 100k empty files in one
  directory, on ext4, fuse2fs and delafs: seconds and files/s per phase,
  peak RSS.
- cache: delafs with ``-o cache_size=C`` writing a file of 4 C (C = 64,
  128, 256 MiB; not scaled): peak RSS against C.
- sparse: delafs, one million random 4 KiB writes into a never-laid-out
  file of 16 GiB, then fsync (jobs/sparse.fio): seconds, IOPS, peak RSS.

Each measurement gets a fresh image (sized for it) and a fresh mount;
the image is deleted afterwards.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from . import jobs as J
from .systems import SYSTEMS, BenchError, mounted, run, vm_hwm_kib

HERE = Path(__file__).resolve().parent
MANYFILES = HERE / "manyfiles.py"
SPARSE = J.Job("sparse", "fio", "IOPS", size="seq")


def _size(mib: float) -> str:
    return f"{max(1, int(mib))}M"


class Fresh:
    """A system on a fresh image of ``size``, mounted; destroyed on exit."""

    def __init__(self, runner, name: str, size: str, opts: str | None = None):
        self.s = SYSTEMS[name](runner.workdir, runner.reg, size)
        if opts is not None:
            self.s.OPTS = opts
        self.runner = runner

    def __enter__(self):
        self.runner.systems[self.s.name] = self.s     # the runner's finally unmounts it
        self.s.prepare()
        self.s.mount()
        return self.s

    def __exit__(self, *exc):
        try:
            if mounted(self.s.mnt):
                self.s.umount()
        finally:
            self.s.destroy()
            self.runner.systems.pop(self.s.name, None)
        return False


def _fio(job: J.Job, directory: str, size: str, timeout: float, out: str, extra: dict | None = None) -> dict:
    p = J.Params(seq_size=size, rand_size=size, timeout=timeout)
    run(["mkdir", "-p", directory], timeout=60)
    return J.run_fio(job, p, directory, out, create_only=False, extra_env=extra)


def _phase(phase: str, d: str, n: int, timeout: float) -> float:
    r = run([sys.executable, MANYFILES, phase, d, n], timeout=timeout)
    return json.loads(r.stdout)["seconds"]


def _mib(kib: int | None):
    return round(kib / 1024, 1) if kib else "–"


def run_scale(runner, factor: float, log) -> dict:
    from .run import drop_caches
    wd = runner.workdir
    (wd / "fio").mkdir(exist_ok=True)
    names = [n for n in ("ext4", "fuse2fs", "delafs") if n in runner.args.systems
             and not SYSTEMS[n].missing()]
    out: dict = {"factor": factor, "seqwrite": [], "files": [], "cache": [], "sparse": []}
    if factor != 1:
        out["note"] = f"Every size and count below is the full one times {factor:g} (`--scale-small {factor:g}`)."
    seq = J.JOBS[0]

    def record(key, row):
        out[key].append(row)
        log(f"  {key}: {row}")
        runner.info["scale"] = out
        runner.save()

    # -- sequential write of large files -------------------------------------------------
    for gib in (1, 4, 16):
        mib = gib * 1024 * factor
        for name in names:
            try:
                with Fresh(runner, name, _size(mib * 1.25 + 512)) as s:
                    t0 = time.perf_counter()
                    data = _fio(seq, f"{s.mnt}/scale", _size(mib), 60 + mib / 5,
                                str(wd / "fio" / f"scale-seqwrite-{name}-{_size(mib)}.json"))
                    secs = time.perf_counter() - t0
                    rss = vm_hwm_kib(s.pid)
                record("seqwrite", {"system": name, "GiB": round(mib / 1024, 3), "seconds": round(secs, 1),
                                    "MiB/s": J.fio_value(seq, data), "peak RSS MiB": _mib(rss)})
            except BenchError as e:
                record("seqwrite", {"system": name, "GiB": round(mib / 1024, 3), "error": str(e)[:300]})

    # -- many files in one directory -----------------------------------------------------
    for n in (10_000, 100_000):
        n = max(100, int(n * factor))
        for name in names:
            row: dict = {"system": name, "files": n}
            try:
                with Fresh(runner, name, "2G") as s:
                    d = f"{s.mnt}/many"
                    run(["mkdir", d], timeout=60)
                    t = _phase("create", d, n, 60 + n / 10)
                    t0 = time.perf_counter()
                    s.sync()
                    t += time.perf_counter() - t0
                    rss = vm_hwm_kib(s.pid) or 0
                    s.umount()
                    s.mount()
                    drop_caches(wd)
                    ts = _phase("stat", d, n, 60 + n / 10)
                    tu = _phase("unlink", d, n, 60 + n / 10)
                    t0 = time.perf_counter()
                    s.sync()
                    tu += time.perf_counter() - t0
                    rss = max(rss, vm_hwm_kib(s.pid) or 0)
                row.update({"create+sync s": round(t, 2), "create/s": n / t, "stat s (cold)": round(ts, 2),
                            "stat/s": n / ts, "unlink+sync s": round(tu, 2), "unlink/s": n / tu,
                            "peak RSS MiB": _mib(rss)})
            except BenchError as e:
                row["error"] = str(e)[:300]
            record("files", row)

    # -- delafs: RSS against the cache size ----------------------------------------------
    if "delafs" in names:
        for cache in (64, 128, 256):
            try:
                with Fresh(runner, "delafs", _size(cache * 4 * 1.25 + 512), opts=f"cache_size={cache}M") as s:
                    t0 = time.perf_counter()
                    data = _fio(seq, f"{s.mnt}/scale", _size(cache * 4), 60 + cache,
                                str(wd / "fio" / f"scale-cache-{cache}M.json"))
                    secs = time.perf_counter() - t0
                    rss = vm_hwm_kib(s.pid)
                record("cache", {"cache_size MiB": cache, "file MiB": cache * 4, "seconds": round(secs, 1),
                                 "MiB/s": J.fio_value(seq, data), "peak RSS MiB": _mib(rss)})
            except BenchError as e:
                record("cache", {"cache_size MiB": cache, "error": str(e)[:300]})

    # -- delafs: a sparse file, a million random writes, one fsync -----------------------
    if "delafs" in names:
        writes = max(1000, int(1_000_000 * factor))
        file_mib = 16 * 1024 * factor
        try:
            with Fresh(runner, "delafs", _size(writes * 4 / 1024 * 1.5 + 1024)) as s:
                t0 = time.perf_counter()
                data = _fio(SPARSE, f"{s.mnt}/scale", _size(file_mib), 120 + writes / 50,
                            str(wd / "fio" / "scale-sparse.json"), {"BENCH_NUMBER_IOS": str(writes)})
                secs = time.perf_counter() - t0
                rss = vm_hwm_kib(s.pid)
                st = s.stat()
            record("sparse", {"writes": writes, "file GiB": round(file_mib / 1024, 2),
                              "seconds (writes + fsync)": round(secs, 1), "IOPS": J.fio_value(SPARSE, data),
                              "peak RSS MiB": _mib(rss),
                              "ioends": st.get("iomap", {}).get("ioends", "?")})
        except BenchError as e:
            record("sparse", {"writes": writes, "error": str(e)[:300]})

    out["not_done"] = ("the floor and delafs-wbc (not asked for); stat and unlink are measured on the "
                       "same mount after one remount (unlink is not cold); fuse2fs and ext4 are not "
                       "run for the cache and sparse measurements.")
    return out


def plot_scale(sc: dict, outdir: Path, plt) -> dict:
    made = {}
    colors = {"ext4": "#4c72b0", "fuse2fs": "#55a868", "delafs": "#c44e52"}
    rows = [r for r in sc.get("seqwrite", []) if "error" not in r]
    if rows:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for name in colors:
            rs = [r for r in rows if r["system"] == name]
            if not rs:
                continue
            xs = [r["GiB"] for r in rs]
            a.plot(xs, [r["MiB/s"] for r in rs], "o-", label=name, color=colors[name])
            if isinstance(rs[0]["peak RSS MiB"], (int, float)):
                b.plot(xs, [r["peak RSS MiB"] for r in rs], "o-", label=name, color=colors[name])
        for ax, yl in ((a, "MiB/s"), (b, "peak RSS MiB")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("file size GiB")
            ax.set_ylabel(yl)
            ax.legend(fontsize=8)
        a.set_title("sequential write (end_fsync)")
        b.set_title("daemon peak RSS")
        fig.tight_layout()
        made["seqwrite"] = outdir / "scale-seqwrite.png"
        fig.savefig(made["seqwrite"], dpi=110)
        plt.close(fig)
    rows = [r for r in sc.get("files", []) if "error" not in r]
    if rows:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
        for ax, key in zip(axes, ("create/s", "stat/s", "unlink/s")):
            for name in colors:
                rs = [r for r in rows if r["system"] == name]
                if rs:
                    ax.plot([r["files"] for r in rs], [r[key] for r in rs], "o-", label=name, color=colors[name])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("files in one directory")
            ax.set_title(key)
            ax.legend(fontsize=8)
        fig.tight_layout()
        made["files"] = outdir / "scale-files.png"
        fig.savefig(made["files"], dpi=110)
        plt.close(fig)
    rows = [r for r in sc.get("cache", []) if "error" not in r]
    if rows and isinstance(rows[0]["peak RSS MiB"], (int, float)):
        fig, ax = plt.subplots(figsize=(5, 4))
        xs = [r["cache_size MiB"] for r in rows]
        ax.plot(xs, [r["peak RSS MiB"] for r in rows], "o-", color=colors["delafs"], label="delafs peak RSS")
        ax.plot(xs, xs, "--", color="grey", label="cache_size")
        ax.set_xlabel("-o cache_size (MiB); file = 4× cache")
        ax.set_ylabel("MiB")
        ax.legend(fontsize=8)
        fig.tight_layout()
        made["cache"] = outdir / "scale-cache.png"
        fig.savefig(made["cache"], dpi=110)
        plt.close(fig)
    return made
