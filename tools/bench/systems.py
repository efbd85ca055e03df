"""The filesystems under test, each on a fresh sparse image (or directory)
in the work directory, and the bookkeeping that lets the runner undo every
mount, loop device and daemon it made, whatever happens.

Every command that touches a mount runs as a subprocess with a timeout (a
FUSE request can hang); nothing here kills a process it did not start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FLOOR = Path(__file__).resolve().parent / "floor.py"


def find_delafs() -> str:
    here = Path(sys.executable).parent / "delafs"
    if here.exists():
        return str(here)
    venv = ROOT / ".venv" / "bin" / "delafs"
    return str(venv) if venv.exists() else (shutil.which("delafs") or str(venv))


DELAFS = find_delafs()


class BenchError(Exception):
    pass


def run(cmd, *, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    cmd = [str(c) for c in cmd]
    try:
        r = subprocess.run(cmd, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout}s: {' '.join(cmd)}") from None
    if check and r.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {r.returncode}: {(r.stderr or '').strip()[-2000:]}")
    return r


def mounted(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1].replace("\\040", " ") == path for line in f)


def wait_for(pred, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def vm_hwm_kib(pid: int | None) -> int | None:
    """Peak resident set size (VmHWM) of a process, in KiB."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_hwm(pid: int | None) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/PID/clear_refs``)."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Registry:
    """Everything the run made that must be undone: mount points, loop
    devices and daemon processes (Popen objects or pids we learned from
    our own mounts).  ``undo`` is idempotent and never raises."""

    def __init__(self):
        self.mounts: list[str] = []
        self.loops: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.pids: list[tuple[int, str]] = []    # (pid, a string its cmdline must contain)

    @staticmethod
    def force_unmount(mnt: str, log=print) -> None:
        """umount, else a lazy ``fusermount3 -u -z`` / ``umount -l``."""
        if not mounted(mnt):
            return
        log(f"cleanup: unmounting {mnt}")
        for cmd in (["umount", mnt], ["fusermount3", "-u", "-z", mnt], ["umount", "-l", mnt]):
            try:
                subprocess.run(cmd, capture_output=True, timeout=60)
            except subprocess.TimeoutExpired:
                pass
            if not mounted(mnt):
                break

    def undo(self, log=print) -> None:
        for mnt in reversed(self.mounts):
            self.force_unmount(mnt, log)
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    log(f"cleanup: killing daemon {p.pid}")
                    p.kill()
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        pass
        for pid, tag in self.pids:
            if pid_alive(pid) and not wait_for(lambda pid=pid: not pid_alive(pid), 30):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        ours = tag.encode() in f.read()
                except OSError:
                    ours = False
                if ours:
                    log(f"cleanup: killing daemon {pid}")
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for dev in reversed(self.loops):
            r = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
            if r.returncode == 0:
                log(f"cleanup: detached {dev}")
        self.loops.clear()


class System:
    """One filesystem under test.  ``mnt`` is its mount point; ``pid`` the
    FUSE daemon of the current mount (None for ext4 or when unmounted)."""

    name = "?"
    fuse = True

    def __init__(self, workdir: Path, reg: Registry, size: str):
        self.workdir = workdir
        self.reg = reg
        self.size = size
        self.mnt = str(workdir / "mnt" / self.name)
        self.image = str(workdir / f"{self.name}.img")
        self.log = str(workdir / "logs" / f"{self.name}.log")
        self.pid: int | None = None
        self.read_ahead_kb: int | None = None   # the current mount's, once read_ahead() ran
        self.commands: list[str] = []       # what the report shows

    @classmethod
    def missing(cls) -> str | None:
        """Why this system cannot run here (None: it can)."""
        return None

    def prepare(self) -> None:
        os.makedirs(self.mnt, exist_ok=True)
        os.makedirs(os.path.dirname(self.log), exist_ok=True)
        self.reg.mounts.append(self.mnt)

    def mount(self, *, ask_pid: bool = True) -> None:
        raise NotImplementedError

    def umount(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        run(["sync", "-f", self.mnt], timeout=600)

    def cold_check(self) -> dict:
        return {}

    def read_ahead(self, kb: int | None) -> int:
        """Set the mount's readahead window to ``kb`` KiB (None: leave the
        kernel's); returns the window in effect.  It is the read_ahead_kb of
        the mount's backing device info, a FUSE connection's or ext4's loop
        device's alike, and a new mount starts again from the default."""
        dev = os.stat(self.mnt).st_dev
        path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
        try:
            if kb is not None:
                with open(path, "w") as f:
                    f.write(str(kb))
            with open(path) as f:
                self.read_ahead_kb = int(f.read())
                return self.read_ahead_kb
        except OSError as e:
            raise BenchError(f"{self.name}: {path}: {e.strerror}") from None

    def request_sizes(self) -> dict | None:
        """The daemon's counts of READ and WRITE requests by size, if it keeps them."""
        return None

    def destroy(self) -> None:
        """Unmounted already: delete the image (--scale makes one per measurement)."""
        if os.path.exists(self.image):
            os.unlink(self.image)

    def _wait_mounted(self, proc: subprocess.Popen, timeout: float = 30) -> None:
        ok = wait_for(lambda: mounted(self.mnt) or proc.poll() is not None, timeout)
        if not ok or not mounted(self.mnt):
            if proc.poll() is None:
                proc.terminate()
            raise BenchError(f"{self.name}: mount did not come up (exit {proc.poll()}); see {self.log}")

    def _umount_and_wait(self, proc: subprocess.Popen | None, cmd: list[str]) -> None:
        if mounted(self.mnt):
            run(cmd + [self.mnt], timeout=300)
        if proc is not None:
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                raise BenchError(f"{self.name}: daemon {proc.pid} still running 300 s after unmount")
        self.pid = None


class Ext4(System):
    name = "ext4"
    fuse = False

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.dev: str | None = None

    @classmethod
    def missing(cls):
        if shutil.which("losetup") is None or shutil.which("mkfs.ext4") is None:
            return "needs losetup and mkfs.ext4"
        if not os.path.exists("/dev/loop-control") and not os.path.exists("/dev/loop0"):
            return "no loop devices (/dev/loop-control missing)"
        return None

    def prepare(self):
        super().prepare()
        run(["truncate", "-s", self.size, self.image])
        r = run(["losetup", "--find", "--show", self.image], check=False)
        if r.returncode != 0:
            raise BenchError(f"ext4: losetup failed: {r.stderr.strip()}")
        self.dev = r.stdout.strip()
        self.reg.loops.append(self.dev)
        run(["mkfs.ext4", "-q", self.dev], timeout=300)
        self.commands = [f"truncate -s {self.size} ext4.img", "losetup --find --show ext4.img",
                         "mkfs.ext4 -q /dev/loopN", "mount /dev/loopN MNT", "umount MNT"]

    def mount(self, *, ask_pid: bool = True):
        run(["mount", self.dev, self.mnt], timeout=120)

    def destroy(self):
        if self.dev and not mounted(self.mnt):
            run(["losetup", "-d", self.dev], check=False)
            if self.dev in self.reg.loops:
                self.reg.loops.remove(self.dev)
            self.dev = None
        super().destroy()

    def umount(self):
        if mounted(self.mnt):
            run(["umount", self.mnt], timeout=300)


class ForegroundDaemon(System):
    """A FUSE daemon the runner starts itself, in the foreground, in the
    background: ``argv()`` serves the mount, ``UMOUNT`` ends it."""

    UMOUNT: list[str] = []

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def mount(self, *, ask_pid: bool = True):
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.reg.procs.append(self.proc)
        self._wait_mounted(self.proc)
        self.pid = self.proc.pid

    def umount(self):
        self._umount_and_wait(self.proc, self.UMOUNT)
        self.proc = None


class Fuse2fs(ForegroundDaemon):
    name = "fuse2fs"
    OPTS = "fakeroot"

    @classmethod
    def missing(cls):
        if shutil.which("fuse2fs") is None:
            return "no fuse2fs binary (Debian package fuse2fs)"
        if shutil.which("mkfs.ext4") is None:
            return "needs mkfs.ext4"
        return None

    def prepare(self):
        super().prepare()
        run(["truncate", "-s", self.size, self.image])
        run(["mkfs.ext4", "-q", "-F", self.image], timeout=300)
        self.commands = [f"truncate -s {self.size} fuse2fs.img", "mkfs.ext4 -q -F fuse2fs.img",
                         f"fuse2fs fuse2fs.img MNT -o {self.OPTS} -f   (run in the background by the runner)",
                         "umount MNT   (then wait for the daemon to exit)"]

    UMOUNT = ["umount"]

    def argv(self) -> list[str]:
        return ["fuse2fs", self.image, self.mnt, "-o", self.OPTS, "-f"]


class Floor(ForegroundDaemon):
    name = "floor"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.source = str(self.workdir / "floor-data")

    @classmethod
    def missing(cls):
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse"
        if shutil.which("fusermount3") is None:
            return "no fusermount3 (Debian package fuse3)"
        return None

    def prepare(self):
        super().prepare()
        os.makedirs(self.source, exist_ok=True)
        self.commands = ["python tools/bench/floor.py floor-data MNT   (run in the background by the runner)",
                         "fusermount3 -u MNT   (then wait for the daemon to exit)"]

    UMOUNT = ["fusermount3", "-u"]

    def argv(self) -> list[str]:
        return [sys.executable, str(FLOOR), self.source, self.mnt]


class Delafs(System):
    name = "delafs"
    OPTS = ""

    @classmethod
    def missing(cls):
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse"
        if shutil.which("fusermount3") is None:
            return "no fusermount3 (Debian package fuse3)"
        if not os.path.exists(DELAFS):
            return f"no delafs command ({DELAFS})"
        return None

    def prepare(self):
        super().prepare()
        run([DELAFS, "mkfs", self.image, "--size", self.size], timeout=300)
        o = f" -o {self.OPTS}" if self.OPTS else ""
        self.commands = [f".venv/bin/delafs mkfs {self.name}.img --size {self.size}",
                         f".venv/bin/delafs mount {self.name}.img MNT{o}   (plus log=FILE)",
                         "umount: .venv/bin/delafs umount MNT; untar's sync: .venv/bin/delafs sync MNT"]

    def mount(self, *, ask_pid: bool = True):
        """``ask_pid=False``: the caller's next cold_check() learns the pid
        (one ``delafs stat`` fewer)."""
        opts = ",".join(filter(None, [self.OPTS, f"log={self.log}"]))
        run([DELAFS, "mount", self.image, self.mnt, "-o", opts], timeout=180)
        if ask_pid:
            self._learn_pid(self.stat())

    def _learn_pid(self, stat: dict) -> None:
        self.pid = stat["daemon"]["pid"]
        if (self.pid, os.path.basename(self.image)) not in self.reg.pids:
            self.reg.pids.append((self.pid, os.path.basename(self.image)))

    def stat(self) -> dict:
        return json.loads(run([DELAFS, "stat", "--json", self.mnt], timeout=60).stdout)

    def umount(self):
        if mounted(self.mnt):
            run([DELAFS, "umount", "--timeout", "300", self.mnt], timeout=330)
        self.pid = None

    def sync(self):
        run([DELAFS, "sync", self.mnt], timeout=600)

    def request_sizes(self) -> dict | None:
        return self.stat()["fuse"]["request_sizes"]

    def cold_check(self) -> dict:
        st = self.stat()
        self._learn_pid(st)
        cache = st["cache"]
        if cache.get("cached_bytes") != 0:
            raise BenchError(f"{self.name}: not cold: the daemon caches {cache.get('cached_bytes')} bytes")
        return {"cached_bytes": cache["cached_bytes"]}


class DelafsWbc(Delafs):
    name = "delafs-wbc"
    OPTS = "writeback_cache"


SYSTEMS = {c.name: c for c in (Ext4, Fuse2fs, Delafs, DelafsWbc, Floor)}
ORDER = ["ext4", "fuse2fs", "delafs", "delafs-wbc", "floor"]
