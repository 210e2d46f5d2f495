"""Bad input at start-up, through the real daemon: a clear error naming the file, the line
and the key, and nothing started or changed. (Config-level cases are in test_config.py;
these are the ones only binding can find, plus `spawnd -t`.)"""
from __future__ import annotations

import os
import socket
import stat

import pytest

from support.daemon import Spawnd

POOL = """\
spawnd:
  shutdown_timeout: 5s
  admin_socket: admin.sock
pools:
  web:
    command: [/usr/sbin/fcgiwrap]
    user: nobody
    listen: {listen}
"""
LISTEN_LINE = 8   # the line of `listen:` above


def _run(tmp_path, listen):
    d = Spawnd(tmp_path, POOL.format(listen=listen))
    rc = d.run_to_exit()
    return d, rc


def _assert_refused(d, rc, *words):
    out = d.output()
    assert rc == 1, out
    assert f"{d.config_path}:{LISTEN_LINE}: pools.web.listen:" in out, out
    for w in words:
        assert w in out, out
    assert "started child" not in out, out
    assert "nothing started" in out, out


def test_tcp_port_in_use(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        d, rc = _run(tmp_path, f"tcp:127.0.0.1:{port}")
        _assert_refused(d, rc, "Address already in use")
    finally:
        holder.close()


def test_unix_path_held_by_live_server(tmp_path):
    path = str(tmp_path / "live.sock")
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(path)
    holder.listen(1)
    try:
        d, rc = _run(tmp_path, f"unix:{path}")
        _assert_refused(d, rc, "in use by a running server")
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        # The live server still works.
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        c.close()
    finally:
        holder.close()


def test_regular_file_at_socket_path_is_never_deleted(tmp_path):
    path = tmp_path / "data.sock"
    path.write_text("precious\n")
    d, rc = _run(tmp_path, f"unix:{path}")
    _assert_refused(d, rc, "is a regular file", "refusing to remove it")
    assert path.read_text() == "precious\n"


def test_directory_at_socket_path(tmp_path):
    path = tmp_path / "adir"
    path.mkdir()
    d, rc = _run(tmp_path, f"unix:{path}")
    _assert_refused(d, rc, "is a directory")
    assert path.is_dir()


def test_one_bad_pool_starts_no_pool(tmp_path):
    """Two pools, the second cannot bind: the first's socket is released, nothing runs."""
    blocker = tmp_path / "b.sock"
    blocker.write_text("x")
    good = tmp_path / "good.sock"
    d = Spawnd(tmp_path, f"""\
        pools:
          good:
            command: [/usr/sbin/fcgiwrap]
            user: nobody
            listen: unix:{good}
          bad:
            command: [/usr/sbin/fcgiwrap]
            user: nobody
            listen: unix:{blocker}
        """)
    rc = d.run_to_exit()
    out = d.output()
    assert rc == 1, out
    assert f"{d.config_path}:9: pools.bad.listen:" in out, out
    assert "started child" not in out
    assert not good.exists(), "the good pool's socket file must be cleaned up"


def test_stale_socket_is_replaced(tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()           # file left behind, nobody listening
    with Spawnd(tmp_path, POOL.format(listen=f"unix:{path}")) as d:
        d.start()
        d.wait_children("web", 1)
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)     # the new socket answers
        c.close()
        assert d.stop() == 0
    assert not os.path.exists(path), "spawnd removes the socket file it created"


def test_check_mode_reports_ok_and_binds_nothing(tmp_path):
    path = tmp_path / "never.sock"
    d = Spawnd(tmp_path, POOL.format(listen=f"unix:{path}"))
    rc = d.run_to_exit(args=["-t"])
    assert rc == 0, d.output()
    assert "configuration OK" in d.output()
    assert not path.exists()


@pytest.mark.parametrize("body, where", [
    ("pools:\n  web:\n    command: [/usr/sbin/fcgiwrap]\n    user: nobody\n    listen: tcp:1.2.3\n",
     ":5: pools.web.listen"),
    ("pools:\n  web:\n    command: [/usr/sbin/fcgiwrap]\n    user: nobody\n    lisen: unix:/x\n",
     ":5: pools.web.lisen"),
])
def test_check_mode_reports_errors(tmp_path, body, where):
    d = Spawnd(tmp_path, body)
    rc = d.run_to_exit(args=["-t"])
    out = d.output()
    assert rc == 1, out
    assert d.config_path + where in out, out
    assert "configuration OK" not in out
