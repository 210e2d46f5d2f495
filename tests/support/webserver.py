"""The life cycle shared by the nginx, lighttpd and Apache test fixtures.

A web server run in the foreground as a child of the test, from a config file written
under its own directory: check the config, start, wait until the port answers, stop
with the server's graceful signal, then SIGKILL (server and children) on timeout.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time

from .proc import free_port


class ForegroundServer:
    """A web server run in the foreground from a config file written under ``self.dir``.

    Subclasses set ``name``, ``stop_signal``, write ``self.conf_path`` and
    ``self.error_log_path``, and define ``check_command()`` and ``run_command()``."""

    name = "server"
    stop_signal = signal.SIGTERM

    def __init__(self, directory, name: str) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"{name}-", dir=str(directory))
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.conf_path = os.path.join(self.dir, f"{name}.conf")
        self.error_log_path = os.path.join(self.dir, "error.log")
        self.proc: subprocess.Popen | None = None

    def check_command(self) -> list[str]:
        raise NotImplementedError

    def run_command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 10.0):
        check = subprocess.run(self.check_command(), capture_output=True, text=True)
        if check.returncode != 0:
            raise AssertionError(f"{self.name} rejected its config:\n{check.stdout}"
                                 f"{check.stderr}\n{open(self.conf_path).read()}")
        self.proc = subprocess.Popen(self.run_command(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                raise AssertionError(f"{self.name} exited {self.proc.returncode}: {err}\n"
                                     f"{self.error_log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"{self.name} does not answer on port {self.port} "
                                         f"after {timeout}s ({exc}):\n{self.error_log()}")
                time.sleep(0.01)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def error_log(self) -> str:
        try:
            with open(self.error_log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """``stop_signal``, then SIGKILL to the server and its children on timeout."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        import psutil
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        proc.send_signal(self.stop_signal)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            for child in children:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
        finally:
            if proc.stderr:
                proc.stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
