"""Watching the engine on a real mount: delafs bmap, trace, top and
stat --watch, as a user runs them (the installed command, a real writer,
a terminal for top)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from delafs.cli.inspect import request
from delafs.lib.errors import FsError

from .conftest import DELAFS, PYTHON, run, wait_until

# The flusher leaves dirty data alone for a minute: what was written stays
# DELALLOC until fsync, as the tests want to see it.
HOLD = "dirty_expire=60,writeback_interval=60"


def bmap(path: str) -> dict:
    return json.loads(run([DELAFS, "bmap", "--json", path]).stdout)


def states(b: dict) -> list[str]:
    return [e["state"] for e in b["extents"]]


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_bmap_shows_delalloc_under_dirty_blocks_then_written_after_fsync(delafs_mount):
    m = delafs_mount(size="64M", opts=HOLD)
    f = m.path("f")
    with open(f, "wb") as out:
        out.write(os.urandom(40960))             # blocks 0..9
        out.seek(1 << 20)
        out.write(os.urandom(8192))              # blocks 256..257: a hole between
    b = bmap(f)
    assert states(b) == ["DELALLOC", "HOLE", "DELALLOC"], b
    assert [(e["fblock"], e["blocks"]) for e in b["extents"]] == [(0, 10), (10, 246), (256, 2)]
    assert all(e["pblock"] is None for e in b["extents"])
    assert b["cache"] == [{"fblock": 0, "blocks": 10, "state": "dirty"},
                          {"fblock": 256, "blocks": 2, "state": "dirty"}]
    text = run([DELAFS, "bmap", f]).stdout
    assert re.search(r"0: \[0\.\.9\]\s+-\s+DELALLOC\s+10\s+dirty 10", text), text
    assert re.search(r"1: \[10\.\.255\]\s+-\s+HOLE\s+246\s+not cached", text), text

    fsync(f)
    b = bmap(f)
    assert states(b) == ["WRITTEN", "HOLE", "WRITTEN"], b
    assert all(e["pblock"] is not None for e in b["extents"] if e["state"] == "WRITTEN")
    assert {c["state"] for c in b["cache"]} == {"uptodate"}
    verbose = run([DELAFS, "bmap", "-v", f]).stdout
    assert re.search(r"0: \[0\.\.9\]\s+\[\d+\.\.\d+\]\s+WRITTEN\s+10\s+uptodate \[0\.\.9\]", verbose), verbose

    # After a remount nothing is cached: the extents come from the image.
    m.cycle(opts=HOLD)
    b = bmap(f)
    assert states(b) == ["WRITTEN", "HOLE", "WRITTEN"] and b["cache"] == []


def test_bmap_errors_are_clear_and_nothing_changes(delafs_mount, tmp_path):
    # No periodic commit either: the mkdir and the write leave metadata
    # dirty, and a commit of it between the two stats below is not bmap's.
    m = delafs_mount(size="64M", opts=HOLD + ",commit_interval=60")
    os.mkdir(m.path("dir"))
    with open(m.path("f"), "wb") as out:
        out.write(b"x" * 5000)
    plain = tmp_path / "plain"
    plain.write_bytes(b"not on delafs")
    cases = [
        ([str(plain)], "is not on a delafs mount"),
        ([m.path("dir")], "is not a regular file"),
        ([m.path("missing")], "No such file or directory"),
        ([m.path(".delafs-control")], "the control file has no extents"),
    ]
    for argv, why in cases:
        r = run([DELAFS, "bmap", *argv], check=False)
        assert r.returncode == 1 and r.stderr.startswith("delafs bmap: ") and why in r.stderr, (argv, r)
    before = m.stat()
    bmap(m.path("f"))
    after = m.stat()
    # A bmap changes no data and commits nothing.
    assert after["engine"]["writes"] == before["engine"]["writes"]
    assert after["journal"].get("commits") == before["journal"].get("commits")
    assert states(bmap(m.path("f"))) == ["DELALLOC"]


def test_inspection_socket_answers_questions_only(delafs_mount):
    """The socket is for watching: commands that change things live on the
    control file and are refused here; junk gets an error, not a hang."""
    m = delafs_mount(size="64M", opts=HOLD)
    address = m.stat()["daemon"]["inspect"]
    assert address.startswith("@delafs-")
    for bad, err in [({"cmd": "sync"}, errno.EINVAL), ({"cmd": "inject", "args": ["short_copy=1"]}, errno.EINVAL),
                     ({"cmd": "bmap", "ino": "1"}, errno.EINVAL), ({"cmd": "bmap", "ino": 10**6}, errno.ENOENT),
                     ({"cmd": "top", "width": 0}, errno.EINVAL), ({"cmd": "top", "pin": 5}, errno.EINVAL)]:
        with pytest.raises(FsError) as e:
            request(address, bad, timeout=10)
        assert e.value.errno == err, (bad, e.value)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect("\0" + address[1:])
        s.sendall(b"not json\n")
        assert b"bad request" in s.recv(4096)
    assert m.stat()["errortags"] == {}      # no errortag was set by any of it


def test_a_connection_that_never_asks_is_closed(delafs_mount):
    m = delafs_mount(size="64M")
    address = m.stat()["daemon"]["inspect"]
    with socket.socket(socket.AF_UNIX) as s:
        s.connect("\0" + address[1:])
        assert wait_until(lambda: m.stat()["daemon"]["inspect_clients"] == 1, 5)
        s.settimeout(30)
        assert s.recv(100) == b""                     # closed by the daemon, unanswered
    assert m.stat()["daemon"]["inspect_clients"] == 0


def test_bmap_works_on_a_read_only_mount(delafs_mount):
    m = delafs_mount(size="64M")
    with open(m.path("f"), "wb") as out:
        out.write(b"y" * 12288)
    m.umount()
    m.mount(opts="ro")
    assert states(bmap(m.path("f"))) == ["WRITTEN"]


def _as_at_a_terminal() -> None:
    """Child setup: Ctrl-C reaches it as it would at a terminal.  A job a
    non-interactive shell starts in the background inherits SIGINT
    ignored, and so would every command these tests interrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# -- trace ---------------------------------------------------------------------------------

class Stream:
    """A running `delafs trace`, its lines collected by a thread."""

    def __init__(self, *argv: str):
        self.proc = subprocess.Popen([DELAFS, "trace", *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, preexec_fn=_as_at_a_terminal)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def poll(self) -> list[str]:
        return list(self.lines)

    def wait_for(self, pred, timeout: float = 20) -> bool:
        return wait_until(lambda: pred(self.poll()), timeout)

    def interrupt(self, sig: int = signal.SIGINT) -> tuple[int, float]:
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=5)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return rc, time.monotonic() - t0


def subscribed(m, readers: int = 1) -> None:
    """Wait until the trace readers are connected (a loaded machine may take
    more than a second to start one): events before that are not theirs."""
    assert wait_until(lambda: m.stat()["daemon"]["inspect_clients"] == readers, 20)
    time.sleep(0.1)          # connected, and past its request


def test_trace_json_streams_the_life_of_a_write_and_stops_on_sigint(delafs_mount):
    m = delafs_mount(size="64M", opts=HOLD)
    t = Stream(m.mnt, "--json")
    try:
        subscribed(m)
        f = m.path("f")
        with open(f, "wb") as out:
            out.write(os.urandom(65536))
            out.flush()
            os.fsync(out.fileno())
        ino = os.stat(f).st_ino

        def seen(lines):
            names = {json.loads(x)["event"] for x in lines}
            return "xfs_unwritten_convert" in names
        assert t.wait_for(seen), t.lines[-20:]
        events = [json.loads(x) for x in t.poll()]
        mine = [e["event"] for e in events if e.get("ino") == ino]
        # The order the engine promises: reserve and copy, then at writeback
        # allocate, write, and only after the write convert.
        for earlier, later in [("iomap_iter", "iomap_write_end"), ("iomap_write_end", "xfs_map_blocks_alloc"),
                               ("xfs_map_blocks_alloc", "iomap_ioend_submit"),
                               ("iomap_ioend_submit", "iomap_ioend_completion"),
                               ("iomap_ioend_submit", "xfs_unwritten_convert")]:
            assert mine.index(earlier) < mine.index(later), mine
        assert all(isinstance(e["t"], float) for e in events)
        assert [e for e in events if e["event"] == "iomap_iter"][0]["type"] == "DELALLOC"
        rc, took = t.interrupt()
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
    assert rc == 0 and took < 1.0, (rc, took, t.proc.stderr.read())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_trace_stops_on_a_signal_while_nothing_happens(delafs_mount, sig):
    """Ctrl-C, or SIGTERM from a script (a shell's background job ignores
    SIGINT): a clean exit within a second."""
    m = delafs_mount(size="64M")
    t = Stream(m.mnt)
    subscribed(m)
    rc, took = t.interrupt(sig)
    assert rc == 0 and took < 1.0, (rc, took, t.proc.stderr.read())
    # The daemon noticed the reader go, with no event to send it: its
    # subscription (and the tracing it switched on) ended too.
    assert wait_until(lambda: m.stat()["daemon"]["inspect_clients"] == 0, 5)


def test_trace_filters_by_event_and_inode(delafs_mount):
    m = delafs_mount(size="64M", opts=HOLD)
    for name in "ab":
        with open(m.path(name), "wb") as out:
            out.write(b"1")
    ino_b = os.stat(m.path("b")).st_ino
    t = Stream(m.mnt, "--event", "iomap_write_end", "--event", "xfs_unwritten_convert",
               "--inode", str(ino_b))
    try:
        subscribed(m)
        for name in "ab":
            with open(m.path(name), "r+b") as out:
                out.write(b"22")
                os.fsync(out.fileno())
        assert t.wait_for(lambda lines: any("xfs_unwritten_convert" in x for x in lines)), t.lines
        time.sleep(0.3)
        lines = t.poll()
        assert lines and all(f" ino={ino_b} " in x + " " for x in lines), lines
        assert {x.split()[1] for x in lines} == {"iomap_write_end", "xfs_unwritten_convert"}, lines
    finally:
        t.interrupt()


def test_trace_bad_input(delafs_mount, tmp_path):
    m = delafs_mount(size="64M")
    r = run([DELAFS, "trace", m.mnt, "--event", "iomap_nonsense"], check=False, timeout=30)
    assert r.returncode == 1 and "unknown trace event(s) iomap_nonsense" in r.stderr, r
    assert "iomap_writeback_range" in r.stderr       # it says what exists
    r = run([DELAFS, "trace", str(tmp_path)], check=False, timeout=30)
    assert r.returncode == 1 and r.stderr == f"delafs trace: {tmp_path} is not on a delafs mount\n", r
    listed = run([DELAFS, "trace", "--list-events"]).stdout
    assert "xfs_unwritten_convert" in listed and "errortag" in listed


def test_a_reader_that_stops_reading_loses_events_not_the_filesystem(delafs_mount):
    """Bounded buffering: a trace client that never reads must not stall
    writers; the events it could not take are counted when it reads again."""
    m = delafs_mount(size="64M", opts=HOLD)
    address = m.stat()["daemon"]["inspect"]
    with socket.socket(socket.AF_UNIX) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect("\0" + address[1:])
        s.sendall(json.dumps({"cmd": "trace", "events": None, "ino": None}).encode() + b"\n")
        # About 3 events per write: far more than the queue and the socket hold.
        r = run([PYTHON, "-c", f"""
import os
fd = os.open({m.path('f')!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
for i in range(12000):
    os.write(fd, b"abcd")
os.close(fd)
"""], timeout=240)
        assert r.returncode == 0
        assert os.path.getsize(m.path("f")) == 48000
        s.settimeout(10)
        data = b""
        deadline = time.monotonic() + 20
        while b'"dropped"' not in data and time.monotonic() < deadline:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    dropped = [json.loads(x) for x in data.splitlines() if b'"dropped"' in x]
    assert dropped and dropped[0]["count"] > 0, data[-500:]


# -- top -----------------------------------------------------------------------------------

def tmux(*argv: str) -> str:
    return run(["tmux", *argv], timeout=30).stdout


@pytest.fixture
def screen():
    """An 80x24 terminal (a tmux session of our own), killed afterwards."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (scripts/setup.sh installs it)")
    name = f"delafs-top-{os.getpid()}"

    def start(command: list[str]) -> None:
        run(["tmux", "new-session", "-d", "-s", name, "-x", "80", "-y", "24",
             " ".join(map(str, command))], timeout=30)

    def capture() -> str:
        return tmux("capture-pane", "-p", "-t", name)

    start.capture = capture
    yield start
    run(["tmux", "kill-session", "-t", name], check=False, timeout=30)


def parse_top(screen: str, name: str) -> dict:
    """The values on a captured `delafs top` screen: writes per second and
    the named file's extent and cache strips."""
    out = {}
    rate = re.search(r"^per s\s+writes (\d+)", screen, re.M)
    out["writes"] = int(rate.group(1)) if rate else None
    lines = screen.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(name + "  ino ") and i + 2 < len(lines):
            out["extents"] = re.search(r"\|([^|]*)\|", lines[i + 1]).group(1)
            out["cache"] = re.search(r"\|([^|]*)\|", lines[i + 2]).group(1)
    return out


def test_top_shows_delalloc_become_written_and_the_write_rate(delafs_mount, screen):
    m = delafs_mount(size="64M", opts=HOLD)
    f = m.path("f")
    with open(f, "wb") as out:
        out.write(b"\0" * (256 << 10))
    screen([DELAFS, "top", m.mnt, "--file", f, "-d", "0.25"])
    writer = subprocess.Popen([PYTHON, "-c", f"""
import os, time
fd = os.open({f!r}, os.O_WRONLY)
end = time.monotonic() + 60
i = 0
while time.monotonic() < end:
    os.pwrite(fd, b"w" * 4096, (i % 64) * 4096)
    i += 1
"""])
    try:
        def busy():
            v = parse_top(screen.capture(), "f")
            return v.get("writes") and v.get("extents")
        assert wait_until(busy, 20), screen.capture()
        during = parse_top(screen.capture(), "f")
        assert during["writes"] > 0, screen.capture()
        assert set(during["extents"]) == {"D"}, screen.capture()
        assert "d" in during["cache"], screen.capture()
    finally:
        writer.kill()
        writer.wait()
    fsync(f)

    def settled():
        v = parse_top(screen.capture(), "f")
        return v.get("writes") == 0 and v.get("extents") and set(v["extents"]) == {"W"}
    assert wait_until(settled, 20), screen.capture()
    after = parse_top(screen.capture(), "f")
    assert set(after["cache"]) == {"c"}, screen.capture()
    # 80 columns: nothing on the screen is wider.
    assert max(len(x) for x in screen.capture().splitlines()) <= 80


def test_top_prints_plain_frames_when_not_a_terminal(delafs_mount, tmp_path):
    m = delafs_mount(size="64M", opts=HOLD)
    with open(m.path("data"), "wb") as out:
        out.write(b"z" * 8192)
    r = run([DELAFS, "top", m.mnt, "-n", "2", "-d", "0.2"], timeout=60)
    assert "\x1b" not in r.stdout
    assert r.stdout.count("delafs top ") == 2
    v = parse_top(r.stdout.split("delafs top ")[-1], "data")
    assert v["extents"] == "DD" and v["cache"] == "dd", r.stdout
    for argv, why in [([str(tmp_path)], "is not on a delafs mount"),
                      ([m.mnt, "--file", "/etc/passwd"], "is not on the delafs mount"),
                      ([m.mnt, "-d", "0"], "positive"), ([m.mnt, "--files", "1000"], "bad number of files")]:
        r = run([DELAFS, "top", *argv, "-n", "1"], check=False, timeout=60)
        assert r.returncode != 0 and why in r.stderr and r.stderr.startswith("delafs top: "), (argv, r)


# -- stat --watch --------------------------------------------------------------------------

def test_stat_watch_streams_until_interrupted(delafs_mount):
    m = delafs_mount(size="64M")
    p = subprocess.Popen([DELAFS, "stat", "--watch", "0.2", "--json", m.mnt], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=_as_at_a_terminal)
    try:
        lines = [p.stdout.readline() for _ in range(3)]
        assert all(json.loads(x)["daemon"]["pid"] == m.pid for x in lines)
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=5) == 0 and time.monotonic() - t0 < 1.0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    for bad in ("0", "-1", "soon"):
        r = run([DELAFS, "stat", "--watch", bad, m.mnt], check=False)
        assert r.returncode == 1 and "positive" in r.stderr, r
    # SECONDS is optional: the mount point right after --watch is not it.
    p = subprocess.Popen([DELAFS, "stat", "--watch", m.mnt], stdout=subprocess.PIPE, text=True,
                         preexec_fn=_as_at_a_terminal)
    try:
        assert p.stdout.readline().strip().count(":") == 2       # the time of the first table
        assert p.stdout.readline().startswith("total blocks")
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=5) == 0


def _cold_read(m, path: str, read_ahead_kb: int | None) -> dict:
    """Remount (the kernel's cache of the file goes with the old mount),
    optionally set the mount's readahead window, read the file in 1 MiB
    reads and return the daemon's counts of FUSE request sizes."""
    m.cycle()
    if read_ahead_kb is not None:
        with open(_window_path(m), "w") as f:
            f.write(str(read_ahead_kb))
    in_effect = _window(m)
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, 1 << 20):
            pass
    finally:
        os.close(fd)
    sizes = m.stat()["fuse"]["request_sizes"]
    return {"read_ahead_kb": in_effect, "read": dict(sizes["read"]), "write": dict(sizes["write"])}


def test_stat_counts_request_sizes_and_a_larger_readahead_window_sends_larger_reads(delafs_mount):
    """READ requests are as large as the kernel's readahead window for the
    mount (the FUSE bdi's read_ahead_kb), not as the reader's read(2):
    `delafs stat` shows the sizes that arrive, so a user can see it, and
    raising the window through sysfs makes the reads larger and fewer."""
    m = delafs_mount(size="64M")
    f = m.path("f")
    with open(f, "wb") as out:
        out.write(os.urandom(8 << 20))
    written = m.stat()["fuse"]["request_sizes"]["write"]
    assert sum(size * n for size, n in written) >= 8 << 20, written
    assert all(size & (size - 1) == 0 for size, _ in written), "buckets are powers of two"

    default = _cold_read(m, f, None)
    big = _cold_read(m, f, 1024)
    assert big["read_ahead_kb"] == 1024
    for got in (default, big):
        assert sum(size * n for size, n in got["read"].items()) >= 8 << 20, got
        assert got["write"] == {}, got
    assert max(default["read"]) <= default["read_ahead_kb"] * 2048 < 1 << 20, default
    assert big["read"].get(1 << 20, 0) * (1 << 20) >= 4 << 20, big
    assert sum(big["read"].values()) < sum(default["read"].values()), (default, big)
    plain = run([DELAFS, "stat", m.mnt]).stdout
    assert re.search(r"READ sizes\s+.*1\.0 MiB x\d+", plain), plain


def test_the_read_ahead_option_sets_the_window_before_mount_returns(delafs_mount):
    """-o read_ahead=SIZE is the sysfs setting above made a mount option
    (for fstab): the daemon writes it once the kernel has taken its INIT
    reply (which would otherwise clamp it back), before `delafs mount`
    returns; without the option the kernel's default stays."""
    m = delafs_mount(size="64M", opts="read_ahead=1M")
    assert _window(m) == 1024
    f = m.path("f")
    with open(f, "wb") as out:
        out.write(os.urandom(8 << 20))
    got = _cold_read(m, f, None)            # remounts with the same options
    assert got["read_ahead_kb"] == 1024
    assert got["read"].get(1 << 20, 0) * (1 << 20) >= 4 << 20, got
    m.cycle(opts="")
    assert _window(m) == 128                 # VM_READAHEAD_PAGES: the kernel's default


def _window_path(m) -> str:
    """The mount's readahead window in sysfs (its FUSE connection's bdi)."""
    st_dev = os.stat(m.mnt).st_dev
    return f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/read_ahead_kb"


def _window(m) -> int:
    with open(_window_path(m)) as f:
        return int(f.read())



# -- start-up cost of the commands that only talk to a daemon ------------------------------

_IMPORTS = """
import json, os, sys
from delafs.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
with open(os.environ["DELAFS_IMPORTS"], "w") as f:
    json.dump({"rc": rc, "heavy": [m for m in ("trio", "pyfuse3", "sortedcontainers", "delafs.fs.filesystem")
                                   if m in sys.modules]}, f)
"""


def test_commands_that_only_talk_to_the_daemon_do_not_load_the_engine(delafs_mount, tmp_path):
    """stat, sync, inject, bmap and umount ask a running daemon through its
    control file or inspection socket: they must not pay for importing trio,
    pyfuse3 and the filesystem (half a second per command on a small
    machine, and the tests run thousands of them)."""
    m = delafs_mount(size="64M", opts=HOLD)
    with open(m.path("f"), "wb") as out:
        out.write(b"x" * 8192)
    result = tmp_path / "imports.json"

    def imports(*argv: str) -> list[str]:
        r = run([PYTHON, "-c", _IMPORTS, *argv], env={**os.environ, "DELAFS_IMPORTS": str(result)},
                capture_output=True, text=True)
        got = json.loads(result.read_text())
        assert got["rc"] in (0, None), (argv, r.stdout, r.stderr)
        return got["heavy"]

    for argv in (["stat", m.mnt], ["stat", "--json", m.mnt], ["sync", m.mnt],
                 ["inject", m.mnt, "short_copy=0"], ["bmap", m.path("f")], ["--help"],
                 ["umount", m.mnt]):
        assert imports(*argv) == [], argv
    assert not os.path.ismount(m.mnt)
    # The commands that do need the engine still load it.
    assert "delafs.fs.filesystem" in imports("fsck", "-n", m.image)


def test_output_into_a_closed_pipe_ends_quietly(delafs_mount):
    """`delafs stat MNT | head -3`: once the reader is gone, the next write
    raised BrokenPipeError and a traceback went to the terminal; a command
    in a pipeline ends quietly instead, as cat or ls do."""
    m = delafs_mount()
    for unbuffered in ("1", ""):            # every line its own write, or one flush at the end
        env = dict(os.environ, PYTHONUNBUFFERED=unbuffered)
        for cmd in (f"{DELAFS} stat {m.mnt} | true", f"{DELAFS} stat --json {m.mnt} | head -c 1 >/dev/null"):
            r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=60)
            assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, (unbuffered, cmd, r.stderr)


def test_the_daemons_fuse_readers_take_turns_with_a_mutex(delafs_mount):
    """delafs stat says the daemon's pyfuse3 made its session loop's read
    lock through fuse/loop.py (a Mutex, not a trio.Lock), and the loop
    serves concurrent callers with it."""
    m = delafs_mount()
    errors = []

    def writer(i):
        try:
            for j in range(50):
                with open(m.path(f"f{i}"), "ab") as f:
                    f.write(bytes([i]) * 1000)
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        with open(m.path(f"f{i}"), "rb") as f:
            assert f.read() == bytes([i]) * 50_000
    assert m.stat()["daemon"]["pyfuse3_read_lock"] == "Mutex"
    m.umount()
    m.fsck()
