"""A FastCGI test child that can be made slow, stuck or fat on request.

Serves FastCGI RESPONDER requests on the listening socket it finds on fd 0, one
connection at a time (like php-cgi), with spawnd.fastcgi.protocol::

    /usr/bin/python3 hangfcgi.py [--trigger PATH]       (PYTHONPATH must reach spawnd)

    /anything        200 "ok <pid>"
    /hang            never answers (until the process is killed)
    /slow?ms=N       answers after N milliseconds
    /alloc?mb=N      allocates N MiB more, touches every page, keeps it; answers
                     "ok <pid> <MiB held>"
    /status?code=N   answers with status N
    --trigger PATH   while the file PATH exists, every request is held (checked every
                     10 ms) and answered once it is removed: a test makes every child
                     busy, counts what queues up, then releases them.

Each request is logged on stderr as "<pid> <uri>" when it arrives, so a test (or
spawnd's log) can see that a child took it. Only the standard library and
spawnd.fastcgi.protocol are used, so any user can run it with /usr/bin/python3 and a
PYTHONPATH (see ``install``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import parse_qs

from spawnd.fastcgi.protocol import (ProtocolError, Request, ServerConnection, StdinEnd)

_held: list[bytearray] = []        # /alloc keeps its memory here
PAGE = 4096
PYTHON = "/usr/bin/python3"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start(listener: socket.socket, *args: str, stderr=None) -> subprocess.Popen:
    """Run hangfcgi as root's test child with listener as its fd 0 (for tests that do
    not go through spawnd). Stop it with ``stop``."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": REPO, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([PYTHON, os.path.abspath(__file__), *args], stdin=listener,
                            stdout=subprocess.DEVNULL, stderr=stderr, env=env)


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL (a held request never ends by itself) and reap."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def install(directory: str) -> str:
    """Copy this file into directory (world-readable) and return its path: for children
    that run as another user and cannot read the repository."""
    dest = os.path.join(directory, "hangfcgi.py")
    shutil.copyfile(os.path.abspath(__file__), dest)
    os.chmod(dest, 0o644)
    return dest


def respond(uri: str, trigger: str | None) -> tuple[int, bytes]:
    """(status, body) for one request; may wait first, as the URI or trigger says."""
    path, _, query = uri.partition("?")
    args = {k: v[-1] for k, v in parse_qs(query).items()}
    pid = os.getpid()
    while trigger and os.path.exists(trigger):
        time.sleep(0.01)
    if path == "/hang":
        while True:
            signal.pause()
    if path == "/slow":
        time.sleep(int(args.get("ms", "0")) / 1000)
    if path == "/alloc":
        size = int(args.get("mb", "0")) << 20
        block = bytearray(size)
        block[::PAGE] = b"\1" * len(range(0, size, PAGE))   # touch every page: real RSS
        _held.append(block)
        held = sum(len(b) for b in _held) >> 20
        return 200, f"ok {pid} {held}\n".encode()
    if path == "/status":
        return int(args.get("code", "200")), f"status {pid}\n".encode()
    return 200, f"ok {pid}\n".encode()


def serve_connection(conn: socket.socket, trigger: str | None) -> None:
    fcgi = ServerConnection()
    uris: dict[int, str] = {}
    while True:
        data = conn.recv(65536)
        try:
            events = fcgi.receive_data(data)
        except ProtocolError as exc:
            print(f"{os.getpid()} protocol error: {exc}", file=sys.stderr, flush=True)
            return
        out = [fcgi.data_to_send()]
        for event in events:
            if isinstance(event, Request):
                params = dict(event.params)
                uri = params.get(b"REQUEST_URI", b"/").decode("latin-1")
                uris[event.request_id] = uri
                print(f"{os.getpid()} {uri}", file=sys.stderr, flush=True)
            elif isinstance(event, StdinEnd):
                status, body = respond(uris.pop(event.request_id), trigger)
                head = f"Status: {status}\r\nContent-Type: text/plain\r\n\r\n".encode()
                out += (fcgi.send_stdout(event.request_id, head + body),
                        fcgi.end_request(event.request_id))
        conn.sendall(b"".join(out))
        if not data or (not fcgi.keep_conn and not fcgi.active_requests):
            return


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trigger", metavar="PATH",
                        help="hold every request while this file exists")
    opts = parser.parse_args(argv)
    listener = socket.socket(fileno=0)
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                serve_connection(conn, opts.trigger)
            except OSError as exc:       # the client went away: serve the next one
                print(f"{os.getpid()} connection lost: {exc}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
