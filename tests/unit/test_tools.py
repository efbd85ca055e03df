"""Smoke runs of the measuring tools in tools/ (their figures are not asserted: benchmarks are not tests)."""

import subprocess
import sys
from pathlib import Path

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
