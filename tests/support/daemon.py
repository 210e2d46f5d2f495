"""Run the real spawnd daemon in a test: config in a temp dir, stderr captured."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import json
import textwrap
import threading

import psutil

from .proc import wait_for

_STARTED = re.compile(r"^(?:info: )?([a-z0-9_-]+): started child (\d+)$")


def _with_admin_socket(text: str, path: str) -> str:
    """Give a test daemon its own admin socket (never /run/spawnd/spawnd.sock) unless the
    config names one. Only touches configs whose `spawnd:` section is absent or a block."""
    if "admin_socket:" in text:
        return text
    if re.search(r"^spawnd:\s*$", text, re.M):
        return re.sub(r"^spawnd:\s*$", f"spawnd:\n  admin_socket: {path}", text, count=1,
                      flags=re.M)
    if re.search(r"^spawnd:", text, re.M):
        return text
    return text.rstrip("\n") + f"\nspawnd: {{admin_socket: {path}}}\n"   # keeps line numbers


class Spawnd:
    """spawnd -c <tmp>/spawnd.yaml, as a subprocess of the test."""

    def __init__(self, tmp_path, config: str, *, name: str = "spawnd.yaml", env=None):
        self.dir = tmp_path
        self.config_path = os.path.join(str(tmp_path), name)
        text = textwrap.dedent(config)
        named = re.search(r"admin_socket:\s*(\S+)", text)
        self.admin_socket = os.path.join(str(tmp_path), named.group(1) if named else "admin.sock")
        with open(self.config_path, "w") as f:
            f.write(_with_admin_socket(text, self.admin_socket))
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = None

    # ---- life cycle --------------------------------------------------------------------
    def start(self, *, wait_ready=True, timeout=10.0, args=()):
        cmd = [sys.executable, "-m", "spawnd.main", "-c", self.config_path, *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=self.env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait_ready:
            wait_for(lambda: self.proc.poll() is not None or self.seen("ready:"), timeout,
                     what="spawnd to log 'ready:'")
            if self.proc.poll() is not None:
                self._reader.join(2)
                raise AssertionError(f"spawnd exited with {self.proc.returncode}:\n{self.output()}")
        return self

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._lock:
                self.lines.append(line)

    def run_to_exit(self, timeout=10.0, args=()) -> int:
        """Start and wait for spawnd to exit by itself (config/bind errors, -t)."""
        self.start(wait_ready=False, args=args)
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.kill()
        self._reader.join(5)
        return rc

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout=20.0) -> int:
        """SIGTERM and wait for exit; returns spawnd's exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"spawnd did not exit within {timeout}s:\n{self.output()}")
        if self._reader:
            self._reader.join(5)
        return rc

    def kill(self):
        """Last resort for teardown: SIGKILL spawnd and every process group it started."""
        pids = self.all_started()
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop()
            except AssertionError:
                pass
        self.kill()

    # ---- observing --------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def seen(self, text: str) -> bool:
        with self._lock:
            return any(text in line for line in self.lines)

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        with self._lock:
            return sum(1 for line in self.lines if rx.search(line))

    def all_started(self, pool: str | None = None) -> list[int]:
        """Every child pid spawnd logged as started (for pool, or all)."""
        with self._lock:
            found = [(_STARTED.match(line)) for line in self.lines]
        return [int(m.group(2)) for m in found if m and (pool is None or m.group(1) == pool)]

    def children(self, pool: str | None = None) -> list[int]:
        """Live children of pool: started by spawnd, still its children, not zombies."""
        try:
            live = {p.pid for p in psutil.Process(self.pid).children()
                    if p.status() != psutil.STATUS_ZOMBIE}
        except psutil.NoSuchProcess:
            return []
        return [pid for pid in self.all_started(pool) if pid in live]

    def wait_children(self, pool: str, n: int, timeout=10.0, exclude=()) -> list[int]:
        """Wait until pool has exactly n live children, none of them in exclude."""
        def check():
            pids = self.children(pool)
            return pids if len(pids) == n and not set(pids) & set(exclude) else None
        return wait_for(check, timeout, what=f"{n} live children of pool {pool!r} "
                                             f"(have {self.children(pool)})")

    def wait_line(self, text: str, timeout=10.0) -> None:
        wait_for(lambda: self.seen(text), timeout, what=f"log line containing {text!r}")


def ctl(d: Spawnd, *args, timeout=30, check=None):
    """Run spawnctl against d's admin socket; returns CompletedProcess (text)."""
    sock = d.admin_socket
    r = subprocess.run([sys.executable, "-m", "spawnd.ctl", *args, "-s", sock],
                       capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert r.returncode == check, (r.returncode, r.stdout, r.stderr)
    return r


def status(d: Spawnd, pool: str | None = None) -> dict:
    r = ctl(d, "status", *([pool] if pool else []), "--json", check=0)
    return json.loads(r.stdout)
