"""Smoke runs of the measuring tools in tools/ (their figures are not asserted: benchmarks are not tests)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).parents[2] / "tools"


def test_the_trip_benchmark_runs_and_refuses_bad_counts():
    tool = [sys.executable, str(TOOLS / "iothread_bench.py")]
    r = subprocess.run(tool + ["--calls", "20", "--rounds", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split(" median")[0].strip() for line in lines] == [
        "trio.to_thread.run_sync", "start_thread_soon + run_sync_soon", "iothread.in_worker_thread"]
    assert all(float(line.split("median")[1].split("us")[0]) > 0 for line in lines)
    r = subprocess.run(tool + ["--calls", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "at least 1" in r.stderr


def test_request_latency_measures_every_call_and_leaves_nothing_behind(tmp_path):
    tool = [sys.executable, str(TOOLS / "request_latency.py")]
    r = subprocess.run(tool + [str(tmp_path), "--calls", "20"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    names = [line.rsplit(None, 2)[0] for line in r.stdout.splitlines()]
    assert names == ["getxattr(security.capability)", "fstat", "pwrite 4 KiB, same offset",
                     "pwrite 4 KiB, random offset", "pread 4 KiB, cached", "stat"]
    assert list(tmp_path.iterdir()) == []
    r = subprocess.run(tool + [str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a directory" in r.stderr
    # a reader that is gone before the first line (`| true`): a quiet end, the file still removed
    for unbuffered in ("", "1"):
        r = subprocess.run(["bash", "-c", f"'{sys.executable}' '{tool[1]}' '{tmp_path}' --calls 20 | true"],
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, PYTHONUNBUFFERED=unbuffered))
        assert "Traceback" not in r.stderr and "Broken pipe" not in r.stderr, (unbuffered, r.stderr)
        assert list(tmp_path.iterdir()) == []

@pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed")
@pytest.mark.timeout(60)
def test_cold_random_read_job_reads_each_block_once(tmp_path):
    """The randread job makes one pass over its file however fast the
    system is: a second pass would read blocks the page cache already
    holds.  On a host directory whose cache is hot, a pass of 16 MiB
    takes a fraction of the 5 s cap; a time_based job would go round
    the file until the cap."""
    env = dict(os.environ, BENCH_DIR=str(tmp_path), BENCH_SIZE="16M", BENCH_RUNTIME="5",
               BENCH_NFILES="1")
    job = str(TOOLS / "bench" / "jobs" / "randread.fio")
    subprocess.run(["fio", job], env=dict(env, BENCH_CREATE_ONLY="1"), check=True,
                   capture_output=True, timeout=50)
    r = subprocess.run(["fio", "--output-format=json", job], env=dict(env, BENCH_CREATE_ONLY="0"),
                       check=True, capture_output=True, text=True, timeout=50)
    read = json.loads(r.stdout)["jobs"][0]["read"]
    assert read["total_ios"] == 16 * 1024 // 4, read["total_ios"]
    assert read["iops"] > 0
