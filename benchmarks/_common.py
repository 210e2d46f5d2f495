"""Helpers the benchmark scripts share: the repository on sys.path, the admin socket."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from support.proc import wait_for  # noqa: E402,F401  (re-exported)


def admin_call(sock_path: str, cmd: str, **args) -> dict:
    """One admin-protocol request; returns the whole reply ({"ok": ..., ...})."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    f = s.makefile("rb")
    s.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
    reply = json.loads(f.readline())
    s.close()
    return reply


def first_line(cmd) -> str:
    """The first line a command prints (a version string), or "?"."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"
