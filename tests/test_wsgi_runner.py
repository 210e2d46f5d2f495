"""spawnd-wsgi as a process, driven with raw FastCGI (no web server in between)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import struct
import subprocess
import termios
import threading
import time

import pytest

from spawnd import health
from spawnd.fastcgi.protocol import (ABORT_REQUEST, BEGIN_REQUEST, CANT_MPX_CONN,
                                     END_REQUEST, PARAMS, STDIN, STDOUT, UNKNOWN_ROLE,
                                     ClientConnection, EndRequest, GetValuesResult, Stdout,
                                     encode_pairs, encode_record)
from support.proc import blocked_syscall, cpu_ticks
from test_wsgi_support import (Exchange, Runner, cgi_params, connect, split_cgi,
                               wait_until, write_app)

APPS = r'''
import os, sys, time

def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello pid=%d path=%s" % (os.getpid(), environ["PATH_INFO"].encode("latin-1"))]

def echo(environ, start_response):
    if "READING" in os.environ:                 # tell the test the body is being read
        open(os.environ["READING"], "w").close()
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [body]

def started_echo(environ, start_response):
    write = start_response("200 OK", [("Content-Type", "application/octet-stream")])
    write(b"started ")              # the headers go out before the body is read
    return [environ["wsgi.input"].read()]

class DrainOnClose:
    def __init__(self, environ):
        self.environ = environ
    def __iter__(self):
        yield b"too large"
    def close(self):                # a middleware habit: consume the unread body
        print("close() read %d bytes" % len(self.environ["wsgi.input"].read()),
              file=sys.stderr)

def refuse_body(environ, start_response):
    start_response("413 Payload Too Large", [("Content-Type", "text/plain")])
    return DrainOnClose(environ)

def reread(environ, start_response):
    open(os.environ["READING"], "w").close()
    for _ in range(2):              # the second read comes after the abort
        try:
            print("read %d bytes" % len(environ["wsgi.input"].read()), file=sys.stderr)
        except ConnectionError as exc:
            print("read failed:", exc, file=sys.stderr)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ignored"]

def slow(environ, start_response):
    time.sleep(float(environ["QUERY_STRING"] or "1"))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"slow done"]

def raise_before(environ, start_response):
    raise RuntimeError("boom before start_response")

def raise_after(environ, start_response):
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"partial")
    def gen():
        yield b" more"
        raise RuntimeError("boom after start_response")
    return gen()

class Recorded:
    def __init__(self, marker):
        self.marker = marker
    def __iter__(self):
        chunk = b"x" * 65536
        for _ in range(100000):
            yield chunk
    def close(self):
        with open(self.marker, "a") as f:
            f.write("closed\n")

def endless(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return Recorded(os.environ["MARKER"])

class CloseRaises:
    def __iter__(self):
        yield b"complete"
    def close(self):
        raise RuntimeError("boom in close")

def close_raises(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return CloseRaises()

def exit3(environ, start_response):
    sys.exit(3)

def interrupt(environ, start_response):
    raise KeyboardInterrupt

def two_chunks(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"first "
    yield b"second"

def role(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [environ.get("FCGI_ROLE", "unset").encode()]

KEPT = []

def stale_write(environ, start_response):
    for write in KEPT:          # the previous request's write(), kept past its end
        write(b"STALE")
    KEPT.append(start_response("200 OK", [("Content-Type", "text/plain")]))
    return [b"fresh"]

def router(environ, start_response):
    name = environ["PATH_INFO"].strip("/").split("/")[0] or "hello"
    return globals()[name](environ, start_response)
'''


@pytest.fixture
def appdir(tmp_path):
    write_app(tmp_path, "apps", APPS)
    return tmp_path


def test_serves_a_request_and_answers_get_values(appdir):
    with Runner(appdir, "apps:hello", "--threads", "3") as r:
        ex = Exchange(r.path)
        out, err, end = ex.request(cgi_params("/a/b"))
        assert split_cgi(out)[0] == 200 and b"path=/a/b" in out, out
        assert end.app_status == 0 and end.protocol_status == 0
        ex.close()
        s = connect(r.path)
        client = ClientConnection()
        s.sendall(client.get_values([b"FCGI_MAX_REQS", b"FCGI_MPXS_CONNS", b"NOPE"]))
        events = []
        while not events:
            data = s.recv(4096)
            assert data, "the runner closed the connection without answering GET_VALUES"
            events = client.receive_data(data)
        s.close()
        # FCGI_MAX_REQS: the requests it runs at once (--threads), one per connection
        assert events == [GetValuesResult({b"FCGI_MAX_REQS": b"3",
                                           b"FCGI_MPXS_CONNS": b"0"})]
        assert r.stop() == 0


@pytest.mark.parametrize("threads", ["1", "4"])
def test_idle_keepalive_connections_do_not_starve_new_requests(appdir, threads):
    with Runner(appdir, "apps:hello", "--threads", threads) as r:
        idle = []
        for _ in range(20):
            ex = Exchange(r.path)
            assert split_cgi(ex.request(cgi_params("/"), keep_conn=True)[0])[0] == 200
            idle.append(ex)          # held open, idle, like nginx's keepalive cache
        half = socket.socket(socket.AF_UNIX)
        half.connect(r.path)
        half.sendall(b"\x01\x01\x00")   # a partial record that never completes
        t0 = time.monotonic()
        for _ in range(20):
            ex = Exchange(r.path, timeout=5)
            assert b"hello" in ex.request(cgi_params("/new"))[0]
            ex.close()
        # the idle connections are still usable
        for ex in idle:
            assert b"hello" in ex.request(cgi_params("/again"), keep_conn=True)[0]
            ex.close()
        half.close()
        assert time.monotonic() - t0 < 5
        assert r.stop() == 0


def test_a_peer_flooding_get_values_without_reading_stalls_nobody(appdir):
    """The replies are sent without blocking; past 64 KiB unread the peer is cut off."""
    with Runner(appdir, "apps:hello") as r:
        flood = connect(r.path, timeout=20)
        batch = ClientConnection().get_values([b"FCGI_MAX_CONNS", b"FCGI_MAX_REQS",
                                               b"FCGI_MPXS_CONNS"]) * 1000
        state = {"sent": 0, "error": None}

        def flooder():
            try:
                for _ in range(2000):               # up to ~100 MiB, never reading
                    flood.sendall(batch)
                    state["sent"] += len(batch)
            except OSError as exc:
                state["error"] = exc
        t = threading.Thread(target=flooder, daemon=True)
        t.start()
        wait_until(lambda: state["sent"] >= 4 * len(batch) or state["error"], 10,
                   "the flood to be under way")
        for _ in range(5):
            t0 = time.monotonic()
            assert b"hello" in Exchange(r.path, timeout=5).request(cgi_params("/"))[0]
            assert time.monotonic() - t0 < 1.0
        t.join(15)
        assert isinstance(state["error"], (BrokenPipeError, ConnectionResetError)), state
        flood.close()
        assert "replies unread" in r.stderr()
        assert r.stop() == 0


def _records(data: bytes) -> list:
    """(type, content) of the complete records in data."""
    out, i = [], 0
    while len(data) - i >= 8:
        _v, rtype, _rid, clen, plen = struct.unpack_from(">BBHHBx", data, i)
        if len(data) - i < 8 + clen + plen:
            break
        out.append((rtype, data[i + 8:i + 8 + clen]))
        i += 8 + clen + plen
    return out


def _record_types(data: bytes) -> list:
    return [rtype for rtype, _ in _records(data)]


def _begin(role: int, keep_conn: bool) -> bytes:
    return encode_record(BEGIN_REQUEST, 1, struct.pack(">HB5x", role, int(keep_conn)))


@pytest.mark.parametrize("case", ["unknown_role", "abort_in_params"])
@pytest.mark.parametrize("keep_conn", [False, True])
def test_refused_request_without_keep_conn_closes_the_connection(appdir, case, keep_conn):
    with Runner(appdir, "apps:hello") as r:
        s = connect(r.path, timeout=3)
        params = encode_record(PARAMS, 1, encode_pairs(cgi_params("/")))
        if case == "unknown_role":      # FILTER: UNKNOWN_ROLE, and its input is discarded
            s.sendall(_begin(3, keep_conn) + params + encode_record(PARAMS, 1)
                      + encode_record(STDIN, 1))
            expected = UNKNOWN_ROLE
        else:                           # aborted before its PARAMS ended
            s.sendall(_begin(1, keep_conn) + params + encode_record(ABORT_REQUEST, 1))
            expected = 0
        data, closed = b"", False
        try:
            while END_REQUEST not in _record_types(data) or not keep_conn:
                chunk = s.recv(65536)
                if not chunk:
                    closed = True
                    break
                data += chunk
        except socket.timeout:
            pass
        ends = [body for rtype, body in _records(data) if rtype == END_REQUEST]
        assert len(ends) == 1 and ends[0][4] == expected, data
        assert closed != keep_conn, f"closed={closed} with keep_conn={keep_conn}"
        if keep_conn:       # the connection is still usable
            ex = Exchange.__new__(Exchange)
            ex.sock, ex.conn = s, ClientConnection()
            assert b"hello" in ex.request(cgi_params("/"), rid=2)[0]
        s.close()


@pytest.mark.parametrize("role,name", [(1, b"RESPONDER"), (2, b"AUTHORIZER")])
def test_the_application_sees_the_fastcgi_role(appdir, role, name):
    with Runner(appdir, "apps:router") as r:
        ex = Exchange(r.path)
        ex.sock.sendall(_begin(role, False) + encode_record(PARAMS, 1, encode_pairs(
            cgi_params("/role"))) + encode_record(PARAMS, 1) + encode_record(STDIN, 1))
        data = b""
        while chunk := ex.sock.recv(65536):
            data += chunk
        out = b"".join(body for rtype, body in _records(data) if rtype == STDOUT)
        assert split_cgi(out)[2] == name, data


def test_the_applications_default_socket_timeout_does_not_apply_to_connections(appdir):
    """socket.setdefaulttimeout(0) would make accepted sockets non-blocking: the body
    read would fail at once instead of waiting for the web server."""
    write_app(appdir, "timeout_app", """
        import socket
        from apps import echo as application
        socket.setdefaulttimeout(0.0)
    """)
    with Runner(appdir, "timeout_app") as r:
        ex = Exchange(r.path)
        c = ex.conn
        ex.sock.sendall(c.begin_request(1, params=cgi_params("/", "POST", body=b"abc")))
        ex.sock.setblocking(False)

        def waiting_or_answered():
            # The thread serving the request (the loop, or the acceptor when the
            # request came with the connection) is blocked in recvfrom (45): reading the body.
            for task in os.listdir(f"/proc/{r.proc.pid}/task"):
                with contextlib.suppress(OSError), \
                        open(f"/proc/{r.proc.pid}/task/{task}/syscall") as f:
                    if f.read().split()[0] == "45":
                        return "reading"
            try:
                return "answered" if ex.sock.recv(1, socket.MSG_PEEK) is not None else ""
            except BlockingIOError:
                return ""
        wait_until(waiting_or_answered, 5, "the application to read the body")
        ex.sock.settimeout(5)
        ex.sock.sendall(c.send_stdin(1, b"abc") + c.send_stdin(1, b""))
        out, _, end = ex.response()
        assert split_cgi(out)[2] == b"abc", (out, r.stderr())


def test_large_upload_and_download_through_the_protocol(appdir):
    body = os.urandom(3 << 20)
    with Runner(appdir, "apps:echo") as r:
        ex = Exchange(r.path)
        out, _, end = ex.request(cgi_params("/", "POST", body=body), body)
        assert split_cgi(out)[2] == body and end.app_status == 0


def _unread(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that the peer has not read yet (TIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]


class _Pusher:
    """Sends ``wire`` on a non-blocking socket as far as the peer takes it."""

    def __init__(self, sock: socket.socket, wire: bytes) -> None:
        self.sock, self.wire, self.sent = sock, memoryview(wire), 0
        sock.setblocking(False)

    def push(self) -> int:
        try:
            while self.sent < len(self.wire):
                self.sent += self.sock.send(self.wire[self.sent:])
        except BlockingIOError:
            pass
        return self.sent

    def pushed_and_read(self) -> bool:
        """All of it sent, and all of that read by the peer."""
        return self.push() == len(self.wire) and self.unread() == 0

    def unread(self) -> int:
        return _unread(self.sock)

    def finish(self) -> threading.Thread:
        """Send the rest, blocking, from a thread (the runner may read it only once the
        test reads its answers)."""
        self.sock.settimeout(10)

        def rest():
            self.sock.sendall(self.wire[self.sent:])
            self.sent = len(self.wire)
        sender = threading.Thread(target=rest)
        sender.start()
        return sender


def _upload(ex: Exchange, body: bytes, path: str = "/") -> _Pusher:
    """A whole keep-alive POST of ``body`` on ``ex``, to be pushed without blocking."""
    return _Pusher(ex.sock, ex.conn.begin_request(1, keep_conn=True, params=cgi_params(
        path, "POST", body=body)) + ex.conn.send_stdin(1, body) + ex.conn.send_stdin(1, b""))


def _idle_keepalive(r: Runner, path: str = "/") -> Exchange:
    """A connection the runner has accepted and served once (an echo), now idle (as
    nginx's upstream keepalive connections are)."""
    ex = Exchange(r.path)
    assert split_cgi(ex.request(cgi_params(path, "POST", body=b"hi"), b"hi",
                                keep_conn=True)[0])[2] == b"hi"
    return ex


class _Waiting:
    """A POST on a new connection whose body stops after 10 bytes; ``start`` returns
    once its application (--threads 1: in the loop thread) waits in wsgi.input.read()
    for the rest (the app "echo" touches the file $READING when it starts reading)."""

    def __init__(self, r: Runner, body: bytes, path: str = "/") -> None:
        self.r, self.body, self.path = r, body, path
        self.ex = Exchange(r.path)

    def start(self) -> "_Waiting":
        reading = os.path.join(self.r.dir, "reading")
        if os.path.exists(reading):
            os.unlink(reading)
        ex = self.ex
        ex.sock.sendall(ex.conn.begin_request(1, keep_conn=True, params=cgi_params(
            self.path, "POST", body=self.body)) + ex.conn.send_stdin(1, self.body[:10]))

        def asleep_in_read():
            if not os.path.exists(reading):
                return False
            with open(f"/proc/{self.r.proc.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "S"
        wait_until(asleep_in_read, what="the application to wait for the rest of its body")
        return self

    def finish(self) -> None:
        """Send the rest of the body; the echo must be all of it."""
        ex = self.ex
        ex.sock.sendall(ex.conn.send_stdin(1, self.body[10:]) + ex.conn.send_stdin(1, b""))
        assert split_cgi(ex.response()[0])[2] == self.body


def _reader(appdir, *args, **kwargs) -> Runner:
    """A runner of apps:echo (or app=...) that tells when its application reads."""
    app = kwargs.pop("app", "apps:echo")
    return Runner(appdir, app, *args, env={"READING": str(appdir / "reading")}, **kwargs)


def _polling_only_its_own(r: Runner) -> bool:
    """The runner waits in poll() on one descriptor: the waiting request's, no other."""
    call = blocked_syscall(r.proc.pid)
    return call is not None and call[0] in ("poll", "ppoll") and call[1][1] == 1


def test_one_thread_reads_other_bodies_ahead_while_a_request_waits_for_its_own(appdir):
    """With --threads 1, while the application waits for its body, a large request on
    another (idle, kept) connection is read into memory, so its sender is not held up by
    the socket buffer; it is served, whole, once the first request is done."""
    b_body = os.urandom(768 << 10)                  # more than a socket buffer
    with _reader(appdir) as r:
        b = _idle_keepalive(r)
        a = _Waiting(r, os.urandom(100_000)).start()
        pusher = _upload(b, b_body)
        wait_until(pusher.pushed_and_read,
                   what="the runner to take all of the other request while one waits")
        b.sock.settimeout(10)
        a.finish()
        assert split_cgi(b.response()[0])[2] == b_body          # served from memory
        assert split_cgi(b.request(cgi_params("/", "POST", body=b"again"), b"again",
                                   keep_conn=True)[0])[2] == b"again"


def test_a_protocol_error_read_ahead_closes_only_that_connection(appdir):
    """Garbage on another connection while a request waits for its body: that connection
    is closed then and there (no reset: shut down and drained), the waiting request and
    the idle connections are unharmed."""
    with _reader(appdir) as r:
        bad, idle = _idle_keepalive(r), _idle_keepalive(r)
        a = _Waiting(r, os.urandom(5000)).start()
        bad.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert bad.closed_by_peer(), "the broken connection is closed while A waits"
        idle.sock.sendall(idle.conn.begin_request(1, keep_conn=True, params=cgi_params(
            "/", "POST", body=b"idle")) + idle.conn.send_stdin(1, b"idle")
            + idle.conn.send_stdin(1, b""))
        a.finish()
        assert split_cgi(idle.response()[0])[2] == b"idle"
        assert "FastCGI protocol error" in r.stderr()


def test_a_request_read_ahead_is_answered_though_its_sender_half_closed(appdir):
    """A web server may shut down its sending side after a request (no more input, the
    answer still wanted). Read ahead, that end of input stays in the socket until the
    request is answered."""
    with _reader(appdir) as r:
        b = _idle_keepalive(r)
        a = _Waiting(r, os.urandom(5000)).start()
        b.sock.sendall(b.conn.begin_request(1, params=cgi_params("/", "POST", body=b"bee"))
                       + b.conn.send_stdin(1, b"bee") + b.conn.send_stdin(1, b""))
        b.sock.shutdown(socket.SHUT_WR)
        wait_until(lambda: _unread(b.sock) == 0, what="the half-closed request read ahead")
        a.finish()
        assert split_cgi(b.response()[0])[2] == b"bee"


def test_reading_ahead_stops_at_its_bound_and_the_rest_follows(appdir):
    """What is read ahead for one connection is bounded (READ_AHEAD): the runner stops
    watching it (its unread data stays in the socket) and reads the rest only when its
    request is served."""
    b_body = os.urandom(3 << 20)
    with _reader(appdir) as r:
        b = _idle_keepalive(r)
        a = _Waiting(r, os.urandom(1000)).start()
        pusher = _upload(b, b_body)

        def capped():
            pusher.push()
            return _polling_only_its_own(r) and pusher.unread() > 0
        wait_until(capped, what="the runner to stop reading the other connection ahead")
        assert (1 << 20) <= pusher.sent < (2 << 20), pusher.sent
        a.finish()
        sender = pusher.finish()
        assert split_cgi(b.response()[0])[2] == b_body
        sender.join(10)
        assert pusher.sent == len(pusher.wire)


def test_reading_ahead_stops_at_its_bound_for_all_connections(appdir):
    """The bound for all connections together (READ_AHEAD_TOTAL, lowered to 1 MiB here
    so that two 960 KiB uploads exceed it and neither exceeds its own 1 MiB): once it is
    reached, no other connection is watched; everything is served afterwards."""
    bodies = [os.urandom(960 << 10) for _ in range(2)]
    with _reader(appdir, limits={"READ_AHEAD_TOTAL": 1 << 20}) as r:
        others = [_idle_keepalive(r) for _ in bodies]
        a = _Waiting(r, os.urandom(1000)).start()
        pushers = [_upload(ex, body) for ex, body in zip(others, bodies)]

        def capped():
            for p in pushers:
                p.push()
            return _polling_only_its_own(r) and sum(p.unread() for p in pushers) > 0
        wait_until(capped, what="the runner to stop reading ahead at the total bound")
        sent = sum(p.sent for p in pushers)
        assert (1 << 20) <= sent < sum(len(p.wire) for p in pushers), sent
        a.finish()
        senders = [p.finish() for p in pushers]
        for ex, body in zip(others, bodies):
            assert split_cgi(ex.response()[0])[2] == body
        for t in senders:
            t.join(10)


def test_input_read_ahead_and_discarded_does_not_count_against_the_bound(appdir):
    """The late body of a request that was answered without reading it is read ahead
    and thrown away by the protocol: it must not keep using the bound for all
    connections (lowered to 128 KiB here), or reading ahead would stop for good."""
    late, upload = os.urandom(200 << 10), os.urandom(100 << 10)
    with _reader(appdir, app="apps:router", limits={"READ_AHEAD_TOTAL": 128 << 10}) as r:
        b = Exchange(r.path)            # answered at once: hello does not read its body
        b.sock.sendall(b.conn.begin_request(1, keep_conn=True,
                                            params=cgi_params("/hello", "POST", body=late)))
        assert split_cgi(b.response()[0])[0] == 200
        c = _idle_keepalive(r, "/echo")
        a = _Waiting(r, b"x" * 100, "/echo").start()
        late_wire = _Pusher(b.sock, b.conn.send_stdin(1, late) + b.conn.send_stdin(1, b""))

        def bound_reached():            # read ahead (and dropped) up to the bound
            return late_wire.push() == len(late_wire.wire) and late_wire.unread() > 0 \
                and _polling_only_its_own(r)
        wait_until(bound_reached, what="the late body to be read ahead up to the bound")
        a.finish()
        a2 = _Waiting(r, b"y" * 100, "/echo").start()
        pusher = _upload(c, upload, "/echo")
        wait_until(pusher.pushed_and_read, what="a new upload to be read ahead again")
        c.sock.settimeout(10)
        a2.finish()
        assert split_cgi(c.response()[0])[2] == upload


@pytest.mark.parametrize("others", [0, 1], ids=["alone", "with-an-idle-connection"])
def test_a_body_that_stops_coming_is_given_up_after_the_io_timeout(appdir, others):
    """--io-timeout bounds the wait for a request body, whether the runner waits in a
    blocking read (no other connection) or reading the others ahead; the connection is
    closed, the others and the runner go on."""
    with _reader(appdir, "--io-timeout", "0.5") as r:
        idle = [_idle_keepalive(r) for _ in range(others)]
        started = time.monotonic()
        a = _Waiting(r, b"x" * 100).start()
        assert a.ex.closed_by_peer(timeout=10)
        assert 0.4 < time.monotonic() - started < 5
        assert "reading the request body: nothing came for 0.5s (--io-timeout)" \
            in r.stderr()
        for ex in idle:
            assert split_cgi(ex.request(cgi_params("/", "POST", body=b"ok"), b"ok",
                                        keep_conn=True)[0])[2] == b"ok"


@pytest.mark.parametrize("io_timeout", ["0", "30d"])
def test_no_or_a_long_io_timeout_lets_a_body_wait_while_reading_ahead(appdir, io_timeout):
    """--io-timeout 0 means no limit (as for the sockets' own timeouts), and a limit
    longer than poll() takes in one call is waited in slices: neither fails the wait."""
    with _reader(appdir, "--io-timeout", io_timeout) as r:
        b = _idle_keepalive(r)
        a = _Waiting(r, os.urandom(5000)).start()
        wait_until(lambda: (blocked_syscall(r.proc.pid) or ("",))[0] in ("poll", "ppoll"),
                   what="the runner to wait in poll() for the body")
        a.finish()
        assert split_cgi(b.request(cgi_params("/", "POST", body=b"ok"), b"ok",
                                   keep_conn=True)[0])[2] == b"ok"
        assert "Error" not in r.stderr(), r.stderr()


@pytest.mark.parametrize("garbage", [
    encode_record(BEGIN_REQUEST, 1, b"\x00\x01\x00"),          # 3-byte BEGIN_REQUEST body
    b"\x02\x01\x00\x01\x00\x08\x00\x00" + b"\x00\x01" + b"\x00" * 6,   # version 2
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                       # not FastCGI at all
    encode_record(6, 1, b"x"),                                  # STDOUT sent to us
])
def test_malformed_input_closes_only_that_connection(appdir, garbage):
    with Runner(appdir, "apps:hello") as r:
        bad = connect(r.path, timeout=5)
        bad.sendall(garbage)
        bad.settimeout(5)
        closed = False
        try:
            data = bad.recv(65536)
            while data:
                data = bad.recv(65536)
            closed = True
        except ConnectionResetError:
            closed = True
        except socket.timeout:
            pass
        assert closed, "the runner kept a connection that sent malformed FastCGI"
        bad.close()
        ex = Exchange(r.path)
        assert b"hello" in ex.request(cgi_params("/ok"))[0]
        assert "protocol error" in r.stderr()


def test_params_over_1_mib_close_only_that_connection(appdir):
    with Runner(appdir, "apps:hello") as r:
        big = Exchange(r.path)
        params = cgi_params("/big") + [("HTTP_X_BIG", "a" * (1 << 20))]
        big.sock.sendall(big.conn.begin_request(1, params=params)
                         + big.conn.send_stdin(1, b""))
        assert big.closed_by_peer()
        wait_until(lambda: "protocol error" in r.stderr(), 5, "the log line")
        assert "PARAMS" in r.stderr(), r.stderr()
        small = cgi_params("/small") + [("HTTP_X_BIG", "a" * ((1 << 20) - 4096))]
        assert b"path=/small" in Exchange(r.path).request(small)[0]


def test_application_errors(appdir):
    with Runner(appdir, "apps:router") as r:
        out, _, end = Exchange(r.path).request(cgi_params("/raise_before"))
        assert split_cgi(out)[0] == 500 and end.app_status == 0
        wait_until(lambda: "boom before start_response" in r.stderr(), 5, "traceback")
        assert "Traceback" in r.stderr()
        # After the headers: what was sent stands, but the request is never ended, so
        # the web server cannot take the broken-off response for a whole one.
        ex = Exchange(r.path)
        c = ex.conn
        ex.sock.sendall(c.begin_request(1, keep_conn=True, params=cgi_params("/raise_after"))
                        + c.send_stdin(1, b""))
        events = []
        while data := ex.sock.recv(65536):      # (the runner closes the connection)
            events += c.receive_data(data)
        assert [type(ev) for ev in events if type(ev) is not Stdout] == []
        out = b"".join(ev.data for ev in events)
        assert split_cgi(out)[0] == 200 and split_cgi(out)[2] == b"partial more"
        wait_until(lambda: "boom after start_response" in r.stderr(), 5, "traceback")
        # only that connection is gone
        assert b"hello" in Exchange(r.path).request(cgi_params("/hello"), keep_conn=True)[0]


@pytest.mark.parametrize("keep_conn", [False, True])
def test_with_one_thread_the_application_runs_in_the_main_thread(appdir, keep_conn):
    """--threads 1 promises the main thread: signal.signal() (request timeouts with
    SIGALRM) and objects bound to the importing thread (sqlite3's check_same_thread)
    work only there. Checked for a new connection per request and a kept one."""
    write_app(appdir, "main_thread_app", """
        import signal
        import threading

        def application(environ, start_response):
            old = signal.signal(signal.SIGALRM, signal.SIG_IGN)   # main thread only
            signal.signal(signal.SIGALRM, old)
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [str(threading.current_thread() is threading.main_thread()).encode()]
    """)
    with Runner(appdir, "main_thread_app") as r:
        ex = Exchange(r.path)
        for _ in range(3):
            if not keep_conn:
                ex = Exchange(r.path)
            out, _, end = ex.request(cgi_params("/"), keep_conn=keep_conn)
            assert split_cgi(out)[:3:2] == (200, b"True"), (out, r.stderr())


@pytest.mark.parametrize("threads", ["1", "2"])
def test_a_write_callable_kept_past_its_request_goes_nowhere(appdir, threads):
    """The connection carries one request after another: a write() the application
    calls after its request ended must not land in the next request's response."""
    with Runner(appdir, "apps:stale_write", "--threads", threads) as r:
        ex = Exchange(r.path)
        for _ in range(3):
            out, _, end = ex.request(cgi_params("/"), keep_conn=True)
            assert split_cgi(out)[0] == 200 and out.endswith(b"\r\n\r\nfresh"), out
            assert b"STALE" not in out and end.app_status == 0
        ex.close()
        assert r.stop() == 0


@pytest.mark.parametrize("size", [10, 100_000])
def test_a_str_body_is_an_application_error_on_either_write_path(appdir, size):
    """PEP 3333 bodies are bytes. A str is refused before anything reaches the wire,
    in one record or split over several (large): a 500, the request ended once, and
    the kept connection still serves."""
    write_app(appdir, "str_app", f"""
        def application(environ, start_response):
            if environ["PATH_INFO"] == "/hello":
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"hello"]
            start_response("200 OK", [("Content-Type", "text/plain")])
            return ["x" * {size}]
    """)
    with Runner(appdir, "str_app") as r:
        ex = Exchange(r.path)
        out, _, end = ex.request(cgi_params("/str"), keep_conn=True)
        assert split_cgi(out)[0] == 500 and end.app_status == 0, out[:200]
        assert split_cgi(ex.request(cgi_params("/hello"), keep_conn=True)[0])[2] == b"hello"
        wait_until(lambda: "TypeError" in r.stderr(), 5, "the traceback")


@pytest.mark.parametrize("threads", ["1", "2"])
def test_close_raising_after_a_complete_response_is_logged_not_fatal(appdir, threads):
    """The response was already ended when close() raised: no second END_REQUEST."""
    with Runner(appdir, "apps:router", "--threads", threads) as r:
        ex = Exchange(r.path)
        out, _, end = ex.request(cgi_params("/close_raises"), keep_conn=True)
        assert split_cgi(out)[2] == b"complete" and end.app_status == 0
        assert b"hello" in ex.request(cgi_params("/hello"), keep_conn=True)[0]
        wait_until(lambda: "boom in close" in r.stderr(), 5, "the traceback logged")
        assert r.proc.poll() is None, r.stderr()
        assert r.stop() == 0


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("uri,status", [("/exit3", 3), ("/interrupt", -signal.SIGINT)])
def test_app_raising_systemexit_stops_the_runner_with_its_status(appdir, threads, uri,
                                                                 status):
    """Not a silently dead worker thread: the runner finishes what is in flight, then
    exits as the application asked (as it always did with --threads 1)."""
    with Runner(appdir, "apps:router", "--threads", threads) as r:
        result = {}
        slow = Exchange(r.path)
        slow.sock.sendall(slow.conn.begin_request(1, params=cgi_params("/slow?0.5"))
                          + slow.conn.send_stdin(1, b""))
        if threads != "1":
            wait_until(lambda: _in_app(r), 5, "the slow request to be in the app")
            t = threading.Thread(target=lambda: result.update(out=slow.response()[0]))
            t.start()
        ex = Exchange(r.path, timeout=10)
        if threads == "1":
            assert slow.response()[0].endswith(b"slow done")
        ex.sock.sendall(ex.conn.begin_request(1, params=cgi_params(uri))
                        + ex.conn.send_stdin(1, b""))
        assert ex.closed_by_peer(), "the connection of the failed request stayed open"
        assert r.proc.wait(10) == status, r.stderr()
        if threads != "1":
            t.join(5)
            assert result.get("out", b"").endswith(b"slow done"), result
        assert "stopping" in r.stderr()


def test_client_abort_mid_response_calls_close_and_runner_survives(appdir):
    marker = appdir / "closed.txt"
    with Runner(appdir, "apps:router", "--threads", "2",
                env={"MARKER": str(marker)}) as r:
        s = connect(r.path)
        client = ClientConnection()
        s.sendall(client.begin_request(1, params=cgi_params("/endless"))
                  + client.send_stdin(1, b""))
        got = 0
        while got < 1 << 20:
            got += len(s.recv(1 << 16))
        s.close()
        wait_until(lambda: marker.exists() and "closed" in marker.read_text(), 10,
                   "the application's close() to be called")
        assert b"hello" in Exchange(r.path).request(cgi_params("/hello"))[0]
        assert r.proc.poll() is None


def test_abort_request_ends_a_request_reading_its_body(appdir):
    with Runner(appdir, "apps:echo") as r:
        ex = Exchange(r.path)
        c = ex.conn
        ex.sock.sendall(c.begin_request(1, keep_conn=True,
                                        params=cgi_params("/", "POST", body=b"x" * 10))
                        + c.send_stdin(1, b"x" * 5) + c.abort_request(1))
        out, _, end = ex.response()
        assert end.request_id == 1 and end.protocol_status == 0
        # answered at once with an empty response; the read failed (ConnectionError)
        # instead of returning the 5 bytes as the body, and the 500 the application's
        # error then became is dropped
        assert out == b"", out
        wait_until(lambda: "aborted the request" in r.stderr(), 5, "the traceback")
        # the same keep-alive connection serves the next request
        assert split_cgi(ex.request(cgi_params("/", "POST", body=b"def"), b"def",
                                    keep_conn=True)[0])[2] == b"def"
        r2 = Exchange(r.path)
        assert split_cgi(r2.request(cgi_params("/"), b"abc")[0])[2] == b"abc"


@pytest.mark.parametrize("threads", ["1", "2"])
def test_a_second_request_sent_before_the_first_ended_is_refused(appdir, threads):
    """The runner does not multiplex: a request that comes while another is active on
    the connection (here, in the same write) is refused with CANT_MPX_CONN and never
    reaches the application, and --max-requests counts only what it served."""
    with Runner(appdir, "apps:hello", "--threads", threads, "--max-requests", "2") as r:
        ex = Exchange(r.path)
        c = ex.conn
        ex.sock.sendall(b"".join(c.begin_request(rid, keep_conn=True,
                                                 params=cgi_params(f"/r{rid}"))
                                 + c.send_stdin(rid, b"") for rid in (1, 2)))
        ends, out = {}, b""
        while len(ends) < 2:
            data = ex.sock.recv(65536)
            assert data, f"closed with {ends}"
            for ev in c.receive_data(data):
                if type(ev) is EndRequest:
                    ends[ev.request_id] = ev.protocol_status
                elif type(ev) is Stdout:
                    out += ev.data
        assert ends == {1: 0, 2: CANT_MPX_CONN}
        assert b"path=/r1" in out and b"/r2" not in out
        assert b"path=/r3" in ex.request(cgi_params("/r3"), keep_conn=True)[0]
        assert r.proc.wait(10) == 0         # the second request served: --max-requests 2


def test_abort_request_after_the_headers_ends_the_request_and_keeps_the_connection(appdir):
    with Runner(appdir, "apps:router") as r:
        ex = Exchange(r.path)
        c = ex.conn
        ex.sock.sendall(c.begin_request(1, keep_conn=True, params=cgi_params(
            "/started_echo", "POST", body=b"x" * 10)) + c.send_stdin(1, b"x" * 5))
        events = []
        while not any(type(ev) is Stdout for ev in events):     # until the headers come
            data = ex.sock.recv(65536)
            assert data, "closed before the headers"
            events += c.receive_data(data)
        ex.sock.sendall(c.abort_request(1))
        out, _, end = ex.response()
        assert (end.request_id, end.protocol_status) == (1, 0)
        assert b"".join(ev.data for ev in events) + out == (
            b"Status: 200 OK\r\nContent-Type: application/octet-stream\r\n\r\nstarted ")
        # the same keep-alive connection serves the next request
        assert split_cgi(ex.request(cgi_params("/echo", "POST", body=b"def"), b"def",
                                    keep_conn=True)[0])[2] == b"def"


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("case", ["refuse_body", "reread"])
def test_reading_the_body_after_the_end_leaves_the_next_request_alone(appdir, threads,
                                                                      case):
    """Once a request has ended (answered; or aborted by the web server), wsgi.input is
    at its end without reading the socket: what comes there next is the web server's
    next request on the kept connection, not this one's input."""
    marker = appdir / "reading"
    with Runner(appdir, "apps:router", "--threads", threads,
                env={"READING": str(marker)}) as r:
        ex = Exchange(r.path)
        c = ex.conn
        ex.sock.sendall(c.begin_request(1, keep_conn=True, params=cgi_params(
            f"/{case}", "POST", body=b"x" * 10)) + c.send_stdin(1, b"x" * 5))
        if case == "reread":
            wait_until(marker.exists, 5, "the application to start reading its body")
            ex.sock.sendall(c.abort_request(1))
        out, _, end = ex.response()
        assert end.request_id == 1
        if case == "refuse_body":
            assert split_cgi(out)[:3:2] == (413, b"too large")
            wait_until(lambda: "close() read 0 bytes" in r.stderr(), 5, "close()'s read")
        else:
            wait_until(lambda: "read 0 bytes" in r.stderr(), 5, "the read after the abort")
            assert "read failed: the web server aborted the request" in r.stderr()
        # the rest of the first body (the protocol drops it), then the next request
        ex.sock.sendall(c.send_stdin(1, b"y" * 5) + c.send_stdin(1, b""))
        out = ex.request(cgi_params("/hello"), keep_conn=True)[0]
        assert b"path=/hello" in out, r.stderr()
        assert "unexpected" not in r.stderr(), r.stderr()


def test_max_requests_finishes_in_flight_then_exits_0(appdir):
    with Runner(appdir, "apps:router", "--threads", "2", "--max-requests", "2") as r:
        assert b"hello" in Exchange(r.path).request(cgi_params("/hello"))[0]
        result = {}
        t = threading.Thread(target=lambda: result.update(
            out=Exchange(r.path).request(cgi_params("/slow?0.5"))[0]))
        t.start()
        assert r.proc.wait(10) == 0
        t.join(5)
        assert result.get("out", b"").endswith(b"slow done"), result
        assert not os.path.exists(r.path)


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_in_flight_request_then_exits_0(appdir, sig, threads):
    """Requests in flight finish, idle keep-alive connections are closed, and a
    connection that comes after the signal is not accepted: on a pool's shared socket it
    stays queued for a sibling or the replacement (the fd-0 test behind nginx shows
    that); here, on the runner's own socket, it is never answered. (With --threads 2 the
    loop is free while the request runs, so that last check could fail.)"""
    with Runner(appdir, "apps:router", "--threads", threads) as r:
        idle = Exchange(r.path)
        idle.request(cgi_params("/hello"), keep_conn=True)
        result = {}
        ex = Exchange(r.path)
        t = threading.Thread(target=lambda: result.update(
            out=ex.request(cgi_params("/slow?0.7"))[0]))
        t.start()
        wait_until(lambda: _in_app(r), 5, "the request to be in the app")
        r.proc.send_signal(sig)
        wait_until(lambda: f"{sig.name}: finishing requests in flight" in r.stderr(), 5,
                   "the runner to take the signal")
        late = connect(r.path, timeout=10)
        client = ClientConnection()
        late.sendall(client.begin_request(1, params=cgi_params("/hello"))
                     + client.send_stdin(1, b""))
        assert r.proc.wait(10) == 0
        t.join(5)
        assert result.get("out", b"").endswith(b"slow done"), result
        assert idle.closed_by_peer(), "an idle keep-alive connection was left open"
        got = _until_closed(late)
        late.close()
        assert got == b"", got


def _until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes the connection (EOF or reset)."""
    got = b""
    try:
        while data := sock.recv(65536):
            got += data
    except ConnectionResetError:
        pass
    return got


def _sleeping_threads(r) -> int:
    """Threads of the runner asleep (clock_nanosleep/nanosleep/select): in slow()."""
    n = 0
    for tid in os.listdir(f"/proc/{r.proc.pid}/task"):
        try:
            with open(f"/proc/{r.proc.pid}/task/{tid}/syscall") as f:
                n += int(f.read().split()[0]) in (230, 35, 23)  # x86-64 numbers
        except (OSError, ValueError):
            pass
    return n


def _in_app(r) -> bool:
    return _sleeping_threads(r) > 0


def _fcgi_response(sock: socket.socket, client: ClientConnection) -> list:
    """The events of one response on ``sock``, up to its EndRequest."""
    events = []
    while not events or type(events[-1]) is not EndRequest:
        data = sock.recv(1 << 16)
        assert data, f"connection closed before END_REQUEST; events so far: {events}"
        events += client.receive_data(data)
    return events


def test_a_drain_that_expires_while_the_loop_is_in_the_application_ends_without_reset(
        appdir):
    """--threads 1: a connection is being drained (answered before its body ended) when
    the loop thread goes into a long application call, and the web server sends more
    body meanwhile. Past the drain's deadline, what already came is read before the
    close: the peer gets a clean close, not a reset (a reset would make its next write
    fail, which nginx logs)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    address = listener.getsockname()
    with listener, Runner(appdir, "apps:router", "--threads", "1", listener=listener) as r:
        def fds() -> int:
            return len(os.listdir(f"/proc/{r.proc.pid}/fd"))
        idle_fds = fds()
        a, a_client = socket.create_connection(address, 10), ClientConnection()
        a.sendall(a_client.begin_request(1, params=cgi_params(
            "/hello", "POST", body=bytes(100_000))) + a_client.send_stdin(1, bytes(1000)))
        assert type(_fcgi_response(a, a_client)[0]) is Stdout
        assert a.recv(1) == b"", "answered before its body ended: shut down, drained"
        b, b_client = socket.create_connection(address, 10), ClientConnection()
        b.sendall(b_client.begin_request(1, params=cgi_params("/slow?2.5"))
                  + b_client.send_stdin(1, b""))
        wait_until(lambda: _in_app(r), 5, "the loop thread to be in the slow request")
        a.sendall(a_client.send_stdin(1, bytes(20_000)))    # the drain cannot read it now
        assert _fcgi_response(b, b_client)[-1].protocol_status == 0   # 2.5 s > DRAIN_TIME
        wait_until(lambda: fds() == idle_fds, 5, "both connections to be closed")
        a.sendall(b"x")     # raises (EPIPE/ECONNRESET) had the close reset the connection
        a.close(), b.close()
        assert r.stop() == 0


@pytest.mark.parametrize("threads", ["1", "2"])
def test_sigterm_with_a_stuck_request_is_bounded_by_graceful_timeout(appdir, threads):
    """With --threads 1 the stuck request is in the loop thread itself."""
    with Runner(appdir, "apps:router", "--threads", threads,
                "--graceful-timeout", "300ms") as r:
        ex = Exchange(r.path)
        c = ex.conn
        ex.sock.sendall(c.begin_request(1, params=cgi_params("/slow?30")))
        ex.sock.sendall(c.send_stdin(1, b""))
        wait_until(lambda: _in_app(r), 5, "the request to be in the app")
        t0 = time.monotonic()
        r.proc.send_signal(signal.SIGTERM)
        assert r.proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
        assert "graceful timeout" in r.stderr()


def test_script_name_prefix(appdir):
    with Runner(appdir, "apps:hello", "--script-name", "/app/") as r:
        out = Exchange(r.path).request(cgi_params("/app/x/y"))[0]
        assert b"path=/x/y" in out
        out = Exchange(r.path).request(cgi_params("/app"))[0]
        assert b"path=" in out and split_cgi(out)[0] == 200
        assert split_cgi(Exchange(r.path).request(cgi_params("/application"))[0])[0] == 404
        assert split_cgi(Exchange(r.path).request(cgi_params("/other"))[0])[0] == 404


def _listening(host: str, appdir):
    """A listening socket: TCP on host (port chosen by the kernel), or Unix ("unix")."""
    if host == "unix":
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(appdir / "allow.sock"))
    else:
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        listener.bind((host, 0))
    listener.listen(16)
    return listener


@pytest.mark.parametrize("host,allowed,ok", [
    ("127.0.0.1", "10.1.2.3, ::1", False),
    ("127.0.0.1", "10.1.2.3,127.0.0.1", True),
    ("127.0.0.1", "::ffff:127.0.0.1", True),
    ("127.0.0.1", "", True),
    ("::1", "0:0::1", True),                # compared in canonical form
    ("::1", "127.0.0.1", False),
    ("unix", "10.1.2.3", True),             # Unix peers have no address: always allowed
])
def test_fcgi_web_server_addrs(appdir, host, allowed, ok):
    listener = _listening(host, appdir)
    with listener, Runner(appdir, "apps:hello", listener=listener,
                          env={"FCGI_WEB_SERVER_ADDRS": allowed}) as r:
        s = socket.socket(listener.family)
        s.settimeout(5)
        s.connect(listener.getsockname())
        client = ClientConnection()
        s.sendall(client.begin_request(1, params=cgi_params("/")) + client.send_stdin(1, b""))
        data = _until_closed(s)
        s.close()
        assert (b"hello" in data) == ok, (data, r.stderr())
        assert ("refusing connection" in r.stderr()) != ok, r.stderr()
        assert r.stop() == 0


def test_tcp_connections_have_no_nagle_delay(appdir):
    """A generator's chunks are separate writes; with Nagle the second waits for the
    client's delayed ACK (~40 ms on Linux)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    with listener, Runner(appdir, "apps:router", listener=listener) as r:
        s = socket.create_connection(listener.getsockname(), 5)
        client = ClientConnection()
        times = []
        for _ in range(15):
            t0 = time.monotonic()
            s.sendall(client.begin_request(1, keep_conn=True, params=cgi_params("/two_chunks"))
                      + client.send_stdin(1, b""))
            got, done = b"", False
            while not done:
                for ev in client.receive_data(s.recv(65536)):
                    if type(ev) is Stdout:
                        got += ev.data
                    done = done or type(ev) is EndRequest
            times.append(time.monotonic() - t0)
            assert got.endswith(b"first second"), got
        s.close()
        times.sort()
        assert times[len(times) // 2] < 0.010, times
        assert r.stop() == 0


def test_bad_fcgi_web_server_addrs_is_a_startup_error(appdir):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    with listener:
        p = subprocess.run([os.sys.executable, "-m", "spawnd.wsgi.main", "--chdir",
                            str(appdir), "apps:hello"], stdin=listener.fileno(),
                           capture_output=True, text=True, timeout=20,
                           env=dict(os.environ, FCGI_WEB_SERVER_ADDRS="127.0.0.1,nonsense"))
    assert p.returncode == 2
    assert "FCGI_WEB_SERVER_ADDRS" in p.stderr and "nonsense" in p.stderr


def test_two_runners_share_one_socket_while_one_holds_idle_connections(appdir, tmp_path):
    """Idle keep-alive connections do not keep a runner from accepting. One at a time,
    new connections go to whichever idle runner the kernel wakes (EPOLLEXCLUSIVE wakes
    the first waiting one, so not necessarily both: which one is not asserted); a busy
    runner is passed over (test_a_busy_runner_leaves_new_connections_to_an_idle_sibling)."""
    path = str(tmp_path / "shared.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(64)
    a = Runner(appdir, "apps:hello", listener=listener)
    b = Runner(appdir, "apps:hello", listener=listener)
    with listener, a, b:
        idle = []
        pids_idle = set()
        for _ in range(10):   # keep-alive connections, held idle (some land on each)
            ex = Exchange(path)
            out = ex.request(cgi_params("/"), keep_conn=True)[0]
            pids_idle.add(int(out.split(b"pid=")[1].split()[0]))
            idle.append(ex)
        seen = set()
        t0 = time.monotonic()
        for _ in range(60):
            out = Exchange(path, timeout=5).request(cgi_params("/"))[0]
            seen.add(int(out.split(b"pid=")[1].split()[0]))
        assert seen <= {a.proc.pid, b.proc.pid}, (seen, a.proc.pid, b.proc.pid)
        assert seen & pids_idle, "no runner holding idle connections accepted new ones"
        assert time.monotonic() - t0 < 10
        for ex in idle:
            ex.close()
        assert a.stop() == 0
        # b keeps serving alone after its sibling left, on the same (still blocking) socket
        assert b"hello" in Exchange(path, timeout=5).request(cgi_params("/"))[0]
        assert b.stop() == 0
        assert os.get_blocking(listener.fileno())


def test_a_busy_runner_leaves_new_connections_to_an_idle_sibling(appdir, tmp_path):
    """--threads 1, two processes on one socket, one inside a 2 s request: the busy one
    is not waiting in epoll_wait, so the kernel gives every new connection to the idle
    one. Idle and busy are judged as spawnd judges them (health.group_idle)."""
    path = str(tmp_path / "shared.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(64)
    a = Runner(appdir, "apps:router", listener=listener)
    b = Runner(appdir, "apps:router", listener=listener)
    with listener, a, b:
        for r in (a, b):
            wait_until(lambda: health.group_idle([r.proc.pid]), 5,
                       f"{r.proc.pid} to wait for connections")
        slow = Exchange(path)
        slow.sock.sendall(slow.conn.begin_request(1, params=cgi_params("/slow?2"))
                          + slow.conn.send_stdin(1, b""))
        busy = wait_until(lambda: [r for r in (a, b) if _in_app(r)], 5,
                          "one runner to be in the slow request")[0]
        idle = b if busy is a else a
        assert not health.group_idle([busy.proc.pid])
        took = []
        for _ in range(10):
            t0 = time.monotonic()
            out = Exchange(path, timeout=5).request(cgi_params("/hello"))[0]
            took.append(time.monotonic() - t0)
            assert int(out.split(b"pid=")[1].split()[0]) == idle.proc.pid
        assert max(took) < 0.5, took
        assert slow.response()[0].endswith(b"slow done")
        # once free again, the busy one accepts again
        wait_until(lambda: health.group_idle([busy.proc.pid]), 5,
                   "the formerly busy runner to wait for connections again")
        assert a.stop() == 0 and b.stop() == 0


def test_a_full_threaded_runner_stops_listening_until_a_thread_is_free(appdir, tmp_path):
    """--threads 2: with both threads in slow requests the runner's loop still waits in
    epoll_wait, but no longer on the listening socket, so new connections go to a
    sibling; once a thread is free it takes connections again."""
    path = str(tmp_path / "shared.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(64)
    with listener, Runner(appdir, "apps:router", "--threads", "2", listener=listener) as a:
        slow = []
        for seconds in ("1.5", "4"):
            ex = Exchange(path, timeout=40)
            ex.sock.sendall(ex.conn.begin_request(1, params=cgi_params(f"/slow?{seconds}"))
                            + ex.conn.send_stdin(1, b""))
            slow.append(ex)
            wait_until(lambda: _sleeping_threads(a) == len(slow), 5,
                       f"{len(slow)} request(s) in the application")
        assert not health.group_idle([a.proc.pid])     # not listening: not waiting
        with Runner(appdir, "apps:router", listener=listener) as b:
            for _ in range(5):
                out = Exchange(path, timeout=5).request(cgi_params("/hello"))[0]
                assert int(out.split(b"pid=")[1].split()[0]) == b.proc.pid
            assert b.stop() == 0
        # b is gone; a is still full: a new connection waits in the listen queue until
        # the 1.5 s request ends, then a takes it
        t0 = time.monotonic()
        out = Exchange(path, timeout=10).request(cgi_params("/hello"))[0]
        assert int(out.split(b"pid=")[1].split()[0]) == a.proc.pid
        assert slow[0].response()[0].endswith(b"slow done")
        assert time.monotonic() - t0 < 5
        for ex in slow:
            ex.close()
        assert a.stop() == 0


def test_out_of_file_descriptors_it_pauses_accepting_and_recovers(appdir):
    """EMFILE from accept(): the runner logs it, stops accepting for a moment (no spin),
    keeps serving the connections it has, and accepts again once descriptors are free."""
    with Runner(appdir, "apps:hello", nofile=24) as r:
        held = []
        try:
            for _ in range(40):         # more than its descriptor limit allows
                ex = Exchange(r.path, timeout=5)
                ex.sock.setblocking(False)
                held.append(ex)
            wait_until(lambda: "Too many open files; pausing" in r.stderr(), 5,
                       "the EMFILE message")
            t0 = cpu_ticks(r.proc.pid)
            time.sleep(1.0)             # a fixed window to measure CPU in
            assert cpu_ticks(r.proc.pid) - t0 <= 20, "spinning on EMFILE"
            # a connection it did accept is still served
            first = held.pop(0)
            first.sock.setblocking(True)
            assert b"hello" in first.request(cgi_params("/"))[0]
        finally:
            for ex in held:
                ex.close()
        out = Exchange(r.path, timeout=5).request(cgi_params("/"))[0]
        assert b"hello" in out
        assert r.proc.poll() is None
        assert r.stop() == 0


def test_a_non_blocking_listening_socket_does_not_make_it_spin(appdir, tmp_path):
    path = str(tmp_path / "nb.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(16)
    listener.setblocking(False)         # as a careless sibling might leave it
    with listener, Runner(appdir, "apps:hello", listener=listener) as r:
        for _ in range(3):
            assert b"hello" in Exchange(path, timeout=5).request(cgi_params("/"))[0]
        t0 = cpu_ticks(r.proc.pid)
        time.sleep(1.0)                 # a fixed window to measure idle CPU in
        ticks = cpu_ticks(r.proc.pid) - t0
        assert ticks <= 10, f"{ticks} clock ticks of CPU in 1 s while idle: spinning"
        assert b"hello" in Exchange(path, timeout=5).request(cgi_params("/"))[0]
        assert r.stop() == 0
        assert not os.get_blocking(listener.fileno())   # left as it was given


def test_import_errors_are_clear(tmp_path):
    write_app(tmp_path, "broken", "import no_such_module_xyz\n")
    write_app(tmp_path, "noattr", "app = None\n")
    cases = {"missing_mod:app": "cannot import 'missing_mod'",
             "broken:app": "No module named 'no_such_module_xyz'",
             "noattr": "has no attribute 'application' (it has 'app'",
             "noattr:app": "is not callable"}
    for spec, message in cases.items():
        p = subprocess.run([os.sys.executable, "-m", "spawnd.wsgi.main", "--chdir",
                            str(tmp_path), "--bind", f"unix:{tmp_path}/x.sock", spec],
                           capture_output=True, text=True, timeout=20)
        assert p.returncode == 2 and message in p.stderr, (spec, p.stderr)


def test_no_socket_and_no_cgi_is_a_usage_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_INTERFACE"}
    p = subprocess.run([os.sys.executable, "-m", "spawnd.wsgi.main", "x:app"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=20, env=env)
    assert p.returncode == 2 and "not a listening socket" in p.stderr


def _run_bind(tmp_path, address: str, *extra):
    return subprocess.run([os.sys.executable, "-m", "spawnd.wsgi.main", "--chdir",
                           str(tmp_path), "--bind", address, *extra, "apps:hello"],
                          capture_output=True, text=True, timeout=20)


def test_bind_refuses_what_is_not_a_stale_socket(appdir, tmp_path):
    """Through a symlink, at a live socket, at a regular file, or a bad address: exit 2
    and nothing is removed. (The stale check is spawnd.listen's, as for pools.)"""
    target = tmp_path / "target.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(target))
    stale.close()                               # a stale socket file, nobody listening
    link = tmp_path / "link.sock"
    link.symlink_to(target)
    p = _run_bind(appdir, f"unix:{link}")
    assert p.returncode == 2 and "symbolic link" in p.stderr, p.stderr
    assert link.is_symlink() and target.exists()
    regular = tmp_path / "data.txt"
    regular.write_text("keep me")
    p = _run_bind(appdir, f"unix:{regular}")
    assert p.returncode == 2 and "regular file" in p.stderr and regular.read_text() == "keep me"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "live.sock"))
    live.listen(1)
    with live:
        p = _run_bind(appdir, f"unix:{tmp_path / 'live.sock'}")
    assert p.returncode == 2 and "in use" in p.stderr, p.stderr
    for bad in ("tcp:127.0.0.1", "tcp:::1:9000", "udp:x", "systemd:app"):
        p = _run_bind(appdir, bad)
        assert p.returncode == 2 and "--bind" in p.stderr, (bad, p.stderr)
    p = _run_bind(appdir, f"unix:{tmp_path / 'ok.sock'}", "--graceful-timeout", "soon")
    assert p.returncode == 2 and "bad duration" in p.stderr, p.stderr


def test_bind_leaves_a_socket_file_that_is_no_longer_its_own(appdir):
    path = str(appdir / "app.sock")
    with Runner(appdir, "apps:hello", sock_path=path) as r:
        assert b"hello" in Exchange(path).request(cgi_params("/"))[0]
        os.unlink(path)                          # someone else took the path over
        other = socket.socket(socket.AF_UNIX)
        other.bind(path)
        with other:
            assert r.stop() == 0
            assert os.path.exists(path), "the runner removed a socket file not its own"
    with Runner(appdir, "apps:hello", sock_path=path) as r:   # the stale one is replaced
        assert r.stop() == 0
        assert not os.path.exists(path), "the runner left its own socket file behind"
