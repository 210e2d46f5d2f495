"""spawnd-wsgi behind a real nginx, with a wsgiref.validate-wrapped application."""
from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import os
import urllib.parse

import pytest

from support.nginx import start_nginx
from test_wsgi_support import Runner, wait_until, write_app

VALIDATED = r'''
import hashlib, json, os, warnings
from wsgiref.validate import validator, WSGIWarning
warnings.simplefilter("error", WSGIWarning)

PATTERN = bytes(range(256)) * 4096          # 1 MiB

def inner(environ, start_response):
    path = environ["PATH_INFO"]
    if path.endswith("/big"):
        mib = int(environ["QUERY_STRING"] or "1")
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(mib << 20))])
        return (PATTERN for _ in range(mib))
    stream = environ["wsgi.input"]
    digest, size, lines = hashlib.sha256(), 0, 0
    first = stream.readline(100)            # mix readline and read(n)
    digest.update(first); size += len(first)
    while True:
        chunk = stream.read(65536)
        if not chunk:
            break
        digest.update(chunk); size += len(chunk)
    info = {k: v for k, v in environ.items() if isinstance(v, str)}
    info.update(body_size=size, body_sha256=digest.hexdigest(),
                multithread=environ["wsgi.multithread"],
                multiprocess=environ["wsgi.multiprocess"],
                terminated=environ.get("wsgi.input_terminated"),
                pid=os.getpid())
    body = json.dumps(info).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]

application = validator(inner)
'''


@pytest.fixture
def appdir(tmp_path):
    write_app(tmp_path, "validated", VALIDATED)
    return tmp_path


def location(sock: str, path: str = "/", extra: str = "", upstream: str | None = None) -> str:
    return f"""
        location {path} {{
            include /etc/nginx/fastcgi_params;
            {extra}
            fastcgi_pass {upstream or 'unix:' + sock};
        }}"""


def request(ngx, method, path, body=None, headers=None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", ngx.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {},
                     encode_chunked=headers is not None and
                     headers.get("Transfer-Encoding") == "chunked")
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def info(ngx, method="GET", path="/", **kw) -> dict:
    status, _, body = request(ngx, method, path, **kw)
    assert status == 200, (status, body[:500], ngx.error_log()[-2000:])
    return json.loads(body)


@pytest.fixture
def served(appdir):
    """validated app at / (plain fastcgi_params) on one runner with 2 threads."""
    with Runner(appdir, "validated", "--threads", "2") as r, \
            start_nginx(appdir, location(r.path), user="root") as ngx:
        yield r, ngx
        _no_upstream_trouble(ngx)


def test_get_head_post_and_environ(served):
    r, ngx = served
    env = info(ngx, path="/a/b?x=1&y=%20z")
    assert env["SCRIPT_NAME"] == "" and env["PATH_INFO"] == "/a/b"
    assert env["QUERY_STRING"] == "x=1&y=%20z" and env["REQUEST_METHOD"] == "GET"
    assert env["wsgi.url_scheme"] == "http" and env["multithread"] is True
    assert env["multiprocess"] is False        # --bind: this runner is alone
    assert env["terminated"] is True and env["body_size"] == 0
    assert "CONTENT_LENGTH" not in env and "HTTP_CONTENT_LENGTH" not in env
    status, headers, body = request(ngx, "HEAD", "/head")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    payload = b"line one\nline two\n" + os.urandom(200_000)
    env = info(ngx, "POST", "/post", body=payload,
               headers={"Content-Type": "application/x-thing"})
    assert env["CONTENT_LENGTH"] == str(len(payload))
    assert env["CONTENT_TYPE"] == "application/x-thing"
    assert "HTTP_CONTENT_TYPE" not in env
    assert env["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert "error" not in r.stderr().lower(), r.stderr()


def test_unicode_percent_encoded_paths_duplicates_and_cookies(served):
    r, ngx = served
    env = info(ngx, path="/h%C3%A9llo%20w%C3%B6rld/%2Fx?q=%C3%A9")
    # nginx decodes and normalises the path (merge_slashes on): "/%2Fx" becomes "/x"
    assert env["PATH_INFO"].encode("latin-1").decode("utf-8") == "/héllo wörld/x"
    assert env["QUERY_STRING"] == "q=%C3%A9"
    assert env["REQUEST_URI"] == "/h%C3%A9llo%20w%C3%B6rld/%2Fx?q=%C3%A9"
    conn = http.client.HTTPConnection("127.0.0.1", ngx.port, timeout=10)
    conn.putrequest("GET", "/dup")
    for name, value in [("X-Dup", "a"), ("X-Dup", "b"), ("Cookie", "c1=1"),
                        ("Cookie", "c2=2")]:
        conn.putheader(name, value)
    conn.endheaders()
    env = json.loads(conn.getresponse().read())
    conn.close()
    assert env["HTTP_X_DUP"] == "a, b"
    assert env["HTTP_COOKIE"] == "c1=1; c2=2"


def test_prefix_mounts(appdir):
    split = """
            fastcgi_split_path_info ^(/split)(/.*)$;
            fastcgi_param SCRIPT_NAME $fastcgi_script_name;
            fastcgi_param PATH_INFO $fastcgi_path_info;"""
    with Runner(appdir, "validated") as plain, \
            Runner(appdir, "validated", "--script-name", "/pre",
                   sock_path=str(appdir / "pre.sock")) as pre, \
            start_nginx(appdir, location(plain.path, "/split/", extra=split)
                        + location(pre.path, "/pre/"), user="root") as ngx:
        env = info(ngx, path="/split/x/y%20z?a=b")
        assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/split", "/x/y z")
        env = info(ngx, path="/pre/x/y%20z?a=b")
        assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/pre", "/x/y z")
        env = info(ngx, path="/pre/")
        assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/pre", "/")


def test_chunked_request_body_without_buffering(appdir):
    with Runner(appdir, "validated") as r, start_nginx(
            appdir, location(r.path, extra="fastcgi_request_buffering off;"),
            user="root") as ngx:
        parts = [os.urandom(50_000) for _ in range(7)]
        env = info(ngx, "POST", "/chunked", body=iter(parts),
                   headers={"Transfer-Encoding": "chunked"})
        assert "CONTENT_LENGTH" not in env and env["terminated"] is True
        assert env["body_size"] == sum(map(len, parts))
        assert env["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_200mib_upload_bounded_memory_and_50mib_download(appdir):
    with Runner(appdir, "validated") as r, start_nginx(
            appdir, location(r.path, extra="fastcgi_request_buffering off;")
            + "\n client_max_body_size 300m;", user="root") as ngx:
        before = _peak_rss_kib(r.proc.pid)
        chunk = os.urandom(1 << 20)
        env = info(ngx, "POST", "/upload", body=iter([chunk] * 200),
                   headers={"Transfer-Encoding": "chunked"}, timeout=120)
        assert env["body_size"] == 200 << 20
        assert env["body_sha256"] == hashlib.sha256(chunk * 200).hexdigest()
        grown = _peak_rss_kib(r.proc.pid) - before
        assert grown < 16 * 1024, f"peak RSS grew by {grown} KiB for a 200 MiB upload"
        conn = http.client.HTTPConnection("127.0.0.1", ngx.port, timeout=60)
        conn.request("GET", "/big?50")
        resp = conn.getresponse()
        digest, size = hashlib.sha256(), 0
        while data := resp.read(1 << 20):
            digest.update(data)
            size += len(data)
        conn.close()
        pattern = bytes(range(256)) * 4096
        assert size == 50 << 20
        assert digest.hexdigest() == hashlib.sha256(pattern * 50).hexdigest()
        grown = _peak_rss_kib(r.proc.pid) - before
        assert grown < 16 * 1024, f"peak RSS grew by {grown} KiB"


@pytest.mark.parametrize("threads", ["1", "3"])
def test_keepalive_upstream_more_clients_than_threads(appdir, threads):
    upstream = f"upstream wsgi {{ server unix:{appdir}/app.sock; keepalive 16; }}"
    with Runner(appdir, "validated", "--threads", threads) as r, start_nginx(
            appdir, location(r.path, extra="fastcgi_keep_conn on;", upstream="wsgi"),
            http_conf=upstream, user="root") as ngx:
        def one(n):
            return info(ngx, path=f"/ka/{n}", timeout=10)["PATH_INFO"]
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            got = list(pool.map(one, range(240)))
        assert got == [f"/ka/{n}" for n in range(240)]
        # the runner kept connections open (keep-alive really in use)
        fds = os.listdir(f"/proc/{r.proc.pid}/fd")
        assert len(fds) > 6, fds
        _no_upstream_trouble(ngx)


FAILING = r'''
import os

class Endless:
    """An endless body whose close() leaves a mark."""
    def __iter__(self):
        while True:
            yield b"x" * 65536
    def close(self):
        with open(os.environ["MARKER"], "a") as f:
            f.write("closed\n")

class DrainOnClose:
    """A 413 whose close() consumes the body it refused (a middleware habit)."""
    def __init__(self, environ):
        self.environ = environ
    def __iter__(self):
        yield b"too large"
    def close(self):
        self.environ["wsgi.input"].read()

def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/refuse":
        start_response("413 Payload Too Large", [("Content-Type", "text/plain")])
        return DrainOnClose(environ)
    if path == "/before":
        raise RuntimeError("boom before start_response")
    if path.startswith("/after"):
        headers = [("Content-Type", "text/plain")]
        if environ["QUERY_STRING"] == "length":
            headers.append(("Content-Length", "100000"))
        start_response("200 OK", headers)
        def body():
            yield b"partial " * 1000
            raise RuntimeError("boom after start_response")
        return body()
    if path == "/endless":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Endless()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"fine"]
'''


@pytest.mark.parametrize("query", ["", "length"])
def test_application_errors_and_client_abort_behind_nginx(tmp_path, query):
    """An error before start_response is a 500; after it, the client sees the response
    break off (not a complete one); a client that goes away mid-response has the result
    closed; the runner and nginx's upstream keep-alive pool go on serving."""
    write_app(tmp_path, "failing", FAILING)
    marker = tmp_path / "closed.txt"
    upstream = f"upstream wsgi {{ server unix:{tmp_path}/app.sock; keepalive 4; }}"
    with Runner(tmp_path, "failing", env={"MARKER": str(marker)}) as r, start_nginx(
            tmp_path, location(r.path, extra="fastcgi_keep_conn on;", upstream="wsgi"),
            http_conf=upstream, user="root") as ngx:
        assert request(ngx, "GET", "/ok")[2] == b"fine"
        status, _, body = request(ngx, "GET", "/before")
        assert status == 500 and body == b"Internal Server Error\n"
        wait_until(lambda: "boom before start_response" in r.stderr(), 5, "traceback")

        conn = http.client.HTTPConnection("127.0.0.1", ngx.port, timeout=10)
        conn.request("GET", "/after?" + query)
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead) as broken:
            resp.read()
        conn.close()
        assert broken.value.partial.startswith(b"partial ")
        wait_until(lambda: "boom after start_response" in r.stderr(), 5, "traceback")
        wait_until(lambda: "upstream prematurely closed" in ngx.error_log(), 5,
                   "nginx to log the broken-off response")

        conn = http.client.HTTPConnection("127.0.0.1", ngx.port, timeout=10)
        conn.request("GET", "/endless")
        resp = conn.getresponse()
        assert resp.status == 200 and len(resp.read(200_000)) == 200_000
        conn.close()                # the client goes away mid-response
        wait_until(lambda: marker.exists() and marker.read_text() == "closed\n", 10,
                   "the result's close() after the client went away")
        for _ in range(8):          # every kept upstream connection still good
            assert request(ngx, "GET", "/ok")[2] == b"fine"
        assert r.proc.poll() is None


@pytest.mark.parametrize("threads", ["1", "2"])
def test_a_body_drained_after_the_response_leaves_the_next_request_alone(tmp_path,
                                                                         threads):
    """The 413's close() reads wsgi.input after END_REQUEST went out: it must not take
    the next request nginx sends on the kept connection for more of that body (the
    request would be lost, and nginx answer 504 after fastcgi_read_timeout)."""
    write_app(tmp_path, "failing", FAILING)
    upstream = f"upstream wsgi {{ server unix:{tmp_path}/app.sock; keepalive 4; }}"
    with Runner(tmp_path, "failing", "--threads", threads) as r, start_nginx(
            tmp_path, location(r.path, extra="fastcgi_keep_conn on; "
                               "fastcgi_read_timeout 10s;", upstream="wsgi"),
            http_conf=upstream, user="root") as ngx:
        for _ in range(3):      # a body larger than the runner's first read (64 KiB)
            status, _, body = request(ngx, "POST", "/refuse", body=b"x" * (150 << 10))
            assert (status, body) == (413, b"too large")
            assert request(ngx, "GET", "/ok", timeout=5)[2] == b"fine", r.stderr()
        assert "Traceback" not in r.stderr(), r.stderr()


def _no_upstream_trouble(ngx):
    """nginx's error log shows no reset by, or premature close of, the runner."""
    bad = [line for line in ngx.error_log().splitlines()
           if "reset by peer" in line or "upstream prematurely closed" in line
           or "[error]" in line or "[crit]" in line]
    assert not bad, "\n".join(bad[:10])


def test_flask_app_behind_nginx(tmp_path):
    examples = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")
    with Runner(tmp_path, "flaskapp:app", "--chdir", examples, "--script-name", "/f",
                sock_path=str(tmp_path / "flask.sock")) as r, \
            start_nginx(tmp_path, location(r.path, "/f/"), user="root") as ngx:
        status, _, body = request(ngx, "GET", "/f/")
        assert status == 200 and body == b"Hello from Flask on spawnd-wsgi\n"
        status, _, body = request(ngx, "GET", "/f/hello/w%C3%B6rld")
        assert body.decode() == "Hello, wörld!\n"
        status, _, body = request(
            ngx, "POST", "/f/echo?k=v", body=urllib.parse.urlencode({"a": "1"}),
            headers={"Content-Type": "application/x-www-form-urlencoded"})
        got = json.loads(body)
        assert got["form"] == {"a": "1"} and got["args"] == {"k": "v"}
        assert got["script_root"] == "/f" and got["path"] == "/echo"
        assert request(ngx, "GET", "/f/nope")[0] == 404


def test_runner_on_fd0_restarted_behind_nginx_loses_no_request(appdir):
    """Sibling runners on one socket, one replaced while nginx keeps sending."""
    import socket
    path = str(appdir / "fd0.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(128)
    first = Runner(appdir, "validated", listener=listener)
    second = None
    with listener, first, start_nginx(appdir, location(path), user="root") as ngx:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(info, ngx, "GET", f"/r/{n}") for n in range(200)]
            wait_until(lambda: sum(f.done() for f in futures) > 20, 20, "some requests")
            second = Runner(appdir, "validated", listener=listener)
            assert first.stop() == 0
            results = [f.result()["PATH_INFO"] for f in futures]
        assert results == [f"/r/{n}" for n in range(200)]
        _no_upstream_trouble(ngx)
        second.stop()
