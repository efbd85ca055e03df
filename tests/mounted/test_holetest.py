"""tools/holetest.py on real mounts: the CI gate for what xfstests
generic/344-346 exercise (mmap and write racing to fill holes), but checked
where xfstests cannot look: after umount, fsck and remount, from the image.

On a FUSE mount the kernel handles the page faults itself; the dirty pages
reach delafs as WRITE requests from kernel writeback, and every one of them
is a buffered write through the engine.  With short_copy and stale_mapping
injected those writes end their iterations early and punch the unused tail
of NEW delalloc mappings, with the dirty-folio scan; the markers must all
survive.  With punch=legacy the kernel's page cache still holds the data
and resends it, so the markers may well survive there too: the test reports
what it sees and requires only a completed run and a clean fsck.
"""

from __future__ import annotations

import pytest

from .conftest import PYTHON, ROOT, run

HOLETEST = ROOT / "tools" / "holetest.py"
SIZINGS = ("ftruncate", "fallocate", "zerofill")
WORKERS = ((), ("-F",))                       # threads, processes
WRITERS = ((), ("-w",), ("-r",), ("-w", "-r"))  # mmap+mmap, mmap+pwrite, prefaulted
INJECT = "short_copy=3,stale_mapping=3"


def holetest(path: str, *flags: str, size: str = "16M", sizing: str = "ftruncate"):
    return run([PYTHON, HOLETEST, *flags, "--size", size, "--sizing", sizing, path], check=False, timeout=900)


def verify_only(path: str):
    return run([PYTHON, HOLETEST, "--verify-only", path], check=False, timeout=900)


def must_pass(r, what: str) -> str:
    assert r.returncode == 0, f"holetest {what} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert "PASS" in r.stdout
    return r.stdout


def run_matrix(m, runs) -> list[str]:
    """Run holetest for each (name, flags, size, sizing); all must pass.
    Returns the files written."""
    files = []
    for name, flags, size, sizing in runs:
        path = m.path(name)
        out = must_pass(holetest(path, *flags, size=size, sizing=sizing), name)
        if sizing == "fallocate":
            # pyfuse3 has no fallocate handler: FUSE answers EOPNOTSUPP.
            assert "fallocate unsupported, using zero-fill" in out
        files.append(path)
    return files


def verify_after_remount(m, files) -> None:
    m.cycle()                                # umount, fsck -n clean, mount
    for path in files:
        must_pass(verify_only(path), f"--verify-only {path}")


def matrix(m, sizing: str, sizes) -> None:
    """Threads and processes; mmap+mmap, mmap+pwrite, with and without
    prefaulting reads; then fsck and every file again from the image."""
    runs = [(f"{size}{''.join(w + x) or '-plain'}", w + x, size, sizing)
            for size in sizes for w in WORKERS for x in WRITERS]
    files = run_matrix(m, runs)
    verify_after_remount(m, files)


# fallocate's 16M runs are slow (glibc's one-byte-per-block emulation) and
# otherwise a zero-filled file: the default run keeps its 1M ones.
@pytest.mark.parametrize("sizing, sizes", [("ftruncate", ("1M", "16M")), ("zerofill", ("1M", "16M")),
                                           ("fallocate", ("1M",))],
                         ids=["ftruncate", "zerofill", "fallocate-1M"])
def test_holetest_matrix(delafs_mount, sizing, sizes):
    matrix(delafs_mount(), sizing, sizes)


@pytest.mark.slow
def test_holetest_matrix_fallocate_16m(delafs_mount):
    matrix(delafs_mount(), "fallocate", ("16M",))


@pytest.mark.parametrize("how", ["mount-option", "delafs-inject"])
def test_holetest_with_injected_short_copies_and_stale_mappings(delafs_mount, how):
    if how == "mount-option":
        m = delafs_mount(opts=INJECT)
    else:
        m = delafs_mount()
        tags = m.inject(short_copy=3, stale_mapping=3)
        assert tags["short_copy"]["value"] == 3 and tags["stale_mapping"]["value"] == 3
    if how == "mount-option":
        runs = [(f"{sizing}{''.join(f)}", f, "16M", sizing)
                for sizing in SIZINGS for f in (("-F",), ("-F", "-w", "-r"))]
        runs += [("threads-w", ("-w",), "16M", "ftruncate"), ("small", ("-F", "-r"), "1M", "ftruncate")]
    else:   # the same machinery, switched on at run time: a shorter list
        runs = [("F", ("-F",), "16M", "ftruncate"), ("threads-w", ("-w",), "16M", "ftruncate"),
                ("zf-F-w-r", ("-F", "-w", "-r"), "16M", "zerofill")]
    files = run_matrix(m, runs)
    st = m.stat()
    eng = st["engine"]
    # The kernel's writeback WRITEs went through the engine's buffered write
    # and met the injected failures: iterations ended short and NEW delalloc
    # tails were punched, on writes that all succeeded.
    assert eng["short_copies"] > 0 and eng["stale_mappings"] > 0, eng
    assert eng["punches"] > 0, eng
    assert eng["short_writes"] == 0, eng
    assert st["errortags"]["short_copy"]["hits"] > 0 and st["errortags"]["stale_mapping"]["hits"] > 0
    verify_after_remount(m, files)


def test_holetest_punch_legacy(delafs_mount, capsys):
    """punch=legacy truncates the cache over the punched range and punches
    all of it.  On the mount the data lives on in the kernel's page cache
    and comes back as WRITEs, so markers may survive; report, don't judge."""
    m = delafs_mount(opts="punch=legacy," + INJECT)
    observed = {}
    files = []
    for name, flags, sizing in (("plain", (), "ftruncate"), ("F-w", ("-F", "-w"), "ftruncate"),
                                ("F-r", ("-F", "-r"), "ftruncate"), ("zf-F", ("-F",), "zerofill")):
        r = holetest(m.path(name), *flags, size="16M", sizing=sizing)
        assert r.returncode in (0, 1), f"holetest did not complete:\n{r.stdout}\n{r.stderr}"
        observed[name] = ["in mapping: " + ("all markers" if r.returncode == 0 else "MARKERS LOST")]
        files.append((name, m.path(name)))
    eng = m.stat()["engine"]
    assert eng["punches"] > 0, eng
    m.cycle()                                # fsck must be clean whatever happened
    for name, path in files:
        r = verify_only(path)
        assert r.returncode in (0, 1), r.stdout + r.stderr
        observed[name].append("after remount: " + ("all markers" if r.returncode == 0 else "MARKERS LOST"))
    with capsys.disabled():
        print(f"\npunch=legacy with {INJECT} ({eng['punches']} punches): "
              + "; ".join(f"{k}: {', '.join(v)}" for k, v in observed.items()))


@pytest.mark.slow
@pytest.mark.parametrize("opts", ["", INJECT])
def test_holetest_256m(delafs_mount, opts):
    m = delafs_mount(size="2G", opts=opts)
    runs = [("256M-F", ("-F",), "256M", "ftruncate"), ("256M-F-w-r", ("-F", "-w", "-r"), "256M", "ftruncate"),
            ("256M-zf", ("-F",), "256M", "zerofill"), ("256M-threads", (), "256M", "fallocate")]
    files = run_matrix(m, runs)
    if opts:
        assert m.stat()["engine"]["punches"] > 0
    verify_after_remount(m, files)
