"""Helpers for the spawnd-wsgi tests: runner processes and a raw FastCGI exchange.

(A test module only so that it lives beside the tests it serves; it has one test of its
own.) Runners are real processes started with the venv's python, either with --bind or,
as spawnd starts them, with a listening socket on fd 0.
"""
from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time

from spawnd.fastcgi.protocol import ClientConnection, EndRequest, Stderr, Stdout

PYTHON = sys.executable


def wait_until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = predicate()
        if seen:
            return seen
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen {seen!r}")


def write_app(directory, name: str, source: str) -> None:
    with open(os.path.join(str(directory), name + ".py"), "w") as f:
        f.write(textwrap.dedent(source))


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class Runner:
    """spawnd-wsgi as a subprocess; stderr goes to a file (``.stderr()``)."""

    def __init__(self, directory, app: str, *args, sock_path: str | None = None,
                 listener: socket.socket | None = None, env=None,
                 nofile: int | None = None, limits: dict | None = None) -> None:
        self.dir = str(directory)
        self.path = sock_path
        self.errfile = os.path.join(self.dir, f"runner-{id(self)}.err")
        cmd = [PYTHON, "-m", "spawnd.wsgi.main", "--chdir", self.dir, *args]
        if limits:      # smaller values of spawnd.wsgi.server's size constants
            cmd[1:3] = ["-c", "import sys, spawnd.wsgi.server as s, spawnd.wsgi.main as m; "
                        f"vars(s).update({limits!r}); sys.argv[0] = 'spawnd-wsgi'; "
                        "sys.exit(m.main())"]
        if listener is None:
            if self.path is None:
                self.path = os.path.join(self.dir, "app.sock")
            cmd += ["--bind", "unix:" + self.path]
        cmd.append(app)
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        with open(self.errfile, "wb") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=listener.fileno() if listener else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, env=full_env,
                preexec_fn=None if nofile is None else lambda: resource.setrlimit(
                    resource.RLIMIT_NOFILE, (nofile, nofile)))
        if listener is None:
            wait_until(lambda: self.proc.poll() is not None or _answers(self.path), 15,
                       "the runner's socket to answer")
        # 'serving' is logged once TERM is handled: a stop() before would kill it
        wait_until(lambda: self.proc.poll() is not None or "serving" in self.stderr(),
                   15, "the runner to log 'serving'")
        if self.proc.poll() is not None:
            raise AssertionError(f"runner exited {self.proc.returncode}:\n{self.stderr()}")

    def stderr(self) -> str:
        with open(self.errfile, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self, timeout=15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"runner ignored SIGTERM for {timeout}s:\n{self.stderr()}")
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def connect(path: str, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    return s


def cgi_params(uri="/", method="GET", headers=(), body=b"", extra=()) -> list:
    path, _, query = uri.partition("?")
    params = [("GATEWAY_INTERFACE", "CGI/1.1"), ("REQUEST_METHOD", method),
              ("SCRIPT_NAME", path), ("QUERY_STRING", query), ("REQUEST_URI", uri),
              ("SERVER_NAME", "localhost"), ("SERVER_PORT", "80"),
              ("SERVER_PROTOCOL", "HTTP/1.1"), ("CONTENT_LENGTH", str(len(body)))]
    params += [("HTTP_" + k.upper().replace("-", "_"), v) for k, v in headers]
    return params + list(extra)


class Exchange:
    """One FastCGI connection driven by hand (ClientConnection over a socket)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = connect(path, timeout)
        self.conn = ClientConnection()

    def request(self, params, body=b"", *, keep_conn=False, rid=1):
        out = self.conn.begin_request(rid, keep_conn=keep_conn, params=params)
        if body:
            out += self.conn.send_stdin(rid, body)
        self.sock.sendall(out + self.conn.send_stdin(rid, b""))
        return self.response()

    def response(self):
        """(stdout bytes, stderr bytes, EndRequest) of the next finished request."""
        out, err = [], []
        while True:
            data = self.sock.recv(1 << 16)
            events = self.conn.receive_data(data)
            for ev in events:
                if type(ev) is Stdout:
                    out.append(ev.data)
                elif type(ev) is Stderr:
                    err.append(ev.data)
                elif type(ev) is EndRequest:
                    return b"".join(out), b"".join(err), ev
            if not data:
                raise ConnectionError("closed before END_REQUEST; got "
                                      f"{b''.join(out)[:200]!r}")

    def closed_by_peer(self, timeout=5.0) -> bool:
        """True when the runner closes the connection (EOF or reset) within timeout."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()


def split_cgi(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n"):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(headers.pop("status", "200").split()[0])
    return status, headers, body


def test_split_cgi_reads_status_headers_and_body():
    assert split_cgi(b"Status: 404 Nope\r\nX-A: b\r\n\r\nbody") == (404, {"x-a": "b"},
                                                                      b"body")
