"""The example front-end configs (examples/nginx, lighttpd, apache) in front of the example
pools (examples/pools), exactly as shipped except for paths.

The examples are written for a real host: sockets in /run/spawnd, PHP and CGI scripts in
/srv/www (served at /) and /srv/app (served at /app/), the C program in /usr/local/bin. The
tests copy examples/apps there — "there" being a public temporary directory — and rewrite
only those paths (and `spawnd-wsgi`, which becomes /usr/bin/python3 -m spawnd.wsgi.main on
a world-readable copy of spawnd, since the pools run as www-data). One spawnd runs every
example pool for the whole module; each test starts one front end with one example and
checks what the application saw: SCRIPT_NAME, PATH_INFO, QUERY_STRING, REQUEST_METHOD, a
request header, the request body, and which file ran.
"""
from __future__ import annotations

import contextlib
import glob
import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile

import psutil
import pytest
import yaml

from support.apache import start_apache
from support.daemon import Spawnd
from support.lighttpd import start_lighttpd
from support.nginx import start_nginx
from support.proc import free_port, wait_for

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
APPS = os.path.join(EXAMPLES, "apps")


# ---- deployment: the example pools under one spawnd -------------------------------------

class Deployment:
    """The example layout under a public temporary directory, and the rewriting of paths."""

    def __init__(self, root: str, hello_fcgi: str) -> None:
        self.root = root
        self.www = os.path.join(root, "www")
        self.app = os.path.join(root, "app")
        self.run = os.path.join(root, "run")
        self.conf = os.path.join(root, "conf")
        self.bin = os.path.join(root, "bin")
        for d in (self.www, self.app, self.run, self.conf, self.bin):
            os.makedirs(d)
        for name in ("env.php", "env.cgi", "envapp.py"):
            shutil.copy2(os.path.join(APPS, name), self.www)
        for name in ("env.php", "env.cgi"):
            shutil.copy2(os.path.join(APPS, name), self.app)
        shutil.copy2(os.path.join(EXAMPLES, "flaskapp.py"), self.www)
        shutil.copy2(hello_fcgi, self.bin)
        for dirpath, dirnames, filenames in os.walk(root):
            os.chmod(dirpath, 0o755)
            for f in filenames:
                p = os.path.join(dirpath, f)
                os.chmod(p, 0o755 if os.access(p, os.X_OK) else 0o644)
        self.paths = {
            "/run/spawnd": self.run,
            "/srv/www": self.www,
            "/srv/app": self.app,
            "/usr/local/bin/hello_fcgi": os.path.join(self.bin, "hello_fcgi"),
        }

    def rewrite(self, text: str) -> str:
        for old, new in self.paths.items():
            text = text.replace(old, new)
        return text

    def example(self, relpath: str, *, extra: dict[str, str] | None = None) -> str:
        """examples/RELPATH with deployment paths rewritten, written under conf/;
        returns the new file's path."""
        with open(os.path.join(EXAMPLES, relpath)) as f:
            text = self.rewrite(f.read())
        for old, new in (extra or {}).items():
            text = text.replace(old, new)
        out = os.path.join(self.conf, relpath.replace("/", "-"))
        with open(out, "w") as f:
            f.write(text)
        return out

    def pools(self, python: str, env: dict[str, str]) -> str:
        """Every examples/pools/*.yaml, rewritten into conf/pools.d/; returns the glob."""
        pools_d = os.path.join(self.conf, "pools.d")
        os.makedirs(pools_d)
        for path in sorted(glob.glob(os.path.join(EXAMPLES, "pools", "*.yaml"))):
            with open(path) as f:
                doc = yaml.safe_load(self.rewrite(f.read()))
            for pool in doc["pools"].values():
                if pool["command"][0] == "/usr/bin/spawnd-wsgi":
                    pool["command"][:1] = [python, "-m", "spawnd.wsgi.main"]
                    pool.setdefault("env", {}).update(
                        PYTHONPATH=env["PYTHONPATH"], PYTHONDONTWRITEBYTECODE="1")
            with open(os.path.join(pools_d, os.path.basename(path)), "w") as f:
                yaml.safe_dump(doc, f)
        return os.path.join(pools_d, "*.yaml")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, hello_fcgi, public_python):
    root = tempfile.mkdtemp(prefix="spawnd-frontends-", dir="/tmp")
    os.chmod(root, 0o755)
    try:
        dep = Deployment(root, hello_fcgi)
        include = dep.pools(*public_python)
        d = Spawnd(tmp_path_factory.mktemp("spawnd"), f"""\
            spawnd:
              include: {include}
              shutdown_timeout: 10s
            pools: {{}}
            """)
        with d:
            d.start()
            for pool in ("php", "cgi", "wsgi", "flask", "c"):
                d.wait_children(pool, 2)
            dep.spawnd = d
            yield dep
            assert d.stop() == 0, d.output()
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- front ends -------------------------------------------------------------------------

NGINX_FIXES = {"include fastcgi_params;": "include /etc/nginx/fastcgi_params;"}


@contextlib.contextmanager
def frontend(kind: str, program: str, dep: Deployment, directory):
    """Start `kind` serving examples/KIND/PROGRAM.conf; yields the server."""
    if kind == "nginx":
        site = dep.example(f"nginx/{program}.conf", extra=NGINX_FIXES)
        http = ""
        if os.path.exists(os.path.join(EXAMPLES, "nginx", f"{program}-upstream.conf")):
            http = f"include {dep.example(f'nginx/{program}-upstream.conf')};"
        server = start_nginx(directory, f"include {site};", http_conf=http, user="www-data")
    elif kind == "lighttpd":
        site = dep.example(f"lighttpd/{program}.conf")
        server = start_lighttpd(directory, f'include "{site}"', document_root=dep.www)
    else:
        site = dep.example(f"apache/{program}.conf")
        server = start_apache(directory, f'Include "{site}"', document_root=dep.www)
    with server:
        yield server


def request(server, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def parse_env(body: bytes) -> dict[str, str]:
    """NAME=value lines of env.php / env.cgi / envapp.py; `body=` takes the rest."""
    head, sep, rest = body.partition(b"body=")
    assert sep, f"no body= line in the application's answer: {body[:500]!r}"
    env = dict(line.split("=", 1) for line in head.decode("latin-1").splitlines())
    env["body"] = rest.decode("latin-1")
    return env


# What each program must see, per request path: (path, SCRIPT_NAME, PATH_INFO, file run).
ENV_CASES = {
    "php": [("/env.php/x/y", "/env.php", "/x/y", "www/env.php"),
            ("/env.php", "/env.php", "", "www/env.php"),
            ("/app/env.php/x/y", "/app/env.php", "/x/y", "app/env.php"),
            ("/app/env.php", "/app/env.php", "", "app/env.php")],
    "cgi": [("/env.cgi/x/y", "/env.cgi", "/x/y", "www/env.cgi"),
            ("/env.cgi", "/env.cgi", "", "www/env.cgi"),
            ("/app/env.cgi/x/y", "/app/env.cgi", "/x/y", "app/env.cgi"),
            ("/app/env.cgi", "/app/env.cgi", "", "app/env.cgi")],
    "wsgi": [("/x/y", "", "/x/y", "www/envapp.py"),
             ("/", "", "/", "www/envapp.py"),
             ("/app/x/y", "/app", "/x/y", "www/envapp.py"),
             ("/app/", "/app", "/", "www/envapp.py")],
}

FRONTENDS = ("nginx", "lighttpd", "apache")
FORM = b"greeting=hello+world&n=42"


def check_env(server, case, *, method: str) -> None:
    path, script_name, path_info, file = case
    body = FORM if method == "POST" else None
    headers = {"X-Spawnd-Test": "probe 1", "Content-Type": "application/x-www-form-urlencoded"}
    status, _, answer = request(server, method, f"{path}?a=1&b=two%20words", body, headers)
    assert status == 200, (path, status, answer[:500], server.error_log()[-2000:])
    env = parse_env(answer)
    seen = {k: env.get(k) for k in ("SCRIPT_NAME", "PATH_INFO", "QUERY_STRING",
                                    "REQUEST_METHOD", "HTTP_X_SPAWND_TEST", "FILE")}
    assert seen == {"SCRIPT_NAME": script_name, "PATH_INFO": path_info,
                    "QUERY_STRING": "a=1&b=two%20words", "REQUEST_METHOD": method,
                    "HTTP_X_SPAWND_TEST": "probe 1",
                    "FILE": os.path.join(server.deployment_root, file)}, (path, env)
    if method == "POST":
        assert (env["CONTENT_LENGTH"], env["body"]) == (str(len(FORM)), FORM.decode())
    else:
        assert env["body"] == ""


@pytest.mark.parametrize("program", sorted(ENV_CASES))
@pytest.mark.parametrize("kind", FRONTENDS)
def test_environ_at_root_and_prefix(kind, program, deployment, tmp_path):
    with frontend(kind, program, deployment, deployment.root) as server:
        server.deployment_root = deployment.root
        for case in ENV_CASES[program]:
            for method in ("GET", "POST"):
                check_env(server, case, method=method)


@pytest.mark.parametrize("kind", FRONTENDS)
def test_flask_at_a_prefix(kind, deployment):
    """Flask under /app: routing sees PATH_INFO, request.script_root is the prefix, and a
    form POST with a query string reaches the view."""
    with frontend(kind, "flask", deployment, deployment.root) as server:
        status, _, body = request(server, "GET", "/app/hello/you")
        assert (status, body) == (200, b"Hello, you!\n"), server.error_log()[-2000:]
        status, headers, body = request(server, "POST", "/app/echo?x=1&y=two",
                                        b"plain text body", {"Content-Type": "text/plain"})
        assert status == 200, (body[:500], server.error_log()[-2000:])
        assert json.loads(body) == {"method": "POST", "path": "/echo", "script_root": "/app",
                                    "args": {"x": "1", "y": "two"}, "form": {},
                                    "body": "plain text body"}
        status, _, _ = request(server, "GET", "/app/no-such-page")
        assert status == 404


HELLO_C = re.compile(rb"hello pid=(\d+) n=\d+ method=(\S+) query=(\S*) body=(\d+)\n")


@pytest.mark.parametrize("kind", FRONTENDS)
def test_c_libfcgi_program(kind, deployment):
    """The libfcgi program under /c/: method, query and the whole body arrive, and every
    answer comes from one of the pool's live children."""
    pids = set()
    with frontend(kind, "c", deployment, deployment.root) as server:
        for i in range(20):
            status, _, body = request(server, "POST", f"/c/x?i={i}", FORM,
                                      {"Content-Type": "application/x-www-form-urlencoded"})
            m = HELLO_C.fullmatch(body)
            assert status == 200 and m, (status, body, server.error_log()[-2000:])
            assert m.group(2, 3, 4) == (b"POST", f"i={i}".encode(), str(len(FORM)).encode())
            pids.add(int(m.group(1)))
    assert pids <= set(deployment.spawnd.children("c")), pids


# ---- spawnd as PID 1 (the container recipe in docs/many-hosts.md) -----------------------

def test_spawnd_as_pid_1_reaps_orphans_and_stops_on_term(tmp_path):
    """`unshare --pid --fork --mount-proc spawnd -c FILE` runs spawnd as PID 1 of a new PID
    namespace, as in a container. The pool's child leaves an orphan (a background process
    whose parent exited): it is adopted by spawnd, and when it exits it is reaped, not left
    a zombie. SIGTERM to PID 1 (what `docker stop` sends) stops the pool and spawnd exits 0,
    leaving no process in the namespace."""
    config = tmp_path / "spawnd.yaml"
    config.write_text(f"""\
spawnd: {{admin_socket: {tmp_path}/admin.sock, shutdown_timeout: 5s}}
pools:
  orphans:
    # The subshell starts `sleep 1.5` in the background and exits at once: an orphan.
    command: [/bin/sh, -c, "(sleep 1.5 &); exec sleep 600"]
    listen: unix:{tmp_path}/orphans.sock
    user: nobody
    processes: 1
    stop: {{when: now, timeout: 2s}}
""")
    unshare = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc",
         sys.executable, "-m", "spawnd.main", "-c", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        init = wait_for(lambda: psutil.Process(unshare.pid).children(), what="unshare's child")[0]
        nspid = wait_for(lambda: [line.split()[1:] for line in
                                  open(f"/proc/{init.pid}/status").read().splitlines()
                                  if line.startswith("NSpid:")][0], what="NSpid")
        assert nspid == [str(init.pid), "1"], f"spawnd is not PID 1 in its namespace: {nspid}"

        def orphan():
            return [p for p in init.children() if p.cmdline() == ["sleep", "1.5"]]
        [adopted] = wait_for(orphan, what="the orphaned `sleep 1.5` adopted by spawnd")
        # It exits after 1.5 s; then it must disappear, not stay a zombie of spawnd.
        def reaped():
            try:
                return adopted.status() != psutil.STATUS_ZOMBIE and not adopted.is_running()
            except psutil.NoSuchProcess:
                return True
        wait_for(reaped, timeout=5, what=f"orphan {adopted.pid} reaped (not a zombie)")
        [worker] = [p for p in init.children() if p.cmdline() == ["sleep", "600"]]

        init.send_signal(signal.SIGTERM)
        out, _ = unshare.communicate(timeout=15)
        assert unshare.returncode == 0, out.decode(errors="replace")
        assert not worker.is_running(), "the pool's child outlived spawnd"
    finally:
        if unshare.poll() is None:
            for p in psutil.Process(unshare.pid).children():
                p.kill()              # PID 1 of the namespace: takes every process in it
            unshare.kill()
            unshare.wait()


# ---- many hosts: nginx upstream over TCP, allowed_clients ---------------------------------

def raw_fcgi_get(port: int, source: str) -> bytes:
    """A bare FastCGI GET from the address `source`; everything received until the server
    closes the connection (b"" when it closes or resets it without answering)."""
    def record(rtype: int, content: bytes = b"") -> bytes:
        return struct.pack(">BBHHBx", 1, rtype, 1, len(content), 0) + content
    params = b"".join(bytes([len(k), len(v)]) + k + v for k, v in
                      ((b"REQUEST_METHOD", b"GET"), (b"QUERY_STRING", b"from=" + source.encode())))
    msg = (record(1, struct.pack(">HB5x", 1, 0)) + record(4, params) + record(4)
           + record(5))
    with socket.socket() as s:
        s.settimeout(5)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(msg)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:     # closed with our request unread: a reset
            pass
        return data


def test_nginx_upstream_across_two_spawnd_hosts_over_tcp(tmp_path, hello_fcgi):
    """Two spawnd instances ("hosts") each run the C program on a TCP socket with
    allowed_clients: [127.0.0.1]. nginx balances one upstream over both; a peer from
    another address (127.0.0.2) is turned away by the child (FCGI_WEB_SERVER_ADDRS)."""
    hosts = []
    with contextlib.ExitStack() as stack:
        for name in ("host1", "host2"):
            port = free_port()
            (tmp_path / name).mkdir()
            d = stack.enter_context(Spawnd(tmp_path / name, f"""\
                pools:
                  c:
                    command: [{hello_fcgi}]
                    listen: tcp:127.0.0.1:{port}
                    allowed_clients: [127.0.0.1]
                    user: nobody
                    processes: 2
                """))
            d.start()
            hosts.append((d, port, set(d.wait_children("c", 2))))
        upstream = " ".join(f"server 127.0.0.1:{port};" for _, port, _ in hosts)
        ngx = stack.enter_context(start_nginx(tmp_path, """
            location / {
                include /etc/nginx/fastcgi_params;
                fastcgi_pass spawnd_hosts;
            }""", http_conf=f"upstream spawnd_hosts {{ {upstream} }}"))
        served = set()
        for i in range(8):
            status, _, body = request(ngx, "GET", f"/?i={i}")
            m = HELLO_C.fullmatch(body)
            assert status == 200 and m, (status, body, ngx.error_log()[-2000:])
            served.add(int(m.group(1)))
        for _, _, children in hosts:
            assert served & children, f"no answer from {children}; served by {served}"

        port = hosts[0][1]
        assert b"query=from=127.0.0.1 " in raw_fcgi_get(port, "127.0.0.1")
        assert raw_fcgi_get(port, "127.0.0.2") == b"", "a peer not in allowed_clients was served"
        assert b"query=from=127.0.0.1 " in raw_fcgi_get(port, "127.0.0.1")
        for d, _, _ in hosts:
            assert d.stop() == 0
