"""spawnd.probe against real FastCGI servers, driven by a real spawnd.supervisor.Loop."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import psutil
import pytest

from spawnd.probe import Probe
from spawnd.supervisor import Loop
from support import hangfcgi
from support.proc import run_until

# Answers 200 only when the CGI parameters are what a web server sends for
# GET /ping?x=1 (plus X_EXTRA from the probe's params); else "500 bad NAME=value".
PHP_PING = r"""<?php
if (isset($_GET['code'])) { http_response_code((int)$_GET['code']); exit; }
$want = ['REQUEST_METHOD' => 'GET', 'REQUEST_URI' => '/ping?x=1', 'QUERY_STRING' => 'x=1',
         'PATH_INFO' => '/ping', 'SCRIPT_NAME' => '', 'SERVER_PROTOCOL' => 'HTTP/1.1',
         'GATEWAY_INTERFACE' => 'CGI/1.1', 'REMOTE_ADDR' => '127.0.0.1',
         'SERVER_NAME' => 'probe.example', 'X_EXTRA' => 'yes'];
foreach ($want as $k => $v) {
    $got = $_SERVER[$k] ?? '(unset)';
    if ($got !== $v) { header("Status: 500 bad $k=$got"); exit; }
}
if (!ctype_digit($_SERVER['SERVER_PORT'] ?? '')) { header("Status: 500 bad SERVER_PORT"); exit; }
echo "pong\n";
"""


# ---- helpers ---------------------------------------------------------------------------
class Result:
    """Collects on_done calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, str, float]] = []

    def __call__(self, ok, detail, latency) -> None:
        self.calls.append((ok, detail, latency))

    @property
    def one(self) -> tuple[bool, str, float]:
        assert len(self.calls) == 1, f"on_done called {len(self.calls)} times: {self.calls}"
        return self.calls[0]


def probe(loop, address, uri="/", params=None, timeout=5.0, expect=200) -> Result:
    """Start one probe and run the loop until it reports."""
    result = Result()
    p = Probe(loop, address, uri, params, timeout=timeout, expect=expect, on_done=result)
    p.start()
    run_until(loop, lambda: result.calls, timeout + 5, f"probe of {address}{uri}")
    assert not loop.selector.get_map(), "the probe left an fd registered"
    return result


@pytest.fixture
def loop():
    lp = Loop()
    try:
        yield lp
    finally:
        lp.selector.close()


def unix_listener(path, backlog=128) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(backlog)
    return s


def tcp_listener(host="127.0.0.1", backlog=128) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.bind((host, 0))
    s.listen(backlog)
    return s


@pytest.fixture
def hang(tmp_path):
    """hangfcgi on a Unix socket; yields (address, trigger path)."""
    trigger = tmp_path / "hold"
    with unix_listener(tmp_path / "hang.sock") as listener:
        proc = hangfcgi.start(listener, "--trigger", str(trigger))
    try:
        yield f"unix:{tmp_path / 'hang.sock'}", trigger
    finally:
        hangfcgi.stop(proc)


@pytest.fixture
def php(tmp_path):
    """php-cgi on 127.0.0.1 (fd 0 = its listening socket, as spawnd runs it);
    yields (address, SCRIPT_FILENAME of a ping script)."""
    if not shutil.which("php-cgi"):
        pytest.fail("php-cgi is not installed (scripts/setup --test installs it)")
    script = tmp_path / "ping.php"
    script.write_text(PHP_PING)
    with tcp_listener() as listener:
        port = listener.getsockname()[1]
        proc = subprocess.Popen(["php-cgi"], stdin=listener, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL,
                                env={"PATH": os.environ["PATH"], "PHP_FCGI_CHILDREN": "0"})
    try:
        yield f"tcp:127.0.0.1:{port}", str(script)
    finally:
        proc.kill()
        proc.wait(10)


# ---- answers --------------------------------------------------------------------------
def test_php_answers_200_with_uri_and_params(loop, php):
    address, script = php
    ok, detail, latency = probe(loop, address, "/ping?x=1",
                                {"SCRIPT_FILENAME": script, "X_EXTRA": "yes",
                                 "SERVER_NAME": "probe.example"}).one
    assert (ok, detail) == (True, "200 OK")
    assert 0 < latency < 5


def test_expect_mismatch_and_match(loop, php):
    address, script = php
    ok, detail, _ = probe(loop, address, "/nothing.php",
                          {"SCRIPT_FILENAME": script + ".missing"}).one
    assert not ok and detail == "status 404 Not Found, expected 200", detail
    ok, detail, _ = probe(loop, address, "/ping?code=503", {"SCRIPT_FILENAME": script}).one
    assert not ok and detail.startswith("status 503"), detail
    ok, detail, _ = probe(loop, address, "/x", {"SCRIPT_FILENAME": script + ".missing"},
                          expect=404).one
    assert (ok, detail) == (True, "404 Not Found")


def test_fcgiwrap_unix(loop, tmp_path):
    if not shutil.which("fcgiwrap"):
        pytest.fail("fcgiwrap is not installed (scripts/setup --test installs it)")
    script = tmp_path / "ping.cgi"
    script.write_text('#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n'
                      'path=%s query=%s\\n" "$PATH_INFO" "$QUERY_STRING"\n')
    script.chmod(0o755)
    with unix_listener(tmp_path / "cgi.sock") as listener:
        proc = subprocess.Popen(["fcgiwrap"], stdin=listener, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={"PATH": os.environ["PATH"]})
    try:
        ok, detail, _ = probe(loop, f"unix:{tmp_path / 'cgi.sock'}", "/ping.cgi?a=b",
                              {"SCRIPT_FILENAME": str(script)}).one
        assert (ok, detail) == (True, "200 OK")
    finally:
        proc.kill()
        proc.wait(10)


def test_ipv6_address(loop, tmp_path):
    try:
        listener = tcp_listener("::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with listener:
        proc = hangfcgi.start(listener)
        port = listener.getsockname()[1]
    try:
        ok, detail, _ = probe(loop, f"tcp:[::1]:{port}", "/status?code=204", expect=204).one
        assert (ok, detail) == (True, "204 No Content")
    finally:
        hangfcgi.stop(proc)


# ---- failures -------------------------------------------------------------------------
def test_refused_addresses(loop, tmp_path):
    with tcp_listener() as gone:                 # bound, then closed: nothing listens
        port = gone.getsockname()[1]
    ok, detail, latency = probe(loop, f"tcp:127.0.0.1:{port}").one
    assert not ok and detail == "connect: Connection refused", detail
    assert latency < 1
    ok, detail, _ = probe(loop, f"unix:{tmp_path / 'absent.sock'}").one
    assert not ok and detail == "connect: No such file or directory", detail
    stale = socket.socket(socket.AF_UNIX)        # bound but not listening: a stale file
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    ok, detail, _ = probe(loop, f"unix:{tmp_path / 'stale.sock'}").one
    assert not ok and detail == "connect: Connection refused", detail


def test_full_unix_queue_fails_at_once(loop, tmp_path):
    """A non-blocking connect to a Unix listener whose queue is full fails with EAGAIN."""
    with unix_listener(tmp_path / "full.sock", backlog=0):
        fillers = []
        try:
            while True:
                c = socket.socket(socket.AF_UNIX)
                c.setblocking(False)
                fillers.append(c)
                if c.connect_ex(str(tmp_path / "full.sock")):
                    break
            ok, detail, latency = probe(loop, f"unix:{tmp_path / 'full.sock'}").one
        finally:
            for c in fillers:
                c.close()
    assert (ok, detail) == (False, "connect: the listen queue is full")
    assert latency < 0.5


def test_on_done_never_runs_inside_start(loop, tmp_path):
    result = Result()
    p = Probe(loop, f"unix:{tmp_path / 'absent.sock'}", on_done=result)
    p.start()
    assert result.calls == []
    run_until(loop, lambda: result.calls, 5, "the deferred report")
    assert not result.one[0]


def test_timeout_on_a_hanging_child(loop, hang):
    address, _ = hang
    ok, detail, latency = probe(loop, address, "/hang", timeout=0.3).one
    assert not ok and detail == "timed out after 0.3s waiting for the response", detail
    assert abs(latency - 0.3) <= 0.05, latency


def test_timeout_while_the_child_holds_on_the_trigger(loop, hang):
    address, trigger = hang
    trigger.touch()
    ok, detail, latency = probe(loop, address, "/", timeout=0.2).one
    assert not ok and "timed out" in detail and abs(latency - 0.2) <= 0.05, (detail, latency)
    trigger.unlink()
    ok, detail, _ = probe(loop, address, "/").one
    assert (ok, detail) == (True, "200 OK")


def test_timeout_while_connecting_to_a_full_queue(loop, tmp_path):
    """A TCP listener with a full accept queue drops the SYN: the connect never ends."""
    with tcp_listener(backlog=0) as listener:
        address = f"tcp:127.0.0.1:{listener.getsockname()[1]}"
        fillers = []
        try:
            for _ in range(8):       # backlog 0 queues 1; later SYNs are dropped
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(listener.getsockname())
                fillers.append(c)
            ok, detail, latency = probe(loop, address, timeout=0.3).one
        finally:
            for c in fillers:
                c.close()
    assert not ok and detail.startswith("timed out after 0.3s"), detail
    assert abs(latency - 0.3) <= 0.05, latency


def _garbage_server(loop, listener, reply: bytes):
    """Answers every connection on listener with reply, then closes it (on the loop)."""
    def on_accept(_mask):
        conn, _ = listener.accept()
        conn.sendall(reply)
        conn.close()
    listener.setblocking(False)
    loop.add_reader(listener.fileno(), on_accept)


def test_protocol_error_and_early_close(loop, tmp_path):
    cases = [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "protocol error: unsupported FastCGI version 72"),
        (b"", "connection closed before the answer was complete"),
        (b"\x01\x06\x00\x01\x00\x10\x00\x00abc",    # a STDOUT record cut short
         "protocol error: connection closed inside a record (11 bytes of it received)"),
        (b"\x01\x06\x00\x01\x00\x05\x03\x00hello\0\0\0"         # STDOUT, no header end
         b"\x01\x06\x00\x01\x00\x00\x00\x00\x01\x03\x00\x01\x00\x08\x00\x00" + bytes(8),
         "response: no blank line after the CGI response headers"),
        (b"\x01\x03\x00\x01\x00\x08\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00",
         "the application refused the request (OVERLOADED)"),
    ]
    for i, (reply, expected) in enumerate(cases):
        with unix_listener(tmp_path / f"g{i}.sock") as listener:
            _garbage_server(loop, listener, reply)
            result = Result()
            Probe(loop, f"unix:{tmp_path / f'g{i}.sock'}", on_done=result).start()
            run_until(loop, lambda: result.calls, 5, f"probe of garbage server {i}")
            loop.remove_reader(listener.fileno())
        ok, detail, _ = result.one
        assert not ok and detail == expected, (i, detail)
    assert not loop.selector.get_map()


def test_cancel_releases_everything_and_reports_nothing(loop, hang):
    address, _ = hang
    result = Result()
    p = Probe(loop, address, "/hang", timeout=0.1, on_done=result)
    p.start()
    assert len(loop.selector.get_map()) == 1
    p.cancel()
    assert not loop.selector.get_map()
    fired = []
    loop.call_later(0.2, fired.append, True)           # past the probe's timeout
    run_until(loop, lambda: fired, 5, "the marker timer")
    assert result.calls == []


def test_bad_addresses_are_refused_at_once(loop):
    for bad in ("tcp:localhost:9000", "http://x", "unix:", "tcp:127.0.0.1:0"):
        with pytest.raises(ValueError, match="address"):
            Probe(loop, bad)


def test_many_probes_at_once_on_one_loop(loop, tmp_path, php):
    """40 probes on a busy child, a hung one and a refused one all run together: the
    hung one does not delay the others and each reports exactly once."""
    php_address, script = php
    with unix_listener(tmp_path / "fast.sock") as fast_l, \
            unix_listener(tmp_path / "stuck.sock") as stuck_l:
        fast, stuck = hangfcgi.start(fast_l), hangfcgi.start(stuck_l)
    try:
        results: dict[str, Result] = {}
        specs = [(f"fast{i}", f"unix:{tmp_path / 'fast.sock'}", f"/n{i}", None, 5.0)
                 for i in range(40)]
        specs += [(f"php{i}", php_address, "/ping?code=200", {"SCRIPT_FILENAME": script}, 5.0)
                  for i in range(10)]
        specs += [("stuck", f"unix:{tmp_path / 'stuck.sock'}", "/hang", None, 1.0),
                  ("refused", f"unix:{tmp_path / 'absent.sock'}", "/", None, 5.0)]
        started = time.monotonic()
        for name, address, uri, params, timeout in specs:
            results[name] = Result()
            Probe(loop, address, uri, params, timeout=timeout,
                  on_done=results[name]).start()
        others = [r for n, r in results.items() if n != "stuck"]
        run_until(loop, lambda: all(r.calls for r in others), 5, "the quick probes")
        quick = time.monotonic() - started
        assert results["stuck"].calls == [], \
            f"the quick probes took {quick:.3f}s, longer than the hung probe's timeout"
        run_until(loop, lambda: results["stuck"].calls, 5, "the hung probe's timeout")
        for name, r in results.items():
            ok, detail, _ = r.one
            if name == "stuck":
                assert not ok and "timed out" in detail
            elif name == "refused":
                assert not ok and detail.startswith("connect:")
            else:
                assert (ok, detail) == (True, "200 OK"), (name, detail)
        assert not loop.selector.get_map()
    finally:
        hangfcgi.stop(fast)
        hangfcgi.stop(stuck)


def test_hangfcgi_slow_alloc_and_status(loop, tmp_path):
    """The test child's other knobs, driven by probes: /slow waits, /alloc keeps real
    memory (RSS grows), /status?code=N answers N."""
    with unix_listener(tmp_path / "h.sock") as listener:
        proc = hangfcgi.start(listener)
    address = f"unix:{tmp_path / 'h.sock'}"
    try:
        ok, detail, latency = probe(loop, address, "/slow?ms=200").one
        assert ok and 0.2 <= latency < 0.5, (detail, latency)
        before = psutil.Process(proc.pid).memory_info().rss
        for _ in range(2):
            assert probe(loop, address, "/alloc?mb=40").one[0]
        grown = psutil.Process(proc.pid).memory_info().rss - before
        assert grown >= 80 << 20, f"RSS grew by {grown >> 20} MiB, expected >= 80"
        ok, detail, _ = probe(loop, address, "/status?code=418", expect=418).one
        assert ok, detail
    finally:
        hangfcgi.stop(proc)
