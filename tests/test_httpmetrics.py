"""spawnd.httpmetrics on a real Loop: scraped with urllib/http.client and raw sockets,
the body checked with prometheus_client's parser."""
from __future__ import annotations

import concurrent.futures
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spawnd import config as configmod
from spawnd.httpmetrics import CONTENT_TYPE, MAX_HEAD, MetricsServer
from spawnd.listen import ListenError
from spawnd.metrics import exposition
from spawnd.supervisor import Loop, Supervisor
from support.proc import run_until

SAMPLE = """\
# HELP spawnd_pool_up 1 when the pool runs all its desired children
# TYPE spawnd_pool_up gauge
spawnd_pool_up{pool="php"} 1
spawnd_pool_up{pool="we\\"ird\\\\name"} 0
# HELP spawnd_child_cpu_seconds_total CPU time of the child's process tree
# TYPE spawnd_child_cpu_seconds_total counter
spawnd_child_cpu_seconds_total{pool="php",pid="42"} 1.25
"""


# ---- helpers ---------------------------------------------------------------------------
@pytest.fixture
def pool():
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        yield ex


class Harness:
    """A MetricsServer on a Loop run by the test thread; clients run in worker threads."""

    def __init__(self, pool, render=lambda: SAMPLE, **kw):
        self.loop = Loop()
        self._wake = socket.socketpair()        # a finished worker wakes the loop
        self.loop.add_reader(self._wake[0].fileno(), lambda _m: self._wake[0].recv(64))
        self.pool = pool
        self.text = render
        self.server = MetricsServer(self.loop, "127.0.0.1", 0, lambda: self.text(), **kw)
        self.server.open()
        self.base = f"http://127.0.0.1:{self.server.port}"

    def call(self, fn, *args, timeout=10.0):
        """Run fn(*args) in a worker while the loop serves; return its result."""
        future = self.pool.submit(fn, *args)
        future.add_done_callback(self._wake_up)
        run_until(self.loop, future.done, timeout, f"{getattr(fn, '__name__', fn)}{args}")
        return future.result()

    def _wake_up(self, _future) -> None:
        try:
            self._wake[1].send(b".")
        except OSError:         # the harness is closed already (a test failed)
            pass

    def raw(self, data: bytes, timeout=10.0) -> bytes:
        """Send data on a fresh connection and read until the server closes it."""
        def exchange():
            with socket.create_connection(("127.0.0.1", self.server.port), timeout=5) as c:
                c.sendall(data)
                out = b""
                while chunk := c.recv(65536):
                    out += chunk
                return out
        return self.call(exchange, timeout=timeout)

    def close(self):
        self.server.close()
        self.loop.remove_reader(self._wake[0].fileno())
        for s in self._wake:
            s.close()
        assert not self.loop.selector.get_map(), "the server left fds registered"
        self.loop.selector.close()


@pytest.fixture
def harness(pool):
    h = Harness(pool)
    try:
        yield h
    finally:
        h.close()


def get(url, method="GET"):
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers), e.read()


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


# ---- scraping ------------------------------------------------------------------------
def test_scrape_parses_as_prometheus_text(harness):
    status, headers, body = harness.call(get, harness.base + "/metrics")
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE
    assert headers["Connection"] == "close"
    assert int(headers["Content-Length"]) == len(body)
    fams = families(body.decode())
    assert fams["spawnd_pool_up"].type == "gauge"
    assert [(s.labels, s.value) for s in fams["spawnd_pool_up"].samples] == \
        [({"pool": "php"}, 1.0), ({"pool": 'we"ird\\name'}, 0.0)]
    cpu = fams["spawnd_child_cpu_seconds"]           # the parser drops _total
    assert cpu.type == "counter" and cpu.samples[0].value == 1.25


def test_scrape_of_a_real_supervisor_exposition(pool, tmp_path):
    """The daemon's own exposition (a supervisor with a bound pool, no children yet)."""
    cfg = tmp_path / "spawnd.yaml"
    cfg.write_text(f"pools:\n  php:\n    command: [/bin/true]\n"
                   f"    listen: unix:{tmp_path / 'php.sock'}\n    user: nobody\n")
    sup = Supervisor(configmod.load(str(cfg)), str(cfg))
    assert sup.bind_all() == []
    h = Harness(pool, render=lambda: exposition(sup))
    try:
        status, _, body = h.call(get, h.base + "/metrics")
        assert status == 200
        fams = families(body.decode())
        assert [s.labels for s in fams["spawnd_pool_desired_children"].samples] == \
            [{"pool": "php"}]
        assert fams["spawnd_pool_running_children"].samples[0].value == 0
    finally:
        h.close()
        for p in sup.pools.values():
            p.bound.close()


def test_head_query_string_and_render_each_time(harness):
    n = iter(range(100))
    harness.text = lambda: f"# TYPE scrapes_total counter\nscrapes_total {next(n)}\n"
    status, headers, body = harness.call(get, harness.base + "/metrics", "HEAD")
    assert (status, body) == (200, b"")
    assert int(headers["Content-Length"]) == len("# TYPE scrapes_total counter\nscrapes_total 0\n")
    _, _, body = harness.call(get, harness.base + "/metrics?name[]=x")
    assert families(body.decode())["scrapes"].samples[0].value == 1


def test_wrong_path_and_method(harness):
    status, _, body = harness.call(get, harness.base + "/")
    assert status == 404 and b"/metrics" in body
    reply = harness.raw(b"HEAD /nothing HTTP/1.1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 404 ") and reply.endswith(b"\r\n\r\n"), reply
    status, _, _ = harness.call(get, harness.base + "/metrics/x")
    assert status == 404
    status, headers, _ = harness.call(get, harness.base + "/metrics", "POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, _ = harness.call(get, harness.base + "/metrics", "DELETE")
    assert status == 405


def test_render_failure_is_a_500_and_the_server_lives_on(harness):
    def broken():
        raise RuntimeError("boom")
    harness.text = broken
    status, _, body = harness.call(get, harness.base + "/metrics")
    assert status == 500 and b"failed" in body
    harness.text = lambda: SAMPLE
    assert harness.call(get, harness.base + "/metrics")[0] == 200


@pytest.mark.parametrize("request_bytes,status", [
    (b"garbage\r\n\r\n", 400),
    (b"GET /metrics\r\n\r\n", 400),
    (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET /met\x01rics HTTP/1.1\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\n : empty name\r\n\r\n", 400),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
    (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"x" * MAX_HEAD + b"\r\n\r\n", 431),
    (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"x" * (4 * MAX_HEAD), 431),  # no end at all
    (b"GET /metrics HTTP/1.0\n\n", 200),                       # bare LF, HTTP/1.0
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 405),
])
def test_bad_and_odd_requests(harness, request_bytes, status):
    reply = harness.raw(request_bytes)
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"Connection: close" in head
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert len(body) == length
    assert harness.call(get, harness.base + "/metrics")[0] == 200


def test_client_that_leaves_early_costs_nothing(harness):
    for partial in (b"", b"GET /metr"):
        with socket.create_connection(("127.0.0.1", harness.server.port)) as c:
            c.sendall(partial)
            run_until(harness.loop, lambda: len(harness.server.connections) == 1, 5,
                      "the server to accept")
        run_until(harness.loop, lambda: not harness.server.connections, 5,
                  "the server to drop the connection")
    assert harness.call(get, harness.base + "/metrics")[0] == 200


def test_silent_client_does_not_block_others_and_is_dropped_at_timeout(pool):
    h = Harness(pool, timeout=0.4)
    try:
        silent = socket.create_connection(("127.0.0.1", h.server.port))
        half = socket.create_connection(("127.0.0.1", h.server.port))
        half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")        # never finished
        opened = time.monotonic()
        with silent, half:
            for _ in range(5):
                assert h.call(get, h.base + "/metrics")[0] == 200
            assert time.monotonic() - opened < 0.4, "the scrapes waited for the silent ones"
            # The scrapes' connections go when the server reads their EOF; the silent stay.
            run_until(h.loop, lambda: len(h.server.connections) == 2, 0.3,
                      "only the two silent connections to remain")

            def closed_by_server(c):
                c.settimeout(5)
                return c.recv(1)
            assert h.call(closed_by_server, silent) == b""
            assert h.call(closed_by_server, half) == b""
            waited = time.monotonic() - opened
            assert 0.35 <= waited <= 0.6, f"dropped after {waited:.3f}s, timeout 0.4s"
            assert not h.server.connections
    finally:
        h.close()


def test_slow_reader_of_a_large_body_does_not_block_others(pool):
    big = "".join(f'big{{n="{i}"}} {i}\n' for i in range(200_000))      # ~3.5 MB
    h = Harness(pool, render=lambda: big)
    try:
        slow = socket.socket()
        with slow:
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # before connect
            slow.connect(("127.0.0.1", h.server.port))
            slow.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            # The server fills the socket buffers and waits; meanwhile others are served.
            run_until(h.loop, lambda: any(c.out for c in h.server.connections), 5,
                      "the server to have unsent output for the slow reader")
            status, _, body = h.call(get, h.base + "/metrics")
            assert status == 200 and len(body) == len(big)

            def read_all():
                out = b""
                slow.settimeout(5)
                while chunk := slow.recv(65536):
                    out += chunk
                return out
            reply = h.call(read_all)
        assert reply.endswith(big[-100:].encode()) and len(reply) > len(big)
    finally:
        h.close()


def test_connection_limit_queues_the_rest_in_the_backlog(pool):
    h = Harness(pool, timeout=0.3, max_connections=2)
    try:
        a = socket.create_connection(("127.0.0.1", h.server.port))
        b = socket.create_connection(("127.0.0.1", h.server.port))
        with a, b:
            run_until(h.loop, lambda: len(h.server.connections) == 2, 5, "two connections")
            started = time.monotonic()
            assert h.call(get, h.base + "/metrics")[0] == 200
            waited = time.monotonic() - started
            assert 0.25 <= waited <= 1.0, f"third client waited {waited:.3f}s (timeout 0.3s)"
    finally:
        h.close()


def test_port_in_use_is_a_clear_error(harness):
    other = MetricsServer(harness.loop, "127.0.0.1", harness.server.port, lambda: "")
    with pytest.raises(ListenError, match=r"metrics: cannot listen on 127\.0\.0\.1:\d+: "
                                          "Address already in use"):
        other.open()


def test_ipv6(pool):
    h = Harness(pool)
    h.server.close()
    h.server = MetricsServer(h.loop, "::1", 0, lambda: SAMPLE)
    try:
        h.server.open()
    except ListenError as exc:
        h.close()
        pytest.skip(f"no IPv6 loopback: {exc}")
    try:
        status, _, body = h.call(get, f"http://[::1]:{h.server.port}/metrics")
        assert status == 200 and families(body.decode())
    finally:
        h.close()


OUT_OF_FDS = r'''
import os, resource, sys, time
from spawnd.httpmetrics import MetricsServer
from spawnd.supervisor import Loop

loop = Loop()
server = MetricsServer(loop, "127.0.0.1", 0, lambda: "up 1\n")
server.open()
print(server.port, flush=True)
sys.stdin.readline()                                # a client waits in the backlog now
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
open_now = len(os.listdir("/proc/self/fd")) - 1     # listdir's own fd is gone again
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now, hard))
cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
end = time.monotonic() + 1.0                        # a fixed window to measure CPU in
loop.call_later(1.0, lambda: None)
while time.monotonic() < end:
    loop.run_once()
cpu = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu0
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print(f"cpu {cpu:.3f}", flush=True)
seen = False
deadline = time.monotonic() + 10
loop.call_later(10, lambda: None)
while time.monotonic() < deadline and not (seen and not server.connections):
    loop.run_once()
    seen = seen or bool(server.connections)
print("served" if seen else "never accepted", flush=True)
'''


def test_out_of_fds_pauses_accepting_instead_of_spinning(tmp_path):
    """EMFILE from accept leaves the listening socket readable: the loop must stop
    watching it for a while (and log once), not spin at 100% CPU logging each time."""
    script = tmp_path / "out_of_fds.py"
    script.write_text(OUT_OF_FDS)
    errfile = tmp_path / "err.txt"
    with open(errfile, "wb") as err:
        proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        port = int(proc.stdout.readline())
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        cpu = float(proc.stdout.readline().split()[1])
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        client.close()
        assert proc.stdout.readline().strip() == "served"
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    warnings = errfile.read_text().count("metrics: accept failed")
    assert cpu < 0.2, f"{cpu:.2f} s of CPU in 1 s while out of fds: spinning"
    assert warnings == 1, errfile.read_text()[:2000]
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"up 1\n"), answer
