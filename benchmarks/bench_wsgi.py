#!/usr/bin/env python3
"""WSGI benchmark: spawnd-wsgi, flup and uWSGI behind nginx, side by side (issue 3, "Measure").

One run: nginx (1 worker) -> Unix socket -> one process of each WSGI server, all running
the same application (benchmarks/apps/benchapp.py), plus nginx answering by itself as the
upper bound:

  spawnd-wsgi  spawnd -c CONFIG, one pool of 1 child: spawnd-wsgi benchapp:application
  flup         spawn-fcgi -s SOCK -n -- PYTHON benchmarks/apps/flup_app.py
               (flup's threaded WSGIServer on fd 0)
  uWSGI        uwsgi --plugin python3 --fastcgi-socket SOCK --processes 1 (1 thread)
  floor        PYTHON benchmarks/apps/floor_fcgi.py SOCK: the least a pure-Python FastCGI
               WSGI responder must do, with none of a real server's duties beyond
               sharing its listening socket safely (how fast a Python server can be at
               all; see its docstring)
  nginx        return 200 "hello" / a static 64 KiB file / return 200 after reading the body

spawnd-wsgi and flup run on the same interpreter (this script's: the project venv's).
Load is `wrk -t1 -c16 -dDURATION` per case and server. Every server's answer to every case
is checked (status and body) through nginx before anything is measured. The whole set of
cases is repeated --rounds times (the servers of one case back to back, in an order that
rotates from round to round) and the median is reported. Then system calls per request
are counted for each server with `strace -c -f -p PID` while a small client sends a fixed
number of requests through nginx.

Run as root (nginx runs its worker as root here, to reach the sockets; strace attaches to
the servers). Prints a markdown report on stdout; progress on stderr. See benchmarks/wsgi.md.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
APPS = os.path.join(HERE, "apps")
sys.path.insert(0, APPS)

import benchapp  # noqa: E402

PYTHON = sys.executable
VENV_BIN = os.path.dirname(PYTHON)
SPAWND = os.path.join(VENV_BIN, "spawnd")
SPAWND_WSGI = os.path.join(VENV_BIN, "spawnd-wsgi")
NGINX = "/usr/sbin/nginx"
CLK_TCK = os.sysconf("SC_CLK_TCK")
POST_BODY = b"x" * (1 << 20)          # what apps/post.lua sends
POST_ANSWER = b"%d" % len(POST_BODY)
POST_CRC_ANSWER = b"%d %08x" % (len(POST_BODY), zlib.crc32(POST_BODY))


# ---- small helpers -----------------------------------------------------------------------

from _common import first_line  # noqa: E402

def progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def wait_until(predicate, timeout: float, what: str):
    """Poll predicate() (OSError counts as "not yet") until truthy; fail saying what was seen."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = predicate()
        except OSError as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(0.005)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (including exited ones)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(x) for x in f.read().split()]
    return found


def stop_process(proc: subprocess.Popen | None, sig=signal.SIGTERM, timeout=10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def unix_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
    return True


# ---- the servers -------------------------------------------------------------------------

class Server:
    """One WSGI server process on a Unix socket in the work directory."""
    name = key = "?"

    def __init__(self, workdir: str):
        self.dir = workdir
        self.sock = os.path.join(workdir, f"{self.key}.sock")
        self.proc: subprocess.Popen | None = None
        self.log = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def serving_pid(self) -> int:
        """The pid of the process that runs the application."""
        return self.proc.pid

    def start(self) -> "Server":
        self.log = open(os.path.join(self.dir, f"{self.key}.log"), "ab")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log, cwd=self.dir)

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}; "
                                   f"its log:\n{self.log_text()}")
            return unix_answers(self.sock) and self.serving_pid()
        wait_until(up, 30, f"{self.name} to listen on {self.sock}")
        return self

    def stop(self) -> None:
        self.terminate()
        self.proc = None
        if self.log:
            self.log.close()
            self.log = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)      # spawn-fcgi leaves its socket behind

    def terminate(self) -> None:
        stop_process(self.proc)

    def log_text(self) -> str:
        with open(os.path.join(self.dir, f"{self.key}.log"), errors="replace") as f:
            return f.read()[-3000:]


class SpawndWsgi(Server):
    name, key = "spawnd-wsgi", "spawnd"

    def argv(self):
        config = os.path.join(self.dir, "spawnd.yaml")
        with open(config, "w") as f:
            f.write(f"spawnd:\n"
                    f"  admin_socket: {self.dir}/admin.sock\n"
                    f"pools:\n"
                    f"  bench:\n"
                    f"    command: [{SPAWND_WSGI}, --chdir, {APPS}, benchapp:application]\n"
                    f"    listen: unix:{self.sock}\n"
                    f"    processes: 1\n"
                    f"    user: root\n")   # as the others: all run as root here
        return [SPAWND, "-c", config]

    def serving_pid(self):
        kids = children(self.proc.pid)
        return kids[0] if len(kids) == 1 else None


class Flup(Server):
    name, key = "flup", "flup"

    def argv(self):
        return ["spawn-fcgi", "-s", self.sock, "-n", "--", PYTHON,
                os.path.join(APPS, "flup_app.py")]


class Uwsgi(Server):
    name, key = "uWSGI", "uwsgi"

    def argv(self):
        # One process, uWSGI's default of one thread (no --threads, no --enable-threads),
        # no master; request logging off (the others do not log requests either).
        return ["uwsgi", "--plugin", "python3", "--fastcgi-socket", self.sock,
                "--processes", "1", "--disable-logging", "--die-on-term",
                "--chdir", APPS, "--module", "benchapp:application"]

    def terminate(self):
        stop_process(self.proc, signal.SIGINT)


class Floor(Server):
    name, key = "Python floor", "floor"

    def argv(self):
        return [PYTHON, os.path.join(APPS, "floor_fcgi.py"), self.sock]


SERVERS = [SpawndWsgi, Flup, Uwsgi, Floor]
NGINX_COL = "nginx"


# ---- nginx -------------------------------------------------------------------------------

class Nginx:
    """nginx with one worker; per server two locations: /KEY/close/ (a connection per
    request) and /KEY/keep/ (fastcgi_keep_conn on + upstream keepalive 16); /static/ is
    nginx answering alone."""

    def __init__(self, workdir: str, servers: list[Server]):
        self.dir = os.path.join(workdir, "nginx")
        os.makedirs(os.path.join(self.dir, "temp"))
        with open(os.path.join(self.dir, "big"), "wb") as f:
            f.write(benchapp.BIG)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        upstreams, locations = [], []
        for srv in servers:
            upstreams.append(f"upstream {srv.key}_keep {{ server unix:{srv.sock}; "
                             f"keepalive 16; keepalive_requests 1000000; }}")
            for mode, target in (("close", f"unix:{srv.sock}"), ("keep", f"{srv.key}_keep")):
                keep = "fastcgi_keep_conn on;" if mode == "keep" else ""
                locations.append(f"""
        location /{srv.key}/{mode}/ {{
            fastcgi_split_path_info ^(/{srv.key}/{mode})(/.*)$;
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_NAME $fastcgi_script_name;
            fastcgi_param PATH_INFO $fastcgi_path_info;
            {keep}
            fastcgi_pass {target};
        }}""")
        temp = os.path.join(self.dir, "temp")
        self.conf = os.path.join(self.dir, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(f"""
daemon off;
master_process on;
worker_processes 1;
user root;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_max_body_size 2m;
    client_body_buffer_size 2m;
    fastcgi_buffer_size 16k;
    fastcgi_buffers 16 16k;
    client_body_temp_path {temp}/body;
    fastcgi_temp_path {temp}/fastcgi;
    proxy_temp_path {temp}/proxy;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    {chr(10).join(upstreams)}
    server {{
        listen 127.0.0.1:{self.port};
        location = /static/hello {{ default_type text/plain; return 200 "hello"; }}
        location = /static/big {{ default_type text/plain; alias {self.dir}/big; }}
        location = /static/post {{ default_type text/plain; return 200 "hello"; }}
        {"".join(locations)}
    }}
}}
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Nginx":
        check = subprocess.run([NGINX, "-t", "-q", "-c", self.conf], capture_output=True,
                               text=True)
        if check.returncode:
            raise RuntimeError(f"nginx rejected its config: {check.stderr}")
        self.proc = subprocess.Popen([NGINX, "-c", self.conf], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: "
                                   f"{self.error_log()}")
            socket.create_connection(("127.0.0.1", self.port), 0.5).close()
            return len(children(self.proc.pid)) == 1
        try:
            wait_until(up, 10, "nginx to listen with its one worker")
        except BaseException:
            self.stop()
            raise
        return self

    def worker_pid(self) -> int:
        return children(self.proc.pid)[0]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def error_log(self) -> str:
        with contextlib.suppress(FileNotFoundError), \
                open(os.path.join(self.dir, "error.log"), errors="replace") as f:
            return f.read()[-3000:]
        return ""

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGQUIT)

    def __enter__(self) -> "Nginx":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- cases -------------------------------------------------------------------------------

class Case:
    def __init__(self, name, app_path, mode, static, expect, script=None):
        self.name, self.app_path, self.mode = name, app_path, mode
        self.static, self.expect, self.script = static, expect, script

    def path(self, column: str) -> str:
        if column == NGINX_COL:
            return self.static
        return f"/{column}/{self.mode}{self.app_path}"

    @property
    def method(self):
        return "POST" if self.script else "GET"


CASES = {
    "hello": Case("hello, connection per request", "/hello", "close", "/static/hello",
                  benchapp.HELLO),
    "hello-keep": Case("hello, fastcgi_keep_conn", "/hello", "keep", "/static/hello",
                       benchapp.HELLO),
    "big": Case("64 KiB response", "/big", "close", "/static/big", benchapp.BIG),
    "big-keep": Case("64 KiB response, keep_conn", "/big", "keep", "/static/big",
                     benchapp.BIG),
    "post": Case("1 MiB POST", "/post", "close", "/static/post", POST_ANSWER,
                 os.path.join(APPS, "post.lua")),
    "post-keep": Case("1 MiB POST, keep_conn", "/post", "keep", "/static/post",
                      POST_ANSWER, os.path.join(APPS, "post.lua")),
}
DEFAULT_CASES = "hello,hello-keep,big-keep,post-keep"


def fetch(port: int, method: str, path: str, conn=None) -> tuple[int, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        body = POST_BODY if method == "POST" else None
        conn.request(method, path, body=body,
                     headers={"Content-Type": "application/octet-stream"} if body else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        if own:
            conn.close()


def check_answer(nginx: Nginx, case: Case, column: str) -> None:
    """Every column must answer every case correctly (twice: a reused upstream connection
    must work too) before anything is measured."""
    checks = [(case.path(column), case.expect)] * 2
    if column == NGINX_COL and case.script:
        checks = [(case.path(column), b"hello")]
    elif case.script:       # also: every byte of the body arrived (CRC-32)
        checks.append((case.path(column) + "?crc", POST_CRC_ANSWER))
    for path, want in checks:
        status, body = fetch(nginx.port, case.method, path)
        if status != 200 or body != want:
            raise RuntimeError(f"{column} answers {path} wrongly: {status} "
                               f"{body[:80]!r}... ({len(body)} bytes), want 200 "
                               f"{want[:80]!r} ({len(want)} bytes)\n{nginx.error_log()}")


WRK_RATE = re.compile(r"Requests/sec:\s+([\d.]+)")
WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(\w+),")
WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
WRK_SOCKERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def run_wrk(url: str, seconds: float, connections: int, script: str | None,
            pids: list[int]) -> dict:
    """wrk -t1 -cN -dS URL; returns req/s, request count, errors and the CPU seconds the
    processes `pids` used meanwhile."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s"]
    if script:
        argv += ["-s", script]
    cpu0 = [cpu_seconds(p) for p in pids]
    out = subprocess.run(argv + [url], capture_output=True, text=True, timeout=seconds + 60)
    cpu1 = [cpu_seconds(p) for p in pids]
    m = WRK_RATE.search(out.stdout)
    total = WRK_TOTAL.search(out.stdout)
    if out.returncode or not m or not total:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout}{out.stderr}")
    non2xx = WRK_NON2XX.search(out.stdout)
    sockerr = WRK_SOCKERR.search(out.stdout)
    errors = (int(non2xx.group(1)) if non2xx else 0) + \
        (sum(map(int, sockerr.groups())) if sockerr else 0)
    return {"rps": float(m.group(1)), "requests": int(total.group(1)), "errors": errors,
            "cpu": [b - a for a, b in zip(cpu0, cpu1)], "raw": out.stdout}


# ---- system calls per request ------------------------------------------------------------

def count_syscalls(nginx: Nginx, case: Case, column: str, pid: int, requests: int,
                   workdir: str) -> tuple[float, list[tuple[str, int]]]:
    """strace -c -f -p PID while `requests` requests go through nginx one after another
    on one keep-alive HTTP connection: (calls per request, [(syscall, calls)] top ones)."""
    out = os.path.join(workdir, f"strace-{column}-{case.mode}.txt")
    err = os.path.join(workdir, f"strace-{column}-{case.mode}.err")
    with open(err, "wb") as errf:
        st = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=errf)
    try:
        def attached():
            if st.poll() is not None:
                raise RuntimeError(f"strace exited: {open(err).read()}")
            with open(err) as f:     # "Process PID attached [with N threads]"
                return " attached" in f.read()
        wait_until(attached, 10, f"strace to attach to {pid}")
        conn = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=10)
        try:
            for _ in range(requests):
                status, body = fetch(nginx.port, case.method, case.path(column), conn)
                if status != 200 or body != case.expect:
                    raise RuntimeError(f"{column}: wrong answer under strace: {status}")
        finally:
            conn.close()
    finally:
        st.send_signal(signal.SIGINT)
        try:
            st.wait(10)
        except subprocess.TimeoutExpired:
            st.kill()
            st.wait()
    calls, total = [], None
    with open(out) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[3].isdigit():
                if parts[-1] == "total":
                    total = int(parts[3])
                else:
                    calls.append((parts[-1], int(parts[3])))
    if total is None:
        raise RuntimeError(f"no strace summary in {out}: {open(out).read()}")
    calls.sort(key=lambda c: -c[1])
    return total / requests, calls


# ---- the run -----------------------------------------------------------------------------

def machine_load(seconds: float = 1.0) -> str:
    """Load average and the share of CPU time others used over `seconds`, before we start."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    t0, idle0 = snap()
    time.sleep(seconds)
    t1, idle1 = snap()
    busy = 100 * (1 - (idle1 - idle0) / max(1, t1 - t0))
    la = os.getloadavg()
    return f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}, CPU busy {busy:.0f}% over {seconds:g}s"


def versions() -> str:
    first = first_line
    import flup  # noqa: F401
    from importlib.metadata import version
    return "; ".join([first([NGINX, "-v"]), f"uWSGI {first(['uwsgi', '--version'])}",
                      f"flup {version('flup')}", f"Python {platform.python_version()}",
                      first(["wrk", "--version"]).split(" [")[0]])


def fmt_rate(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f}" if values else "n/a"


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="short run: 3 s per measurement, 1 round, 500 requests under strace")
    ap.add_argument("--duration", type=float, help="seconds per wrk run (default 10)")
    ap.add_argument("--rounds", type=int, help="repeats of the whole set (default 3)")
    ap.add_argument("--connections", type=int, default=16, help="wrk -c (default 16)")
    ap.add_argument("--cases", default=DEFAULT_CASES,
                    help=f"comma-separated, of {','.join(CASES)} (default {DEFAULT_CASES})")
    ap.add_argument("--strace-requests", type=int, help="requests per strace count (2000)")
    ap.add_argument("--no-strace", action="store_true", help="skip the system-call counts")
    ap.add_argument("--keep-workdir", action="store_true",
                    help="leave the temporary directory (configs, logs, strace output)")
    args = ap.parse_args(argv)
    duration = args.duration or (3.0 if args.quick else 10.0)
    rounds = args.rounds or (1 if args.quick else 3)
    strace_n = args.strace_requests or (500 if args.quick else 2000)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    cases = [CASES[c] for c in args.cases.split(",")]
    if os.geteuid() != 0:
        ap.error("run as root (nginx's worker runs as root to reach the sockets; strace)")
    for tool in ("wrk", "uwsgi", "spawn-fcgi", "strace", NGINX, SPAWND, SPAWND_WSGI):
        if not shutil.which(tool):
            ap.error(f"{tool} not found (apt-get install wrk uwsgi uwsgi-plugin-python3 "
                     f"spawn-fcgi strace nginx-light; the venv needs spawnd and flup)")
    sys.stdout.reconfigure(line_buffering=True)

    workdir = tempfile.mkdtemp(prefix="bench-wsgi-")
    try:
        load_before = machine_load()
        servers = [cls(workdir) for cls in SERVERS]
        with Nginx(workdir, servers).start() as nginx:
            return run(args, nginx, servers, cases, duration, rounds, strace_n, workdir,
                       load_before)
    finally:
        if args.keep_workdir:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def fresh(servers: list[Server]):
    """Start every server anew, yield {key: pid of the process running the application},
    stop them all (also on failure). Each case gets new processes, so no case inherits
    another's state (the allocator's, above all: see benchmarks/wsgi.md)."""
    with contextlib.ExitStack() as stack:
        for srv in servers:
            stack.callback(srv.stop)
            srv.start()
        yield {srv.key: srv.serving_pid() for srv in servers}


def run(args, nginx, servers, cases, duration, rounds, strace_n, workdir, load_before) -> int:
    columns = [s.key for s in servers] + [NGINX_COL]
    names = {s.key: s.name for s in servers} | {NGINX_COL: "nginx alone"}
    worker = nginx.worker_pid()
    results = {(c.name, col): [] for c in cases for col in columns}
    loads = []
    for r in range(rounds):
        loads.append(os.getloadavg()[0])
        for case in cases:
            with fresh(servers) as pids:
                for col in columns:
                    check_answer(nginx, case, col)
                for col in columns:         # warm-up, not measured
                    run_wrk(nginx.url(case.path(col)), 1, args.connections, case.script, [])
                order = columns[r % len(columns):] + columns[:r % len(columns)]
                for col in order:
                    watched = [pids[col], worker] if col in pids else [worker]
                    res = run_wrk(nginx.url(case.path(col)), duration, args.connections,
                                  case.script, watched)
                    results[(case.name, col)].append(res)
                    progress(f"round {r + 1}/{rounds} {case.name:28} {names[col]:12} "
                             f"{res['rps']:9,.0f} req/s  errors {res['errors']}")
                for col in columns:         # and still answers right afterwards
                    check_answer(nginx, case, col)

    print(f"# bench_wsgi: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} "
          f"CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"versions: {versions()}")
    print(f"load: `wrk -t1 -c{args.connections} -d{duration:g}s` per cell, median of "
          f"{rounds} round(s); before the run: {load_before}; 1-min load average at the "
          f"start of each round: {', '.join(f'{x:.2f}' for x in loads)}\n")

    def med(case, col, key="rps"):
        return statistics.median(x[key] for x in results[(case.name, col)])

    header = ["case", *(names[c] for c in columns), "spawnd-wsgi / uWSGI",
              "spawnd-wsgi / flup", "spawnd-wsgi / floor", "floor / uWSGI",
              "spawnd-wsgi % of nginx alone"]
    rows = []
    for case in cases:
        cells = []
        for col in columns:
            errors = sum(x["errors"] for x in results[(case.name, col)])
            cells.append(f"{med(case, col):,.0f}" + (f" ({errors} errors)" if errors else ""))
        s, u, f, p, n = (med(case, c) for c in ("spawnd", "uwsgi", "flup", "floor",
                                                NGINX_COL))
        rows.append([case.name, *cells, ratio(s, u), ratio(s, f), ratio(s, p), ratio(p, u),
                     f"{100 * s / n:.0f}%"])
    print("## Requests per second (median)\n")
    print(table(header, rows))

    print("\n## CPU time per request, µs (median; server process / nginx worker)\n")
    rows = []
    for case in cases:
        cells = []
        for col in columns:
            per = [[c / x["requests"] * 1e6 for c in x["cpu"]]
                   for x in results[(case.name, col)]]
            if col != NGINX_COL:
                cells.append(f"{statistics.median(p[0] for p in per):.0f} / "
                             f"{statistics.median(p[1] for p in per):.0f}")
            else:
                cells.append(f"- / {statistics.median(p[0] for p in per):.0f}")
        rows.append([case.name, *cells])
    print(table(["case", *(names[c] for c in columns)], rows))

    print("\n## Each round (req/s)\n")
    rows = [[case.name, names[col], *(f"{x['rps']:,.0f}" for x in results[(case.name, col)])]
            for case in cases for col in columns]
    print(table(["case", "server", *(f"round {i + 1}" for i in range(rounds))], rows))

    if not args.no_strace:
        print(f"\n## System calls per request (strace -c -f -p PID, {strace_n} sequential "
              f"requests through nginx on one keep-alive HTTP connection)\n")
        rows = []
        for case in (CASES["hello"], CASES["hello-keep"]):
            for srv in servers:
                progress(f"strace {srv.name} {case.name}")
                with fresh([srv]) as pids:
                    check_answer(nginx, case, srv.key)
                    per, calls = count_syscalls(nginx, case, srv.key, pids[srv.key],
                                                strace_n, workdir)
                top = ", ".join(f"{name} {n / strace_n:.2f}" for name, n in calls
                                if n / strace_n >= 0.05)
                rows.append([case.name, srv.name, f"{per:.1f}", top])
        print(table(["case", "server", "calls / request", "per request, by call"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
