"""Health through the real daemon: probes, readiness, exact listen-queue depth,
queue-driven scaling and the Prometheus endpoint. Children are tests/support/hangfcgi.py,
a FastCGI program that can be made to hang, be slow or hold requests."""
from __future__ import annotations

import threading
import time
import urllib.request

import pytest

from spawnd.fastcgi.client import FastCGIError, request
from support import hangfcgi
from support.daemon import Spawnd, status
from support.proc import free_port, wait_for

pytestmark = pytest.mark.slow


def _pool(pub, public_python, name="app", listen=None, extra="", args=""):
    script = hangfcgi.install(str(pub))
    _, env = public_python
    listen = listen or f"unix:{pub}/{name}.sock"
    return f"""\
  {name}:
    command: [/usr/bin/python3, {script}{args}]
    listen: {listen}
    socket: {{mode: "0666"}}
    user: nobody
    env: {{PYTHONPATH: {env["PYTHONPATH"]}}}
{extra}"""


def _in_background(address, uri, timeout=30):
    """Send a request from a thread; returns the thread (its result is not needed)."""
    def go():
        try:
            request(address, uri, timeout=timeout)
        except (FastCGIError, OSError):
            pass
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_probe_detects_a_hang_and_the_pool_recovers(tmp_path, pub, public_python):
    cfg = "pools:\n" + _pool(pub, public_python, extra="""\
    processes: 2
    probe: {uri: /ping, interval: 200ms, timeout: 300ms, failures: 2}
    stop: {timeout: 1s}
""")
    address = f"unix:{pub}/app.sock"
    with Spawnd(tmp_path, cfg) as d:
        d.start()
        hung = d.wait_children("app", 2)
        wait_for(lambda: status(d, "app")["pools"][0]["health"] == "healthy",
                 what="first probe passing")
        for _ in hung:                      # each child takes one /hang and stays stuck
            _in_background(address, "/hang", timeout=60)
        d.wait_line("app: unhealthy after 2 failed probes", timeout=10)
        d.wait_line("app: healthy again", timeout=15)
        wait_for(lambda: (lambda c: c if len(c) == 2 and not set(c) & set(hung) else None)(
            d.children("app")), timeout=10, what="both stuck children replaced")
        p = status(d, "app")["pools"][0]
        assert p["health"] == "healthy" and p["replacements"]["probe"] == 2, p
        assert p["probe"]["ok"] and p["probe"]["latency"] < 0.3
        # Every request that arrives after the recovery is served.
        for i in range(30):
            assert request(address, f"/r{i}", timeout=5).status == 200
        assert d.stop() == 0


def test_a_probe_expecting_the_wrong_status_is_visible(tmp_path, pub, public_python):
    cfg = "pools:\n" + _pool(pub, public_python, extra="""\
    probe: {uri: /status?code=503, interval: 100ms, timeout: 1s, failures: 2}
""")
    with Spawnd(tmp_path, cfg) as d:
        d.start()
        wait_for(lambda: status(d, "app")["pools"][0]["health"] == "unhealthy",
                 what="pool marked unhealthy")
        p = status(d, "app")["pools"][0]
        assert p["probe"]["ok"] is False and "503" in p["probe"]["detail"], p["probe"]
        human = d.output()
        assert "app: probe /status?code=503 failed" in human
        assert d.stop() == 0


def test_readiness_waits_for_accept_and_a_probe(tmp_path, pub, public_python):
    """A child that takes 1.5 s to start is 'starting' until it waits in accept() and a
    probe passes; one that never starts within start_timeout is a failure."""
    slow = pub / "slowstart.sh"
    script = hangfcgi.install(str(pub))
    slow.write_text(f"#!/bin/sh\nsleep 1.5\nexec /usr/bin/python3 {script}\n")
    slow.chmod(0o755)
    _, env = public_python
    cfg = f"""\
pools:
  slow:
    command: [{slow}]
    listen: unix:{pub}/slow.sock
    user: nobody
    env: {{PYTHONPATH: {env["PYTHONPATH"]}}}
    probe: {{uri: /ping, interval: 10s, ready: true, start_timeout: 5s}}
  never:
    command: [/bin/sleep, "60"]
    listen: unix:{pub}/never.sock
    user: nobody
    probe: {{uri: /ping, ready: true, start_timeout: 400ms}}
    backoff: {{initial: 5s}}
"""
    with Spawnd(tmp_path, cfg) as d:
        t0 = time.monotonic()
        d.start()
        [child] = d.wait_children("slow", 1)
        time.sleep(0.5)     # the state must still be 'starting' well into the 1.5 s start
        assert status(d, "slow")["pools"][0]["children"][0]["state"] == "starting"
        wait_for(lambda: status(d, "slow")["pools"][0]["state"] == "running", timeout=8,
                 what="slow child ready")
        assert time.monotonic() - t0 >= 1.5
        d.wait_line("never: child", timeout=5)
        d.wait_line("not ready after 400ms; killing it")
        assert status(d, "never")["pools"][0]["state"] == "backoff"
        assert d.stop() == 0


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_queue_depth_is_exact(tmp_path, pub, public_python, kind):
    trigger = pub / "hold"
    trigger.write_text("")
    listen = f"unix:{pub}/app.sock" if kind == "unix" else f"tcp:127.0.0.1:{free_port()}"
    cfg = "pools:\n" + _pool(pub, public_python, listen=listen, args=f", --trigger, {trigger}",
                             extra="    processes: 2\n    socket: {backlog: 64}\n"
                             if kind == "tcp" else "    processes: 2\n")
    if kind == "tcp":
        cfg = cfg.replace('    socket: {mode: "0666"}\n', "")
    cfg += "spawnd:\n  sample_interval: 1h\n"     # no periodic sample during the test
    with Spawnd(tmp_path, cfg) as d:
        d.start()
        pids = d.wait_children("app", 2)
        wait_for(lambda: status(d, "app")["pools"][0]["state"] == "running", what="running")
        for i in range(7):
            _in_background(listen, f"/q{i}")
        # Both children hold one request each; the other five wait in the kernel's queue.
        wait_for(lambda: sum(d.seen(f"app[{p}]: {p} /q") for p in pids) == 2,
                 what="both children holding a request")
        wait_for(lambda: status(d, "app")["pools"][0]["queue"]["depth"] == 5,
                 what="5 connections queued",)
        q = status(d, "app")["pools"][0]["queue"]
        assert q["depth"] == 5 and q["max"] >= 5 and q["backlog"] >= 64, q
        # status shows the live depth but is no sample: the rate counters are the
        # sample_interval timer's alone, and it has not fired yet (1h).
        assert (q["samples"], q["full"]) == (0, 0), q
        trigger.unlink()
        wait_for(lambda: status(d, "app")["pools"][0]["queue"]["depth"] == 0,
                 what="queue drained")
        assert d.stop() == 0


def test_scaling_grows_under_a_burst_and_shrinks_without_flapping(tmp_path, pub, public_python):
    cfg = "pools:\n" + _pool(pub, public_python, extra="""\
    processes: {min: 1, max: 6, interval: 100ms, idle_after: 1s}
    ready_after: 50ms
""")
    address = f"unix:{pub}/app.sock"
    with Spawnd(tmp_path, cfg) as d:
        d.start()
        d.wait_children("app", 1)
        results = []
        lock = threading.Lock()

        def one(i):
            try:
                r = request(address, f"/slow?ms=400&i={i}", timeout=30)
                ok = r.status == 200
            except (FastCGIError, OSError):
                ok = False
            with lock:
                results.append(ok)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        wait_for(lambda: len(d.children("app")) == 6, timeout=10, what="pool grown to max")
        for t in threads:
            t.join(60)
        assert results.count(True) == 40, results
        wait_for(lambda: len(d.children("app")) == 1, timeout=20, what="pool back to min")
        spawned = len(d.all_started("app"))
        assert spawned == 6, f"{spawned} spawns for a 1 -> 6 -> 1 burst: flapping"
        assert d.seen("scaling up") and d.seen("scaling down to 1")
        assert d.stop() == 0


def test_metrics_endpoint_parses_and_matches_status(tmp_path, pub, public_python):
    from prometheus_client.parser import text_string_to_metric_families
    port = free_port()
    cfg = f"spawnd:\n  metrics_listen: 127.0.0.1:{port}\npools:\n" + _pool(
        pub, public_python, extra="    processes: 3\n    probe: {uri: /ping, interval: 100ms}\n")
    with Spawnd(tmp_path, cfg) as d:
        d.start()
        wait_for(lambda: status(d, "app")["pools"][0]["health"] == "healthy", what="probe")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = r.read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}
        p = status(d, "app")["pools"][0]
        assert samples[("spawnd_pool_running_children", (("pool", "app"),))] == p["running"] == 3
        assert samples[("spawnd_pool_up", (("pool", "app"),))] == 1
        assert samples[("spawnd_pool_healthy", (("pool", "app"),))] == 1
        assert ("spawnd_pool_queue_depth", (("pool", "app"),)) in samples
        for c in p["children"]:
            assert samples[("spawnd_child_rss_bytes", (("pid", str(c["pid"])), ("pool", "app")))] > 0
        # A manual restart is counted by cause, and the retired children's exits by status.
        from support.daemon import ctl
        ctl(d, "restart", "app", check=0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}
        assert samples[("spawnd_pool_replacements_total",
                        (("cause", "manual"), ("pool", "app")))] == 3
        exits = sum(v for (name, _), v in samples.items() if name == "spawnd_pool_exits_total")
        assert exits == 3, text
        assert d.stop() == 0


def test_an_event_loop_runner_is_seen_waiting_and_busy(tmp_path, pub, public_python):
    """spawnd-wsgi waits in epoll_wait (on a set that watches fd 0), not in accept():
    probe.ready still sees it ready, and a runner inside a request is not idle."""
    from spawnd import health
    (pub / "loopapp.py").write_text(
        "import os, time\n"
        "def application(environ, start_response):\n"
        "    while environ['PATH_INFO'] == '/hold' and os.path.exists(" + repr(str(pub / "hold")) + "):\n"
        "        time.sleep(0.01)\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [b'pid=%d' % os.getpid()]\n")
    (pub / "hold").write_text("")
    python, env = public_python
    cfg = f"""\
pools:
  py:
    command: [{python}, -m, spawnd.wsgi.main, --chdir, {pub}, loopapp:application]
    listen: unix:{pub}/py.sock
    user: nobody
    env: {{PYTHONPATH: {env["PYTHONPATH"]}}}
    probe: {{uri: /ping, interval: 10s, ready: true, start_timeout: 10s}}
"""
    with Spawnd(tmp_path, cfg) as d:
        d.start()
        [pid] = d.wait_children("py", 1)
        wait_for(lambda: status(d, "py")["pools"][0]["state"] == "running", timeout=10,
                 what="the runner seen ready")
        assert health.group_idle([pid])
        held = _in_background(f"unix:{pub}/py.sock", "/hold")
        wait_for(lambda: not health.group_idle([pid]), what="the runner busy in /hold")
        (pub / "hold").unlink()
        held.join(10)
        wait_for(lambda: health.group_idle([pid]), what="the runner waiting again")
        assert d.stop() == 0
