"""spawnd-wsgi's CGI mode under real CGI servers: fcgiwrap, and Python's http.server."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shlex
import socket
import subprocess
import sys
import threading

import pytest

import spawnd

from support.proc import free_port
from test_wsgi_support import Exchange, split_cgi, wait_until, write_app

APP = r'''
import hashlib, json
from wsgiref.validate import validator

def inner(environ, start_response):
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    info = {k: v for k, v in environ.items() if isinstance(v, str)}
    info.update(sha=hashlib.sha256(body).hexdigest(), size=len(body),
                run_once=environ["wsgi.run_once"])
    out = json.dumps(info).encode()
    start_response("201 Created", [("Content-Type", "application/json"),
                                   ("X-Cgi", "yes")])
    return iter([out[:10], out[10:]])

application = validator(inner)
'''


@pytest.fixture
def cgi_script(tmp_path):
    write_app(tmp_path, "cgiapp", APP)
    script = tmp_path / "app.cgi"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m spawnd.wsgi.main "
                      f"--chdir {tmp_path} cgiapp\n")
    script.chmod(0o755)
    return script


def test_cgi_mode_under_fcgiwrap(tmp_path, cgi_script):
    sock = str(tmp_path / "fcgiwrap.sock")
    proc = subprocess.Popen(["fcgiwrap", "-f", "-s", f"unix:{sock}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: os.path.exists(sock), 10, "fcgiwrap's socket")
        body = os.urandom(100_000)
        params = [("GATEWAY_INTERFACE", "CGI/1.1"), ("REQUEST_METHOD", "POST"),
                  ("SCRIPT_FILENAME", str(cgi_script)), ("SCRIPT_NAME", "/app.cgi"),
                  ("PATH_INFO", "/x/y"), ("QUERY_STRING", "a=1"),
                  ("SERVER_NAME", "localhost"), ("SERVER_PORT", "80"),
                  ("SERVER_PROTOCOL", "HTTP/1.1"), ("CONTENT_LENGTH", str(len(body))),
                  ("CONTENT_TYPE", "application/octet-stream"),
                  ("HTTP_CONTENT_TYPE", "application/octet-stream")]
        out, err, end = Exchange(sock).request(params, body)
        status, headers, content = split_cgi(out)
        assert status == 201 and headers["x-cgi"] == "yes", (out[:300], err)
        env = json.loads(content)
        assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/app.cgi", "/x/y")
        assert env["sha"] == hashlib.sha256(body).hexdigest() and env["run_once"] is True
        assert "HTTP_CONTENT_TYPE" not in env
    finally:
        proc.terminate()
        proc.wait(10)


def test_cgi_mode_under_python_http_server(tmp_path, cgi_script):
    """http.server hands the client socket itself to the script as stdin: the body must
    be read up to CONTENT_LENGTH, never to end of file."""
    cgi_bin = tmp_path / "cgi-bin"
    cgi_bin.mkdir()
    os.rename(cgi_script, cgi_bin / "app.cgi")
    os.chmod(tmp_path, 0o755)
    port = free_port()
    # As root, http.server runs scripts as nobody, who cannot read pytest's tmp_path:
    # make its "nobody" our own uid.
    serve = ("import http.server as h, os; h.nobody_uid = os.getuid; "
             f"h.test(HandlerClass=h.CGIHTTPRequestHandler, port={port}, bind='127.0.0.1')")
    server = subprocess.Popen([sys.executable, "-c", serve], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.err", "wb"))
    try:
        def up():
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return True
            except OSError:
                return False
        wait_until(up, 10, "http.server to listen")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("POST", "/cgi-bin/app.cgi/p%C3%A4th?q=1", body=b"hello body",
                     headers={"Content-Type": "text/plain"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        # http.server always answers "200 Script output follows" and passes the
        # script's Status line on as a header
        assert resp.getheader("Status") == "201 Created", \
            (resp.status, data, (tmp_path / "server.err").read_text().splitlines()[-3:])
        env = json.loads(data)
        assert env["SCRIPT_NAME"] == "/cgi-bin/app.cgi"
        assert env["PATH_INFO"].encode("latin-1").decode("utf-8") == "/päth"
        assert env["size"] == 10 and env["QUERY_STRING"] == "q=1"
    finally:
        server.terminate()
        server.wait(10)


# ---- more CGI-mode cases: no CONTENT_LENGTH, --script-name, an application error, a body
# left unread, and the refusal outside CGI -------------------------------------------------

CASES = r'''
import hashlib, json, os

HERE = os.path.dirname(os.path.abspath(__file__))

def read_all(environ, start_response):
    """wsgi.input read to its end, without a size (no CONTENT_LENGTH to give one)."""
    body = environ["wsgi.input"].read()
    out = json.dumps({"size": len(body), "sha": hashlib.sha256(body).hexdigest(),
                      "CONTENT_LENGTH": environ.get("CONTENT_LENGTH")}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [out]

def marked(environ, start_response):
    """Leaves a file named 'called' beside this module when it runs."""
    with open(os.path.join(HERE, "called"), "a") as f:
        f.write(environ["SCRIPT_NAME"] + " " + environ["PATH_INFO"] + "\n")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [("mounted " + environ["SCRIPT_NAME"] + " " + environ["PATH_INFO"]).encode()]

def ignores_body(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"answered without reading the body\n"]

def raises(environ, start_response):
    raise RuntimeError("cgi-case-boom before start_response")
'''

# the source tree the test process imports (conftest checks it is this checkout's): put
# first on the runner's sys.path, so a runner started by fcgiwrap (which clears the
# environment and changes to the script's directory) runs the same code
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(spawnd.__file__)))


def write_cgi_script(directory, name: str, app: str, *options: str):
    """An executable CGI script in directory that execs spawnd-wsgi on cases.APP."""
    write_app(directory, "cases", CASES)
    script = directory / name
    cmd = [sys.executable, "-m", "spawnd.wsgi.main", "--chdir", str(directory),
           *options, app]
    script.write_text(f"#!/bin/sh\nPYTHONPATH={shlex.quote(SOURCE_ROOT)} exec "
                      + " ".join(map(shlex.quote, cmd)) + "\n")
    script.chmod(0o755)
    return script


@pytest.fixture
def fcgiwrap(tmp_path):
    """A real fcgiwrap on a Unix socket (-f: the scripts' stderr comes back as FastCGI
    STDERR); yields the socket path."""
    sock = str(tmp_path / "fcgiwrap.sock")
    errfile = open(tmp_path / "fcgiwrap.err", "wb")
    proc = subprocess.Popen(["fcgiwrap", "-f", "-s", f"unix:{sock}"],
                            stdout=subprocess.DEVNULL, stderr=errfile)
    try:
        wait_until(lambda: proc.poll() is not None or os.path.exists(sock), 10,
                   "fcgiwrap's socket")
        assert proc.poll() is None, (tmp_path / "fcgiwrap.err").read_text()
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)
        errfile.close()


def fcgiwrap_params(script, script_name, path_info, method="GET", extra=()):
    return [("GATEWAY_INTERFACE", "CGI/1.1"), ("REQUEST_METHOD", method),
            ("SCRIPT_FILENAME", str(script)), ("SCRIPT_NAME", script_name),
            ("PATH_INFO", path_info), ("QUERY_STRING", ""), ("SERVER_NAME", "localhost"),
            ("SERVER_PORT", "80"), ("SERVER_PROTOCOL", "HTTP/1.1"), *extra]


def fcgi_request(sock, params, body=b""):
    """One request to fcgiwrap; the body is sent from a thread while the answer is read,
    so a server that stops reading the body (and answers 502) is seen as that answer,
    not as a send blocked on a full socket."""
    ex = Exchange(sock, timeout=30)
    conn = ex.conn
    data = conn.begin_request(1, keep_conn=False, params=params)
    if body:
        data += conn.send_stdin(1, body)
    data += conn.send_stdin(1, b"")
    send_error = []

    def send():
        try:
            ex.sock.sendall(data)
        except OSError as exc:
            send_error.append(exc)
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        out, err, _end = ex.response()
    finally:
        sender.join(30)
        ex.close()
    return out, err, send_error


@pytest.mark.parametrize("length", ["absent", "empty"])
def test_cgi_mode_without_content_length_reads_stdin_to_its_end(tmp_path, fcgiwrap,
                                                               length):
    """fcgiwrap writes the FastCGI STDIN stream to the script's stdin and closes it: with
    no CONTENT_LENGTH (or an empty one) wsgi.input is all of it. The body is larger than
    the runner's 64 KiB read and than a pipe, so a single read() would come up short."""
    script = write_cgi_script(tmp_path, "app.cgi", "cases:read_all")
    body = os.urandom(300_000)
    extra = [] if length == "absent" else [("CONTENT_LENGTH", "")]
    out, err, send_error = fcgi_request(
        fcgiwrap, fcgiwrap_params(script, "/app.cgi", "", "POST", extra), body)
    status, _headers, content = split_cgi(out)
    assert status == 200, (out[:300], err, send_error)
    got = json.loads(content)
    assert got["CONTENT_LENGTH"] is None      # an empty one is removed from environ
    assert got["size"] == len(body) and got["sha"] == hashlib.sha256(body).hexdigest()
    assert not send_error


def test_cgi_mode_script_name_outside_the_prefix_is_404_without_the_app(tmp_path,
                                                                         fcgiwrap):
    script = write_cgi_script(tmp_path, "app.cgi", "cases:marked", "--script-name", "/mnt")
    marker = tmp_path / "called"
    # outside /mnt ("/mntx" shares its first characters but is not under it)
    for script_name, path_info in [("/app.cgi", "/x"), ("/mntx", "/y")]:
        out, err, _ = fcgi_request(fcgiwrap, fcgiwrap_params(script, script_name,
                                                             path_info))
        assert out.startswith(b"Status: 404 Not Found\r\n"), (out[:300], err)
        assert split_cgi(out) == (404, {"content-type": "text/plain",
                                        "content-length": "10"}, b"Not Found\n")
        assert not marker.exists(), marker.read_text()
    # the control: inside the prefix the same script calls the app, which leaves its mark
    out, err, _ = fcgi_request(fcgiwrap, fcgiwrap_params(script, "/mnt", "/in/side"))
    assert split_cgi(out) == (200, {"content-type": "text/plain"},
                              b"mounted /mnt /in/side"), (out[:300], err)
    assert marker.read_text() == "/mnt /in/side\n"


def cgi_env(**extra):
    """The environment a CGI server gives a script (no GATEWAY_INTERFACE unless asked)."""
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "LANG", "LC_ALL", "SYSTEMROOT")}
    env.update(PYTHONPATH=SOURCE_ROOT, REQUEST_METHOD="POST", SCRIPT_NAME="/app.cgi",
               PATH_INFO="/p", QUERY_STRING="", SERVER_NAME="localhost",
               SERVER_PORT="80", SERVER_PROTOCOL="HTTP/1.1")
    env.update(extra)
    return env


def test_cgi_mode_application_error_before_start_response_is_a_500(tmp_path):
    """No CGI server shows a script's exit status (fcgiwrap drops it, http.server only
    logs a non-zero one): the runner is started here as one would start it, with the CGI
    environment, the body on a pipe as stdin and stdout/stderr captured."""
    write_app(tmp_path, "cases", CASES)
    body = b"a body the application never reads"
    proc = subprocess.run(
        [sys.executable, "-m", "spawnd.wsgi.main", "--chdir", str(tmp_path),
         "cases:raises"], input=body, capture_output=True, timeout=30,
        env=cgi_env(GATEWAY_INTERFACE="CGI/1.1", CONTENT_LENGTH=str(len(body))))
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.stdout == (b"Status: 500 Internal Server Error\r\n"
                           b"Content-Type: text/plain\r\nContent-Length: 22\r\n\r\n"
                           b"Internal Server Error\n"), (proc.stdout, err)
    assert "spawnd-wsgi: error in the application" in err, err
    assert "Traceback (most recent call last):" in err, err
    assert "RuntimeError: cgi-case-boom before start_response" in err, err
    # main.py / docs: 1 only when the response could not be written; a 500 was written
    assert proc.returncode == 0, err


PRINTER = r'''
print("printed at import")

def application(environ, start_response):
    print("printed in the request")
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"first part"
    if environ["PATH_INFO"] == "/fail":
        raise RuntimeError("cgi-case-boom after start_response")
    yield b", second part"
'''


@pytest.mark.parametrize("path,status", [("/ok", 0), ("/fail", 1)])
def test_cgi_mode_stdout_is_the_response_only(tmp_path, path, status):
    """What the application prints goes to stderr, not into the response; an error
    after the headers leaves the response cut short and the exit status 1."""
    write_app(tmp_path, "printer", PRINTER)
    proc = subprocess.run(
        [sys.executable, "-m", "spawnd.wsgi.main", "--chdir", str(tmp_path), "printer"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
        env=cgi_env(GATEWAY_INTERFACE="CGI/1.1", PATH_INFO=path))
    err = proc.stderr.decode("utf-8", "replace")
    body = b"first part" if status else b"first part, second part"
    assert proc.stdout == b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body, err
    assert "printed at import" in err and "printed in the request" in err, err
    assert ("cgi-case-boom after start_response" in err) == bool(status), err
    assert proc.returncode == status, err


@pytest.mark.parametrize("content_length", [True, False])
def test_cgi_mode_drains_a_body_the_application_ignored(tmp_path, fcgiwrap,
                                                        content_length):
    """fcgiwrap writes the whole body to the script's stdin before it reads the output;
    a script that exits with more than a pipe's worth (64 KiB) unread makes that write
    fail (EPIPE) and fcgiwrap answers 502 instead of the script's response."""
    script = write_cgi_script(tmp_path, "app.cgi", "cases:ignores_body")
    body = os.urandom(1 << 20)
    extra = [("CONTENT_LENGTH", str(len(body)))] if content_length else []
    out, err, send_error = fcgi_request(
        fcgiwrap, fcgiwrap_params(script, "/app.cgi", "", "POST", extra), body)
    assert split_cgi(out) == (200, {"content-type": "text/plain"},
                              b"answered without reading the body\n"), \
        (out[:300], err, send_error)
    assert not send_error


@pytest.mark.parametrize("stdin", ["pipe", "devnull", "socketpair"])
def test_outside_cgi_fd0_not_listening_without_gateway_interface_exits_2(tmp_path,
                                                                         stdin):
    """As from a terminal: fd 0 open but not a listening socket (a pipe kept open, so
    a runner that went on to read a body to its end would hang; /dev/null; a connected
    socket), and no GATEWAY_INTERFACE, though the other CGI variables are there: that
    one decides. The runner refuses at once and writes no response."""
    write_app(tmp_path, "cases", CASES)
    keep = []
    if stdin == "pipe":
        r, w = os.pipe()
        keep += [r, w]
        fd0 = r
    elif stdin == "devnull":
        fd0 = os.open(os.devnull, os.O_RDONLY)
        keep.append(fd0)
    else:
        a, b = socket.socketpair()
        keep += [a.detach(), b.detach()]
        fd0 = keep[0]
    try:
        env = cgi_env()
        assert "GATEWAY_INTERFACE" not in env
        proc = subprocess.Popen(
            [sys.executable, "-m", "spawnd.wsgi.main", "--chdir", str(tmp_path),
             "cases:marked"], stdin=fd0, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"still running after 30s: {out[:200]!r} {err[-500:]!r}")
    finally:
        for fd in keep:
            os.close(fd)
    text = err.decode("utf-8", "replace")
    assert proc.returncode == 2, (proc.returncode, out[:200], text)
    assert "GATEWAY_INTERFACE" in text and text.startswith("spawnd-wsgi: error:"), text
    assert out == b""
    assert not (tmp_path / "called").exists()


def test_cgi_mode_404_outside_the_prefix_drains_the_body(tmp_path, fcgiwrap):
    script = write_cgi_script(tmp_path, "app.cgi", "cases:marked", "--script-name", "/mnt")
    body = os.urandom(1 << 20)
    out, err, _ = fcgi_request(fcgiwrap, fcgiwrap_params(
        script, "/app.cgi", "/x", "POST", [("CONTENT_LENGTH", str(len(body)))]), body)
    assert out.startswith(b"Status: 404 Not Found\r\n"), (out[:300], err)
    assert not (tmp_path / "called").exists()
