"""spawnd-fcgi against Debian's spawn-fcgi (and multiwatch): same command lines, same
observable result; refusals where spawn-fcgi is dangerous or silent; supervision.

Everything runs for real as root: spawn-fcgi forks children and exits (they become
pytest's children, since the suite is a subreaper; teardown kills them by pid),
spawnd-fcgi stays in the foreground and is stopped with SIGTERM.
"""
from __future__ import annotations

import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import threading

import psutil
import pytest

from support.proc import environ, free_port, socket_inode, status, unix_listener_inode, wait_for

SPAWN_FCGI = "/usr/bin/spawn-fcgi"
SPAWND_FCGI = os.path.join(os.path.dirname(sys.executable), "spawnd-fcgi")
FCGIWRAP = "/usr/sbin/fcgiwrap"
PHP_CGI = "/usr/bin/php-cgi"
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       "LANG": "C.UTF-8", "COMPAT_MARK": "same-for-both"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(SPAWN_FCGI),
                                reason="needs root and Debian's spawn-fcgi")

# A FastCGI-shaped child for the supervision tests: waits in accept() on fd 0 (so spawnd
# sees it idle), reports on stderr which signal stopped it.
SIGNAL_CHILD = r"""
import os, signal, socket, sys
def bye(signum, frame):
    sys.stderr.write(f"stopped by {signal.Signals(signum).name}\n")
    sys.stderr.flush()
    os._exit(0)
for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT, signal.SIGHUP):
    signal.signal(s, bye)
sys.stderr.write(f"child {os.getpid()} ready\n")
sys.stderr.flush()
listener = socket.socket(fileno=0)
while True:
    listener.accept()[0].close()
"""


# ---- observing -------------------------------------------------------------------------

def tcp_listener_inode(port: int, v6: bool = False) -> int | None:
    """Inode of the listening TCP socket on port (from /proc/net/tcp[6]), or None."""
    with open("/proc/net/tcp6" if v6 else "/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "0A":
                return int(parts[9])
    return None


def backlog(kind: str, where) -> int | None:
    """The listen backlog ss reports (Send-Q of a listener) for a Unix path or TCP port."""
    out = subprocess.run(["ss", "-Hl", "-x" if kind == "unix" else "-t", "-n"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        local = parts[4] if kind == "unix" else parts[3]
        if (kind == "unix" and local == where) or (kind != "unix" and local.endswith(f":{where}")):
            return int(parts[3] if kind == "unix" else parts[2])
    return None


def observe(pids: list[int], listen: tuple) -> dict:
    """What a user can see of a spawner's result: the socket and each child.
    listen: ("unix", path[, name as bound]) or ("tcp" | "tcp6", port)."""
    kind, where = listen[0], listen[1]
    if kind == "unix":
        st = os.lstat(where)
        sock = {"type": "socket" if stat.S_ISSOCK(st.st_mode) else oct(st.st_mode),
                "mode": oct(stat.S_IMODE(st.st_mode)), "owner": (st.st_uid, st.st_gid)}
        # spawn-fcgi binds a relative -s as given (the kernel shows that name); spawnd-fcgi
        # binds the absolute path.
        names = [where, *listen[2:]]
        inode = next((i for i in map(unix_listener_inode, names) if i is not None), None)
        sock["backlog"] = next((b for b in (backlog(kind, n) for n in names) if b is not None), None)
    else:
        sock = {"backlog": backlog(kind, where)}
        inode = tcp_listener_inode(where, v6=kind == "tcp6")
    sock["listening"] = inode is not None
    children = []
    for pid in sorted(pids):
        p = psutil.Process(pid)
        s = status(pid)
        children.append({
            "argv": p.cmdline(),
            "uid": s["Uid"][:2], "gid": s["Gid"][:2], "groups": sorted(s["Groups"]),
            "env": environ(pid),
            "cwd": p.cwd(),
            "fd0_is_listener": socket_inode(pid, 0) == inode,
            "workers": len(p.children()),      # php-cgi's own children with -C
        })
    return {"socket": sock, "children": children}


def stop_pids(pids) -> None:
    """SIGKILL each process group (spawn-fcgi's children lead their own session) and reap
    what became ours."""
    for pid in pids:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            wait_for(lambda: not psutil.pid_exists(pid)
                     or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                     5, what=f"pid {pid} to go")


# ---- running ---------------------------------------------------------------------------

class Run:
    """spawnd-fcgi in the foreground, its output collected."""

    def __init__(self, args, *, cwd=None, env=ENV, argv0=None, executable=SPAWND_FCGI, **kw):
        self.lines: list[str] = []
        self.proc = subprocess.Popen([argv0 or executable, *args], executable=executable,
                                     stdin=kw.pop("stdin", subprocess.DEVNULL),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     cwd=cwd, env=env, **kw)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def children(self) -> list[int]:
        """Live children that have exec'd their program (a child between fork and exec
        still shows our command line, and fd 0 is not the socket yet)."""
        me = psutil.Process(self.proc.pid)
        ours = me.cmdline()
        return [p.pid for p in me.children()
                if p.status() != psutil.STATUS_ZOMBIE and p.cmdline() != ours]

    def wait_children(self, n: int) -> list[int]:
        def enough():
            assert self.proc.poll() is None, f"spawnd-fcgi exited:\n{self.output()}"
            kids = self.children()
            return kids if len(kids) == n else None
        return wait_for(enough, 10, what=f"{n} children of spawnd-fcgi")

    def wait_line(self, text: str) -> str:
        return wait_for(lambda: next((l for l in self.lines if text in l), None), 10,
                        what=f"a line with {text!r} in:\n{self.output()}")

    def stop(self, sig=signal.SIGTERM, timeout=15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(5)


def run_to_exit(args, **kw) -> tuple[int, str]:
    r = Run(args, **kw)
    try:
        rc = r.proc.wait(20)
    finally:
        r.stop()
    return rc, r.output()


def spawn_fcgi(args, pidfile, **kw) -> list[int]:
    """Run the real spawn-fcgi (it forks the children and exits); their pids."""
    res = subprocess.run([SPAWN_FCGI, "-P", str(pidfile), *args], env=ENV, capture_output=True,
                         text=True, timeout=20, **kw)
    assert res.returncode == 0, f"spawn-fcgi failed ({res.returncode}): {res.stderr}"
    return [int(x) for x in pidfile.read_text().split()]


# ---- the comparison table --------------------------------------------------------------

def _cases(tmp):
    """(id, spawn-fcgi arguments before --, program, listen, children) for tmp dir."""
    port, port6 = free_port(), free_port("::1")
    return {
        "php-cgi unix -C": (["-s", f"{tmp}/php.sock", "-u", "www-data", "-C", "2", "-M", "0660"],
                            [PHP_CGI], ("unix", f"{tmp}/php.sock"), 1),
        "fcgiwrap unix -F -U": (["-s", f"{tmp}/w.sock", "-F", "3", "-u", "www-data", "-U", "nobody",
                                 "-b", "64"], [FCGIWRAP, "-c", "2"], ("unix", f"{tmp}/w.sock"), 3),
        "fcgiwrap unix -G umask": (["-s", f"{tmp}/g.sock", "-u", "nobody", "-g", "www-data",
                                    "-G", "adm"], [FCGIWRAP], ("unix", f"{tmp}/g.sock"), 1),
        "fcgiwrap relative -s -d": (["-s", "rel.sock", "-u", "www-data", "-d", "/tmp"],
                                    [FCGIWRAP], ("unix", f"{tmp}/rel.sock", "rel.sock"), 1),
        "php-cgi tcp": (["-a", "127.0.0.1", "-p", str(port), "-F", "2", "-u", "www-data",
                         "-b", "32"], [PHP_CGI, "-q"], ("tcp", port), 2),
        "fcgiwrap tcp6": (["-a", "::1", "-p", str(port6), "-u", "nobody"], [FCGIWRAP],
                          ("tcp6", port6), 1),
    }


CASES = list(_cases("/x"))


def wait_workers(pids, args):
    """With -C N, wait until each php-cgi has forked its N workers."""
    if "-C" in args:
        n = int(args[args.index("-C") + 1])
        wait_for(lambda: all(len(psutil.Process(p).children()) == n for p in pids), 10,
                 what=f"{n} php-cgi workers under each of {pids}")


@pytest.mark.parametrize("case", CASES)
def test_same_result_as_spawn_fcgi(tmp_path, case):
    args, program, listen, n = _cases(tmp_path)[case]
    kw = dict(cwd=tmp_path, umask=0o027 if "umask" in case else 0o022)

    pids = spawn_fcgi([*args, "--", *program], tmp_path / "spawn-fcgi.pid", **kw)
    try:
        wait_for(lambda: all(psutil.Process(p).cmdline() == program for p in pids), 10,
                 what="spawn-fcgi's children to exec the program")
        wait_workers(pids, args)
        theirs = observe(pids, listen)
        their_pidfile = (tmp_path / "spawn-fcgi.pid").read_text()
    finally:
        stop_pids(pids)
    if listen[0] == "unix":
        os.unlink(listen[1])        # spawn-fcgi leaves it behind

    pidfile = tmp_path / "spawnd-fcgi.pid"
    run = Run([*args, "-P", str(pidfile), "--", *program], **kw)
    try:
        kids = run.wait_children(n)
        wait_for(pidfile.exists, 10, what="spawnd-fcgi's pidfile")
        wait_workers(kids, args)
        ours = observe(kids, listen)
        our_pidfile = pidfile.read_text()
    finally:
        assert run.stop() == 0, run.output()

    assert len(pids) == len(kids) == n
    assert theirs["socket"]["listening"] and ours["socket"]["listening"]
    assert ours["socket"] == theirs["socket"]
    assert ours["children"] == theirs["children"], "children differ"
    assert all(c["fd0_is_listener"] for c in ours["children"])
    if "-C" in args:
        assert all(c["env"]["PHP_FCGI_CHILDREN"] == "2" for c in ours["children"])
    # The documented difference: spawn-fcgi writes its children's pids (one a line, no
    # final newline); spawnd-fcgi writes its own pid, the one process to signal.
    assert their_pidfile == "\n".join(map(str, pids))
    assert our_pidfile == f"{run.proc.pid}\n"


def test_socket_owner_and_group_follow_spawn_fcgi_defaults(tmp_path):
    """-U without -G: the socket's group is -U's primary group, not -g."""
    sock = tmp_path / "o.sock"
    run = Run(["-s", str(sock), "-u", "www-data", "-g", "adm", "-U", "nobody", "--", FCGIWRAP])
    try:
        run.wait_children(1)
        st = os.lstat(sock)
        nobody = pwd.getpwnam("nobody")
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    finally:
        assert run.stop() == 0, run.output()


# ---- refusals --------------------------------------------------------------------------

def test_regular_file_at_socket_path_is_kept(tmp_path):
    victim = tmp_path / "data.sock"
    victim.write_text("precious\n")
    rc, out = run_to_exit(["-s", str(victim), "-u", "www-data", "--", FCGIWRAP])
    assert rc == 1, out
    assert "regular file" in out and "refusing to remove" in out, out
    assert victim.read_text() == "precious\n"

    # What spawn-fcgi does with the same command line: deletes the file, binds there.
    pids = spawn_fcgi(["-s", str(victim), "-u", "www-data", "--", FCGIWRAP], tmp_path / "p.pid")
    try:
        assert stat.S_ISSOCK(os.lstat(victim).st_mode), "spawn-fcgi kept the file?"
    finally:
        stop_pids(pids)


def test_unknown_uid_is_refused_not_run_with_gid_0(tmp_path):
    uid = next(u for u in range(42000, 43000) if _no_user(u))
    args = ["-s", str(tmp_path / "u.sock"), "-u", str(uid), "--", FCGIWRAP]
    rc, out = run_to_exit(args)
    assert rc == 1 and f"-u {uid}" in out and "gid 0" in out, out
    assert not (tmp_path / "u.sock").exists()

    pids = spawn_fcgi(args[:4] + ["--", FCGIWRAP], tmp_path / "p.pid")
    try:   # spawn-fcgi: the child runs with root's group
        assert status(pids[0])["Gid"][:2] == [0, 0] and status(pids[0])["Uid"][0] == uid
    finally:
        stop_pids(pids)


def _no_user(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return True
    return False


def test_port_out_of_range_is_refused_not_wrapped(tmp_path):
    port = free_port()
    rc, out = run_to_exit(["-a", "127.0.0.1", "-p", str(port + 65536), "-u", "nobody",
                           "--", FCGIWRAP])
    assert rc == 1 and f"-a 127.0.0.1 -p {port + 65536}" in out and "1-65535" in out, out
    assert tcp_listener_inode(port) is None

    # spawn-fcgi truncates the port to 16 bits and listens on another one.
    pids = spawn_fcgi(["-a", "127.0.0.1", "-p", str(port + 65536), "-u", "nobody", "--",
                       FCGIWRAP], tmp_path / "p.pid")
    try:
        assert socket_inode(pids[0], 0) == tcp_listener_inode(port)
    finally:
        stop_pids(pids)


def test_root_only_options_refused_when_not_root(pub):
    d = pub
    os.chmod(d, 0o777)
    as_nobody = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]
    args = ["-s", str(d / "n.sock"), "-u", "www-data", "-g", "www-data", "-U", "www-data",
            "-G", "www-data", "-c", "/", "-S", "--", FCGIWRAP]
    res = subprocess.run([*as_nobody, SPAWND_FCGI, *args], env=ENV, capture_output=True,
                         text=True, timeout=20)
    assert res.returncode == 1, res.stderr
    for flag in ("-u www-data", "-g www-data", "-U www-data", "-G www-data", "-c /", "-S"):
        assert f"{flag}: needs root" in res.stderr, res.stderr
    assert not (d / "n.sock").exists()

    # spawn-fcgi ignores them silently: the child runs as nobody.
    res = subprocess.run([*as_nobody, SPAWN_FCGI, "-P", str(d / "p.pid"), *args], env=ENV,
                         capture_output=True, text=True, timeout=20)
    pids = [int(x) for x in (d / "p.pid").read_text().split()]
    try:
        assert res.returncode == 0 and status(pids[0])["Uid"][0] == pwd.getpwnam("nobody").pw_uid
    finally:
        stop_pids(pids)


REFUSED = [
    # (arguments, exit status, text expected in the output)
    (["-Z", "--", FCGIWRAP], 2, "option -Z not recognized"),
    (["-s", "{tmp}/a.sock", "-u", "www-data"], 2, "no FastCGI application given"),
    (["-u", "www-data", "--", FCGIWRAP], 2, "no socket given"),
    (["-s", "{tmp}/a.sock", "-p", "9000", "-u", "www-data", "--", FCGIWRAP], 2, "not both"),
    (["-s", "{tmp}/a.sock", "-u", "www-data", "--", "/nonexistent/app"], 1,
     "program /nonexistent/app not found"),
    (["-s", "{tmp}/a.sock", "--", FCGIWRAP], 1, "-u: the children would run as root"),
    (["-s", "{tmp}/a.sock", "-u", "nosuchuser", "--", FCGIWRAP], 1,
     "-u nosuchuser: unknown user 'nosuchuser'"),
    (["-s", "{tmp}/a.sock", "-u", "www-data", "-M", "0x1ff", "--", FCGIWRAP], 1, "-M 0x1ff: bad octal mode"),
    (["-s", "{tmp}/a.sock", "-u", "www-data", "-F", "0", "--", FCGIWRAP], 1, "-F 0: expected a whole number >= 1"),
    (["-s", "{tmp}/a.sock", "-u", "www-data", "-C", "many", "--", FCGIWRAP], 1, "-C many: expected a whole number"),
    (["-s", "{tmp}/a.sock", "-u", "www-data", "-b", "70000", "--", FCGIWRAP], 1, "-b 70000: 70000 is out of range"),
    (["-s", "{tmp}/a.sock", "-a", "127.0.0.1", "-u", "www-data", "--", FCGIWRAP], 1, "-a 127.0.0.1: applies to -p only"),
    (["-p", "9000", "-M", "0600", "-u", "www-data", "--", FCGIWRAP], 1, "-M 0600: applies to a Unix socket"),
    (["-s", "{tmp}/a.sock", "-u", "www-data", "-d", "/nonexistent", "--", FCGIWRAP], 1,
     "-d /nonexistent: directory /nonexistent does not exist"),
    (["-s", "{tmp}/a.sock", "-u", "www-data", "-P", "{tmp}", "--", FCGIWRAP], 1,
     "exists and is not a regular file"),
    (["-s", "{tmp}/a.sock", "-u", "www-data", "-f", FCGIWRAP, "--", FCGIWRAP], 1,
     "give one or the other"),
    (["-c", "{tmp}", "-S", "-s", "{tmp}/a.sock", "-u", "www-data", "--", FCGIWRAP], 1,
     f"program {FCGIWRAP} not found inside chroot"),
    (["-s", "{tmp}/a.sock", "-u", "www-data", "--", "multiwatch", "-s", "NOPE", FCGIWRAP], 1,
     "multiwatch -s NOPE: bad signal"),
    (["-s", "{tmp}/a.sock", "-u", "www-data", "--", "multiwatch", "-r", "0", FCGIWRAP], 1,
     "multiwatch -r 0: expected a whole number >= 1"),
    (["-s", "{tmp}/a.sock", "-u", "www-data", "--", "multiwatch", "--bogus", FCGIWRAP], 2,
     "multiwatch: option --bogus not recognized"),
]


@pytest.mark.parametrize("args,rc,text", REFUSED, ids=[" ".join(a[:6]) for a, _, _ in REFUSED])
def test_refused(tmp_path, args, rc, text):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    got, out = run_to_exit(args, cwd=tmp_path)
    assert got == rc, out
    assert text in out, out
    assert ("Usage:" in out) == (rc == 2), out
    assert not (tmp_path / "a.sock").exists(), "a refused command line bound its socket"


def test_every_problem_is_reported_at_once(tmp_path):
    rc, out = run_to_exit(["-s", str(tmp_path / "a.sock"), "-u", "nosuch", "-M", "999",
                           "-F", "0", "-b", "0", "--", "/nonexistent/app"])
    assert rc == 1
    for text in ("-u nosuch: unknown user", "-M 999: bad octal mode", "-F 0:", "-b 0:",
                 "/nonexistent/app not found"):
        assert text in out, out


def test_help_and_version():
    for flag in ("-h", "-?"):
        rc, out = run_to_exit([flag])
        assert rc == 0 and out.startswith("Usage: spawnd-fcgi") and " -F <children>" in out, out
    rc, out = run_to_exit(["-v"])
    assert rc == 0 and "spawnd-fcgi" in out and "spawn-fcgi" in out, out


# ---- supervision -----------------------------------------------------------------------

def test_term_stops_children_and_removes_socket_and_pidfile(tmp_path):
    sock, pidfile = tmp_path / "t.sock", tmp_path / "t.pid"
    run = Run(["-s", str(sock), "-F", "2", "-u", "www-data", "-P", str(pidfile), "-n", "--",
               FCGIWRAP])
    try:
        # The pidfile appears only once the socket is bound and the children started.
        wait_for(pidfile.exists, 10, what="the pidfile")
        assert unix_listener_inode(str(sock)) is not None
        assert len(run.children()) >= 1
        kids = run.wait_children(2)
        assert pidfile.read_text() == f"{run.proc.pid}\n"
    finally:
        rc = run.stop(signal.SIGTERM)
    assert rc == 0, run.output()
    assert not sock.exists() and not pidfile.exists()
    assert not any(psutil.pid_exists(k) and psutil.Process(k).status() != psutil.STATUS_ZOMBIE
                   for k in kids)


def test_killed_child_is_restarted(tmp_path):
    sock = tmp_path / "k.sock"
    run = Run(["-s", str(sock), "-F", "2", "-u", "www-data", "--", FCGIWRAP])
    try:
        first = run.wait_children(2)
        os.kill(first[0], signal.SIGKILL)
        again = wait_for(lambda: (lambda k: k if len(k) == 2 and first[0] not in k else None)(
            run.children()), 10, what="a replacement child")
        assert first[1] in again
        inode = unix_listener_inode(str(sock))
        assert all(socket_inode(pid, 0) == inode for pid in again)
        run.wait_line("killed by SIGKILL")
    finally:
        assert run.stop() == 0, run.output()


def test_children_stderr_is_forwarded(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(SIGNAL_CHILD)
    run = Run(["-s", str(tmp_path / "e.sock"), "-u", "root", "--", "/usr/bin/python3", str(script)])
    try:
        pid = run.wait_children(1)[0]
        run.wait_line(f"python3[{pid}]: child {pid} ready")
    finally:
        assert run.stop() == 0, run.output()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


# ---- multiwatch --------------------------------------------------------------------------

def test_multiwatch_wrapper_is_folded_into_the_pool(tmp_path):
    """`spawn-fcgi ... -- multiwatch -f 3 -- app` becomes one pool of F x f children of
    spawnd-fcgi itself (no multiwatch process), all on the one socket."""
    script = tmp_path / "child.py"
    script.write_text(SIGNAL_CHILD)
    sock = tmp_path / "m.sock"
    run = Run(["-s", str(sock), "-F", "2", "-n", "-u", "root", "--", "/usr/bin/multiwatch",
               "-f", "3", "-t", "5000", "--", "/usr/bin/python3", str(script)])
    try:
        kids = run.wait_children(6)
        assert all(psutil.Process(k).cmdline()[1:] == [str(script)] for k in kids)
        inode = unix_listener_inode(str(sock))
        assert all(socket_inode(k, 0) == inode for k in kids)
    finally:
        assert run.stop() == 0, run.output()
    assert not sock.exists()
    assert not [k for k in kids if psutil.pid_exists(k)
                and psutil.Process(k).status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("args,signum,reset_after", [
    ([], signal.SIGTERM, 10.0),                                        # spawn-fcgi alone
    (["multiwatch"], signal.SIGUSR1, 10.0),                            # multiwatch's defaults
    (["multiwatch", "--signal=QUIT", "-t", "2500"], signal.SIGQUIT, 2.5),
    (["multiwatch", "-s", "HUP", "--timeout", "60000", "--"], signal.SIGHUP, 60.0),
])
def test_multiwatch_options_become_pool_settings(tmp_path, args, signum, reset_after):
    """Checked on the pool the configuration loader builds (how a child is then retired,
    e.g. only between requests, is the pool's business: see test_children.py)."""
    name, pool, origin, refused = mapping(["-s", "/run/x.sock", "-u", "nobody", "--", *args,
                                           "/usr/bin/python3"])
    config, _ = compat.load(name, pool, origin, str(tmp_path), refused)
    p = config.pools[name]
    assert (p.stop.signal, p.backoff.reset_after, p.command) == (signum, reset_after,
                                                                   ("/usr/bin/python3",))


@pytest.mark.parametrize("how", ["link named multiwatch", "--multiwatch"])
def test_standalone_multiwatch_under_real_spawn_fcgi(tmp_path, how):
    """spawn-fcgi -n -- multiwatch ...: the multiwatch drop-in supervises the socket it
    inherits on fd 0; USR2 is forwarded to the children, TERM stops them."""
    script = tmp_path / "child.py"
    script.write_text(SIGNAL_CHILD)
    sock = tmp_path / "i.sock"
    if how == "--multiwatch":
        watcher = [SPAWND_FCGI, "--multiwatch"]
    else:
        link = tmp_path / "multiwatch"
        link.symlink_to(SPAWND_FCGI)
        watcher = [str(link)]
    run = Run(["-s", str(sock), "-n", "--", *watcher, "-f", "2", "-s", "TERM",
               "--", "/usr/bin/python3", str(script)], executable=SPAWN_FCGI)
    try:
        kids = run.wait_children(2)      # spawn-fcgi -n exec'd the watcher: same pid
        inode = unix_listener_inode(str(sock))
        assert all(socket_inode(k, 0) == inode for k in kids)
        for k in kids:                   # their handlers are installed
            run.wait_line(f"child {k} ready")
        run.proc.send_signal(signal.SIGUSR2)
        try:
            wait_for(lambda: run.output().count("stopped by SIGUSR2") == 2, 10,
                     what="both children to get USR2")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{run.output()}") from None
        kids = run.wait_children(2)      # and they are replaced
    finally:
        assert run.stop() == 0, run.output()
    assert not [k for k in kids if psutil.pid_exists(k)
                and psutil.Process(k).status() != psutil.STATUS_ZOMBIE]
    assert sock.exists(), "the socket belongs to spawn-fcgi, not to the watcher"


def test_standalone_multiwatch_needs_a_listening_socket_on_fd0(tmp_path):
    rc, out = run_to_exit(["--multiwatch", "-f", "2", "--", FCGIWRAP])
    assert rc == 1 and "fd 0 is not a socket" in out and "spawn-fcgi -n" in out, out
    with socket.socket() as s:          # a socket, but not a listening one
        rc, out = run_to_exit(["--multiwatch", "--", FCGIWRAP], stdin=s.fileno())
    assert rc == 1 and "not a listening stream socket" in out, out


# ---- the translation itself (no processes) ------------------------------------------------

from spawnd import compat  # noqa: E402


def mapping(argv, **kw):
    kw = {"euid": 0, "cwd": "/srv/app", "environ": dict(ENV), "umask": 0o022, **kw}
    return compat.pool_mapping(compat.parse(argv), **kw)


def test_parse_like_getopt_without_permutation():
    inv = compat.parse(["-nS", "-p9000", "-uwww-data", "/usr/bin/php-cgi", "-c", "/etc/php.ini"])
    assert (inv.port, inv.user, inv.socket_before_chroot) == ("9000", "www-data", True)
    assert inv.chroot is None and inv.program == ["/usr/bin/php-cgi", "-c", "/etc/php.ini"]
    assert compat.parse(["-?"]).show == "help"
    folded = compat.parse(["-s", "x", "--", "/opt/bin/multiwatch", "--forks=3", "-t", "500",
                           "--", "app", "-f", "1"])
    assert folded.multiwatch and not folded.inherit_socket
    assert (folded.mw_forks, folded.mw_timeout, folded.program) == ("3", "500", ["app", "-f", "1"])
    standalone = compat.parse(["--forks", "2", "app"], prog="/usr/local/bin/multiwatch")
    assert standalone.inherit_socket and standalone.mw_forks == "2"
    with pytest.raises(compat.UsageError):
        compat.parse(["-p"])


def test_mapping_of_a_full_command_line():
    name, pool, origin, refused = mapping(
        ["-s", "run/php.sock", "-d", "www", "-u", "www-data", "-g", "adm", "-U", "nobody",
         "-b", "64", "-F", "2", "-C", "3", "--", "./bin/php-cgi8.2", "-q"],
        environ={**ENV, "LISTEN_FDS": "1", "NOTIFY_SOCKET": "/x", "BAD-NAME": "x"})
    assert refused == [] and name == "php-cgi8-2"
    nobody = pwd.getpwnam("nobody")
    assert pool == {
        "command": ["./bin/php-cgi8.2", "-q"],          # relative to cwd (-d), by the loader
        "listen": "unix:/srv/app/run/php.sock",
        "socket": {"mode": "0640", "owner": "nobody", "group": nobody.pw_gid, "backlog": 64},
        "processes": 2, "user": "www-data", "group": "adm", "cwd": "/srv/app/www",
        "env": {**ENV, "PHP_FCGI_CHILDREN": "3"},
    }
    assert origin["socket.group"] == "-U nobody" and origin["env.PHP_FCGI_CHILDREN"] == "-C 3"


def test_mapping_paths_with_chroot_and_relative_program():
    _, pool, _, _ = mapping(["-c", "jail", "-s", "/run/a.sock", "-d", "www", "-u", "www-data",
                             "--", "bin/app"])
    assert pool["chroot"] == "/srv/app/jail"
    assert pool["listen"] == "unix:/srv/app/jail/run/a.sock"      # bound inside the chroot
    assert pool["cwd"] == "www" and pool["command"] == ["bin/app"]  # both inside the chroot
    _, pool, _, _ = mapping(["-c", "/jail", "-S", "-s", "a.sock", "-u", "www-data", "--", "app"])
    assert pool["listen"] == "unix:/srv/app/a.sock"                # -S: before chroot()
    _, pool, _, _ = mapping(["-s", "/a.sock", "-u", "www-data", "--", "./app"])
    assert pool["command"] == ["/srv/app/app"]                     # as execv() sees it


def test_mapping_tcp_and_multiwatch():
    _, pool, _, _ = mapping(["-a", "::1", "-p", "9000", "-F", "2", "-u", "nobody", "--",
                             "multiwatch", "-f", "3", "-t", "2500", "app"])
    assert pool["listen"] == "tcp:[::1]:9000" and "socket" not in pool
    assert pool["processes"] == 6
    assert pool["stop"] == {"signal": "USR1"} and pool["backoff"] == {"reset_after": "2500ms"}
    _, pool, _, _ = mapping(["-p", "9000", "-u", "nobody", "--", "app"])
    assert pool["listen"] == "tcp:0.0.0.0:9000" and "stop" not in pool


def test_refused_options_are_left_out_of_the_mapping():
    _, pool, _, refused = mapping(["-s", "/a.sock", "-u", "www-data", "-g", "adm", "-c", "/",
                                   "-U", "www-data", "--", "app"], euid=1000)
    assert [r.split(":")[0] for r in refused] == ["-c /", "-u www-data", "-g adm", "-U www-data"]
    assert not {"user", "group", "chroot"} & set(pool) and "owner" not in pool["socket"]


def test_loader_errors_are_told_as_options():
    origin = {"listen": "-a 127.0.0.1 -p 70000", "command": "", "env.PHP_FCGI_CHILDREN": "-C 3",
              "env": "the environment"}
    f = "/tmp/x/spawnd-fcgi.yaml"
    assert compat.explain(f"{f}:3: pools.app.listen: bad port", f, "app", origin) == \
        "-a 127.0.0.1 -p 70000: bad port"
    assert compat.explain(f"{f}:4: pools.app.command[0]: not found", f, "app", origin) == "not found"
    assert compat.explain(f"{f}:9: pools.app.env.FOO: bad", f, "app", origin) == "the environment: bad"
    assert compat.explain("/etc/other.yaml:1: x: y", f, "app", origin) == "/etc/other.yaml:1: x: y"
