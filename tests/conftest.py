"""Shared fixtures, and a guard that no test leaves a process running.

The guard: pytest makes itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so every
process a test starts stays its descendant even after it daemonises (nginx) or loses its
parent (children of a SIGKILLed spawnd). After each test, descendants that were not there
before it get a few seconds to exit; those still alive then are killed and the test errors
with their pid and command line. Processes started by anyone else are never looked at.
A side effect: orphans that exit become zombies of pytest. After each test the guard reaps
the zombies that no live Popen object owns (those are the orphans); support.proc's helpers
skip zombies anyway.
"""
from __future__ import annotations

import ctypes
import gc
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import hypothesis
import psutil
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from support.cfcgi import build_hello_fcgi  # noqa: E402
from support.proc import descendants  # noqa: E402
from support.pyenv import public_python as _public_python  # noqa: E402

pytest_plugins = ("pytester",)

# Property tests explore new inputs on every local run; under CI they replay one fixed
# sequence, so a CI result depends only on the commit. (A failure found locally is saved
# in .hypothesis/ and replayed until fixed; fix the code and add the case as a plain test.)
hypothesis.settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis.settings.load_profile("ci")

PR_SET_CHILD_SUBREAPER = 36
# Seconds a test's processes get to finish exiting after it ends.
LEFTOVER_GRACE = float(os.environ.get("SPAWND_TEST_LEFTOVER_GRACE", "3"))


def pytest_configure(config):
    import spawnd
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "spawnd")
    if os.path.isdir(here) and os.path.dirname(os.path.abspath(spawnd.__file__)) != here:
        # A packaged spawnd (e.g. /usr/lib/python3/dist-packages/spawnd left by a .deb) would
        # be imported instead of this source tree, and every test would test it.
        pytest.exit(f"spawnd is imported from {spawnd.__file__}, not from {here}: remove the "
                    "installed package (dpkg -P spawnd) or fix sys.path", returncode=3)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def public_tmpdir(prefix: str) -> str:
    """A new directory under /tmp with mode 0755, that other users can reach (pytest's
    tmp_path is 0700). The caller removes it."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o755)
    return d


@pytest.fixture
def pub():
    """A fresh directory other users (www-data, nobody, nginx's workers) can reach, as a
    pathlib.Path: pytest's tmp_path lies under a 0700 directory."""
    d = public_tmpdir("spawnd-pub-")
    try:
        yield pathlib.Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def stubborn(pub):
    """A child program that ignores SIGTERM, prints "armed" once it does, and keeps
    running (its sleep grandchildren come and go in its process group)."""
    script = pub / "stubborn.sh"
    script.write_text("#!/bin/sh\ntrap '' TERM\necho armed\nwhile :; do sleep 0.05; done\n")
    script.chmod(0o755)
    return script


@pytest.fixture(scope="session")
def hello_fcgi():
    """Path of the compiled C FastCGI program (support/hello_fcgi.c), built once per session
    in a world-readable directory, so children running as nobody/www-data can execute it."""
    d = public_tmpdir("spawnd-test-bin-")
    try:
        yield build_hello_fcgi(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def public_python():
    """(python, env): /usr/bin/python3 and an environment whose PYTHONPATH holds a
    world-readable copy of spawnd/, so `python -m spawnd.wsgi.main` runs as any user."""
    d = public_tmpdir("spawnd-test-py-")
    try:
        yield _public_python(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- the leftover-process guard ------------------------------------------------------------

def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} ({p.name()}): {' '.join(p.cmdline())[:200]}"
    except psutil.Error:
        return f"{p.pid} (gone)"


def _leftovers(exclude: set[int], grace: float) -> list[psutil.Process]:
    """Live descendants of pytest not in exclude, after waiting up to grace for them to go."""
    deadline = time.monotonic() + grace
    while True:
        left = [p for p in descendants(os.getpid()) if p.pid not in exclude]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def _kill(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def _reap_orphans() -> None:
    """Reap pytest's zombie children that no unfinished Popen (subprocess, or the Popen
    classes of multiprocessing) is going to wait for: orphans adopted by the subreaper."""
    zombies = [p.pid for p in descendants(os.getpid(), zombies=True)
               if p.ppid() == os.getpid() and p.status() == psutil.STATUS_ZOMBIE]
    if not zombies:
        return
    owned = {o.pid for o in gc.get_objects()
             if (isinstance(o, subprocess.Popen) or type(o).__name__ == "Popen")
             and getattr(o, "returncode", 0) is None and isinstance(getattr(o, "pid", 0), int)}
    for pid in set(zombies) - owned:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


@pytest.fixture(autouse=True)
def no_leftover_processes():
    before = {p.pid for p in descendants(os.getpid())}
    yield
    try:
        _reap_orphans()
    except psutil.Error:
        pass
    left = _leftovers(before, LEFTOVER_GRACE)
    if left:
        described = [_describe(p) for p in left]
        _kill(left)
        pytest.fail("processes started during this test were still running "
                    f"{LEFTOVER_GRACE}s after it (now killed):\n  " + "\n  ".join(described),
                    pytrace=False)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """Session-scoped fixtures are torn down by now: nothing of ours may remain."""
    left = _leftovers(set(), LEFTOVER_GRACE)
    if left:
        described = [_describe(p) for p in left]
        _kill(left)
        sys.stderr.write("\nleftover processes at the end of the test session (now killed):\n  "
                         + "\n  ".join(described) + "\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
