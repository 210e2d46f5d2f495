"""The blocking FastCGI client against real servers: php-cgi (TCP) and fcgiwrap (Unix)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from spawnd.fastcgi.client import (ConnectError, FastCGIError, build_params, get_values,
                                   parse_address, parse_cgi_response, request)
from spawnd.fastcgi.protocol import (CANT_MPX_CONN, END_REQUEST, STDOUT, Request,
                                     ServerConnection, StdinData, StdinEnd, encode_record)
from support.proc import free_port, wait_for

PHP_SCRIPT = r"""<?php
if (isset($_GET['code'])) { http_response_code((int)$_GET['code']); }
header('X-Test: yes');
if (isset($_GET['echo'])) { echo file_get_contents('php://input'); exit; }
error_log('php says hello');
echo "method=" . $_SERVER['REQUEST_METHOD'] . "\n";
echo "q=" . ($_GET['q'] ?? '') . "\n";
echo "foo=" . ($_SERVER['HTTP_X_FOO'] ?? '') . "\n";
echo "extra=" . ($_SERVER['EXTRA'] ?? '') . "\n";
"""

CGI_SCRIPT = r"""#!/bin/sh
case "$QUERY_STRING" in
  missing) printf 'Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nno such thing\n'
           exit 0;;
  redirect) printf 'Location: /elsewhere\r\n\r\n'; exit 0;;
esac
printf 'Content-Type: text/plain\r\nX-Method: %s\r\n\r\n' "$REQUEST_METHOD"
printf 'path=%s query=%s agent=%s len=%s\n' "$PATH_INFO" "$QUERY_STRING" \
  "$HTTP_USER_AGENT" "$CONTENT_LENGTH"
echo "cgi warning" >&2
cat
"""


def answers(family: int, address) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(address)
            return True
        except OSError:
            return False


def start_server(argv, log, env, ready, name):
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    try:
        try:
            wait_for(lambda: proc.poll() is not None or ready(), 10, what=f"{name} to listen")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; exit code {proc.poll()}, log: {log.name}") from None
        if proc.poll() is not None:
            log.flush()
            raise AssertionError(f"{name} exited {proc.returncode}: "
                                 f"{open(log.name).read()}")
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def php(tmp_path):
    """php-cgi serving FastCGI on 127.0.0.1:PORT; yields (address, script path)."""
    if not shutil.which("php-cgi"):
        pytest.fail("php-cgi is not installed (scripts/setup --test installs it)")
    script = tmp_path / "app.php"
    script.write_text(PHP_SCRIPT)
    env = dict(os.environ, PHP_FCGI_CHILDREN="0")
    for attempt in range(3):          # the free port may be taken between probe and bind
        port = free_port()
        with open(tmp_path / "php.log", "w") as log:
            try:
                proc = start_server(["php-cgi", "-b", f"127.0.0.1:{port}"], log, env,
                                    lambda: answers(socket.AF_INET, ("127.0.0.1", port)),
                                    "php-cgi")
                break
            except AssertionError:
                if attempt == 2:
                    raise
    try:
        yield f"tcp:127.0.0.1:{port}", str(script)
    finally:
        stop(proc)


@pytest.fixture
def fcgiwrap(tmp_path):
    """fcgiwrap on a Unix socket (-f: CGI stderr as FastCGI STDERR)."""
    if not shutil.which("fcgiwrap"):
        pytest.fail("fcgiwrap is not installed (scripts/setup --test installs it)")
    script = tmp_path / "echo.cgi"
    script.write_text(CGI_SCRIPT)
    script.chmod(0o755)
    path = str(tmp_path / "fcgiwrap.sock")
    with open(tmp_path / "fcgiwrap.log", "w") as log:
        proc = start_server(["fcgiwrap", "-f", "-s", f"unix:{path}"], log, dict(os.environ),
                            lambda: answers(socket.AF_UNIX, path), "fcgiwrap")
    try:
        yield f"unix:{path}", str(script)
    finally:
        stop(proc)


# ---- pure parts ----------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("unix:/run/x.sock", (socket.AF_UNIX, "/run/x.sock")),
    ("tcp:127.0.0.1:9000", (socket.AF_UNSPEC, ("127.0.0.1", 9000))),
    ("tcp:localhost:1", (socket.AF_UNSPEC, ("localhost", 1))),
    ("tcp:[::1]:9000", (socket.AF_INET6, ("::1", 9000))),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["unix:", "tcp:127.0.0.1", "tcp:::1:80", "tcp:[::1]",
                                  "tcp:h:0", "tcp:h:65536", "udp:h:1", "/run/x.sock"])
def test_parse_address_rejects(text):
    with pytest.raises(ValueError, match="bad FastCGI address"):
        parse_address(text)


def test_cgi_response_parsing():
    assert parse_cgi_response(b"Status: 404 Gone Away\r\nA: 1\r\n\r\nbody\r\n\r\nmore") == \
        (404, "Gone Away", [("A", "1")], b"body\r\n\r\nmore")
    assert parse_cgi_response(b"Content-Type: x\n\n") == (200, "OK", [("Content-Type", "x")],
                                                          b"")
    assert parse_cgi_response(b"Location: /x\r\n\r\n")[:2] == (302, "Found")
    assert parse_cgi_response(b"Status: 299\r\n\r\n")[:2] == (299, "")
    for bad in (b"", b"no blank line\r\n", b"Status: abc\r\n\r\n", b"junk\r\n\r\n"):
        with pytest.raises(FastCGIError):
            parse_cgi_response(bad)


def test_build_params_defaults_headers_and_overrides():
    params = dict(build_params(
        "tcp:127.0.0.1:9000", "/a%20b/c?x=1&y=%41", "post",
        [("X-Foo", "1"), ("x-foo", "2"), ("Cookie", "a=1"), ("Cookie", "b=2"),
         ("Content-Type", "text/plain"), ("Host", "example.org")],
        b"hello", {"SCRIPT_FILENAME": "/srv/a.php", "SERVER_NAME": "override"}))
    assert params[b"REQUEST_METHOD"] == b"POST"
    assert params[b"REQUEST_URI"] == b"/a%20b/c?x=1&y=%41"
    assert params[b"SCRIPT_NAME"] == b""
    assert params[b"PATH_INFO"] == b"/a b/c"
    assert params[b"QUERY_STRING"] == b"x=1&y=%41"
    assert params[b"SERVER_PORT"] == b"9000"
    assert params[b"SERVER_NAME"] == b"override"
    assert params[b"SCRIPT_FILENAME"] == b"/srv/a.php"
    assert params[b"CONTENT_LENGTH"] == b"5"
    assert params[b"CONTENT_TYPE"] == b"text/plain"
    assert b"HTTP_CONTENT_TYPE" not in params
    assert params[b"HTTP_X_FOO"] == b"1, 2"
    assert params[b"HTTP_COOKIE"] == b"a=1; b=2"
    assert params[b"HTTP_HOST"] == b"example.org"
    assert params[b"GATEWAY_INTERFACE"] == b"CGI/1.1"
    assert params[b"SERVER_PROTOCOL"] == b"HTTP/1.1"


# ---- php-cgi -------------------------------------------------------------------------
def test_php_get_with_query(php):
    address, script = php
    response = request(address, "/app.php?q=hello%20world", headers={"X-Foo": "bar"},
                       params={"SCRIPT_FILENAME": script, "EXTRA": "e"})
    assert response.status == 200 and response.reason == "OK"
    assert response.header("x-test") == "yes"
    assert response.body.decode() == "method=GET\nq=hello world\nfoo=bar\nextra=e\n"
    assert b"php says hello" in response.stderr
    assert (response.app_status, response.protocol_status) == (0, 0)


def test_php_post_large_body_echoed(php):
    address, script = php
    body = os.urandom(300_000)                 # several STDIN and STDOUT records
    response = request(address, "/app.php?echo=1", method="POST", body=body,
                       headers={"Content-Type": "application/octet-stream"},
                       params={"SCRIPT_FILENAME": script}, keep_conn=True)
    assert response.status == 200
    assert response.body == body


def test_php_404(php):
    address, script = php
    response = request(address, "/app.php?code=404", params={"SCRIPT_FILENAME": script})
    assert (response.status, response.reason) == (404, "Not Found")


def test_php_sequential_requests(php):
    address, script = php
    for i in range(5):
        response = request(address, f"/app.php?q={i}", params={"SCRIPT_FILENAME": script})
        assert f"q={i}\n".encode() in response.body


# ---- fcgiwrap ------------------------------------------------------------------------
def test_fcgiwrap_get_with_query(fcgiwrap):
    address, script = fcgiwrap
    response = request(address, "/some%20path?a=b", headers=[("User-Agent", "tester")],
                       params={"SCRIPT_FILENAME": script})
    assert response.status == 200
    assert response.headers == [("Content-Type", "text/plain"), ("X-Method", "GET")]
    assert response.body == b"path=/some path query=a=b agent=tester len=0\n"
    assert response.stderr == b"cgi warning\n"


def test_fcgiwrap_post_body_echoed(fcgiwrap):
    address, script = fcgiwrap
    # fcgiwrap writes all of STDIN to the CGI before reading its output, so the echoed
    # body must fit in the pipe: keep it under 64 KiB.
    body = bytes(range(256)) * 200
    response = request(address, "/", method="POST", body=body,
                       params={"SCRIPT_FILENAME": script})
    assert response.header("X-Method") == "POST"
    head, _, echoed = response.body.partition(b"\n")
    assert head.endswith(b"len=51200")
    assert echoed == body


def test_fcgiwrap_status_and_redirect(fcgiwrap):
    address, script = fcgiwrap
    missing = request(address, "/?missing", params={"SCRIPT_FILENAME": script})
    assert (missing.status, missing.reason, missing.body) == (404, "Not Found",
                                                              b"no such thing\n")
    moved = request(address, "/?redirect", params={"SCRIPT_FILENAME": script})
    assert (moved.status, moved.header("Location")) == (302, "/elsewhere")


# ---- failures ------------------------------------------------------------------------
def test_connect_refused_and_missing_socket(tmp_path):
    with socket.socket() as bound:           # bound, not listening: connect is refused
        bound.bind(("127.0.0.1", 0))
        with pytest.raises(ConnectError, match="cannot connect"):
            request(f"tcp:127.0.0.1:{bound.getsockname()[1]}")
    with pytest.raises(ConnectError, match="cannot connect"):
        request(f"unix:{tmp_path}/nothing.sock")


def test_timeout_when_the_application_never_answers():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)                     # the kernel completes connect; no one reads
        start = time.monotonic()
        with pytest.raises(FastCGIError, match="timed out after 0.3s"):
            request(f"tcp:127.0.0.1:{server.getsockname()[1]}", timeout=0.3)
        assert time.monotonic() - start < 3


class OneShotServer:
    """A real TCP server that answers one connection with fixed bytes, then closes."""

    def __init__(self, reply: bytes):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.address = f"tcp:127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, args=(reply,), daemon=True)
        self.thread.start()

    def _serve(self, reply: bytes) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.recv(65536)
            conn.sendall(reply)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes a blocked accept() (Linux)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)
        assert not self.thread.is_alive(), "server thread did not stop"


@pytest.fixture
def garbage_server():
    server = OneShotServer(b"HTTP/1.1 200 OK\r\n\r\nnot fastcgi")
    try:
        yield server.address
    finally:
        server.close()


def test_protocol_error_from_a_non_fastcgi_peer(garbage_server):
    with pytest.raises(FastCGIError, match="protocol error: unsupported FastCGI version"):
        request(garbage_server)


def test_refusal_by_the_application_is_an_error():
    server = OneShotServer(encode_record(END_REQUEST, 1, bytes(4) + bytes([CANT_MPX_CONN])
                                         + bytes(3)))
    try:
        with pytest.raises(FastCGIError, match="CANT_MPX_CONN"):
            request(server.address)
    finally:
        server.close()


def test_closed_before_end_request():
    server = OneShotServer(encode_record(STDOUT, 1, b"Status: 200\r\n\r\npartial"))
    try:
        with pytest.raises(FastCGIError, match="closed before the answer was complete"):
            request(server.address)
    finally:
        server.close()


# ---- the command line ----------------------------------------------------------------
def cli(*args, module="spawnd.fastcgi.client", stdin=None):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          timeout=30, input=stdin)


def test_cli_success_output(php):
    address, script = php
    result = cli(address, "/app.php?q=cli", "-H", "X-Foo: from-cli",
                 "-e", f"SCRIPT_FILENAME={script}")
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.partition(b"\n\n")
    lines = head.decode().split("\n")
    assert lines[0] == "Status: 200 OK"
    assert "X-Test: yes" in lines
    assert body == b"method=GET\nq=cli\nfoo=from-cli\nextra=\n"
    assert b"php says hello" in result.stderr


def test_cli_post_from_file_and_404(fcgiwrap, tmp_path):
    address, script = fcgiwrap
    (tmp_path / "body").write_bytes(b"file body")
    result = cli(address, "/", "-d", f"@{tmp_path / 'body'}", "-e",
                 f"SCRIPT_FILENAME={script}", module="spawnd.fastcgi")
    assert result.returncode == 0, result.stderr
    assert b"X-Method: POST\n" in result.stdout
    assert result.stdout.endswith(b"len=9\nfile body")
    result = cli(address, "/?missing", "-e", f"SCRIPT_FILENAME={script}")
    assert result.returncode == 1
    assert result.stdout.startswith(b"Status: 404 Not Found\n")


def test_cli_exit_codes_for_failures(tmp_path, garbage_server):
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        refused = cli(f"tcp:127.0.0.1:{bound.getsockname()[1]}")
    assert refused.returncode == 3
    assert b"cannot connect" in refused.stderr and refused.stdout == b""
    assert cli(f"unix:{tmp_path}/none.sock").returncode == 3
    broken = cli(garbage_server, "--timeout", "5")
    assert broken.returncode == 1 and b"protocol error" in broken.stderr
    usage = cli("tcp:127.0.0.1:1", "-H", "no colon")
    assert usage.returncode == 2 and b"bad header" in usage.stderr
    assert cli("nowhere").returncode == 2


# ---- the client and ServerConnection over a real socket ------------------------------
class ProtocolServer:
    """A real Unix-socket server driven by ServerConnection: answers GET_VALUES by itself
    and echoes each request's method, query and number of STDIN records."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._converse(conn)
                except OSError:
                    pass        # the client went away: serve the next one

    @staticmethod
    def _converse(conn: socket.socket) -> None:
        fcgi, params, body = ServerConnection(max_conns=3, max_reqs=1), {}, []
        while True:
            data = conn.recv(65536)
            for event in fcgi.receive_data(data):
                if isinstance(event, Request):
                    params = dict(event.params)
                elif isinstance(event, StdinData):
                    body.append(event.data)
                elif isinstance(event, StdinEnd):
                    text = b"%s %s %d" % (params[b"REQUEST_METHOD"],
                                          params[b"QUERY_STRING"], len(body))
                    conn.sendall(fcgi.send_stdout(1, b"X-A: 1\r\n\r\n" + text)
                                 + fcgi.send_stderr(1, b"e") + fcgi.end_request(1, 7))
            replies = fcgi.data_to_send()
            if replies:
                conn.sendall(replies)
            if not data or not fcgi.keep_conn:
                return

    close = OneShotServer.close


def test_client_against_server_connection(tmp_path):
    server = ProtocolServer(str(tmp_path / "s.sock"))
    address = f"unix:{tmp_path}/s.sock"
    try:
        response = request(address, "/p?z=9", method="PUT", body=b"abc")
        assert (response.status, response.headers, response.body) == (
            200, [("X-A", "1")], b"PUT z=9 1")
        assert (response.stderr, response.app_status) == (b"e", 7)
        # Without a body the end-of-STDIN record goes out once (a strict server refuses two).
        response = request(address, "/q?x=1")
        assert response.body == b"GET x=1 0"
        assert get_values(address) == {b"FCGI_MAX_CONNS": b"3", b"FCGI_MAX_REQS": b"1",
                                       b"FCGI_MPXS_CONNS": b"0"}
    finally:
        server.close()


def test_get_values_from_php(php):
    address, _ = php
    values = get_values(address, [b"FCGI_MPXS_CONNS", b"FCGI_MAX_REQS", b"UNHEARD_OF"])
    assert values[b"FCGI_MPXS_CONNS"] == b"0"
    assert values[b"FCGI_MAX_REQS"].isdigit()
    assert b"UNHEARD_OF" not in values


def test_connect_error_is_a_connection_error(tmp_path):
    with pytest.raises(ConnectionError):
        request(f"unix:{tmp_path}/absent.sock")
    with pytest.raises(ValueError, match="bad FastCGI address"):
        request("unix")
