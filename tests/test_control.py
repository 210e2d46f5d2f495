"""The control plane through the real daemon: every spawnctl command, human and --json
output, exit codes, and an admin socket that no client can wedge."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from spawnd.fastcgi.protocol import ClientConnection, EndRequest, Stdout
from support.daemon import Spawnd, ctl, status
from support.proc import wait_for


def pool_pids(d, pool) -> list[int]:
    [p] = status(d, pool)["pools"]
    return [c["pid"] for c in p["children"]]


def wait_running(d: Spawnd) -> None:
    wait_for(lambda: all(p["state"] == "running" for p in status(d)["pools"]),
             what="every pool running")


def _config(tmp_path, pub, pools: str) -> str:
    return f"""\
spawnd:
  admin_socket: {tmp_path}/admin.sock
  shutdown_timeout: 10s
pools:
{pools}"""


def _cgi_pool(name, pub, n=2, extra=""):
    return f"""\
  {name}:
    command: [/usr/sbin/fcgiwrap]
    listen: unix:{pub}/{name}.sock
    user: nobody
    processes: {n}
{extra}"""


@pytest.fixture
def daemon(tmp_path, pub):
    with Spawnd(tmp_path, _config(tmp_path, pub, _cgi_pool("alpha", pub) + _cgi_pool("beta", pub, 1))) as d:
        d.start()
        wait_running(d)
        yield d


def test_status_human_and_json(daemon):
    js = status(daemon)
    assert [p["name"] for p in js["pools"]] == ["alpha", "beta"]
    alpha = js["pools"][0]
    assert alpha["state"] == "running" and alpha["desired"] == 2 and alpha["running"] == 2
    assert sorted(c["pid"] for c in alpha["children"]) == sorted(daemon.children("alpha"))
    for c in alpha["children"]:
        assert c["rss"] > 0 and c["state"] == "running" and c["uptime"] > 0
    # Options may come before the command too.
    sock = os.path.join(str(daemon.dir), "admin.sock")
    r = subprocess.run([sys.executable, "-m", "spawnd.ctl", "-s", sock, "--json", "status",
                        "beta"], capture_output=True, text=True, check=True)
    assert [p["name"] for p in json.loads(r.stdout)["pools"]] == ["beta"]
    human = ctl(daemon, "status", check=0).stdout
    assert re.search(r"^alpha\s+running\s+unix:\S+alpha\.sock\s+2/2\s+0$", human, re.M), human
    for pid in daemon.children("alpha") + daemon.children("beta"):
        assert re.search(rf"^\s+{pid}\s+running\s", human, re.M), human
    assert "\x1b[" not in human, "no colour when stdout is not a TTY"


def test_scale_up_and_down(daemon):
    r = ctl(daemon, "scale", "alpha", "5", check=0)
    assert r.stdout == "alpha: running, 5/5 running\n"
    assert len(daemon.children("alpha")) == 5
    r = ctl(daemon, "scale", "alpha", "1", "--json", check=0)
    assert json.loads(r.stdout)["running"] == 1
    wait_for(lambda: len(daemon.children("alpha")) == 1, what="alpha down to 1 child")
    assert len(daemon.children("beta")) == 1
    ctl(daemon, "scale", "alpha", "-1", check=2)    # argparse: not an option, not valid


def test_restart_replaces_every_child_and_keeps_the_socket(daemon, pub):
    before = set(pool_pids(daemon, "alpha"))
    inode = os.stat(pub / "alpha.sock").st_ino
    beta = pool_pids(daemon, "beta")
    r = ctl(daemon, "restart", "alpha", "--json", check=0)
    res = json.loads(r.stdout)
    assert res["replaced"] == 2
    after = set(pool_pids(daemon, "alpha"))
    assert len(after) == 2 and not after & before
    assert os.stat(pub / "alpha.sock").st_ino == inode
    assert pool_pids(daemon, "beta") == beta


def _fcgi_get(sock_path: str, script: str, conn: socket.socket | None = None) -> bytes:
    """One FastCGI request on a (possibly already connected) socket; returns STDOUT."""
    s = conn or socket.socket(socket.AF_UNIX)
    if conn is None:
        s.connect(sock_path)
    s.settimeout(10)
    cc = ClientConnection()
    s.sendall(cc.begin_request(1, params=[("SCRIPT_FILENAME", script),
                                          ("REQUEST_METHOD", "GET"), ("QUERY_STRING", "")])
              + cc.send_stdin(1, b""))
    out = b""
    while True:
        data = s.recv(65536)
        assert data, "connection closed before END_REQUEST"
        for ev in cc.receive_data(data):
            if isinstance(ev, Stdout):
                out += ev.data
            elif isinstance(ev, EndRequest):
                s.close()
                return out


def test_stop_keeps_socket_bound_and_clients_queue(daemon, pub):
    script = pub / "q.cgi"
    script.write_text("#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\nqueued ok\\n'\n")
    script.chmod(0o755)
    r = ctl(daemon, "stop", "alpha", check=0)
    assert r.stdout == "alpha: stopped\n"
    assert daemon.children("alpha") == []
    # No child, but the socket is there: a client connects and waits in the backlog.
    c = socket.socket(socket.AF_UNIX)
    c.connect(str(pub / "alpha.sock"))
    ctl(daemon, "start", "alpha", check=0)
    assert _fcgi_get("", str(script), conn=c).endswith(b"queued ok\n")
    assert len(daemon.children("alpha")) == 2


def test_signal_logs_and_follow(tmp_path, pub):
    script = pub / "usr1.sh"
    script.write_text("#!/bin/sh\ntrap 'echo got usr1 $$' USR1\necho hello $$\n"
                      "while :; do sleep 0.05; done\n")
    script.chmod(0o755)
    pool = f"""\
  talk:
    command: [{script}]
    listen: unix:{pub}/talk.sock
    user: nobody
    processes: 2
"""
    with Spawnd(tmp_path, _config(tmp_path, pub, pool)) as d:
        d.start()
        pids = d.wait_children("talk", 2)
        for pid in pids:
            d.wait_line(f"talk[{pid}]: hello {pid}")
        r = ctl(d, "logs", "talk", "-n", "1", "--json", check=0)
        assert len(json.loads(r.stdout)["lines"]) == 1
        follow = subprocess.Popen([sys.executable, "-m", "spawnd.ctl", "-s",
                                   f"{tmp_path}/admin.sock", "logs", "talk", "-n", "1", "-f"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            # Its first reply (one backlog line) means the follower is registered.
            assert follow.stdout.readline().startswith("[")
            r = ctl(d, "signal", "talk", "USR1", check=0)
            assert r.stdout == "talk: sent SIGUSR1 to 2 child(ren)\n"
            got = {follow.stdout.readline().strip() for _ in pids}
            assert got == {f"[{pid}] got usr1 {pid}" for pid in pids}, got
        finally:
            follow.kill()
            follow.wait()
        r = ctl(d, "logs", "talk", check=0)
        lines = r.stdout.splitlines()
        assert {f"[{p}] hello {p}" for p in pids} <= set(lines), lines
        ctl(d, "signal", "talk", "NOSUCHSIG", check=1)


def test_metrics_match_status(daemon):
    text = ctl(daemon, "metrics", check=0).stdout
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) spawnd_\w+ .+", line), line
            continue
        m = re.fullmatch(r'(spawnd_\w+)\{([^}]*)\} (\S+)', line)
        assert m, line
        samples[(m.group(1), m.group(2))] = float(m.group(3))
    assert samples[("spawnd_pool_running_children", 'pool="alpha"')] == 2
    assert samples[("spawnd_pool_up", 'pool="beta"')] == 1
    for pid in daemon.children("alpha"):
        assert samples[("spawnd_child_rss_bytes", f'pool="alpha",pid="{pid}"')] > 0


def test_errors_and_exit_codes(daemon, tmp_path):
    r = ctl(daemon, "stop", "nosuch", check=1)
    assert "no pool named 'nosuch'" in r.stderr
    r = ctl(daemon, "frobnicate", check=2)
    r = subprocess.run([sys.executable, "-m", "spawnd.ctl", "-s", f"{tmp_path}/none.sock",
                        "status"], capture_output=True, text=True)
    assert r.returncode == 3 and "does not exist: is spawnd running?" in r.stderr, r


def test_bad_lines_and_silent_clients_do_not_wedge_the_socket(daemon):
    path = os.path.join(str(daemon.dir), "admin.sock")
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(path)                    # connects and never says anything
    garbage = socket.socket(socket.AF_UNIX)
    garbage.connect(path)
    garbage.settimeout(10)
    f = garbage.makefile("rb")
    garbage.sendall(b"this is not json\n")
    assert json.loads(f.readline())["ok"] is False
    garbage.sendall(b'{"cmd": "status"}\n')       # the same connection still works
    assert json.loads(f.readline())["ok"] is True
    flood = socket.socket(socket.AF_UNIX)
    flood.connect(path)
    flood.settimeout(10)
    sent = 0
    try:
        chunk = b"x" * 65536
        while sent < 10 * 1024 * 1024:
            flood.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass                                 # the daemon gave up on it: fine
    reply = flood.makefile("rb").readline()
    assert b"request longer than" in reply, reply
    # Meanwhile and afterwards everybody else is served.
    assert status(daemon)["pools"][0]["name"] == "alpha"
    silent.close()
    garbage.close()
    flood.close()


def test_shutdown_command(daemon):
    r = ctl(daemon, "shutdown", check=0)
    assert r.stdout == "spawnd is shutting down\n"
    assert daemon.proc.wait(15) == 0
    assert not os.path.exists(os.path.join(str(daemon.dir), "admin.sock"))


def test_reload_add_remove_change_and_bad(tmp_path, pub):
    cfg = _config(tmp_path, pub, _cgi_pool("keep", pub) + _cgi_pool("gone", pub, 1))
    with Spawnd(tmp_path, cfg) as d:
        d.start()
        keep = sorted(d.wait_children("keep", 2))
        # Add a pool, remove one: the kept pool's pids do not change.
        with open(d.config_path, "w") as f:
            f.write(_config(tmp_path, pub, _cgi_pool("keep", pub) + _cgi_pool("new", pub, 1)))
        r = ctl(d, "reload", "--json", check=0)
        res = json.loads(r.stdout)
        assert res["added"] == ["new"] and res["removed"] == ["gone"], res
        assert res["unchanged"] == ["keep"], res
        assert sorted(pool_pids(d, "keep")) == keep
        assert not (pub / "gone.sock").exists()
        assert d.children("gone") == []
        assert len(d.children("new")) == 1

        # A bad config changes nothing and says where it is wrong.
        with open(d.config_path, "w") as f:
            f.write(_config(tmp_path, pub, _cgi_pool("keep", pub, extra="    procesess: 3\n")))
        r = ctl(d, "reload", check=1)
        assert f"{d.config_path}:10: pools.keep.procesess" in r.stderr, r.stderr
        assert "did you mean 'processes'" in r.stderr
        assert sorted(pool_pids(d, "keep")) == keep and len(d.children("new")) == 1

        # Changing the children's environment is a rolling restart; the socket stays.
        inode = os.stat(pub / "keep.sock").st_ino
        with open(d.config_path, "w") as f:
            f.write(_config(tmp_path, pub, _cgi_pool("keep", pub, extra="    env: {V: '2'}\n")))
        res = json.loads(ctl(d, "reload", "--json", check=0).stdout)
        assert res["restarted"] == ["keep"] and res["removed"] == ["new"], res
        now = pool_pids(d, "keep")
        assert len(now) == 2 and not set(now) & set(keep)
        assert os.stat(pub / "keep.sock").st_ino == inode

        # Moving the listen address binds the new socket first and removes the old one.
        with open(d.config_path, "w") as f:
            f.write(_config(tmp_path, pub, _cgi_pool("keep", pub, extra="    env: {V: '2'}\n")
                            .replace("keep.sock", "moved.sock")))
        ctl(d, "reload", check=0)
        assert (pub / "moved.sock").exists() and not (pub / "keep.sock").exists()
        [p] = status(d, "keep")["pools"]
        assert p["listen"] == f"unix:{pub}/moved.sock" and p["running"] == 2

        # SIGHUP reloads too.
        with open(d.config_path, "w") as f:
            f.write(_config(tmp_path, pub, _cgi_pool("keep", pub, 3, extra="    env: {V: '2'}\n")
                            .replace("keep.sock", "moved.sock")))
        d.signal(signal.SIGHUP)
        wait_for(lambda: len(d.children("keep")) == 3, what="SIGHUP reload scaling keep to 3")


@pytest.fixture
def reader_user():
    """A real user in a real admin group, removed afterwards."""
    subprocess.run(["groupadd", "-f", "spawnd-admins"], check=True)
    subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-G", "spawnd-admins",
                    "spawnd-reader"], check=False, capture_output=True)
    try:
        yield "spawnd-reader"
    finally:
        subprocess.run(["userdel", "spawnd-reader"], check=False, capture_output=True)
        subprocess.run(["groupdel", "spawnd-admins"], check=False, capture_output=True)


def _ctl_as(user, public_python, sock, *args):
    python, env = public_python
    return subprocess.run(["runuser", "-u", user, "--", python, "-m", "spawnd.ctl", "-s", sock,
                           *args], capture_output=True, text=True, env=env, timeout=30)


@pytest.mark.parametrize("mode", ["0660", "0666"])
def test_admin_group_reads_others_are_refused(tmp_path, pub, reader_user, public_python, mode):
    import grp
    sock = str(pub / "admin.sock")
    cfg = f"""\
spawnd:
  admin_socket: {sock}
  admin_mode: "{mode}"
  admin_group: spawnd-admins
pools:
{_cgi_pool("alpha", pub)}"""
    with Spawnd(tmp_path, cfg) as d:
        d.start()
        st = os.stat(sock)
        assert st.st_mode & 0o777 == int(mode, 8)
        assert st.st_gid == grp.getgrnam("spawnd-admins").gr_gid
        r = _ctl_as(reader_user, public_python, sock, "status", "--json")
        assert r.returncode == 0, r
        assert json.loads(r.stdout)["pools"][0]["name"] == "alpha"
        r = _ctl_as(reader_user, public_python, sock, "stop", "alpha")
        assert r.returncode == 1 and "permission denied" in r.stderr, r
        r = _ctl_as("nobody", public_python, sock, "status")
        if mode == "0660":      # the file's mode keeps nobody out
            assert r.returncode == 3 and "permission denied" in r.stderr, r
        else:                   # the file lets nobody in; SO_PEERCRED does not
            assert r.returncode == 1 and "permission denied: uid" in r.stderr, r
        assert len(d.children("alpha")) == 2


def test_request_command(daemon, pub):
    script = pub / "echo.cgi"
    script.write_text("#!/bin/sh\n"
                      "if [ \"$QUERY_STRING\" = missing ]; then printf 'Status: 404 Not Found\\r\\n'; fi\n"
                      "printf 'Content-Type: text/plain\\r\\nX-Method: %s\\r\\n\\r\\n' \"$REQUEST_METHOD\"\n"
                      "printf 'q=%s h=%s\\n' \"$QUERY_STRING\" \"$HTTP_X_TEST\"\n"
                      "cat\n")
    script.chmod(0o755)
    sf = f"SCRIPT_FILENAME={script}"
    r = ctl(daemon, "request", "alpha", "/x?a=1", "-e", sf, "-H", "X-Test: yes", check=0)
    assert r.stdout == ("Status: 200 OK\nContent-Type: text/plain\nX-Method: GET\n\n"
                        "q=a=1 h=yes\n"), r.stdout
    r = ctl(daemon, "request", "alpha", "/", "-e", sf, "-d", "posted body", "--json", check=0)
    res = json.loads(r.stdout)
    assert res["status"] == 200 and res["body"] == "q= h=\nposted body"
    assert ["X-Method", "POST"] in res["headers"]
    r = ctl(daemon, "request", "alpha", "/?missing", "-e", sf, check=1)
    assert r.stdout.startswith("Status: 404 Not Found\n")
    ctl(daemon, "request", "alpha", "-H", "no colon", check=2)
    ctl(daemon, "stop", "alpha", check=0)
    os.unlink(pub / "alpha.sock")        # nobody listens at that address any more
    r = ctl(daemon, "request", "alpha", "/", check=3)
    assert "cannot connect" in r.stderr


def test_every_command_in_human_and_json_form(daemon, pub):
    """Each command once with --json (a parsable reply with the expected fields) and once
    as a person reads it."""
    script = pub / "ok.cgi"
    script.write_text("#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\nok\\n'\n")
    script.chmod(0o755)
    sf = f"SCRIPT_FILENAME={script}"
    cases = [
        (["status", "beta"], lambda j: j["pools"][0]["name"] == "beta", r"^beta\s+running"),
        (["stop", "beta"], lambda j: j["state"] == "stopped", r"^beta: stopped$"),
        (["start", "beta"], lambda j: j["state"] == "running" and j["running"] == 1,
         r"^beta: running, 1 running$"),
        (["restart", "beta"], lambda j: j["replaced"] == 1,
         r"^beta: running, replaced 1 child\(ren\)$"),
        (["scale", "beta", "2"], lambda j: j["desired"] == 2 == j["running"],
         r"^beta: running, 2/2 running$"),
        (["signal", "beta", "CONT"], lambda j: j["signal"] == "SIGCONT" and len(j["children"]) == 2,
         r"^beta: sent SIGCONT to 2 child\(ren\)$"),
        (["reload"], lambda j: set(j) >= {"added", "removed", "restarted", "unchanged"},
         r"^reloaded; "),
        (["logs", "beta", "-n", "5"], lambda j: j["pool"] == "beta" and isinstance(j["lines"], list),
         None),
        (["metrics"], lambda j: "spawnd_pool_up" in j["text"], r"^# TYPE spawnd_pool_up gauge$"),
        (["request", "beta", "/", "-e", sf], lambda j: j["status"] == 200 and j["body"] == "ok\n",
         r"^Status: 200 OK$"),
    ]
    for args, check_json, human in cases:
        r = ctl(daemon, *args, "--json", check=0)
        assert check_json(json.loads(r.stdout)), (args, r.stdout)
        if human is not None:
            # The same command again in human form (state-changing ones are idempotent here,
            # except restart and scale, which are simply applied once more).
            r = ctl(daemon, *args, check=0)
            assert re.search(human, r.stdout, re.M), (args, r.stdout)
    r = ctl(daemon, "shutdown", "--json", check=0)
    assert json.loads(r.stdout) == {"shutting_down": True}
    assert daemon.proc.wait(15) == 0


def test_admin_socket_out_of_fds_pauses_instead_of_spinning(tmp_path, pub):
    """With spawnd out of file descriptors, a waiting admin client must not make the loop
    spin: spawnd pauses accepting, logs once per pause, and answers once fds are free."""
    import resource
    with Spawnd(tmp_path, _config(tmp_path, pub, _cgi_pool("alpha", pub, 1))) as d:
        d.start()
        wait_running(d)
        # Lower spawnd's fd limit to what it has open now: the next accept() gets EMFILE.
        used = len(os.listdir(f"/proc/{d.pid}/fd"))
        soft, hard = resource.prlimit(d.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (used, hard))
        c = socket.socket(socket.AF_UNIX)
        c.connect(d.admin_socket)
        wait_for(lambda: d.seen("pausing 0.5s"), what="the pause logged")
        with open(f"/proc/{d.pid}/stat") as f:
            t0 = sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
        time.sleep(1.0)     # measuring CPU over a fixed window is the point here
        with open(f"/proc/{d.pid}/stat") as f:
            cpu = sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13]) - t0
        assert cpu <= 10, f"{cpu} clock ticks of CPU in 1 s while out of fds: spinning"
        assert d.count("pausing 0.5s") <= 4
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (soft, hard))
        c.settimeout(5)
        c.sendall(b'{"cmd": "status"}\n')
        assert json.loads(c.makefile("rb").readline())["ok"] is True
        c.close()
