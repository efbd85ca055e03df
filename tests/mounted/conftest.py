"""Fixtures for the mounted tests: real FUSE mounts of fresh delafs images.

Every test here needs root, /dev/fuse and fusermount3; without them the
whole directory is skipped with the reason.  ``delafs_mount`` is a factory:

    m = delafs_mount()                      # mkfs a 256M image, mount it
    m = delafs_mount(size="64M", opts="short_copy=3,stale_mapping=3")
    m.mnt, m.image, m.opts, m.pid
    m.umount(); m.fsck(); m.mount()         # or m.cycle(): all three
    m.remount(opts=...)                     # umount + mount
    m.stat(); m.inject(short_copy=3)

Images live in pytest's tmp_path; mount points in one world-searchable
directory per session (so a test can run a program as ``nobody`` on an
``allow_other`` mount).  Teardown always unmounts, whatever the test did:
``delafs umount``, else ``fusermount3 -u -z``, and if the daemon we started
(its pid comes from ``delafs stat --json`` at mount time) is still alive
after a timeout, SIGKILL to that pid only.  At the end of the session no
mount may remain under our directories.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _find_delafs() -> str:
    here = Path(sys.executable).parent / "delafs"
    if here.exists():
        return str(here)
    venv = ROOT / ".venv" / "bin" / "delafs"
    if venv.exists():
        return str(venv)
    return shutil.which("delafs") or str(venv)


DELAFS = _find_delafs()
PYTHON = sys.executable


def why_not_mountable() -> str | None:
    if os.geteuid() != 0:
        return "mounted tests need root"
    if not os.path.exists("/dev/fuse"):
        return "mounted tests need /dev/fuse (modprobe fuse, or docker run --device /dev/fuse)"
    if shutil.which("fusermount3") is None:
        return "mounted tests need fusermount3 (Debian package fuse3)"
    return None


def mounts_under(prefix: str) -> list[str]:
    """Mount points in /proc/mounts at or below ``prefix``."""
    prefix = os.path.realpath(prefix)
    found = []
    with open("/proc/mounts") as f:
        for line in f:
            mnt = line.split()[1].replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix.rstrip("/") + "/"):
                found.append(mnt)
    return found


def is_mounted(path: str) -> bool:
    return os.path.realpath(path) in mounts_under(path)


def run(cmd, *, check=True, timeout=300, **kw) -> subprocess.CompletedProcess:
    """Run a command, capturing its output; on failure the assertion shows it."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    r = subprocess.run([str(c) for c in cmd], timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}\n"
                             f"stdout: {r.stdout}\nstderr: {r.stderr}")
    return r


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie that is our own child is as good as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def is_our_daemon(pid: int, image: str) -> bool:
    """Guard against pid reuse: the process must be a delafs daemon of ``image``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(b"delafs" in a for a in argv) and any(os.path.basename(image).encode() in a for a in argv)


def wait_until(pred, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


class DelafsMount:
    """One image and its mount point.

    Attributes: image, mnt (str paths), opts (the -o string, without the
    log= the fixture adds), log (the daemon's log file), pid (the daemon of
    the current mount, None when unmounted).
    """

    def __init__(self, image: str, mnt: str, opts: str, log: str):
        self.image = image
        self.mnt = mnt
        self.opts = opts
        self.log = log
        self.pid: int | None = None
        self.pids: list[int] = []       # every daemon this object started
        self.conns: list[int] = []      # their FUSE connections (fusectl numbers)
        self.tracebacks_ok = False      # a test injecting I/O errors may expect some

    # -- mount / unmount -------------------------------------------------------------

    def _all_opts(self, opts: str) -> str:
        return ",".join(filter(None, [opts, f"log={self.log}"]))

    def mount(self, opts: str | None = None) -> "DelafsMount":
        if opts is not None:
            self.opts = opts
        assert not is_mounted(self.mnt), f"{self.mnt} is already mounted"
        r = run([DELAFS, "mount", self.image, self.mnt, "-o", self._all_opts(self.opts)], check=False,
                timeout=120)
        if r.returncode != 0:
            raise AssertionError(f"delafs mount {self.image} {self.mnt} -o {self.opts} failed "
                                 f"({r.returncode}): {r.stderr.strip()}\n{self.log_tail()}")
        assert is_mounted(self.mnt), "delafs mount returned 0 but nothing is mounted"
        # The same JSON as `delafs stat --json`, read in-process (saves a
        # Python start per mount).
        from delafs.fuse.control import control_command
        self.pid = json.loads(control_command(self.mnt, "stat"))["daemon"]["pid"]
        self.pids.append(self.pid)
        self.conns.append(os.minor(os.stat(self.mnt).st_dev))
        return self

    def umount(self) -> None:
        """``delafs umount``: it must exit 0, and the daemon must be gone."""
        r = run([DELAFS, "umount", self.mnt], check=False, timeout=180)
        assert r.returncode == 0, f"delafs umount failed ({r.returncode}): {r.stderr.strip()}\n{self.log_tail()}"
        assert not is_mounted(self.mnt), "still mounted after delafs umount"
        if self.pid is not None:
            assert wait_until(lambda: not pid_alive(self.pid), 30), f"daemon {self.pid} still alive"
        self.pid = None

    def remount(self, opts: str | None = None) -> "DelafsMount":
        self.umount()
        return self.mount(opts)

    def fsck(self, *args: str) -> str:
        """``delafs fsck -n IMAGE`` on the unmounted image: must be clean (0)."""
        assert not is_mounted(self.mnt), "fsck of a mounted image"
        r = run([DELAFS, "fsck", "-n", *args, self.image], check=False, timeout=300)
        assert r.returncode == 0, f"fsck -n exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        return r.stdout

    def cycle(self, opts: str | None = None) -> "DelafsMount":
        """umount, fsck -n (clean), mount again: what every test verifies after."""
        self.umount()
        self.fsck()
        return self.mount(opts)

    # -- the control channel ---------------------------------------------------------

    def stat(self) -> dict:
        return json.loads(run([DELAFS, "stat", "--json", self.mnt]).stdout)

    def inject(self, **tags: int) -> dict:
        r = run([DELAFS, "inject", self.mnt, *(f"{k}={v}" for k, v in tags.items())])
        return json.loads(r.stdout)

    def sync(self) -> None:
        run([DELAFS, "sync", self.mnt])

    # -- paths and diagnostics -------------------------------------------------------

    def path(self, *parts: str) -> str:
        return os.path.join(self.mnt, *parts)

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log, errors="replace") as f:
                lines = f.readlines()[-n:]
        except OSError:
            return "(no daemon log)"
        return "daemon log (tail):\n" + "".join(lines)

    def tracebacks(self) -> str:
        """Unexpected exceptions the daemon logged (each one was answered
        with EIO, or killed a background task): always a bug."""
        try:
            with open(self.log, errors="replace") as f:
                text = f.read()
        except OSError:
            return ""
        return text if "Traceback (most recent call last)" in text else ""

    def forget_daemon(self) -> None:
        """The test killed the daemon itself (crash tests): clear the mount."""
        if is_mounted(self.mnt):
            run(["fusermount3", "-u", "-z", self.mnt], check=False)
        self.pid = None

    def cleanup(self) -> None:
        """Whatever state the test left: nothing mounted, no daemon of ours
        alive.  ``delafs umount`` first (a clean image), then a lazy
        ``fusermount3 -u -z`` (busy, dead or hung daemon), then SIGKILL to
        the daemons this object started (only those, and only if the pid
        still is a delafs daemon of this image)."""
        if is_mounted(self.mnt):
            try:
                run([DELAFS, "umount", "--timeout", "120", self.mnt], check=False, timeout=150)
            except subprocess.TimeoutExpired:
                pass
        forced = is_mounted(self.mnt)
        if forced:
            run(["fusermount3", "-u", "-z", self.mnt], check=False, timeout=30)
        for pid in self.pids:
            if pid_alive(pid) and not wait_until(lambda: not pid_alive(pid), 30):
                if is_our_daemon(pid, self.image):
                    forced = True
                    os.kill(pid, signal.SIGKILL)
                    wait_until(lambda: not pid_alive(pid), 10)
        if is_mounted(self.mnt):
            run(["fusermount3", "-u", "-z", self.mnt], check=False, timeout=30)
        if forced:
            self._abort_leftover_connections()
        self.pid = None

    def _abort_leftover_connections(self) -> None:
        """A daemon that deadlocked with the kernel can leave requests (and
        the test's programs, in D state) behind on a lazily unmounted
        connection: abort what is left of ours once our daemons are gone.
        Only after a forced cleanup: a connection released cleanly may have
        given its number to someone else's mount."""
        if any(pid_alive(p) for p in self.pids):
            return
        base = "/sys/fs/fuse/connections"
        if not os.path.isdir(base) or not os.listdir(base):
            run(["mount", "-t", "fusectl", "none", base], check=False)
        for conn in self.conns:
            abort = os.path.join(base, str(conn), "abort")
            if os.path.exists(abort):
                try:
                    with open(abort, "w") as f:
                        f.write("1")
                except OSError:
                    pass


# -- fixtures ----------------------------------------------------------------------------

def pytest_collection_modifyitems(config, items):
    """No root, /dev/fuse or fusermount3: skip everything here (before any
    fixture runs) with the reason."""
    why = why_not_mountable()
    if not why:
        return
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _require_fuse():
    why = why_not_mountable()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="session")
def mount_base(tmp_path_factory):
    """A world-searchable directory for mount points (pytest's tmp tree is
    0700, which would keep ``nobody`` out of an allow_other mount)."""
    base = tempfile.mkdtemp(prefix="delafs-mnt-", dir="/tmp")
    os.chmod(base, 0o755)
    yield base
    leftover = mounts_under(base) + mounts_under(str(tmp_path_factory.getbasetemp()))
    for mnt in leftover:
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    if not mounts_under(base):
        shutil.rmtree(base, ignore_errors=True)
    assert not leftover, f"mounts left behind: {leftover}"


@pytest.fixture
def mount_dir(mount_base, request):
    """A fresh empty directory to mount on (world-searchable)."""
    d = tempfile.mkdtemp(prefix=request.node.name[:40].replace("/", "_") + "-", dir=mount_base)
    os.chmod(d, 0o755)
    return d


@pytest.fixture
def delafs_mount(tmp_path, mount_base, request):
    """Factory: mkfs an image (``size``, default 256M) and mount it with ``opts``."""
    made: list[DelafsMount] = []

    def factory(size: str = "256M", opts: str = "", *, mkfs: bool = True, image: str | None = None,
                mount: bool = True) -> DelafsMount:
        n = len(made)
        image = image or str(tmp_path / f"image{n}.img")
        mnt = tempfile.mkdtemp(prefix=f"{request.node.name[:40]}-{n}-".replace("/", "_"), dir=mount_base)
        os.chmod(mnt, 0o755)
        if mkfs:
            run([DELAFS, "mkfs", image, "--size", size])
        m = DelafsMount(image, mnt, opts, str(tmp_path / f"daemon{n}.log"))
        made.append(m)
        if mount:
            m.mount()
        return m

    yield factory
    errors = []
    for m in made:
        try:
            m.cleanup()
        except Exception as e:      # keep going: every mount must go
            errors.append(f"{m.mnt}: {e!r}")
        if is_mounted(m.mnt):
            errors.append(f"{m.mnt} still mounted after cleanup")
        if not m.tracebacks_ok and (tb := m.tracebacks()):
            errors.append(f"the daemon of {m.image} logged an unexpected exception:\n{tb[-4000:]}")
    assert not errors, "\n".join(errors)


# -- source trees and tree comparison ------------------------------------------------------

@pytest.fixture(scope="session")
def source_tree(tmp_path_factory) -> Path:
    """A snapshot, on the host filesystem, of two real source trees: the
    delafs package and trio's package directory from the venv.  (The working
    tree is edited while tests run; copies are compared with this snapshot.)"""
    import trio
    base = tmp_path_factory.mktemp("src")
    run(["cp", "-a", ROOT / "delafs", base / "delafs"])
    run(["cp", "-a", Path(trio.__file__).parent, base / "trio"])
    return base


def manifest(root, *, times: bool = True, owners: bool = True) -> dict[str, tuple]:
    """relative path -> (type, permission bits, [uid, gid], size + sha256 |
    link target | rdev, [mtime_ns]) for everything under ``root``, root
    included.  Symlink times are left out (not every tool sets them)."""
    import hashlib
    import stat as st_
    root = str(root)
    out = {}

    def one(path: str) -> None:
        s = os.lstat(path)
        kind = st_.S_IFMT(s.st_mode)
        entry: list = [kind, st_.S_IMODE(s.st_mode)]
        if owners:
            entry += [s.st_uid, s.st_gid]
        if st_.S_ISREG(s.st_mode):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            entry += [s.st_size, h.hexdigest()]
        elif st_.S_ISLNK(s.st_mode):
            entry.append(os.readlink(path))
        elif st_.S_ISCHR(s.st_mode) or st_.S_ISBLK(s.st_mode):
            entry.append(s.st_rdev)
        if times and not st_.S_ISLNK(s.st_mode):
            entry.append(s.st_mtime_ns)
        out[os.path.relpath(path, root)] = tuple(entry)

    one(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            one(os.path.join(dirpath, name))
    return out


def manifest_diff(a: dict, b: dict, limit: int = 20) -> list[str]:
    """What differs between two manifests (empty: identical)."""
    diffs = []
    for k in sorted(a.keys() | b.keys()):
        if a.get(k) != b.get(k):
            diffs.append(f"{k}: {a.get(k)} != {b.get(k)}")
            if len(diffs) >= limit:
                diffs.append("...")
                break
    return diffs
