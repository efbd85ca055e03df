"""Smoke test of tools/engine_bench.py: a tiny run, its table and its JSON."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "engine_bench.py")
WORKLOADS = ["seq_write", "rand_write", "rand_write_sparse", "seq_read", "rand_read", "appends",
             "smallfiles"]


def test_engine_bench_tiny_run(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, TOOL, "--dir", str(tmp_path), "--size", "4M", "--cache-size", "64M",
         "--random-ops", "64", "--runtime-cap", "5", "--json", str(out_json), "--fsck"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The table: a header, a rule, one row per workload, a total line.
    lines = proc.stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("workload"))
    assert "MiB/s" in lines[header] and "ops/s" in lines[header] and "avg ioend" in lines[header]
    assert set(lines[header + 1].replace(" ", "")) == {"-"}
    rows = [l.split() for l in lines[header + 2:header + 2 + len(WORKLOADS)]]
    assert [r[0] for r in rows] == WORKLOADS
    for r in rows:
        float(r[6])                     # MiB/s
        float(r[7])                     # ops/s
    assert lines[-1].startswith("total ") and "fsck exit 0" in lines[-1]
    # The JSON: same workloads, sane numbers, reads verified.
    data = json.loads(out_json.read_text())
    assert data["config"]["size"] == 4 << 20
    assert data["fsck_exit_code"] == 0
    res = {r["workload"]: r for r in data["results"]}
    assert list(res) == WORKLOADS
    for r in res.values():
        assert r["ops"] > 0 and r["seconds"] > 0 and r["mib_per_s"] > 0 and r["ops_per_s"] > 0
        assert r["verify_errors"] == 0
        for key in ("short_copies", "stale_mappings", "punches", "ioends", "avg_ioend_bytes", "counters"):
            assert key in r
    assert res["seq_write"]["bytes"] == 4 << 20
    assert res["rand_write"]["ops"] == 64
    assert res["seq_write"]["ioends"] >= 1 and res["seq_write"]["avg_ioend_bytes"] > 0
    assert res["rand_write_sparse"]["counters"]["iomap.delalloc_reserved"] > 0
    assert res["appends"]["ops"] == 64 and res["appends"]["bytes"] == 256
    # 16 files of four writes, each file's fsync flushing its data and then
    # the commit that exposes it: two ordered flushes a file, at least.
    assert res["smallfiles"]["ops"] == 64 and res["smallfiles"]["bytes"] == 64 * 4096
    assert res["smallfiles"]["counters"]["dev.flushes"] >= 2 * 16
    assert "device flushes per file" in res["smallfiles"]["note"]
    # The image is cleaned up.
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".img")]


def test_no_debug_locks_turns_the_assertions_off(tmp_path):
    # DEBUG_LOCKS is read when delafs is first imported, so the flag must be
    # applied before the tool imports any of delafs.
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, TOOL, "--dir", str(tmp_path), "--size", "4M", "--cache-size", "64M",
         "--random-ops", "8", "--workloads", "rand_write", "--no-debug-locks",
         "--json", str(out_json)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "DELAFS_DEBUG_LOCKS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(out_json.read_text())["config"]["debug_locks"] is False
    assert "debug_locks off" in proc.stdout
