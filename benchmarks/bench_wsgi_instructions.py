#!/usr/bin/env python3
"""User-space instructions per new connection: spawnd-wsgi against the Python floor.

    .venv/bin/python benchmarks/bench_wsgi_instructions.py [--tree DIR ...]

Timings on a shared VM move by tens of percent from one minute to the next; instruction
counts do not: a run repeats its figures exactly. A change anywhere in the package moves
them by up to ~0.2% even where the path measured is untouched (the garbage collector and
the allocator see a different history), so read smaller differences as none.

Each server is driven in-process, with real sockets: N clients connect and write
nginx's usual request (27 PARAMS, benchmarks/bench_fastcgi_parse.py, a GET of /hello
with no body, no FCGI_KEEP_CONN), then the server takes each connection the way its
loop does (spawnd-wsgi: ``Server._accept()``, the bounded accept4 through the response
to close(); the floor: the same accept, then its ``serve``). The whole process runs
under ``valgrind --tool=callgrind`` twice, with N/2 and 3N/2 connections after a
warm-up of 200 (N: --connections, default 1000); the difference divided by N is the
cost per connection. The same harness doing only its own part (the clients, accept4
and close) is measured too and subtracted, so the figures are the server's own work.
System calls are the kernel's work and are not counted: they are the same for both (7
per connection, see wsgi.md).

--tree DIR (repeatable) measures spawnd-wsgi from another checkout's ``spawnd`` package
(e.g. one made with ``git archive REV spawnd | tar x -C DIR``), for A/B comparisons.
Needs valgrind (apt-get install valgrind); about 20 seconds per figure.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def harness(mode: str, n: int) -> None:
    """The measured process: serve ``n`` queued connections (after a warm-up)."""
    sys.path[:0] = [HERE, os.path.join(HERE, "apps")]
    import floor_fcgi
    from bench_fastcgi_parse import NGINX_PARAMS
    from spawnd.fastcgi.protocol import ClientConnection
    from spawnd.wsgi.server import Server

    params = [(k, v) for k, v in NGINX_PARAMS if k != "PATH_INFO"] + [("PATH_INFO", "/hello")]
    client = ClientConnection()
    request = client.begin_request(1, keep_conn=False, params=params) \
        + client.send_stdin(1, b"")
    path = os.path.join(os.environ["BENCH_DIR"], f"l{os.getpid()}.sock")
    listener, bound = floor_fcgi.listen(path)      # (the same set-up for all three)
    lfd = listener.fileno()
    if mode == "spawnd-wsgi":
        from benchapp import application
        server = Server(application, listener)
        server._bound = bound       # (serve() would make it; this drives _accept alone)

        def take() -> None:
            server._accept()
    elif mode == "floor":
        def take() -> None:
            fd, _ = bound.accept(lfd)
            if floor_fcgi.serve(floor_fcgi.Conn(fd)):
                raise AssertionError("the floor kept a connection it should close")
            os.close(fd)
    else:                           # the harness's own part
        def take() -> None:
            os.close(bound.accept(lfd)[0])

    def batch(count: int) -> None:
        clients = []
        for _ in range(count):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.sendall(request)
            clients.append(s)
        for _ in range(count):
            take()
        for s in clients:
            s.close()
        if mode == "spawnd-wsgi" and server.conns:
            raise AssertionError(f"{len(server.conns)} connections left open")

    batch(200)
    batch(n)
    os.unlink(path)


def instructions(mode: str, n: int, tree: str | None, workdir: str) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0", BENCH_DIR=workdir,
               PYTHONPATH=os.pathsep.join(p for p in (tree, REPO) if p))
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         os.path.abspath(__file__), "--harness", mode, str(n)],
        env=env, capture_output=True, text=True, check=False)
    m = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if out.returncode != 0 or m is None:
        raise SystemExit(f"{mode}: valgrind failed:\n{out.stderr[-2000:]}")
    return int(m.group(1).replace(",", ""))


def per_connection(mode: str, n: int, tree: str | None, workdir: str) -> int:
    return (instructions(mode, n * 3 // 2, tree, workdir)
            - instructions(mode, n // 2, tree, workdir)) // (n * 3 // 2 - n // 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", default=[],
                    help="another checkout's directory holding spawnd/ (repeatable)")
    ap.add_argument("--connections", type=int, default=1000, metavar="N",
                    help="connections in the measured difference (default 1000)")
    ap.add_argument("--harness", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.harness:
        harness(args.harness[0], int(args.harness[1]))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-instr-") as workdir:
        n = max(2, args.connections)
        base = per_connection("base", n, None, workdir)
        rows = [("spawnd-wsgi (this tree)", per_connection("spawnd-wsgi", n, None, workdir))]
        rows += [(f"spawnd-wsgi ({t})", per_connection("spawnd-wsgi", n, os.path.abspath(t),
                                                       workdir)) for t in args.tree]
        rows.append(("Python floor", per_connection("floor", n, None, workdir)))
    floor = rows[-1][1] - base
    print(f"harness alone (clients, accept4, close): {base:,} instructions per connection")
    print("| server | instructions per connection (server's own) | / floor |")
    print("|---|---|---|")
    for name, total in rows:
        print(f"| {name} | {total - base:,} | {(total - base) / floor:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
