"""spawnd.queue.depth on real listening sockets: bare, behind busy children, behind spawnd."""
from __future__ import annotations

import ctypes
import errno
import os
import socket

import pytest

from spawnd.fastcgi.protocol import ClientConnection, EndRequest, Stdout
from spawnd.fastcgi.client import parse_cgi_response
from spawnd.queue import QueueError, depth
from support import hangfcgi
from support.daemon import Spawnd
from support.proc import wait_for

BACKLOG = 64
SYS_PIDFD_GETFD = 438          # the same number on every Linux architecture


def somaxconn() -> int:
    with open("/proc/sys/net/core/somaxconn") as f:
        return int(f.read())


def listener(kind: str, tmp_path, backlog: int = BACKLOG) -> socket.socket:
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(tmp_path / f"q{backlog}.sock"))
    else:
        s = socket.socket(socket.AF_INET6 if kind == "tcp6" else socket.AF_INET)
        s.bind(("::1" if kind == "tcp6" else "127.0.0.1", 0))
    s.listen(backlog)
    return s


def connect(lsock: socket.socket) -> socket.socket:
    c = socket.socket(lsock.family, socket.SOCK_STREAM)
    c.connect(lsock.getsockname())
    return c


def wait_depth(sock, expected, what=""):
    """TCP queues a connection when the client's final ACK is processed (a moment after
    connect() returns): poll the exact value with a deadline."""
    return wait_for(lambda: depth(sock) == expected, 5,
                    what=f"depth {expected} {what}(now {depth(sock)})")


KINDS = ["unix", "tcp", "tcp6"]


@pytest.fixture(params=KINDS)
def kind(request):
    if request.param == "tcp6":
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::1", 0))
        except OSError as exc:
            pytest.skip(f"no IPv6 loopback: {exc}")
    return request.param


@pytest.mark.parametrize("n", [0, 1, 5, 17])
def test_depth_counts_connections_nobody_accepted(kind, tmp_path, n):
    with listener(kind, tmp_path) as lsock:
        clients = [connect(lsock) for _ in range(n)]
        try:
            wait_depth(lsock, (n, BACKLOG), f"after {n} connects ")
            assert depth(lsock.fileno()) == (n, BACKLOG), "an fd works as well as a socket"
            accepted = []
            for k in range(1, n + 1):
                accepted.append(lsock.accept()[0])
                assert depth(lsock) == (n - k, BACKLOG), f"after accepting {k} of {n}"
            for c in clients[:2]:        # a client that gives up leaves no trace either
                c.close()
            assert depth(lsock) == (0, BACKLOG)
        finally:
            for c in clients + (accepted if n else []):
                c.close()


def test_backlog_is_capped_by_somaxconn(kind, tmp_path):
    cap = somaxconn()
    with listener(kind, tmp_path, backlog=cap + 1000) as lsock:
        assert depth(lsock) == (0, cap)


def test_a_full_queue_holds_backlog_plus_one(tmp_path):
    """The kernel refuses a Unix connect only when queued > backlog: 4 -> 5 queued."""
    with listener("unix", tmp_path, backlog=4) as lsock:
        clients = []
        try:
            while True:
                c = socket.socket(socket.AF_UNIX)
                c.setblocking(False)
                clients.append(c)
                try:
                    c.connect(lsock.getsockname())
                except BlockingIOError:
                    break
                assert len(clients) < 100, "the queue never filled"
            assert depth(lsock) == (5, 4) and len(clients) == 6
        finally:
            for c in clients:
                c.close()


def test_sockets_that_do_not_listen_are_refused(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        with pytest.raises(QueueError, match="not a stream socket"):
            depth(udp)
    with listener("tcp", tmp_path) as lsock, connect(lsock) as client:
        with pytest.raises(QueueError, match="not a listening socket"):
            depth(client)
    with socket.socket() as fresh, pytest.raises(QueueError, match="not a listening socket"):
        depth(fresh)                                    # never bound: state CLOSE
    with listener("unix", tmp_path) as lsock, connect(lsock) as client:
        with pytest.raises(QueueError, match="is not listening") as info:
            depth(client)
        assert info.value.errno == errno.EINVAL
    a, b = socket.socketpair()
    with a, b, pytest.raises(QueueError, match="is not listening"):
        depth(a)
    r, w = os.pipe()
    try:
        with pytest.raises(OSError):
            depth(r)
    finally:
        os.close(r)
        os.close(w)


# ---- behind busy children --------------------------------------------------------------
def send_request(family, address, uri="/") -> tuple[socket.socket, ClientConnection]:
    """Connect and send one complete FastCGI request; the answer is read later."""
    c = socket.socket(family, socket.SOCK_STREAM)
    c.connect(address)
    conn = ClientConnection()
    c.sendall(conn.begin_request(1, params=[(b"REQUEST_URI", uri.encode())])
              + conn.send_stdin(1, b""))
    return c, conn


def read_status(c: socket.socket, conn: ClientConnection) -> tuple[int, bytes]:
    out = b""
    c.settimeout(10)
    while True:
        data = c.recv(65536)
        for event in conn.receive_data(data):
            if isinstance(event, Stdout):
                out += event.data
            elif isinstance(event, EndRequest):
                status, _, _, body = parse_cgi_response(out)
                return status, body
        assert data, "the child closed the connection without answering"


def busy_children_hold_n(lsock, address, trigger, n_children, n):
    """With the trigger set, n_children requests are held by the children; n more wait in
    the queue of lsock. Release them and check all get answered."""
    trigger.touch()
    clients = []
    try:
        for i in range(n_children + n):
            clients.append(send_request(lsock.family, address, f"/r{i}"))
        wait_depth(lsock, (n, BACKLOG), f"with {n_children} children busy ")
        trigger.unlink()
        answers = [read_status(*c) for c in clients]
        assert [s for s, _ in answers] == [200] * len(clients)
        served_by = {body.split()[1] for _, body in answers}
        assert len(served_by) == n_children, f"answered by {served_by}"
        assert depth(lsock) == (0, BACKLOG)
    finally:
        for c, _ in clients:
            c.close()


def test_depth_with_every_child_busy(tmp_path):
    trigger = tmp_path / "hold"
    with listener("unix", tmp_path) as lsock:
        procs = [hangfcgi.start(lsock, "--trigger", str(trigger)) for _ in range(2)]
        try:
            busy_children_hold_n(lsock, lsock.getsockname(), trigger, 2, 5)
        finally:
            for p in procs:
                hangfcgi.stop(p)


def _pidfd_getfd(pid: int, fd: int) -> socket.socket:
    """A duplicate of another process's fd (pidfd_getfd(2), Linux >= 5.6, needs root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        new = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if new < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {fd}): {os.strerror(err)}")
    finally:
        os.close(pidfd)
    return socket.socket(fileno=new)


@pytest.mark.parametrize("family", ["unix", "tcp"])
def test_depth_of_a_spawnd_pool_whose_children_are_busy(tmp_path, pub, public_python, family):
    """Children run as nobody, so the script, the trigger and the socket live in a
    world-readable directory (pub)."""
    python, env = public_python
    script = hangfcgi.install(str(pub))
    trigger = pub / "hold"
    if family == "unix":
        listen, address = f"unix:{pub / 'pool.sock'}", str(pub / "pool.sock")
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        listen, address = f"tcp:127.0.0.1:{port}", ("127.0.0.1", port)
    with Spawnd(tmp_path, f"""\
        pools:
          busy:
            command: [{python}, {script}, --trigger, {trigger}]
            listen: {listen}
            socket: {{backlog: {BACKLOG}}}
            processes: 2
            user: nobody
            env: {{PYTHONPATH: {env["PYTHONPATH"]}, PYTHONDONTWRITEBYTECODE: "1"}}
        """) as d:
        d.start()
        pid = d.wait_children("busy", 2)[0]
        # The pool's listening socket, taken from a child's fd 0.
        with _pidfd_getfd(pid, 0) as pool_sock:
            assert depth(pool_sock) == (0, BACKLOG)
            busy_children_hold_n(pool_sock, address, trigger, 2, 7)
