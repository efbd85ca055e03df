"""The inspection socket: how ``delafs bmap``, ``trace`` and ``top`` watch a
running daemon.

Why not the control file: a FUSE READ cannot be interrupted through
pyfuse3 (it does not handle INTERRUPT), so a trace reader blocked in one
would ignore Ctrl-C; a command must be written to the file, which a
read-only mount refuses; and every exchange costs several FUSE requests
that show up in what is being watched.  So the daemon also listens on a
Unix socket in the abstract namespace (nothing to clean up after a crash),
named in the ``daemon.inspect`` field of the ``stat`` JSON that the control
file gives to any reader.  The control file stays the way to *change*
things (sync, inject, mark); this socket only answers questions, so nothing
sent to it can change the filesystem.  It accepts the same users the
control file does: root and the daemon's own user (SO_PEERCRED).

Protocol: the client sends one JSON object on one line; the daemon answers
with one JSON line, or for ``trace`` with JSON lines until the client hangs
up.  Errors are ``{"error": "...", "errno": N}``.

    {"cmd": "stat"}                               the stat JSON
    {"cmd": "bmap", "ino": N}                     Mount.bmap
    {"cmd": "top", "files": K, "pin": [N...], "width": W}
        stat, plus an extent/cache strip of the pinned inodes and of the K
        busiest others (Mount.bmap_strip, Mount.busiest)
    {"cmd": "trace", "events": [NAME...] | null, "ino": N | null}
        {"t": seconds, "event": NAME, FIELD: VALUE...} per event, and
        {"event": "dropped", "count": N} where events were lost because the
        reader fell behind (each reader has its own bounded queue)

The client side (connect, request) is in cli/inspect.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
import struct
import time

import trio

from ..lib.errors import DelafsError, FsError
from ..lib.trace import EVENTS, TRACE, Subscription
from .control import CONTROL_INO

log = logging.getLogger("delafs")

TRACE_INTERVAL = 0.05        # seconds between batches sent to a trace reader
TRACE_QUEUE = 16384          # events a trace reader may fall behind before drops
MAX_REQUEST = 64 << 10
REQUEST_WAIT = 10.0          # seconds a connection may take to send its request


def peer_uid(sock) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class InspectServer:
    def __init__(self, daemon):
        self.daemon = daemon
        self.name = f"delafs-{os.getpid()}-{secrets.token_hex(4)}"
        self.clients = 0

    @property
    def address(self) -> str:
        """As ss(8) prints it: '@' for the abstract namespace's NUL."""
        return "@" + self.name

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind("\0" + self.name)
        sock.listen(16)
        task_status.started()
        await trio.serve_listeners(self._handle, [trio.SocketListener(sock)])

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.clients += 1
        try:
            if peer_uid(stream.socket) not in (0, os.geteuid()):
                await self._send(stream, {"error": "permission denied", "errno": errno.EACCES})
                return
            request = await self._request(stream)
            if request is not None:
                await self._dispatch(stream, request)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass            # the client went away: nothing to answer
        except Exception:
            log.exception("inspection request")
        finally:
            self.clients -= 1
            await stream.aclose()

    async def _request(self, stream) -> dict | None:
        buf = b""
        with trio.move_on_after(REQUEST_WAIT):
            while b"\n" not in buf:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return None
                buf += chunk
                if len(buf) > MAX_REQUEST:
                    await self._send(stream, {"error": "request too long", "errno": errno.EINVAL})
                    return None
        if b"\n" not in buf:
            return None         # a connection that never asks is closed
        try:
            request = json.loads(buf.split(b"\n", 1)[0])
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError as e:
            await self._send(stream, {"error": f"bad request: {e}", "errno": errno.EINVAL})
            return None
        return request

    @staticmethod
    async def _send(stream, obj) -> None:
        await stream.send_all(json.dumps(obj, default=str).encode() + b"\n")

    async def _dispatch(self, stream, request: dict) -> None:
        cmd = request.get("cmd")
        handler = getattr(self, f"cmd_{cmd}", None) if isinstance(cmd, str) else None
        try:
            if handler is None:
                raise FsError(errno.EINVAL, f"unknown inspection command {cmd!r}")
            reply = await handler(stream, request)
        except FsError as e:
            reply = {"error": str(e), "errno": e.errno}
        except DelafsError as e:      # damage: say what the image lost
            reply = {"error": str(e), "errno": errno.EIO}
        if reply is not None:
            await self._send(stream, reply)

    # -- commands ------------------------------------------------------------------------

    async def cmd_stat(self, stream, request) -> dict:
        return self.daemon.statistics()

    @staticmethod
    def _ino(value) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise FsError(errno.EINVAL, f"bad inode number {value!r}")
        return value

    async def cmd_bmap(self, stream, request) -> dict:
        ino = self._ino(request.get("ino"))
        if ino == CONTROL_INO:
            raise FsError(errno.EINVAL, "the control file has no extents (it is not stored in the image)")
        return await self.daemon.m.bmap(ino)

    async def cmd_top(self, stream, request) -> dict:
        m = self.daemon.m
        width = request.get("width", 60)
        nfiles = request.get("files", 3)
        pins = request.get("pin") or []
        if not isinstance(pins, list):
            raise FsError(errno.EINVAL, f"bad pin list {pins!r}")
        pins = [self._ino(i) for i in pins]
        if not isinstance(width, int) or not 1 <= width <= 1000:
            raise FsError(errno.EINVAL, f"bad width {width!r}")
        if not isinstance(nfiles, int) or not 0 <= nfiles <= 100:
            raise FsError(errno.EINVAL, f"bad number of files {nfiles!r}")
        files = []
        for ino in pins + [i for i in m.busiest(nfiles + len(pins)) if i not in pins][:nfiles]:
            try:
                files.append(await m.bmap_strip(ino, width))
            except FsError as e:
                files.append({"ino": ino, "error": str(e)})
        return {"time": time.time(), "stat": self.daemon.statistics(), "files": files}

    async def cmd_trace(self, stream, request) -> None:
        events = request.get("events")
        if events is not None:
            unknown = sorted(set(events) - set(EVENTS)) if isinstance(events, list) else [events]
            if unknown:
                raise FsError(errno.EINVAL, f"unknown trace event(s) {', '.join(map(str, unknown))} "
                                            f"(known: {', '.join(EVENTS)})")
        ino = request.get("ino")
        sub = Subscription(events, None if ino is None else self._ino(ino), capacity=TRACE_QUEUE)
        t0 = time.monotonic()
        await self._send(stream, {"event": "trace_start", "t": 0.0})
        TRACE.subscribe(sub)
        try:
            async with trio.open_nursery() as n:
                n.start_soon(self._until_hangup, stream, n.cancel_scope)
                n.start_soon(self._pump, stream, sub, t0, n.cancel_scope)
        finally:
            TRACE.unsubscribe(sub)

    @staticmethod
    async def _pump(stream, sub: Subscription, t0: float, scope: trio.CancelScope) -> None:
        try:
            while True:
                await trio.sleep(TRACE_INTERVAL)
                got, dropped = sub.drain()
                lines = []
                if dropped:
                    lines.append(json.dumps({"event": "dropped", "count": dropped}))
                for t, name, fields in got:
                    lines.append(json.dumps({"t": round(t - t0, 6), "event": name, **fields},
                                            default=str))
                if lines:
                    await stream.send_all(("\n".join(lines) + "\n").encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()          # the reader went away

    @staticmethod
    async def _until_hangup(stream, scope: trio.CancelScope) -> None:
        """A trace reader sends nothing after its request: EOF (or a reset)
        means it is gone, even while no events flow to notice it by."""
        try:
            while await stream.receive_some(4096):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

