"""A real nginx for tests: its own config, pid, logs and temp paths under a directory.

    with start_nginx(tmp_path, '''
        location / { include /etc/nginx/fastcgi_params; fastcgi_pass unix:/x.sock; }
    ''') as ngx:
        urllib.request.urlopen(ngx.url("/"))

``server_conf`` goes inside the ``server {}`` block (which listens on 127.0.0.1 on a free
port), ``http_conf`` inside ``http {}`` before it (upstreams, maps). nginx is started as
root with ``master_process on``, so its workers run as ``user`` (default: nobody): the
FastCGI sockets it connects to must be reachable by that user (directory search
permission and socket write permission), or use ``user="root"``.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

NGINX = "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    def __init__(self, directory, server_conf: str, *, http_conf: str = "",
                 user: str | None = None) -> None:
        self.dir = os.path.join(str(directory), f"nginx-{os.getpid()}-{id(self)}")
        os.makedirs(os.path.join(self.dir, "temp"), exist_ok=True)
        self.port = free_port()
        self.conf_path = os.path.join(self.dir, "nginx.conf")
        self.error_log_path = os.path.join(self.dir, "error.log")
        self.access_log_path = os.path.join(self.dir, "access.log")
        temp = os.path.join(self.dir, "temp")
        temps = "\n".join(
            f"    {kind}_temp_path {temp}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = f"""
daemon off;
master_process on;
worker_processes 1;
{f"user {user};" if user else ""}
pid {self.dir}/nginx.pid;
error_log {self.error_log_path} info;
events {{ worker_connections 1024; }}
http {{
    access_log {self.access_log_path};
{temps}
{http_conf}
    server {{
        listen 127.0.0.1:{self.port};
        server_name localhost;
{server_conf}
    }}
}}
"""
        with open(self.conf_path, "w") as f:
            f.write(conf)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "Nginx":
        check = subprocess.run([NGINX, "-t", "-q", "-c", self.conf_path, "-e",
                                self.error_log_path], capture_output=True, text=True)
        if check.returncode != 0:
            raise AssertionError(f"nginx rejected its config:\n{check.stderr}\n"
                                 f"{open(self.conf_path).read()}")
        self.proc = subprocess.Popen([NGINX, "-c", self.conf_path, "-e",
                                      self.error_log_path],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                raise AssertionError(f"nginx exited {self.proc.returncode}: {err}\n"
                                     f"{self.error_log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"nginx does not answer on port {self.port} "
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
        """Graceful QUIT, then KILL (master and workers) on timeout."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            import psutil
            workers = psutil.Process(proc.pid).children()
            proc.kill()
            proc.wait()
            for worker in workers:
                try:
                    worker.kill()
                except psutil.NoSuchProcess:
                    pass
        finally:
            if proc.stderr:
                proc.stderr.close()

    def __enter__(self) -> "Nginx":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_nginx(directory, server_conf: str, *, http_conf: str = "",
                user: str | None = None) -> Nginx:
    """Start nginx and return it (also a context manager that stops it)."""
    return Nginx(directory, server_conf, http_conf=http_conf, user=user).start()
