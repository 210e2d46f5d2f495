"""spawnd-fcgi: spawn-fcgi's (and multiwatch's) command line, run by spawnd's supervisor.

The command line is translated into the mapping a ``pools:`` entry of spawnd.yaml would
hold, and that mapping goes through the configuration loader (config.load), so every value
is checked by the same code as in the daemon; the loader's errors are then told in terms
of the options that produced them (``-p 70000: ...``). The resulting config.Config runs in
the daemon's Supervisor, in the foreground, until TERM/INT. Only what has no YAML
equivalent is decided here: spawn-fcgi's defaults and path rules, the refusals of what
spawn-fcgi does silently, the pidfile, and (multiwatch mode) the socket inherited on fd 0.

Modes
- ``spawnd-fcgi [spawn-fcgi options] -- PROGRAM ARGS``: binds -s/-p itself.
- ``spawnd-fcgi ... -- multiwatch [multiwatch options] [--] PROGRAM ARGS``: the multiwatch
  wrapper is folded into the pool (its -f multiplies -F, -t/-s/-r apply to the pool).
- ``spawnd-fcgi --multiwatch [multiwatch options] [--] PROGRAM ARGS``, or the program
  invoked through a link named ``multiwatch``: a drop-in for multiwatch itself; the
  listening socket is the one it inherits on fd 0 (from ``spawn-fcgi -n``).

Exit status: 0 after TERM/INT, 1 when a value is refused or the socket cannot be set up
(nothing is started then), 2 for a malformed command line.
"""
from __future__ import annotations

import dataclasses
import getopt
import os
import pwd
import re
import signal
import socket
import stat
import sys
import tempfile

import yaml

from . import __version__
from . import config as configmod
from . import systemd
from .log import log
from .supervisor import Supervisor

__all__ = ["main", "UsageError", "Refused", "Invocation", "parse", "pool_mapping"]

PROG = "spawnd-fcgi"

SPAWN_FCGI_USAGE = f"""\
Usage: {PROG} [options] -- <fcgiapp> [fcgi app arguments]
       {PROG} [options] -- multiwatch [multiwatch options] [--] <fcgiapp> [args]
       {PROG} --multiwatch [multiwatch options] [--] <fcgiapp> [args]

spawn-fcgi's command line, supervised by spawnd in the foreground: children are
restarted with backoff, their output is logged, TERM/INT stop them and exit.

Options:
 -f <path>      filename of the fcgi-application, run as /bin/sh -c 'exec <path>'
                (deprecated; give the program after -- instead)
 -d <directory> working directory of the children
 -a <address>   bind to IPv4/IPv6 address (with -p; default 0.0.0.0)
 -p <port>      bind to TCP port
 -s <path>      bind to Unix domain socket
 -M <mode>      Unix socket mode, octal (default: 0660 as far as the umask allows)
 -C <children>  set PHP_FCGI_CHILDREN=<children> for the children (php-cgi only)
 -F <children>  number of children to run (default 1)
 -b <backlog>   listen backlog (default 1024)
 -P <path>      pidfile: spawnd-fcgi's own pid, written once the children started
 -n             accepted for compatibility: spawnd-fcgi always stays in the foreground
 -v             show version
 -?, -h         show this help
(root only; refused when not root)
 -c <directory> chroot the children to directory
 -S             create the Unix socket outside the chroot (default: inside)
 -u <user>      children's user (required when root; -u root to really run as root)
 -g <group>     children's group (default: primary group of -u)
 -U <user>      Unix socket owner (default: -u)
 -G <group>     Unix socket group (default: primary group of -U, else -g)

See spawnd-fcgi(1) for the differences from spawn-fcgi and multiwatch.
"""

MULTIWATCH_USAGE = f"""\
Usage: multiwatch [options] [--] <application> [app arguments]
       {PROG} --multiwatch [options] [--] <application> [app arguments]

Runs and supervises copies of <application> on the listening socket inherited on
fd 0 (for example from spawn-fcgi -n), with spawnd's supervisor.

Options:
 -f, --forks=N      number of children (default 1)
 -r, --retry=N      accepted (>= 1); spawnd never gives up on a child, it backs off
 -t, --timeout=MS   a child that ran this long before dying resets the backoff
                    (default 10000)
 -s, --signal=SIG   signal that stops a child gracefully (default USR1)
 -v, --version      show version
 -h, --help         show this help
"""

# spawn-fcgi's getopt string, plus -b (1.6.4); multiwatch's GOption entries.
_SPAWN_FCGI_OPTS = "c:d:f:g:?hna:p:b:u:vC:F:s:P:U:G:M:S"
_MULTIWATCH_SHORT = "f:r:t:s:vh?"
_MULTIWATCH_LONG = ["forks=", "retry=", "timeout=", "signal=", "version", "help"]
_ROOT_ONLY = ("-c", "-S", "-u", "-g", "-U", "-G")
# Variables that address spawnd-fcgi itself (systemd), not its children.
_NOT_INHERITED = {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
                  "WATCHDOG_PID", "WATCHDOG_USEC"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class UsageError(Exception):
    """A malformed command line (exit 2, with the usage)."""


class Refused(Exception):
    """A well-formed command line that spawnd-fcgi will not run (exit 1); one message a line."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


@dataclasses.dataclass
class Invocation:
    """What the command line asked for, as given (strings), before any checking."""

    program: list[str] = dataclasses.field(default_factory=list)
    shell_app: str | None = None            # -f
    cwd: str | None = None                  # -d
    address: str | None = None              # -a
    port: str | None = None                 # -p
    unix: str | None = None                 # -s
    mode: str | None = None                 # -M
    php_children: str | None = None         # -C
    forks: str = "1"                        # -F
    backlog: str | None = None              # -b
    pidfile: str | None = None              # -P
    chroot: str | None = None               # -c
    socket_before_chroot: bool = False      # -S
    user: str | None = None                 # -u
    group: str | None = None                # -g
    socket_user: str | None = None          # -U
    socket_group: str | None = None         # -G
    # multiwatch (folded or standalone)
    multiwatch: bool = False                # the multiwatch wrapper is involved
    inherit_socket: bool = False            # standalone multiwatch: the socket is fd 0
    mw_forks: str = "1"
    mw_retry: str | None = None
    mw_timeout: str | None = None
    mw_signal: str | None = None
    given: list[str] = dataclasses.field(default_factory=list)   # options as typed
    show: str | None = None                 # "help" / "version"


# ---------------------------------------------------------------------------------------
# Parsing

def parse(argv: list[str], prog: str = PROG) -> Invocation:
    """Parse a command line (without argv[0]); *prog* is the name it was invoked as."""
    if os.path.basename(prog) == "multiwatch":
        inv = Invocation(inherit_socket=True)
        _parse_multiwatch(argv, inv)
        return inv
    if argv[:1] == ["--multiwatch"]:
        inv = Invocation(inherit_socket=True)
        _parse_multiwatch(argv[1:], inv)
        return inv
    inv = Invocation()
    try:
        opts, rest = getopt.getopt(argv, _SPAWN_FCGI_OPTS)
    except getopt.GetoptError as e:
        raise UsageError(str(e)) from None
    fields = {"-f": "shell_app", "-d": "cwd", "-a": "address", "-p": "port", "-s": "unix",
              "-M": "mode", "-C": "php_children", "-F": "forks", "-b": "backlog",
              "-P": "pidfile", "-c": "chroot", "-u": "user", "-g": "group",
              "-U": "socket_user", "-G": "socket_group"}
    for opt, value in opts:
        inv.given.append(opt)
        if opt in ("-h", "-?"):
            inv.show = "help"
            return inv
        if opt == "-v":
            inv.show = "version"
            return inv
        if opt == "-S":
            inv.socket_before_chroot = True
        elif opt in fields:
            setattr(inv, fields[opt], value)
        # -n: nothing to do, spawnd-fcgi always runs in the foreground
    if rest and os.path.basename(rest[0]) == "multiwatch":
        inv.multiwatch = True
        _parse_multiwatch(rest[1:], inv)
    else:
        inv.program = rest
    return inv


def _parse_multiwatch(argv: list[str], inv: Invocation) -> None:
    inv.multiwatch = True
    try:
        opts, rest = getopt.getopt(argv, _MULTIWATCH_SHORT, _MULTIWATCH_LONG)
    except getopt.GetoptError as e:
        raise UsageError(f"multiwatch: {e}") from None
    for opt, value in opts:
        name = {"--forks": "-f", "--retry": "-r", "--timeout": "-t", "--signal": "-s",
                "--version": "-v", "--help": "-h"}.get(opt, opt)
        inv.given.append("multiwatch " + name)
        if name in ("-h", "-?"):
            inv.show = "multiwatch-help"
            return
        if name == "-v":
            inv.show = "version"
            return
        setattr(inv, {"-f": "mw_forks", "-r": "mw_retry", "-t": "mw_timeout",
                      "-s": "mw_signal"}[name], value)
    inv.program = rest


# ---------------------------------------------------------------------------------------
# Command line -> the mapping a spawnd.yaml pool would hold

def _whole(text: str, option: str, lo: int) -> int:
    if not re.fullmatch(r"\d+", text.strip()) or int(text) < lo:
        raise ValueError(f"{option} {text}: expected a whole number >= {lo}")
    return int(text)


def _id(text: str) -> int | str:
    """A user/group as the loader takes it: digits are an id, anything else a name."""
    return int(text) if text.isdigit() else text


def pool_mapping(inv: Invocation, *, euid: int | None = None, cwd: str | None = None,
                 environ=None, umask: int | None = None, inherited: str | None = None
                 ) -> tuple[str, dict, dict[str, str], list[str]]:
    """(pool name, pool mapping, key path -> option text, refusals) for an Invocation.

    Raises UsageError for a malformed combination. A refused option (root-only options
    when not root, running children as root by omission, ...) is left out of the mapping
    and explained in the refusals, so the loader can still report everything else.
    *inherited* is the listen address of the socket on fd 0 (standalone multiwatch)."""
    euid = os.geteuid() if euid is None else euid
    cwd = os.getcwd() if cwd is None else cwd
    environ = os.environ if environ is None else environ
    if umask is None:
        umask = os.umask(0)
        os.umask(umask)
    errors: list[str] = []
    origin: dict[str, str] = {}
    inv = dataclasses.replace(inv)          # refused values are dropped from this copy

    def opt(flag: str, value: str | None) -> str:
        return f"{flag} {value}" if value is not None else flag

    def refuse(attr: str, message: str) -> None:
        errors.append(message)
        setattr(inv, attr, None)

    # -- the program ---------------------------------------------------------------------
    if inv.program and inv.shell_app is not None:
        errors.append(f"-f {inv.shell_app}: spawn-fcgi ignores -f when a program follows --; "
                      "give one or the other")
    if inv.program:
        command = list(inv.program)
        origin["command"] = ""              # the loader's message names the program
    elif inv.shell_app is not None:
        command = ["/bin/sh", "-c", f"exec {inv.shell_app}"]
        origin["command"] = opt("-f", inv.shell_app)
    else:
        raise UsageError("no FastCGI application given (put it after --)")
    program = command[0] if inv.program else (inv.shell_app.split() or [""])[0]

    # -- privileges: refuse what spawn-fcgi would silently ignore or do ---------------------
    if euid != 0:
        for flag, attr in (("-c", "chroot"), ("-u", "user"), ("-g", "group"),
                           ("-U", "socket_user"), ("-G", "socket_group")):
            if getattr(inv, attr) is not None:
                refuse(attr, f"{flag} {getattr(inv, attr)}: needs root (spawnd-fcgi runs as "
                             f"uid {euid}; spawn-fcgi would silently ignore it)")
        if inv.socket_before_chroot:
            errors.append("-S: needs root (spawn-fcgi would silently ignore it)")
    elif inv.user is None and not inv.inherit_socket:
        errors.append("-u: the children would run as root (spawn-fcgi does that silently); "
                      "give -u USER, or -u root if that is really meant")
        inv.user = "root"                   # refused already; let the loader check the rest
    if inv.user is not None and inv.user.isdigit() and inv.group is None:
        try:
            pwd.getpwuid(int(inv.user))
        except KeyError:
            refuse("user", f"-u {inv.user}: no user has this uid, so there is no primary group "
                           "(spawn-fcgi would keep gid 0, root's group); add the user to "
                           "/etc/passwd")
    if inv.socket_before_chroot and inv.chroot is None and euid == 0:
        errors.append("-S: applies to -c only (spawn-fcgi would ignore it)")
    if "/" in program and not os.path.isabs(program) and inv.cwd is None and inv.chroot is None:
        command[0] = os.path.normpath(os.path.join(cwd, command[0]))   # as execv() sees it

    # -- the socket ------------------------------------------------------------------------
    chroot = os.path.normpath(os.path.join(cwd, inv.chroot)) if inv.chroot else None
    if inherited is not None:
        listen = inherited
        origin["listen"] = "fd 0"
    elif inv.unix is not None and inv.port is not None:
        raise UsageError("either a Unix domain socket (-s) or a TCP port (-p), not both")
    elif inv.unix is not None:
        if inv.address is not None:
            errors.append(f"-a {inv.address}: applies to -p only (spawn-fcgi would ignore it)")
        if chroot and not inv.socket_before_chroot:        # bound inside the chroot
            path = os.path.normpath(os.path.join(chroot, inv.unix.lstrip("/")))
        else:
            path = os.path.normpath(os.path.join(cwd, inv.unix))
        listen = f"unix:{path}"
        origin["listen"] = opt("-s", inv.unix)
    elif inv.port is not None:
        host = inv.address or "0.0.0.0"
        listen = f"tcp:[{host}]:{inv.port}" if ":" in host else f"tcp:{host}:{inv.port}"
        origin["listen"] = (f"-a {inv.address} " if inv.address else "") + opt("-p", inv.port)
    else:
        raise UsageError("no socket given (use either -p or -s)")
    unix = listen.startswith("unix:")
    if not unix:
        for flag, attr in (("-M", "mode"), ("-U", "socket_user"), ("-G", "socket_group")):
            if getattr(inv, attr) is not None:
                refuse(attr, f"{flag} {getattr(inv, attr)}: applies to a Unix socket (-s) "
                             "only (spawn-fcgi would ignore it)")

    # -- numbers ---------------------------------------------------------------------------
    def number(text: str | None, option: str, lo: int, default=None):
        if text is None:
            return default
        try:
            return _whole(text, option, lo)
        except ValueError as e:
            errors.append(str(e))
            return default

    forks = number(inv.forks, "-F", 1, 1)
    mw_forks = number(inv.mw_forks, "multiwatch -f", 1, 1)
    number(inv.mw_retry, "multiwatch -r", 1)
    timeout_ms = number(inv.mw_timeout, "multiwatch -t", 0)
    php_children = number(inv.php_children, "-C", 0)
    backlog = number(inv.backlog, "-b", 1)

    # -- the pool --------------------------------------------------------------------------
    pool: dict = {"command": command, "listen": listen}
    sock: dict = {}
    if unix and inherited is None:
        mode = inv.mode if inv.mode is not None else f"{0o660 & ~umask:04o}"
        sock["mode"] = mode
        origin["socket.mode"] = opt("-M", inv.mode) if inv.mode is not None else f"umask {umask:04o}"
        if inv.socket_user is not None:
            sock["owner"] = _id(inv.socket_user)
            origin["socket.owner"] = opt("-U", inv.socket_user)
            if inv.socket_group is None:        # spawn-fcgi: -U's primary group, not -g
                try:
                    pw = (pwd.getpwuid(int(inv.socket_user)) if inv.socket_user.isdigit()
                          else pwd.getpwnam(inv.socket_user))
                    sock["group"] = pw.pw_gid
                    origin["socket.group"] = opt("-U", inv.socket_user)
                except KeyError:
                    pass                        # the loader reports the unknown owner
        if inv.socket_group is not None:
            sock["group"] = _id(inv.socket_group)
            origin["socket.group"] = opt("-G", inv.socket_group)
    if backlog is not None:
        sock["backlog"] = backlog
        origin["socket.backlog"] = opt("-b", inv.backlog)
    if sock:
        pool["socket"] = sock
    pool["processes"] = forks * mw_forks
    if inv.inherit_socket:
        # multiwatch runs its children as itself, in its own environment.
        pool["user"] = euid if euid != 0 else "root"
        pool["group"] = os.getegid()
        origin["user"] = origin["group"] = "the user multiwatch runs as"
    if inv.user is not None:
        pool["user"] = _id(inv.user)
        origin["user"] = opt("-u", inv.user)
    if inv.group is not None:
        pool["group"] = _id(inv.group)
        origin["group"] = opt("-g", inv.group)
    if chroot is not None:
        pool["chroot"] = chroot
        origin["chroot"] = opt("-c", inv.chroot)
    if inv.cwd is not None:
        pool["cwd"] = inv.cwd if chroot else os.path.normpath(os.path.join(cwd, inv.cwd))
        origin["cwd"] = opt("-d", inv.cwd)
    env = {k: v for k, v in environ.items() if _ENV_NAME.fullmatch(k) and k not in _NOT_INHERITED}
    if php_children is not None:
        env["PHP_FCGI_CHILDREN"] = str(php_children)
        origin["env.PHP_FCGI_CHILDREN"] = opt("-C", inv.php_children)
    origin["env"] = "the environment"
    pool["env"] = env
    if inv.multiwatch:
        pool["stop"] = {"signal": inv.mw_signal or "USR1"}
        origin["stop.signal"] = opt("multiwatch -s", inv.mw_signal or "USR1 (its default)")
        if timeout_ms is not None:
            pool["backoff"] = {"reset_after": f"{timeout_ms}ms"}
            origin["backoff.reset_after"] = opt("multiwatch -t", inv.mw_timeout)
    return _pool_name(program), pool, origin, errors


def _pool_name(program: str) -> str:
    """A pool name from the program: what its children's log lines start with."""
    name = re.sub(r"[^a-z0-9_-]+", "-", os.path.basename(program).lower()).strip("-")
    return name or "fcgi"


# ---------------------------------------------------------------------------------------
# Loading through config.load, and telling its errors in command-line terms

_ERROR = re.compile(r"(?P<file>.*?):(?P<line>\d+): (?P<key>[^:\s]+): (?P<msg>.*)", re.S)


def explain(line: str, yaml_path: str, name: str, origin: dict[str, str]) -> str:
    """``FILE:LINE: pools.NAME.key: message`` -> ``-option value: message``."""
    m = _ERROR.fullmatch(line)
    if not m or m.group("file") != yaml_path:
        return line
    key = m.group("key")
    prefix = f"pools.{name}"
    key = key[len(prefix):].lstrip(".") if key.startswith(prefix) else key
    while True:
        if key in origin:
            return f"{origin[key]}: {m.group('msg')}" if origin[key] else m.group("msg")
        if not key:
            return m.group("msg")
        key = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", key) if re.search(r"[.\[]", key) else ""


def load(name: str, pool: dict, origin: dict[str, str], directory: str,
         refusals: list[str] = ()) -> tuple[configmod.Config, str]:
    """Write the pool as spawnd.yaml into *directory*, load it with config.load.
    Returns (config, its path); raises Refused with *refusals* and the loader's errors
    in option terms."""
    path = os.path.join(directory, "spawnd-fcgi.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# generated by {PROG} from its command line\n")
        yaml.safe_dump({"pools": {name: pool}}, f, sort_keys=False, allow_unicode=True)
    try:
        config = configmod.load(path)
    except configmod.ConfigError as e:
        raise Refused([*refusals, *(explain(line, path, name, origin) for line in e.errors)]) from None
    if refusals:
        raise Refused(list(refusals))
    return config, path


# ---------------------------------------------------------------------------------------
# The socket inherited on fd 0 (multiwatch mode)

INHERITED = "stdin"      # the name the inherited socket is passed to the supervisor under


def inherited_socket() -> int:
    """A private copy of the listening socket on fd 0, which becomes /dev/null. It is
    handed to the supervisor like a socket systemd passes, and adopted by the pool whose
    listen is ``systemd:stdin``: the file, if any, stays spawn-fcgi's (never removed)."""
    info = systemd.socket_address(0)
    if info is None:
        raise Refused(["fd 0 is not a socket: multiwatch mode supervises the listening socket "
                       "it inherits, e.g. from spawn-fcgi -n; "
                       f"use {PROG} -s PATH or -p PORT to bind one"])
    if info.type != socket.SOCK_STREAM or not info.listening:
        raise Refused(["fd 0 is a socket but not a listening stream socket"])
    fd = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    return fd


# ---------------------------------------------------------------------------------------
# The pidfile

class Pidfile:
    """spawnd-fcgi's own pid, written once the children started, removed at exit."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.written = False

    def check(self) -> list[str]:
        """What makes the pidfile unsafe or impossible to write, before anything starts."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            parent = os.path.dirname(self.path)
            if not os.path.isdir(parent):
                return [f"-P {self.path}: directory {parent} does not exist"]
            if not os.access(parent, os.W_OK):
                return [f"-P {self.path}: directory {parent} is not writable"]
            return []
        if not stat.S_ISREG(st.st_mode):
            return [f"-P {self.path}: exists and is not a regular file; refusing to overwrite it"]
        return []

    def write(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        self.written = True

    def remove(self) -> None:
        """Remove the file if it still holds our pid (never someone else's)."""
        if not self.written:
            return
        try:
            with open(self.path) as f:
                if f.read().strip() == str(os.getpid()):
                    os.unlink(self.path)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------
# Running

class FcgiSupervisor(Supervisor):
    """The daemon's supervisor, with multiwatch's USR2: forwarded to every child (QUIT
    already stops gracefully like TERM in the daemon)."""

    def handle_sigusr2(self) -> None:
        for pool in self.pools.values():
            for ch in pool.live_children():
                try:
                    os.kill(ch.pid, signal.SIGUSR2)
                except ProcessLookupError:
                    pass


def _version() -> str:
    return (f"{PROG} (spawnd {__version__}): the command lines of spawn-fcgi 1.6 and "
            "multiwatch 1.0, supervised by spawnd\n")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    prog = os.path.basename(sys.argv[0] if prog is None else prog)
    argv = sys.argv[1:] if argv is None else argv
    as_multiwatch = prog == "multiwatch" or argv[:1] == ["--multiwatch"]
    usage = MULTIWATCH_USAGE if as_multiwatch else SPAWN_FCGI_USAGE
    try:
        inv = parse(argv, prog)
        if inv.show in ("help", "multiwatch-help"):
            sys.stdout.write(MULTIWATCH_USAGE if inv.show == "multiwatch-help" else usage)
            return 0
        if inv.show == "version":
            sys.stdout.write(_version())
            return 0
        if not inv.program and inv.shell_app is None:
            raise UsageError("no FastCGI application given (put it after --)")
        return _run(inv)
    except UsageError as e:
        sys.stderr.write(f"{prog}: {e}\n\n{usage}")
        return 2
    except Refused as e:
        for line in e.errors:
            log.error(line)
        log.error("nothing started")
        return 1


def _run(inv: Invocation) -> int:
    if inv.inherit_socket:
        passed = [(inherited_socket(), INHERITED)]
    else:
        try:
            passed = systemd.listen_fds()          # socket activation works as for spawnd
        except systemd.SystemdError as e:
            raise Refused([f"socket activation: {e}"]) from None
    try:
        name, pool, origin, refusals = pool_mapping(
            inv, inherited=f"systemd:{INHERITED}" if inv.inherit_socket else None)
        pidfile = Pidfile(inv.pidfile) if inv.pidfile else None
        if pidfile:
            refusals += pidfile.check()
        if inv.mw_retry is not None:
            log.info(f"multiwatch -r {inv.mw_retry}: spawnd never gives up on a child; "
                     "a failing one is restarted with exponential backoff")
        with tempfile.TemporaryDirectory(prefix="spawnd-fcgi.") as tmp:
            config, path = load(name, pool, origin, tmp, refusals)
            sup = FcgiSupervisor(config, path, passed=passed,
                                 notify=systemd.Notifier.from_environ())
            errors = sup.bind_all()
            passed = []                             # adopted or closed by bind_all
            if errors:
                raise Refused([explain(e, path, name, origin) for e in errors])
            failed = []
            if pidfile:
                def write_pidfile():
                    try:
                        pidfile.write()
                    except OSError as e:
                        log.error(f"-P {pidfile.path}: cannot write: {e.strerror or e}; stopping")
                        failed.append(e)
                        sup.shutdown()
                sup.call_later(0, write_pidfile)     # runs once run() has started the pool
            try:
                code = sup.run()
            finally:
                if pidfile:
                    pidfile.remove()
            return 1 if failed else code
    finally:
        for fd, _ in passed:
            os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
