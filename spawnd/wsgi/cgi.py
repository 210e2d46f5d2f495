"""CGI mode: one request from the process environment and stdin, the response on stdout.

The request body is read from fd 0 up to CONTENT_LENGTH bytes (some CGI servers hand over
the client connection itself as stdin, so reading to end of file could block); without a
CONTENT_LENGTH it is read to end of file.
"""
from __future__ import annotations

import os
import sys

from spawnd.wsgi.environ import NotMounted, build_environ, content_length, wsgi_base
from spawnd.wsgi.response import NOT_FOUND, PeerGone, run_app
from spawnd.wsgi.stream import InputStream

CHUNK = 1 << 16


class StdoutSink:
    """Raw response bytes to a file descriptor, unbuffered."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.ended = False

    def send(self, data: bytes, end: bool = False) -> None:
        if self.ended:
            return
        self.ended = end
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            raise PeerGone() from exc


def body_reader(fd: int, length: int | None):
    remaining = [length]

    def next_chunk() -> bytes:
        left = remaining[0]
        if left == 0:
            return b""
        data = os.read(fd, CHUNK if left is None else min(CHUNK, left))
        if left is not None:
            remaining[0] = left - len(data) if data else 0
        return data
    return next_chunk


def serve_cgi(app, script_name: str | None = None, stdin_fd: int = 0,
              stdout_fd: int = 1) -> int:
    """Serve the one request; returns the exit status: 0, or 1 when the response could
    not be completed (stdout failed, or the application failed after its headers)."""
    params = [(name.decode("latin-1"), value.decode("latin-1"))
              for name, value in os.environb.items()]
    sink = StdoutSink(stdout_fd)
    try:
        environ = build_environ(params, script_name)
        mounted = True
    except NotMounted:          # answered 404; its body is still consumed (see below)
        environ = build_environ(params)
        mounted = False
    try:
        length = content_length(environ)
    except ValueError:
        length = 0
        print(f"spawnd-wsgi: invalid CONTENT_LENGTH {environ['CONTENT_LENGTH']!r};"
              " ignoring the body", file=sys.stderr)
    stream = InputStream(body_reader(stdin_fd, length))
    if mounted:
        environ.update(wsgi_base(multithread=False, multiprocess=True, run_once=True))
        environ["wsgi.input"] = stream
        ok = run_app(app, environ, sink)
    else:
        try:
            sink.send(NOT_FOUND, end=True)
            ok = True
        except PeerGone:
            ok = False
    try:
        # A CGI server still writing the body would fail the whole response (fcgiwrap
        # answers 502 on EPIPE), so consume what the application left unread.
        stream.drain()
    except OSError:
        pass
    return 0 if ok else 1
