"""Hostile or unlucky input that once crashed, hung or spun spawnd (found in review).
Each test is the reproduction; spawnd must survive, stay quiet and keep serving."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from support.daemon import Spawnd, ctl, status
from support.proc import cpu_ticks, wait_for


def _cgi(pub, name="w", extra=""):
    return f"""\
pools:
  {name}:
    command: [/usr/sbin/fcgiwrap]
    listen: unix:{pub}/{name}.sock
    user: nobody
{extra}"""


@pytest.mark.slow
def test_a_very_long_crash_loop_does_not_overflow_the_backoff(tmp_path, pub):
    with Spawnd(tmp_path, f"""\
pools:
  crash:
    command: [/bin/false]
    listen: unix:{pub}/c.sock
    user: nobody
    backoff: {{initial: 1ms, max: 1ms}}
""") as d:
        d.start()
        d.wait_line("crash: 1030 consecutive failure(s)", timeout=60)
        assert d.proc.poll() is None
        assert status(d, "crash")["pools"][0]["failures"] >= 1030
        assert d.stop() == 0


def test_deeply_nested_json_gets_an_error_reply(tmp_path, pub):
    with Spawnd(tmp_path, _cgi(pub)) as d:
        d.start()
        c = socket.socket(socket.AF_UNIX)
        c.connect(d.admin_socket)
        c.settimeout(10)
        c.sendall(b"[" * 60000 + b"\n")
        reply = json.loads(c.makefile("rb").readline())
        assert reply["ok"] is False and "bad request" in reply["error"]
        c.close()
        assert status(d, "w")["pools"][0]["name"] == "w"


def test_nul_in_the_config_is_refused_by_check(tmp_path, pub):
    d = Spawnd(tmp_path, _cgi(pub, extra='    env: {A: "x\\0y"}\n'))
    rc = d.run_to_exit(args=["-t"])
    assert rc == 1 and f"{d.config_path}:6: pools.w.env.A: a NUL character is not allowed" \
        in d.output(), d.output()


def test_sighup_reload_that_cannot_apply_socket_settings_changes_nothing(tmp_path, pub):
    with Spawnd(tmp_path, _cgi(pub)) as d:
        d.start()
        [pid] = d.wait_children("w", 1)
        os.unlink(pub / "w.sock")           # somebody removed the socket file
        with open(d.config_path, "w") as f:
            f.write(_cgi(pub, extra='    socket: {mode: "0600"}\n'))
        d.signal(signal.SIGHUP)
        d.wait_line("reload failed, nothing changed")
        assert d.seen("the socket file is gone or was replaced")
        assert d.proc.poll() is None and d.children("w") == [pid]
        assert d.stop() == 0


def test_sighup_during_shutdown_is_ignored(tmp_path, pub, stubborn):
    cfg = f"""\
pools:
  s:
    command: [{stubborn}]
    listen: unix:{pub}/s.sock
    user: nobody
    stop: {{timeout: 1s}}
"""
    with Spawnd(tmp_path, cfg) as d:
        d.start()
        [pid] = d.wait_children("s", 1)
        d.wait_line(f"s[{pid}]: armed")
        with open(d.config_path, "w") as f:
            f.write(cfg + _cgi(pub, "extra").split("pools:\n", 1)[1])
        d.signal(signal.SIGTERM)
        d.wait_line("stopping 1 pool(s)")
        d.signal(signal.SIGHUP)
        assert d.proc.wait(10) == 0
        assert d.seen("SIGHUP ignored: shutting down")
        assert not d.seen("extra: started child")


def test_a_client_that_floods_and_never_reads_does_not_spin_or_bloat_spawnd(tmp_path, pub):
    with Spawnd(tmp_path, _cgi(pub)) as d:
        d.start()
        d.wait_children("w", 1)
        # 1: many requests it never reads replies to, then an over-long line.
        c = socket.socket(socket.AF_UNIX)
        c.connect(d.admin_socket)
        c.setblocking(False)
        data = b'{"cmd": "status"}\n' * 3000 + b"x" * 300000
        sent = 0
        deadline = time.monotonic() + 5
        while sent < len(data) and time.monotonic() < deadline:
            try:
                sent += c.send(data[sent:])
            except BlockingIOError:
                time.sleep(0.01)
        # 2: a follower that then sends 20 MB of junk.
        f = socket.socket(socket.AF_UNIX)
        f.connect(d.admin_socket)
        f.sendall(b'{"cmd": "logs", "args": {"pool": "w", "follow": true}}\n')
        f.setblocking(False)
        junk = b"y" * (1 << 20)
        for _ in range(20):
            try:
                f.send(junk)
            except BlockingIOError:
                break
        t0 = cpu_ticks(d.pid)
        time.sleep(1.0)     # CPU over a fixed window is what is measured here
        used = cpu_ticks(d.pid) - t0
        assert used <= 10, f"spawnd used {used} ticks in 1 s with idle stuck clients: spinning"
        assert psutil.Process(d.pid).memory_info().rss < 80 * 2**20
        assert status(d, "w")["pools"][0]["running"] == 1     # others are still served
        c.close()
        f.close()
        assert d.stop() == 0


def test_restart_never_then_start_brings_the_children_back(tmp_path, pub):
    with Spawnd(tmp_path, f"""\
pools:
  n:
    command: [/bin/sh, -c, "sleep 0.3"]
    listen: unix:{pub}/n.sock
    user: nobody
    processes: 2
    restart: never
""") as d:
        d.start()
        wait_for(lambda: status(d, "n")["pools"][0]["desired"] == 0, what="both exited")
        ctl(d, "stop", "n", check=0)
        r = json.loads(ctl(d, "start", "n", "--json").stdout)
        assert r["running"] == 2, r


def test_clean_exits_with_ready_after_zero_do_not_fork_loop(tmp_path, pub):
    with Spawnd(tmp_path, f"""\
pools:
  t:
    command: [/bin/true]
    listen: unix:{pub}/t.sock
    user: nobody
    ready_after: 0s
    backoff: {{initial: 100ms}}
""") as d:
        d.start()
        t0 = time.monotonic()
        wait_for(lambda: len(d.all_started("t")) >= 5, what="a few restarts")
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))  # count over one second
        n = len(d.all_started("t"))
        assert n <= 12, f"{n} starts in about 1 s: at most one per 100 ms is allowed"


def test_a_live_server_with_a_full_queue_is_in_use_not_a_hang(tmp_path):
    path = str(tmp_path / "full.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(0)
    clients = []
    for _ in range(3):                      # fill its queue (backlog 0 holds one)
        c = socket.socket(socket.AF_UNIX)
        c.setblocking(False)
        try:
            c.connect(path)
        except BlockingIOError:
            pass
        clients.append(c)
    try:
        d = Spawnd(tmp_path, f"""\
pools:
  f:
    command: [/usr/sbin/fcgiwrap]
    listen: unix:{path}
    user: nobody
""")
        t0 = time.monotonic()
        rc = d.run_to_exit(timeout=10)
        assert rc == 1 and "in use by a running server" in d.output(), d.output()
        assert time.monotonic() - t0 < 5
    finally:
        for c in clients:
            c.close()
        server.close()


def test_readding_a_pool_that_is_still_stopping_is_refused(tmp_path, pub, stubborn):
    slow = f"""\
  slow:
    command: [{stubborn}]
    listen: unix:{pub}/slow.sock
    user: nobody
    stop: {{timeout: 2s}}
"""
    base = _cgi(pub)
    with Spawnd(tmp_path, base + slow) as d:
        d.start()
        [pid] = d.wait_children("slow", 1)
        d.wait_line(f"slow[{pid}]: armed")
        with open(d.config_path, "w") as f:
            f.write(base)                       # reload 1 removes 'slow' (takes ~1-2 s)
        c = socket.socket(socket.AF_UNIX)
        c.connect(d.admin_socket)
        c.sendall(b'{"cmd": "reload"}\n')
        wait_for(lambda: status(d, "slow")["pools"][0]["state"] == "stopping",
                 what="slow being removed")
        with open(d.config_path, "w") as f:
            f.write(base + slow)                # reload 2 (SIGHUP) brings it back
        d.signal(signal.SIGHUP)
        d.wait_line("still stopping; reload again once they are gone")
        c.settimeout(15)
        assert json.loads(c.makefile("rb").readline())["result"]["removed"] == ["slow"]
        c.close()
        ctl(d, "reload", check=0)               # now it is gone: adding it works
        assert len(d.wait_children("slow", 1, exclude=[pid])) == 1
        assert (pub / "slow.sock").exists()     # bound afresh by the re-added pool
        assert d.stop() == 0


def test_reaping_children_at_an_internal_error_is_bounded_and_waits_for_each_exit():
    """The internal-error path reaps with reap_children(): it returns as soon as the last
    child is reaped, and at its timeout when one never exits (a blocking waitpid hung)."""
    code = textwrap.dedent("""
        import json, subprocess, sys, time
        from spawnd.supervisor import reap_children
        quick = [subprocess.Popen(["true"]), subprocess.Popen(["sleep", "0.3"])]
        t = time.monotonic(); reap_children(5.0); all_reaped = time.monotonic() - t
        stuck = subprocess.Popen(["sleep", "30"])
        t = time.monotonic(); reap_children(0.5); bounded = time.monotonic() - t
        alive = stuck.poll() is None
        stuck.kill(); stuck.wait()
        print(json.dumps([all_reaped, bounded, alive]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True)
    all_reaped, bounded, alive = json.loads(out.stdout)
    assert 0.25 <= all_reaped < 3.0, all_reaped      # waited for the 0.3 s child, no longer
    assert 0.45 <= bounded < 3.0 and alive, (bounded, alive)
