"""Inode lifetime on a mount: what the kernel forgets, the daemon lets go.

The kernel sends FORGET when it drops an inode from its caches (memory
pressure, or drop_caches); a linked file nobody holds open is then evicted
as the kernel's evict_inode does: its clean pages and its in-memory inode
go, and it is read back from the image when it is looked up again."""

import os

import pytest

from .conftest import is_mounted, pid_alive, wait_until


def drop_kernel_caches() -> None:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError as e:
        pytest.skip(f"cannot drop the kernel's caches here: {e}")


def test_inodes_the_kernel_forgets_leave_the_daemon_with_their_clean_pages(delafs_mount):
    m = delafs_mount()
    n = 300
    os.mkdir(m.path("d"))
    for i in range(n):
        with open(m.path("d", str(i)), "wb") as f:
            f.write(bytes([i % 251]) * 8192)
    m.sync()
    before = m.stat()["cache"]
    assert before["mappings"] >= n
    drop_kernel_caches()
    assert wait_until(lambda: m.stat()["cache"]["mappings"] < n // 10, 20), m.stat()["cache"]
    after = m.stat()["cache"]
    assert after["cached_bytes"] <= before["cached_bytes"] - n * 8192
    for i in range(n):
        with open(m.path("d", str(i)), "rb") as f:
            assert f.read() == bytes([i % 251]) * 8192, i
    m.umount()
    m.fsck()


def test_a_forgotten_inode_with_dirty_pages_keeps_them_until_written_back(delafs_mount):
    m = delafs_mount(opts="dirty_expire=3600,writeback_interval=3600")
    with open(m.path("dirty"), "wb") as f:
        f.write(b"d" * 20000)
    assert m.stat()["cache"]["dirty_bytes"] > 0
    drop_kernel_caches()
    assert wait_until(lambda: m.stat()["vfs"]["known_inodes"] <= 1, 20), m.stat()["vfs"]
    assert m.stat()["cache"]["dirty_bytes"] > 0          # nothing dropped, nothing lost
    with open(m.path("dirty"), "rb") as f:
        assert f.read() == b"d" * 20000
    m.umount()
    m.mount()
    with open(m.path("dirty"), "rb") as f:
        assert f.read() == b"d" * 20000
    m.umount()
    m.fsck()


def test_a_read_only_mount_survives_the_kernel_forgetting_its_inodes(delafs_mount):
    """FORGET has no reply, and pyfuse3 lets an exception from the forget
    handler end its session loop: the daemon exited and the mount went
    away.  On a read-only mount every FORGET that dropped an inode's last
    lookup raised (releasing the reference opened a write transaction:
    EROFS)."""
    m = delafs_mount()
    os.mkdir(m.path("d"))
    for i in range(50):
        with open(m.path("d", str(i)), "wb") as f:
            f.write(bytes([i]) * 100)
    m.umount()
    m.mount("ro")
    pid = m.pid
    for i in range(50):
        os.stat(m.path("d", str(i)))
    drop_kernel_caches()
    assert wait_until(lambda: m.stat()["vfs"]["known_inodes"] <= 1, 20), m.stat()["vfs"]
    assert pid_alive(pid) and is_mounted(m.mnt), m.log_tail()
    assert sorted(os.listdir(m.path("d")), key=int) == [str(i) for i in range(50)]
    with open(m.path("d", "7"), "rb") as f:
        assert f.read() == bytes([7]) * 100
    assert not m.tracebacks()
    m.umount()
    m.fsck()
