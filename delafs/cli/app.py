"""The ``delafs`` command: mkfs, fsck and race here; mount and the control
commands in mount.py, the inspection commands in inspect.py.

Only the commands that open an image or mount one load trio, pyfuse3 and
the engine (half a second on a small machine); those that only talk to a
running daemon (stat, sync, inject, umount, bmap, ...) start without them."""

from __future__ import annotations

import argparse
import os
import stat
import sys

from ..lib import units
from ..lib.errors import DelafsError, FsError, NotDelafsError
from .fail import SIGPIPE_STATUS, fail, reader_gone
from .inspect import add_commands as add_inspect_commands
from .mount import add_commands


def parse_size(text: str) -> int:
    """argparse type for sizes (lib.units.parse_size)."""
    try:
        return units.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# -- mkfs ------------------------------------------------------------------------

def cmd_mkfs(args) -> int:
    import trio

    from ..block.device import BlockDevice
    from ..fs.filesystem import Filesystem
    from ..fs.probe import existing_signature
    from ..ondisk import BLOCK_SIZE, MIN_BLOCKS, make_geometry
    path = args.image
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        return fail("mkfs", f"{path} is neither a regular file nor a block device")
    if st is not None and stat.S_ISBLK(st.st_mode) and args.size is not None:
        return fail("mkfs", "--size cannot be used with a block device (its size is the device's)")
    if st is None or stat.S_ISREG(st.st_mode):
        if args.size is None and (st is None or st.st_size == 0):
            return fail("mkfs", f"{path} does not exist (or is empty): give --size to create it")
        if args.size is not None and st is not None and st.st_size > 0 \
                and args.size != st.st_size and not args.force:
            return fail("mkfs", f"{path} is {st.st_size} bytes; refusing to resize it to {args.size} without --force")
        if args.size is not None and args.size < MIN_BLOCKS * BLOCK_SIZE:
            return fail("mkfs", f"size {args.size} is too small (minimum {MIN_BLOCKS * BLOCK_SIZE} bytes)")
        if args.size is not None and args.size >= 1 << 63:
            return fail("mkfs", f"size {args.size} is larger than any file can be (off_t)")
        if st is None:
            BlockDevice.create_file(path, args.size)
    with BlockDevice.open(path) as dev:
        # The lock comes before any change: a daemon may still hold the image.
        dev.lock(wait=0)
        if args.size is not None and dev.kind == "file" and args.size != dev.size:
            try:
                os.truncate(path, args.size)
            except OSError as e:
                return fail("mkfs", f"cannot size image {path}: {e.strerror}")
            dev.close()
            return cmd_mkfs(args)
        try:
            make_geometry(dev.nblocks, log_blocks=args.journal_blocks)
        except ValueError as e:
            return fail("mkfs", str(e))
        sig = existing_signature(path, dev)
        if sig and not args.force:
            return fail("mkfs", f"{path} contains {sig}; use --force to overwrite it")
        sb = trio.run(lambda: Filesystem.format(dev, log_blocks=args.journal_blocks,
                                                label=args.label.encode()))
    if not args.quiet:
        print(f"delafs: formatted {path}: {sb.nblocks} blocks of {BLOCK_SIZE} bytes "
              f"({sb.nblocks * BLOCK_SIZE / 2**20:.1f} MiB), journal {sb.log_blocks} blocks, "
              f"uuid {sb.uuid.hex()}")
    return 0


# -- fsck ------------------------------------------------------------------------

def cmd_fsck(args) -> int:
    import trio

    from ..block.device import BlockDevice
    from ..fs.fsck import EXIT_OPERATIONAL, check, summary
    repair = args.yes
    try:
        dev = BlockDevice.open(args.image, readonly=args.no)
    except DelafsError as e:
        fail("fsck", str(e))
        return EXIT_OPERATIONAL
    with dev:
        try:
            dev.lock(wait=args.wait)
        except FsError as e:
            fail("fsck", str(e))
            return EXIT_OPERATIONAL
        progress = args.progress or (sys.stdout.isatty() and dev.nblocks > 1 << 20)
        report = trio.run(lambda: check(dev, repair=repair, progress=progress))
    for note in report.notes:
        print(f"note: {note}")
    print(f"delafs fsck {args.image}: {summary(report)}")
    return report.exit_code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="delafs", description=(
        "delafs: a FUSE filesystem modelling the Linux iomap delayed-allocation "
        "buffered-write engine, stored in a sparse image file or block device."))
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    m = sub.add_parser("mkfs", help="create a delafs filesystem on an image or device",
                       description="Format IMAGE (a regular file, created sparse if missing, "
                                   "or a block device). Refuses to overwrite an existing "
                                   "filesystem without --force.")
    m.add_argument("image", metavar="IMAGE")
    m.add_argument("--size", type=parse_size, metavar="SIZE",
                   help="size of the image file to create, e.g. 1G (binary units)")
    m.add_argument("--force", action="store_true",
                   help="overwrite an existing filesystem or resize an existing image file")
    m.add_argument("--journal-blocks", type=int, metavar="N",
                   help="journal log size in 4 KiB blocks (default: 1/64 of the device, 256..32768)")
    m.add_argument("--label", default="", help="filesystem label (up to 64 bytes)")
    m.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    m.set_defaults(func=cmd_mkfs)

    f = sub.add_parser("fsck", help="check (and repair) a delafs image",
                       description="Check IMAGE. Without -n the journal is replayed first. "
                                   "Exit status: 0 clean, 1 errors repaired, 4 errors left "
                                   "uncorrected, 8 operational error.")
    f.add_argument("image", metavar="IMAGE")
    g = f.add_mutually_exclusive_group()
    g.add_argument("-n", "--no", action="store_true",
                   help="open read-only, change nothing (the journal is applied in memory only)")
    g.add_argument("-y", "--yes", action="store_true", help="repair every problem that can be repaired")
    f.add_argument("--progress", action="store_true",
                   help="print progress (default on a terminal for images over 4 GiB)")
    f.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for a daemon still holding the image (default 30)")
    f.set_defaults(func=cmd_fsck)

    add_commands(sub)
    add_inspect_commands(sub)
    _add_race_command(sub)
    return p


def _mutant_name(text: str) -> str:
    """argparse type of --mutant: only parsing the race command gets here,
    so only it loads the explorer."""
    from ..testing.race import MUTANTS  # test machinery: loaded by `delafs race` only
    if text not in MUTANTS:
        raise argparse.ArgumentTypeError(f"unknown mutant {text!r} (known: {', '.join(sorted(MUTANTS))})")
    return text


def _add_race_command(sub) -> None:
    r = sub.add_parser(
        "race", help="explore buffered-write/fault/punch/writeback races deterministically",
        description="Run many small concurrent workloads (buffered writers with injected short "
                    "copies, stale mappings and unfaultable sources, mmap writers, truncate, "
                    "writeback, a reader) against the iomap engine on an in-memory image, each "
                    "interleaved by a schedule drawn from its seed.  DESIGN.md's invariants are "
                    "checked after every step; at the end every byte is verified through the "
                    "page cache and after a remount, and fsck must pass.  The schedules use "
                    "seeds S, S+1, ...; any of them replays exactly with --replay.  "
                    "Exit status: 0 no findings, 1 findings, 2 usage error.")
    r.add_argument("--punch", choices=["scan", "legacy"], default="scan",
                   help="delalloc punch after a short write: scan (keep delalloc under dirty "
                        "blocks; the default) or legacy (truncate the cache range, punch it all)")
    r.add_argument("--schedules", type=int, default=200, metavar="N",
                   help="number of schedules to run (default 200)")
    r.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the first schedule; schedule i uses S+i (default 0)")
    r.add_argument("--replay", type=int, metavar="SEED",
                   help="run only the schedule of SEED and print its workload and every step "
                        "(give the same --punch/--mutant as the run that found it)")
    r.add_argument("--mutant", type=_mutant_name, metavar="NAME",
                   help="explore a deliberately broken engine (with --punch scan); "
                        "--list-mutants names and describes them")
    r.add_argument("--list-mutants", action="store_true",
                   help="list the mutants (deliberately broken engines) and exit")
    r.add_argument("-x", "--exitfirst", action="store_true",
                   help="stop after the first schedule with a finding")
    r.add_argument("-v", "--verbose", action="store_true",
                   help="print one line per schedule")
    r.set_defaults(func=cmd_race)


def cmd_race(args) -> int:
    from ..testing.race import main as race_main  # test machinery: loaded by this command only
    if args.schedules < 1:
        return fail("race", "--schedules must be at least 1", 2)
    return race_main(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
        sys.stdout.flush()          # a closed pipe shows here, not at exit
        return rc
    except NotDelafsError as e:
        return fail(args.cmd, str(e), 8 if args.cmd == "fsck" else 1)
    except DelafsError as e:
        return fail(args.cmd, str(e), 8 if args.cmd == "fsck" else 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        reader_gone()           # end quietly, as a process killed by SIGPIPE does
        return SIGPIPE_STATUS


if __name__ == "__main__":
    sys.exit(main())
