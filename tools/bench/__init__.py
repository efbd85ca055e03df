"""delafs's side-by-side benchmark suite: ext4 (loop device), fuse2fs,
delafs, delafs with -o writeback_cache, and the Python floor (floor.py, a
minimal pyfuse3 passthrough), running the same fio jobs (jobs/*.fio) and
two Python jobs (untar, appends) interleaved in rounds.

    .venv/bin/python -m tools.bench            # as root: 3 rounds, regenerates docs/performance.md
    .venv/bin/python -m tools.bench --quick    # a minute: tiny sizes, report in the work dir
    .venv/bin/python -m tools.bench --help

Modules: run.py (the runner, also runnable as ``python tools/bench/run.py``),
systems.py (mount/unmount of each system, cleanup), jobs.py (job
definitions), report.py (markdown + matplotlib plots), scale.py (--scale),
floor.py and appends.py (run as processes of their own).
"""
