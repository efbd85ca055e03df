"""A mounted filesystem with one damaged metadata block, met as a user meets it.

Each test populates an image through a real mount, unmounts it, damages
one B+tree node in place (zeroed, or edited and resealed with a valid
checksum) and mounts it again.  What must hold: every request is answered
(an errno, never a hang), nothing but the damaged block's items is lost,
nothing wrong is ever served, and the CLI stays usable.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
import tempfile

import pytest

from delafs.fs.btree import pack_key
from delafs.fs.items import T_DIRENT, T_EXTENT, T_INODE
from delafs.testing.crashsim import sparse_copy
from delafs.testing.damage import reseal_node, tree_leaves, zero_block

from .conftest import DELAFS, PYTHON, DelafsMount, is_mounted, pid_alive, run, wait_until

HANG = 20          # seconds: a request not answered by then never will be


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


_READER = """
import hashlib, os, sys
for path in sys.argv[1:]:
    try:
        with open(path, "rb") as f:
            print("ok", hashlib.sha256(f.read()).hexdigest(), flush=True)
    except OSError as e:
        print("err", e.errno, flush=True)
"""


def read_in_child(*paths: str) -> list[tuple[str, str | int]]:
    """Read whole files in one child process, in order: ("ok", sha256 hex)
    or ("err", errno) each, then ("hang", 0) for every file from the one
    that did not return in HANG seconds on (the child is then stuck in the
    kernel until the daemon dies: the fixture's cleanup kills it)."""
    p = subprocess.Popen([PYTHON, "-c", _READER, *paths], stdout=subprocess.PIPE)
    try:
        out, _ = p.communicate(timeout=HANG)
    except subprocess.TimeoutExpired as e:
        p.kill()            # not waited for: it may be stuck in the kernel
        out = e.output or b""
    got: list[tuple[str, str | int]] = []
    for line in out.decode().splitlines():
        kind, _, val = line.partition(" ")
        if kind in ("ok", "err") and val:
            got.append((kind, val if kind == "ok" else int(val)))
    return got + [("hang", 0)] * (len(paths) - len(got))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def populate(m, nfiles: int = 120) -> dict[str, bytes]:
    """Files of a few blocks each in the root and /many (several leaves of
    directory entries), and /frag: one extent per written block, so its
    extents fill leaves of their own."""
    files = {}
    os.mkdir(m.path("many"))
    for i in range(nfiles):
        for name in (f"f{i}", f"many/e{i:03d}"):
            data = pattern(hash(name) & 0xFFFF, 1000 + 97 * i)
            with open(m.path(name), "wb") as f:
                f.write(data)
            files[name] = data
    frag = bytearray()
    with open(m.path("frag"), "wb") as f:
        for b in range(0, 1200, 2):
            chunk = pattern(b, 4096)
            f.seek(b * 4096)
            f.write(chunk)
            frag[b * 4096:] = bytes(b * 4096 - len(frag)) + chunk
    files["frag"] = bytes(frag)
    return files


@pytest.fixture(scope="module")
def populated(tmp_path_factory, mount_base):
    """(image, files, ino_of): one image populated through a real mount,
    unmounted, for the whole module (every test damages a copy)."""
    base = tmp_path_factory.mktemp("damaged")
    image, mnt = str(base / "populated.img"), tempfile.mkdtemp(prefix="populate-", dir=mount_base)
    run([DELAFS, "mkfs", image, "--size", "64M"])
    m = DelafsMount(image, mnt, "", str(base / "daemon.log"))
    m.pids = []
    try:
        m.mount()
        files = populate(m)
        inos = {name: os.stat(m.path(name)).st_ino for name in files}
        m.umount()
    finally:
        m.cleanup()
    assert not m.tracebacks(), m.tracebacks()
    return image, files, inos


@pytest.fixture
def damaged(populated, delafs_mount, tmp_path):
    """(m, files, ino_of): a copy of the populated image, unmounted; the
    test damages it and mounts it."""
    image, files, inos = populated
    copy = str(tmp_path / "damaged.img")
    sparse_copy(image, copy)
    m = delafs_mount(image=copy, mkfs=False, mount=False)
    return m, files, inos


def dirent_leaves(image: str, files_by_ino: dict) -> list:
    """Leaves holding no directory's inode item: damaging one costs
    entries (and files' items), never a whole directory."""
    return [leaf for leaf in tree_leaves(image)
            if not any(k[1] == T_INODE and k[0] not in files_by_ino for k in leaf.keys)]


def assert_intact(m, files: dict[str, bytes], skip: set[str]) -> None:
    names = [n for n in files if n not in skip]
    for name, (kind, got) in zip(names, read_in_child(*(m.path(n) for n in names))):
        assert (kind, got) == ("ok", sha(files[name])), f"{name}: {kind} {got}"


def test_reads_in_a_damaged_extent_leaf_answer_eio_every_time_and_never_hang(damaged):
    m, files, inos = damaged
    ino = inos["frag"]
    leaves = [leaf for leaf in tree_leaves(m.image)
              if any(k[0] == ino and k[1] == T_EXTENT for k in leaf.keys)]
    assert len(leaves) >= 3, "frag's extents should fill several leaves"
    zero_block(m.image, leaves[1].blocknr)
    m.mount()
    for attempt in range(3):
        [(kind, got)] = read_in_child(m.path("frag"))
        assert (kind, got) == ("err", errno.EIO), f"attempt {attempt}: {kind} {got}"
    assert_intact(m, files, skip={"frag"})
    m.umount()
    assert not is_mounted(m.mnt)


def test_a_file_next_to_a_damaged_leaf_still_reads(damaged):
    """A scan that runs to the end of a leaf must not read the next leaf
    when the parent's separator already shows its keys are past the range:
    the damaged leaf costs only the items it held."""
    m, files, inos = damaged
    leaves = tree_leaves(m.image)
    # A leaf whose first key starts a new inode: the items of the inode
    # before it end exactly at the end of the previous leaf.
    victim = next(leaf for leaf in leaves[1:] if leaf.keys[0][1] == T_INODE
                  and leaf.keys[0][0] in inos.values())
    lost = {k[0] for k in victim.keys}
    zero_block(m.image, victim.blocknr)
    m.mount()
    by_ino = {v: k for k, v in inos.items()}
    assert_intact(m, files, skip={by_ino[i] for i in lost if i in by_ino})
    m.umount()


def test_a_damaged_leaf_of_inodes_hides_only_its_own_files(damaged):
    m, files, inos = damaged
    by_ino = {v: k for k, v in inos.items()}
    # A leaf of file inodes (and their extents): no directory's entries.
    victim = next(leaf for leaf in tree_leaves(m.image)
                  if sum(1 for k in leaf.keys if k[1] == T_INODE and k[0] in by_ino) >= 5
                  and all(k[0] in by_ino for k in leaf.keys))
    lost = {by_ino[k[0]] for k in victim.keys if k[1] == T_INODE and k[0] in by_ino}
    zero_block(m.image, victim.blocknr)
    m.mount()
    # Every name is still listed; only the lost ones fail to stat.
    listed = set(os.listdir(m.mnt)) | {f"many/{n}" for n in os.listdir(m.path("many"))}
    assert set(files) <= listed, sorted(set(files) - listed)[:5]
    for name in sorted(lost):
        with pytest.raises(OSError) as e:
            os.stat(m.path(name))
        assert e.value.errno == errno.EIO, name
    assert_intact(m, files, skip=lost)
    m.umount()


def test_a_damaged_leaf_of_directory_entries_hides_only_its_entries(damaged):
    m, files, inos = damaged
    # The leaf with the most entries of one directory (where the keys fall
    # depends on the image's UUID, which salts the name hashes).
    by_ino = {v: k for k, v in inos.items()}
    victim = max(dirent_leaves(m.image, by_ino), key=lambda leaf: sum(k[1] == T_DIRENT for k in leaf.keys))
    ents = [k for k in victim.keys if k[1] == T_DIRENT]
    assert len(ents) >= 10, "no leaf with ten directory entries"
    dir_ino = ents[0][0]
    zero_block(m.image, victim.blocknr)
    m.mount()
    dirname = "" if dir_ino == 1 else "many"
    names = os.listdir(m.path(dirname)) if dirname else os.listdir(m.mnt)
    expect = {n.split("/")[-1] for n in files if (n.startswith("many/") if dirname else "/" not in n)}
    missing = expect - set(names)
    assert set(names) <= expect | {"many", "frag", "lost+found"}
    assert 0 < len(missing) <= len(ents), (len(missing), len(ents))
    # The leaf may also hold other items (inodes, extents) of some files.
    owned = {by_ino[k[0]] for k in victim.keys if k[0] in by_ino}
    assert_intact(m, files, skip={f"{dirname}/{n}" if dirname else n for n in missing} | owned)
    m.umount()


@pytest.mark.parametrize("edit", ["unknown_type", "extent_outside", "extent_length", "dirent_name",
                                  "inode_type"])
def test_a_resealed_leaf_with_wrong_content_answers_eio_not_wrong_data(damaged, edit):
    """Bytes changed and the checksum recomputed (a software bug, not bit
    rot): the reader checks what it decodes and answers EIO, never serves
    another file's bytes, zeros for data, or a name nobody created."""
    m, files, inos = damaged
    by_ino = {v: k for k, v in inos.items()}
    if edit == "dirent_name":
        leaf = max(dirent_leaves(m.image, by_ino), key=lambda leaf: sum(k[1] == T_DIRENT for k in leaf.keys))
    elif edit == "inode_type":
        leaf = next(leaf for leaf in tree_leaves(m.image)
                    if leaf.keys[-1][1] == T_EXTENT and (leaf.keys[-1][0], T_INODE, 0) in leaf.keys
                    and by_ino.get(leaf.keys[-1][0], "frag") != "frag")
    else:
        # The leaf's last item is an extent of one of our files, so changing
        # its key's type keeps the keys in order.
        leaf = next(leaf for leaf in tree_leaves(m.image)
                    if leaf.keys[-1][1] == T_EXTENT and leaf.keys[-1][0] in by_ino
                    and by_ino[leaf.keys[-1][0]] != "frag")
    i = len(leaf.keys) - 1
    if edit == "dirent_name":
        i = next(j for j, k in enumerate(leaf.keys) if k[1] == T_DIRENT)
    if edit == "inode_type":
        i = leaf.keys.index((leaf.keys[-1][0], T_INODE, 0))

    def change(node):
        k = node.keys[i]
        v = bytearray(node.vals[i])
        if edit == "unknown_type":
            node.pkeys[i] = pack_key((k[0], 0xEE, k[2]))
        elif edit == "extent_outside":
            v[0:8] = (2**40).to_bytes(8, "little")
        elif edit == "extent_length":
            v[8:12] = (2**32 - 2).to_bytes(4, "little")
        elif edit == "inode_type":
            mode = int.from_bytes(v[4:8], "little")          # a regular file becomes a symlink
            v[4:8] = (mode & 0o7777 | 0o120000).to_bytes(4, "little")
        else:
            v[9] ^= 0x20                       # a name byte: no longer its key's hash
        node.vals[i] = bytes(v)

    reseal_node(m.image, leaf.blocknr, change)
    m.mount()
    names = {f"many/{n}" for n in os.listdir(m.path("many"))} | set(os.listdir(m.mnt))
    assert names <= set(files) | {"many", "lost+found"}, sorted(names - set(files))
    if edit != "dirent_name":
        victim = by_ino[leaf.keys[-1][0]]
        assert read_in_child(m.path(victim)) == [("err", errno.EIO)], victim
    for name, (kind, got) in zip(files, read_in_child(*(m.path(n) for n in files))):
        assert kind != "hang", name
        assert kind == "err" or got == sha(files[name]), f"{name}: wrong data served"
    m.umount()


def test_sick_filesystem_cli_answers_in_one_line_and_umount_unmounts(damaged):
    """The last leaf damaged: a new file's inode lands in it.  `delafs
    sync` must fail (or succeed) in one line, and `delafs umount` must
    always take the mount down."""
    m, files, inos = damaged
    zero_block(m.image, tree_leaves(m.image)[-1].blocknr)
    m.mount()
    m.tracebacks_ok = True
    for i in range(5):
        try:
            with open(m.path(f"new{i}"), "wb") as f:
                f.write(b"x" * 5000)
        except OSError as e:
            assert e.errno == errno.EIO
    r = run([DELAFS, "sync", m.mnt], check=False)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode in (0, 1) and len(r.stderr.strip().splitlines()) <= 1, r.stderr
    pid = m.pid
    r = run([DELAFS, "umount", m.mnt], check=False, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    assert not is_mounted(m.mnt), f"delafs umount left the mount up: {r.stderr}"
    assert wait_until(lambda: not pid_alive(pid), 30), "the daemon outlived delafs umount"
    m.pid = None


def test_cli_on_a_read_only_mount(damaged):
    m, files, inos = damaged
    m.mount("ro")
    r = run([DELAFS, "sync", m.mnt], check=False)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    r = run([DELAFS, "stat", "--json", m.mnt], check=False)
    assert r.returncode == 0 and '"readonly": true' in r.stdout, r.stderr
    pid = m.pid
    r = run([DELAFS, "umount", m.mnt], check=False, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert not is_mounted(m.mnt)
    assert wait_until(lambda: not pid_alive(pid), 30)
    m.pid = None


# -- every request answers -------------------------------------------------------------

def test_every_handler_goes_through_the_reply_wrapper():
    """A handler without _reply would let an unexpected exception leave a
    request unanswered (pyfuse3 logs it; the caller waits forever).  Not
    forget: it has no reply, and pyfuse3 does not catch its exceptions at
    all (they end the daemon), so it logs and swallows them itself
    (test_lifetime.py's read-only mount test)."""
    import pyfuse3

    from delafs.fuse.operations import Operations
    handlers = [n for n, v in vars(pyfuse3.Operations).items()
                if callable(v) and not n.startswith("_") and n in vars(Operations)]
    assert len(handlers) > 25
    unwrapped = [n for n in handlers if n not in ("init", "stacktrace", "forget")
                 and not hasattr(getattr(Operations, n), "__wrapped__")]
    assert not unwrapped, unwrapped


ATTEMPTS = """
import errno, os, sys
mnt = sys.argv[1]
p = lambda *a: os.path.join(mnt, *a)
tries = {
    "lookup": lambda: os.stat(p("no-such-name")),
    "create": lambda: open(p("new"), "w"),
    "mkdir": lambda: os.mkdir(p("d2")),
    "symlink": lambda: os.symlink("a", p("s2")),
    "link": lambda: os.link(p("a"), p("a2")),
    "unlink": lambda: os.unlink(p("a")),
    "rename": lambda: os.rename(p("a"), p("b")),
    "setattr": lambda: os.chmod(p("a"), 0o600),
    "open": lambda: os.close(os.open(p("a"), os.O_RDONLY)),
    "opendir": lambda: os.listdir(p("d")),
    "setxattr": lambda: os.setxattr(p("a"), "user.x", b"1"),
    "getxattr": lambda: os.getxattr(p("a"), "user.k"),
    "listxattr": lambda: os.listxattr(p("a")),
    "statfs": lambda: os.statvfs(mnt),
}
bad = []
for name, op in tries.items():
    try:
        op()
        bad.append(f"{name}: succeeded")
    except OSError as e:
        if e.errno != errno.EIO:
            bad.append(f"{name}: {errno.errorcode.get(e.errno)}")
print("\\n".join(bad))
"""


def test_every_request_answers_an_unexpected_exception_with_eio(delafs_mount):
    """The handler_bug errortag makes every request (but the control
    file's) raise a RuntimeError inside the adapter: each caller gets EIO,
    none waits, and once the tag is off the daemon serves as before."""
    m = delafs_mount(size="32M")
    m.tracebacks_ok = True
    with open(m.path("a"), "wb") as f:
        f.write(b"x" * 5000)
    os.setxattr(m.path("a"), "user.k", b"v")
    os.mkdir(m.path("d"))
    fd = os.open(m.path("a"), os.O_RDWR)
    m.inject(handler_bug=1)
    r = run([PYTHON, "-c", ATTEMPTS, m.mnt], check=False, timeout=HANG * 3)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr
    for op in (lambda: os.pwrite(fd, b"y" * 10, 0), lambda: os.fsync(fd), lambda: os.close(fd)):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.EIO
    assert m.stat()["errortags"]["handler_bug"]["hits"] >= 15
    m.inject(handler_bug=0)
    os.mkdir(m.path("d2"))
    with open(m.path("a"), "rb") as f:
        assert f.read() == b"x" * 5000
    assert os.getxattr(m.path("a"), "user.k") == b"v"
    m.umount()
    m.fsck()


def test_mount_o_mkfs_never_formats_over_a_filesystem_it_can_still_read(delafs_mount):
    """-o mkfs formats a blank image.  It called an image blank when its
    first block was zeros: a delafs whose primary superblock was destroyed
    (which mounts from the secondary one), or btrfs and iso9660 (their
    signatures lie past 4 KiB), were formatted over.  It asks what
    `delafs mkfs` asks before it refuses."""
    m = delafs_mount()
    with open(m.path("keep"), "wb") as f:
        f.write(b"precious" * 1000)
    m.umount()
    zero_block(m.image, 0)
    m.mount("mkfs")
    with open(m.path("keep"), "rb") as f:
        assert f.read() == b"precious" * 1000
    m.umount()
