#!/usr/bin/env python3
"""How a FastCGI server's throughput behind nginx falls as its cost per request grows.

One run: nginx (1 worker, as in bench_wsgi.py) -> Unix socket -> the Python floor
(benchmarks/apps/floor_fcgi.py) made to burn a further N µs of CPU per request
(FLOOR_EXTRA_US=N), for each N of --extra, side by side with uWSGI (1 process) in the
same run. Each step measures both with `wrk -t1 -c16`, hello-world, a connection per
request (the case where spawnd-wsgi is furthest behind uWSGI), and reports req/s, the
server's CPU time per request, and the floor's ratio to uWSGI.

Why: added work should raise the CPU time per request by about the work added. On a
VM whose idle vCPUs halt (this project's 2-vCPU test machine, haltpoll with
guest_halt_poll_ns=0), it rises by far more once the server becomes the bottleneck:
nginx then waits for it, its vCPU halts, and each response has to wake it with an
inter-processor interrupt, paid in the server's send(). The table shows where that
happens, which tells how far spawnd-wsgi's own cost per request is from the point
where it would keep pace with uWSGI (benchmarks/wsgi.md, "The cliff").

Run as root (nginx's worker runs as root to reach the sockets). Prints markdown on
stdout, progress on stderr.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile

import bench_wsgi as B


class ExtraFloor(B.Floor):
    """The floor with FLOOR_EXTRA_US set when it starts."""
    extra = 0.0

    def start(self):
        os.environ["FLOOR_EXTRA_US"] = f"{self.extra:g}"
        try:
            return super().start()
        finally:
            del os.environ["FLOOR_EXTRA_US"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extra", default="0,3,6,9,12,15,20",
                    help="µs of CPU added per request, comma-separated (default "
                         "0,3,6,9,12,15,20)")
    ap.add_argument("--duration", type=float, default=5.0,
                    help="seconds per wrk run (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="repeats (default 2; median)")
    args = ap.parse_args(argv)
    try:
        steps = [float(x) for x in args.extra.split(",")]
    except ValueError:
        ap.error(f"--extra: not a list of numbers: {args.extra!r}")
    if os.geteuid() != 0:
        ap.error("run as root (nginx's worker runs as root to reach the sockets)")
    for tool in ("wrk", "uwsgi", B.NGINX):
        if not shutil.which(tool):
            ap.error(f"{tool} not found (apt-get install wrk uwsgi uwsgi-plugin-python3 "
                     "nginx-light)")
    sys.stdout.reconfigure(line_buffering=True)
    case = B.CASES["hello"]
    workdir = tempfile.mkdtemp(prefix="bench-cliff-")
    try:
        floor, uwsgi = ExtraFloor(workdir), B.Uwsgi(workdir)
        results = {}
        with B.Nginx(workdir, [floor, uwsgi]).start() as nginx:
            worker = nginx.worker_pid()
            for r in range(args.rounds):
                for extra in steps:
                    floor.extra = extra
                    with B.fresh([floor, uwsgi]) as pids:
                        for srv in (floor, uwsgi):
                            B.check_answer(nginx, case, srv.key)
                            B.run_wrk(nginx.url(case.path(srv.key)), 1, 16, None, [])
                        for srv in (floor, uwsgi):
                            res = B.run_wrk(nginx.url(case.path(srv.key)), args.duration,
                                            16, None, [pids[srv.key], worker])
                            results.setdefault((extra, srv.key), []).append(res)
                            B.progress(f"round {r + 1}/{args.rounds} +{extra:g} µs "
                                       f"{srv.name:12} {res['rps']:9,.0f} req/s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def med(extra, key, what):
        runs = results[(extra, key)]
        if what == "rps":
            return statistics.median(x["rps"] for x in runs)
        return statistics.median(x["cpu"][what] / x["requests"] * 1e6 for x in runs)

    print(f"# bench_wsgi_cliff: {platform.node()}, {os.cpu_count()} CPUs; "
          f"`wrk -t1 -c16 -d{args.duration:g}s`, hello-world, a connection per request; "
          f"median of {args.rounds}\n")
    rows = []
    base = med(steps[0], "floor", 0)
    for extra in steps:
        f, u = med(extra, "floor", "rps"), med(extra, "uwsgi", "rps")
        cpu = med(extra, "floor", 0)
        rows.append([f"+{extra:g}", f"{f:,.0f}", f"{cpu:.1f}", f"{cpu - base:+.1f}",
                     f"{med(extra, 'floor', 1):.1f}", f"{u:,.0f}", B.ratio(f, u)])
    print(B.table(["µs added per request", "floor req/s", "floor CPU µs/req",
                   f"change from +{steps[0]:g}", "nginx CPU µs/req", "uWSGI req/s",
                   "floor / uWSGI"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
