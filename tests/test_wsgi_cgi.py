"""spawnd-wsgi's CGI mode under real CGI servers: fcgiwrap, and Python's http.server."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys

import pytest

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
