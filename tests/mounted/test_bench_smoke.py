"""Smoke test of the benchmark suite (tools/bench): one --quick round on
delafs, ext4, fuse2fs and the Python floor, into a temporary work dir.

It checks that the tool works, not how fast anything is: exit 0, a
positive figure for every job on delafs and on the floor (and on ext4 and
fuse2fs when they ran), a report with a table row per job, and nothing
left behind: no mount and no loop device the run made.  Systems whose
requirements are missing (loop devices, the fuse2fs binary) are skipped by
the runner itself, as in a real run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT, mounts_under

pytestmark = pytest.mark.mount

JOBS = ["seqwrite", "seqread", "randwrite", "randwrite2", "randread", "smallfiles", "mmap",
        "untar", "appends"]


def loop_devices() -> set[str]:
    """One line per loop device: its name and its backing file (the long
    form of `losetup -a`, whose file names may be cut short)."""
    r = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                       capture_output=True, text=True)
    return {line.strip() for line in r.stdout.splitlines() if line.strip()}


def all_mounts() -> set[str]:
    with open("/proc/mounts") as f:
        return {" ".join(line.split()[:2]) for line in f}


@pytest.mark.timeout(60)
def test_cold_random_read_job_reads_each_block_once(tmp_path):
    """The randread job makes one pass over its file however fast the
    system is: a second pass would read blocks the page cache already
    holds.  On a host directory whose cache is hot, a pass of 16 MiB
    takes a fraction of the 5 s cap; a time_based job would go round
    the file until the cap."""
    env = dict(os.environ, BENCH_DIR=str(tmp_path), BENCH_SIZE="16M", BENCH_RUNTIME="5",
               BENCH_NFILES="1")
    job = str(ROOT / "tools" / "bench" / "jobs" / "randread.fio")
    subprocess.run(["fio", job], env=dict(env, BENCH_CREATE_ONLY="1"), check=True,
                   capture_output=True, timeout=50)
    r = subprocess.run(["fio", "--output-format=json", job], env=dict(env, BENCH_CREATE_ONLY="0"),
                       check=True, capture_output=True, text=True, timeout=50)
    read = json.loads(r.stdout)["jobs"][0]["read"]
    assert read["total_ios"] == 16 * 1024 // 4, read["total_ios"]
    assert read["iops"] > 0


@pytest.mark.timeout(300)
def test_bench_quick(tmp_path):
    workdir = tmp_path / "work"
    out = tmp_path / "report" / "performance.md"
    mounts_before, loops_before = all_mounts(), loop_devices()
    r = subprocess.run([sys.executable, "-m", "tools.bench", "--quick",
                        "--systems", "delafs,ext4,fuse2fs,floor",
                        "--workdir", str(workdir), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=280)
    log = f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"

    # Nothing left behind, whatever the outcome.  (Only what names the
    # work dir counts: other tests may mount things meanwhile.)
    assert not mounts_under(str(workdir)), f"mounts left: {mounts_under(str(workdir))}\n{log}"
    ours = str(workdir.resolve())
    assert not {m for m in all_mounts() - mounts_before if ours in m}, log
    assert not {d for d in loop_devices() - loops_before if ours in d}, f"loop devices left\n{log}"

    assert r.returncode == 0, log
    results = json.loads((workdir / "results.json").read_text())
    assert not [x for x in results["records"] if x["error"]], log
    ran = set(results["systems"])
    assert {"delafs", "floor"} <= ran, f"delafs and the floor must run: {results['skipped']}"
    for name in ("ext4", "fuse2fs"):
        assert name in ran or name in results["skipped"]
    summary = results["summary"]
    for job in JOBS:
        for system in ran:
            d = summary.get(job, {}).get(system)
            assert d and d["median"] > 0, f"no positive figure for {job} on {system}\n{log}"
        for system in ran - {"ext4"}:
            assert summary[job][system]["peak_rss_kib"] > 0, f"no RSS for {job} on {system}"
    # Every mount got the runner's readahead window, ext4's loop device too,
    # and the cold jobs on delafs say what size its READ requests were.
    assert results["read_ahead_kb"] == 1024
    assert {x["read_ahead_kb"] for x in results["records"]} == {1024}, log
    for rec in results["records"]:
        if rec["system"] == "delafs" and rec["job"] in ("seqread", "randread"):
            assert sum(n for _, n in rec["request_sizes"]["read"]) > 0, rec
    # Every fio run left its JSON.  The cold random read is one pass: no
    # block read twice, so none served by the page cache a first read
    # filled (a time_based run let fast systems lap the file).
    for rec in results["records"]:
        if "fio_json" in rec:
            fio = json.loads((workdir / rec["fio_json"]).read_text())
            assert fio["jobs"]
            if rec["job"] == "randread":
                ios = fio["jobs"][0]["read"]["total_ios"]
                assert 0 < ios <= 16 * 1024 // 4, f"{rec['system']}: {ios} reads of a 16 MiB file"

    text = out.read_text()
    assert "Generated by" in text and "<!-- keep:notes -->" in text
    assert "Readahead window: 1024 KiB on every mount" in text
    assert "READ requests delafs received in the cold jobs" in text
    for job in JOBS:
        assert f"### {job} (" in text, f"no section for {job}"
    for system in ran:
        rows = [line for line in text.splitlines() if line.startswith(f"| {system} |")]
        assert len(rows) == len(JOBS), f"{system}: {len(rows)} table rows, want {len(JOBS)}"
    # The images are gone (only results, logs and fio JSON stay).
    assert not list(workdir.glob("*.img"))
    if (out.parent / "perf").exists():
        assert all(os.path.getsize(p) > 0 for p in (out.parent / "perf").glob("*.png"))
