"""A real lighttpd for tests: its own config, pid, logs and upload dir under a directory.

    with start_lighttpd(pub, 'include "/path/site.conf"') as web:
        urllib.request.urlopen(web.url("/"))

``site_conf`` is appended to a main config that listens on 127.0.0.1 on a free port,
serves ``document_root`` (default ``DIR/htdocs``) and loads mod_alias and mod_fastcgi.
lighttpd runs in the foreground (``-D``) as a child of the test. Started as root, it drops
to ``user`` (default www-data) after binding, so the FastCGI sockets it connects to must be
reachable by that user, and ``directory`` must be searchable by it (pass a public
directory, not pytest's tmp_path).

``ForegroundServer`` is the life cycle shared with the Apache fixture (support.apache):
check the config, start, wait until the port answers, stop with a signal then SIGKILL.
"""
from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import tempfile
import time

LIGHTTPD = "/usr/sbin/lighttpd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class Lighttpd(ForegroundServer):
    name = "lighttpd"
    stop_signal = signal.SIGTERM     # SIGINT would wait for open connections to finish

    def __init__(self, directory, site_conf: str, *, user: str = "www-data",
                 document_root: str | None = None) -> None:
        super().__init__(directory, "lighttpd")
        htdocs = document_root or os.path.join(self.dir, "htdocs")
        uploads = os.path.join(self.dir, "uploads")
        os.makedirs(htdocs, mode=0o755, exist_ok=True)
        os.makedirs(uploads)
        os.chmod(uploads, 0o1777)
        # lighttpd opens its error log after dropping to `user`.
        logs = os.path.join(self.dir, "logs")
        os.makedirs(logs)
        pw = pwd.getpwnam(user)
        os.chown(logs, pw.pw_uid, pw.pw_gid)
        self.error_log_path = os.path.join(logs, "error.log")
        conf = f"""
server.bind          = "127.0.0.1"
server.port          = {self.port}
server.document-root = "{htdocs}"
server.pid-file      = "{self.dir}/lighttpd.pid"
server.errorlog      = "{self.error_log_path}"
server.upload-dirs   = ( "{uploads}" )
server.username      = "{user}"
server.groupname     = "{user}"
server.modules      += ( "mod_alias", "mod_fastcgi" )

{site_conf}
"""
        with open(self.conf_path, "w") as f:
            f.write(conf)

    def check_command(self) -> list[str]:
        return [LIGHTTPD, "-tt", "-f", self.conf_path]

    def run_command(self) -> list[str]:
        return [LIGHTTPD, "-D", "-f", self.conf_path]


def start_lighttpd(directory, site_conf: str, *, user: str = "www-data",
                 document_root: str | None = None) -> Lighttpd:
    """Start lighttpd and return it (also a context manager that stops it)."""
    return Lighttpd(directory, site_conf, user=user, document_root=document_root).start()
