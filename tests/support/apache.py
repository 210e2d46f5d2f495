"""A real Apache httpd for tests, never the system service: its own config file, ServerRoot,
PidFile, runtime dir and logs under a directory, run as ``apache2 -f CONF -DFOREGROUND``.

    with start_apache(pub, 'Include "/path/site.conf"') as web:
        urllib.request.urlopen(web.url("/"))

``site_conf`` goes at the end of a main config that listens on 127.0.0.1 on a free port,
serves ``document_root`` (default ``DIR/htdocs``), uses mpm_event and loads the modules a
FastCGI front end needs (proxy, proxy_fcgi, alias, setenvif, mime, dir, authz_core) plus
``modules``. Started as root, its children run as ``user`` (default www-data): the FastCGI
sockets must be reachable by that user, and ``directory`` searchable (not pytest's 0700
tmp_path).
"""
from __future__ import annotations

import os
import signal

from support.webserver import ForegroundServer

APACHE = "/usr/sbin/apache2"
MODULE_DIR = "/usr/lib/apache2/modules"
MODULES = ("mpm_event", "authz_core", "proxy", "proxy_fcgi", "alias", "setenvif", "mime",
           "dir")


class Apache(ForegroundServer):
    name = "apache2"
    stop_signal = signal.SIGTERM     # "stop": the parent kills its children and exits

    def __init__(self, directory, site_conf: str, *, user: str = "www-data",
                 document_root: str | None = None,
                 modules: tuple[str, ...] = ()) -> None:
        super().__init__(directory, "apache2")
        htdocs = document_root or os.path.join(self.dir, "htdocs")
        os.makedirs(htdocs, mode=0o755, exist_ok=True)
        loads = "\n".join(f"LoadModule {m}_module {MODULE_DIR}/mod_{m}.so"
                          for m in dict.fromkeys(MODULES + tuple(modules)))
        conf = f"""
ServerRoot "{self.dir}"
DefaultRuntimeDir "{self.dir}"
PidFile "{self.dir}/apache2.pid"
ErrorLog "{self.error_log_path}"
LogLevel warn
{loads}
Listen 127.0.0.1:{self.port}
ServerName localhost
User {user}
Group {user}
TypesConfig /etc/mime.types
DocumentRoot "{htdocs}"
<Directory />
    AllowOverride None
    Require all denied
</Directory>
<Directory "{htdocs}">
    Require all granted
</Directory>

{site_conf}
"""
        with open(self.conf_path, "w") as f:
            f.write(conf)

    def check_command(self) -> list[str]:
        return [APACHE, "-t", "-f", self.conf_path]

    def run_command(self) -> list[str]:
        return [APACHE, "-f", self.conf_path, "-DFOREGROUND"]


def start_apache(directory, site_conf: str, *, user: str = "www-data",
                 document_root: str | None = None,
                 modules: tuple[str, ...] = ()) -> Apache:
    """Start Apache and return it (also a context manager that stops it)."""
    return Apache(directory, site_conf, user=user, document_root=document_root,
                  modules=modules).start()
