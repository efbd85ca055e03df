"""POSIX semantics a user takes for granted, checked through a real mount.

Each test is the way a user meets the rule: shell redirection over an
existing file, ``touch``, ``chmod``, a write followed by ``stat``, fio
writing with O_DIRECT under a buffered reader.  Where it matters the test
also checks the image after ``delafs umount`` and a remount (``m.cycle()``):
what the kernel cached while mounted proves nothing about what was stored.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

from .conftest import run


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


def sh(cmd: str, cwd: str) -> str:
    return run(["sh", "-c", cmd], cwd=cwd).stdout


def times(path: str) -> tuple[int, int]:
    s = os.stat(path)
    return s.st_mtime_ns, s.st_ctime_ns


def tick() -> None:
    """Let the clock move past the last timestamp (nanosecond stamps, but
    be generous to coarse clocks)."""
    time.sleep(0.02)


# ======================================================================================
# O_TRUNC
# ======================================================================================

def test_shell_redirection_truncates_data_not_yet_written_back(delafs_mount):
    """``echo x > f`` over a file whose data is still only in the page
    cache: the new content alone, and the size of the new content."""
    m = delafs_mount(opts="dirty_expire=60")
    sh('echo "a long line of text" > f; echo s > f', m.mnt)
    assert open(m.path("f"), "rb").read() == b"s\n"
    assert os.stat(m.path("f")).st_size == 2
    m.cycle()
    assert open(m.path("f"), "rb").read() == b"s\n"


def test_o_trunc_after_partial_writeback(delafs_mount):
    """Part of the old content written back, part still delalloc: O_TRUNC
    must drop both, and growing the file again must show zeros."""
    m = delafs_mount(opts="dirty_expire=60")
    p = m.path("f")
    with open(p, "wb") as f:
        f.write(b"A" * 100_000)
        f.flush()
        os.fsync(f.fileno())
        f.write(b"B" * 100_000)
    with open(p, "wb") as f:
        f.write(b"new")
    assert os.stat(p).st_size == 3
    os.truncate(p, 50_000)
    assert open(p, "rb").read() == b"new" + bytes(49_997)
    m.cycle()
    assert open(p, "rb").read() == b"new" + bytes(49_997)


def test_o_trunc_stamps_times_even_of_an_empty_file(delafs_mount):
    m = delafs_mount()
    p = m.path("empty")
    open(p, "w").close()
    before = times(p)
    tick()
    open(p, "w").close()                # O_WRONLY|O_CREAT|O_TRUNC on an existing file
    after = times(p)
    assert after[0] > before[0] and after[1] > before[1], (before, after)


# ======================================================================================
# mtime and ctime
# ======================================================================================

def test_write_moves_mtime_and_ctime_and_they_persist(delafs_mount):
    m = delafs_mount()
    p = m.path("f")
    with open(p, "wb") as f:
        f.write(b"x" * 10)
    created = times(p)
    tick()
    fd = os.open(p, os.O_WRONLY)
    try:
        os.pwrite(fd, b"y", 3)
        os.fsync(fd)
    finally:
        os.close(fd)
    written = times(p)
    assert written[0] > created[0], "write(2) did not move mtime"
    assert written[1] > created[1], "write(2) did not move ctime"
    m.cycle()
    assert times(p) == written, "the times a write stamped did not survive the remount"


def test_mmap_store_moves_mtime(delafs_mount):
    """A store through a shared mapping reaches the daemon as a WRITE from
    the kernel's writeback (msync): it stamps mtime like write(2)."""
    m = delafs_mount()
    p = m.path("f")
    with open(p, "wb") as f:
        f.write(bytes(8192))
        f.flush()
        os.fsync(f.fileno())
    before = times(p)
    tick()
    with open(p, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 8192)
        mm[100:105] = b"hello"
        mm.flush()
        mm.close()
    after = times(p)
    assert after[0] > before[0] and after[1] > before[1], (before, after)
    m.cycle()
    assert open(p, "rb").read()[100:105] == b"hello"
    assert times(p) == after


def test_truncate_moves_mtime_and_ctime(delafs_mount):
    m = delafs_mount()
    p = m.path("f")
    with open(p, "wb") as f:
        f.write(b"z" * 5000)
    before = times(p)
    tick()
    os.truncate(p, 100)
    mid = times(p)
    assert mid[0] > before[0] and mid[1] > before[1]
    tick()
    with open(p, "r+b") as f:             # ftruncate to the same size
        os.ftruncate(f.fileno(), 100)
    after = times(p)
    assert after[0] > mid[0] and after[1] > mid[1]


def test_attribute_changes_move_ctime_only(delafs_mount):
    need("setfattr")
    m = delafs_mount()
    p = m.path("f")
    open(p, "w").close()
    os.mkdir(m.path("d"))
    steps = [
        ("chmod", lambda: os.chmod(p, 0o600)),
        ("chown", lambda: os.chown(p, 1000, 1000)),
        ("setxattr", lambda: run(["setfattr", "-n", "user.k", "-v", "v", p])),
        ("removexattr", lambda: run(["setfattr", "-x", "user.k", p])),
        ("link", lambda: os.link(p, m.path("hard"))),
        ("rename", lambda: os.rename(m.path("hard"), m.path("d", "moved"))),
    ]
    for what, step in steps:
        before = times(p)
        tick()
        step()
        after = times(p)
        assert after[1] > before[1], f"{what} did not move ctime"
        assert after[0] == before[0], f"{what} moved mtime"


def test_editor_style_rewrites(delafs_mount):
    """sed -i writes a new file and renames it over the old one; an editor
    that saves in place truncates and rewrites.  Either way the new content
    alone remains, shorter than the old, and the times move."""
    m = delafs_mount(opts="dirty_expire=60")
    p = m.path("config")
    with open(p, "w") as f:
        f.write("option = a long value that will be replaced\n" * 50)
    before = times(p)
    tick()
    run(["sed", "-i", "s/a long value that will be replaced/short/", p])
    assert open(p).read() == "option = short\n" * 50
    assert times(p)[0] > before[0]
    tick()
    with open(p, "r+") as f:           # save in place: rewrite from the start, then truncate
        f.write("option = b\n")
        f.truncate()
    assert open(p).read() == "option = b\n"
    m.cycle()
    assert open(p).read() == "option = b\n"


def test_make_rebuilds_only_what_changed(delafs_mount):
    """make compares mtimes: a rewritten source is rebuilt, nothing else."""
    need("make", "cc")
    m = delafs_mount()
    src = m.path("p")
    os.mkdir(src)
    with open(os.path.join(src, "Makefile"), "w") as f:
        f.write("all: a.o b.o\n%.o: %.c\n\tcc -c $< -o $@\n")
    for n in "ab":
        with open(os.path.join(src, f"{n}.c"), "w") as f:
            f.write(f"int {n}(void) {{ return 1; }}\n")
    run(["make", "-C", src])
    assert "is up to date" in run(["make", "-C", src]).stdout or \
        "Nothing to be done" in run(["make", "-C", src]).stdout
    tick()
    sh("echo 'int a(void) { return 2; }' > a.c", src)   # an editor-style rewrite
    out = run(["make", "-C", src]).stdout
    assert "a.c" in out and "b.c" not in out, out
    m.cycle()
    out = run(["make", "-C", src]).stdout
    # (not just "cc": the random mount directory's name may hold it)
    assert "cc -c" not in out, f"after a remount make rebuilt:\n{out}"


def test_rsync_twice_copies_nothing_the_second_time(delafs_mount, source_tree):
    need("rsync")
    m = delafs_mount()
    dst = m.path("copy") + "/"
    run(["rsync", "-a", str(source_tree / "delafs") + "/", dst])
    second = run(["rsync", "-a", "--itemize-changes", str(source_tree / "delafs") + "/", dst])
    assert second.stdout.strip() == "", second.stdout
    m.cycle()
    third = run(["rsync", "-a", "--itemize-changes", str(source_tree / "delafs") + "/", dst])
    assert third.stdout.strip() == "", third.stdout


def test_tar_extract_over_an_existing_tree(delafs_mount, source_tree, tmp_path):
    """tar replaces files in place (open O_TRUNC): shorter new contents leave
    no old tail behind."""
    m = delafs_mount(opts="dirty_expire=60")
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "a").write_bytes(b"short\n")
    (tree / "b").write_bytes(b"1" * 3000)
    tarball = tmp_path / "t.tar"
    run(["tar", "-C", tmp_path, "-cf", tarball, "t"])
    os.mkdir(m.path("t"))
    with open(m.path("t", "a"), "wb") as f:
        f.write(b"a much longer previous content\n" * 200)
    with open(m.path("t", "b"), "wb") as f:
        f.write(b"2" * 9000)
    run(["tar", "--overwrite", "-C", m.mnt, "-xf", tarball])
    assert open(m.path("t", "a"), "rb").read() == b"short\n"
    assert open(m.path("t", "b"), "rb").read() == b"1" * 3000
    m.cycle()
    assert open(m.path("t", "a"), "rb").read() == b"short\n"


# ======================================================================================
# O_DIRECT writes and the kernel's page cache
# ======================================================================================

@pytest.mark.parametrize("opts", ["", "writeback_cache"])
def test_buffered_read_after_async_direct_write_sees_new_data(delafs_mount, opts):
    """fio writes with libaio + O_DIRECT over a range that a buffered reader
    keeps reading.  The kernel drops its cached pages when the direct write
    is submitted, but nothing when an asynchronous one completes: pages the
    reader cached meanwhile hold the old data.  ``delay_write`` holds the
    write in the daemon so that the reader always gets in between."""
    need("fio")
    import threading
    m = delafs_mount(opts=opts)
    p = m.path("f")
    size = 256 << 10
    with open(p, "wb") as f:
        f.write(b"\xaa" * size)
        f.flush()
        os.fsync(f.fileno())
    m.inject(delay_write=500)
    stop = threading.Event()
    reads = []

    def reader():
        with open(p, "rb") as f:
            while not stop.is_set():
                reads.append(os.pread(f.fileno(), size, 0)[:1])
                time.sleep(0.01)
    t = threading.Thread(target=reader)
    t.start()
    try:
        run(["fio", "--name=adio", f"--filename={p}", "--ioengine=libaio", "--direct=1",
             "--rw=write", "--bs=64k", "--size=64k", "--iodepth=1", "--buffer_pattern=0x55",
             "--minimal"])
    finally:
        stop.set()
        t.join()
    m.inject(delay_write=0)
    assert b"\xaa" in reads, "the reader never read while the direct write was in flight"
    with open(p, "rb") as f:
        data = f.read()
    assert data[:64 << 10] == b"\x55" * (64 << 10), "a buffered read after the direct write returned stale data"
    assert data[64 << 10:] == b"\xaa" * (size - (64 << 10))


# ======================================================================================
# Values that cannot be stored
# ======================================================================================

# The on-disk time is signed 64-bit nanoseconds since the epoch
# (docs/ondisk.md): 1677-09-21T00:12:43.145224192Z .. 2262-04-11T23:47:16.854775807Z.
TIME_MAX_NS = 2**63 - 1
TIME_MIN_NS = -2**63


@pytest.mark.parametrize("where", ["file", "root"])
def test_touch_far_future_is_clamped_not_a_shutdown(delafs_mount, where):
    m = delafs_mount()
    p = m.path("f") if where == "file" else m.mnt
    os.mkdir(m.path("sub"))
    if where == "file":
        open(p, "w").close()
    r = run(["touch", "-d", "May 30 2514", p], check=False)
    assert r.returncode == 0, r.stderr
    assert os.stat(p).st_mtime_ns == TIME_MAX_NS
    # The filesystem still works, and what stat showed is what was stored.
    with open(m.path("sub", "after"), "w") as f:
        f.write("still alive")
    m.cycle()
    assert os.stat(p).st_mtime_ns == TIME_MAX_NS
    assert open(m.path("sub", "after")).read() == "still alive"


def test_times_before_1970_and_the_far_past_round_trip(delafs_mount):
    m = delafs_mount()
    p = m.path("f")
    open(p, "w").close()
    run(["touch", "-d", "1901-12-13 20:45:52.222222222 UTC", p])
    old = os.stat(p).st_mtime_ns
    assert old == -2147483647777777778
    q = m.path("g")
    open(q, "w").close()
    run(["touch", "-d", "1000-01-01 UTC", q])
    assert os.stat(q).st_mtime_ns == TIME_MIN_NS
    m.cycle()
    assert os.stat(p).st_mtime_ns == old
    assert os.stat(q).st_mtime_ns == TIME_MIN_NS


def test_sizes_beyond_the_limit_get_efbig(delafs_mount):
    m = delafs_mount()
    p = m.path("f")
    open(p, "w").close()
    r = run(["truncate", "-s", "8E", p], check=False)    # 2**63 bytes: the kernel refuses
    assert r.returncode != 0
    with pytest.raises(OSError) as e:
        os.truncate(p, 2**62)
    assert e.value.errno == 27      # EFBIG
    with open(p, "w") as f:
        f.write("ok")
    m.cycle()
    assert os.stat(p).st_size == 2


# ======================================================================================
# POSIX ACLs (-o acl: the kernel enforces them, the daemon stores and inherits them)
# ======================================================================================

def getfacl(path: str) -> list[str]:
    return run(["getfacl", "-n", "-c", "-p", path]).stdout.split()


def test_default_acl_is_inherited(delafs_mount):
    need("setfacl", "getfacl")
    m = delafs_mount(opts="allow_other,acl")
    d = m.path("d")
    os.mkdir(d)
    run(["setfacl", "-d", "-m", "u::rwx,u:65534:rwx,g::rwx,m::rwx,o::rx", d])
    # umask 0: the kernel applies the umask before the daemon sees the mode
    # (no FUSE_DONT_MASK through pyfuse3), so only without one is the
    # result the same as on a local filesystem.
    sh("umask 0; touch f; mkdir sub; mknod fifo p; ln -s f link", d)
    f_acl = getfacl(os.path.join(d, "f"))
    assert "user:65534:rwx" in " ".join(f_acl) and "mask::rw-" in f_acl, f_acl
    assert stat.S_IMODE(os.stat(os.path.join(d, "f")).st_mode) == 0o664
    sub = os.path.join(d, "sub")
    assert stat.S_IMODE(os.stat(sub).st_mode) == 0o775
    assert "default:user:65534:rwx" in getfacl(sub)
    assert "mask::rw-" in getfacl(os.path.join(d, "fifo"))
    # The inherited ACL is enforced: nobody may write f through user:65534.
    r = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "sh", "-c", f"echo hi >> {os.path.join(d, 'f')}"], check=False)
    assert r.returncode == 0, r.stderr
    want = {p: getfacl(os.path.join(d, p)) for p in ("f", "sub", "fifo")}
    m.cycle("allow_other,acl")
    assert {p: getfacl(os.path.join(d, p)) for p in want} == want


def test_setting_an_acl_clears_sgid_for_a_caller_outside_the_group(delafs_mount):
    """posix_acl_update_mode(): the file's owner, not in its group and
    without CAP_FSETID, sets an ACL: the setgid bit goes."""
    need("setfacl", "setpriv")
    m = delafs_mount(opts="allow_other,acl")
    f = m.path("f")
    open(f, "w").close()
    os.chown(f, 65534, 0)
    os.chmod(f, 0o2775)
    r = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "setfacl", "-m", "u:1:rwx", f], check=False)
    assert r.returncode == 0, r.stderr
    assert not os.stat(f).st_mode & stat.S_ISGID
    # root (CAP_FSETID) keeps it
    os.chmod(f, 0o2775)
    run(["setfacl", "-m", "u:2:rwx", f])
    assert os.stat(f).st_mode & stat.S_ISGID


def as_nobody(*cmd: str) -> subprocess.CompletedProcess:
    return run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd], check=False)


@pytest.mark.parametrize("opts", ["", "writeback_cache"])
def test_o_trunc_by_another_user_clears_setuid_and_setgid(delafs_mount, opts):
    """`: > file` by a user without CAP_FSETID clears S_ISUID and S_ISGID
    (with group execute), as truncate(2) and write(2) do.  With atomic
    O_TRUNC the kernel drops the mode change it would otherwise send, so
    the daemon's OPEN must do it; it did not (mode stayed 6777)."""
    need("setpriv")
    m = delafs_mount(opts=",".join(filter(None, ["allow_other", opts])))
    f = m.path("sx")
    with open(f, "w") as fh:
        fh.write("hello")
    os.chown(f, 65534, 65534)
    os.chmod(f, 0o6777)
    r = as_nobody("sh", "-c", f": > {f}")
    assert r.returncode == 0, r.stderr
    st = os.stat(f)
    assert (stat.S_IMODE(st.st_mode), st.st_size) == (0o777, 0)
    os.chmod(f, 0o6777)
    with open(f, "w"):                      # root has CAP_FSETID: the bits stay
        pass
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o6777
    m.cycle()
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o6777


def test_chown_to_the_same_owner_moves_ctime(delafs_mount):
    """chown(f, -1, -1) changes nothing but ctime (notify_change with
    ATTR_CTIME); without writeback_cache FUSE sends a SETATTR with no field
    set, which the daemon answered without stamping anything."""
    m = delafs_mount()
    f = m.path("f")
    open(f, "w").close()
    before = os.stat(f).st_ctime_ns
    time.sleep(0.01)
    os.chown(f, -1, -1)
    assert os.stat(f).st_ctime_ns > before


def test_acls_are_refused_without_the_acl_option(delafs_mount):
    """Without -o acl the kernel does not enforce system.posix_acl_*
    (FUSE_POSIX_ACL is not negotiated): storing one would tell the user
    access is restricted when it is not.  ext4 mounted noacl refuses it
    (EOPNOTSUPP); delafs stored it, changed the mode and enforced nothing."""
    need("setfacl", "getfacl", "setpriv")
    m = delafs_mount(opts="allow_other")
    f = m.path("deny")
    with open(f, "w") as fh:
        fh.write("data")
    os.chmod(f, 0o666)
    r = run(["setfacl", "-m", "u:65534:---", f], check=False)
    assert r.returncode != 0 and "not supported" in r.stderr, (r.returncode, r.stderr)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o666
    assert [n for n in os.listxattr(f) if n.startswith("system.")] == []
    with pytest.raises(OSError) as e:
        os.getxattr(f, "system.posix_acl_access")
    assert e.value.errno in (errno.EOPNOTSUPP, errno.ENODATA)


def test_xattr_names_follow_the_namespaces(delafs_mount):
    """As ext4: an unknown namespace is EOPNOTSUPP, an empty name in a
    known one EINVAL; trusted.* names are listed only to CAP_SYS_ADMIN;
    the control file answers xattr calls without an error (ls -l asks)."""
    need("setpriv")
    m = delafs_mount(opts="allow_other")
    f = m.path("x")
    open(f, "w").close()
    os.chmod(f, 0o666)
    for name, err in [("foo.bar", errno.EOPNOTSUPP), ("user", errno.EOPNOTSUPP),
                      ("user.", errno.EINVAL), ("system.nonsense", errno.EOPNOTSUPP)]:
        with pytest.raises(OSError) as e:
            os.setxattr(f, name, b"v")
        assert e.value.errno == err, (name, e.value)
    os.setxattr(f, "user.pub", b"1")
    os.setxattr(f, "trusted.secret", b"2")
    assert sorted(os.listxattr(f)) == ["trusted.secret", "user.pub"]
    r = as_nobody(sys.executable, "-c", f"import os; print(sorted(os.listxattr({f!r})))")
    assert r.returncode == 0 and r.stdout.strip() == "['user.pub']", (r.stdout, r.stderr)
    control = m.path(".delafs-control")
    assert os.listxattr(control) == []
    with pytest.raises(OSError) as e:
        os.getxattr(control, "user.x")
    assert e.value.errno == errno.ENODATA
    r = run(["ls", "-la", m.mnt], check=False)
    assert r.returncode == 0 and r.stderr == "", r.stderr


# ======================================================================================
# atime: the kernel leaves it to the daemon (it only invalidates its cached
# atime after a READ or READDIR reached the daemon)
# ======================================================================================

def atime(path: str) -> int:
    return os.stat(path).st_atime_ns


@pytest.mark.parametrize("opts", ["", "relatime", "strictatime", "noatime", "nodiratime"])
def test_atime_policies(delafs_mount, opts):
    m = delafs_mount(opts=opts)
    p = m.path("f")
    d = m.path("d")
    os.mkdir(d)
    with open(p, "w") as f:
        f.write("data")
    before, dbefore = atime(p), atime(d)
    tick()
    open(p).read()
    os.listdir(d)
    first, dfirst = atime(p), atime(d)
    if opts == "noatime":
        assert (first, dfirst) == (before, dbefore)
        return
    assert first > before, "a first read after a write must move atime"
    assert (dfirst > dbefore) == (opts != "nodiratime")
    tick()
    open(p).read()                       # atime is now newer than mtime/ctime
    second = atime(p)
    assert (second > first) == (opts == "strictatime"), (first, second)
    m.cycle(opts)
    assert atime(p) == second, "atime did not persist"



FIO_MIXED = """
[global]
bs=8k
iodepth=16
iodepth_batch=8
randrepeat=1
size=256k
directory={dir}
numjobs=2
[job1]
ioengine=sync
bs=4k
direct=1
rw=randread
filename=file1:file2
[job2]
ioengine=libaio
rw=randwrite
direct=1
filename=file1:file2
[job3]
bs=4k
ioengine=posixaio
rw=randwrite
direct=1
filename=file1:file2
[job5]
bs=1k
ioengine=sync
rw=randread
filename=file1:file2
[job6]
ioengine=posixaio
rw=randwrite
filename=file1:file2
[job8]
ioengine=mmap
rw=randwrite
bs=1k
filename=file1:file2
[job9]
ioengine=mmap
rw=randwrite
direct=1
filename=file1:file2
"""


@pytest.mark.parametrize("opts", ["", "writeback_cache"])
def test_mixed_mmap_buffered_and_direct_io_does_not_deadlock(delafs_mount, tmp_path, opts):
    """generic/095's mix: the kernel's invalidation after a direct write
    can wait for pages that wait for that very WRITE's reply.  Every fio
    job must finish, and the daemon must still answer."""
    need("fio")
    m = delafs_mount(opts=opts)
    cfg = tmp_path / "mixed.fio"
    cfg.write_text(FIO_MIXED.format(dir=m.mnt))
    try:
        run(["fio", str(cfg), "--ignore_error=,EIO", "--output", str(tmp_path / "fio.out")], timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("fio did not finish in 120 s: the daemon deadlocked against the kernel")
    vfs = m.stat()["vfs"]
    assert vfs["invalidations"] > 0
    # Writes that land while an invalidation of their inode runs share the
    # next one (fuse/invalidate.py): fewer invalidations run than asked for.
    assert vfs["invalidations_run"] < vfs["invalidations"], vfs
    m.cycle(opts)
