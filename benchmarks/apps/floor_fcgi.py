"""The pure-Python floor of bench_wsgi.py: the least a FastCGI WSGI responder has to do.

    python3 floor_fcgi.py SOCKET_PATH

Not a server for use: it exists to measure how fast a WSGI server written in Python can
be at all, side by side with spawnd-wsgi, uWSGI and flup. Per request it does only what
every such server must do: split the records, decode PARAMS into the environ (with
spawnd-wsgi's own ``decode_params``, so the two differ in everything but that), add the
``wsgi.*`` keys, call benchapp's application, build the status and header block, and
frame STDOUT and END_REQUEST. It accepts as a process of a spawnd pool must, with
spawnd-wsgi's own code: its listening socket is treated as one shared with sibling
processes (left blocking, watched with EPOLLEXCLUSIVE), and each wake-up takes one
connection with ``ThreadTimer.accept``; the connection stays a bare non-blocking
descriptor (``os.read``/``os.write``), as in spawnd-wsgi. Left out, and so not paid for:
threads, limits, timeouts, management records, multiplexing, ABORT_REQUEST, graceful
stop, header validation, and a streaming ``wsgi.input`` (the body is collected first).
Any protocol fault closes the connection.

FLOOR_EXTRA_US=N in the environment makes each request also burn N µs of CPU (a
busy loop) before it is answered: bench_wsgi_cliff.py uses it to measure how a server's
throughput behind nginx falls as its own cost per request grows.
"""
import io
import os
import select
import signal
import socket
import sys
import threading
import time

from benchapp import application
# the protocol module's own record layouts (private names: this is a benchmark's floor)
from spawnd.fastcgi.protocol import (_CLOSE_AND_END, _HEADER, END_REQUEST, STDOUT,
                                     VERSION_1, encode_stream)
from spawnd.wsgi.environ import decode_params
# spawnd-wsgi's bounded accept (its KICK handler is private, as above)
from spawnd.wsgi.server import ACCEPT_BOUND, KICK, ThreadTimer, _ignore

EXTRA = float(os.environ.get("FLOOR_EXTRA_US") or 0) * 1e-6
BASE = {"wsgi.version": (1, 0), "wsgi.errors": sys.stderr, "wsgi.multithread": False,
        "wsgi.multiprocess": True, "wsgi.run_once": False, "wsgi.input_terminated": True,
        "wsgi.url_scheme": "http"}


def respond(rid: int, params: bytes, body: bytes) -> bytes:
    if EXTRA:
        until = time.perf_counter() + EXTRA
        while time.perf_counter() < until:
            pass
    environ = decode_params(params)
    environ.update(BASE)
    environ["wsgi.input"] = io.BytesIO(body)
    head = []

    def start_response(status, headers, exc_info=None):
        head.append("Status: %s\r\n%s\r\n" % (status, "".join("%s: %s\r\n" % h
                                                             for h in headers)))
    result = application(environ, start_response)
    data = b"".join((head[0].encode("latin-1"), *result))
    end = _CLOSE_AND_END.pack(VERSION_1, STDOUT, rid, 0, 0,         # empty STDOUT,
                              VERSION_1, END_REQUEST, rid, 8, 0, 0, 0)  # END_REQUEST
    return b"".join((encode_stream(STDOUT, rid, data), end))


class Conn:
    __slots__ = ("fd", "buf", "params", "body", "keep")

    def __init__(self, fd: int):
        self.fd, self.buf, self.params, self.body, self.keep = fd, b"", [], [], False

    def feed(self, data: bytes) -> bool:
        """Take received bytes, answer every complete request; False: close."""
        buf = self.buf + data if self.buf else data
        off, n = 0, len(buf)
        while n - off >= 8:
            _, rtype, rid, clen, plen = _HEADER.unpack_from(buf, off)
            end = off + 8 + clen
            if end + plen > n:
                break
            if rtype == 1:                          # BEGIN_REQUEST
                self.keep = bool(buf[off + 10] & 1)
            elif rtype == 4 and clen:               # PARAMS
                self.params.append(buf[off + 8:end])
            elif rtype == 5:                        # STDIN
                if clen:
                    self.body.append(buf[off + 8:end])
                else:
                    out = respond(rid, b"".join(self.params), b"".join(self.body))
                    self.params, self.body = [], []
                    write_all(self.fd, out)
                    if not self.keep:
                        return False
            off = end + plen
        self.buf = buf[off:]
        return True


def write_all(fd: int, data: bytes) -> None:
    """Write everything to the non-blocking descriptor (waiting in select() if it must)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])


def serve(conn: Conn) -> bool:
    """Read and answer; False when the connection is to be closed (its end, or any fault
    at all). BlockingIOError propagates: nothing to read yet."""
    try:
        data = os.read(conn.fd, 1 << 16)
        return bool(data) and conn.feed(data)
    except BlockingIOError:
        raise
    except Exception:           # a floor, not a server: drop the connection
        return False


def listen(path: str) -> tuple[socket.socket, ThreadTimer]:
    """A listening Unix socket at ``path`` (a stale file replaced) and the timer that
    bounds each accept on it, set up as spawnd-wsgi does for a shared socket."""
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(4096)
    signal.signal(KICK, _ignore)
    return listener, ThreadTimer(KICK, threading.get_native_id(), ACCEPT_BOUND)


def main() -> None:
    listener, bound = listen(sys.argv[1])
    lfd = listener.fileno()
    epoll = select.epoll()
    epoll.register(lfd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
    conns = {}
    while True:
        for fd, _ in epoll.poll():
            if fd == lfd:
                cfd, _ = bound.accept(lfd)
                if cfd < 0:
                    continue        # nothing to take (or any error: a floor, not a server)
                conn = Conn(cfd)    # non-blocking, as spawnd-wsgi's connections
                try:            # the request usually came with the connection
                    alive = serve(conn)
                except BlockingIOError:
                    alive = True
                if alive:
                    conns[cfd] = conn
                    epoll.register(cfd, select.EPOLLIN)
                else:
                    os.close(cfd)
                continue
            conn = conns[fd]
            try:
                alive = serve(conn)
            except BlockingIOError:
                continue            # (a spurious wake-up)
            if not alive:
                del conns[fd]
                os.close(fd)


if __name__ == "__main__":
    main()
