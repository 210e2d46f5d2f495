"""A tiny HTTP/1.1 server for Prometheus scrapes, on the supervisor's loop.

::

    server = MetricsServer(loop, "127.0.0.1", 9101, lambda: exposition(supervisor))
    server.open()        # binds and listens; ListenError if it cannot
    ...
    server.close()

``GET /metrics`` (a query string is ignored) answers 200 with the text ``render()``
returns, as ``text/plain; version=0.0.4; charset=utf-8``; ``HEAD`` the same without the
body; other paths 404; other methods 405 (with ``Allow: GET, HEAD``); a malformed
request 400; a request head over 8 KiB 431; an HTTP version other than 1.x 505; an
exception in ``render()`` 500 (and a log line). Every response carries
``Connection: close``: one request per connection, which is what Prometheus does anyway
when told nothing else, and it keeps the server small.

Nothing here blocks: the listening socket and every connection are non-blocking, each
connection has its own buffers, at most ``max_connections`` are served at once (the
rest wait in the kernel's backlog), and each connection has ``timeout`` seconds (a loop
timer) for the whole exchange, so a silent or slow client costs one fd and a few bytes
until then and never delays anyone else. When accept() fails for want of fds or
memory, the server stops watching the listening socket for 0.5 s at a time (logging
once) rather than spinning on it. After the response the connection is shut
down for writing and the client's leftovers are read and dropped until it closes
(a "lingering close"), so an unread byte never turns the end of the response into a
reset.
"""
from __future__ import annotations

import errno
import selectors
import socket
from urllib.parse import urlsplit

from .listen import ListenError
from .log import log

__all__ = ["MetricsServer", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD = 8192
RECV_SIZE = 16384
ACCEPTS_PER_EVENT = 16
LINGER = 2.0                # seconds a client gets to close after its response
PAUSE = 0.5                 # seconds without accepting after EMFILE and the like
_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_TEXT = "text/plain; charset=utf-8"
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            505: "HTTP Version Not Supported"}


class MetricsServer:
    def __init__(self, loop, host: str, port: int, render, *, path: str = "/metrics",
                 timeout: float = 10.0, max_connections: int = 64, backlog: int = 64):
        self.loop = loop
        self.host, self.port = host, port
        self.render = render
        self.path = path
        self.timeout = timeout
        self.max_connections = max_connections
        self.backlog = backlog
        self.sock: socket.socket | None = None
        self.connections: set[_Connection] = set()
        self._accepting = False
        self._pause_timer = None    # set while accepting is paused (out of resources)
        self._pause_logged = False  # one log line per episode, not per retry

    # ---- life cycle -------------------------------------------------------------------
    def open(self) -> None:
        """Bind and listen; with port 0 the kernel picks one (read it from .port)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((self.host, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ListenError(f"metrics: cannot listen on {self._where()}: "
                              f"{exc.strerror or exc}") from None
        self.sock = sock
        self.port = sock.getsockname()[1]
        self._accept_on()

    def close(self) -> None:
        """Stop listening and drop every connection."""
        for conn in list(self.connections):
            conn.close()
        if self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None
        if self.sock is not None:
            self._accept_off()
            self.sock.close()
            self.sock = None

    def _where(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    # ---- accepting --------------------------------------------------------------------
    def _accept_on(self) -> None:
        if not self._accepting and self.sock is not None and self._pause_timer is None:
            self.loop.add_reader(self.sock.fileno(), self._on_accept)
            self._accepting = True

    def _accept_off(self) -> None:
        if self._accepting:
            self.loop.remove_reader(self.sock.fileno())
            self._accepting = False

    def _on_accept(self, _mask=None) -> None:
        for _ in range(ACCEPTS_PER_EVENT):
            if len(self.connections) >= self.max_connections:
                self._accept_off()          # the rest wait in the backlog
                return
            try:
                sock, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:          # ECONNABORTED and the like: keep serving
                if exc.errno in _EXHAUSTED:
                    self._pause(exc)
                return
            self._pause_logged = False
            self.connections.add(_Connection(self, sock))

    def _pause(self, exc: OSError) -> None:
        """Out of fds or memory: the connection stays in the backlog and the listening
        socket readable (level-triggered), so stop watching it for PAUSE seconds instead
        of spinning; log once until an accept succeeds again."""
        if not self._pause_logged:
            log.warning(f"metrics: accept failed ({exc.strerror}); retrying every "
                        f"{PAUSE}s until it succeeds")
            self._pause_logged = True
        self._accept_off()
        self._pause_timer = self.loop.call_later(PAUSE, self._resume)

    def _resume(self) -> None:
        self._pause_timer = None
        if len(self.connections) < self.max_connections:
            self._accept_on()

    def _closed(self, conn) -> None:
        self.connections.discard(conn)
        if len(self.connections) < self.max_connections:
            self._accept_on()

    # ---- answering --------------------------------------------------------------------
    def respond(self, head: bytes) -> bytes:
        """The complete response to one request head (request line + headers)."""
        lines = head.split(b"\n")
        parts = lines[0].rstrip(b"\r").split(b" ")
        if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
            return _response(400, "malformed request line\n")
        method, target, version = parts
        if not version.startswith(b"HTTP/") or not all(32 < c < 127 for c in target):
            return _response(400, "malformed request line\n")
        if version not in (b"HTTP/1.0", b"HTTP/1.1"):
            return _response(505, "only HTTP/1.0 and HTTP/1.1 are spoken here\n")
        for line in lines[1:]:
            name, colon, _value = line.rstrip(b"\r").partition(b":")
            if not colon or not name or name != name.strip():
                return _response(400, "malformed header line\n")
        path = urlsplit(target.decode("ascii")).path
        head_only = method == b"HEAD"      # a HEAD answer never has a body, whatever it is
        if path != self.path:
            return _response(404, f"not found; metrics are at {self.path}\n",
                             head_only=head_only)
        if method not in (b"GET", b"HEAD"):
            return _response(405, "only GET and HEAD are allowed\n",
                             extra="Allow: GET, HEAD\r\n")
        try:
            body = self.render()
        except Exception as exc:            # a bug in render must not kill the loop
            log.error(f"metrics: rendering failed: {exc!r}")
            return _response(500, "rendering the metrics failed\n", head_only=head_only)
        return _response(200, body, content_type=CONTENT_TYPE, head_only=head_only)


def _response(status: int, body: str, *, content_type: str = _TEXT, extra: str = "",
              head_only: bool = False) -> bytes:
    data = body.encode("utf-8")
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\n{extra}Connection: close\r\n\r\n")
    return head.encode("ascii") + (b"" if head_only else data)


_READING, _WRITING, _DRAINING = range(3)


class _Connection:
    """One client: read the head, write the response, drain, close."""

    def __init__(self, server: MetricsServer, sock: socket.socket) -> None:
        self.server = server
        self.loop = server.loop
        self.sock = sock
        self.fd = sock.fileno()
        sock.setblocking(False)
        self.buf = bytearray()
        self.out = memoryview(b"")
        self.state = _READING
        self.timer = self.loop.call_later(server.timeout, self.close)
        self.loop.add_reader(self.fd, self._on_event)

    def _on_event(self, mask: int) -> None:
        try:
            if self.state == _WRITING:
                self._write()
            elif self.state == _READING:
                self._read()
            else:
                if not self.sock.recv(RECV_SIZE):   # leftovers dropped; EOF: done
                    self.close()
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:                     # reset by the client and the like
            self.close()

    def _read(self) -> None:
        data = self.sock.recv(RECV_SIZE)
        if not data:
            self.close()                    # gave up before finishing its request
            return
        self.buf += data
        end = self._head_end()
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self._send(_response(431, f"request head over {MAX_HEAD} bytes\n"))
            return
        if end > MAX_HEAD:
            self._send(_response(431, f"request head over {MAX_HEAD} bytes\n"))
            return
        self._send(self.server.respond(bytes(self.buf[:end])))

    def _head_end(self) -> int:
        """Length of the request head without its blank line, or -1 if incomplete."""
        crlf = self.buf.find(b"\r\n\r\n")
        lf = self.buf.find(b"\n\n")
        found = [i for i in (crlf, lf) if i >= 0]
        return min(found) if found else -1

    def _send(self, data: bytes) -> None:
        self.buf = bytearray()
        self.out = memoryview(data)
        self.state = _WRITING
        self.loop.selector.modify(self.fd, selectors.EVENT_WRITE, self._on_event)
        self._write()

    def _write(self) -> None:
        self.out = self.out[self.sock.send(self.out):]
        if self.out:
            return
        # All sent: tell the client, then read (and drop) what it still sends until EOF.
        self.state = _DRAINING
        self.sock.shutdown(socket.SHUT_WR)
        self.timer.cancel()
        self.timer = self.loop.call_later(min(LINGER, self.server.timeout), self.close)
        self.loop.selector.modify(self.fd, selectors.EVENT_READ, self._on_event)

    def close(self) -> None:
        if self.sock is None:
            return
        self.timer.cancel()
        self.loop.remove_reader(self.fd)
        self.sock.close()
        self.sock = None
        self.server._closed(self)
