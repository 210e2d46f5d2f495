"""The admin socket: JSON lines over a Unix stream socket, served by the supervisor's loop.

Request  {"cmd": "status", "args": {"pool": "php"}}
Reply    {"ok": true, "result": {...}}  or  {"ok": false, "error": "message"}

No thread per client: every connection is non-blocking and driven by the loop, so a slow
or silent client delays nobody. A request line is at most MAX_REQUEST bytes (a longer one
gets an error and the connection is closed, as it cannot be resynchronised); a line that
is not a valid request gets an error reply and the connection stays usable. Commands that
take time (stop, restart, scale, reload) reply when the change is complete; further lines
from that client wait their turn.

Who may do what is decided from the peer's credentials (SO_PEERCRED): root and spawnd's
own user may do everything, members of admin_group may run the read-only commands, and
everybody else is refused. The socket file is created owner-only and gets admin_mode
(and admin_group) before listen(), so it is never wider than configured, not even briefly.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import struct

from . import listen as listenmod
from .log import log

SO_PEERGROUPS = 59
MAX_REQUEST = 65536
MAX_PENDING_OUTPUT = 16 * 1024 * 1024
MAX_CLIENTS = 64
READ_ONLY = frozenset({"status", "logs", "metrics"})


class CommandError(Exception):
    """A command that cannot be carried out; the message goes back to the client."""


class AdminServer:
    def __init__(self, supervisor, path: str, mode: int, group: int | None):
        self.supervisor = supervisor
        self.loop = supervisor.loop
        self.path, self.mode, self.group = path, mode, group
        self.sock: socket.socket | None = None
        self.inode = None
        self.clients: set[AdminConnection] = set()

    def open(self) -> None:
        """Create the socket (raises listen.ListenError with a clear message)."""
        parent = os.path.dirname(self.path)
        if parent and not os.path.isdir(parent):
            try:
                os.makedirs(parent, mode=0o755)
            except OSError as e:
                raise listenmod.ListenError(f"cannot create {parent}: {e.strerror}") from None
        try:
            listenmod.clear_stale(self.path, f"admin socket {self.path}")
        except listenmod.ListenError as e:
            if "in use" in str(e):
                raise listenmod.ListenError(
                    f"admin socket {self.path} is in use: is another spawnd running?") from None
            raise
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
            st = os.lstat(self.path)
            if self.group is not None:
                os.chown(self.path, -1, self.group)
            os.chmod(self.path, self.mode)
            sock.listen(64)
        except OSError as e:
            sock.close()
            raise listenmod.ListenError(f"cannot create admin socket {self.path}: "
                                        f"{e.strerror or e}") from None
        finally:
            os.umask(old)
        sock.setblocking(False)
        self.sock, self.inode = sock, (st.st_dev, st.st_ino)
        self.loop.add_reader(sock.fileno(), self._accept)

    def close(self) -> None:
        for c in list(self.clients):
            c.close()
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            listenmod.Bound(self.sock, self.path, self.path, self.inode).close()
            self.sock = None

    def _resume(self) -> None:
        if self.sock is not None:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self, _mask=None) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The pending connection stays pending and the event level-triggered:
                    # stop listening for a moment instead of spinning.
                    log.warning(f"admin socket: accept failed ({e.strerror}); pausing 0.5s")
                    self.loop.remove_reader(self.sock.fileno())
                    self.loop.call_later(0.5, self._resume)
                else:
                    log.warning(f"admin socket: accept failed: {e.strerror}")
                return
            if len(self.clients) >= MAX_CLIENTS:
                conn.close()
                continue
            self.clients.add(AdminConnection(self, conn))


class AdminConnection:
    def __init__(self, server: AdminServer, sock: socket.socket):
        self.server, self.sock = server, sock
        self.loop = server.loop
        sock.setblocking(False)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.pid, self.uid, self.gid = struct.unpack("3i", creds)
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.busy = False               # a command is in progress: later lines wait
        self.closing = False            # close once the output is flushed
        self.follow = None              # cancel function of a `logs -f` subscription
        self.fd = sock.fileno()
        self.events = 0
        self._watch(1)

    # ---- I/O --------------------------------------------------------------------------
    def _on_event(self, mask=1) -> None:
        if mask & 2:                    # EVENT_WRITE
            self._flush()
        if mask & 1 and self.fd >= 0 and not self.closing:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            self.inbuf += data
            self._process()
            if self.fd >= 0 and self.busy and len(self.inbuf) > MAX_REQUEST:
                self._flush()           # stop reading until the command in progress replies

    def _process(self) -> None:
        while not self.busy and not self.closing:
            nl = self.inbuf.find(b"\n")
            if nl < 0:
                if len(self.inbuf) > MAX_REQUEST:
                    self.inbuf.clear()
                    self.send({"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})
                    self.closing = True
                    self._flush()
                return
            line = bytes(self.inbuf[:nl])
            del self.inbuf[:nl + 1]
            if line.strip():
                self._handle(line)

    def send(self, obj) -> None:
        if self.fd < 0:
            return
        self.outbuf += json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        if len(self.outbuf) > MAX_PENDING_OUTPUT:
            log.warning(f"admin client pid {self.pid} does not read its replies; dropped")
            self.close()
            return
        self._flush()

    def _flush(self) -> None:
        if self.fd < 0:
            return
        while self.outbuf:
            try:
                n = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            del self.outbuf[:n]
        if self.closing and not self.outbuf:
            self.close()
            return
        # Read only while input can be used: a closing connection, or a busy one that
        # already holds a whole request's worth of unread input, is not read (a level-
        # triggered read event it ignores would spin the loop; reading on would grow memory).
        reading = not self.closing and not (self.busy and len(self.inbuf) > MAX_REQUEST)
        self._watch((1 if reading else 0) | (2 if self.outbuf else 0))

    def _watch(self, events: int) -> None:
        """Register for exactly these selector events (0: none)."""
        if events == self.events:
            return
        sel = self.loop.selector
        if not events:
            sel.unregister(self.fd)
        elif not self.events:
            sel.register(self.fd, events, self._on_event)
        else:
            sel.modify(self.fd, events, self._on_event)
        self.events = events

    def close(self) -> None:
        if self.fd < 0:
            return
        if self.follow is not None:
            self.follow()
            self.follow = None
        self.loop.remove_reader(self.fd)
        self.sock.close()
        self.fd = -1
        self.server.clients.discard(self)

    # ---- requests -------------------------------------------------------------------------
    def _handle(self, line: bytes) -> None:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError('expected {"cmd": "...", "args": {...}}')
            cmd, args = req["cmd"], req.get("args") or {}
            if not isinstance(args, dict):
                raise ValueError('"args" must be an object')
        except (ValueError, RecursionError) as e:     # RecursionError: '[' * 60000
            self.send({"ok": False, "error": f"bad request: {e}"})
            return
        if not self.authorized(cmd):
            self.send({"ok": False, "error": f"permission denied: uid {self.uid} may not run "
                                             f"'{cmd}'"})
            return
        self.busy = True
        replied = False

        def reply(result=None, error=None):
            nonlocal replied
            if replied:
                return
            replied = True
            self.busy = False
            self.send({"ok": False, "error": error} if error is not None
                      else {"ok": True, "result": result})
            if self.fd >= 0:
                self._process()

        try:
            self.server.supervisor.command(cmd, args, reply, self)
        except CommandError as e:
            reply(error=str(e))
        except Exception as e:          # a bug must not take the daemon down
            log.error(f"admin command {cmd!r} failed: {e!r}")
            reply(error=f"internal error: {e}")

    def authorized(self, cmd: str) -> bool:
        if self.uid in (0, os.geteuid()):
            return True
        group = self.server.group
        return cmd in READ_ONLY and group is not None and self._in_group(group)

    def _in_group(self, gid: int) -> bool:
        """The peer's groups as the kernel recorded them at connect() (SO_PEERGROUPS, so
        a pid reused since cannot lie)."""
        if self.gid == gid:
            return True
        try:
            raw = self.sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)  # Python's max
        except OSError:             # ERANGE: more than 256 groups; ask /proc instead
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    line = next(l for l in f if l.startswith("Groups:"))
                return str(gid) in line.split()[1:]
            except (OSError, StopIteration):
                return False
        return gid in struct.unpack(f"{len(raw) // 4}I", raw)
