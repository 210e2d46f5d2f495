"""Resource recycling: max_rss over the child's process tree, max_age with spread.
A replacement is started (and ready) before the child it replaces is stopped."""
from __future__ import annotations

import os
import re
import time

import pytest

from support.daemon import Spawnd, status
from support.proc import wait_for

pytestmark = pytest.mark.slow

HOG = """#!/bin/sh
# The first child to claim the token grows an 80 MiB grandchild; the others stay small.
if mv {pub}/token {pub}/token.$$ 2>/dev/null; then
  /usr/bin/python3 -c 'import time; x = bytearray(80 << 20); x[::4096] = b"y" * len(x[::4096]); print("hog up", flush=True); time.sleep(600)' &
fi
echo "child $$ up"
exec sleep 600
"""


def test_rss_over_limit_is_replaced_new_child_first(tmp_path, pub):
    script = pub / "hog.sh"
    script.write_text(HOG.format(pub=pub))
    script.chmod(0o755)
    (pub / "token").write_text("")
    os.chmod(pub, 0o777)        # the child (nobody) renames the token
    with Spawnd(tmp_path, f"""\
        spawnd:
          sample_interval: 200ms
        pools:
          hog:
            command: [{script}]
            listen: unix:{pub}/hog.sock
            user: nobody
            processes: 2
            recycle: {{max_rss: 50MiB}}
            stop: {{when: now, timeout: 2s}}
        """) as d:
        d.start()
        # Not "hog up": a sample can catch the hog over the limit while it is still
        # touching its pages, and the group is stopped before it prints (a CI flake).
        [victim] = wait_for(lambda: [int(p.split(".")[-1]) for p in os.listdir(pub)
                                     if p.startswith("token.")],
                            what="a child to claim the token")
        d.wait_line(f"replacing child {victim} (rss)")
        d.wait_line(f"child {victim} stopped")
        lines = d.output().splitlines()
        replaced = next(i for i, l in enumerate(lines) if f"replacing child {victim}" in l)
        started = next(i for i, l in enumerate(lines[replaced:], replaced)
                       if "started child" in l)
        stopped = next(i for i, l in enumerate(lines) if f"child {victim} stopped" in l)
        assert replaced < started < stopped, lines[replaced:stopped + 1]
        [p] = status(d, "hog")["pools"]
        assert p["replacements"] == {"rss": 1}, p
        assert p["running"] == 2 and victim not in [c["pid"] for c in p["children"]]
        assert d.stop() == 0


def test_max_age_replacements_are_spread(tmp_path, pub):
    with Spawnd(tmp_path, f"""\
        pools:
          aged:
            command: [/usr/sbin/fcgiwrap]
            listen: unix:{pub}/aged.sock
            user: nobody
            processes: 8
            ready_after: 20ms
            recycle: {{max_age: 2s}}
        """) as d:
        d.start()
        first = d.wait_children("aged", 8)
        t0 = time.monotonic()
        seen = {}
        rx = re.compile(r"replacing child (\d+) \(age\)")
        while len(seen) < 8 and time.monotonic() - t0 < 6:
            for m in rx.finditer(d.output()):
                seen.setdefault(int(m.group(1)), time.monotonic() - t0)
            time.sleep(0.005)
        assert set(seen) == set(first), (seen, first)
        ages = sorted(seen.values())
        assert 1.75 <= ages[0] and ages[-1] <= 2.15, ages
        assert ages[-1] - ages[0] > 0.02, f"not spread: {ages}"
        wait_for(lambda: len(d.children("aged")) == 8 and
                 not set(d.children("aged")) & set(first), timeout=10,
                 what="every original child replaced")
        assert status(d, "aged")["pools"][0]["replacements"]["age"] >= 8
        assert d.stop() == 0
