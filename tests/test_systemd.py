"""spawnd.systemd against real sockets: a real AF_UNIX datagram listener stands in for
systemd's notify socket, and systemd-socket-activate passes fds exactly as systemd does."""
from __future__ import annotations

import json
import os
import pwd
import select
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import psutil
import pytest

from spawnd import systemd
from spawnd.log import log
from support.proc import free_port, wait_for


# ---------------------------------------------------------------------------------------
# helpers

class NotifyListener:
    """A bound AF_UNIX SOCK_DGRAM socket, as systemd's notify socket is (SO_PASSCRED on)."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(5)

    def receive(self, max_fds=8):
        """(text, fds, sender pid) of the next message; fails after 5 s."""
        space = socket.CMSG_SPACE(max_fds * 4) + socket.CMSG_SPACE(12)
        data, ancdata, flags, _ = self.sock.recvmsg(4096, space)
        assert not flags & socket.MSG_CTRUNC, "control data truncated"
        fds, pid = [], None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += [int.from_bytes(payload[i:i + 4], sys.byteorder)
                        for i in range(0, len(payload) - len(payload) % 4, 4)]
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = int.from_bytes(payload[:4], sys.byteorder)
        return data.decode(), fds, pid

    def pending(self) -> bool:
        return bool(select.select([self.sock], [], [], 0)[0])

    def drain(self) -> int:
        n = 0
        while self.pending():
            self.sock.recv(4096)
            n += 1
        return n

    def close(self):
        self.sock.close()


@pytest.fixture
def path_listener(tmp_path):
    path = str(tmp_path / "notify")
    listener = NotifyListener(path)
    try:
        yield path, listener
    finally:
        listener.close()


@pytest.fixture
def abstract_listener():
    name = f"spawnd-test-{uuid.uuid4().hex}"
    listener = NotifyListener("\0" + name)
    try:
        yield "@" + name, listener
    finally:
        listener.close()


class _LogFile:
    """spawnd's log written to a real file instead of fd 2, read back as text."""

    def __init__(self, f):
        self.f = f

    def getvalue(self) -> str:
        self.f.seek(0)
        return self.f.read().decode()


@pytest.fixture
def captured_log(monkeypatch, tmp_path):
    with open(tmp_path / "log", "w+b") as f:
        monkeypatch.setattr(log, "fd", f.fileno())
        monkeypatch.setattr(log, "journal", False)
        yield _LogFile(f)


def inode(fd):
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


# ---------------------------------------------------------------------------------------
# sd_notify

@pytest.mark.parametrize("which", ["path", "abstract"])
def test_messages_reach_a_path_or_abstract_socket(which, request):
    address, listener = request.getfixturevalue(f"{which}_listener")
    n = systemd.Notifier.from_environ({"NOTIFY_SOCKET": address})
    try:
        assert n.enabled
        assert n.ready("2 pools, 8 children") is True
        assert listener.receive() == ("READY=1\nSTATUS=2 pools, 8 children\n", [], os.getpid())
        assert n.status("php: 3/4 running") is True
        assert listener.receive()[0] == "STATUS=php: 3/4 running\n"
        assert n.stopping() is True
        assert listener.receive()[0] == "STOPPING=1\n"
        assert n.watchdog() is True
        assert listener.receive()[0] == "WATCHDOG=1\n"
        assert n.extend_timeout(2.5) is True
        assert listener.receive()[0] == "EXTEND_TIMEOUT_USEC=2500000\n"
    finally:
        n.close()


def test_reloading_carries_clock_monotonic_usec(path_listener):
    address, listener = path_listener
    n = systemd.Notifier.from_environ({"NOTIFY_SOCKET": address})
    try:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert n.reloading("reloading configuration")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        text, _, _ = listener.receive()
        lines = text.splitlines()
        assert lines[0] == "RELOADING=1" and lines[2] == "STATUS=reloading configuration", text
        name, _, value = lines[1].partition("=")
        assert name == "MONOTONIC_USEC" and before <= int(value) <= after, (before, text, after)
    finally:
        n.close()


def test_send_accepts_strings_and_keywords_in_one_datagram(path_listener):
    address, listener = path_listener
    n = systemd.Notifier.from_environ({"NOTIFY_SOCKET": address})
    try:
        assert n.send("READY=1", "STATUS=a", MAINPID=42)
        assert listener.receive()[0] == "READY=1\nSTATUS=a\nMAINPID=42\n"
        # whitespace (newlines from an error text) cannot break the message apart
        assert n.status("bad\nconfig:\n  line 3")
        assert listener.receive()[0] == "STATUS=bad config: line 3\n"
        for bad in (("READY=1\nSTOPPING=1",), ("READY",)):
            with pytest.raises(ValueError, match="NAME=value"):
                n.send(*bad)
        with pytest.raises(ValueError):
            n.send(STATUS="two\nlines")
        assert not listener.pending(), "a refused message was sent anyway"
    finally:
        n.close()


def test_without_notify_socket_everything_is_a_quiet_no_op(captured_log):
    n = systemd.Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert n.ready("x") is False and n.watchdog() is False and n.stopping() is False
    assert n.store_fds("a", [0]) is False
    assert n.watchdog_interval() is None
    assert captured_log.getvalue() == ""


@pytest.mark.parametrize("value", ["relative/path", "@", "vsock:2:1234", "/" + "x" * 200])
def test_unusable_notify_socket_is_reported_and_disables(value, captured_log):
    n = systemd.Notifier.from_environ({"NOTIFY_SOCKET": value})
    assert not n.enabled
    assert "NOTIFY_SOCKET" in captured_log.getvalue() and "off" in captured_log.getvalue()


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process():
    sock = "@spawnd-test-unused"
    me, other = str(os.getpid()), str(os.getpid() + 1)
    cases = [
        ({"WATCHDOG_USEC": "6000000"}, 3.0),
        ({"WATCHDOG_USEC": "6000000", "WATCHDOG_PID": me}, 3.0),
        ({"WATCHDOG_USEC": "6000000", "WATCHDOG_PID": other}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ]
    seen = [systemd.Notifier.from_environ({"NOTIFY_SOCKET": sock, **env}).watchdog_interval()
            for env, _ in cases]
    assert seen == [want for _, want in cases]


def test_a_full_queue_drops_without_blocking_and_logs_once(path_listener, captured_log):
    address, listener = path_listener
    n = systemd.Notifier.from_environ({"NOTIFY_SOCKET": address})
    try:
        sent, slowest, deadline = 0, 0.0, time.monotonic() + 10
        while True:
            t0 = time.monotonic()
            ok = n.status(f"message {sent}")
            slowest = max(slowest, time.monotonic() - t0)
            if not ok:
                break
            sent += 1
            assert time.monotonic() < deadline, f"queue never filled after {sent} messages"
        assert sent > 0 and slowest < 0.5, (sent, slowest)
        assert n.watchdog() is False                      # still full: dropped again
        warnings = captured_log.getvalue().splitlines()
        assert len(warnings) == 1 and "queue is full" in warnings[0], warnings
        assert listener.receive()[0] == "STATUS=message 0\n"   # nothing sent was lost
        assert listener.drain() == sent - 1
        assert n.ready() is True
        assert "again" in captured_log.getvalue().splitlines()[-1]
    finally:
        n.close()


def test_a_vanished_notify_socket_is_not_fatal(tmp_path, captured_log):
    n = systemd.Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.enabled
    assert n.ready() is False
    assert "dropped" in captured_log.getvalue()
    n.close()


def test_notify_socket_is_close_on_exec(path_listener):
    address, listener = path_listener
    n = systemd.Notifier.from_environ({"NOTIFY_SOCKET": address})
    try:
        n.watchdog()
        assert not os.get_inheritable(n._sock.fileno())
    finally:
        n.close()


# ---------------------------------------------------------------------------------------
# the fd store

def test_store_fds_passes_the_very_same_sockets(path_listener, tmp_path):
    address, listener = path_listener
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "pool.sock"))
    unix.listen()
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    n = systemd.Notifier.from_environ({"NOTIFY_SOCKET": address})
    received = []
    try:
        assert n.store_fds("php", [unix.fileno(), tcp.fileno()])
        text, received, _ = listener.receive()
        assert text == "FDSTORE=1\nFDNAME=php\n"
        assert len(received) == 2
        assert [inode(fd) for fd in received] == [inode(unix.fileno()), inode(tcp.fileno())]
        assert set(received).isdisjoint({unix.fileno(), tcp.fileno()})   # real new fds
        assert systemd.socket_address(received[1]).address == \
            f"tcp:127.0.0.1:{tcp.getsockname()[1]}"
        assert n.remove_fds("php")
        assert listener.receive() == ("FDSTOREREMOVE=1\nFDNAME=php\n", [], os.getpid())
    finally:
        for fd in received:
            os.close(fd)
        unix.close()
        tcp.close()
        n.close()


@pytest.mark.parametrize("name", ["", "a:b", "with space", "tab\t", "x" * 256, "é"])
def test_bad_fd_names_are_refused_before_sending(name, path_listener):
    address, listener = path_listener
    n = systemd.Notifier.from_environ({"NOTIFY_SOCKET": address})
    try:
        with pytest.raises(ValueError, match="bad fd name"):
            n.store_fds(name, [0])
        with pytest.raises(ValueError, match="bad fd name"):
            n.remove_fds(name)
        with pytest.raises(ValueError, match="at least one"):
            n.store_fds("ok", [])
        assert not listener.pending()
    finally:
        n.close()


# ---------------------------------------------------------------------------------------
# socket activation

ACTIVATED = textwrap.dedent("""
    import json, os, subprocess, sys
    from spawnd import systemd
    passed = systemd.listen_fds()
    out = {"passed": [], "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
           "child_env": sorted(l.split("=")[0] for l in subprocess.run(
               ["/usr/bin/env"], capture_output=True, text=True).stdout.splitlines()
               if l.startswith("LISTEN_")),
           "pick": {a: systemd.pick(passed, a) for a in sys.argv[1:]}}
    for fd, name in passed:
        info = systemd.socket_address(fd)
        out["passed"].append({"fd": fd, "name": name, "family": int(info.family),
                              "type": int(info.type), "listening": info.listening,
                              "address": info.address, "cloexec": not os.get_inheritable(fd)})
    print(json.dumps(out), flush=True)
""")


def test_listen_fds_through_systemd_socket_activate(tmp_path):
    script = tmp_path / "activated.py"
    script.write_text(ACTIVATED)
    path = str(tmp_path / "web.sock")
    port = free_port()
    tcp = f"tcp:127.0.0.1:{port}"
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", path, "-l", f"127.0.0.1:{port}", "--fdname=web:api",
         sys.executable, str(script), "systemd:web", "systemd:api", f"unix:{path}", tcp,
         "tcp:127.0.0.1:1", "systemd:nothing"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # systemd-socket-activate starts the program on the first connection
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as c:
                    c.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    f"socket {path} never answered ({e}); stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
                time.sleep(0.01)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["passed"] == [
        {"fd": 3, "name": "web", "family": socket.AF_UNIX, "type": socket.SOCK_STREAM,
         "listening": True, "address": f"unix:{path}", "cloexec": True},
        {"fd": 4, "name": "api", "family": socket.AF_INET, "type": socket.SOCK_STREAM,
         "listening": True, "address": tcp, "cloexec": True},
    ], err
    assert result["env_left"] == [] and result["child_env"] == [], result
    assert result["pick"] == {"systemd:web": 3, "systemd:api": 4, f"unix:{path}": 3, tcp: 4,
                              "tcp:127.0.0.1:1": None, "systemd:nothing": None}


def run_with_listen_env(tmp_path, env_code):
    """Run listen_fds() in a fresh process whose LISTEN_* are set by env_code (which sees
    `os`); print its result or its error."""
    script = tmp_path / "listen_env.py"
    script.write_text("import os, sys\nfrom spawnd import systemd\n" + env_code + textwrap.dedent("""
        try:
            print(systemd.listen_fds())
        except systemd.SystemdError as e:
            print("error:", e)
        print(sorted(k for k in os.environ if k.startswith("LISTEN_")))
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_fds_for_another_pid_are_ignored_and_still_unset(tmp_path):
    out = run_with_listen_env(tmp_path, textwrap.dedent("""
        r, w = os.pipe()
        assert r == 3, r
        os.environ.update(LISTEN_PID=str(os.getppid()), LISTEN_FDS="1", LISTEN_FDNAMES="x")
    """))
    assert out == ["[]", "[]"]


def test_listen_fds_without_names_and_an_fd_that_is_not_open(tmp_path):
    out = run_with_listen_env(tmp_path, textwrap.dedent("""
        r, w = os.pipe()
        assert (r, w) == (3, 4), (r, w)
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2")
    """))
    assert out == ["[(3, 'unknown'), (4, 'unknown')]", "[]"]
    out = run_with_listen_env(tmp_path, 'os.environ.update(LISTEN_PID=str(os.getpid()), '
                                        'LISTEN_FDS="2")\n')
    assert out[0].startswith("error: LISTEN_FDS=2 but fd 3 is not open"), out
    assert out[1] == "[]"


@pytest.mark.parametrize("env, message", [
    ({"LISTEN_FDS": "two"}, "LISTEN_FDS='two' is not a number"),
    ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"}, "names 1 file descriptor(s) but LISTEN_FDS=2"),
    ({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"}, "names 2 file descriptor(s) but LISTEN_FDS=1"),
])
def test_malformed_listen_variables_are_clear_errors(env, message):
    environ = {"LISTEN_PID": str(os.getpid()), **env, "OTHER": "kept"}
    with pytest.raises(systemd.SystemdError) as e:
        systemd.listen_fds(environ)
    assert message in str(e.value)
    assert environ == {"OTHER": "kept"}          # unset even when malformed


def test_listen_fds_leaves_the_environment_alone_when_asked():
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert systemd.listen_fds(environ, unset=False) == []
    assert environ == {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    with pytest.raises(systemd.SystemdError, match="LISTEN_PID='abc'"):
        systemd.listen_fds({"LISTEN_PID": "abc", "LISTEN_FDS": "1"})
    assert systemd.listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == []


# ---------------------------------------------------------------------------------------
# socket_address and pick

def test_socket_address_describes_what_an_fd_is(tmp_path):
    socks = []

    def make(family, kind, address, listen=True):
        s = socket.socket(family, kind)
        socks.append(s)
        if address is not None:
            s.bind(address)
        if listen:
            s.listen()
        return s.fileno()

    r, w = os.pipe()
    try:
        path = str(tmp_path / "a.sock")
        abstract = f"spawnd-test-{uuid.uuid4().hex}"
        unix = make(socket.AF_UNIX, socket.SOCK_STREAM, path)
        absu = make(socket.AF_UNIX, socket.SOCK_STREAM, "\0" + abstract)
        tcp4 = make(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0))
        udp = make(socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0), listen=False)
        bound_only = make(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0), listen=False)
        unnamed = make(socket.AF_UNIX, socket.SOCK_STREAM, None, listen=False)
        info = systemd.socket_address
        assert info(unix) == systemd.SocketAddress(socket.AF_UNIX, socket.SOCK_STREAM, True,
                                                   f"unix:{path}")
        assert info(absu).address == f"unix:@{abstract}"
        port = socks[2].getsockname()[1]
        assert info(tcp4) == systemd.SocketAddress(socket.AF_INET, socket.SOCK_STREAM, True,
                                                   f"tcp:127.0.0.1:{port}")
        assert info(udp).type == socket.SOCK_DGRAM and not info(udp).listening
        assert not info(bound_only).listening
        assert info(unnamed).address is None
        assert info(r) is None                        # a pipe
        assert info(9999) is None                     # not open
        if socket.has_ipv6:
            try:
                tcp6 = make(socket.AF_INET6, socket.SOCK_STREAM, ("::1", 0))
            except OSError:
                pass
            else:
                assert info(tcp6).address == f"tcp:[::1]:{socks[-1].getsockname()[1]}"
        for s in socks:                               # inspecting left every fd usable
            s.getsockname()
            assert not os.get_inheritable(s.fileno())
    finally:
        os.close(r)
        os.close(w)
        for s in socks:
            s.close()


def test_pick_matches_by_name_or_by_exact_address(tmp_path):
    a = socket.socket(socket.AF_UNIX)
    a.bind(str(tmp_path / "a.sock"))
    a.listen()
    b = socket.socket()
    b.bind(("127.0.0.1", 0))
    b.listen()
    c = socket.socket()                                # bound, not listening
    c.bind(("127.0.0.1", 0))
    try:
        port = b.getsockname()[1]
        passed = [(a.fileno(), "php"), (b.fileno(), "api"), (c.fileno(), "idle")]
        assert systemd.pick(passed, "systemd:php") == a.fileno()
        assert systemd.pick(passed, f"unix:{tmp_path}/a.sock") == a.fileno()
        assert systemd.pick(passed, f"tcp:127.0.0.1:{port}") == b.fileno()
        assert systemd.pick(passed, f"tcp:0.0.0.0:{port}") is None
        assert systemd.pick(passed, f"tcp:127.0.0.1:{c.getsockname()[1]}") is None
        assert systemd.pick([], "systemd:php") is None
        with pytest.raises(systemd.SystemdError, match="not a listening stream socket"):
            systemd.pick(passed, "systemd:idle")
        with pytest.raises(systemd.SystemdError, match="2 sockets named 'php'"):
            systemd.pick(passed + [(b.fileno(), "php")], "systemd:php")
    finally:
        for s in (a, b, c):
            s.close()


# ---------------------------------------------------------------------------------------
# the daemon as systemd sees it: notifications, the fd store, a restart that refuses nobody

CHILD = ("import socket\n"
         "s = socket.socket(fileno=0)\n"
         "while True:\n"
         "    c, _ = s.accept()\n"
         "    c.recv(100)\n"
         "    c.sendall(b'pong')\n"
         "    c.close()\n")

# What systemd does between fork and exec: the stored fds from 3 on, LISTEN_* for this pid.
EXEC_WITH_FDS = ("import os, sys\n"
                 "fd = int(sys.argv[1])\n"
                 "os.dup2(fd, 3)\n"
                 "os.close(fd)\n"
                 "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', "
                 "LISTEN_FDNAMES=sys.argv[2])\n"
                 "os.execv(sys.argv[3], sys.argv[3:])\n")


def collect(listener, until, timeout=10.0):
    """Messages (text, fds) until one satisfies `until`; fails with what was seen."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([listener.sock], [], [], 0.05)[0]:
            continue
        text, fds, _ = listener.receive()
        seen.append((text, fds))
        if until(text):
            return seen
    raise AssertionError(f"no matching notification within {timeout}s; seen: {seen}")


def start_daemon(tmp_path, env, argv_prefix=(), pass_fds=()):
    log_file = open(tmp_path / f"spawnd-{len(list(tmp_path.glob('spawnd-*.log')))}.log", "w+")
    proc = subprocess.Popen([*argv_prefix, sys.executable, "-m", "spawnd.main", "-c",
                             str(tmp_path / "spawnd.yaml")], env=env, pass_fds=pass_fds,
                            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    return proc, log_file


def stop_daemon(proc, log_file):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
    log_file.seek(0)
    return log_file.read()


def test_daemon_notifies_stores_its_socket_and_restarts_without_refusing(tmp_path, path_listener):
    address, listener = path_listener
    user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    sock_path = str(tmp_path / "web.sock")
    (tmp_path / "spawnd.yaml").write_text(textwrap.dedent(f"""\
        spawnd: {{admin_socket: {tmp_path}/admin.sock}}
        pools:
          web:
            command: [/usr/bin/python3, -c, {json.dumps(CHILD)}]
            listen: unix:{sock_path}
            user: {user}
        """))
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
    store = []
    first, log1 = start_daemon(tmp_path, env)
    second = log2 = None
    try:
        seen = collect(listener, lambda t: t.startswith("READY=1"))
        stored = [fds for text, fds in seen if text == "FDSTORE=1\nFDNAME=web\n"]
        assert len(stored) == 1 and len(stored[0]) == 1, seen
        store = stored[0]
        assert systemd.socket_address(store[0]).address == f"unix:{sock_path}"
        socket_file = os.stat(sock_path).st_ino
        assert "STATUS=1 pool(s)" in seen[-1][0], seen
        collect(listener, lambda t: t == "WATCHDOG=1\n", timeout=3)

        # systemctl restart: TERM, the daemon says STOPPING=1 and exits; systemd keeps
        # the stored socket, so a client connecting now is queued, not refused.
        first.terminate()
        collect(listener, lambda t: t.startswith("STOPPING=1"))
        assert first.wait(15) == 0, stop_daemon(first, log1)
        client = socket.socket(socket.AF_UNIX)
        client.settimeout(15)
        client.connect(sock_path)
        client.sendall(b"ping")

        second, log2 = start_daemon(tmp_path, env, pass_fds=(store[0],),
                                    argv_prefix=(sys.executable, "-c", EXEC_WITH_FDS,
                                                 str(store[0]), "web"))
        collect(listener, lambda t: t.startswith("READY=1"))
        assert client.recv(100) == b"pong"              # answered by the new daemon's child
        # the same socket, adopted: binding anew would have replaced the file (or, as
        # systemd still holds the old socket, found the path "in use" and refused to start)
        assert os.stat(sock_path).st_ino == socket_file
        client.close()
    finally:
        out1 = stop_daemon(first, log1)
        out2 = stop_daemon(second, log2) if second else ""
        for fd in store:
            os.close(fd)
    assert "exiting" in out1, out1
    assert "ready:" in out2, out2


def test_daemon_under_socket_activation_by_name_and_address_reload_and_watchdog(
        tmp_path, path_listener):
    """spawnd started by systemd-socket-activate with two sockets: one pool takes its fd by
    name (systemd:web), the other by address; READY/STATUS, the watchdog at half of
    WATCHDOG_USEC, RELOADING+READY around a reload, STOPPING on TERM."""
    from support.proc import environ as proc_environ, socket_inode, unix_listener_inode
    address, listener = path_listener
    user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    admin = str(tmp_path / "admin.sock")
    (tmp_path / "spawnd.yaml").write_text(textwrap.dedent(f"""\
        spawnd: {{admin_socket: {admin}}}
        pools:
          named:
            command: [/usr/bin/python3, -c, {json.dumps(CHILD)}]
            listen: systemd:web
            user: {user}
          byaddr:
            command: [/usr/bin/python3, -c, {json.dumps(CHILD)}]
            listen: unix:{b}
            user: {user}
        """))
    activate = ("systemd-socket-activate", "-l", a, "-l", b, "--fdname=web:other",
                "-E", f"NOTIFY_SOCKET={address}", "-E", "WATCHDOG_USEC=1000000")
    daemon, log = start_daemon(tmp_path, dict(os.environ), argv_prefix=activate)
    try:
        # systemd-socket-activate (v252) starts spawnd on the first connection; that
        # connection waits in the queue and is answered by the 'named' pool's child.
        client = socket.socket(socket.AF_UNIX)
        client.settimeout(15)
        wait_for(lambda: client.connect_ex(a) == 0, 10, what=f"{a} to accept a connection")
        client.sendall(b"ping")
        seen = collect(listener, lambda t: t.startswith("READY=1"))
        assert "STATUS=2 pool(s), 2/2 children running" in seen[-1][0], seen
        assert client.recv(100) == b"pong"
        client.close()

        def each_pool_has_a_child():
            out = subprocess.run([sys.executable, "-m", "spawnd.ctl", "-s", admin, "status",
                                  "--json"], capture_output=True, text=True, check=True)
            pools = {p["name"]: p for p in json.loads(out.stdout)["pools"]}
            return pools if all(p["children"] for p in pools.values()) else None
        pools = wait_for(each_pool_has_a_child, 10, what="a child in each pool")
        for name, path in (("named", a), ("byaddr", b)):
            [child] = [c["pid"] for c in pools[name]["children"]]
            assert socket_inode(child, 0) == unix_listener_inode(path), name
            assert not any(k.startswith("LISTEN_") for k in proc_environ(child)), name
        # Watchdog: every 0.5 s (half of WATCHDOG_USEC), sent by the loop.
        t0, pings = time.monotonic(), 0
        while time.monotonic() - t0 < 2.0:
            if select.select([listener.sock], [], [], 0.05)[0]:
                pings += listener.receive()[0] == "WATCHDOG=1\n"
        assert 3 <= pings <= 5, pings
        # A reload: RELOADING=1 with MONOTONIC_USEC, then READY=1.
        subprocess.run([sys.executable, "-m", "spawnd.ctl", "-s", admin, "reload"], check=True,
                       capture_output=True)
        seen = collect(listener, lambda t: t.startswith("READY=1"))
        texts = [t for t, _ in seen if "WATCHDOG" not in t]
        assert texts[0].startswith("RELOADING=1\nMONOTONIC_USEC="), texts
        daemon.terminate()
        collect(listener, lambda t: t.startswith("STOPPING=1"))
        assert daemon.wait(15) == 0
    finally:
        out = stop_daemon(daemon, log)
    assert "systemd passed a socket" not in out, out      # both were adopted
