"""Layer 6, the block device: the image delafs lives in.

Everything above this module thinks in 4 KiB blocks; this module turns a block
number into a byte offset on one of three kinds of backing store:

* a regular (usually sparse) image file,
* a loop device, or
* a real block device.

The first is the common case and the other two differ only in how the size is
learned (``fstat`` versus the ``BLKGETSIZE64`` ioctl) and how freed space is
given back (``fallocate(PUNCH_HOLE)`` versus ``BLKDISCARD``).  Nothing here
knows what a block contains; that is the log's and the filesystem's business.

The primitives are synchronous (``read_sync``, ``write_sync``, ``flush_sync``,
``discard_sync``) so offline tools can use them directly.  The filesystem uses
the async wrappers, which run the same primitive in a trio worker thread: the
GIL is released for the duration of the syscall, so the event loop keeps
running CPU work (copying into folios, building journal records) while the
disk is busy, as the kernel overlaps CPU and I/O.

Two test hooks hang off every device:

* a :class:`~delafs.block.faults.FaultTable` fails chosen requests with a
  chosen errno *before* any I/O is issued, so a failed request never changes
  the image.  It is checked with one truthiness test when empty, so it costs
  nothing in production.
* a :class:`~delafs.block.recorder.Recorder` logs every completed write,
  flush and discard in completion order; :mod:`delafs.testing.crashsim`
  replays prefixes of that stream to build the images a power cut could have
  left behind.

Durability contract (what the upper layers may rely on): a write is on stable
storage only once a ``flush`` that *started after the write completed* has
returned.  That is the ``REQ_PREFLUSH`` rule the kernel's journaling
filesystems follow, and the one crashsim models.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
import threading
import time
from typing import Sequence

import trio

from ..lib.errors import FsError
from ..lib.units import BLOCK_SIZE
from .faults import FaultTable
from .iothread import in_worker_thread
from .recorder import Recorder

# ioctl numbers from <linux/fs.h>, in the generic _IOC encoding used by x86 and
# arm: BLKGETSIZE64 = _IOR(0x12, 114, size_t), BLKDISCARD = _IO(0x12, 119).
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277

# fallocate(2) mode bits; the os module exposes posix_fallocate only.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# Errnos meaning "this backing store cannot discard": discard is advisory, so
# these make it a no-op rather than an error.
_DISCARD_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS})

_IOV_MAX = os.sysconf("SC_IOV_MAX")

Buffer = bytes | bytearray | memoryview

def _libc_fallocate():
    """Bind fallocate(2) through ctypes: Python has no way to punch a hole."""
    # CDLL(None) is the running process, which has libc loaded; asking
    # ctypes.util.find_library would spawn ldconfig at import time.
    libc = ctypes.CDLL(None, use_errno=True)
    # fallocate64 takes a 64-bit off_t on every ABI; glibc on 64-bit hosts
    # makes fallocate an alias of it, musl only has fallocate.
    fn = getattr(libc, "fallocate64", None) or libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _libc_fallocate()


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset+length)`` of a regular file, keeping its size.

    The range reads back as zeros.  Raises OSError on failure, including
    EOPNOTSUPP when the host filesystem cannot punch holes.
    """
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def check_request(dev, op: str, blk: int = 0, count: int = 0) -> None:
    """The checks every device makes before a request, in order: read-only
    (discard), bounds (read, write, discard), injected faults, and for a
    flush the ``flush_eio`` errortag of the filesystem using the device.
    A failed check has changed nothing."""
    if op == "discard" and dev.readonly:
        raise FsError(errno.EROFS, f"image {dev.path} is open read-only")
    if op != "flush":
        if count < 0:
            raise ValueError(f"{op} of a negative block count ({count})")
        if blk < 0 or blk + count > dev.nblocks:
            raise FsError(errno.EIO, f"{op} of {blocks_str(blk, count)} beyond end of device "
                                     f"{dev.path} ({dev.nblocks} blocks)")
    if dev.faults:
        dev.faults.check(op, blk, count)
    if op == "flush" and dev.errortags is not None and dev.errortags.fires("flush_eio"):
        raise FsError(errno.EIO, f"injected cache flush error on {dev.path} (flush_eio)")


def submit_sync(dev, writes: Sequence[tuple[int, Sequence[Buffer]]]) -> list[FsError | None]:
    """Write each ``(blk, bufs)`` in order: the body of one ``dev.submit``
    call.  A failed write does not stop the others.  Returns each write's
    error, or None."""
    errors: list[FsError | None] = []
    for blk, bufs in writes:
        try:
            dev.write_sync(blk, bufs)
            errors.append(None)
        except FsError as e:
            errors.append(e)
    return errors


def write_fua_sync(dev, writes: Sequence[tuple[int, Sequence[Buffer]]], preflush: bool) -> None:
    """The body of one ``dev.write_fua`` call: a flush first if
    ``preflush`` (what was written before is durable before these writes
    start: REQ_PREFLUSH), the writes in order, then a flush (durable on
    return: REQ_FUA).  The first failure stops it and raises."""
    if preflush:
        dev.flush_sync()
    for blk, bufs in writes:
        dev.write_sync(blk, bufs)
    dev.flush_sync()


def prepare_write(dev, blk: int, bufs) -> tuple[list[memoryview], int, int]:
    """The checks every device makes before a write, in order: read-only,
    whole blocks per buffer, bounds, injected faults.  Returns the buffers
    as byte views, their total size and the block count."""
    if dev.readonly:
        raise FsError(errno.EROFS, f"image {dev.path} is open read-only")
    views = [memoryview(b).cast("B") for b in bufs]
    for v in views:
        if len(v) % BLOCK_SIZE:
            raise ValueError(f"write buffer of {len(v)} bytes is not a multiple of {BLOCK_SIZE}")
    nbytes = sum(len(v) for v in views)
    count = nbytes // BLOCK_SIZE
    check_request(dev, "write", blk, count)
    return views, nbytes, count


# How long a read the host's page cache could not serve at once polls it
# before waiting in a worker thread (the block layer's hybrid polling).  A
# RWF_NOWAIT miss has started the host's readahead; on a fast device the
# data lands well within a thread round trip, which costs 185-330 us on a
# 2-vCPU VM.  On a slow disk the poll costs this much CPU per cold read, and
# the read then waits in a thread as before.
READ_POLL = 0.00015


class BlockDevice:
    """An open image: block-addressed I/O on a file, loop or block device.

    Attributes:
        path: what was opened, for messages.
        kind: ``'file'`` or ``'block'``.
        readonly: opened ``O_RDONLY``; writes and discards raise EROFS.
        direct: opened ``O_DIRECT``; all I/O goes through page-aligned
            bounce buffers.
        size: device size in bytes; ``nblocks`` is ``size // BLOCK_SIZE`` (a
            trailing partial block of an odd-sized file is never used).
        faults: the :class:`FaultTable` checked before every request.
        recorder: a :class:`Recorder`, or None (the default) to record nothing.

    The sync primitives may run concurrently in several worker threads;
    ``pread``/``pwrite`` need no shared file offset, and the counters behind
    :meth:`statistics` are guarded by ``_stats_lock``.  Callers must not have
    two overlapping writes in flight, as with bios in the kernel: their order
    on the device would be undefined.
    """

    def __init__(self, fd: int, path: str, kind: str, size: int, *, readonly: bool, direct: bool):
        self._fd = fd
        self._alias_fds: list[int] = []     # the other names of the image, locked with it
        self.path = path
        self.kind = kind
        self.size = size
        self.nblocks = size // BLOCK_SIZE
        self.readonly = readonly
        self.direct = direct
        # Completed writes, and how many of them the last finished flush
        # covers (the count when it started): see unflushed.
        self._writes_done = 0
        self._writes_flushed = 0
        # RWF_NOWAIT reads work here (cleared where the host says EOPNOTSUPP).
        self.nowait_reads = True
        self.read_poll = READ_POLL
        self.faults = FaultTable()
        self.recorder: Recorder | None = None
        self.errortags = None           # set by Filesystem.attach_errortags
        self._stats_lock = threading.Lock()
        self._stats = dict.fromkeys(
            ("reads", "writes", "blocks_read", "blocks_written", "flushes", "discards"), 0
        )

    # -- opening and creating ------------------------------------------------

    @classmethod
    def open(cls, path: str, *, readonly: bool = False, direct: bool = False) -> "BlockDevice":
        """Open an image file or a block device.

        The path is checked with ``stat`` before opening so that a FIFO or a
        character device is rejected instead of blocking or misbehaving in
        ``open``, and again with ``fstat`` afterwards in case it was swapped
        in between.  There is deliberately no read-only fallback: whether a
        read-write open failing with EACCES/EROFS should become a read-only
        mount is the caller's policy.
        """
        path = os.fspath(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FsError(errno.ENOENT, f"image {path} does not exist") from None
        except OSError as e:
            raise FsError(e.errno, f"cannot access image {path}: {e.strerror}") from None
        _check_kind(path, st.st_mode)

        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise FsError(errno.ENOENT, f"image {path} does not exist") from None
        except OSError as e:
            if direct and e.errno == errno.EINVAL:
                raise FsError(
                    errno.EINVAL,
                    f"cannot open image {path} with O_DIRECT: the filesystem holding it "
                    "does not support direct I/O (tmpfs?); open it without direct mode",
                ) from None
            raise FsError(e.errno, f"cannot open image {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            kind = _check_kind(path, st.st_mode)
            if kind == "file":
                size = st.st_size
            else:
                raw = fcntl.ioctl(fd, BLKGETSIZE64, bytes(8))
                size = struct.unpack("Q", raw)[0]
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path, kind, size, readonly=readonly, direct=direct)

    @classmethod
    def create_file(cls, path: str, size: int) -> None:
        """Create a sparse image file of ``size`` bytes, or grow an existing one.

        Only ``ftruncate`` is used, so no data block is allocated.  An existing
        file larger than ``size`` is left alone: shrinking would silently cut
        off whatever the image holds past ``size``.
        """
        path = os.fspath(path)
        if size < 0:
            raise ValueError(f"image size must not be negative, got {size}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            parent = os.path.dirname(os.path.abspath(path))
            raise FsError(
                errno.ENOENT, f"cannot create image {path}: directory {parent} does not exist"
            ) from None
        except OSError as e:
            raise FsError(e.errno, f"cannot create image {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FsError(errno.EINVAL, f"cannot create image {path}: not a regular file")
            if st.st_size < size:
                os.ftruncate(fd, size)
        except OSError as e:
            raise FsError(e.errno, f"cannot size image {path}: {e.strerror}") from None
        finally:
            os.close(fd)

    # -- synchronous primitives ---------------------------------------------

    def read_sync(self, blk: int, count: int) -> bytes:
        """Read ``count`` blocks starting at ``blk``.

        Holes in a sparse file read as zeros, but a read that hits end of file
        (the image was truncated under us) is an EIO, never zero-filled: a
        journal or btree block that silently reads as zeros would be
        misdiagnosed as corruption much later.
        """
        check_request(self, "read", blk, count)
        if count == 0:
            return b""
        nbytes = count * BLOCK_SIZE
        try:
            data = self._read_direct(blk, nbytes) if self.direct else self._read_buffered(blk, nbytes)
        except OSError as e:
            raise self._io_error("read", blk, count, e) from None
        with self._stats_lock:
            self._stats["reads"] += 1
            self._stats["blocks_read"] += count
        return data

    def read_into_sync(self, blk: int, views: Sequence[memoryview]) -> None:
        """Read consecutive blocks from ``blk`` straight into ``views`` (each
        a whole number of blocks): a scatter read, no intermediate copy."""
        count = self._check_read_into(blk, views)
        if count:
            self._read_views(blk, views, count)

    def _check_read_into(self, blk: int, views: Sequence[memoryview]) -> int:
        count = sum(len(v) for v in views) // BLOCK_SIZE
        check_request(self, "read", blk, count)
        return count

    def _read_views(self, blk: int, views: Sequence[memoryview], count: int,
                    offset: int | None = None, *, nowait: bool = False) -> list[memoryview]:
        """preadv into ``views`` (the read of ``count`` blocks at ``blk``,
        from byte ``offset`` on) until they are full.  With ``nowait``, only
        what the host's page cache holds (RWF_NOWAIT): returns the views
        still to read, counting the read only when nothing is left."""
        if offset is None:
            offset = blk * BLOCK_SIZE
        try:
            if self.direct:
                fill_views(views, self._read_direct(blk, count * BLOCK_SIZE))
                views = []
            else:
                flags = os.RWF_NOWAIT if nowait else 0
                views = list(views)
                while views:
                    try:
                        n = os.preadv(self._fd, views[:_IOV_MAX], offset, flags)
                    except BlockingIOError:
                        if nowait:
                            return views
                        raise
                    except OSError as e:
                        if nowait and e.errno == errno.EOPNOTSUPP:
                            self.nowait_reads = False       # tmpfs, some FUSE hosts
                            return views
                        raise
                    if n == 0:
                        if nowait:
                            return views
                        raise _eof_error(offset)
                    offset += n
                    views = _advance(views, n)
        except OSError as e:
            raise self._io_error("read", blk, count, e) from None
        with self._stats_lock:
            self._stats["reads"] += 1
            self._stats["blocks_read"] += count
        return []

    def write_sync(self, blk: int, bufs: Sequence[Buffer]) -> None:
        """Write the concatenation of ``bufs`` to consecutive blocks from ``blk``.

        Each buffer must be a whole number of blocks, so a caller can hand in
        folio-sized pieces without gluing them together.
        """
        views, nbytes, count = prepare_write(self, blk, bufs)
        if count == 0:
            return
        try:
            if self.direct:
                self._write_direct(blk, views, nbytes)
            else:
                self._write_buffered(blk, views)
        except OSError as e:
            raise self._io_error("write", blk, count, e) from None
        with self._stats_lock:
            self._writes_done += 1
            self._stats["writes"] += 1
            self._stats["blocks_written"] += count
        if self.recorder is not None:
            self.recorder.events.append(("write", blk, b"".join(views)))

    @property
    def unflushed(self) -> bool:
        """A completed write is not yet covered by a *finished* flush: a
        journal commit must flush before its records (log/journal.py).  A
        flush still in flight does not count: a commit record written while
        it runs could reach the disk before the data that flush is making
        durable."""
        return self._writes_done != self._writes_flushed

    def writes_done(self) -> int:
        """The count of completed writes: a flush starting now covers them."""
        with self._stats_lock:
            return self._writes_done

    def note_flushed(self, covers: int) -> None:
        """A flush that started when ``writes_done()`` was ``covers`` has
        finished."""
        with self._stats_lock:
            self._writes_flushed = max(self._writes_flushed, covers)
            self._stats["flushes"] += 1

    def flush_sync(self) -> None:
        """Make every completed write durable (``fdatasync``).

        On a block device this also issues a cache flush to the hardware, which
        is what the log's commit records depend on.
        """
        check_request(self, "flush")
        covers = self.writes_done()         # a write completing from now on needs a later flush
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise FsError(e.errno, f"flush of image {self.path} failed: {e.strerror}") from None
        self.note_flushed(covers)
        if self.recorder is not None:
            self.recorder.events.append(("flush",))

    def discard_sync(self, blk: int, count: int) -> None:
        """Tell the backing store that ``count`` blocks from ``blk`` are free.

        For an image file this punches a hole, so the image stays as sparse as
        the filesystem in it; for a block device it is ``BLKDISCARD`` (TRIM).
        Discard is advisory: where the backing store cannot do it, this is a
        no-op.  Callers must not expect discarded blocks to read as zeros (a
        block device may return old data).
        """
        check_request(self, "discard", blk, count)
        if count == 0:
            return
        offset, length = blk * BLOCK_SIZE, count * BLOCK_SIZE
        try:
            if self.kind == "file":
                punch_hole(self._fd, offset, length)
            else:
                fcntl.ioctl(self._fd, BLKDISCARD, struct.pack("QQ", offset, length))
        except OSError as e:
            if e.errno not in _DISCARD_UNSUPPORTED:
                raise self._io_error("discard", blk, count, e) from None
        with self._stats_lock:
            self._stats["discards"] += 1
        if self.recorder is not None:
            self.recorder.events.append(("discard", blk, count))

    # -- async wrappers -----------------------------------------------------
    #
    # Each runs the syscall in a worker thread (in_worker_thread).  None is
    # abandoned on cancellation: a cancelled caller still waits for the
    # syscall, so it never returns while a write it started may be half-way
    # onto the image.

    async def read(self, blk: int, count: int) -> bytes:
        buf = bytearray(count * BLOCK_SIZE)
        await self.read_into(blk, [memoryview(buf)])
        return bytes(buf)

    async def read_into(self, blk: int, views: Sequence[memoryview]) -> None:
        """What the host's page cache holds is read at once, without a trip
        to a worker thread (which costs more than such a read).  For the
        rest, poll the host's cache for up to ``read_poll`` seconds, letting
        other tasks run in between, then wait for the disk in a thread."""
        count = self._check_read_into(blk, views)
        if not count:
            return
        total = sum(len(v) for v in views)
        start = blk * BLOCK_SIZE
        rest: Sequence[memoryview] = views
        if self.nowait_reads and not self.direct:
            rest = self._read_views(blk, views, count, nowait=True)
            if rest and self.read_poll > 0:
                deadline = time.perf_counter() + self.read_poll
                while rest and self.nowait_reads and time.perf_counter() < deadline:
                    await trio.lowlevel.checkpoint()
                    done = total - sum(len(v) for v in rest)
                    rest = self._read_views(blk, rest, count, start + done, nowait=True)
        if rest:
            done = total - sum(len(v) for v in rest)
            await in_worker_thread(self._read_views, blk, rest, count, start + done)

    async def write(self, blk: int, bufs: Sequence[Buffer]) -> None:
        await in_worker_thread(self.write_sync, blk, bufs)

    async def flush(self) -> None:
        await in_worker_thread(self.flush_sync)

    async def submit(self, writes):
        """Many writes in one trip to a worker thread (a block plug): each
        trip costs as much as a small pwrite.  See submit_sync."""
        return await in_worker_thread(submit_sync, self, writes)

    async def write_fua(self, writes, *, preflush: bool) -> None:
        """A log write (REQ_PREFLUSH | REQ_FUA) in one trip to a worker
        thread where a flush, the writes and a flush would make three.  See
        write_fua_sync."""
        await in_worker_thread(write_fua_sync, self, writes, preflush)

    async def discard(self, blk: int, count: int) -> None:
        await in_worker_thread(self.discard_sync, blk, count)

    # -- exclusive use --------------------------------------------------------

    def lock(self, *, wait: float = 0.0) -> None:
        """Take an exclusive ``flock`` on the image, waiting up to ``wait`` seconds.

        flock locks belong to the open file description, so a second
        BlockDevice on the same path conflicts even inside one process, and
        the kernel drops the lock when the daemon dies, however it dies.  The
        wait exists because ``umount`` returns before a FUSE daemon has
        finished its final flush: a following mount or fsck must wait for it.
        """
        deadline = time.monotonic() + wait
        while True:
            held = self._try_lock()
            if held is None:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                through = "" if held == self.path else f" through {held}"
                raise FsError(
                    errno.EBUSY,
                    f"image {self.path} is in use by another delafs process{through} (lock held)",
                )
            time.sleep(min(0.1, remaining))

    def _try_lock(self) -> str | None:
        """Lock the image under every name it has here: the node opened and,
        for a loop device, its backing file, or for a file, the loop
        devices over it (the same blocks: a lock on one name alone let two
        daemons write them).  Returns None, or the name another holds."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return self.path
        fds: list[int] = []
        for path in self._aliases():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue                # detached or gone meanwhile
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                for f in fds:
                    os.close(f)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                return path
        for fd in self._alias_fds:
            os.close(fd)
        self._alias_fds = fds
        return None

    def _aliases(self) -> list[str]:
        """The other names of this image's blocks on this host."""
        st = os.fstat(self._fd)
        if self.kind == "block":
            sysfs = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/loop/backing_file"
            try:
                with open(sysfs) as f:
                    backing = f.read().strip()
            except OSError:
                return []           # not a loop device
            return [backing] if os.path.exists(backing) else []
        loops = []
        try:
            names = os.listdir("/sys/block")
        except OSError:
            return []
        for name in names:
            if not name.startswith("loop"):
                continue
            try:
                with open(f"/sys/block/{name}/loop/backing_file") as f:
                    b = os.stat(f.read().strip())
            except OSError:
                continue            # unattached, or its file is gone
            if (b.st_dev, b.st_ino) == (st.st_dev, st.st_ino):
                loops.append(f"/dev/{name}")
        return loops

    def unlock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        for fd in self._alias_fds:
            os.close(fd)
        self._alias_fds = []

    def close(self) -> None:
        """Close the image (releasing any lock); calling it again does nothing."""
        for fd in self._alias_fds:
            os.close(fd)
        self._alias_fds = []
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> "BlockDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def statistics(self) -> dict:
        """Counts of completed requests, and of requests failed by injection."""
        with self._stats_lock:
            stats = dict(self._stats)
        stats["injected_errors"] = self.faults.fired
        return stats

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"<BlockDevice {self.path} {self.kind} {mode}{' direct' if self.direct else ''} {self.nblocks} blocks>"

    # -- helpers ----------------------------------------------------------------

    def _io_error(self, op: str, blk: int, count: int, e: OSError) -> FsError:
        return FsError(
            e.errno or errno.EIO,
            f"{op} of {blocks_str(blk, count)} on {self.path} failed: {e.strerror}",
        )

    def _read_buffered(self, blk: int, nbytes: int) -> bytes:
        offset = blk * BLOCK_SIZE
        data = os.pread(self._fd, nbytes, offset)
        if len(data) == nbytes:
            return data
        # A short read before EOF is legal; keep reading, but EOF is an error.
        parts = [data]
        done = len(data)
        while done < nbytes:
            chunk = os.pread(self._fd, nbytes - done, offset + done)
            if not chunk:
                raise _eof_error(offset + done)
            parts.append(chunk)
            done += len(chunk)
        return b"".join(parts)

    def _read_direct(self, blk: int, nbytes: int) -> bytes:
        # O_DIRECT needs the buffer aligned to the logical block size; an
        # anonymous mmap is page aligned, which is always enough.
        offset = blk * BLOCK_SIZE
        with mmap.mmap(-1, nbytes) as buf:
            with memoryview(buf) as view:
                done = 0
                while done < nbytes:
                    n = os.preadv(self._fd, [view[done:]], offset + done)
                    if n == 0:
                        raise _eof_error(offset + done)
                    done += n
                return bytes(view)

    def _write_buffered(self, blk: int, views: list[memoryview]) -> None:
        offset = blk * BLOCK_SIZE
        while views:
            n = os.pwritev(self._fd, views[:_IOV_MAX], offset)
            offset += n
            views = _advance(views, n)

    def _write_direct(self, blk: int, views: list[memoryview], nbytes: int) -> None:
        offset = blk * BLOCK_SIZE
        with mmap.mmap(-1, nbytes) as buf:
            pos = 0
            for v in views:
                buf[pos : pos + len(v)] = v
                pos += len(v)
            with memoryview(buf) as view:
                done = 0
                while done < nbytes:
                    done += os.pwritev(self._fd, [view[done:]], offset + done)


def _check_kind(path: str, mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISBLK(mode):
        return "block"
    what = "a directory" if stat.S_ISDIR(mode) else "not a regular file or block device"
    raise FsError(errno.EINVAL, f"image {path} is {what}")


def _eof_error(offset: int) -> OSError:
    """The error for a read that hit end of file: the image shrank under us."""
    return OSError(errno.EIO, f"image ends at byte {offset}, inside block {offset // BLOCK_SIZE}")


def blocks_str(blk: int, count: int) -> str:
    return f"block {blk}" if count == 1 else f"blocks {blk}..{blk + count - 1}"


def fill_views(views: Sequence[memoryview], data: bytes) -> None:
    """Scatter ``data`` over ``views`` in order."""
    pos = 0
    for v in views:
        v[:] = data[pos:pos + len(v)]
        pos += len(v)


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes from a buffer list after a partial pwritev."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if n:
        rest[0] = rest[0][n:]
    return rest


