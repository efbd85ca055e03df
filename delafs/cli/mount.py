"""The mount-side commands of ``delafs``: mount, umount, stat, inject, sync,
install-helper.  (mkfs, fsck and race live in cli.py.)"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time

from ..fuse.control import DaemonGone, NotMounted, control_command, write_back_kernel_pages
from ..fuse.options import MountOptions
from ..lib.errortag import TAGS, ErrorTags
from ..lib.units import format_size
from .fail import fail

HELPER_PATH = "/sbin/mount.fuse.delafs"


def _command(args, command: str) -> str:
    """control_command for a CLI command: a failure (a shut-down
    filesystem answers EIO) exits 1 with the reason, not a traceback."""
    mnt = os.path.abspath(args.mountpoint)
    try:
        return control_command(mnt, command)
    except NotMounted as e:
        raise SystemExit(fail(args.cmd, str(e))) from None
    except OSError as e:
        raise SystemExit(fail(args.cmd, f"{mnt}: {e.strerror or e} (see the daemon's log)")) from None


def cmd_mount(args) -> int:
    try:
        opts = MountOptions.parse(",".join(args.options or []))
    except (ValueError, argparse.ArgumentTypeError) as e:
        return fail("mount", f"{e}")
    if not os.path.isdir(args.mountpoint):
        return fail("mount", f"mount point {args.mountpoint} is not a directory")
    if not os.path.exists(args.image) and not opts.mkfs:
        return fail("mount", f"{args.image} does not exist")
    if not os.path.exists("/dev/fuse"):
        return fail("mount", "/dev/fuse is missing (modprobe fuse, or run the container with --device /dev/fuse)")
    return daemonize_and_run(args.image, args.mountpoint, opts, foreground=args.foreground)


def cmd_umount(args) -> int:
    """Flush through the control channel, unmount, and wait until the daemon
    has finished its final flush and exited (the image is then clean)."""
    mnt = os.path.abspath(args.mountpoint)
    status = 0
    try:
        info = json.loads(control_command(mnt, "stat"))["daemon"]
    except DaemonGone:
        # Nothing to flush with: clear the dead mount, say what was lost.
        r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
        if r.returncode != 0:
            return fail("umount", f"{mnt}: the daemon is gone, and unmounting failed: {r.stderr.strip()}")
        return fail("umount", f"{mnt}: the daemon is gone; unmounted without a final flush (what it "
                              f"had not committed is lost; the journal replays at the next mount)")
    except NotMounted as e:
        return fail("umount", str(e))
    except (OSError, ValueError, KeyError) as e:
        # A daemon too sick to answer is still unmounted; only the wait
        # for its exit is lost.
        info = {"pid": None, "readonly": False}
        status = fail("umount", f"{mnt}: the daemon does not answer ({e}); unmounting anyway")
    try:
        if not info["readonly"]:
            _sync_both(mnt)
    except OSError as e:
        # A filesystem that has shut down (or cannot write) still gets
        # unmounted: what the journal committed survives, the rest is lost.
        status = fail("umount", f"{mnt}: could not write everything back ({e.strerror or e}); "
                                f"unmounting anyway: see the daemon's log")
    r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
    if r.returncode != 0:
        r = subprocess.run(["umount", mnt], capture_output=True, text=True)
    if r.returncode != 0:
        return fail("umount", f"{r.stderr.strip()}")
    if info["pid"] is not None and not wait_gone(info["pid"], args.timeout):
        return fail("umount", f"daemon {info['pid']} still running after {args.timeout}s")
    return status


def cmd_stat(args) -> int:
    if args.mountpoint is None and args.watch is not None:
        # `delafs stat --watch MOUNTPOINT`: argparse took the mount point
        # for the optional SECONDS.
        args.mountpoint, args.watch = args.watch, "1"
    if args.mountpoint is None:
        return fail("stat", "give the mount point")
    if args.watch is None:
        _print_stat(args, json.loads(_command(args, "stat")))
        return 0
    try:
        args.watch = float(args.watch)
    except ValueError:
        args.watch = 0
    if not args.watch > 0:
        return fail("stat", "--watch needs a positive number of seconds")
    try:
        while True:
            data = json.loads(_command(args, "stat"))
            if not args.json:
                print(time.strftime("%H:%M:%S"))
            _print_stat(args, data)
            sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0        # the usual way to stop watching


def _print_stat(args, data: dict) -> None:
    if args.json:
        # One object per line when watching, so a script can read a stream.
        print(json.dumps(data) if args.watch is not None else json.dumps(data, indent=2))
        return
    sp = data["space"]
    eng, io, cache = data["engine"], data["iomap"], data["cache"]
    rows = [
        ("total blocks", sp["total"]), ("free blocks", sp["available"]),
        ("used blocks", sp["used"]), ("delalloc reserved blocks", sp["reserved"]),
        ("metadata reserve", sp["metadata_reserve"]),
        ("dirty bytes", cache.get("dirty_bytes")), ("cached bytes", cache.get("cached_bytes")),
        ("writeback bytes in flight", cache.get("writeback_bytes")),
        ("writes", eng["writes"]), ("short copies", eng["short_copies"]),
        ("stale mappings", eng["stale_mappings"]), ("punches", eng["punches"]),
        ("punch ranges", eng["punch_ranges"]), ("writeback ranges", io["writeback_ranges"]),
        ("ioends", io["ioends"]), ("errors", io["writeback_errors"]),
    ]
    sizes = data.get("fuse", {}).get("request_sizes", {})
    for op in ("read", "write"):
        if sizes.get(op):
            rows.append((f"{op.upper()} sizes", "  ".join(f"{format_size(size)} x{n}" for size, n in sizes[op])))
    for name, val in rows:
        print(f"{name:28} {val}")
    if args.watch is not None:
        print()


def cmd_inject(args) -> int:
    print(_command(args, "inject " + " ".join(args.settings)), end="")
    return 0


def cmd_sync(args) -> int:
    if json.loads(_command(args, "stat"))["daemon"]["readonly"]:
        return 0        # as sync(1): nothing to write back on a read-only mount
    mnt = os.path.abspath(args.mountpoint)
    try:
        _sync_both(mnt)
    except NotMounted as e:
        return fail(args.cmd, str(e))
    except OSError as e:
        return fail(args.cmd, f"{mnt}: {e.strerror or e} (see the daemon's log)")
    return 0


def _sync_both(mnt: str) -> None:
    """The kernel's pages first, then the daemon's sync, whatever the
    kernel said (syncfs(2) too writes back all it can before it reports).
    Raises the daemon's error, else the kernel's."""
    try:
        write_back_kernel_pages(mnt)
        kernel_error = None
    except OSError as e:
        kernel_error = e
    control_command(mnt, "sync")
    if kernel_error is not None:
        raise OSError(kernel_error.errno, f"the kernel could not write back what it held: "
                                          f"{kernel_error.strerror}")


HELPER_SCRIPT = """#!/bin/sh
# mount(8) helper for delafs: mount -t fuse.delafs IMAGE MOUNTPOINT -o OPTS
# Installed by `delafs install-helper`.
exec {delafs} mount-helper "$@"
"""


def cmd_install_helper(args) -> int:
    # The delafs being run, not the first on PATH: `.venv/bin/delafs
    # install-helper` must not point mount(8) at some other checkout's.
    here = os.path.join(os.path.dirname(sys.executable), "delafs")
    delafs = here if os.access(here, os.X_OK) else shutil.which("delafs") or here
    try:
        with open(args.path, "w") as f:
            f.write(HELPER_SCRIPT.format(delafs=delafs))
        os.chmod(args.path, 0o755)
    except OSError as e:
        return fail("install-helper", f"cannot write {args.path}: {e.strerror or e}")
    print(f"installed {args.path} -> {delafs}")
    return 0


def cmd_mount_helper(args) -> int:
    """What mount(8) runs: IMAGE MOUNTPOINT [-o OPTS] [-n] [-s] [-v].  A
    remount never starts a second daemon: it goes to the kernel (mount -i
    -o remount,...), which FUSE handles without telling the daemon.
    Errors say ``delafs mount:``: the user ran mount(8), not this."""
    opts = [o for o in (args.o or "").split(",") if o]
    if "remount" in opts:
        r = subprocess.run(["mount", "-i", "-o", ",".join(opts), args.mountpoint],
                           capture_output=True, text=True)
        if r.returncode != 0:
            fail("mount", r.stderr.strip() or f"remount of {args.mountpoint} failed")
        return r.returncode
    # Options mount(8) adds that are not ours.
    drop = {"defaults", "auto", "noauto", "user", "users", "nofail", "_netdev", "rw"}
    keep = [o for o in opts if o not in drop and not o.startswith("x-")]
    # mount(8) treats dev and suid as its defaults and strips them from the
    # options it passes on; only nodev/nosuid arrive.  FUSE's default is the
    # opposite (nodev,nosuid), so, like libfuse's mount.fuse, ask for dev and
    # suid unless the user said otherwise.
    for flag in ("dev", "suid"):
        if "no" + flag not in keep and flag not in keep:
            keep.append(flag)
    try:
        parsed = MountOptions.parse(",".join(keep))
    except ValueError as e:
        return fail("mount", str(e))
    return daemonize_and_run(args.image, args.mountpoint, parsed, foreground=False)


def _errortag_setting(text: str) -> str:
    """argparse type: refuse a bad TAG=N here, with the reason, rather than
    as a bare EINVAL from the daemon."""
    try:
        ErrorTags().parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_commands(sub) -> None:
    m = sub.add_parser("mount", help="mount a delafs image (daemonizes once the mount is live)",
                       description="Mount IMAGE on MOUNTPOINT. Returns once the mount is live; "
                                   "a failed mount exits non-zero with the reason.")
    m.add_argument("image", metavar="IMAGE")
    m.add_argument("mountpoint", metavar="MOUNTPOINT")
    m.add_argument("-o", dest="options", action="append", metavar="OPTS",
                   help="comma-separated options: cache_size=SIZE, dirty_limit=SIZE, "
                        "dirty_expire=SEC, writeback_interval=SEC, commit_interval=SEC, "
                        "punch=scan|legacy, TAG=N for any errortag (" + ", ".join(sorted(TAGS)) + "), allow_other, "
                        "default_permissions, ro, dev, suid, subtype=NAME (type fuse.NAME), acl, writeback_cache, "
                        "relatime (default), strictatime, noatime, nodiratime, mkfs, log=FILE, "
                        "log_writes=FILE (every device write, flush and discard, for crash "
                        "testing; see docs/conformance.md), "
                        "lock_wait=SEC, entry_timeout=SEC, attr_timeout=SEC, read_ahead=SIZE (the "
                        "readahead window, default the kernel's 128K; needs root), debug")
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr")
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="write everything back, unmount, wait for the daemon to exit",
                       description="Flush, unmount and wait until the daemon has finished its final "
                                   "flush and exited: the image is then clean.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the daemon (default 120)")
    u.set_defaults(func=cmd_umount)

    s = sub.add_parser("stat", help="space, cache and engine counters of a mounted delafs")
    s.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    s.add_argument("--json", action="store_true",
                   help="everything, as JSON (with --watch: one object per line)")
    s.add_argument("--watch", nargs="?", const="1", metavar="SECONDS",
                   help="print again every SECONDS (default 1) until interrupted")
    s.set_defaults(func=cmd_stat)

    i = sub.add_parser("inject", help="set errortags on a mounted delafs (TAG=N, 0 turns one off)")
    i.add_argument("mountpoint", metavar="MOUNTPOINT")
    i.add_argument("settings", nargs="+", metavar="TAG=VALUE", type=_errortag_setting,
                   help="known tags: " + ", ".join(sorted(TAGS)))
    i.set_defaults(func=cmd_inject)

    y = sub.add_parser("sync", help="write back and commit everything (sync(1) never reaches a FUSE daemon)")
    y.add_argument("mountpoint", metavar="MOUNTPOINT")
    y.set_defaults(func=cmd_sync)

    h = sub.add_parser("install-helper", help=f"install the mount(8) helper ({HELPER_PATH})")
    h.add_argument("--path", default=HELPER_PATH, help=f"where to install it (default {HELPER_PATH})")
    h.set_defaults(func=cmd_install_helper)

    # No help=: argparse lists every subparser given one, and prints
    # help=SUPPRESS literally as "==SUPPRESS==".  mount(8) runs this
    # through the script install-helper writes; users never type it.
    mh = sub.add_parser("mount-helper", description="What /sbin/mount.fuse.delafs runs for mount(8).")
    mh.add_argument("image")
    mh.add_argument("mountpoint")
    mh.add_argument("-o")
    mh.add_argument("-n", action="store_true")
    mh.add_argument("-s", action="store_true")
    mh.add_argument("-v", action="store_true")
    mh.set_defaults(func=cmd_mount_helper)


# -- the daemon process ------------------------------------------------------------

def daemonize_and_run(image: str, mountpoint: str, opts: MountOptions, *, foreground: bool) -> int:
    """Fork (unless foreground), report the outcome of the mount to the
    parent through a pipe, and serve in the child."""
    # The daemon (trio, pyfuse3, the whole engine) is loaded by the commands
    # that mount, before the fork so a broken install fails in the parent.
    from ..fuse.daemon import run
    logfile = opts.log
    if foreground:
        # In the foreground the log is stderr, unless log= names a file.
        try:
            stream = (os.fdopen(os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
                                "a", buffering=1) if logfile else sys.stderr)
        except OSError as e:
            return fail("mount", f"cannot open the log file {logfile}: {e.strerror}")
        logging.basicConfig(level=logging.DEBUG if opts.debug else logging.INFO,
                            format="%(asctime)s delafs[%(process)d] %(levelname)s %(message)s",
                            stream=stream)
        def say(msg: str) -> None:
            for line in msg.splitlines():
                if line != "ok":
                    fail("mount", line.removeprefix("error: "))
        try:
            return run(image, mountpoint, opts, ready=say)
        except Exception:
            logging.getLogger("delafs").exception("the daemon failed")
            return 1
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            msg = r.read().decode(errors="replace").strip()
        first, *rest = msg.splitlines() or [""]
        if first == "ok":
            for line in rest:
                fail("mount", line)
            return 0
        fail("mount", msg.removeprefix("error: ") or "the daemon died before mounting")
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        return 1
    # Child: a daemon of its own session, stdio detached.
    os.close(rfd)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    try:
        out = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if logfile else null
    except OSError as e:
        os.write(wfd, f"error: cannot open the log file {logfile}: {e.strerror}\n".encode())
        os._exit(1)
    os.dup2(out, 1)
    os.dup2(out, 2)
    logging.basicConfig(level=logging.DEBUG if opts.debug else logging.INFO,
                        format="%(asctime)s delafs[%(process)d] %(levelname)s %(message)s",
                        stream=sys.stderr)

    def ready(msg: str) -> None:
        try:
            os.write(wfd, msg.encode() + b"\n")
            os.close(wfd)
        except OSError:
            pass
    code = 1
    try:
        code = run(image, mountpoint, opts, ready=ready)
    except BaseException:
        # os._exit below skips the interpreter's own report: the log gets it.
        logging.getLogger("delafs").exception("the daemon failed")
    finally:
        os._exit(code)


def exited(pid: int) -> bool:
    """The process is gone or a zombie.  A zombie has exited: its files,
    the image's lock among them, are closed.  The daemon's parent (delafs
    mount) is long gone, so it waits for init to reap it, which some
    inits do only now and then (here: over a second)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exited(pid):
            return True
        time.sleep(0.02)
    return exited(pid)
