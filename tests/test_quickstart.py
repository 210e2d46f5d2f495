"""The README's first command: examples/quickstart.yaml runs and answers, as scripts/demo
starts it (as root, the demo adds `user: root`, exactly as scripts/demo does)."""
from __future__ import annotations

import os
import shutil
import subprocess

from spawnd.fastcgi.client import request
from support.daemon import Spawnd, ctl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_example_serves_hello(tmp_path):
    # The example's relative paths point at ../.venv and ../run: give it the same layout.
    (tmp_path / "examples").mkdir()
    shutil.copy(os.path.join(ROOT, "examples", "hello.py"), tmp_path / "examples")
    os.symlink(os.path.join(ROOT, ".venv"), tmp_path / ".venv")
    (tmp_path / "run").mkdir()
    demo = subprocess.run(["sed", r"s/^    processes: 2$/    processes: 2\n    user: root/",
                           os.path.join(ROOT, "examples", "quickstart.yaml")],
                          check=True, capture_output=True, text=True).stdout
    with open(os.path.join(ROOT, "scripts", "demo")) as f:
        assert r"s/^    processes: 2$/    processes: 2\n    user: root/" in f.read(), \
            "scripts/demo must add user: root the way this test does"
    with Spawnd(tmp_path / "examples", demo, name="quickstart.yaml") as d:
        d.start()
        d.wait_children("hello", 2)
        r = request(f"unix:{tmp_path}/run/hello.sock", "/", timeout=10)
        assert (r.status, r.body) == (200, b"Hello from spawnd-wsgi\n")
        assert ctl(d, "status", "hello", check=0).stdout.startswith("POOL")
        assert d.stop() == 0
