"""A real lighttpd for tests: its own config, pid, logs and upload dir under a directory.

    with start_lighttpd(pub, 'include "/path/site.conf"') as web:
        urllib.request.urlopen(web.url("/"))

``site_conf`` is appended to a main config that listens on 127.0.0.1 on a free port,
serves ``document_root`` (default ``DIR/htdocs``) and loads mod_alias and mod_fastcgi.
lighttpd runs in the foreground (``-D``) as a child of the test. Started as root, it drops
to ``user`` (default www-data) after binding, so the FastCGI sockets it connects to must be
reachable by that user, and ``directory`` must be searchable by it (pass a public
directory, not pytest's tmp_path).

The life cycle (check the config, start, wait for the port, stop) is
support.webserver.ForegroundServer, shared with the nginx and Apache fixtures.
"""
from __future__ import annotations

import os
import pwd
import signal

from .webserver import ForegroundServer

LIGHTTPD = "/usr/sbin/lighttpd"


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
