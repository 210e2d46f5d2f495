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

from .webserver import ForegroundServer

NGINX = "/usr/sbin/nginx"


class Nginx(ForegroundServer):
    name = "nginx"
    stop_signal = signal.SIGQUIT      # graceful: finish open requests

    def __init__(self, directory, server_conf: str, *, http_conf: str = "",
                 user: str | None = None) -> None:
        super().__init__(directory, "nginx")
        os.makedirs(os.path.join(self.dir, "temp"), exist_ok=True)
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

    def check_command(self) -> list[str]:
        return [NGINX, "-t", "-q", "-c", self.conf_path, "-e", self.error_log_path]

    def run_command(self) -> list[str]:
        return [NGINX, "-c", self.conf_path, "-e", self.error_log_path]


def start_nginx(directory, server_conf: str, *, http_conf: str = "",
                user: str | None = None) -> Nginx:
    """Start nginx and return it (also a context manager that stops it)."""
    return Nginx(directory, server_conf, http_conf=http_conf, user=user).start()
