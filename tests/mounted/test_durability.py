"""What fsync and an orderly unmount promise, with writeback in flight.

The window is forced, not hoped for: a short dirty expiry makes the
flusher take the folios at once, and the ``delay_writeback`` errortag
holds its ioend before submission, so the folios are clean, under
writeback and not yet on the device when fsync or the unmount arrives.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from .conftest import DELAFS, is_mounted, pid_alive, run, wait_until

HOLD = "dirty_expire=0.01,writeback_interval=0.01,delay_writeback=3000"


def kill_9(m) -> None:
    pid = m.pid
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(pid), 10)
    m.forget_daemon()


def test_delafs_umount_clears_the_mount_of_a_killed_daemon(delafs_mount):
    """After kill -9 the mount point answers ENOTCONN.  delafs umount said
    "not a mounted delafs" and left it there (a user had to know
    fusermount3 -u); it now says the daemon is gone, unmounts, and exits 1
    (nothing could be written back: the journal replays at the next
    mount).  The other commands say the same instead of "not mounted"."""
    m = delafs_mount()
    with open(m.path("f"), "wb") as f:
        f.write(b"synced")
        f.flush()
        os.fsync(f.fileno())
    pid = m.pid
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(pid), 10)
    r = run([DELAFS, "stat", m.mnt], check=False)
    assert r.returncode == 1 and "daemon is gone" in r.stderr, r.stderr
    r = run([DELAFS, "umount", m.mnt], check=False)
    assert r.returncode == 1 and "daemon is gone" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not is_mounted(m.mnt)
    m.pid = None
    m.mount()
    with open(m.path("f"), "rb") as f:
        assert f.read() == b"synced"


def test_fsync_waits_for_writeback_already_in_flight(delafs_mount):
    m = delafs_mount(size="64M", opts=HOLD)
    os.mkdir(m.path("d"))
    m.sync()
    data = random.Random(1).randbytes(72 << 10)
    p = m.path("d", "f")
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        time.sleep(0.5)                 # the flusher has taken the folios, and holds them
        assert m.stat()["cache"]["writeback_bytes"] > 0, "the flusher did not take the folios"
        t0 = time.monotonic()
        os.fsync(fd)
        took = time.monotonic() - t0
    finally:
        os.close(fd)
    dfd = os.open(m.path("d"), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    kill_9(m)
    m.mount()
    with open(p, "rb") as f:
        got = f.read()
    assert got == data, f"fsync returned after {took:.2f} s and its data is gone " \
                        f"({len(got)} bytes read back, {sum(a == b for a, b in zip(got, data))} right)"


def test_fdatasync_waits_for_writeback_already_in_flight(delafs_mount):
    m = delafs_mount(size="64M", opts=HOLD)
    p = m.path("f")
    with open(p, "wb") as f:
        f.write(bytes(64 << 10))
        f.flush()
        os.fsync(f.fileno())
    data = random.Random(2).randbytes(64 << 10)
    fd = os.open(p, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        time.sleep(0.5)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    kill_9(m)
    m.mount()
    with open(p, "rb") as f:
        assert f.read() == data


@pytest.mark.parametrize("how", ["umount", "sigterm"])
def test_unmount_with_writeback_in_flight_loses_nothing(delafs_mount, how):
    """A plain umount(8) (or SIGTERM) while the flusher holds ioends: the
    daemon's final flush must write them, not cancel them."""
    m = delafs_mount(size="64M", opts="dirty_expire=0.01,writeback_interval=0.01,delay_writeback=2000")
    data = random.Random(3).randbytes(8 << 20)
    with open(m.path("big"), "wb") as f:
        f.write(data)
    time.sleep(0.5)
    pid = m.pid
    if how == "umount":
        run(["umount", m.mnt])
    else:
        os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not pid_alive(pid), 120), "the daemon did not exit"
    assert wait_until(lambda: not is_mounted(m.mnt), 10)
    m.pid = None
    m.fsck()
    m.mount()
    with open(m.path("big"), "rb") as f:
        got = f.read()
    if got != data:
        first = next((i for i, (a, b) in enumerate(zip(got, data)) if a != b), min(len(got), len(data)))
        pytest.fail(f"after {how} the file differs from byte {first} on ({len(got)} bytes read back)")


@pytest.mark.parametrize("how", ["umount", "sigterm"])
def test_more_signals_during_the_final_flush_do_not_kill_it(delafs_mount, how):
    """systemd's ExecStop=umount followed by its SIGTERM, or a second
    Ctrl-C: after the first signal the daemon stopped listening, and the
    next one (default action) killed it in the middle of its final flush,
    losing what the journal had not committed yet."""
    m = delafs_mount(size="64M", opts="dirty_expire=3600,writeback_interval=3600,delay_writeback=1500")
    data = random.Random(5).randbytes(8 << 20)
    with open(m.path("big"), "wb") as f:
        f.write(data)
    pid = m.pid
    if how == "umount":
        run(["umount", m.mnt])
    else:
        os.kill(pid, signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
        time.sleep(0.3)
        if pid_alive(pid):
            os.kill(pid, sig)
    assert wait_until(lambda: not pid_alive(pid), 120), "the daemon did not exit"
    assert wait_until(lambda: not is_mounted(m.mnt), 10)
    m.pid = None
    assert "unmounted" in open(m.log).read().splitlines()[-1], m.log_tail()
    m.fsck()
    m.mount()
    with open(m.path("big"), "rb") as f:
        assert f.read() == data


def test_host_filesystem_full_is_reported_and_loses_no_metadata(delafs_mount, tmp_path):
    """The image is sparse on a 48 MiB tmpfs: the mount warns, write(2)
    accepts more than the host can hold, the first fsync reports the
    host's ENOSPC, the filesystem shuts down with a log line (the journal
    cannot be written), delafs umount still unmounts, and once the host has
    room again the journal replays, fsck is clean and what was fsynced
    before is there."""
    host = tmp_path / "host"
    host.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", host])
    try:
        image = str(host / "img")
        run([DELAFS, "mkfs", image, "--size", "256M"])
        m = delafs_mount(image=image, mkfs=False, mount=False)
        r = run([DELAFS, "mount", image, m.mnt, "-o", m._all_opts("")])
        assert "warning" in r.stderr and "MiB free" in r.stderr, r.stderr
        import json

        from delafs.fuse.control import control_command
        m.pid = json.loads(control_command(m.mnt, "stat"))["daemon"]["pid"]
        m.pids.append(m.pid)
        m.tracebacks_ok = True
        with open(m.path("promised"), "wb") as f:
            f.write(b"fsynced before the host filled up")
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(m.path("big"), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for _ in range(80):
                os.write(fd, os.urandom(1 << 20))
            with pytest.raises(OSError) as e:
                os.fsync(fd)
            assert e.value.errno in (errno.ENOSPC, errno.EIO), e.value
        finally:
            os.close(fd)
        assert "filesystem shut down" in open(m.log).read()
        r = run([DELAFS, "umount", m.mnt], check=False, timeout=120)
        assert not is_mounted(m.mnt), r.stderr
        assert wait_until(lambda: not pid_alive(m.pid), 60)
        m.pid = None
        run(["mount", "-o", "remount,size=512m", host])
        m.fsck()
        m.mount()
        assert open(m.path("promised"), "rb").read() == b"fsynced before the host filled up"
        m.umount()
    finally:
        if is_mounted(str(host)):
            for mnt in [x for x in (getattr(m, "mnt", None),) if x and is_mounted(x)]:
                run(["fusermount3", "-u", "-z", mnt], check=False)
            run(["umount", "-l", host], check=False)


def kill_9_rounds(delafs_mount, rounds: int) -> None:
    """Write and fsync files (the flusher running at a short expiry, so
    some data is already under writeback), leave more unsynced, kill -9 the
    daemon; after each crash fsck must be clean once the journal replays
    and every fsynced byte must be there."""
    m = delafs_mount(size="64M", opts="dirty_expire=0.02,writeback_interval=0.01")
    rng = random.Random(9)
    promised: dict[str, bytes] = {}
    for r in range(rounds):
        for i in range(3):
            name = f"r{r}-{i}"
            data = rng.randbytes(rng.randint(1, 300_000))
            with open(m.path(name), "wb") as f:
                f.write(data)
                if i == 1:
                    time.sleep(0.05)            # the flusher takes part of it
                f.flush()
                os.fsync(f.fileno())
            promised[name] = data
        with open(m.path(f"unsynced-{r}"), "wb") as f:
            f.write(rng.randbytes(400_000))
        kill_9(m)
        m.mount()                               # replays the journal
        m.umount()
        m.fsck()
        m.mount()
        for name, data in promised.items():
            with open(m.path(name), "rb") as f:
                assert f.read() == data, f"round {r}: {name} lost fsynced data"


def test_kill_9_under_write_and_fsync(delafs_mount):
    kill_9_rounds(delafs_mount, 3)


@pytest.mark.slow
def test_kill_9_a_hundred_times(delafs_mount):
    kill_9_rounds(delafs_mount, 100)


def write_fsynced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def assert_fsync_of_a_new_write_fails(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 10000)
        with pytest.raises(OSError) as e:
            os.fsync(fd)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)


def umount_shut_down(m):
    """delafs umount of a filesystem that shut down: exit 1, the daemon gone."""
    r = run([DELAFS, "umount", m.mnt], check=False, timeout=120)
    assert r.returncode == 1, r.stderr
    assert wait_until(lambda: not pid_alive(m.pid), 60)
    m.pid = None
    return r


def test_journal_eio_shuts_down_with_a_log_line_and_recovers(delafs_mount):
    m = delafs_mount(size="64M")
    m.tracebacks_ok = True
    write_fsynced(m.path("before"), b"committed before the fault")
    m.inject(log_eio=1)
    assert_fsync_of_a_new_write_fails(m.path("during"))
    assert "filesystem shut down: journal commit failed" in open(m.log).read()
    with pytest.raises(OSError) as e:
        open(m.path("after"), "w").close()
    assert e.value.errno == errno.EIO
    r = umount_shut_down(m)
    assert "unmounting anyway" in r.stderr, r.stderr
    assert not is_mounted(m.mnt)
    m.fsck()
    m.mount()
    assert open(m.path("before"), "rb").read() == b"committed before the fault"


def test_data_write_eio_is_reported_once_per_open_file_description(delafs_mount):
    """errseq through the kernel: each description open when writeback
    failed sees EIO from its next fsync, once; one opened after the error
    sees nothing."""
    m = delafs_mount(size="64M")
    m.tracebacks_ok = True
    p = m.path("f")
    a = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    b = os.open(p, os.O_RDWR)
    try:
        m.inject(writeback_eio=1)
        os.write(a, b"y" * 50000)
        for fd in (a, b):
            with pytest.raises(OSError) as e:
                os.fsync(fd)
            assert e.value.errno == errno.EIO
            os.fsync(fd)                        # reported once: clean now
        m.inject(writeback_eio=0)
        c = os.open(p, os.O_RDWR)
        try:
            os.fsync(c)
        finally:
            os.close(c)
        os.pwrite(a, b"z" * 4096, 0)
        os.fsync(a)
        os.fsync(b)
    finally:
        os.close(a)
        os.close(b)
    # The superblock's report (syncfs(2), `delafs sync`) is its own: once.
    r = run([DELAFS, "sync", m.mnt], check=False)
    assert r.returncode == 1 and "Input/output error" in r.stderr, (r.returncode, r.stderr)
    m.sync()
    m.cycle()
    assert open(p, "rb").read(4096) == b"z" * 4096


HOLDER = r"""
import mmap, os, sys
path, how, data = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
with open(path, "wb") as f:
    f.write(bytes(len(data)))
    f.flush()
    os.fsync(f.fileno())
fd = os.open(path, os.O_RDWR)
if how == "mmap":
    m = mmap.mmap(fd, len(data))
    m[:] = data
else:
    os.pwrite(fd, data, 0)
print("held", flush=True)
sys.stdin.read()
"""


class KernelHeldPages:
    """Written data the kernel holds in its own page cache, not yet sent
    to the daemon as a WRITE: a write(2) under -o writeback_cache, or a
    store through a shared mapping (any mount).  Another process holds the
    file open: a fork of this one (running delafs) would close a copy of
    the descriptor, and FUSE's FLUSH on that close writes the pages back."""

    def __init__(self, m, how: str):
        self.data = random.Random(how).randbytes(3 * 4096)
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, m.path("held"), how, self.data.hex()],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "held\n"

    def drop(self) -> None:
        """The daemon is gone: let go without writing anything more."""
        self.proc.kill()
        self.proc.wait()

    def check(self, m) -> None:
        with open(m.path("held"), "rb") as f:
            assert f.read() == self.data, "what the kernel held was lost"


HELD = [pytest.param("writeback_cache", "write", id="wbc-write"), pytest.param("", "mmap", id="mmap")]


@pytest.mark.parametrize("opts,how", HELD)
def test_delafs_sync_covers_pages_the_kernel_holds(delafs_mount, opts, how):
    """delafs sync is a durability point for what a program wrote, also
    where the kernel still holds it: it makes the kernel write those pages
    back (syncfs(2)) before the daemon's own sync.  After a kill -9 they
    were lost."""
    m = delafs_mount(size="64M", opts=opts)
    held = KernelHeldPages(m, how)
    try:
        m.sync()
        kill_9(m)
    finally:
        held.drop()
    m.mount()
    held.check(m)


@pytest.mark.parametrize("opts,how", HELD)
def test_sigterm_unmount_covers_pages_the_kernel_holds(delafs_mount, opts, how):
    """SIGTERM unmounts cleanly, also for a file still open: the daemon has
    the kernel write back the pages it holds before it lets go of the
    connection.  They were lost (the README said: close or fsync first)."""
    m = delafs_mount(size="64M", opts=opts)
    held = KernelHeldPages(m, how)
    pid = m.pid
    try:
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not pid_alive(pid), 120), "the daemon did not exit"
    finally:
        held.drop()
    m.forget_daemon()
    m.fsck()
    m.mount()
    held.check(m)


def fail_a_kernel_writeback(m) -> None:
    """Under -o writeback_cache: a file whose pages the kernel wrote back
    at close and the daemon refused (ENOSPC), which leaves the error in the
    kernel's s_wb_err for the next syncfs(2) to report.  After it, a file
    the daemon holds, written but not committed."""
    m.inject(alloc_enospc=1)
    with pytest.raises(OSError):
        with open(m.path("refused"), "wb") as f:
            f.write(b"r" * 20000)
    m.inject(alloc_enospc=0)
    with open(m.path("held-by-daemon"), "wb") as f:
        f.write(b"d" * 20000)


def test_delafs_sync_still_syncs_the_daemon_when_the_kernel_reports_an_error(delafs_mount):
    m = delafs_mount(size="64M", opts="writeback_cache")
    m.tracebacks_ok = True
    fail_a_kernel_writeback(m)
    r = run([DELAFS, "sync", m.mnt], check=False)
    assert r.returncode == 1 and "could not write back what it held" in r.stderr, r.stderr
    kill_9(m)
    m.mount()
    assert open(m.path("held-by-daemon"), "rb").read() == b"d" * 20000


def test_sigterm_whose_kernel_writeback_failed_exits_1(delafs_mount):
    m = delafs_mount(size="64M", mount=False)
    m.tracebacks_ok = True
    p = start_foreground(m, "writeback_cache")
    fail_a_kernel_writeback(m)
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(timeout=120) == 1
    m.pid = None
    assert "written data may be lost" in open(m.log).read(), m.log_tail()
    m.forget_daemon()
    m.fsck()


def start_foreground(m, opts: str = "") -> subprocess.Popen:
    """``delafs mount -f`` as a child of the test, so its exit status is seen."""
    p = subprocess.Popen([DELAFS, "mount", "-f", m.image, m.mnt, "-o", ",".join(filter(None, [opts, f"log={m.log}"]))],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    m.pids.append(p.pid)
    assert wait_until(lambda: is_mounted(m.mnt) or p.poll() is not None, 60), "no mount"
    assert p.poll() is None, p.stderr.read()
    m.pid = p.pid
    return p


# The journal commits often, the flusher never: whatever a test needs on
# disk before its crash, the filesystem itself must have written.
COMMIT_NOT_WRITEBACK = "commit_interval=0.05,dirty_expire=3600,writeback_interval=3600"


@pytest.mark.parametrize("opts", ["", "writeback_cache"])
@pytest.mark.parametrize("how", ["rename-over", "truncate-and-rewrite"])
def test_replacing_a_file_without_fsync_never_leaves_it_empty_after_a_crash(delafs_mount, how, opts):
    """The two ways programs replace a file without fsync: write a new one
    and rename it over the old (editors, config writers; ext4's
    auto_da_alloc flushes the new data at the rename), or truncate and
    rewrite it (XFS and ext4 flush at the close after a truncate).  After a
    crash the file holds the old or the new contents, never nothing; it
    held 0 bytes once the rename or the truncate had been committed."""
    m = delafs_mount(size="64M", opts=",".join(filter(None, [COMMIT_NOT_WRITEBACK, opts])))
    target = m.path("conf")
    write_fsynced(target, b"old contents\n" * 100)
    new = b"new contents\n" * 300
    if how == "rename-over":
        with open(m.path("conf.tmp"), "wb") as f:
            f.write(new)
        os.rename(m.path("conf.tmp"), target)
    else:
        with open(target, "wb") as f:
            f.write(new)
    time.sleep(0.5)                         # ten journal commits
    kill_9(m)
    m.mount()
    with open(target, "rb") as f:
        got = f.read()
    assert got in (b"old contents\n" * 100, new), f"{len(got)} bytes after the crash"


def test_a_final_flush_that_loses_data_is_not_called_clean(delafs_mount):
    """umount(8) with dirty data whose writeback fails: the daemon (run in
    the foreground, so its status is seen) logs the loss and exits 1, not
    "unmounted cleanly" and 0; the image it leaves is consistent."""
    m = delafs_mount(size="64M", mount=False)
    m.tracebacks_ok = True
    p = start_foreground(m)
    with open(m.path("lost"), "wb") as f:
        f.write(b"x" * 50000)
    m.inject(writeback_eio=1)
    run(["umount", m.mnt])
    assert p.wait(timeout=120) == 1
    m.pid = None
    text = open(m.log).read()
    assert "final flush failed" in text and "the final flush lost data" in text, m.log_tail()
    assert "cleanly" not in text, m.log_tail()
    m.fsck()


def test_flush_eio_fails_fsync_and_shuts_down_then_recovers(delafs_mount):
    """A device cache flush that fails: the data flush of writeback records
    the error for fsync, the journal's flush shuts the filesystem down with
    a log line; after a remount (the fault is gone) fsck is clean and what
    was fsynced before is intact."""
    m = delafs_mount(size="64M")
    m.tracebacks_ok = True
    write_fsynced(m.path("before"), b"fsynced before the fault")
    m.inject(flush_eio=1)
    assert_fsync_of_a_new_write_fails(m.path("during"))
    assert "filesystem shut down" in open(m.log).read()
    r = run([DELAFS, "sync", m.mnt], check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "Input/output error" in r.stderr, r.stderr
    umount_shut_down(m)
    m.fsck()
    m.mount()
    assert open(m.path("before"), "rb").read() == b"fsynced before the fault"


def test_inject_refuses_a_bad_setting_with_a_clear_error(delafs_mount):
    m = delafs_mount(size="32M")
    for bad in ("no_such_tag=1", "short_copy=x"):
        r = run([DELAFS, "inject", m.mnt, bad], check=False)
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert "Traceback" not in r.stderr and "errortag" in r.stderr, r.stderr


def test_control_commands_on_a_path_that_is_not_a_mount(tmp_path):
    for cmd in (["sync"], ["stat"], ["umount"], ["inject", None]):
        argv = [DELAFS, *[c for c in cmd if c], str(tmp_path)] + (["short_copy=1"] if "inject" in cmd else [])
        r = run(argv, check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr, (cmd, r.stderr)
        assert "not a mounted delafs" in r.stderr, (cmd, r.stderr)
