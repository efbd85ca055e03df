"""The mount daemon: open the image, hold its lock, serve FUSE, and on the
way out write everything back, commit, checkpoint and mark the image clean
before the lock is released.

``delafs mount`` daemonizes by default and returns only once the mount is
live: the child reports "ok" (or the error) through a pipe.  A plain
``umount``/``fusermount3 -u`` makes pyfuse3.main() return, after which the
final flush runs; anything that wants the image next (mount, fsck) waits
for the lock, which is held until that flush is done.  SIGTERM and SIGINT
unmount cleanly the same way.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import stat

import pyfuse3
import trio

from ..block.device import BlockDevice
from ..block.logwrites import WriteLog
from ..fs.filesystem import Filesystem
from ..fs.probe import existing_signature
from ..lib import locks
from ..lib.errors import DelafsError, FsError
from ..lib.errortag import ErrorTags
from ..vfs.mount import Mount
from . import loop
from .control import ControlHandler, write_back_kernel_pages
from .inspect import InspectServer
from .operations import Operations
from .options import MountOptions

log = logging.getLogger("delafs")

#: How long SIGTERM waits for the kernel to write back what it holds (s):
#: well inside systemd's 90 s stop timeout, which also covers our own flush.
KERNEL_WRITEBACK_WAIT = 30

class Daemon:
    """One mounted image."""

    def __init__(self, image: str, mountpoint: str, opts: MountOptions):
        self.image = image
        self.mountpoint = os.path.abspath(mountpoint)
        self.opts = opts
        self.readonly = opts.readonly
        self.ops = None
        self.m: Mount | None = None
        self.dev: BlockDevice | None = None
        self.warnings: list[str] = []
        self.inspect = InspectServer(self)
        self.inspect_live = False
        self.serving = False            # pyfuse3.main() runs: the mount point is ours
        self.lost_on_signal: str | None = None

    # -- bring-up ------------------------------------------------------------------

    def open_image(self) -> BlockDevice:
        if self.opts.mkfs and not os.path.exists(self.image):
            raise FsError(errno.ENOENT, f"{self.image} does not exist (mkfs cannot guess a size)")
        try:
            dev = BlockDevice.open(self.image, readonly=self.readonly)
        except FsError as e:
            if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM) and not self.readonly:
                log.warning("%s is not writable: mounting read-only", self.image)
                self.readonly = True
                dev = BlockDevice.open(self.image, readonly=True)
            else:
                raise
        dev.lock(wait=self.opts.lock_wait)
        if not self.readonly:
            self._check_host_space()
        return dev

    def _check_host_space(self) -> None:
        """A sparse image file needs host space as it fills: if the host
        filesystem cannot hold what is still unbacked, a write delafs has
        accepted can fail at writeback (fsync reports it).  Say so now."""
        try:
            st = os.stat(self.image)
            if not stat.S_ISREG(st.st_mode):
                return
            vfs = os.statvfs(os.path.dirname(os.path.abspath(self.image)))
        except OSError:
            return
        unbacked = max(0, st.st_size - st.st_blocks * 512)
        host_free = vfs.f_bavail * vfs.f_frsize
        if host_free < unbacked:
            msg = (f"{self.image} is sparse and {unbacked >> 20} MiB of it is not yet backed, "
                   f"but its host filesystem has {host_free >> 20} MiB free: writes accepted now "
                   f"can fail at writeback with ENOSPC (fsync reports it)")
            log.warning("%s", msg)
            self.warnings.append(msg)

    async def start(self) -> None:
        self.dev = dev = self.open_image()
        if self.opts.log_writes:
            dev.recorder = WriteLog(self.opts.log_writes)
        if self.opts.mkfs and not self.readonly:
            # Blank means what `delafs mkfs` asks, not a zero first block: a
            # delafs that lost its primary superblock still mounts, and
            # btrfs or iso9660 keep theirs past 4 KiB.
            sig = existing_signature(self.image, dev)
            if sig is None:
                log.info("formatting blank image %s", self.image)
                await Filesystem.format(dev)
            else:
                log.info("-o mkfs: %s holds %s, not formatting it", self.image, sig)
        fs = await Filesystem.open(dev, readonly=self.readonly)
        if fs.readonly:
            self.readonly = True
        tags = ErrorTags()
        for tag, val in self.opts.tags.items():
            tags.set(tag, val)
        self.m = Mount(fs, punch_mode=self.opts.punch, errortags=tags,
                       writeback_cache=self.opts.writeback_cache, atime=self.opts.atime,
                       diratime=not self.opts.nodiratime, **self.opts.mount_kwargs())
        self.ops = Operations(self.m, control=ControlHandler(self), **self.opts.timeouts())
        self.ops.enable_writeback_cache = self.opts.writeback_cache
        # POSIX ACLs: the kernel enforces the system.posix_acl_* xattrs we
        # store (FUSE_POSIX_ACL); it needs default_permissions, always on.
        self.ops.enable_acl = self.opts.acl
        fuse_opts = set(self.opts.fuse) | {f"fsname={self.image}"}
        if self.opts.debug:
            fuse_opts.add("debug")
        if "ro" not in fuse_opts and self.readonly:
            fuse_opts.add("ro")
        if not loop.install():
            log.debug("pyfuse3's session loop keeps its trio.Lock (pyfuse3.trio is not trio)")
        try:
            pyfuse3.init(self.ops, self.mountpoint, fuse_opts)
        except RuntimeError as e:
            # libfuse printed the reason to a stderr that a daemonized
            # mount has already pointed away; say what usually causes it.
            raise FsError(errno.EPERM, f"{e}: the kernel or fusermount3 refused the mount "
                                       f"(most often: no CAP_SYS_ADMIN; in a container add --cap-add "
                                       f"SYS_ADMIN, and --security-opt apparmor=unconfined where "
                                       f"AppArmor runs; delafs mount -f shows libfuse's own reason)") from None

    def statistics(self) -> dict:
        stats = self.ops.m_statistics()
        stats["daemon"] = {"pid": os.getpid(), "image": self.image,
                           "mountpoint": self.mountpoint, "readonly": self.readonly,
                           "inspect": self.inspect.address if self.inspect_live else None,
                           "inspect_clients": self.inspect.clients,
                           "pyfuse3_read_lock": "Mutex" if loop.locks_made() else "trio.Lock"}
        return stats

    # -- main loop ---------------------------------------------------------------------

    async def serve(self, ready=None) -> None:
        """Serve until unmounted; ``ready()`` once the mount is set up."""
        async with trio.open_nursery() as n:
            await self.m.start(n)
            n.start_soon(self._signals)
            try:
                await n.start(self.inspect.serve)
                self.inspect_live = True
            except OSError as e:      # watching is optional; serving files is not
                log.warning("no inspection socket (bmap, trace, top will not work): %s", e)
            n.start_soon(self._finish_setup, ready)
            try:
                self.serving = True
                await pyfuse3.main()
            finally:
                self.serving = False
                await self.m.stop_background()
                n.cancel_scope.cancel()

    async def _finish_setup(self, ready) -> None:
        if self.opts.read_ahead is not None:
            await self.set_read_ahead(self.opts.read_ahead)
        if ready:
            ready()

    async def set_read_ahead(self, nbytes: int) -> None:
        """Make the mount's readahead window ``nbytes``, as a filesystem
        sets its backing device info's ra_pages (btrfs raises it to 4 MiB):
        the kernel sizes the READs of a sequential reader by this window,
        whatever the reader's read(2) size, and each READ costs the daemon
        a request.  A FUSE daemon's INIT reply can only lower the window
        (the kernel takes the smaller of it and max_readahead), so it is
        written to sysfs, as root, after the kernel has processed that
        reply: once a request of ours has been answered (the stat below,
        from a thread, which the event loop serves)."""
        try:
            st = await trio.to_thread.run_sync(os.stat, self.mountpoint)
            path = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
            with open(path, "w") as f:
                f.write(str(nbytes >> 10))
            log.info("readahead window %d KiB (%s)", nbytes >> 10, path)
        except OSError as e:
            msg = f"read_ahead: could not set the readahead window ({e}); the kernel's stays"
            log.warning("%s", msg)
            self.warnings.append(msg)

    async def _signals(self) -> None:
        """SIGTERM or SIGINT: unmount.  Later ones are only logged: the
        flusher is finishing its pass, and dying there (the default action)
        loses what the journal has not committed.  Ignored before the
        receiver opens, so that is what it restores when it closes, with
        the final flush to come."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            unmounting = False
            async for sig in sigs:
                if unmounting:
                    log.info("signal %d: already unmounting", sig)
                    continue
                log.info("signal %d: unmounting", sig)
                unmounting = True
                # Once main() has returned (a umount raced the signal) the
                # mount point is a plain directory again: nothing to ask.
                if not self.readonly and self.serving:
                    await self._write_back_kernel_pages()
                pyfuse3.terminate()

    async def _write_back_kernel_pages(self) -> None:
        """Before letting go of the connection, have the kernel send the
        pages it holds dirty (writeback_cache writes, mmap stores of files
        still open), as umount(8) does before the kernel lets go: once the
        connection is gone they can only be dropped.  From a thread, while
        this loop answers the WRITEs; bounded, since a kernel that cannot
        finish must not keep the daemon from its own final flush."""
        with trio.move_on_after(KERNEL_WRITEBACK_WAIT) as scope:
            try:
                await trio.to_thread.run_sync(write_back_kernel_pages, self.mountpoint,
                                              abandon_on_cancel=True)
            except OSError as e:
                self.lost_on_signal = (f"the kernel's writeback of the pages it held reported an "
                                       f"error ({e.strerror or e}): written data may be lost")
        if scope.cancelled_caught:
            self.lost_on_signal = (f"the kernel's writeback of the pages it held took over "
                                   f"{KERNEL_WRITEBACK_WAIT} s: unmounting without the rest")
        if self.lost_on_signal:
            log.error("%s", self.lost_on_signal)

    def _log_final_counters(self) -> None:
        """The counters die with the daemon and a plain umount(8) (what
        xfstests does) gives nobody a chance to read them: log them."""
        try:
            s = self.m.statistics()
            log.info("final counters: %s", json.dumps(
                {"engine": s["engine"], "iomap": s["iomap"], "errortags": s["errortags"]},
                sort_keys=True))
        except Exception:
            log.exception("final counters")

    async def shutdown(self) -> bool:
        """After the kernel let go: the final flush, then release the image.
        Signals are ignored from here on: the flush must finish (a plain
        umount returns before it, and systemd's stop then sends SIGTERM).
        False if the flush failed or lost data, or the kernel could not hand
        over what it held at SIGTERM (the daemon exits 1)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        try:
            pyfuse3.close(unmount=True)
        except Exception:
            log.exception("pyfuse3.close")
        clean = self.lost_on_signal is None
        try:
            if self.m is not None and not self.readonly:
                try:
                    await self.m.unmount()
                except DelafsError as e:
                    clean = False
                    log.error("final flush failed: %s; the image keeps what the journal "
                              "committed (replayed at the next mount)", e)
            if self.m is not None:
                self._log_final_counters()
        finally:
            if self.dev is not None:
                self.dev.close()
                if isinstance(self.dev.recorder, WriteLog):
                    self.dev.recorder.close()
        return clean


def run(image: str, mountpoint: str, opts: MountOptions, *, ready=None) -> int:
    """Mount and serve until unmounted.  ``ready(msg)`` is called once the
    mount is live ("ok") or has failed (the error text)."""
    # Lock-ownership assertions are a development aid, like lockdep: off in
    # a daemon unless DELAFS_DEBUG_LOCKS asks (the test suite's mounts do).
    locks.DEBUG_LOCKS = locks.env_flag("DELAFS_DEBUG_LOCKS", False)
    d = Daemon(image, mountpoint, opts)

    async def main() -> int:
        try:
            await d.start()
        except (DelafsError, ValueError, OSError, RuntimeError) as e:
            msg = str(e)        # a NotDelafsError names the image and says why
            if d.dev is not None:
                d.dev.close()
            if ready:
                ready(f"error: {msg}")
            log.error("mount failed: %s", msg)
            return 1
        log.info("mounted %s on %s", image, d.mountpoint)

        def report_ready() -> None:
            if ready:
                ready("\n".join(["ok", *(f"warning: {w}" for w in d.warnings)]))
        try:
            await d.serve(report_ready)
        finally:
            clean = await d.shutdown()
        if not clean:
            log.error("unmounted %s, but written data may be lost (see above)", image)
            return 1
        log.info("unmounted %s cleanly", image)
        return 0

    return trio.run(main)
