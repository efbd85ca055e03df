#!/usr/bin/env python3
"""holetest: two writers race to fill every page of a file, one of them
always through a shared writable mmap; then every marker is checked.

    tools/holetest.py [-F] [-w] [-r] [--size 16M] [--sizing ftruncate] PATH
    tools/holetest.py --verify-only PATH      (after umount, fsck, remount)

What it exercises (the idea behind xfstests generic/344-346, written
afresh): PATH is created and sized without writing data into it (a hole
from ftruncate, fallocate, or zeros), mapped MAP_SHARED, and two workers
write an 8-byte marker into every page at once, worker k at offset k*8:

    marker = <u32 worker id (thread id, or pid with -F)> <u32 page index>

Worker 0 always stores through the mapping (page faults: on a FUSE mount
the kernel reads the page in, dirties it, and later sends it to the daemon
as a WRITE).  Worker 1 stores through the mapping too, or with -w through
pwrite(2), which on delafs is a buffered write into the same pages the
faults are dirtying.  With -r each worker first reads every page it will
write (prefaulting them read-only, so each store is a write fault on a
page already mapped).

Then every marker is checked through the mapping, the mapping is msync'ed
and the file fsync'ed, and the markers are checked again through read(2).
The rest of every page must still be zero.  The worker ids are recorded
next to the file (PATH.holetest.json) so that --verify-only can re-check
the file exactly, from the device this time, after an unmount, fsck and
remount: a kernel page cache that still holds the pages cannot hide a lost
write from that check.

Sizing modes:
  ftruncate  a sparse file (one big hole).
  fallocate  fallocate(2) mode 0.  A FUSE daemon without a fallocate handler
             (pyfuse3 has none, so delafs over FUSE) answers EOPNOTSUPP; the
             tool then reports "fallocate unsupported, using zero-fill" and
             does what glibc's posix_fallocate does in that case: write a
             zero byte into the last byte of every block.  That is not a
             failure of the filesystem: it is what every program calling
             posix_fallocate gets on such a mount.
  zerofill   pwrite zeros over the whole file, 1 MiB at a time.

Threads share the GIL, so with threads the two workers' page faults
interleave rather than overlap; -F (processes, sharing the mapping made
before the fork) makes them truly concurrent.

Exit status: 0 every marker present and right, 1 a marker missing or wrong
(or a page's other bytes not zero), 2 an operational error.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import struct
import sys
import threading
import time

PAGE = mmap.PAGESIZE
MARKER = struct.Struct("<II")
NWORKERS = 2
CHUNK = 1 << 20


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        n = int(num) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"bad size {text!r} (want e.g. 1M, 16M, 256M)") from None
    if n <= 0 or n % PAGE:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of {PAGE}")
    return n


def say(msg: str) -> None:
    print(f"holetest: {msg}", flush=True)


# -- sizing -------------------------------------------------------------------------------

def _fallocate(fd: int, length: int) -> int:
    """fallocate(2) mode 0; returns 0 or the errno."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, 0, 0, length) == 0:
        return 0
    return ctypes.get_errno()


def _zerofill(fd: int, size: int) -> None:
    zeros = bytes(CHUNK)
    off = 0
    while off < size:
        n = min(CHUNK, size - off)
        done = os.pwrite(fd, zeros[:n], off)
        if done <= 0:
            raise OSError(errno.EIO, f"short zero-fill write at {off}")
        off += done


def size_file(fd: int, size: int, how: str) -> str:
    """Give the file its size without data in it; return what was done."""
    if how == "ftruncate":
        os.ftruncate(fd, size)
        return "ftruncate"
    if how == "zerofill":
        _zerofill(fd, size)
        return "zero-fill"
    err = _fallocate(fd, size)
    if err == 0:
        return "fallocate"
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, f"fallocate: {os.strerror(err)}")
    say(f"fallocate unsupported, using zero-fill ({'EOPNOTSUPP' if err == errno.EOPNOTSUPP else 'ENOSYS'}; "
        "glibc's posix_fallocate emulation: a zero byte at the end of every block)")
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:
        _zerofill(fd, size)
    if os.fstat(fd).st_size != size:
        os.ftruncate(fd, size)
    return "zero-fill (fallocate unsupported)"


# -- workers ------------------------------------------------------------------------------

class Worker:
    """Worker ``k`` writes its marker at offset k*8 of every page."""

    def __init__(self, k: int, via: str, mm: mmap.mmap, fd: int, npages: int, prefault: bool,
                 start: threading.Barrier | None):
        self.k, self.via, self.mm, self.fd = k, via, mm, fd
        self.npages, self.prefault, self.start = npages, prefault, start
        self.ident = 0
        self.elapsed = 0.0
        self.error: BaseException | None = None

    def prefault_pages(self) -> None:
        off0 = self.k * MARKER.size
        for p in range(self.npages):
            if self.via == "mmap":
                self.mm[p * PAGE + off0]
            else:
                os.pread(self.fd, 1, p * PAGE + off0)

    def write_pages(self, ident: int) -> None:
        self.ident = ident
        off0 = self.k * MARKER.size
        mm, fd = self.mm, self.fd
        t0 = time.monotonic()
        for p in range(self.npages):
            pos = p * PAGE + off0
            marker = MARKER.pack(ident, p)
            if self.via == "mmap":
                mm[pos:pos + MARKER.size] = marker
            elif os.pwrite(fd, marker, pos) != MARKER.size:
                raise OSError(errno.EIO, f"short pwrite at {pos}")
        self.elapsed = time.monotonic() - t0

    def run_thread(self) -> None:
        try:
            if self.prefault:
                self.prefault_pages()
            self.start.wait()
            self.write_pages(threading.get_native_id())
        except BaseException as e:   # reported by the main thread
            self.error = e


def run_threads(workers: list[Worker]) -> None:
    barrier = threading.Barrier(len(workers))
    threads = []
    for w in workers:
        w.start = barrier
        t = threading.Thread(target=w.run_thread, name=f"holetest-{w.k}")
        threads.append(t)
        t.start()
    for t in threads:
        t.join()
    for w in workers:
        if w.error is not None:
            raise RuntimeError(f"worker {w.k} ({w.via}): {w.error!r}") from w.error


def run_processes(workers: list[Worker]) -> None:
    """Fork one child per worker; they share the parent's MAP_SHARED mapping.
    Each child prefaults (with -r), says it is ready, and waits until the
    parent closes the "go" pipe, which releases them all at once; then it
    writes and sends its elapsed time back."""
    go_r, go_w = os.pipe()
    kids = []
    for w in workers:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                os.close(rfd)
                os.close(go_w)
                if w.prefault:
                    w.prefault_pages()
                os.write(wfd, b"R")
                os.read(go_r, 1)         # b"" once the parent closes its end
                w.write_pages(os.getpid())
                os.write(wfd, json.dumps({"elapsed": w.elapsed}).encode())
                code = 0
            except BaseException as e:
                try:
                    os.write(wfd, json.dumps({"error": repr(e)}).encode())
                except OSError:
                    pass
            finally:
                os._exit(code)
        os.close(wfd)
        w.ident = pid
        kids.append((w, pid, rfd))
    os.close(go_r)
    for _, _, rfd in kids:
        os.read(rfd, 1)                  # ready (or dead: b"")
    os.close(go_w)
    errors = []
    for w, pid, rfd in kids:
        with os.fdopen(rfd, "rb") as r:
            data = r.read()
        _, status = os.waitpid(pid, 0)
        try:
            info = json.loads(data or b"{}")
        except ValueError:
            info = {"error": data.decode(errors="replace")}
        w.elapsed = info.get("elapsed", 0.0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 or "error" in info:
            errors.append(f"worker {w.k} ({w.via}, pid {pid}): {info.get('error') or f'exit {code}'}")
    if errors:
        raise RuntimeError("; ".join(errors))


# -- verification ---------------------------------------------------------------------------

class Result:
    def __init__(self, what: str):
        self.what = what
        self.ok = self.missing = self.wrong = self.dirty_pages = 0
        self.examples: list[str] = []

    def note(self, text: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(text)

    @property
    def failed(self) -> bool:
        return bool(self.missing or self.wrong or self.dirty_pages)

    def report(self) -> None:
        say(f"verify ({self.what}): {self.ok} markers ok, {self.missing} missing, {self.wrong} wrong, "
            f"{self.dirty_pages} pages with other non-zero bytes")
        for e in self.examples:
            say(f"  {e}")


def check_pages(buf, first_page: int, ids: list[int], res: Result) -> None:
    """Check the markers (and the zero rest) of the whole pages in ``buf``."""
    rest = bytes(PAGE - len(ids) * MARKER.size)
    for i in range(len(buf) // PAGE):
        p = first_page + i
        base = i * PAGE
        for k, ident in enumerate(ids):
            got = MARKER.unpack_from(buf, base + k * MARKER.size)
            if got == (ident, p):
                res.ok += 1
            elif got == (0, 0):
                res.missing += 1
                res.note(f"page {p}: worker {k}'s marker missing")
            else:
                res.wrong += 1
                res.note(f"page {p}: worker {k}'s marker is {got}, want {(ident, p)}")
        if buf[base + len(ids) * MARKER.size:base + PAGE] != rest:
            res.dirty_pages += 1
            res.note(f"page {p}: bytes past the markers are not zero")


def verify_mapping(mm: mmap.mmap, npages: int, ids: list[int]) -> Result:
    res = Result("mapping")
    step = CHUNK // PAGE
    for p in range(0, npages, step):
        n = min(step, npages - p)
        check_pages(mm[p * PAGE:(p + n) * PAGE], p, ids, res)
    return res


def verify_read(fd: int, npages: int, ids: list[int], what: str) -> Result:
    res = Result(what)
    step = CHUNK // PAGE
    for p in range(0, npages, step):
        n = min(step, npages - p)
        buf = os.pread(fd, n * PAGE, p * PAGE)
        if len(buf) != n * PAGE:
            res.missing += (n - len(buf) // PAGE) * len(ids)
            res.note(f"short read at page {p}: {len(buf)} of {n * PAGE} bytes")
            buf = buf[:len(buf) - len(buf) % PAGE]
        check_pages(buf, p, ids, res)
    return res


def sidecar(path: str) -> str:
    return path + ".holetest.json"


# -- the two modes ------------------------------------------------------------------------------

def run_test(args) -> int:
    size, npages = args.size, args.size // PAGE
    via = ["mmap", "pwrite" if args.pwrite else "mmap"]
    try:
        os.unlink(sidecar(args.path))
    except FileNotFoundError:
        pass
    fd = os.open(args.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t0 = time.monotonic()
        sized = size_file(fd, size, args.sizing)
        say(f"{args.path}: {size >> 20} MiB, {npages} pages, sized by {sized} "
            f"in {time.monotonic() - t0:.2f} s; workers: {' + '.join(via)} "
            f"({'processes' if args.fork else 'threads'}){', prefaulted by reads' if args.prefault else ''}")
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            workers = [Worker(k, via[k], mm, fd, npages, args.prefault, None) for k in range(NWORKERS)]
            t0 = time.monotonic()
            (run_processes if args.fork else run_threads)(workers)
            for w in workers:
                say(f"worker {w.k} (id {w.ident}, {w.via}): {npages} markers in {w.elapsed:.2f} s")
            ids = [w.ident for w in workers]
            with open(sidecar(args.path), "w") as f:
                json.dump({"size": size, "page": PAGE, "ids": ids, "via": via,
                           "sizing": args.sizing, "fork": args.fork, "prefault": args.prefault}, f)
                f.flush()
                os.fsync(f.fileno())
            results = [verify_mapping(mm, npages, ids)]
            t1 = time.monotonic()
            mm.flush()                   # msync(MS_SYNC): the dirty pages go to the filesystem
            os.fsync(fd)
            say(f"msync + fsync in {time.monotonic() - t1:.2f} s")
            results.append(verify_mapping(mm, npages, ids))
            results[-1].what = "mapping after msync"
        finally:
            mm.close()
        results.append(verify_read(fd, npages, ids, "read(2) after fsync"))
    finally:
        os.close(fd)
    for r in results:
        r.report()
    failed = any(r.failed for r in results)
    say(f"{'FAIL' if failed else 'PASS'}: {npages * NWORKERS} markers, "
        f"{time.monotonic() - t0:.2f} s")
    return 1 if failed else 0


def run_verify(args) -> int:
    meta = None
    try:
        with open(sidecar(args.path)) as f:
            meta = json.load(f)
    except FileNotFoundError:
        pass
    fd = os.open(args.path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if meta is not None and meta["size"] != size:
            say(f"{args.path}: size {size}, the test wrote {meta['size']}")
            return 1
        if size == 0 or size % PAGE:
            say(f"{args.path}: size {size} is not a whole number of pages")
            return 1
        npages = size // PAGE
        if meta is not None:
            ids = meta["ids"]
        else:
            # No record: take the ids from page 0 and require them everywhere.
            head = os.pread(fd, NWORKERS * MARKER.size, 0)
            ids = [MARKER.unpack_from(head, k * MARKER.size)[0] for k in range(NWORKERS)]
            say(f"no {sidecar(args.path)}: worker ids {ids} taken from page 0")
        results = [verify_read(fd, npages, ids, "read(2)")]
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            results.append(verify_mapping(mm, npages, ids))
        finally:
            mm.close()
    finally:
        os.close(fd)
    for r in results:
        r.report()
    failed = any(r.failed for r in results)
    say(f"{'FAIL' if failed else 'PASS'} (verify only): {npages * NWORKERS} markers")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="holetest.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", metavar="PATH", help="the test file (created or truncated)")
    ap.add_argument("-F", dest="fork", action="store_true", help="workers are processes, not threads")
    ap.add_argument("-w", dest="pwrite", action="store_true", help="the second worker writes with pwrite(2)")
    ap.add_argument("-r", dest="prefault", action="store_true", help="workers read every page first")
    ap.add_argument("--size", type=parse_size, default=parse_size("16M"),
                    help="file size: 1M, 16M, 256M, ... (default 16M)")
    ap.add_argument("--sizing", choices=("ftruncate", "fallocate", "zerofill"), default="ftruncate",
                    help="how the file gets its size (default ftruncate)")
    ap.add_argument("--verify-only", action="store_true",
                    help="only re-check the markers of an existing PATH (after umount, fsck, remount)")
    args = ap.parse_args(argv)
    try:
        return run_verify(args) if args.verify_only else run_test(args)
    except (OSError, RuntimeError) as e:
        say(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
