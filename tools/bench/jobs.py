"""The jobs: seven fio job files (jobs/*.fio) and two written here (untar,
appends).  Sizes and runtimes come from a :class:`Params`: the default run
or ``--quick``."""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from .systems import BenchError, run

HERE = Path(__file__).resolve().parent
JOBDIR = HERE / "jobs"
APPENDS = HERE / "appends.py"


@dataclass(frozen=True)
class Params:
    seq_size: str = "1G"
    rand_size: str = "256M"
    runtime: str = "10"                      # fio time: seconds, or e.g. "500ms"
    nfiles: int = 2000
    untar_rounds: int = 3
    untar_subtree: tuple[str, ...] = ()      # () = the whole stdlib
    appends_seconds: float = 10.0
    timeout: float = 1800.0                  # per fio run or untar round

    def words(self) -> dict:
        """The parameters as the report's job descriptions say them."""
        def size(t: str) -> str:
            return t[:-1] + {"K": " KiB", "M": " MiB", "G": " GiB"}.get(t[-1], t[-1])
        rt = self.runtime
        return {"seq": size(self.seq_size), "rand": size(self.rand_size),
                "runtime": f"{rt} s" if rt.isdigit() else rt.replace("ms", " ms"),
                "nfiles": f"{self.nfiles:,}", "untar_rounds": self.untar_rounds,
                "appends": f"{self.appends_seconds:g}"}

    @classmethod
    def quick(cls) -> "Params":
        return cls(seq_size="16M", rand_size="16M", runtime="500ms", nfiles=100, untar_rounds=1,
                   untar_subtree=("json", "email"), appends_seconds=0.5, timeout=300.0)


@dataclass(frozen=True)
class Job:
    name: str
    kind: str            # "fio", "untar", "appends"
    unit: str
    cold: bool = False   # remount + drop caches between layout and the timed run
    layout: bool = False # run the job file once with create_only=1 first (untimed)
    direction: str = "write"
    size: str = "rand"   # which Params size the file gets
    what: str = ""

    def env(self, p: Params, directory: str, create_only: bool) -> dict:
        return {"BENCH_DIR": directory,
                "BENCH_SIZE": p.seq_size if self.size == "seq" else p.rand_size,
                "BENCH_RUNTIME": p.runtime, "BENCH_NFILES": str(p.nfiles),
                "BENCH_CREATE_ONLY": "1" if create_only else "0"}


JOBS = [
    Job("seqwrite", "fio", "MiB/s", size="seq", what="{seq} file, 1 MiB writes, end_fsync=1"),
    Job("seqread", "fio", "MiB/s", cold=True, layout=True, direction="read", size="seq",
        what="{seq} file, cold, 1 MiB reads"),
    Job("randwrite", "fio", "IOPS", layout=True,
        what="4 KiB random writes into a {rand} laid-out file for {runtime}, end_fsync=1"),
    Job("randwrite2", "fio", "IOPS", layout=True,
        what="randwrite with numjobs=2, a {rand} file each, group_reporting (IOPS of both)"),
    Job("randread", "fio", "IOPS", cold=True, layout=True, direction="read",
        what="4 KiB random reads of a {rand} file, cold: each block once (one pass), at most {runtime}"),
    Job("smallfiles", "fio", "IOPS",
        what="{nfiles} files × 16 KiB created one after the other, 4 KiB writes, fsync at close "
             "(IOPS/4 = files/s)"),
    Job("mmap", "fio", "IOPS", layout=True,
        what="ioengine=mmap, 4 KiB random writes into a {rand} laid-out file for {runtime}"),
    Job("untar", "untar", "files/s", what="a tar of the host Python's stdlib extracted {untar_rounds}×, then a sync"),
    Job("appends", "appends", "writes/s", what="O_APPEND 4-byte writes for {appends} s, one process "
                                               "(generic/069's pattern)"),
]
JOB_NAMES = [j.name for j in JOBS]


def fio_cmd(job: Job, out: str | None) -> list[str]:
    cmd = ["fio"]
    if out:
        cmd += ["--output-format=json", f"--output={out}"]
    return cmd + [str(JOBDIR / f"{job.name}.fio")]


def run_fio(job: Job, p: Params, directory: str, out: str | None, *, create_only: bool,
            extra_env: dict | None = None) -> dict | None:
    env = dict(os.environ, **job.env(p, directory, create_only), **(extra_env or {}))
    r = run(fio_cmd(job, out), timeout=p.timeout, check=False, env=env)
    if r.returncode != 0:
        raise BenchError(f"fio {job.name} exited {r.returncode}: {(r.stderr or r.stdout).strip()[-1500:]}")
    if out is None:
        return None
    with open(out) as f:
        text = f.read()
    data = json.loads(text[text.index("{"):])
    for j in data["jobs"]:
        if j.get("error"):
            raise BenchError(f"fio {job.name}: job error {j['error']}")
    return data


def fio_value(job: Job, data: dict) -> float:
    side = [j[job.direction] for j in data["jobs"]]
    if job.unit == "MiB/s":
        return sum(s["bw_bytes"] for s in side) / 2**20
    return sum(s["iops"] for s in side)


# -- untar --------------------------------------------------------------------------------

def make_stdlib_tar(workdir: Path, p: Params) -> dict:
    """Tar the host Python's stdlib directory (without site-packages and
    __pycache__) once per run; returns what it holds."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tar = workdir / "stdlib.tar"
    members = [stdlib.name + ("/" + s if s else "") for s in (p.untar_subtree or ("",))]
    run(["tar", "-cf", tar, "-C", stdlib.parent, "--exclude=site-packages", "--exclude=__pycache__",
         *members], timeout=600)
    with tarfile.open(tar) as t:
        names = t.getmembers()
    return {"path": str(tar), "entries": len(names),
            "bytes": sum(m.size for m in names if m.isfile()),
            "source": f"Python {sys.version.split()[0]} stdlib ({stdlib.name}"
                      + (f"/{{{','.join(p.untar_subtree)}}}" if p.untar_subtree else "")
                      + "), without site-packages and __pycache__"}


def run_untar(system, p: Params, directory: str, tarinfo: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    for i in range(p.untar_rounds):
        dest = os.path.join(directory, str(i))
        run(["mkdir", dest], timeout=60)
        run(["tar", "-xf", tarinfo["path"], "-C", dest], timeout=p.timeout)
    t1 = time.perf_counter()
    system.sync()
    t2 = time.perf_counter()
    files = tarinfo["entries"] * p.untar_rounds
    return files / (t2 - t0), {"files": files, "seconds": t2 - t0, "sync_seconds": t2 - t1}


def run_appends(p: Params, directory: str) -> tuple[float, dict]:
    r = run([sys.executable, APPENDS, os.path.join(directory, "appends"), p.appends_seconds],
            timeout=p.appends_seconds + p.timeout, check=False)
    if r.returncode != 0:
        raise BenchError(f"appends exited {r.returncode}: {r.stderr.strip()[-1500:]}")
    d = json.loads(r.stdout)
    return d["writes"] / d["seconds"], d
