#!/usr/bin/env python3
"""Control-plane figures (issue: control plane, "Measure").

1. `status` latency with 10 pools x 100 fcgiwrap children: the admin-socket round trip
   (what the daemon costs) and a whole `spawnctl status` run (what a person waits for,
   Python start-up included). Median and p95 over --samples calls.
2. The time a rolling restart of a 32-child pool takes (`spawnctl restart`, which replies
   when the last old child is gone), with the default ready_after (100ms) and stop.when idle.

Run as root:  .venv/bin/python benchmarks/bench_control.py [--samples 30] [--pools 10] [--children 100]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _common import ROOT, admin_call, wait_for
PYTHON = sys.executable






def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pools", type=int, default=10)
    ap.add_argument("--children", type=int, default=100)
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--restart-size", type=int, default=32)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="spawnd-bench-ctl-", dir="/tmp")
    os.chmod(d, 0o755)
    admin = os.path.join(d, "admin.sock")
    pools = "".join(f"""
  p{i}:
    command: [/usr/sbin/fcgiwrap]
    listen: unix:{d}/p{i}.sock
    user: nobody
    processes: {a.children}
""" for i in range(a.pools))
    pools += f"""
  big:
    command: [/usr/sbin/fcgiwrap]
    listen: unix:{d}/big.sock
    user: nobody
    processes: {a.restart_size}
"""
    cfg = os.path.join(d, "spawnd.yaml")
    with open(cfg, "w") as f:
        f.write(f"spawnd: {{admin_socket: {admin}, shutdown_timeout: 30s}}\npools:{pools}")
    daemon = subprocess.Popen([PYTHON, "-m", "spawnd.main", "-c", cfg], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        total = a.pools * a.children + a.restart_size
        wait_for(lambda: os.path.exists(admin) and all(
            p["state"] == "running" for p in admin_call(admin, "status")["result"]["pools"]),
            timeout=120, what=f"{total} children running")
        rtt = []
        for _ in range(a.samples):
            t = time.perf_counter()
            r = admin_call(admin, "status")
            rtt.append(time.perf_counter() - t)
            assert sum(p["running"] for p in r["result"]["pools"]) == total
        cli = []
        for _ in range(max(5, a.samples // 3)):
            t = time.perf_counter()
            subprocess.run([PYTHON, "-m", "spawnd.ctl", "-s", admin, "status"], cwd=ROOT,
                           check=True, stdout=subprocess.DEVNULL)
            cli.append(time.perf_counter() - t)
        t = time.perf_counter()
        r = admin_call(admin, "restart", pool="big")
        restart = time.perf_counter() - t
        assert r["ok"] and r["result"]["replaced"] == a.restart_size, r
        print(f"| measure ({a.pools} pools x {a.children} children + {a.restart_size}) "
              f"| median | p95 |")
        print("|---|---|---|")
        print(f"| status, admin-socket round trip | {statistics.median(rtt) * 1000:.1f} ms "
              f"| {pct(rtt, 95) * 1000:.1f} ms |")
        print(f"| `spawnctl status` command (incl. Python start-up) "
              f"| {statistics.median(cli) * 1000:.1f} ms | {pct(cli, 95) * 1000:.1f} ms |")
        print(f"| rolling restart of a {a.restart_size}-child fcgiwrap pool | {restart:.2f} s | - |")
    finally:
        daemon.terminate()
        daemon.wait(60)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
