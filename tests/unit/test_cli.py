"""The ``delafs`` command line: mkfs and fsck, run as real processes.

Exit statuses checked here: mkfs 0 success / 1 refused or failed / 2 usage;
fsck 0 clean / 1 repaired / 4 uncorrected / 8 operational.  Every failure
must be one readable line, never a Python traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from delafs.block import BLOCK_SIZE, BlockDevice
from delafs.ondisk import MIN_BLOCKS, SB_MAGIC, Superblock

_SCRIPT = Path(sys.executable).parent / "delafs"
DELAFS = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "delafs.cli"]


def run(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(DELAFS + [str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"


def no_traceback(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr


def sb_of(path) -> Superblock:
    with BlockDevice.open(str(path), readonly=True) as dev:
        return Superblock.decode(dev.read_sync(0, 1), 0, dev.nblocks)


def du_kib(path) -> float:
    return os.stat(path).st_blocks * 512 / 1024


@pytest.fixture
def image(tmp_path):
    """A freshly made 64 MiB image."""
    path = tmp_path / "img"
    ok(run("mkfs", path, "--size", "64M", "-q"))
    return path


def ext4_image(path) -> None:
    mkfs = shutil.which("mkfs.ext4")
    if mkfs is None:
        pytest.skip("mkfs.ext4 not installed")
    subprocess.run([mkfs, "-q", "-F", str(path), "8M"], check=True, capture_output=True)


# ---------------------------------------------------------------------------
# mkfs
# ---------------------------------------------------------------------------

def test_mkfs_1g_is_sparse_and_checks_clean(tmp_path):
    img = tmp_path / "img"
    r = run("mkfs", img, "--size", "1G")
    ok(r)
    assert "formatted" in r.stdout and "262144 blocks" in r.stdout, r.stdout
    assert os.path.getsize(img) == 1 << 30
    r = run("fsck", img)
    ok(r)
    assert "clean" in r.stdout
    used = du_kib(img)
    print(f"\nmkfs 1G: image uses {used:.0f} KiB on the host")
    assert used < 2048, f"1 GiB image uses {used} KiB"
    sb = sb_of(img)
    assert sb.nblocks == 1 << 18 and sb.log_blocks == 4096     # 1/64 of the device


def test_mkfs_sizes_and_options(tmp_path):
    img = tmp_path / "img"
    ok(run("mkfs", img, "--size", "64MiB", "--journal-blocks", "300", "--label", "scratch", "-q"))
    sb = sb_of(img)
    assert sb.nblocks == 16384 and sb.log_blocks == 300 and sb.label == b"scratch"
    ok(run("fsck", "-n", img))
    img2 = tmp_path / "img2"
    r = run("mkfs", img2, "--size", str(MIN_BLOCKS * BLOCK_SIZE), "-q")    # bytes, the minimum
    ok(r)
    assert r.stdout == ""
    ok(run("fsck", "-n", img2))


def test_mkfs_refuses_existing_delafs_without_force(image):
    uuid = sb_of(image).uuid
    r = run("mkfs", image)
    assert r.returncode != 0
    no_traceback(r)
    assert "--force" in r.stderr and "delafs" in r.stderr, r.stderr
    assert sb_of(image).uuid == uuid                # untouched
    r = run("mkfs", image, "--force", "-q")
    ok(r)
    assert sb_of(image).uuid != uuid
    ok(run("fsck", "-n", image))


def test_mkfs_refuses_image_with_only_the_secondary_superblock(image):
    with BlockDevice.open(str(image)) as dev:
        dev.write_sync(0, [bytes(BLOCK_SIZE)])
        assert dev.read_sync(dev.nblocks - 1, 1)[:8] == SB_MAGIC
    r = run("mkfs", image)
    assert r.returncode != 0
    assert "--force" in r.stderr and "secondary" in r.stderr, r.stderr


def test_mkfs_refuses_ext4(tmp_path):
    img = tmp_path / "ext4.img"
    ext4_image(img)
    before = img.read_bytes()
    r = run("mkfs", img)
    assert r.returncode != 0
    no_traceback(r)
    assert "ext" in r.stderr and "--force" in r.stderr, r.stderr
    assert img.read_bytes() == before
    ok(run("mkfs", img, "--force", "-q"))
    ok(run("fsck", "-n", img))


def test_mkfs_missing_file_without_size(tmp_path):
    img = tmp_path / "nope"
    r = run("mkfs", img)
    assert r.returncode != 0
    no_traceback(r)
    assert "--size" in r.stderr and "does not exist" in r.stderr, r.stderr
    assert not img.exists()


def test_mkfs_empty_file_without_size(tmp_path):
    img = tmp_path / "empty"
    img.write_bytes(b"")
    r = run("mkfs", img)
    assert r.returncode != 0
    assert "--size" in r.stderr


@pytest.mark.parametrize("size", ["12X", "lots", "-1G", "1.5G", ""])
def test_mkfs_bad_size_is_a_usage_error(tmp_path, size):
    img = tmp_path / "img"
    r = run("mkfs", img, "--size", size)
    assert r.returncode == 2, r.stderr
    no_traceback(r)
    assert "usage:" in r.stderr and "--size" in r.stderr
    assert not img.exists()


@pytest.mark.parametrize("size", ["1M", "4095K", "3MiB", "0"])
def test_mkfs_too_small(tmp_path, size):
    img = tmp_path / "img"
    r = run("mkfs", img, "--size", size)
    assert r.returncode == 1, r.stderr
    no_traceback(r)
    assert "too small" in r.stderr
    assert not img.exists()


def test_mkfs_refuses_to_resize_without_force(image):
    r = run("mkfs", image, "--size", "128M")
    assert r.returncode != 0
    assert "--force" in r.stderr and "resize" in r.stderr, r.stderr
    assert os.path.getsize(image) == 64 << 20
    ok(run("mkfs", image, "--size", "128M", "--force", "-q"))
    assert os.path.getsize(image) == 128 << 20
    assert sb_of(image).nblocks == 32768
    ok(run("mkfs", image, "--size", "32M", "--force", "-q"))   # shrinking too
    assert os.path.getsize(image) == 32 << 20
    ok(run("fsck", "-n", image))


def test_mkfs_on_a_directory(tmp_path):
    r = run("mkfs", tmp_path)
    assert r.returncode != 0
    no_traceback(r)
    assert "regular file" in r.stderr


def test_mkfs_refuses_a_locked_image(image):
    with BlockDevice.open(str(image)) as holder:
        holder.lock()
        r = run("mkfs", image, "--force")
    assert r.returncode != 0
    no_traceback(r)
    assert "in use" in r.stderr


@pytest.mark.parametrize("case", ["journal=10", "journal=-5", "journal=100000",
                                  "existing-1M-file", "existing-100-byte-file"])
def test_mkfs_bad_geometry_is_a_clean_error(tmp_path, case):
    img = tmp_path / "img"
    if case.startswith("journal="):
        args = ["--size", "64M", "--journal-blocks", case.split("=")[1]]
    else:
        img.write_bytes(b"")
        os.truncate(img, (1 << 20) if "1M" in case else 100)
        args = []
    r = run("mkfs", img, *args)
    assert r.returncode in (1, 2)
    no_traceback(r)
    assert "journal" in r.stderr or "small" in r.stderr, r.stderr


# ---------------------------------------------------------------------------
# Help and usage
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["mkfs", "--help"], ["fsck", "--help"], ["-h"]])
def test_help(args):
    r = run(*args)
    ok(r)
    assert "usage: delafs" in r.stdout


def test_help_via_python_m():
    r = subprocess.run([sys.executable, "-m", "delafs.cli", "fsck", "--help"],
                       capture_output=True, text=True, timeout=60)
    ok(r)
    assert "--wait" in r.stdout and "Exit status" in r.stdout


def test_no_command_is_a_usage_error():
    r = run()
    assert r.returncode == 2
    assert "usage:" in r.stderr


def test_fsck_n_and_y_are_exclusive(image):
    r = run("fsck", "-n", "-y", image)
    assert r.returncode == 2
    assert "not allowed" in r.stderr


# ---------------------------------------------------------------------------
# fsck
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("flag", [None, "-n", "-y"])
def test_fsck_missing_image(tmp_path, flag):
    r = run("fsck", *([flag] if flag else []), tmp_path / "missing.img")
    assert r.returncode == 8
    no_traceback(r)
    assert "does not exist" in r.stderr, r.stderr


def test_fsck_on_a_directory(tmp_path):
    r = run("fsck", tmp_path)
    assert r.returncode == 8
    no_traceback(r)
    assert "directory" in r.stderr


def test_fsck_unreadable_image(image):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    os.chmod(image, 0)
    r = run("fsck", image)
    assert r.returncode == 8
    no_traceback(r)


@pytest.mark.parametrize("flag", [None, "-n", "-y"])
def test_fsck_clean_image(image, flag):
    r = run("fsck", *([flag] if flag else []), image)
    ok(r)
    assert r.stdout.strip().endswith("clean")


def test_fsck_gives_up_on_a_locked_image(image):
    with BlockDevice.open(str(image)) as holder:
        holder.lock()
        t = time.monotonic()
        r = run("fsck", "--wait", "0.5", image)
        waited = time.monotonic() - t
    assert r.returncode == 8, r.stdout + r.stderr
    no_traceback(r)
    assert "in use" in r.stderr, r.stderr
    assert waited >= 0.5


def test_fsck_n_also_respects_the_lock(image):
    with BlockDevice.open(str(image), readonly=True) as holder:
        holder.lock()
        r = run("fsck", "-n", "--wait", "0.2", image)
    assert r.returncode == 8
    assert "in use" in r.stderr


def test_fsck_waits_for_the_lock_to_be_released(image):
    holder = BlockDevice.open(str(image))
    holder.lock()
    try:
        p = subprocess.Popen(DELAFS + ["fsck", "--wait", "30", str(image)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert p.poll() is None, "fsck did not wait for the lock"
    finally:
        holder.close()                 # releases the flock
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, out + err
    assert "clean" in out


@pytest.mark.parametrize("size", ["32M", "128M"])
def test_mkfs_on_a_locked_image_does_not_resize_it(image, size):
    before = os.path.getsize(image)
    with BlockDevice.open(str(image)) as holder:
        holder.lock()
        r = run("mkfs", image, "--force", "--size", size)
    assert r.returncode != 0 and "in use" in r.stderr
    assert os.path.getsize(image) == before
    ok(run("fsck", "-n", image))


def test_mount_options_atime_policies_and_unknown_ones_are_refused():
    from delafs.fuse.options import MountOptions
    opts = MountOptions.parse("relatime,rw,noatime,acl")
    assert opts.fuse == {"default_permissions", "noatime"} and opts.acl
    assert MountOptions.parse("strictatime,nodiratime").strictatime
    for bad in ("lazytime", "bogus", "cache_size", "noatime,strictatime"):
        with pytest.raises(ValueError):
            MountOptions.parse(bad)


def test_mount_options_out_of_range_are_refused_naming_the_option():
    """Accepted before: an interval of 0 made the flusher or the committer
    spin (a core busy while idle), a negative one crashed the daemon right
    after the mount came up, nan waited forever; a value that is not a
    number said only "could not convert string to float"."""
    from delafs.fuse.options import MountOptions
    good = MountOptions.parse("writeback_interval=0.5,commit_interval=30,dirty_expire=0,"
                              "lock_wait=0,entry_timeout=0,attr_timeout=1,cache_size=16M,dirty_limit=4M")
    assert good.writeback_interval == 0.5 and good.dirty_expire == 0 and good.cache_size == 16 << 20
    for bad in ("writeback_interval=0", "commit_interval=0", "writeback_interval=-1",
                "commit_interval=-1", "dirty_expire=-1", "lock_wait=nan", "lock_wait=-1",
                "entry_timeout=inf", "attr_timeout=-0.5", "commit_interval=soon",
                "cache_size=0", "dirty_limit=0", "cache_size=4K"):
        key = bad.partition("=")[0]
        with pytest.raises(ValueError, match=key):
            MountOptions.parse(bad)


def test_mount_option_read_ahead_takes_a_size_in_whole_pages():
    from delafs.fuse.options import MountOptions
    assert MountOptions.parse("").read_ahead is None            # the kernel's window
    assert MountOptions.parse("read_ahead=1M").read_ahead == 1 << 20
    assert MountOptions.parse("read_ahead=512K").read_ahead == 512 << 10
    for bad in ("read_ahead", "read_ahead=0", "read_ahead=5000", "read_ahead=-4K", "read_ahead=lots",
                "read_ahead=2G"):
        with pytest.raises(ValueError, match="read_ahead"):
            MountOptions.parse(bad)


# ---------------------------------------------------------------------------
# What a new user hits first: help, tiny images, one error line per failure
# ---------------------------------------------------------------------------

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="delafs mount needs /dev/fuse")


def test_help_hides_mount_helper_which_still_runs():
    r = run("--help")
    ok(r)
    assert "mount-helper" not in r.stdout and "SUPPRESS" not in r.stdout, r.stdout
    # Still there for /sbin/mount.fuse.delafs (mount(8) runs it).
    r = run("mount-helper", "--help")
    ok(r)
    assert "usage: delafs mount-helper" in r.stdout


def _short_file(tmp_path, size: int) -> Path:
    path = tmp_path / f"short{size}.img"
    path.write_bytes(bytes(size))
    return path


@pytest.mark.parametrize("size", [0, 100, BLOCK_SIZE, 1 << 20])
@pytest.mark.parametrize("flag", [None, "-n"])
def test_fsck_of_a_file_too_small_to_be_delafs(tmp_path, size, flag):
    path = _short_file(tmp_path, size)
    r = run("fsck", *([flag] if flag else []), path)
    assert r.returncode == 8, r.stdout + r.stderr
    no_traceback(r)
    assert r.stderr == f"delafs fsck: {path} is not a delafs image (too small: {size} bytes)\n", r.stderr
    assert r.stdout == ""


@needs_fuse
@pytest.mark.parametrize("size", [0, 100, BLOCK_SIZE, 1 << 20])
def test_mount_of_a_file_too_small_to_be_delafs(tmp_path, size):
    path = _short_file(tmp_path, size)
    (tmp_path / "mnt").mkdir()
    r = run("mount", path, tmp_path / "mnt", "-o", "lock_wait=1", timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stderr == f"delafs mount: {path} is not a delafs image (too small: {size} bytes)\n", r.stderr
    assert path.read_bytes() == bytes(size)


def test_mkfs_of_an_impossible_size_is_one_line(image, tmp_path):
    """A size past what off_t holds raised OverflowError, and resizing an
    existing image (--force) to a size its host filesystem refuses raised
    the OSError: tracebacks, where the other mkfs errors are one line."""
    for args in (("mkfs", tmp_path / "new.img", "--size", "9000P"),
                 ("mkfs", image, "--force", "--size", "9000P")):
        r = run(*args)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "larger than any file can be" in r.stderr, r.stderr
    ok(run("fsck", "-n", image))


def test_mount_with_a_log_file_it_cannot_open_says_so(image, tmp_path):
    """The daemon opened -o log=FILE after it forked, outside any handler:
    a missing directory printed a FileNotFoundError traceback, then 'the
    daemon died before mounting'."""
    (tmp_path / "mnt").mkdir()
    bad = tmp_path / "no-such-dir" / "d.log"
    r = run("mount", image, tmp_path / "mnt", "-o", f"log={bad}", timeout=60)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert str(bad) in r.stderr and "No such file or directory" in r.stderr, r.stderr


def test_a_truncated_delafs_image_is_called_corrupt_not_foreign(image):
    """Block 0 still says delafs: the image was cut short, which is damage."""
    os.truncate(image, 1 << 20)
    r = run("fsck", "-n", image)
    assert r.returncode == 8, r.stdout + r.stderr
    assert "not a delafs image" not in r.stdout + r.stderr
    assert "corrupt superblock" in r.stdout, r.stdout


@pytest.mark.parametrize("flag", [None, "-n", "-y"])
def test_fsck_of_a_foreign_file_says_why_once(tmp_path, flag):
    path = tmp_path / "random.img"
    path.write_bytes(random_bytes(8 << 20))
    r = run("fsck", *([flag] if flag else []), path)
    assert r.returncode == 8, r.stdout + r.stderr
    assert (r.stdout + r.stderr).count("not a delafs image") == 1, r.stdout + r.stderr
    assert r.stderr.startswith(f"delafs fsck: {path} is not a delafs image"), r.stderr


def random_bytes(n: int) -> bytes:
    import random
    return random.Random(7).randbytes(n)


def test_every_failing_command_says_delafs_command_reason(tmp_path):
    """fail.py's rule: one line on stderr, ``delafs COMMAND: reason``.  The
    mount(8) helper speaks as ``delafs mount``: that is what the user ran."""
    junk = tmp_path / "junk.img"
    junk.write_bytes(random_bytes(8 << 20))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cases = [
        ("mount", ["mount", tmp_path / "missing.img", mnt]),
        ("mount", ["mount", junk, mnt, "-o", "bogus"]),
        ("mount", ["mount-helper", junk, mnt, "-o", "bogus"]),
        ("mount", ["mount-helper", junk, mnt, "-o", "remount,ro"]),
        ("fsck", ["fsck", junk]),
        ("fsck", ["fsck", tmp_path / "missing.img"]),
        ("mkfs", ["mkfs", tmp_path / "missing.img"]),
        ("umount", ["umount", mnt]),
        ("stat", ["stat", mnt]),
        ("sync", ["sync", mnt]),
        ("inject", ["inject", mnt, "short_copy=3"]),
        ("install-helper", ["install-helper", "--path", tmp_path / "no" / "such" / "dir"]),
        ("race", ["race", "--schedules", "0"]),
    ]
    if os.path.exists("/dev/fuse"):
        cases.append(("mount", ["mount", junk, mnt, "-o", "lock_wait=1"]))
        cases.append(("mount", ["mount-helper", junk, mnt, "-o", "lock_wait=1"]))
    for cmd, args in cases:
        r = run(*args, timeout=60)
        assert r.returncode != 0, (args, r.stdout, r.stderr)
        no_traceback(r)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"delafs {cmd}: "), (args, r.stderr)


def test_mount_option_subtype():
    from delafs.fuse.options import MountOptions
    assert not any(o.startswith("subtype") for o in MountOptions.parse("").fuse)
    assert "subtype=delafs" in MountOptions.parse("subtype=delafs").fuse
    for bad in ("subtype=", "subtype", "subtype=a b", "subtype=a/b", "subtype=.x"):
        with pytest.raises(ValueError, match="bad subtype"):
            MountOptions.parse(bad)
    # A comma ends the option: what follows is refused as an option of its own.
    with pytest.raises(ValueError, match="'b'"):
        MountOptions.parse("subtype=a,b")


@pytest.mark.skipif(not _SCRIPT.exists(), reason="needs the installed delafs script")
def test_install_helper_points_at_the_delafs_being_run(tmp_path):
    """Not at the first delafs on PATH: `.venv/bin/delafs install-helper`
    from one checkout must not send mount(8) to another's."""
    other = tmp_path / "bin" / "delafs"
    other.parent.mkdir()
    other.write_text("#!/bin/sh\nexit 99\n")
    other.chmod(0o755)
    helper = tmp_path / "mount.fuse.delafs"
    env = dict(os.environ, PATH=f"{other.parent}:{os.environ['PATH']}")
    r = subprocess.run([str(_SCRIPT), "install-helper", "--path", str(helper)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = helper.read_text()
    assert str(other) not in text and f"exec {_SCRIPT} mount-helper" in text, text


def test_umount_counts_a_zombie_daemon_as_gone():
    """delafs umount waits for the daemon to exit.  Its parent is gone, so
    the exited daemon stays a zombie until init reaps it (over a second on
    some machines): the wait must end when it exits, not when it is reaped."""
    from delafs.cli.mount import wait_gone
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        t0 = time.monotonic()
        while not os.path.exists(f"/proc/{child.pid}/stat") or \
                open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() - t0 < 10
            time.sleep(0.01)
        assert wait_gone(child.pid, 2.0)        # a zombie: not reaped yet
        assert not wait_gone(os.getpid(), 0.1)  # a live process is not gone
    finally:
        child.wait()


def test_signals_stay_ignored_once_the_daemon_stops_listening():
    """Between the daemon's signal receiver closing (trio restores the
    handlers it found) and shutdown() ignoring signals, a SIGTERM had the
    default action and killed the daemon before its final flush.  The
    handlers it restores must already ignore them."""
    import signal

    import trio
    import trio.testing

    from delafs.fuse.daemon import Daemon
    from delafs.fuse.options import MountOptions

    d = Daemon("img", "mnt", MountOptions.parse(""))
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    async def listen_then_stop():
        async with trio.open_nursery() as n:
            n.start_soon(d._signals)
            await trio.testing.wait_all_tasks_blocked()
            n.cancel_scope.cancel()
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        trio.run(listen_then_stop)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
