"""Real programs against crash states of a running daemon.

sqlite and git run on a mount whose every device write, flush and discard
is logged (``-o log_writes=FILE``, dm-log-writes in spirit) with a short
dirty expiry, so the flusher writes back while they work.  After each
transaction sqlite commits (it fsyncs the database, its rollback journal
and the directory) and after each git commit followed by ``delafs sync``,
the test writes a mark into the log (sqlite runs with synchronous=EXTRA:
with FULL, a commit's journal unlink is not synced before COMMIT returns,
and sqlite does not promise the last transaction).  Each crash image the device's
volatile cache allows (every flush point, plus cuts inside the unflushed
window with writes dropped, reordered and torn) must then be a state the
programs accept (fsck clean, sqlite's integrity_check ok, ``git fsck``
clean) holding at least every transaction and commit marked before the
crash.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import sqlite3
import subprocess
import threading

import pytest
from crash.workload import InlineDevice

from delafs.block.logwrites import read_write_log
from delafs.fs.filesystem import Filesystem
from delafs.fs.fsck import check
from delafs.testing.crashsim import build_image, crash_cuts, flush_points

from .conftest import run

ROOT = 1
OPTS = "dirty_expire=0.01,writeback_interval=0.01,commit_interval=0.05"
GITCONFIG = """\
[user]
    name = delafs test
    email = test@delafs.invalid
[core]
    fsync = all
    fsyncMethod = fsync
[init]
    defaultBranch = main
[gc]
    auto = 0
"""


class Workload:
    """sqlite and git on the mount at once, each marking its promises."""

    def __init__(self, m, tmp_path, *, transactions: int, commits: int, synchronous: str = "EXTRA"):
        self.m = m
        self.synchronous = synchronous
        self.transactions = transactions
        self.commits = commits
        self.gitconfig = tmp_path / "gitconfig"
        self.gitconfig.write_text(GITCONFIG)
        self.lock = threading.Lock()

    def mark(self, label: str) -> None:
        from delafs.fuse.control import control_command
        with self.lock:
            control_command(self.m.mnt, f"mark {label}")

    def sqlite(self) -> None:
        db = sqlite3.connect(self.m.path("db.sqlite"), isolation_level=None)
        db.execute("PRAGMA journal_mode=DELETE")
        # FULL leaves the journal's unlink (the commit point) to a later
        # directory sync; EXTRA syncs the directory before COMMIT returns.
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute("BEGIN")
        db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
        db.execute("CREATE TABLE c (n INTEGER)")
        db.execute("INSERT INTO c VALUES (0)")
        db.execute("COMMIT")
        self.mark("sqlite-0")
        rng = random.Random(1)
        for k in range(1, self.transactions + 1):
            db.execute("BEGIN")
            db.execute("INSERT INTO t VALUES (?, ?)", (k, rng.randbytes(rng.choice((100, 3000, 9000)))))
            if k % 4 == 0:      # rewrite older rows: pages the flusher may be writing back
                db.execute("UPDATE t SET v = ? WHERE k = ?", (rng.randbytes(5000), rng.randint(1, k)))
            db.execute("UPDATE c SET n = ?", (k,))
            db.execute("COMMIT")
            self.mark(f"sqlite-{k}")
        db.close()

    def git(self) -> None:
        repo = self.m.path("repo")
        env = {**os.environ, "GIT_CONFIG_GLOBAL": str(self.gitconfig), "GIT_CONFIG_NOSYSTEM": "1"}

        def git(*args):
            run(["git", "-C", repo, *args], env=env)
        os.mkdir(repo)
        git("init", "-q")
        rng = random.Random(2)
        for k in range(1, self.commits + 1):
            for i in range(5):
                with open(os.path.join(repo, f"file{rng.randrange(12)}.txt"), "w") as f:
                    f.write(f"commit {k} file {i}\n" * rng.randint(1, 400))
            git("add", "-A")
            git("commit", "-q", "-m", f"commit {k}")
            self.m.sync()
            self.mark(f"git-{k}")

    def run(self) -> None:
        errors = []

        def guard(fn):
            try:
                fn()
            except BaseException as e:        # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=guard, args=(fn,)) for fn in (self.sqlite, self.git)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


async def extract(fs, ino: int, dest: str) -> None:
    """Copy the directory tree at ``ino`` out of the image to ``dest``."""
    os.makedirs(dest, exist_ok=True)
    cookie = 0
    while True:
        entries = await fs.readdir(ino, cookie)
        if not entries:
            return
        for name, child, _kind, cookie in entries:
            if name in (b".", b".."):
                continue
            inode = await fs.getattr(child)
            path = os.path.join(dest, os.fsdecode(name))
            if inode.is_dir:
                await extract(fs, child, path)
            elif inode.is_reg:
                with open(path, "wb") as f:
                    f.write(await fs.pread(child, 0, inode.size))


def promised(marks, prefix: str, upto: int) -> int | None:
    """The highest ``prefix-N`` mark a crash after ``events[:upto]`` must
    keep: the program was told before the crash."""
    got = [int(label.split("-")[1]) for at, label in marks if label.startswith(prefix + "-") and at <= upto]
    return max(got, default=None)


async def check_image(path: str, events, marks, upto: int, scratch: str) -> list[str]:
    out = io.StringIO()
    with InlineDevice.open(path) as dev:
        report = await check(dev, repair=False, out=out)
    if report.exit_code != 0:
        return [f"fsck exit {report.exit_code}: {out.getvalue()[-1500:]}"]
    shutil.rmtree(scratch, ignore_errors=True)
    with InlineDevice.open(path) as dev:
        fs = await Filesystem.open(dev)
        await extract(fs, ROOT, scratch)
        await fs.close()
    bad = []
    want = promised(marks, "sqlite", upto)
    db_path = os.path.join(scratch, "db.sqlite")
    if want is not None:
        if not os.path.exists(db_path):
            bad.append(f"sqlite: the database is gone, {want} transactions were committed")
        else:
            db = sqlite3.connect(db_path)       # rolls back a hot journal, as sqlite would
            try:
                ok = db.execute("PRAGMA integrity_check").fetchone()[0]
                n = db.execute("SELECT n FROM c").fetchone()[0]
                rows = db.execute("SELECT count(*), coalesce(max(k), 0) FROM t").fetchone()
            except sqlite3.DatabaseError as e:
                bad.append(f"sqlite: {e}")
            else:
                if ok != "ok":
                    bad.append(f"sqlite integrity_check: {ok}")
                if n < want:
                    bad.append(f"sqlite: {n} transactions survive, {want} were committed")
                if rows != (n, n):
                    bad.append(f"sqlite: rows {rows} do not match the counter {n}")
            finally:
                db.close()
    want = promised(marks, "git", upto)
    repo = os.path.join(scratch, "repo")
    if want is not None:
        r = subprocess.run(["git", "-C", repo, "fsck", "--full", "--no-dangling"],
                           capture_output=True, text=True, env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1"})
        if r.returncode != 0:
            bad.append(f"git fsck exit {r.returncode}: {(r.stdout + r.stderr)[-800:]}")
        else:
            r = subprocess.run(["git", "-C", repo, "rev-list", "--count", "HEAD"],
                               capture_output=True, text=True)
            count = int(r.stdout) if r.returncode == 0 else 0
            if count < want:
                bad.append(f"git: HEAD has {count} commits, {want} were committed and synced")
    return bad


async def record_and_check(delafs_mount, tmp_path, *, transactions, commits, max_images, seed,
                           synchronous="EXTRA"):
    m = delafs_mount(size="32M", opts=OPTS)
    m.umount()
    base = str(tmp_path / "base.img")
    shutil.copyfile(m.image, base)
    wlog = str(tmp_path / "writes.log")
    m.mount(f"{OPTS},log_writes={wlog}")
    Workload(m, tmp_path, transactions=transactions, commits=commits, synchronous=synchronous).run()
    m.umount()
    events, marks = read_write_log(wlog)
    assert len(marks) == transactions + 1 + commits, marks
    rng = random.Random(seed)
    points = sorted(set(flush_points(events)) | {at for at, _ in marks})
    cuts = crash_cuts(events, rng, variants_per_point=2, points=points)
    if len(cuts) > max_images:
        cuts = sorted(rng.sample(cuts, max_images), key=lambda c: c.upto)
    dest = str(tmp_path / "crash.img")
    violations = []
    for cut in cuts:
        extra = {"rng": random.Random(cut.seed)} if cut.opts else {}
        build_image(base, events, dest, upto=cut.upto, **cut.opts, **extra)
        for b in await check_image(dest, events, marks, cut.upto, str(tmp_path / "tree")):
            violations.append(f"[{cut.label}, upto {cut.upto}] {b}")
    # The clean unmount's image: everything.
    build_image(base, events, dest, upto=len(events))
    final = await check_image(dest, events, marks, len(events), str(tmp_path / "tree"))
    return events, marks, cuts, violations + [f"[after umount] {b}" for b in final]


async def test_sqlite_and_git_survive_every_crash_state(delafs_mount, tmp_path):
    events, marks, cuts, bad = await record_and_check(delafs_mount, tmp_path, transactions=30,
                                                      commits=6, max_images=110, seed=1)
    print(f"{len(events)} device events, {len(marks)} marks, {len(cuts)} crash images checked")
    assert len(cuts) >= 100
    assert not bad, "\n".join(bad[:20])


@pytest.mark.slow
async def test_sqlite_and_git_survive_many_crash_states(delafs_mount, tmp_path):
    events, marks, cuts, bad = await record_and_check(delafs_mount, tmp_path, transactions=150,
                                                      commits=25, max_images=3000, seed=2)
    print(f"{len(events)} device events, {len(marks)} marks, {len(cuts)} crash images checked")
    assert not bad, "\n".join(bad[:20])


async def test_the_oracle_sees_a_commit_that_was_never_synced(delafs_mount, tmp_path):
    """Not vacuous: with synchronous=FULL sqlite returns from COMMIT before
    the journal's unlink (its commit point) is synced, so some crash states
    lack the last committed transaction, and the check must say so."""
    _, _, cuts, bad = await record_and_check(delafs_mount, tmp_path, transactions=30, commits=1,
                                             max_images=110, seed=1, synchronous="FULL")
    assert any("were committed" in b for b in bad), f"no lost commit in {len(cuts)} crash images"


def test_mark_without_a_write_log_is_refused(delafs_mount):
    from delafs.fuse.control import control_command
    m = delafs_mount(size="32M")
    with pytest.raises(OSError) as e:
        control_command(m.mnt, "mark x")
    assert e.value.errno == 22
