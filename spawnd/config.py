"""Configuration loading: YAML files -> frozen dataclasses.

The main file and the files its ``spawnd.include`` globs match are composed into
YAML *nodes* (PyYAML's SafeLoader), and values are built from the nodes here, so the
line of every key is known and duplicate keys can be refused (PyYAML itself keeps the
last one silently). Every problem in every file is collected; :func:`load` then raises
one :class:`ConfigError` listing them all, each as ``FILE:LINE: key.path: message``.

Checks that depend on a value that was already found bad are skipped, so one mistake
gives one error.
"""

from __future__ import annotations

import difflib
import glob
import grp
import ipaddress
import os
import pwd
import re
import resource
import shlex
import signal
import socket
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import yaml

__all__ = [
    "ConfigError", "load", "parse_duration", "parse_size", "parse_mode", "parse_listen",
    "Listen", "SocketOptions", "Processes", "Backoff", "Stop", "Recycle", "Probe", "Pool",
    "Daemon", "Config", "DEFAULT_PATH",
]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ConfigError(Exception):
    """Every problem found in a configuration, one ``FILE:LINE: key.path: message`` each."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


# ---------------------------------------------------------------------------------------
# The objects the rest of spawnd codes against

@dataclass(frozen=True)
class Listen:
    """Where a pool listens: ``unix:PATH``, ``tcp:HOST:PORT`` or ``systemd:NAME``."""

    kind: str
    path: str | None = None
    host: str | None = None
    port: int | None = None
    name: str | None = None

    @property
    def family(self):
        if self.kind == "unix":
            return socket.AF_UNIX
        if self.kind == "tcp":
            return socket.AF_INET6 if ":" in self.host else socket.AF_INET
        return None

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        return f"systemd:{self.name}"


@dataclass(frozen=True)
class SocketOptions:
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    backlog: int = 1024


@dataclass(frozen=True)
class Processes:
    min: int
    max: int
    interval: float = 0.5        # scaling: how often the listen queue is sampled (min < max)
    idle_after: float = 30.0     # scaling: a child idle this long is retired (never below min)


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.1
    max: float = 30.0
    reset_after: float = 10.0


@dataclass(frozen=True)
class Stop:
    signal: int = signal.SIGTERM
    timeout: float = 10.0
    when: str = "idle"          # idle: signal a retiring child only while it waits in accept()


@dataclass(frozen=True)
class Recycle:
    max_age: float | None = None
    max_rss: int | None = None
    max_cpu: float | None = None


@dataclass(frozen=True)
class Probe:
    uri: str = "/"
    interval: float = 10.0
    timeout: float = 2.0
    failures: int = 3
    expect: int = 200
    params: tuple[tuple[str, str], ...] = ()   # FastCGI params added to the probe request
    ready: bool = False          # a new child is ready only once seen in accept() + a probe passed
    start_timeout: float = 60.0  # ... and fails if that takes longer


@dataclass(frozen=True)
class Pool:
    name: str
    command: tuple[str, ...]
    listen: Listen
    socket: SocketOptions
    processes: Processes
    user: str | None
    uid: int
    gid: int
    groups: tuple[int, ...]
    cwd: str | None
    chroot: str | None
    umask: int | None
    env: tuple[tuple[str, str], ...]
    inherit_env: tuple[str, ...]
    allowed_clients: tuple[str, ...]
    rlimits: tuple[tuple[int, int, int], ...]
    restart: str
    backoff: Backoff
    ready_after: float
    stop: Stop
    recycle: Recycle | None
    probe: Probe | None
    where: Mapping[str, str] = field(compare=False, default_factory=dict, repr=False)


@dataclass(frozen=True)
class Daemon:
    admin_socket: str = "/run/spawnd/spawnd.sock"
    admin_mode: int = 0o600
    admin_group: int | None = None
    include: tuple[str, ...] = ()
    shutdown_timeout: float = 30.0
    sample_interval: float = 5.0      # how often RSS/CPU and listen queues are sampled
    metrics_listen: tuple[str, int] | None = None   # (host IP, port) serving /metrics
    where: Mapping[str, str] = field(compare=False, default_factory=dict, repr=False)


@dataclass(frozen=True)
class Config:
    daemon: Daemon
    pools: Mapping[str, Pool]
    files: tuple[str, ...]


# ---------------------------------------------------------------------------------------
# Scalar parsers (public: the command line tools use them too). Each raises ValueError
# with a message meant for the user.

def _describe(v: Any) -> str:
    """How a YAML value looks to the person who wrote it, for 'expected X, got Y'."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"a boolean ({'true' if v else 'false'})"
    if isinstance(v, (int, float)):
        return f"a number ({v})"
    if isinstance(v, str):
        return f"'{v}'"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    return f"a {type(v).__name__} ({v})"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(v: Any) -> float:
    """``"250ms"``, ``"10s"``, ``"5m"``, ``"1h"``, ``"1m30s"`` -> seconds; a bare number is seconds."""
    if _is_number(v):
        seconds = float(v)
    elif isinstance(v, str):
        text = v.strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not text or "".join(a + u for a, u in parts) != text:
                raise ValueError(f"bad duration '{v}' (expected e.g. 250ms, 10s, 5m, 1h, 1m30s)") from None
            seconds = sum(float(a) * _DURATION_UNITS[u] for a, u in parts)
    else:
        raise ValueError(f"expected a duration such as 10s or 250ms, got {_describe(v)}")
    if seconds != seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
        raise ValueError(f"bad duration '{v}' (must be a finite value >= 0)")
    return seconds


_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
               "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")


def parse_size(v: Any) -> int:
    """``"512KiB"``, ``"256MiB"``, ``"1GiB"`` (also K/M/G/T and B) -> bytes; a bare integer is bytes."""
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 0:
            raise ValueError(f"bad size '{v}' (must be >= 0)")
        return v
    if not isinstance(v, str):
        raise ValueError(f"expected a size such as 512KiB or 1GiB, got {_describe(v)}")
    m = _SIZE.fullmatch(v.strip())
    unit = m.group(2).lower() if m else None
    if unit not in _SIZE_UNITS:
        raise ValueError(f"bad size '{v}' (expected e.g. 512KiB, 256MiB, 1GiB; units B, KiB, MiB, GiB, TiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


_OCTAL = re.compile(r"(?:0o)?([0-7]{1,4})")


def parse_mode(v: Any, limit: int = 0o7777) -> int:
    """A quoted octal string such as ``"0660"`` -> ``0o660``. A YAML number is refused:
    YAML 1.1 reads an unquoted ``0660`` as the integer 432, which is never what was meant."""
    if _is_number(v):
        hint = f"if you meant octal {v:04o}, write \"{v:04o}\"" if isinstance(v, int) and 0 <= v <= limit \
            else "write it as a string, e.g. \"0660\""
        raise ValueError(f"octal modes must be quoted: YAML read this as the number {v}; {hint}")
    if not isinstance(v, str):
        raise ValueError(f"expected a quoted octal string such as \"0660\", got {_describe(v)}")
    m = _OCTAL.fullmatch(v.strip())
    if not m or int(m.group(1), 8) > limit:
        raise ValueError(f"bad octal mode '{v}' (expected e.g. \"0660\", at most {limit:04o})")
    return int(m.group(1), 8)


_SYSTEMD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,255}")   # printable ASCII but ':'
_SUN_PATH_MAX = 107                                          # sizeof(sun_path) - 1 on Linux


def parse_listen(text: str, base_dir: str) -> Listen:
    """``unix:PATH`` | ``tcp:HOST:PORT`` | ``tcp:[V6]:PORT`` | ``systemd:NAME`` -> Listen.

    A relative unix path is taken relative to *base_dir*; a TCP host name is resolved
    now (first getaddrinfo answer), so the Listen always holds an IP literal."""
    if not isinstance(text, str):
        raise ValueError("expected a listen address such as unix:/run/spawnd/app.sock or "
                         f"tcp:127.0.0.1:9000, got {_describe(text)}")
    scheme, sep, rest = text.partition(":")
    if not sep or scheme not in ("unix", "tcp", "systemd"):
        if text.startswith("/") or text.startswith("."):
            hint = f"; did you mean unix:{text}?"
        elif re.fullmatch(r"[^/:]*:\d+|\[.*\]:\d+", text):
            hint = f"; did you mean tcp:{text}?"
        else:
            hint = ""
        raise ValueError(f"bad listen address '{text}': expected unix:PATH, tcp:HOST:PORT, "
                         f"tcp:[IPV6]:PORT or systemd:NAME{hint}")
    if scheme == "unix":
        if not rest:
            raise ValueError(f"bad listen address '{text}': empty unix socket path")
        path = os.path.normpath(os.path.join(base_dir, rest))
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            raise ValueError(f"bad listen address '{text}': unix socket path {path} is longer "
                             f"than {_SUN_PATH_MAX} bytes")
        return Listen("unix", path=path)
    if scheme == "systemd":
        if not _SYSTEMD_NAME.fullmatch(rest):
            raise ValueError(f"bad listen address '{text}': systemd:NAME needs a name of 1-255 "
                             "printable characters without ':' (the socket unit's FileDescriptorName)")
        return Listen("systemd", name=rest)
    host, sep, port_text = rest.rpartition(":")
    if not sep or rest.endswith("]"):          # "tcp:127.0.0.1", "tcp:[::1]"
        raise ValueError(f"bad listen address '{text}': missing port (expected tcp:HOST:PORT)")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"bad listen address '{text}': bad port '{port_text}' (1-65535)")
    port = int(port_text)
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"bad listen address '{text}': an IPv6 address needs brackets, "
                         f"e.g. tcp:[{host}]:{port}")
    if not host:
        raise ValueError(f"bad listen address '{text}': missing host (0.0.0.0 or [::] for every "
                         "interface, 127.0.0.1 for local only)")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if bracketed:
            raise ValueError(f"bad listen address '{text}': '{host}' is not an IPv6 address") from None
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError, ValueError) as e:
            raise ValueError(f"bad listen address '{text}': cannot resolve host '{host}' "
                             f"({getattr(e, 'strerror', None) or e})") from None
        ip = ipaddress.ip_address(infos[0][4][0])
    else:
        if bracketed and ip.version != 6:
            raise ValueError(f"bad listen address '{text}': brackets are for IPv6 addresses only")
    return Listen("tcp", host=str(ip), port=port)


# ---------------------------------------------------------------------------------------
# YAML nodes -> values that remember where they were written

@dataclass
class _V:
    """A value from a file: a scalar, or ``dict[str, _V]`` / ``list[_V]``, with its place."""

    value: Any
    file: str
    line: int       # the line of the key (mapping entries) or of the item (lists)
    path: str       # key path, e.g. "pools.php.socket.mode" or "pools.php.command[0]"

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.path or '(top level)'}"


class _Bad(Exception):
    """Raised by a field parser after it has recorded its error."""


_MERGE_TAG = "tag:yaml.org,2002:merge"
_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Context:
    """Collects errors and knows who runs spawnd (its euid decides what is allowed)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.files: list[str] = []          # in the order read
        self.euid = os.geteuid()
        self.egid = os.getegid()
        self.own_groups = {self.egid, *os.getgroups()}
        self._grouplists: dict[tuple[str, int], tuple[int, ...]] = {}

    def grouplist(self, user: str, gid: int) -> tuple[int, ...]:
        """os.getgrouplist, once per (user, gid): it reads the whole group database."""
        key = (user, gid)
        if key not in self._grouplists:
            self._grouplists[key] = tuple(os.getgrouplist(user, gid))
        return self._grouplists[key]

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{where}: {message}")

    def sorted_errors(self) -> list[str]:
        """Errors by file (in reading order), then by line; stable for the rest."""
        def key(error: str) -> tuple[int, int]:
            for i, f in enumerate(self.files):
                line = error[len(f) + 1:].split(":", 1)[0]
                if error.startswith(f + ":") and line.isdigit():
                    return i, int(line)
            return -1, 0
        return sorted(self.errors, key=key)

    # -- reading files ------------------------------------------------------------------

    def read(self, path: str, via: str = "") -> _V | None:
        """Read one file into a _V tree (None when unreadable or not YAML; error recorded).
        *via* names the include that matched the file, so an error about a file the
        admin never wrote down (a glob that caught a binary, say) says where it came from."""
        self.files.append(path)
        matched = f" (matched by {via})" if via else ""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self.errors.append(f"{path}: file not found{matched}")
            return None
        except OSError as e:
            self.errors.append(f"{path}: cannot read: {e.strerror or e}{matched}")
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            self.errors.append(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}"
                               f" at offset {e.start}){matched}")
            return None
        # libyaml (CSafeLoader) composes ~10x faster; when it rejects a file, the pure-Python
        # parser reads it again because its messages are more precise (it names the tab).
        for loader_class in dict.fromkeys((_FAST_LOADER, yaml.SafeLoader)):
            loader = loader_class(text)
            try:
                node = loader.get_single_node()
                if node is None:                                   # empty file
                    return _V(None, path, 1, "")
                return self._build(loader, node, path, 1, "")
            except yaml.YAMLError as e:
                if loader_class is not yaml.SafeLoader:
                    continue
                mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
                problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e)
                if "'\\t'" in problem:
                    problem += " (tabs cannot indent YAML: use spaces)"
                elif "mapping values are not allowed" in problem:
                    problem += " (a ':' followed by a space or the line's end starts a mapping: quote the value)"
                self.errors.append(f"{path}:{mark.line + 1 if mark else 1}: syntax error: {problem}")
                return None
            except RecursionError:
                self.errors.append(f"{path}:1: syntax error: nested too deeply")
                return None
            finally:
                loader.dispose()
        raise AssertionError("unreachable: the pure-Python loader always decides")

    def _build(self, loader, node, file: str, line: int, path: str, stack: tuple = ()) -> _V | None:
        if id(node) in stack:
            self.error(f"{file}:{node.start_mark.line + 1}: {path}", "an alias refers to a value that contains it")
            return None
        stack = (*stack, id(node))
        if isinstance(node, yaml.ScalarNode):
            if "\0" in node.value:
                # Paths, argv and environment values cannot hold NUL: exec() would fail later.
                self.error(f"{file}:{node.start_mark.line + 1}: {path}", "a NUL character is not allowed")
                return None
            try:
                return _V(loader.construct_object(node, deep=True), file, line, path)
            except yaml.YAMLError as e:
                where = f"{file}:{node.start_mark.line + 1}: {path}" if path else f"{file}:{node.start_mark.line + 1}"
                self.error(where, f"bad value: {getattr(e, 'problem', None) or e}")
                return None
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                v = self._build(loader, item, file, item.start_mark.line + 1, f"{path}[{i}]", stack)
                if v is not None:
                    items.append(v)
            return _V(items, file, line, path)
        entries: dict[str, _V] = {}
        merged: dict[str, _V] = {}
        first_line: dict[str, int] = {}
        for knode, vnode in node.value:
            kline = knode.start_mark.line + 1
            if knode.tag == _MERGE_TAG:        # `<<: *defaults` fills in keys not written here
                sources = vnode.value if isinstance(vnode, yaml.SequenceNode) else [vnode]
                for src in sources:
                    built = self._build(loader, src, file, kline, path, stack)
                    if built is not None and isinstance(built.value, dict):
                        for k, v in built.value.items():
                            merged.setdefault(k, v)
                    elif built is not None:
                        self.error(f"{file}:{kline}: {path or '<<'}", "'<<' must refer to a mapping")
                continue
            if not isinstance(knode, yaml.ScalarNode) or not knode.value:
                self.error(f"{file}:{kline}: {path or '(top level)'}",
                           "keys must be plain, non-empty names")
                continue
            key = knode.value                  # the text as written: `on:` stays "on"
            kpath = f"{path}.{key}" if path else key
            if key in first_line:
                self.error(f"{file}:{kline}: {kpath}",
                           f"duplicate key '{key}' (first written at line {first_line[key]})")
                continue
            first_line[key] = kline
            v = self._build(loader, vnode, file, kline, kpath, stack)
            if v is not None:
                entries[key] = v
        for k, v in merged.items():
            if k not in first_line:
                entries[k] = _V(v.value, v.file, v.line, f"{path}.{k}" if path else k)
        return _V(entries, file, line, path)


# ---------------------------------------------------------------------------------------
# Field parsers: each takes a _V and returns the value, or raises ValueError(message).

def _mapping(v: _V, keys: Mapping[str, Any], what: str, ctx: _Context) -> dict[str, _V]:
    """Check *v* is a mapping of known keys; report unknown ones (with a did-you-mean)."""
    if v.value is None:
        return {}
    if not isinstance(v.value, dict):
        raise ValueError(f"expected {what}, got {_describe(v.value)}")
    for key, item in v.value.items():
        if key not in keys:
            close = difflib.get_close_matches(key, list(keys), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(keys)})"
            ctx.error(item.where, f"unknown key '{key}'{hint}")
    return {k: item for k, item in v.value.items() if k in keys}


def _string(v: _V) -> str:
    if not isinstance(v.value, str) or not v.value:
        raise ValueError(f"expected a non-empty string, got {_describe(v.value)}")
    return v.value


def _int(lo: int, hi: int | None = None) -> Callable[[_V], int]:
    def parse(v: _V) -> int:
        x = v.value
        if not isinstance(x, int) or isinstance(x, bool):
            raise ValueError(f"expected a whole number, got {_describe(x)}")
        if x < lo or (hi is not None and x > hi):
            raise ValueError(f"{x} is out of range ({lo}-{hi})" if hi is not None else f"{x} must be >= {lo}")
        return x
    return parse


def _duration(positive: bool = True) -> Callable[[_V], float]:
    def parse(v: _V) -> float:
        seconds = parse_duration(v.value)
        if positive and seconds <= 0:
            raise ValueError(f"duration '{v.value}' must be greater than 0")
        return seconds
    return parse


def _positive_size(v: _V) -> int:
    n = parse_size(v.value)
    if n <= 0:
        raise ValueError(f"size '{v.value}' must be greater than 0")
    return n


def _percent(v: _V) -> float:
    x = v.value
    if isinstance(x, str) and x.strip().endswith("%"):
        x = x.strip()[:-1]
    try:
        pct = float(x) if not isinstance(x, bool) and isinstance(x, (int, float, str)) else None
    except ValueError:
        pct = None
    if pct is None or not pct > 0 or pct == float("inf"):
        raise ValueError(f"expected a CPU percentage such as 90%, got {_describe(v.value)}")
    return pct


def _choice(*choices: str) -> Callable[[_V], str]:
    def parse(v: _V) -> str:
        if v.value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {_describe(v.value)}")
        return v.value
    return parse


def _signal(v: _V) -> int:
    x = v.value
    if isinstance(x, int) and not isinstance(x, bool):
        if x not in signal.valid_signals():
            raise ValueError(f"no signal number {x}")
        try:
            return signal.Signals(x)
        except ValueError:
            return x
    if isinstance(x, str):
        name = x.strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if name in signal.Signals.__members__ and not name.startswith("SIG_"):
            return signal.Signals[name]
    raise ValueError(f"bad signal {_describe(x)} (expected a name such as TERM, QUIT, INT, HUP, "
                     "USR1, USR2, or a number)")


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(name: str) -> str:
    if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
        raise ValueError(f"bad environment variable name {_describe(name)} "
                         "(letters, digits and _, not starting with a digit)")
    return name


def _list(v: _V, what: str) -> list[_V]:
    if not isinstance(v.value, list):
        raise ValueError(f"expected a list of {what}, got {_describe(v.value)}")
    return v.value


def _lookup_user(x: Any) -> pwd.struct_passwd:
    try:
        if isinstance(x, int) and not isinstance(x, bool):
            return pwd.getpwuid(x)
        if isinstance(x, str) and x:
            return pwd.getpwnam(x)
    except (KeyError, OverflowError):
        raise ValueError(f"unknown user {_describe(x)}") from None
    raise ValueError(f"expected a user name, got {_describe(x)}")


def _lookup_group(x: Any) -> int:
    try:
        if isinstance(x, int) and not isinstance(x, bool):
            return grp.getgrgid(x).gr_gid
        if isinstance(x, str) and x:
            return grp.getgrnam(x).gr_gid
    except (KeyError, OverflowError):
        raise ValueError(f"unknown group {_describe(x)}") from None
    raise ValueError(f"expected a group name, got {_describe(x)}")


_SIZE_RLIMITS = {"as", "core", "data", "fsize", "memlock", "stack", "rss"}
RLIMITS = {name[len("RLIMIT_"):].lower(): getattr(resource, name)
           for name in dir(resource) if name.startswith("RLIMIT_")}


def _rlimit_value(v: _V, name: str) -> int:
    x = v.value
    if x == "unlimited":
        return resource.RLIM_INFINITY
    if isinstance(x, int) and not isinstance(x, bool):
        if x < 0:
            raise ValueError(f"rlimit {name} must be >= 0 or 'unlimited'")
        return x
    if isinstance(x, str) and name in _SIZE_RLIMITS:
        return parse_size(x)
    size = ", a size such as 64MiB" if name in _SIZE_RLIMITS else ""
    raise ValueError(f"expected a number{size} or 'unlimited' for rlimit {name}, got {_describe(x)}")


# ---------------------------------------------------------------------------------------
# Sections

_DAEMON_KEYS = ("admin_socket", "admin_mode", "admin_group", "include", "shutdown_timeout",
                "sample_interval", "metrics_listen")
_POOL_KEYS = ("command", "listen", "socket", "processes", "user", "group", "cwd", "chroot",
              "umask", "env", "inherit_env", "allowed_clients", "rlimits", "restart", "backoff",
              "ready_after", "stop", "recycle", "probe")
_POOL_NAME = re.compile(r"[a-z0-9_-]+")
_BAD = object()


class _Fields:
    """Parses the fields of one mapping, recording each error where it was written."""

    def __init__(self, ctx: _Context, entries: dict[str, _V]):
        self.ctx = ctx
        self.entries = entries
        self.ok = True

    def get(self, key: str, parse: Callable[[_V], Any], default: Any = None) -> Any:
        v = self.entries.get(key)
        if v is None or v.value is None:
            return default
        return self.check(v, parse)

    def check(self, v: _V, parse: Callable[[_V], Any]) -> Any:
        try:
            return parse(v)
        except ValueError as e:
            self.fail(v, str(e))
        except _Bad:
            self.ok = False
        return _BAD

    def fail(self, v: _V | str, message: str) -> None:
        self.ctx.error(v if isinstance(v, str) else v.where, message)
        self.ok = False

    def section(self, key: str, keys: tuple[str, ...], what: str) -> "_Fields | None":
        """A nested mapping (socket, backoff, ...); None when absent or not a mapping."""
        v = self.entries.get(key)
        if v is None or v.value is None:
            return None
        entries = self.check(v, lambda v: _mapping(v, keys, what, self.ctx))
        if entries is _BAD:
            return None
        return _Nested(self, entries)


class _Nested(_Fields):
    """A nested mapping's fields: its errors make the parent invalid too."""

    def __init__(self, parent: _Fields, entries: dict[str, _V]):
        super().__init__(parent.ctx, entries)
        self.parent = parent

    def fail(self, v, message):
        super().fail(v, message)
        self.parent.ok = False

    def check(self, v, parse):
        result = super().check(v, parse)
        if result is _BAD:
            self.parent.ok = False
        return result


def _wheres(v: _V, prefix_len: int, out: dict[str, str]) -> None:
    """Record the location of every mapping key under *v*, keyed by path relative to it."""
    if isinstance(v.value, dict):
        for item in v.value.values():
            out[item.path[prefix_len:]] = item.where
            _wheres(item, prefix_len, out)


def _daemon(ctx: _Context, top: _V | None, base_dir: str) -> Daemon:
    if top is None:
        return Daemon()
    f = _Fields(ctx, {})
    entries = f.check(top, lambda v: _mapping(v, dict.fromkeys(_DAEMON_KEYS), "a mapping of daemon settings", ctx))
    if entries is _BAD:
        return Daemon()
    f.entries = entries

    def path(v: _V) -> str:
        return os.path.normpath(os.path.join(base_dir, _string(v)))

    def include(v: _V) -> tuple[str, ...]:
        items = [v] if isinstance(v.value, str) else _list(v, "glob patterns")
        return tuple(path(item) for item in items)

    def group(v: _V) -> int:
        gid = _lookup_group(v.value)
        if ctx.euid != 0 and gid not in ctx.own_groups:
            raise ValueError(f"group {_describe(v.value)} needs root (spawnd is not a member)")
        return gid

    def metrics(v: _V) -> tuple[str, int]:
        text = _string(v)
        try:
            lst = parse_listen("tcp:" + text, base_dir)
        except ValueError as e:
            raise ValueError(f"expected HOST:PORT or [V6]:PORT: {e}") from None
        return lst.host, lst.port

    where = {"": top.where}
    _wheres(top, len(top.path) + 1, where)
    values = dict(
        admin_socket=f.get("admin_socket", path, Daemon.admin_socket),
        admin_mode=f.get("admin_mode", lambda v: parse_mode(v.value), Daemon.admin_mode),
        admin_group=f.get("admin_group", group, None),
        include=f.get("include", include, ()),
        shutdown_timeout=f.get("shutdown_timeout", _duration(), Daemon.shutdown_timeout),
        sample_interval=f.get("sample_interval", _duration(), Daemon.sample_interval),
        metrics_listen=f.get("metrics_listen", metrics, None),
    )
    if not f.ok:
        values = {k: v for k, v in values.items() if v is not _BAD}
    return Daemon(**values, where=MappingProxyType(where))


def _find_program(name: str, search_path: str, root: str) -> str | None:
    """Absolute path of *name* on *search_path*, looked up under *root* (a chroot or "/")."""
    for d in search_path.split(":"):
        if os.path.isabs(d):
            candidate = os.path.join(d, name)
            if os.path.isfile(os.path.join(root, candidate.lstrip("/"))):
                return candidate
    return None


def _inside(root: str) -> str:
    return f" inside chroot {root}" if root != "/" else ""


class _PoolReader:
    """Reads one pool's mapping. One method per concern; each records its own errors
    through ``self.f`` and returns _BAD (or a value holding _BAD) when it found one."""

    def __init__(self, ctx: _Context, name_v: _V, base_dir: str):
        self.ctx, self.v, self.base_dir = ctx, name_v, base_dir
        self.name = name_v.path.split(".", 1)[1]
        self.f = _Fields(ctx, {})

    def read(self) -> Pool | None:
        f, v = self.f, self.v
        if not _POOL_NAME.fullmatch(self.name):
            f.fail(v, f"bad pool name '{self.name}' (lowercase letters, digits, '_' and '-' only)")
        if v.value is None:
            f.fail(v, "empty pool: at least command and listen are required")
            return None
        entries = f.check(v, lambda v: _mapping(v, dict.fromkeys(_POOL_KEYS), "a mapping of pool settings", self.ctx))
        if entries is _BAD:
            return None
        f.entries = entries
        for key in ("command", "listen"):
            if entries.get(key) is None or entries[key].value is None:
                f.fail(v, f"missing required key '{key}'")
        user = entries.get("user")
        uid, gid, groups = self.identity()
        root, cwd = self.directories()
        env = f.get("env", self.env, ())
        listen = f.get("listen", lambda v: parse_listen(v.value, self.base_dir))
        values = dict(
            name=self.name, listen=listen, socket=self.socket(listen),
            command=f.get("command", lambda v: self.command(v, root, cwd, env)),
            processes=f.get("processes", self.processes, Processes(1, 1)),
            user=None if user is None or user.value is None else str(user.value),
            uid=uid, gid=gid, groups=groups, cwd=cwd, chroot=None if root in ("/", _BAD) else root,
            umask=f.get("umask", lambda v: parse_mode(v.value, 0o777)),
            env=env,
            inherit_env=f.get("inherit_env", self.names, ()),
            allowed_clients=f.get("allowed_clients", self.clients, ()),
            rlimits=f.get("rlimits", self.rlimits, ()),
            restart=f.get("restart", _choice("always", "on-failure", "never"), "always"),
            backoff=self.backoff(),
            ready_after=f.get("ready_after", _duration(positive=False), 0.1),
            stop=self.stop(), recycle=self.recycle(), probe=self.probe(),
        )
        if not f.ok:
            return None
        where = {"": v.where}
        _wheres(v, len(v.path) + 1, where)
        return Pool(**values, where=MappingProxyType(where))

    # -- who the children run as ---------------------------------------------------------
    def identity(self) -> tuple[int, Any, tuple[int, ...]]:
        """(uid, gid, supplementary groups) for the children."""
        ctx, f = self.ctx, self.f

        def user(v: _V) -> pwd.struct_passwd:
            pw = _lookup_user(v.value)
            if ctx.euid != 0 and pw.pw_uid != ctx.euid:
                raise ValueError(f"user {_describe(v.value)} needs root (spawnd runs as uid {ctx.euid})")
            return pw

        def group(v: _V) -> int:
            gid = _lookup_group(v.value)
            if ctx.euid != 0 and gid not in (ctx.egid, os.getgid()):
                raise ValueError(f"group {_describe(v.value)} needs root (spawnd runs as gid {ctx.egid})")
            return gid

        pw = f.get("user", user)
        gid = f.get("group", group)
        if pw is None and ctx.euid == 0:
            f.fail(self.v, "children would run as root; set user: NAME (or user: root to allow it)")
        if not isinstance(pw, pwd.struct_passwd):
            return ctx.euid, ctx.egid if gid is None else gid, ()
        if gid is None:
            gid = pw.pw_gid
        # setgroups() needs privilege: without root the children keep spawnd's groups.
        groups = ctx.grouplist(pw.pw_name, gid) if gid is not _BAD and ctx.euid == 0 else ()
        return pw.pw_uid, gid, groups

    # -- where the children run ----------------------------------------------------------
    def directory(self, v: _V, root: str) -> str:
        """An existing directory; relative to the file's directory, or to / inside a chroot."""
        d = os.path.normpath(os.path.join(self.base_dir if root == "/" else "/", _string(v)))
        if not os.path.isdir(os.path.join(root, d.lstrip("/"))):
            raise ValueError(f"directory {d}{_inside(root)} does not exist")
        return d

    def directories(self) -> tuple[Any, Any]:
        """(root, cwd): root is "/" without chroot; either may be _BAD."""
        def chroot(v: _V) -> str:
            d = self.directory(v, "/")
            if self.ctx.euid != 0:
                raise ValueError("chroot needs root")
            return d

        root = self.f.get("chroot", chroot, "/")
        cwd = self.f.get("cwd", lambda v: self.directory(v, root)) if root is not _BAD else None
        return root, cwd

    def env(self, v: _V) -> tuple[tuple[str, str], ...]:
        if not isinstance(v.value, dict):
            raise ValueError(f"expected a mapping of NAME: value, got {_describe(v.value)}")
        pairs = []
        for key, item in v.value.items():
            try:
                _env_name(key)
                if not (isinstance(item.value, str) or _is_number(item.value)):
                    raise ValueError(f"expected a string or number, got {_describe(item.value)} "
                                     "(quote it to pass it as text)")
                pairs.append((key, str(item.value)))
            except ValueError as e:
                self.f.fail(item, str(e))
        return tuple(pairs)

    def names(self, v: _V) -> tuple[str, ...]:
        return tuple(self.f.check(item, lambda i: _env_name(i.value)) for item in _list(v, "variable names"))

    # -- the program -----------------------------------------------------------------------
    def command(self, v: _V, root: Any, cwd: Any, env: Any) -> tuple[str, ...]:
        """argv with argv[0] made absolute (looked up on PATH when it has no '/')."""
        if isinstance(v.value, str):
            try:
                argv = shlex.split(v.value)
            except ValueError as e:
                raise ValueError(f"cannot split command: {e}") from None
        else:
            argv = []
            for item in _list(v, "program and arguments"):
                if not (isinstance(item.value, str) or _is_number(item.value)):
                    self.f.fail(item, f"expected a string, got {_describe(item.value)}")
                    raise _Bad()
                argv.append(str(item.value))
        if not argv or not argv[0]:
            raise ValueError("empty command: give the program to run, e.g. [/usr/bin/php-cgi]")
        program = argv[0]
        if root is _BAD or cwd is _BAD:
            return tuple(argv)          # cannot tell where to look; that error is reported
        if "/" not in program:
            search = dict(env).get("PATH", DEFAULT_PATH) if env is not _BAD else DEFAULT_PATH
            found = _find_program(program, search, root)
            if found is None:
                raise ValueError(f"program '{program}' not found on PATH{_inside(root)} ({search})")
            program = found
        else:
            program = os.path.normpath(os.path.join(cwd or (self.base_dir if root == "/" else "/"), program))
            if not os.path.isfile(os.path.join(root, program.lstrip("/"))):
                raise ValueError(f"program {program} not found{_inside(root)}")
        return (program, *argv[1:])

    # -- the socket --------------------------------------------------------------------------
    def socket(self, listen: Any) -> SocketOptions:
        sock = self.f.section("socket", ("mode", "owner", "group", "backlog"), "a mapping of socket options")
        if sock is None:
            return SocketOptions()
        ctx = self.ctx

        def unix_only(parse: Callable[[_V], Any]) -> Callable[[_V], Any]:
            def check(v: _V) -> Any:
                if isinstance(listen, Listen) and listen.kind != "unix":
                    raise ValueError(f"only applies to unix sockets, not {listen}")
                return parse(v)
            return check

        def owner(v: _V) -> int:
            uid = _lookup_user(v.value).pw_uid
            if ctx.euid != 0 and uid != ctx.euid:
                raise ValueError(f"owner {_describe(v.value)} needs root")
            return uid

        def group(v: _V) -> int:
            gid = _lookup_group(v.value)
            if ctx.euid != 0 and gid not in ctx.own_groups:
                raise ValueError(f"group {_describe(v.value)} needs root (spawnd is not a member)")
            return gid

        return SocketOptions(
            mode=sock.get("mode", unix_only(lambda v: parse_mode(v.value))),
            uid=sock.get("owner", unix_only(owner)),
            gid=sock.get("group", unix_only(group)),
            backlog=sock.get("backlog", _int(1, 65535), 1024),
        )

    def clients(self, v: _V) -> tuple[str, ...]:
        def one(item: _V) -> str:
            try:
                if not isinstance(item.value, str):
                    raise ValueError(item.value)
                return str(ipaddress.ip_address(item.value))
            except ValueError:
                raise ValueError(f"expected an IP address, got {_describe(item.value)}") from None
        return tuple(self.f.check(item, one) for item in _list(v, "IP addresses"))

    # -- how many, and how much --------------------------------------------------------------
    def processes(self, v: _V) -> Processes:
        if not isinstance(v.value, dict):
            n = _int(0)(v)
            return Processes(n, n)
        sub = _Nested(self.f, _mapping(v, {"min": 0, "max": 0, "interval": 0, "idle_after": 0},
                                       "", self.ctx))
        lo = sub.get("min", _int(0), 1)
        hi = sub.get("max", _int(1))
        interval = sub.get("interval", _duration(), Processes.interval)
        idle_after = sub.get("idle_after", _duration(), Processes.idle_after)
        if hi is None:
            raise ValueError("missing required key 'max'")
        if _BAD in (lo, hi, interval, idle_after):
            raise _Bad()
        if lo > hi:
            raise ValueError(f"min ({lo}) is greater than max ({hi})")
        return Processes(lo, hi, interval, idle_after)

    def rlimits(self, v: _V) -> tuple[tuple[int, int, int], ...]:
        def one(item: _V) -> tuple[int, int, int]:
            name = item.path.rsplit(".", 1)[1]
            if isinstance(item.value, dict):
                sub = _mapping(item, {"soft": 0, "hard": 0}, "", self.ctx)
                if "soft" not in sub or "hard" not in sub:
                    raise ValueError("give both soft and hard (or a single value for both)")
                soft, hard = _rlimit_value(sub["soft"], name), _rlimit_value(sub["hard"], name)
            else:
                soft = hard = _rlimit_value(item, name)
            inf = resource.RLIM_INFINITY
            if hard != inf and (soft == inf or soft > hard):
                raise ValueError(f"soft limit ({soft}) is above the hard limit ({hard})")
            if self.ctx.euid != 0:
                current = resource.getrlimit(RLIMITS[name])[1]
                if current != inf and (hard == inf or hard > current):
                    raise ValueError(f"raising the hard limit above {current} needs root")
            return (RLIMITS[name], soft, hard)

        limits = _mapping(v, RLIMITS, "a mapping of limit: value", self.ctx)
        return tuple(self.f.check(item, one) for item in limits.values())

    # -- lifecycle ---------------------------------------------------------------------------
    def backoff(self) -> Backoff:
        bo = self.f.section("backoff", ("initial", "max", "reset_after"), "a mapping of backoff settings")
        if bo is None:
            return Backoff()
        backoff = Backoff(bo.get("initial", _duration(), Backoff.initial),
                          bo.get("max", _duration(), Backoff.max),
                          bo.get("reset_after", _duration(), Backoff.reset_after))
        if _BAD not in (backoff.initial, backoff.max) and backoff.initial > backoff.max:
            bo.fail(bo.entries.get("initial") or bo.entries["max"],
                    f"initial ({backoff.initial}s) is greater than max ({backoff.max}s)")
        return backoff

    def stop(self) -> Stop:
        st = self.f.section("stop", ("signal", "timeout", "when"), "a mapping of stop settings")
        if st is None:
            return Stop()
        return Stop(st.get("signal", _signal, Stop.signal), st.get("timeout", _duration(), Stop.timeout),
                    st.get("when", _choice("idle", "now"), Stop.when))

    def recycle(self) -> Recycle | None:
        rc = self.f.section("recycle", ("max_age", "max_rss", "max_cpu"), "a mapping of recycle limits")
        if rc is None:
            return None
        return Recycle(rc.get("max_age", _duration()), rc.get("max_rss", _positive_size),
                       rc.get("max_cpu", _percent))

    def probe(self) -> Probe | None:
        pr = self.f.section("probe", ("uri", "interval", "timeout", "failures", "expect",
                                      "params", "ready", "start_timeout"),
                            "a mapping of probe settings")
        if pr is None:
            return None

        def uri(v: _V) -> str:
            if not isinstance(v.value, str) or not v.value.startswith("/") or any(c.isspace() for c in v.value):
                raise ValueError(f"expected a request URI starting with '/', got {_describe(v.value)}")
            return v.value

        def flag(v: _V) -> bool:
            if not isinstance(v.value, bool):
                raise ValueError(f"expected true or false, got {_describe(v.value)}")
            return v.value

        def params(v: _V) -> tuple[tuple[str, str], ...]:
            if not isinstance(v.value, dict):
                raise ValueError(f"expected a mapping of NAME: value, got {_describe(v.value)}")
            out = []
            for key, item in v.value.items():
                if not (isinstance(item.value, str) or _is_number(item.value)):
                    self.f.fail(item, f"expected a string or number, got {_describe(item.value)}")
                else:
                    out.append((key, str(item.value)))
            return tuple(out)

        return Probe(pr.get("uri", uri, Probe.uri), pr.get("interval", _duration(), Probe.interval),
                     pr.get("timeout", _duration(), Probe.timeout), pr.get("failures", _int(1), Probe.failures),
                     pr.get("expect", _int(100, 599), Probe.expect), pr.get("params", params, ()),
                     pr.get("ready", flag, False),
                     pr.get("start_timeout", _duration(), Probe.start_timeout))


def _conflicts(a: Listen, b: Listen) -> bool:
    """Would binding *b* fail once *a* is bound? Same address, or the same TCP port and
    family with a wildcard host on either side ([::] is bound IPv6-only, like nginx does,
    so [::]:80 and 0.0.0.0:80 can coexist)."""
    if a.kind != "tcp" or b.kind != "tcp":
        return a == b
    return a.port == b.port and a.family == b.family and (
        a.host == b.host or bool({a.host, b.host} & {"0.0.0.0", "::"}))


def _file(ctx: _Context, path: str, main: bool, via: str,
          pools: dict[str, tuple[Pool | None, str]]) -> Daemon | None:
    """Read one file; add its pools to *pools* (name -> (pool, where)). Returns the
    daemon section of the main file."""
    top = ctx.read(path, via)
    if top is None:
        return Daemon() if main else None
    base_dir = os.path.dirname(path)
    f = _Fields(ctx, {})
    entries = f.check(top, lambda v: _mapping(v, {"spawnd": 0, "pools": 0}, "a mapping with spawnd: and pools:", ctx))
    daemon = None
    if entries is _BAD:
        entries = {}
    if main:
        daemon = _daemon(ctx, entries.get("spawnd"), base_dir)
    elif "spawnd" in entries:
        ctx.error(entries["spawnd"].where, "the spawnd: section belongs in the main file only; "
                                           "included files hold pools:")
    section = entries.get("pools")
    if section is not None and section.value is not None:
        if not isinstance(section.value, dict):
            ctx.error(section.where, f"expected a mapping of pool names, got {_describe(section.value)}")
        else:
            for name, v in section.value.items():
                if name in pools:
                    ctx.error(v.where, f"duplicate pool '{name}' (already defined at {pools[name][1]})")
                    continue
                pools[name] = (_PoolReader(ctx, v, base_dir).read(), f"{v.file}:{v.line}")
    return daemon


def load(path: str) -> Config:
    """Load the main file and its includes; raise ConfigError listing every problem."""
    ctx = _Context()
    main = os.path.abspath(path)
    pools: dict[str, tuple[Pool | None, str]] = {}
    daemon = _file(ctx, main, True, "", pools)
    files = [main]
    includes: set[str] = set()
    for pattern in daemon.include:
        try:
            includes.update(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        except (OSError, ValueError) as e:
            ctx.error(daemon.where.get("include", main), f"cannot expand '{pattern}': {e}")
    main_real = os.path.realpath(main)
    for inc in sorted(includes):
        if os.path.realpath(inc) != main_real:
            files.append(inc)
            _file(ctx, inc, False, daemon.where.get("include", main), pools)

    by_slot: dict[tuple, list[Pool]] = {}      # only pools in one slot can clash
    for pool, _ in pools.values():
        if pool is None:
            continue
        listen = pool.listen
        slot = (listen.family, listen.port) if listen.kind == "tcp" else (str(listen),)
        other = next((o for o in by_slot.get(slot, ()) if _conflicts(o.listen, listen)), None)
        if other is None:
            by_slot.setdefault(slot, []).append(pool)
        else:
            ctx.error(pool.where["listen"], f"address {listen} is already used by pool "
                                            f"'{other.name}' ({other.where['listen']})")
    if ctx.errors:
        raise ConfigError(ctx.sorted_errors())
    return Config(daemon=daemon, pools=MappingProxyType({p.name: p for p, _ in pools.values()}),
                  files=tuple(files))
