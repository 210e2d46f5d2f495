"""A Python that children running as another user (www-data, nobody) can use.

The test suite runs from a venv that may live under /root (and be built from a pyenv
interpreter under /root/.pyenv): unreadable for www-data. public_python() gives the
distro's /usr/bin/python3 (which has PyYAML and psutil from Debian packages) plus
PYTHONPATH pointing at a fresh, world-readable copy of this repository's spawnd package.
"""
from __future__ import annotations

import os
import shutil

PYTHON = "/usr/bin/python3"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(REPO, "spawnd")


def _make_public(root: str) -> None:
    """0755 for directories (and root itself), 0644 for files."""
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)


def public_python(tmp_root: str) -> tuple[str, dict[str, str]]:
    """Copy spawnd/ into tmp_root/lib and return (python, env) for running it as anyone.

    tmp_root and every directory above it must be searchable by the other user (pytest's
    tmp_path is 0700: pass a directory made under /tmp with mode 0755). env is a complete,
    minimal environment: PATH, LANG, PYTHONPATH, and PYTHONDONTWRITEBYTECODE (the copy is
    not writable by the children, so they should not try to cache bytecode in it)."""
    lib = os.path.join(tmp_root, "lib")
    os.makedirs(lib, exist_ok=True)
    shutil.copytree(PACKAGE, os.path.join(lib, "spawnd"), dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _make_public(tmp_root)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": os.environ.get("LANG", "C.UTF-8"),
           "PYTHONPATH": lib, "PYTHONDONTWRITEBYTECODE": "1"}
    return PYTHON, env
