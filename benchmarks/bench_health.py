#!/usr/bin/env python3
"""Health figures (issue: health, "Measure").

1. spawnd's own CPU use while it watches --pools x --children fcgiwrap children (default
   10 x 100 = 1,000) with every health feature on: a FastCGI probe per pool every second
   (answered by a tiny CGI script), recycle limits (max_rss and max_cpu, sampled every
   sample_interval; max_age timers), listen-queue sampling. Measured from
   /proc/PID/stat (utime + stime) over --seconds, after every pool is running and healthy.
   Target: under 2% of one core.
2. Reaction time from a hang to a healthy pool again: a pool of 4 tests/support/hangfcgi.py
   children, probe {interval: 1s, timeout: 1s, failures: 2}; every child is made to hang
   (one /hang request each); reported: time until spawnd declares the pool unhealthy, until
   a probe passes again, and until every hung child has been replaced. Median of --hangs.

Run as root:  .venv/bin/python benchmarks/bench_health.py [--children 100] [--seconds 30]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from _common import ROOT, admin_call, wait_for
from spawnd.fastcgi.client import FastCGIError, request
from spawnd.health import stat_fields
from support import hangfcgi
from support.pyenv import public_python  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")






def cpu_seconds(pid):
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / TICK


def status(admin, **args):
    return admin_call(admin, "status", **args)["result"]


def start(cfg_text, d):
    cfg = os.path.join(d, "spawnd.yaml")
    with open(cfg, "w") as f:
        f.write(cfg_text)
    log = open(os.path.join(d, "spawnd.log"), "wb")
    return subprocess.Popen([sys.executable, "-m", "spawnd.main", "-c", cfg], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)


def cpu_case(a, d):
    admin = os.path.join(d, "admin.sock")
    cgi = os.path.join(d, "ok.cgi")
    with open(cgi, "w") as f:
        f.write("#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\nok\\n'\n")
    os.chmod(cgi, 0o755)
    pools = "".join(f"""
  p{i}:
    command: [/usr/sbin/fcgiwrap]
    listen: unix:{d}/p{i}.sock
    user: nobody
    processes: {a.children}
    recycle: {{max_age: 6h, max_rss: 512MiB, max_cpu: 90%}}
    probe: {{uri: /ok, interval: 1s, timeout: 2s, params: {{SCRIPT_FILENAME: {cgi}}}}}
""" for i in range(a.pools))
    daemon = start(f"spawnd: {{admin_socket: {admin}, shutdown_timeout: 60s}}\npools:{pools}", d)
    try:
        total = a.pools * a.children
        wait_for(lambda: os.path.exists(admin) and all(
            p["state"] == "running" and p["health"] == "healthy"
            for p in status(admin)["pools"]), timeout=300, what=f"{total} children healthy")
        c0, t0 = cpu_seconds(daemon.pid), time.monotonic()
        time.sleep(a.seconds)
        c1, t1 = cpu_seconds(daemon.pid), time.monotonic()
        st = status(admin)["pools"]
        assert sum(p["running"] for p in st) == total
        assert all(p["health"] == "healthy" for p in st)
        return total, 100.0 * (c1 - c0) / (t1 - t0), a.seconds
    finally:
        daemon.terminate()
        daemon.wait(120)


def hang_case(a, d):
    admin = os.path.join(d, "admin2.sock")
    script = hangfcgi.install(d)
    py, env = public_python(os.path.join(d, "py"))
    sock = os.path.join(d, "hang.sock")
    daemon = start(f"""spawnd: {{admin_socket: {admin}}}
pools:
  hang:
    command: [/usr/bin/python3, {script}]
    listen: unix:{sock}
    socket: {{mode: "0666"}}
    user: nobody
    processes: 4
    env: {{PYTHONPATH: {env["PYTHONPATH"]}}}
    probe: {{uri: /ping, interval: 1s, timeout: 1s, failures: 2}}
    stop: {{timeout: 2s}}
""", d)
    logf = os.path.join(d, "spawnd.log")

    def log():
        with open(logf, "rb") as f:
            return f.read().decode(errors="replace")
    results = []
    try:
        wait_for(lambda: os.path.exists(admin) and status(admin, pool="hang")["pools"][0]
             ["health"] == "healthy", 60, what="hang pool healthy")
        for _ in range(a.hangs):
            before = {c["pid"] for c in status(admin, pool="hang")["pools"][0]["children"]}
            n_unhealthy = log().count("hang: unhealthy")
            n_healthy = log().count("hang: healthy again")
            t0 = time.monotonic()
            for _ in before:
                threading.Thread(target=lambda: _quiet(lambda: request(f"unix:{sock}", "/hang",
                                                                       timeout=30)),
                                 daemon=True).start()
            wait_for(lambda: log().count("hang: unhealthy") > n_unhealthy, 30, what="unhealthy")
            t_unhealthy = time.monotonic() - t0
            wait_for(lambda: log().count("hang: healthy again") > n_healthy, 30, what="healthy again")
            t_healthy = time.monotonic() - t0
            wait_for(lambda: not before & {c["pid"] for c in status(admin, pool="hang")
                                       ["pools"][0]["children"]}
                 and status(admin, pool="hang")["pools"][0]["state"] == "running",
                 30, what="all hung children replaced")
            t_replaced = time.monotonic() - t0
            results.append((t_unhealthy, t_healthy, t_replaced))
            wait_for(lambda: status(admin, pool="hang")["pools"][0]["health"] == "healthy",
                 30, what="healthy before the next round")
    finally:
        daemon.terminate()
        daemon.wait(60)
    return results


def _quiet(fn):
    try:
        fn()
    except (FastCGIError, OSError):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pools", type=int, default=10)
    ap.add_argument("--children", type=int, default=100)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--hangs", type=int, default=5)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="spawnd-bench-health-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        total, pct, secs = cpu_case(a, d)
        hangs = hang_case(a, d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    med = [statistics.median(x[i] for x in hangs) for i in range(3)]
    print("| measure | value |")
    print("|---|---|")
    print(f"| spawnd CPU, {total} fcgiwrap children, {a.pools} probes/s, recycle limits, "
          f"{secs} s | {pct:.2f}% of one core |")
    print(f"| hang -> declared unhealthy (probe 1s/1s, failures 2), median of {len(hangs)} "
          f"| {med[0]:.2f} s |")
    print(f"| hang -> a probe passes again | {med[1]:.2f} s |")
    print(f"| hang -> every hung child replaced, pool running | {med[2]:.2f} s |")


if __name__ == "__main__":
    main()
