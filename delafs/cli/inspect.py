"""Watching a mounted delafs: ``bmap``, ``trace`` and ``top``.

All three ask the daemon's inspection socket (fuse/inspect.py), found
through the ``stat`` JSON of the mount's control file, and none of them can
change the filesystem.  ``stat`` (and ``stat --watch``) is in mount.py with
the other control-file commands."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import stat
import sys
import time

from ..fuse.control import DaemonGone, NotMounted, control_command
from ..lib.errors import FsError
from ..lib.trace import EVENTS
from ..lib.units import BLOCK_SIZE, format_size
from .fail import fail, reader_gone


class InspectError(Exception):
    """A reason the command cannot go on, already worded for the user."""


# -- the client side of fuse/inspect.py's protocol (apart from the server: no trio) ---------

def connect(address: str, timeout: float = 10.0) -> socket.socket:
    """A blocking socket to the daemon's inspection address ('@name')."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect("\0" + address.removeprefix("@"))
    except OSError:
        s.close()
        raise
    return s


def request(address: str, obj: dict, timeout: float = 30.0) -> dict:
    """Send one request, return its one-line answer; FsError for an error
    answer."""
    with connect(address, timeout) as s:
        s.sendall(json.dumps(obj).encode() + b"\n")
        with s.makefile("rb") as f:
            line = f.readline()
    if not line:
        raise FsError(errno.EPIPE, "the daemon closed the inspection socket without answering")
    reply = json.loads(line)
    if isinstance(reply, dict) and "error" in reply:
        raise FsError(reply.get("errno", errno.EIO), reply["error"])
    return reply


def mount_root(path: str) -> str:
    """The root of the mount holding ``path`` (where st_dev changes)."""
    path = os.path.realpath(path)
    dev = os.stat(path).st_dev
    while path != "/":
        parent = os.path.dirname(path)
        if os.stat(parent).st_dev != dev:
            break
        path = parent
    return path


def inspect_address(path: str) -> tuple[str, dict]:
    """The mount root of ``path`` and its daemon's ``stat`` JSON; an
    InspectError if ``path`` is not on a mounted delafs or it has no
    inspection socket."""
    try:
        root = mount_root(path)
    except OSError as e:
        raise InspectError(f"{path}: {e.strerror}") from None
    try:
        info = json.loads(control_command(root, "stat"))
    except DaemonGone as e:
        raise InspectError(str(e)) from None
    except NotMounted:
        raise InspectError(f"{path} is not on a delafs mount") from None
    except (OSError, ValueError) as e:
        raise InspectError(f"{root}: the daemon does not answer ({e})") from None
    if not info.get("daemon", {}).get("inspect"):
        raise InspectError(f"{root}: this daemon has no inspection socket (see its log)")
    return root, info


def ask(address: str, obj: dict) -> dict:
    try:
        return request(address, obj)
    except FsError as e:
        raise InspectError(str(e)) from None
    except OSError as e:
        raise InspectError(f"inspection socket {address}: {e.strerror or e}") from None


def _stop(signum, frame):
    raise KeyboardInterrupt


def _run(cmd: str, body, args) -> int:
    # A script stops a stream with SIGTERM (or SIGINT, which a shell
    # ignores for its background jobs): both end it cleanly, at a line.
    signal.signal(signal.SIGTERM, _stop)
    try:
        return body(args)
    except InspectError as e:
        return fail(cmd, str(e))
    except KeyboardInterrupt:
        return 0            # the way to stop a stream or a view
    except BrokenPipeError:
        reader_gone()       # nothing left to say
        return 0


# -- bmap ----------------------------------------------------------------------------------

def _blocks(first: int, n: int) -> str:
    return f"[{first}..{first + n - 1}]"


def cache_in(runs: list, first: int, end: int) -> list[tuple[int, int, str]]:
    """The cache runs clipped to [first, end), with the uncached gaps as
    "none" runs."""
    out, pos = [], first
    for r in runs:
        rfirst, rn, state = r["fblock"], r["blocks"], r["state"]
        lo, hi = max(rfirst, first), min(rfirst + rn, end)
        if lo >= hi:
            continue
        if lo > pos:
            out.append((pos, lo - pos, "none"))
        out.append((lo, hi - lo, state))
        pos = hi
    if pos < end:
        out.append((pos, end - pos, "none"))
    return out


def cmd_bmap(args) -> int:
    def body(args) -> int:
        try:
            st = os.stat(args.file)
        except OSError as e:
            raise InspectError(f"{args.file}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise InspectError(f"{args.file} is not a regular file")
        _, info = inspect_address(args.file)
        bmap = ask(info["daemon"]["inspect"], {"cmd": "bmap", "ino": st.st_ino})
        if args.json:
            print(json.dumps(bmap, indent=2))
            return 0
        print(f"{args.file}: inode {bmap['ino']}, size {bmap['size']}, blocks of {bmap['block_size']} bytes")
        if not bmap["extents"]:
            print(" no extents")
        print(f" {'EXT':>4}  {'FILE-BLOCKS':<22} {'DISK-BLOCKS':<22} {'STATE':<9} {'BLOCKS':>8}  PAGE CACHE")
        for i, ext in enumerate(bmap["extents"]):
            first, n = ext["fblock"], ext["blocks"]
            disk = _blocks(ext["pblock"], n) if ext["pblock"] is not None else "-"
            runs = cache_in(bmap["cache"], first, first + n)
            if args.verbose:
                cached = [f"{'not cached' if s == 'none' else s} {_blocks(rf, rn)}" for rf, rn, s in runs]
            else:
                per: dict[str, int] = {}
                for _, rn, s in runs:
                    per[s] = per.get(s, 0) + rn
                cached = [", ".join(f"{s} {c}" for s, c in per.items() if s != "none") or "not cached"]
            print(f" {i:>4}: {_blocks(first, n):<22} {disk:<22} {ext['state']:<9} {n:>8}  {cached[0]}")
            for more in cached[1:]:
                print(f" {'':>4}  {'':<22} {'':<22} {'':<9} {'':>8}  {more}")
        return 0
    return _run("bmap", body, args)


# -- trace ---------------------------------------------------------------------------------

def cmd_trace(args) -> int:
    def body(args) -> int:
        if args.list_events:
            for name, what in EVENTS.items():
                print(f"{name:24} {what}")
            return 0
        if args.mountpoint is None:
            raise InspectError("give a path on a delafs mount (or --list-events)")
        _, info = inspect_address(args.mountpoint)
        req = {"cmd": "trace", "events": args.event or None, "ino": args.inode}
        try:
            sock = connect(info["daemon"]["inspect"], timeout=None)
        except OSError as e:
            raise InspectError(f"inspection socket: {e.strerror or e}") from None
        with sock, sock.makefile("rb") as stream:
            sock.sendall(json.dumps(req).encode() + b"\n")
            for line in stream:
                ev = json.loads(line)
                if "error" in ev:
                    raise InspectError(ev["error"])
                if ev["event"] == "trace_start":
                    continue
                if args.json:
                    sys.stdout.write(line.decode())
                elif ev["event"] == "dropped":
                    print(f"--- {ev['count']} events lost: this reader fell behind ---")
                else:
                    t, name = ev.pop("t"), ev.pop("event")
                    print(f"{t:12.6f} {name} " + " ".join(f"{k}={v}" for k, v in ev.items()))
                sys.stdout.flush()
        raise InspectError("the daemon closed the trace (unmounted?)")
    return _run("trace", body, args)


# -- top -----------------------------------------------------------------------------------

#: glyph and colour of each state in a strip; letters, so that the view
#: reads the same without colour (a plain terminal, a captured screen).
EXTENT_GLYPHS = {"HOLE": (".", "bright_black"), "DELALLOC": ("D", "yellow"),
                 "UNWRITTEN": ("U", "cyan"), "WRITTEN": ("W", "green")}
CACHE_GLYPHS = {"none": (" ", ""), "uptodate": ("c", "blue"), "stale": ("s", "bright_black"),
                "dirty": ("d", "red"), "writeback": ("w", "magenta")}
RATES = [("writes", "engine", "writes"), ("punches", "engine", "punches"),
         ("short copies", "engine", "short_copies"), ("stale maps", "engine", "stale_mappings"),
         ("ioends", "iomap", "ioends"), ("writeback ranges", "iomap", "writeback_ranges"),
         ("flusher passes", "cache", "flusher_runs")]
_SHOWN = ("writes", "punches", "ioends", "writeback ranges")


class TopView:
    """Samples the daemon and renders one frame; rates are the counters'
    changes between the last two samples."""

    def __init__(self, address: str, root: str, pins: dict[int, str], nfiles: int):
        self.address = address
        self.root = root
        self.pins = pins
        self.nfiles = nfiles
        self.names: dict[int, str] = dict(pins)
        self.prev: tuple[float, dict] | None = None
        self.rates: dict[str, float] | None = None

    def sample(self, width: int, height: int | None = None) -> dict:
        """One snapshot; with ``height``, no more busiest files than fit
        (each takes 3 rows, the rest of the frame 9)."""
        now = time.monotonic()
        nfiles = self.nfiles
        if height is not None:
            nfiles = max(0, min(nfiles, (height - 9) // 3 - len(self.pins)))
        snap = ask(self.address, {"cmd": "top", "files": nfiles, "pin": list(self.pins),
                                  "width": width})
        st = snap["stat"]
        if self.prev is not None:
            t0, old = self.prev
            dt = max(now - t0, 1e-6)
            self.rates = {label: (st[group][key] - old[group][key]) / dt for label, group, key in RATES}
        self.prev = (now, st)
        self._learn_names(snap["files"])
        return snap

    def _learn_names(self, files: list) -> None:
        """Names for the busiest files the user did not name: the mount's
        top directory, read once per unknown inode (no reverse map exists)."""
        if all(f["ino"] in self.names for f in files):
            return
        try:
            with os.scandir(self.root) as it:
                for _, entry in zip(range(5000), it):
                    self.names.setdefault(entry.inode(), entry.name)
        except OSError:
            pass
        for f in files:
            self.names.setdefault(f["ino"], f"inode {f['ino']}")

    def render(self, snap: dict, interval: float):
        from rich.console import Group
        from rich.text import Text

        def line(*parts, style: str = "") -> Text:
            # Never wrap: an 80-column terminal must keep one row per line.
            t = Text.assemble(*parts, style=style, no_wrap=True, overflow="ellipsis")
            return t

        st = snap["stat"]
        sp, cache = st["space"], st["cache"]
        blocks = lambda n: format_size(n * BLOCK_SIZE)  # noqa: E731
        lines = [line(("delafs top ", "bold"), f"{self.root}  pid {st['daemon']['pid']}  ",
                      time.strftime("%H:%M:%S"), f"  every {interval:g}s")]
        lines.append(line(f"space   free {blocks(sp['available'])}  used {blocks(sp['used'])}  "
                          f"delalloc {blocks(sp['reserved'])}  meta rsv {blocks(sp['metadata_reserve'])}"))
        size = format_size
        lines.append(line(f"cache   dirty {size(cache['dirty_bytes'])}/{size(cache['dirty_limit'])}  "
                          f"writeback {size(cache['writeback_bytes'])}  "
                          f"cached {size(cache['cached_bytes'])}/{size(cache['cache_size'])}"))
        if self.rates is None:
            lines.append(line("per s   (measuring)"))
            lines.append(line(f"flusher passes {cache['flusher_runs']}  "
                              f"throttled now {cache['throttled_now']}"))
        else:
            lines.append(line("per s   " + "  ".join(f"{label} {self.rates[label]:.0f}"
                                                     for label, _, _ in RATES if label in _SHOWN)))
            lines.append(line(f"flusher passes/s {self.rates['flusher passes']:.0f}  "
                              f"throttled now {cache['throttled_now']}  "
                              f"errors {cache['flusher_errors']}  "
                              f"short copies/s {self.rates['short copies']:.0f}  "
                              f"stale maps/s {self.rates['stale maps']:.0f}"))
        lines.append(line(""))
        for f in snap["files"]:
            name = self.names.get(f["ino"], f"inode {f['ino']}")
            if "error" in f:
                lines.append(line(f"{name}: {f['error']}"))
                continue
            lines.append(line((name[:24], "bold"), f"  ino {f['ino']}  {format_size(f['size'])}  "
                              f"delalloc {f['delalloc_blocks']}  dirty {f['dirty_blocks']}  "
                              f"wb {f['writeback_folios']}  col={f['blocks_per_column']} blk"))
            lines.append(_strip("extents ", f["extents"], EXTENT_GLYPHS))
            lines.append(_strip("cache   ", f["cache"], CACHE_GLYPHS))
        if not snap["files"]:
            lines.append(line("no file has cached, dirty or delalloc blocks"))
        lines.append(line(""))
        lines.append(line("D delalloc U unwritten W written . hole | d dirty w writeback c clean s stale",
                          style="dim"))
        return Group(*lines)


def _strip(label: str, states: list[str], glyphs: dict):
    from rich.text import Text
    t = Text(label + "|", no_wrap=True, overflow="crop")
    for s in states:
        ch, colour = glyphs[s]
        t.append(ch, style=colour)
    t.append("|")
    return t


def cmd_top(args) -> int:
    def body(args) -> int:
        from rich.console import Console
        from rich.live import Live

        if args.interval <= 0:
            raise InspectError("--interval needs a positive number of seconds")
        root, info = inspect_address(args.mountpoint)
        pins = {}
        for path in args.file or []:
            try:
                st = os.stat(path)
            except OSError as e:
                raise InspectError(f"{path}: {e.strerror}") from None
            if not stat.S_ISREG(st.st_mode):
                raise InspectError(f"{path} is not a regular file")
            if mount_root(path) != root:
                raise InspectError(f"{path} is not on the delafs mount {root}")
            pins[st.st_ino] = os.path.relpath(os.path.realpath(path), root)
        console = Console()
        view = TopView(info["daemon"]["inspect"], root, pins, args.files)
        width = lambda: max(10, min(console.width, 200) - 10)  # noqa: E731 (the strip's columns)
        frames = 0
        if not console.is_terminal:
            # Plain text, one frame after another (like top -b): for logs,
            # pipes and scripts.
            while args.iterations is None or frames < args.iterations:
                snap = view.sample(width())
                console.print(view.render(snap, args.interval))
                console.print()
                sys.stdout.flush()
                frames += 1
                if args.iterations is None or frames < args.iterations:
                    time.sleep(args.interval)
            return 0
        with Live(console=console, screen=True, auto_refresh=False) as live:
            while args.iterations is None or frames < args.iterations:
                live.update(view.render(view.sample(width(), console.height), args.interval),
                            refresh=True)
                frames += 1
                time.sleep(args.interval)
        return 0
    return _run("top", body, args)


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return n


def add_commands(sub) -> None:
    b = sub.add_parser("bmap", help="extents of a file with their states and page-cache state",
                       description="Print each extent of FILE (on a mounted delafs) like xfs_bmap -v: "
                                   "file blocks, disk blocks, state (HOLE, DELALLOC, UNWRITTEN, "
                                   "WRITTEN) and what the daemon's page cache holds of it (dirty, "
                                   "writeback, uptodate, stale). Blocks are 4 KiB. Reads only.")
    b.add_argument("file", metavar="FILE")
    b.add_argument("-v", "--verbose", action="store_true",
                   help="one line per page-cache run under each extent, with its block range")
    b.add_argument("--json", action="store_true", help="the extents and the cache runs as JSON")
    b.set_defaults(func=cmd_bmap)

    t = sub.add_parser("trace", help="stream the engine's trace events live",
                       description="Stream the iomap/XFS trace events of a mounted delafs (MOUNTPOINT: "
                                   "any path on it) until interrupted. A reader that falls behind "
                                   "loses events and is told how many; the filesystem never waits "
                                   "for it. Reads only.")
    t.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    t.add_argument("--event", action="append", metavar="NAME",
                   help="only this event (repeat for several); --list-events names them")
    t.add_argument("--inode", type=int, metavar="N", help="only events of inode N (ls -i shows it)")
    t.add_argument("--json", action="store_true", help="one JSON object per line")
    t.add_argument("--list-events", action="store_true", help="list the event names and exit")
    t.set_defaults(func=cmd_trace)

    p = sub.add_parser("top", help="live view of space, cache, rates and the busiest files' extents",
                       description="A live view of a mounted delafs, refreshed every --interval: space, "
                                   "dirty/writeback/cached bytes against their limits, the flusher, "
                                   "counters as rates, and for the busiest files (and every --file) "
                                   "a strip of the extent map coloured by state with the page-cache "
                                   "state under it. When stdout is not a terminal it prints plain "
                                   "frames one after another. Reads only; Ctrl-C quits.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--file", action="append", metavar="PATH", help="always show this file (repeatable)")
    p.add_argument("--files", type=int, default=3, metavar="N",
                   help="how many of the busiest other files to show (default 3)")
    p.add_argument("-d", "--interval", type=float, default=0.5, metavar="SECONDS",
                   help="seconds between refreshes (default 0.5)")
    p.add_argument("-n", "--iterations", type=positive_int, metavar="N", help="stop after N frames")
    p.set_defaults(func=cmd_top)
