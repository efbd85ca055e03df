"""Real programs on a real delafs mount.

Every test works on a fresh image, then verifies after ``delafs umount``,
a clean ``delafs fsck -n`` and a remount (``m.cycle()``): what the kernel's
page cache showed while mounted proves nothing about what reached the
image.  The last group covers ``delafs mount`` itself: its failure modes,
the mount(8) helper, SIGTERM, plain umount(8), and mounting after a crash.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import textwrap
import threading
import time

import pytest

from .conftest import (
    DELAFS,
    PYTHON,
    is_mounted,
    manifest,
    manifest_diff,
    pid_alive,
    run,
    wait_until,
)

GIT = ["git", "-c", "user.name=delafs test", "-c", "user.email=test@delafs.invalid",
       "-c", "init.defaultBranch=main", "-c", "gc.auto=0"]


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def as_nobody(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd], check=False, **kw)


# ======================================================================================
# Copying trees: cp, tar, rsync
# ======================================================================================

def test_cp_a_tree(delafs_mount, source_tree):
    m = delafs_mount()
    run(["cp", "-a", source_tree / "delafs", source_tree / "trio", m.mnt])
    want = {name: manifest(source_tree / name) for name in ("delafs", "trio")}

    def check():
        for name, man in want.items():
            run(["diff", "-r", source_tree / name, m.path(name)])
            # Modes, owners and mtimes too (cp -a copies the mode through
            # system.posix_acl_access: the daemon must turn it into the mode).
            assert manifest_diff(man, manifest(m.path(name))) == []

    check()
    m.cycle()
    check()


def test_tar_create_and_extract(delafs_mount, source_tree):
    m = delafs_mount()
    tarball = m.path("src.tar")
    # pax format: nanosecond mtimes, so the extracted tree matches exactly.
    run(["tar", "-C", source_tree, "--format=posix", "-cf", tarball, "delafs", "trio"])
    os.mkdir(m.path("x"))
    run(["tar", "-C", m.path("x"), "-xpf", tarball])

    def check():
        for name in ("delafs", "trio"):
            run(["diff", "-r", source_tree / name, m.path("x", name)])
            assert manifest_diff(manifest(source_tree / name), manifest(m.path("x", name))) == []
        # tar's own view: the archive (read back from the image) against the tree.
        run(["tar", "-C", m.path("x"), "--compare", "-f", tarball])
        run(["tar", "-C", source_tree, "--compare", "-f", tarball])

    check()
    m.cycle()
    check()
    # A second tarball made from the mount is byte-identical to one made from the source.
    run(["tar", "-C", m.path("x"), "--sort=name", "--mtime=@0", "--owner=0", "--group=0",
         "-cf", m.path("again.tar"), "trio"])
    ref = source_tree.parent / "ref.tar"
    run(["tar", "-C", source_tree, "--sort=name", "--mtime=@0", "--owner=0", "--group=0",
         "-cf", ref, "trio"])
    assert sha256(m.path("again.tar")) == sha256(str(ref))


def _getfacl(path: str) -> str:
    return run(["getfacl", "-n", "-c", "-p", path]).stdout


def test_rsync_hard_links_xattrs_acls_symlinks(delafs_mount, tmp_path):
    """rsync -aHAX onto a mount with ``-o acl``: ACLs round-trip as
    system.posix_acl_* xattrs (the daemon keeps the mode in step with the
    access ACL).  Without the option they are refused, as on ext4 mounted
    noacl (test_acls_are_refused_without_the_acl_option)."""
    need("rsync", "setfacl", "getfacl")
    src = tmp_path / "rs"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"alpha\n" * 1000)
    (src / "big.bin").write_bytes(random.Random(1).randbytes(3 << 20))
    os.link(src / "a.txt", src / "sub" / "a-link.txt")
    os.symlink("../a.txt", src / "sub" / "sym")
    os.symlink("does/not/exist", src / "dangling")
    os.setxattr(src / "a.txt", "user.colour", b"blue")
    os.setxattr(src / "sub", "user.kind", b"directory")
    os.setxattr(src / "big.bin", "user.empty", b"")
    os.chmod(src / "big.bin", 0o640)
    run(["setfacl", "-m", "u:65534:rw,g:65534:r", src / "big.bin"])
    run(["setfacl", "-d", "-m", "u:65534:rwx", src / "sub"])
    os.utime(src / "a.txt", ns=(1_000_000_123, 2_000_000_456))
    # Directory times far from now: rsync leaves a directory's mtime alone
    # when it looks the same to the second, and the copy's directories are
    # created within the second the source's were often enough (twice in CI).
    os.utime(src / "sub", ns=(3_000_000_789, 4_000_000_321))
    os.utime(src, ns=(5_000_000_987, 6_000_000_654))

    m = delafs_mount(opts="acl")
    dst = m.path("dst")
    run(["rsync", "-aHAX", f"{src}/", f"{dst}/"])

    def check():
        sa, sl = os.stat(os.path.join(dst, "a.txt")), os.stat(os.path.join(dst, "sub", "a-link.txt"))
        assert sa.st_ino == sl.st_ino and sa.st_nlink == 2
        assert os.readlink(os.path.join(dst, "sub", "sym")) == "../a.txt"
        assert os.readlink(os.path.join(dst, "dangling")) == "does/not/exist"
        assert os.getxattr(os.path.join(dst, "a.txt"), "user.colour") == b"blue"
        assert os.getxattr(os.path.join(dst, "sub"), "user.kind") == b"directory"
        assert os.getxattr(os.path.join(dst, "big.bin"), "user.empty") == b""
        assert os.stat(os.path.join(dst, "a.txt")).st_mtime_ns == 2_000_000_456
        for rel in ("big.bin", "sub", "a.txt"):
            assert _getfacl(os.path.join(dst, rel)) == _getfacl(str(src / rel)), rel
        # The ACL's mask is the group bits of the mode, as on the source.
        assert stat.S_IMODE(os.stat(os.path.join(dst, "big.bin")).st_mode) == \
            stat.S_IMODE(os.stat(src / "big.bin").st_mode) == 0o660
        assert manifest_diff(manifest(src), manifest(dst)) == []
        # rsync itself finds nothing to do.
        out = run(["rsync", "-aHAX", "--dry-run", "--itemize-changes", f"{src}/", f"{dst}/"]).stdout
        assert out.strip() == "", out

    check()
    m.cycle()
    check()


def test_posix_acls(delafs_mount):
    """With ``-o acl`` (FUSE_POSIX_ACL) the kernel enforces the ACLs the
    daemon stores and keeps in step with the mode.  Without it they are
    refused, as on ext4 mounted noacl: the kernel would enforce nothing
    (test_posix.py::test_acls_are_refused_without_the_acl_option)."""
    need("setfacl", "getfacl", "setpriv")
    m = delafs_mount(size="64M", opts="allow_other,acl")
    f = m.path("f")
    with open(f, "w") as fh:
        fh.write("x")
    os.chmod(f, 0o600)
    run(["setfacl", "-m", "u:65534:rw", f])
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o660          # group bits = the mask
    assert "user:65534:rw-" in _getfacl(f)
    os.chmod(f, 0o640)                                           # chmod rewrites the mask
    assert "mask::r--" in _getfacl(f)
    assert as_nobody("sh", "-c", f"echo y >> {f}").returncode != 0     # the mask limits it
    run(["setfacl", "-m", "m::rw", f])
    assert as_nobody("sh", "-c", f"echo y >> {f}").returncode == 0     # the named entry grants
    run(["setfacl", "-b", f])                                    # back to a plain mode
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    with pytest.raises(OSError) as e:
        os.getxattr(f, "system.posix_acl_access")
    assert e.value.errno == errno.ENODATA
    run(["setfacl", "-m", "u:65534:r", f])
    m.cycle()
    assert "user:65534:r--" in _getfacl(f)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640


# ======================================================================================
# git, sqlite, python, fio
# ======================================================================================

def test_git_init_commit_clone_fsck(delafs_mount, source_tree):
    need("git")
    m = delafs_mount()
    repo, clone = m.path("repo"), m.path("clone")
    run(["cp", "-a", source_tree / "delafs", repo])
    run(GIT + ["init", "-q", repo])
    run(GIT + ["-C", repo, "add", "-A"])
    run(GIT + ["-C", repo, "commit", "-q", "-m", "first"])
    with open(os.path.join(repo, "NEW.txt"), "w") as f:
        f.write("second commit\n" * 100)
    os.unlink(os.path.join(repo, "__init__.py"))
    run(GIT + ["-C", repo, "add", "-A"])
    run(GIT + ["-C", repo, "commit", "-q", "-m", "second"])
    run(GIT + ["-C", repo, "gc", "-q"])                 # packs, renames, deletes loose objects
    run(GIT + ["clone", "-q", repo, clone])
    head = run(GIT + ["-C", repo, "rev-parse", "HEAD"]).stdout

    def check():
        for r in (repo, clone):
            run(GIT + ["-C", r, "fsck", "--full", "--strict"])
            assert run(GIT + ["-C", r, "rev-parse", "HEAD"]).stdout == head
            assert run(GIT + ["-C", r, "status", "--porcelain"]).stdout == ""
            assert len(run(GIT + ["-C", r, "log", "--oneline"]).stdout.splitlines()) == 2
        run(["diff", "-r", "-x", ".git", repo, clone])

    check()
    m.cycle()
    check()


def test_sqlite_transactions(delafs_mount):
    """A few thousand transactions: rollback-journal ones (each creates,
    fsyncs and deletes a journal), WAL ones, and big batches."""
    need("sqlite3")
    m = delafs_mount()
    db = m.path("t.db")
    rng = random.Random(7)
    sql = ["create table t(id integer primary key, k integer, v text);", "create index tk on t(k);"]
    sql += [f"insert into t(k, v) values({rng.randrange(1000)}, '{'r' * rng.randrange(300)}');"
            for _ in range(60)]
    sql += ["pragma journal_mode=wal;", "pragma synchronous=normal;"]
    sql += [f"insert into t(k, v) values({rng.randrange(1000)}, '{'w' * rng.randrange(300)}');"
            for _ in range(2000)]
    sql += ["begin;"] + [f"insert into t(k, v) values({i % 977}, 'batch {i}');" for i in range(20000)] + ["commit;"]
    sql += ["update t set v = v || '+' where id % 7 = 0;", "delete from t where id % 11 = 0;",
            "pragma wal_checkpoint(truncate);"]
    t0 = time.monotonic()
    run(["sqlite3", db], input="\n".join(sql) + "\n", timeout=120)
    elapsed = time.monotonic() - t0
    q = "pragma integrity_check; select count(*), sum(k), sum(length(v)) from t;"
    before = run(["sqlite3", db, q]).stdout
    assert before.splitlines()[0] == "ok", before
    m.cycle()
    after = run(["sqlite3", db, q]).stdout
    assert after == before
    run(["sqlite3", db, "pragma journal_mode=delete; insert into t(k, v) values(1, 'after remount');"])
    assert run(["sqlite3", db, "pragma integrity_check;"]).stdout.strip() == "ok"
    print(f"sqlite: {len(sql)} statements in {elapsed:.1f} s")


def test_python_compileall_and_import(delafs_mount, source_tree):
    m = delafs_mount()
    run(["rsync", "-a", "--exclude", "__pycache__", f"{source_tree / 'trio'}/", m.path("trio") + "/"]) \
        if shutil.which("rsync") else run(["cp", "-a", source_tree / "trio", m.path("trio")])
    for d, _, _ in os.walk(m.path("trio")):
        if os.path.basename(d) == "__pycache__":
            shutil.rmtree(d)
    run([PYTHON, "-m", "compileall", "-q", m.path("trio")])
    pycs = sorted(os.path.relpath(os.path.join(d, f), m.mnt)
                  for d, _, fs in os.walk(m.mnt) for f in fs if f.endswith(".pyc"))
    assert len(pycs) > 50
    code = "import sys, trio; assert trio.__file__.startswith(sys.argv[1]), trio.__file__; " \
           "print(trio.run(lambda: trio.sleep(0)) is None)"
    env = dict(os.environ, PYTHONPATH=m.mnt, PYTHONDONTWRITEBYTECODE="1")
    assert run([PYTHON, "-c", code, m.mnt], env=env).stdout.strip() == "True"
    m.cycle()
    assert sorted(os.path.relpath(os.path.join(d, f), m.mnt)
                  for d, _, fs in os.walk(m.mnt) for f in fs if f.endswith(".pyc")) == pycs
    # The cached bytecode is still valid (compileall -q recompiles nothing it
    # can check as current; import runs from the pycs).
    out = run([PYTHON, "-m", "compileall", m.path("trio")]).stdout
    assert "Compiling" not in out, out
    assert run([PYTHON, "-c", code, m.mnt], env=env).stdout.strip() == "True"


def test_fio_randrw_verify(delafs_mount, tmp_path):
    need("fio")
    m = delafs_mount()
    fio = ["fio", "--ioengine=psync", "--bs=4k", "--verify=crc32c", "--group_reporting", f"--directory={m.mnt}"]
    # A short mixed random read/write run that verifies what it wrote.
    out = run(fio + ["--name=mixed", "--size=32M", "--rw=randrw", "--runtime=3", "--time_based"],
              timeout=180, cwd=tmp_path).stdout          # cwd: fio drops *-verify.state files there
    assert "err= 0" in out, out
    # A random write pass over every block of a file (verified in the same
    # run), verified again from the image after the remount.
    job = fio + ["--name=rw", "--size=16M", "--rw=randwrite", "--randseed=1234"]
    assert "err= 0" in run(job, timeout=180, cwd=tmp_path).stdout
    m.cycle()
    assert "err= 0" in run(job + ["--verify_only"], timeout=180, cwd=tmp_path).stdout


def test_append_while_reading(delafs_mount):
    """One process appends lines (O_APPEND) while another follows the file
    tail -f style; the reader must see every line, in order.  tail -f
    itself follows the file too."""
    m = delafs_mount()
    log = m.path("app.log")
    open(log, "w").close()
    nlines = 3000
    writer = textwrap.dedent(f"""
        import os, time
        fd = os.open({log!r}, os.O_WRONLY | os.O_APPEND)
        for i in range({nlines}):
            os.write(fd, b"line %06d %s\\n" % (i, b"x" * (i % 97)))
            if i % 200 == 0:
                time.sleep(0.02)
        os.write(fd, b"END\\n")
        os.close(fd)
    """)
    reader = textwrap.dedent(f"""
        import os, sys, time
        fd = os.open({log!r}, os.O_RDONLY)
        buf, pos, deadline = b"", 0, time.monotonic() + 120
        while time.monotonic() < deadline:
            chunk = os.pread(fd, 65536, pos)
            if not chunk:
                if buf.endswith(b"END\\n") or b"\\nEND\\n" in buf:
                    break
                time.sleep(0.005)
                continue
            pos += len(chunk)
            buf += chunk
        sys.stdout.buffer.write(buf)
    """)
    r = subprocess.Popen([PYTHON, "-c", reader], stdout=subprocess.PIPE)
    w = subprocess.Popen([PYTHON, "-c", writer])
    tail = subprocess.Popen(["tail", "-n", "+1", "-s", "0.1", "-f", f"--pid={w.pid}", log],
                            stdout=subprocess.PIPE)
    assert w.wait(timeout=120) == 0
    seen = r.communicate(timeout=120)[0]
    tailed = tail.communicate(timeout=60)[0]
    expected = b"".join(b"line %06d %s\n" % (i, b"x" * (i % 97)) for i in range(nlines)) + b"END\n"
    assert seen == expected
    assert tailed == expected
    m.cycle()
    with open(log, "rb") as f:
        assert f.read() == expected


# ======================================================================================
# POSIX corners
# ======================================================================================

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: str, new: str, flags: int) -> None:
    AT_FDCWD = -100
    if _libc.renameat2(AT_FDCWD, old.encode(), AT_FDCWD, new.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old)


def _mv_exchange() -> bool:
    r = subprocess.run(["mv", "--help"], capture_output=True, text=True)
    return "--exchange" in r.stdout


def test_special_files_rename_exchange_excl(delafs_mount):
    m = delafs_mount()
    p = m.path
    # mknod: fifo, character and block devices (as root), a socket.
    os.mkfifo(p("fifo"), 0o640)
    run(["mknod", "-m", "0600", p("null"), "c", "1", "3"])
    run(["mknod", p("loop"), "b", "7", "0"])
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(p("sock"))
    sock.close()
    # A FIFO on the mount is a working pipe.
    got = []
    t = threading.Thread(target=lambda: got.append(open(p("fifo"), "rb").read()))
    t.start()
    with open(p("fifo"), "wb") as f:
        f.write(b"through the fifo")
    t.join(10)
    assert got == [b"through the fifo"]

    # RENAME_EXCHANGE: files, directories, a file with a directory.
    for name, data in (("a", b"AAA"), ("b", b"BBBBBB")):
        with open(p(name), "wb") as f:
            f.write(data)
    os.makedirs(p("d1", "in1"))
    os.makedirs(p("d2"))
    ino = {n: os.lstat(p(n)).st_ino for n in ("a", "b", "d1", "d2")}
    if _mv_exchange():
        run(["mv", "--exchange", p("a"), p("b")])
    else:
        renameat2(p("a"), p("b"), RENAME_EXCHANGE)
    renameat2(p("d1"), p("d2"), RENAME_EXCHANGE)
    renameat2(p("a"), p("d1"), RENAME_EXCHANGE)        # a is now the dir that was d2
    with pytest.raises(OSError) as e:
        renameat2(p("b"), p("d2"), RENAME_NOREPLACE)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(OSError) as e:
        renameat2(p("b"), p("nonexistent"), RENAME_EXCHANGE)
    assert e.value.errno == errno.ENOENT

    # O_EXCL and friends.
    with pytest.raises(FileExistsError):
        os.open(p("b"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.symlink("dangling-target", p("dangling"))
    with pytest.raises(FileExistsError):
        os.open(p("dangling"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    assert not os.path.lexists(p("dangling-target"))
    with pytest.raises(FileExistsError):
        os.mkdir(p("d2"))
    with pytest.raises(FileExistsError):
        os.link(p("b"), p("d1"))
    fd = os.open(p("fresh"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)

    def check():
        assert stat.S_ISFIFO(os.lstat(p("fifo")).st_mode)
        assert stat.S_IMODE(os.lstat(p("fifo")).st_mode) == 0o640
        s = os.lstat(p("null"))
        assert stat.S_ISCHR(s.st_mode) and (os.major(s.st_rdev), os.minor(s.st_rdev)) == (1, 3)
        s = os.lstat(p("loop"))
        assert stat.S_ISBLK(s.st_mode) and (os.major(s.st_rdev), os.minor(s.st_rdev)) == (7, 0)
        assert stat.S_ISSOCK(os.lstat(p("sock")).st_mode)
        with open(p("b"), "rb") as f:
            assert f.read() == b"AAA"
        with open(p("d1"), "rb") as f:
            assert f.read() == b"BBBBBB"                 # the old b, swapped with the old d2
        assert os.path.isdir(p("a")) and os.listdir(p("a")) == []
        assert os.listdir(p("d2")) == ["in1"]
        assert os.lstat(p("b")).st_ino == ino["a"] and os.lstat(p("d1")).st_ino == ino["b"]
        assert os.lstat(p("a")).st_ino == ino["d2"] and os.lstat(p("d2")).st_ino == ino["d1"]
        assert os.stat(p("d2", "in1", "..")).st_ino == ino["d1"]
        assert os.readlink(p("dangling")) == "dangling-target"

    check()
    m.cycle()
    check()


def test_rename_exchange_moves_both_directories_mtime_and_long_names_are_enametoolong(delafs_mount):
    """ext4 and XFS stamp mtime and ctime on both directories of an
    exchange (their entries changed); delafs stamped only ctime.  A name
    longer than 255 bytes reaches the daemon in a LOOKUP (the kernel only
    stops names past 1,024): stat, open and unlink must say ENAMETOOLONG,
    as ext4 does, not ENOENT."""
    m = delafs_mount()
    p = m.path
    for d in ("A", "B"):
        os.mkdir(p(d))
        with open(p(d, "x"), "wb") as f:
            f.write(d.encode())
    before = {d: os.stat(p(d)) for d in ("A", "B")}
    time.sleep(0.01)
    renameat2(p("A", "x"), p("B", "x"), RENAME_EXCHANGE)
    for d in ("A", "B"):
        after = os.stat(p(d))
        assert after.st_mtime_ns > before[d].st_mtime_ns, d
        assert after.st_ctime_ns > before[d].st_ctime_ns, d
    assert open(p("A", "x"), "rb").read() == b"B"
    long = "n" * 300
    for call in (os.stat, os.unlink, lambda path: open(path, "rb")):
        with pytest.raises(OSError) as e:
            call(p(long))
        assert e.value.errno == errno.ENAMETOOLONG, call
    m.umount()
    m.fsck()


def test_open_unlinked_file_survives_until_close(delafs_mount):
    m = delafs_mount(size="64M")
    data = random.Random(3).randbytes(8 << 20)
    path = m.path("victim")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
        free_before_unlink = os.statvfs(m.mnt).f_bfree
        os.unlink(path)
        assert not os.path.exists(path)
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, len(data), 0) == data
        os.pwrite(fd, b"still writable", 100)
        os.fsync(fd)
        assert os.pread(fd, 14, 100) == b"still writable"
        # Its blocks stay in use while it is open.
        assert os.statvfs(m.mnt).f_bfree < free_before_unlink + 256
    finally:
        os.close(fd)
    # Freed once the last reference goes (the kernel's FORGET/RELEASE).
    assert wait_until(lambda: os.statvfs(m.mnt).f_bfree >= free_before_unlink + 2000, 30), \
        (os.statvfs(m.mnt).f_bfree, free_before_unlink)
    m.cycle()
    assert os.listdir(m.mnt) == [] or os.listdir(m.mnt) == [".delafs-control"]


def test_setuid_cleared_on_write_by_other_user(delafs_mount):
    """A write by a user without CAP_FSETID kills S_ISUID (and S_ISGID with
    group exec): the kernel does it by sending us a SETATTR of the mode."""
    need("setpriv")
    m = delafs_mount(size="64M", opts="allow_other")
    for name, mode in (("suid", 0o4777), ("sgid", 0o2777), ("both", 0o6777)):
        with open(m.path(name), "w") as f:
            f.write("root wrote this\n")
        os.chmod(m.path(name), mode)
        assert stat.S_IMODE(os.stat(m.path(name)).st_mode) == mode
        r = as_nobody("sh", "-c", f"echo nobody >> {m.path(name)}")
        assert r.returncode == 0, r.stderr
        assert stat.S_IMODE(os.stat(m.path(name)).st_mode) == 0o777, name
    # Root writing (CAP_FSETID) keeps the bit.
    os.chmod(m.path("suid"), 0o4755)
    with open(m.path("suid"), "a") as f:
        f.write("root again\n")
    assert stat.S_IMODE(os.stat(m.path("suid")).st_mode) == 0o4755
    m.cycle()
    assert stat.S_IMODE(os.stat(m.path("suid")).st_mode) == 0o4755
    for name in ("sgid", "both"):
        assert stat.S_IMODE(os.stat(m.path(name)).st_mode) == 0o777
        with open(m.path(name)) as f:
            assert f.read() == "root wrote this\nnobody\n"


def test_chown_chmod_utime_statfs(delafs_mount):
    m = delafs_mount()
    p = m.path
    os.mkdir(p("dir"))
    with open(p("dir", "f"), "wb") as f:
        f.write(b"x" * 5000)
    os.symlink("f", p("dir", "link"))
    os.chown(p("dir", "f"), 1234, 5678)
    os.lchown(p("dir", "link"), 4321, 8765)
    os.chmod(p("dir", "f"), 0o1640)
    os.chmod(p("dir"), 0o2751)
    os.utime(p("dir", "f"), ns=(1_111_111_111_123_456_789, 1_222_222_222_987_654_321))
    os.utime(p("dir"), ns=(1_000_000_000_000_000_001, 1_000_000_000_000_000_002))
    os.utime(p("dir", "link"), ns=(5_000_000_007, 6_000_000_008), follow_symlinks=False)
    run(["touch", "-a", "-d", "@981173106.5", p("dir", "f")])

    def check():
        s = os.lstat(p("dir", "f"))
        assert (s.st_uid, s.st_gid, stat.S_IMODE(s.st_mode)) == (1234, 5678, 0o1640)
        assert s.st_mtime_ns == 1_222_222_222_987_654_321
        assert s.st_atime_ns == 981_173_106_500_000_000
        s = os.lstat(p("dir", "link"))
        assert (s.st_uid, s.st_gid) == (4321, 8765)
        assert s.st_mtime_ns == 6_000_000_008
        s = os.lstat(p("dir"))
        assert stat.S_IMODE(s.st_mode) == 0o2751
        assert (s.st_atime_ns, s.st_mtime_ns) == (1_000_000_000_000_000_001, 1_000_000_000_000_000_002)

    check()
    # statfs
    blocks = (256 << 20) // 4096
    sv = os.statvfs(m.mnt)
    assert sv.f_bsize == 4096 and sv.f_frsize == 4096
    assert 0.9 * blocks <= sv.f_blocks <= blocks
    assert 0 < sv.f_bavail <= sv.f_bfree <= sv.f_blocks
    assert sv.f_files > 0 and 0 < sv.f_ffree <= sv.f_files
    assert sv.f_namemax == 255
    df = run(["df", "-P", "-B4096", m.mnt]).stdout.splitlines()[-1].split()
    assert df[-1] == m.mnt and int(df[1]) == sv.f_blocks
    with open(p("fill"), "wb") as f:
        f.write(b"\1" * (16 << 20))
        f.flush()
        os.fsync(f.fileno())
    used = sv.f_bavail - os.statvfs(m.mnt).f_bavail
    assert 4096 <= used <= 4096 + 256, used
    ffree = os.statvfs(m.mnt).f_ffree
    os.unlink(p("fill"))
    assert wait_until(lambda: os.statvfs(m.mnt).f_bavail >= sv.f_bavail - 64, 30)
    assert os.statvfs(m.mnt).f_ffree >= ffree
    m.cycle()
    check()
    assert abs(os.statvfs(m.mnt).f_bavail - sv.f_bavail) <= 64


def test_readdir_5000_entries_and_persistent_inodes(delafs_mount):
    m = delafs_mount()
    big = m.path("big")
    os.mkdir(big)
    names = [f"entry-{i:05d}" for i in range(5000)]
    for i, name in enumerate(names):
        if i % 1000 == 999:
            os.mkdir(os.path.join(big, name))
        else:
            open(os.path.join(big, name), "w").close()
    os.symlink("entry-00000", m.path("sym"))
    os.link(os.path.join(big, "entry-00001"), m.path("hard"))

    def listing() -> dict[str, int]:
        n = int(run(["sh", "-c", f"ls {big} | wc -l"]).stdout)
        assert n == 5000
        ents = {}
        with os.scandir(big) as it:
            for e in it:
                st = os.stat(e.path, follow_symlinks=False)
                assert e.inode() == st.st_ino, e.name          # d_ino == st_ino
                assert e.is_dir() == stat.S_ISDIR(st.st_mode)
                ents[e.name] = e.inode()
        assert sorted(ents) == names
        assert len(set(ents.values())) == 5000
        return ents

    before = listing()
    special = {n: os.lstat(m.path(n)).st_ino for n in ("big", "sym", "hard")}
    assert special["hard"] == before["entry-00001"]
    m.cycle()
    assert listing() == before
    assert {n: os.lstat(m.path(n)).st_ino for n in special} == special
    assert os.stat(m.mnt).st_ino == 1


# ======================================================================================
# The new user's first session
# ======================================================================================

def test_new_user_acceptance(delafs_mount, source_tree):
    """mkfs, mount, copy a source tree in, build and run something there,
    umount, fsck clean, remount: everything is there and still runs."""
    m = delafs_mount()
    work = m.path("work")
    os.mkdir(work)
    run(["cp", "-a", source_tree / "delafs", work])
    run([PYTHON, "-m", "compileall", "-q", os.path.join(work, "delafs")])
    script = os.path.join(work, "hello.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent("""
            import sys, os
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import delafs.ondisk
            assert delafs.ondisk.__file__.startswith(os.path.dirname(os.path.abspath(__file__)))
            print("block size", delafs.ondisk.BLOCK_SIZE)
        """))
    os.chmod(script, 0o755)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    assert run([PYTHON, script], env=env).stdout == "block size 4096\n"
    # delafs, running from the mount, makes and checks an image on the mount.
    env["PYTHONPATH"] = work
    run([PYTHON, "-m", "delafs.cli", "mkfs", os.path.join(work, "inner.img"), "--size", "16M"],
        env=env, cwd=work)
    run([PYTHON, "-m", "delafs.cli", "fsck", "-n", os.path.join(work, "inner.img")], env=env, cwd=work)
    want = manifest(work)
    m.umount()
    m.fsck()
    m.mount()
    assert manifest_diff(want, manifest(work)) == []
    assert run([PYTHON, script], env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1")).stdout == "block size 4096\n"
    run([PYTHON, "-m", "delafs.cli", "fsck", "-n", os.path.join(work, "inner.img")], env=env, cwd=work)


# ======================================================================================
# delafs mount itself: failures, helper, signals, plain umount, crash
# ======================================================================================

def _mount_cmd(image, mnt, opts=""):
    cmd = [DELAFS, "mount", str(image), str(mnt)]
    return cmd + (["-o", opts] if opts else [])


def test_mount_nonexistent_image(mount_dir, tmp_path):
    r = run(_mount_cmd(tmp_path / "missing.img", mount_dir), check=False, timeout=60)
    assert r.returncode != 0
    assert "does not exist" in r.stderr, r.stderr
    assert not is_mounted(mount_dir)
    assert not (tmp_path / "missing.img").exists()


def test_mount_without_cap_sys_admin_says_why(mount_dir, tmp_path):
    """A container run without --cap-add SYS_ADMIN: libfuse's reason goes
    to a stderr the daemonized mount has pointed away, so delafs says what
    usually causes 'fuse_session_mount failed'."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    img = tmp_path / "d.img"
    run([DELAFS, "mkfs", "-q", img, "--size", "64M"])
    r = run(["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin",
             *_mount_cmd(img, mount_dir)], check=False, timeout=60)
    assert r.returncode == 1 and not is_mounted(mount_dir)
    assert r.stderr.startswith("delafs mount: fuse_session_mount failed") and "CAP_SYS_ADMIN" in r.stderr, r
    run([DELAFS, "fsck", "-n", img])                        # the image was released, untouched


@pytest.mark.parametrize("content", ["random", "zeros"])
def test_mount_not_a_delafs_image(mount_dir, tmp_path, content):
    img = tmp_path / "junk.img"
    data = random.Random(9).randbytes(8 << 20) if content == "random" else bytes(8 << 20)
    img.write_bytes(data)
    r = run(_mount_cmd(img, mount_dir, "lock_wait=1"), check=False, timeout=60)
    assert r.returncode != 0
    assert "not a delafs image" in r.stderr, r.stderr
    assert not is_mounted(mount_dir)
    assert img.read_bytes() == data                       # untouched


def test_second_mount_of_an_image_in_use_fails(delafs_mount, mount_dir):
    m = delafs_mount(size="64M")
    with open(m.path("f"), "w") as f:
        f.write("first mount")
    t0 = time.monotonic()
    r = run(_mount_cmd(m.image, mount_dir, "lock_wait=1"), check=False, timeout=60)
    assert r.returncode != 0
    assert "in use" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 20
    assert not is_mounted(mount_dir)
    with open(m.path("f")) as f:                           # the first mount is unharmed
        assert f.read() == "first mount"
    m.cycle()
    with open(m.path("f")) as f:
        assert f.read() == "first mount"


def test_mount_helper_mount_t_fuse_delafs(delafs_mount, tmp_path):
    # install-helper writes a working script wherever it is told.
    alt = tmp_path / "mount.fuse.delafs"
    run([DELAFS, "install-helper", "--path", alt])
    assert os.access(alt, os.X_OK) and "mount-helper" in alt.read_text()
    helper = "/sbin/mount.fuse.delafs"
    # A helper already there may run another delafs (an older checkout):
    # put ours in for the test and the original back after.
    original = open(helper).read() if os.path.exists(helper) else None
    if not os.access(os.path.dirname(os.path.realpath(helper)), os.W_OK):
        pytest.skip("/sbin is not writable: cannot install the mount(8) helper")
    run([DELAFS, "install-helper", "--path", helper])
    try:
        m = delafs_mount(size="64M", mount=False)
        r = run(["mount", "-t", "fuse.delafs", m.image, m.mnt, "-o", f"log={m.log}"], check=False, timeout=60)
        assert r.returncode == 0, r.stderr
        assert is_mounted(m.mnt)
        m.pid = m.stat()["daemon"]["pid"]
        m.pids.append(m.pid)
        # mount(8) strips dev,suid; the helper asks for them back (as mount.fuse does).
        with open("/proc/mounts") as f:
            line = next(line for line in f if line.split()[1] == m.mnt)
        assert "nosuid" not in line.split()[3] and "nodev" not in line.split()[3], line
        with open(m.path("via-helper"), "w") as f:
            f.write("hello")
        m.cycle()
        with open(m.path("via-helper")) as f:
            assert f.read() == "hello"
    finally:
        if original is None:
            os.unlink(helper)
        else:
            with open(helper, "w") as f:
                f.write(original)


def _mount_type(mnt: str) -> str:
    with open("/proc/self/mounts") as f:
        return next(line.split()[2] for line in f if line.split()[1] == mnt)


def test_mount_type_is_fuse_unless_subtype_asks(delafs_mount):
    # Plain fuse by default: xfstests (FSTYP=fuse) compares the type with it.
    m = delafs_mount(size="64M")
    assert _mount_type(m.mnt) == "fuse"
    m.remount(opts="subtype=delafs")
    assert _mount_type(m.mnt) == "fuse.delafs"
    assert run(["df", "--output=fstype", m.mnt]).stdout.split()[-1] == "fuse.delafs"
    with open(m.path("f"), "w") as f:
        f.write("typed")
    m.cycle()
    assert _mount_type(m.mnt) == "fuse.delafs"
    with open(m.path("f")) as f:
        assert f.read() == "typed"


@pytest.mark.parametrize("bad", ["subtype=", "subtype=a/b", "subtype=a b", "subtype=a,b"])
def test_mount_bad_subtype_is_refused(delafs_mount, bad):
    m = delafs_mount(size="64M", mount=False)
    r = run(_mount_cmd(m.image, m.mnt, bad), check=False, timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("delafs mount: ") and r.stderr.count("\n") == 1, r.stderr
    assert ("bad subtype" if "," not in bad else "'b'") in r.stderr, r.stderr
    assert not is_mounted(m.mnt)


def test_mount_helper_passes_subtype_through(delafs_mount, tmp_path):
    """mount -t fuse.delafs, as /etc/fstab says it, with and without
    subtype=delafs.  Run in a private mount namespace with our helper bound
    over /sbin/mount.fuse.delafs, so whatever helper the host has stays in
    place for everyone else meanwhile."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) (util-linux)")
    helper = "/sbin/mount.fuse.delafs"
    ours = tmp_path / "mount.fuse.delafs"
    run([DELAFS, "install-helper", "--path", ours])
    placeholder = not os.path.exists(helper)
    if placeholder:
        if not os.access(os.path.dirname(os.path.realpath(helper)), os.W_OK):
            pytest.skip("/sbin is not writable: nothing to bind the helper over")
        open(helper, "w").close()       # a bind mount needs a file to cover
    m = delafs_mount(size="64M", mount=False)
    pids: list[int] = []
    try:
        for opts, want in (("subtype=delafs", "fuse.delafs"), ("", "fuse"), ("subtype=a/b", None)):
            script = textwrap.dedent(f"""\
                set -e
                mount --bind '{ours}' {helper}
                mount -t fuse.delafs '{m.image}' '{m.mnt}' -o 'log={m.log}{"," + opts if opts else ""}'
                trap "'{DELAFS}' umount '{m.mnt}'" EXIT
                '{DELAFS}' stat --json '{m.mnt}' | '{PYTHON}' -c \
                    'import json, sys; print("pid", json.load(sys.stdin)["daemon"]["pid"])'
                grep ' {m.mnt} ' /proc/self/mounts
                """)
            r = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                    check=False, timeout=120)
            pids += [int(w.split()[1]) for w in r.stdout.splitlines() if w.startswith("pid ")]
            if want is None:
                assert r.returncode != 0 and "delafs mount: bad subtype" in r.stderr, r.stdout + r.stderr
                continue
            assert r.returncode == 0, r.stdout + r.stderr
            line = next(w for w in r.stdout.splitlines() if f" {m.mnt} " in w)
            assert line.split()[2] == want, line
        m.fsck()
    finally:
        # A script that failed half-way leaves its daemon serving a mount
        # only its namespace sees: SIGTERM unmounts cleanly from inside.
        for pid in pids:
            if pid_alive(pid) and not wait_until(lambda: not pid_alive(pid), 30):
                os.kill(pid, signal.SIGTERM)
                wait_until(lambda: not pid_alive(pid), 30)
        if placeholder:
            os.unlink(helper)


def test_sigterm_unmounts_cleanly(delafs_mount):
    m = delafs_mount(size="64M")
    data = random.Random(5).randbytes(3 << 20)
    with open(m.path("dirty"), "wb") as f:
        f.write(data)                                      # no fsync: only the cache has it
    pid = m.pid
    os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not pid_alive(pid), 60), "daemon ignored SIGTERM"
    assert wait_until(lambda: not is_mounted(m.mnt), 10)
    m.pid = None
    m.fsck()
    m.mount()
    with open(m.path("dirty"), "rb") as f:
        assert f.read() == data


def test_plain_umount_then_fsck_waits_for_the_daemon(delafs_mount):
    m = delafs_mount(size="64M")
    data = random.Random(6).randbytes(6 << 20)
    with open(m.path("dirty"), "wb") as f:
        f.write(data)
    pid = m.pid
    run(["umount", m.mnt])
    # umount(8) returns before the daemon's final flush; fsck waits for the lock.
    r = run([DELAFS, "fsck", m.image], check=False, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert wait_until(lambda: not pid_alive(pid), 30)
    m.pid = None
    m.fsck()
    m.mount()
    with open(m.path("dirty"), "rb") as f:
        assert f.read() == data


def test_mount_after_kill_9(delafs_mount):
    """kill -9 the daemon, lazy-unmount, mount again: the journal replays
    at mount (no fsck first), everything fsync'ed is there, and nothing
    unsynced reads back as anything but its data or zeros."""
    m = delafs_mount(size="64M")
    committed = random.Random(7).randbytes(2 << 20)
    os.mkdir(m.path("d"))
    with open(m.path("d", "committed"), "wb") as f:
        f.write(committed)
        os.fsync(f.fileno())
    dfd = os.open(m.path("d"), os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    unsynced = random.Random(8).randbytes(2 << 20)
    with open(m.path("unsynced"), "wb") as f:
        f.write(unsynced)
    pid = m.pid
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(pid), 10)
    m.forget_daemon()
    assert not is_mounted(m.mnt)
    m.mount()                                              # replays the journal itself
    with open(m.path("d", "committed"), "rb") as f:
        assert f.read() == committed
    if os.path.exists(m.path("unsynced")):
        with open(m.path("unsynced"), "rb") as f:
            got = f.read()
        assert len(got) <= len(unsynced)
        assert all(g == 0 or g == w for g, w in zip(got, unsynced)), "unsynced file reads garbage"
    m.umount()
    m.fsck()
