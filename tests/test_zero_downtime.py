"""Rolling restart, scaling and reload under load through nginx: zero failed requests.

fcgiwrap and php-cgi abort an in-flight request on SIGTERM, so these pass only because
spawnd retires a child while it waits in accept() (stop.when: idle). The last test runs
the same restart with stop.when: now and must see failures, which shows the mechanism is
what prevents them."""
from __future__ import annotations

import contextlib
import json
import re
import time

import pytest

from support.daemon import Spawnd, ctl, status
from support.load import LoadInBackground
from support.nginx import start_nginx
from support.proc import wait_for

pytestmark = pytest.mark.slow

SLOW_CGI = """#!/bin/sh
sleep 0.$(( ($$ % 3) + 1 ))
printf 'Content-Type: text/plain\\r\\n\\r\\n'
printf 'slow %s\\n' "$QUERY_STRING"
"""


def _setup(tmp_path, pub, *, when="idle", processes=3):
    script = pub / "slow.cgi"
    script.write_text(SLOW_CGI)
    script.chmod(0o755)
    cfg = f"""\
spawnd:
  admin_socket: {tmp_path}/admin.sock
pools:
  cgi:
    command: [/usr/sbin/fcgiwrap]
    listen: unix:{pub}/cgi.sock
    socket: {{owner: www-data}}
    user: nobody
    processes: {processes}
    stop: {{when: {when}, timeout: 10s}}
"""
    location = f"""
    location /cgi/ {{
        include /etc/nginx/fastcgi_params;
        fastcgi_param SCRIPT_FILENAME {script};
        fastcgi_next_upstream off;
        fastcgi_pass unix:{pub}/cgi.sock;
    }}
"""
    return cfg, location


def _check(status, headers, body):
    return status == 200 and re.fullmatch(rb"slow n=\d+\n", body) is not None


@contextlib.contextmanager
def _load(ngx, location: str, check, warm: int):
    """8 clients requesting /LOCATION/?n=0..7 through nginx until the block ends, ``warm``
    of them answered before it begins."""
    with LoadInBackground([ngx.url(f"/{location}/?n={i}") for i in range(8)], clients=8,
                          check=check) as load:
        wait_for(lambda: load.result().ok >= warm, timeout=20, what="load under way")
        yield load


def _pids(d, pool="cgi"):
    return {c["pid"] for c in status(d, pool)["pools"][0]["children"]}


def test_restart_scale_reload_under_load_lose_nothing(tmp_path, pub):
    cfg, location = _setup(tmp_path, pub)
    with Spawnd(tmp_path, cfg) as d, start_nginx(tmp_path, location, user="www-data") as ngx:
        d.start()
        d.wait_children("cgi", 3)
        with _load(ngx, "cgi", _check, 20) as load:
            before = _pids(d)
            res = json.loads(ctl(d, "restart", "cgi", "--json", check=0).stdout)
            assert res["replaced"] == 3 and not _pids(d) & before

            ctl(d, "scale", "cgi", "6", check=0)
            assert len(_pids(d)) == 6
            ctl(d, "scale", "cgi", "2", check=0)
            assert len(_pids(d)) == 2

            before = _pids(d)
            with open(d.config_path, "w") as f:
                f.write(cfg.replace("processes: 3", "processes: 2\n    env: {GEN: '2'}"))
            res = json.loads(ctl(d, "reload", "--json", check=0).stdout)
            assert res["restarted"] == ["cgi"], res
            assert not _pids(d) & before
            seen = load.result().ok
            wait_for(lambda: load.result().ok >= seen + 10, timeout=20, what="load after reload")
        result = load.result()
        assert result.ok > 50, result
        assert not result.failed and not result.errors, result
        assert "upstream prematurely closed" not in ngx.error_log()
        # Saturated (8 clients, 3 children): the children were caught at accept() by ptrace.
        assert d.count(r"cgi: child \d+ retired between two requests") >= 5, d.output()
        assert d.stop() == 0


def test_signalling_busy_children_does_cut_requests(tmp_path, pub):
    """The control experiment: stop.when: now sends SIGTERM to busy fcgiwrap children."""
    cfg, location = _setup(tmp_path, pub, when="now")
    with Spawnd(tmp_path, cfg) as d, start_nginx(tmp_path, location, user="www-data") as ngx:
        d.start()
        d.wait_children("cgi", 3)
        with _load(ngx, "cgi", _check, 20) as load:
            for _ in range(3):
                ctl(d, "restart", "cgi", check=0)
        result = load.result()
        assert sum(result.failed.values()) > 0, \
            f"expected cut requests without the idle check: {result}"
        assert d.stop() == 0


def test_php_cgi_master_before_its_workers_still_stops(tmp_path, pub):
    """php-cgi with PHP_FCGI_CHILDREN, stopped before its workers exist: the master never
    calls accept(), so spawnd signals it after half of stop.timeout, not SIGKILL at the end."""
    with Spawnd(tmp_path, f"""\
        pools:
          php:
            command: [/usr/bin/php-cgi]
            listen: unix:{pub}/php.sock
            user: www-data
            env: {{PHP_FCGI_CHILDREN: "2"}}
            stop: {{timeout: 2s}}
        """) as d:
        d.start()
        d.wait_children("php", 1)
        t0 = time.monotonic()
        assert d.stop() == 0
        took = time.monotonic() - t0
        assert took < 1.9, took
        assert not d.seen("sending SIGKILL"), d.output()


SLOW_WSGI = """\
import os, time
def application(environ, start_response):
    time.sleep(0.01 * (1 + int(environ.get("QUERY_STRING", "n=0")[2:] or 0) % 5))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"wsgi %d\\n" % os.getpid()]
"""


@pytest.mark.parametrize("when", ["idle", "now"])
def test_spawnd_wsgi_siblings_restart_and_scale_under_load_lose_nothing(
        tmp_path, pub, public_python, when):
    """Several spawnd-wsgi processes on one socket, each accepting in its own event loop
    (EPOLLEXCLUSIVE, bounded accept), behind nginx with a connection per request: rolling
    restarts and scaling under load lose no request, whether spawnd retires a runner
    when it is seen waiting (idle) or signals it at once (now: it finishes in flight)."""
    (pub / "slowapp.py").write_text(SLOW_WSGI)
    python, env = public_python
    cfg = f"""\
spawnd:
  admin_socket: {tmp_path}/admin.sock
pools:
  py:
    command: [{python}, -m, spawnd.wsgi.main, --chdir, {pub}, slowapp:application]
    listen: unix:{pub}/py.sock
    socket: {{owner: www-data}}
    user: nobody
    env: {{PYTHONPATH: {env["PYTHONPATH"]}}}
    processes: 3
    stop: {{when: {when}, timeout: 10s}}
"""
    location = f"""
    location /py/ {{
        include /etc/nginx/fastcgi_params;
        fastcgi_next_upstream off;
        fastcgi_pass unix:{pub}/py.sock;
    }}
"""

    def check(status, headers, body):
        return status == 200 and re.fullmatch(rb"wsgi \d+\n", body) is not None

    with Spawnd(tmp_path, cfg) as d, start_nginx(tmp_path, location, user="www-data") as ngx:
        d.start()
        d.wait_children("py", 3)
        with _load(ngx, "py", check, 50) as load:
            for _ in range(2):
                before = _pids(d, "py")
                res = json.loads(ctl(d, "restart", "py", "--json", check=0).stdout)
                assert res["replaced"] == 3 and not _pids(d, "py") & before
            ctl(d, "scale", "py", "5", check=0)
            assert len(_pids(d, "py")) == 5
            ctl(d, "scale", "py", "2", check=0)
            assert len(_pids(d, "py")) == 2
            seen = load.result().ok
            wait_for(lambda: load.result().ok >= seen + 50, timeout=20,
                     what="load after the restarts")
        result = load.result()
        assert result.ok > 200, result
        assert not result.failed and not result.errors, result
        assert "upstream prematurely closed" not in ngx.error_log()
        assert d.stop() == 0
