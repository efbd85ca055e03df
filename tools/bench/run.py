#!/usr/bin/env python3
"""The side-by-side benchmark runner (see tools/bench/__init__.py).

    .venv/bin/python -m tools.bench                    # regenerates docs/performance.md
    .venv/bin/python -m tools.bench --quick            # report into the work dir
    .venv/bin/python -m tools.bench --systems delafs,floor --jobs randwrite,appends
    .venv/bin/python -m tools.bench --report-only WORKDIR   # rewrite the report from results.json
    .venv/bin/python -m tools.bench --scale [--scale-small 0.1]
    .venv/bin/python -m tools.bench --read-ahead-kb 0  # leave the kernel's readahead window (128 KiB)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):          # python tools/bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "tools.bench"

from tools.bench import jobs as J
from tools.bench import report
from tools.bench.systems import (
    ORDER,
    ROOT,
    SYSTEMS,
    BenchError,
    Registry,
    mounted,
    reset_hwm,
    run,
    vm_hwm_kib,
)


class Interrupted(BaseException):
    pass


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the machine ----------------------------------------------------------------------------

def _first(path: str, key: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def machine(workdir: Path) -> dict:
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"
    src, fstype, fsopts = (out(["findmnt", "-n", "-T", str(workdir), "-o", "SOURCE,FSTYPE,OPTIONS"]).split()
                           + ["?", "?", "?"])[:3]
    disk = os.path.basename(src)
    rota = out(["lsblk", "-dn", "-o", "ROTA", src]) if src.startswith("/dev/") else "?"
    try:
        import pyfuse3
        pyfuse3_version = pyfuse3.__version__
    except Exception:
        pyfuse3_version = "?"
    try:
        import trio
        trio_version = trio.__version__
    except Exception:
        trio_version = "?"
    commit = out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "-C", str(ROOT), "status", "--porcelain", "--", "delafs"])
    mem = _first("/proc/meminfo", "MemTotal")
    return {
        "cpu": _first("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "ram": f"{int(mem.split()[0]) / 2**20:.1f} GiB" if mem != "?" else "?",
        "kernel": platform.release(),
        "os": out(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "workdir_fs": f"{fstype} on {disk} ({'rotational' if rota == '1' else 'non-rotational' if rota == '0' else '?'}), {fsopts}",
        "fio": out(["fio", "--version"]),
        "python": platform.python_version(),
        "pyfuse3": pyfuse3_version,
        "trio": trio_version,
        "fuse2fs": (out(["dpkg-query", "-W", "-f", "${Version}", "fuse2fs"]) or "?"),
        "delafs_commit": commit + (" (with local changes under delafs/)" if dirty else ""),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
    }


# -- one measurement -------------------------------------------------------------------------

def drop_caches(workdir: Path) -> None:
    # syncfs of the work dir's filesystem (the images and floor-data live
    # there), never a global sync: that would reach every FUSE mount of
    # the machine, someone else's hung one included.
    run(["sync", "-f", str(workdir)], timeout=600)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


class Runner:
    def __init__(self, args, workdir: Path, params: J.Params):
        self.args = args
        self.workdir = workdir
        self.p = params
        self.reg = Registry()
        self.systems = {}
        self.skipped = {}
        self.records: list[dict] = []
        self.tarinfo: dict | None = None
        self.info: dict = {}
        # None leaves every mount's readahead window at the kernel's default.
        self.read_ahead = args.read_ahead_kb or None

    def setup(self) -> None:
        for name in self.args.systems:
            cls = SYSTEMS[name]
            why = cls.missing()
            if why:
                log(f"skipping {name}: {why}")
                self.skipped[name] = why
                continue
            s = cls(self.workdir, self.reg, self.args.size)
            s.prepare()
            self.systems[name] = s
        if "untar" in self.args.jobs:
            self.tarinfo = J.make_stdlib_tar(self.workdir, self.p)
            log(f"untar source: {self.tarinfo['entries']} entries, {self.tarinfo['bytes'] >> 20} MiB")

    def one(self, job: J.Job, s, rnd: int) -> dict:
        rec = {"job": job.name, "system": s.name, "round": rnd, "unit": job.unit, "value": None,
               "rss_kib": None, "error": None}
        directory = os.path.join(s.mnt, f"{job.name}-r{rnd}")
        out = str(self.workdir / "fio" / f"{job.name}-{s.name}-r{rnd}.json")
        per_job = self.args.mount_per == "job"
        t0 = time.perf_counter()
        try:
            if per_job or not mounted(s.mnt):
                s.mount()
                s.read_ahead(self.read_ahead)
            run(["mkdir", directory], timeout=60)
            if job.layout:
                J.run_fio(job, self.p, directory, None, create_only=True)
            if job.cold:
                s.umount()
                s.mount(ask_pid=False)
                s.read_ahead(self.read_ahead)
                drop_caches(self.workdir)
                rec["cold"] = s.cold_check()
            reset_hwm(s.pid)
            t1 = time.perf_counter()
            if job.kind == "fio":
                data = J.run_fio(job, self.p, directory, out, create_only=False)
                rec["value"] = J.fio_value(job, data)
                rec["fio_json"] = os.path.relpath(out, self.workdir)
            elif job.kind == "untar":
                rec["value"], rec["detail"] = J.run_untar(s, self.p, directory, self.tarinfo)
            elif job.kind == "appends":
                rec["value"], rec["detail"] = J.run_appends(self.p, directory)
            rec["seconds"] = time.perf_counter() - t1
            rec["rss_kib"] = vm_hwm_kib(s.pid)
            rec["read_ahead_kb"] = s.read_ahead_kb
            if job.cold:
                rec["request_sizes"] = s.request_sizes()
            run(["rm", "-rf", directory], timeout=self.p.timeout)
        except BenchError as e:
            rec["error"] = str(e)
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        finally:
            if per_job or rec["error"]:
                try:
                    s.umount()
                except BenchError as e:
                    rec["error"] = (rec["error"] + "; " if rec["error"] else "") + f"umount: {e}"
                    self.reg.force_unmount(s.mnt, log)      # lazily, as a last resort
        rec["total_seconds"] = time.perf_counter() - t0
        return rec

    def rounds(self) -> None:
        names = [n for n in ORDER if n in self.systems]
        jobs = [j for j in J.JOBS if j.name in self.args.jobs]
        for rnd in range(self.args.rounds):
            k = rnd % len(names) if names else 0
            order = names[k:] + names[:k]
            log(f"round {rnd + 1}/{self.args.rounds}: {', '.join(order)}")
            for job in jobs:
                for name in order:
                    rec = self.one(job, self.systems[name], rnd)
                    if job is jobs[-1] and self.args.mount_per == "round":
                        try:
                            self.systems[name].umount()
                        except BenchError as e:
                            rec["error"] = (rec["error"] + "; " if rec["error"] else "") + f"umount: {e}"
                            self.reg.force_unmount(self.systems[name].mnt, log)
                    self.records.append(rec)
                    if rec["error"]:
                        log(f"  {job.name:11} {name:11} FAILED: {rec['error']}")
                    else:
                        rss = f"{rec['rss_kib'] / 1024:.0f} MiB" if rec["rss_kib"] else "-"
                        log(f"  {job.name:11} {name:11} {rec['value']:12.1f} {job.unit:9} rss {rss}")
                    self.save()

    def save(self) -> dict:
        results = {
            "mode": "scale" if self.args.scale else "quick" if self.args.quick else "default",
            "command": self.info.get("command"),
            "machine": self.info.get("machine"),
            "params": self.p.__dict__ | {"untar_subtree": list(self.p.untar_subtree)},
            "image_size": self.args.size,
            "mount_per": self.args.mount_per,
            "read_ahead_kb": self.args.read_ahead_kb,
            "systems": {n: s.commands for n, s in self.systems.items()},
            "skipped": self.skipped,
            "jobs": {} if self.args.scale else {j.name: {"unit": j.unit, "what": j.what.format(**self.p.words()),
                              "command": " ".join(J.fio_cmd(j, "FILE.json")).replace(str(ROOT) + "/", "")
                              if j.kind == "fio" else f"python: tools/bench/jobs.py ({j.kind})"}
                     for j in J.JOBS if j.name in self.args.jobs},
            "untar": {k: v for k, v in (self.tarinfo or {}).items() if k != "path"},
            "records": self.records,
            "summary": summarize(self.records),
        }
        if self.info.get("scale"):
            results["scale"] = self.info["scale"]
        with open(self.workdir / "results.json", "w") as f:
            json.dump(results, f, indent=1)
        return results


def summarize(records: list[dict]) -> dict:
    out: dict = {}
    for r in records:
        if r["value"] is None:
            continue
        d = out.setdefault(r["job"], {}).setdefault(r["system"], {"values": [], "rss_kib": []})
        d["values"].append(r["value"])
        if r["rss_kib"]:
            d["rss_kib"].append(r["rss_kib"])
    for systems in out.values():
        for d in systems.values():
            v = d["values"]
            d.update(median=statistics.median(v), min=min(v), max=max(v), n=len(v),
                     peak_rss_kib=max(d["rss_kib"]) if d["rss_kib"] else None)
        for d in systems.values():
            for ref in ("ext4", "fuse2fs", "floor"):
                m = systems.get(ref, {}).get("median")
                d[f"x_{ref}"] = d["median"] / m if m else None
    return out


# -- main ------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and 1 s runtimes, one round; the report goes to the work dir")
    p.add_argument("--rounds", type=int, help="rounds (default 3; --quick 1)")
    p.add_argument("--systems", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument("--jobs", default=",".join(J.JOB_NAMES), help=f"comma-separated subset of {','.join(J.JOB_NAMES)}")
    p.add_argument("--workdir", help="where images, fio JSON, logs and results.json go "
                                     "(default: a new directory under /var/tmp)")
    p.add_argument("--out", help="the report (default docs/performance.md; --quick: WORKDIR/performance.md); "
                                 "plots go to perf/ beside it")
    p.add_argument("--mount-per", choices=("job", "round"),
                   help="a fresh mount for every job (default), or one per system and round, "
                        "remounted only for the cold jobs (--quick's default: faster)")
    p.add_argument("--size", help="image size of every system (default 4G; --quick 512M)")
    p.add_argument("--read-ahead-kb", type=int, default=1024, metavar="KB",
                   help="the readahead window set on every mount, FUSE and ext4's loop device alike "
                        "(/sys/class/bdi/MAJ:MIN/read_ahead_kb; default 1024; 0: the kernel's default)")
    p.add_argument("--keep-images", action="store_true", help="keep the images (default: deleted at the end)")
    p.add_argument("--report-only", metavar="WORKDIR", help="only rewrite the report from WORKDIR/results.json")
    p.add_argument("--scale", action="store_true", help="the scale and memory runs instead (long; see scale.py)")
    p.add_argument("--scale-small", type=float, default=1.0, metavar="F",
                   help="shrink every --scale size and count by F (e.g. 0.1)")
    args = p.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    args.jobs = [j for j in args.jobs.split(",") if j]
    for s in args.systems:
        if s not in SYSTEMS:
            p.error(f"unknown system {s!r} (known: {', '.join(ORDER)})")
    for j in args.jobs:
        if j not in J.JOB_NAMES:
            p.error(f"unknown job {j!r} (known: {', '.join(J.JOB_NAMES)})")
    if args.read_ahead_kb < 0:
        p.error("--read-ahead-kb must be 0 (the kernel's default) or a positive number of KiB")
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.mount_per = args.mount_per or ("round" if args.quick else "job")
    args.size = args.size or ("512M" if args.quick else "4G")
    return args


def command_line(argv) -> str:
    return report.public_command(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.report_only:
        wd = Path(args.report_only)
        with open(wd / "results.json") as f:
            results = json.load(f)
        out = Path(args.out) if args.out else (wd / "performance.md" if results["mode"] == "quick"
                                               else ROOT / "docs" / "performance.md")
        report.write(results, out)
        log(f"report: {out}")
        return 0
    if os.geteuid() != 0:
        print("tools.bench: needs root (mount, losetup, drop_caches)", file=sys.stderr)
        return 2
    if shutil.which("fio") is None:
        print("tools.bench: needs fio", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="delafs-bench-", dir="/var/tmp")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "fio").mkdir(exist_ok=True)
    out = Path(args.out) if args.out else (workdir / "performance.md" if args.quick
                                           else ROOT / "docs" / "performance.md")
    log(f"work dir {workdir}; report {out}")
    params = J.Params.quick() if args.quick else J.Params()
    r = Runner(args, workdir, params)
    r.info = {"command": command_line(argv), "machine": machine(workdir)}
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    status = 0
    try:
        if args.scale:
            from tools.bench import scale
            r.info["scale"] = scale.run_scale(r, args.scale_small, log)
        else:
            r.setup()
            if not r.systems:
                log("no system can run here")
                return 2
            r.rounds()
        r.info["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        results = r.save()
        report.write(results, out)
        log(f"report: {out}; results: {workdir / 'results.json'}")
        failed = [x for x in r.records if x["error"]]
        if failed:
            log(f"{len(failed)} run(s) failed")
            status = 1
    except (KeyboardInterrupt, Interrupted) as e:
        log(f"interrupted ({e or 'Ctrl-C'}): cleaning up")
        status = 130
    except BenchError as e:
        log(f"error: {e}")
        status = 1
    finally:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        for s in r.systems.values():
            try:
                s.umount()
            except BenchError as e:
                log(f"cleanup: {s.name}: {e}")
        r.reg.undo(log)
        if not args.keep_images:
            for s in r.systems.values():
                if os.path.exists(s.image):
                    os.unlink(s.image)
            shutil.rmtree(workdir / "floor-data", ignore_errors=True)
            if (workdir / "stdlib.tar").exists():
                os.unlink(workdir / "stdlib.tar")
        for s, h in old.items():
            signal.signal(s, h)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return status


if __name__ == "__main__":
    sys.exit(main())
