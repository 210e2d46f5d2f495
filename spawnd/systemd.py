"""systemd integration: sd_notify, the watchdog, the fd store and socket activation.

Standard library only; every function also works (as a no-op) when not run by systemd.

How the daemon uses this
------------------------
At start, before binding anything::

    passed = systemd.listen_fds()        # [(fd, name)]; LISTEN_* are gone from os.environ
    notify = systemd.Notifier.from_environ()

For each pool, ``systemd.pick(passed, pool.listen)`` returns the fd to adopt, or None
when the pool must bind its own socket: ``systemd:NAME`` matches by name (a socket
unit's ``FileDescriptorName=``), any other listen address matches a passed listening
stream socket bound to exactly that address (``socket_address(fd).address``). The latter
is how sockets come back from the fd store after ``systemctl restart``: adopt them before
binding, because a Unix path that systemd still holds open answers connect() and would
look "in use". Close passed fds that no pool adopted, and ``remove_fds(name)`` them.

Then, in the event loop (every call is non-blocking and returns False when systemd did not
get the message; a failure is logged once, never raised)::

    notify.store_fds(pool.name, [sock.fileno()])  # sockets spawnd bound itself, so a
                                                  # restart keeps them (FileDescriptorStoreMax=)
    notify.ready("2 pools, 8 children")           # after the pools started
    notify.status("...")                          # whenever the summary changes
    interval = notify.watchdog_interval()         # None, or seconds: call notify.watchdog()
                                                  # that often from a loop timer
    notify.reloading(); ...; notify.ready(...)    # around a reload (SIGHUP / spawnctl reload)
    notify.stopping()                             # when a shutdown starts
    notify.extend_timeout(seconds)                # while a long shutdown is still progressing
    notify.remove_fds(pool.name)                  # when a pool is removed by a reload
"""
from __future__ import annotations

import array
import errno
import ipaddress
import os
import socket
import stat
import time
from dataclasses import dataclass

from .log import log

SD_LISTEN_FDS_START = 3
_MAX_FDNAME = 255


class SystemdError(ValueError):
    """The environment systemd set up is malformed; the message says what and where."""


# ---------------------------------------------------------------------------------------
# sd_notify

class Notifier:
    """Sends sd_notify(3) messages to the socket named by NOTIFY_SOCKET.

    ``enabled`` is False when there is no NOTIFY_SOCKET; every method is then a no-op
    returning False. Messages go out on one non-blocking, close-on-exec datagram socket:
    when systemd's queue is full the message is dropped (and logged), never waited for.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        self.address = _notify_address(address) if address else None
        self.enabled = self.address is not None
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._failing = False            # log a failure once, until a message gets through

    @classmethod
    def from_environ(cls, environ=os.environ) -> "Notifier":
        """NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID as systemd sets them.

        The watchdog counts only when WATCHDOG_PID is absent or is this process. A
        NOTIFY_SOCKET spawnd cannot use (not a path, not ``@abstract``) is logged and
        leaves the notifier disabled rather than stopping the daemon."""
        address = environ.get("NOTIFY_SOCKET") or None
        try:
            _notify_address(address) if address else None
        except SystemdError as e:
            log.warning(str(e))
            address = None
        return cls(address, _watchdog_usec(environ))

    # -- the helpers the daemon calls ----------------------------------------------------
    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete."""
        return self.send("READY=1", **_status(status))

    def status(self, text: str) -> bool:
        """One line shown by ``systemctl status``."""
        return self.send(**_status(text))

    def reloading(self, status: str | None = None) -> bool:
        """A reload starts; send ready() when it is done."""
        return self.send("RELOADING=1", MONOTONIC_USEC=_monotonic_usec(), **_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """A shutdown starts."""
        return self.send("STOPPING=1", **_status(status))

    def watchdog(self) -> bool:
        """Keep-alive ping; call it every watchdog_interval() seconds."""
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before systemd's start/stop timeout fires."""
        return self.send(EXTEND_TIMEOUT_USEC=max(1, int(seconds * 1_000_000)))

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog() calls (half of WATCHDOG_USEC), or None when systemd
        does not watch this process."""
        if not self.enabled or not self._watchdog_usec:
            return None
        return self._watchdog_usec / 2_000_000

    def store_fds(self, name: str, fds) -> bool:
        """Keep `fds` in systemd's fd store under `name`; they are passed back (with
        LISTEN_FDNAMES) when the service restarts. Needs FileDescriptorStoreMax= > 0."""
        _check_fdname(name)
        fds = list(fds)
        if not fds:
            raise ValueError("store_fds needs at least one file descriptor")
        return self.send("FDSTORE=1", FDNAME=name, fds=fds)

    def remove_fds(self, name: str) -> bool:
        """Drop every fd stored under `name` from systemd's fd store."""
        _check_fdname(name)
        return self.send("FDSTOREREMOVE=1", FDNAME=name)

    # -- the one mechanism underneath ----------------------------------------------------
    def send(self, *assignments: str, fds=(), **fields) -> bool:
        """Send one message made of "NAME=value" strings and NAME=value keywords, with
        `fds` attached as SCM_RIGHTS. True when it was queued, False when disabled or
        dropped. A value containing a newline is a programming error (ValueError): it
        would smuggle in another assignment."""
        lines = list(assignments) + [f"{k}={v}" for k, v in fields.items()]
        for line in lines:
            if "=" not in line or "\n" in line:
                raise ValueError(f"bad sd_notify assignment {line!r}: expected NAME=value "
                                 "on one line")
        if not lines:
            raise ValueError("empty sd_notify message")
        if not self.enabled:
            return False
        data = ("\n".join(lines) + "\n").encode()
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendmsg([data], ancillary, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL,
                               self.address)
        except OSError as e:
            if not self._failing:
                why = ("its queue is full" if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
                       else e.strerror or str(e))
                log.warning(f"systemd notification {lines[0]!r} dropped: {why} "
                            f"(NOTIFY_SOCKET {self._printable_address()})")
            self._failing = True
            return False
        if self._failing:
            log.info("systemd notifications get through again")
            self._failing = False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _printable_address(self) -> str:
        a = self.address or b""
        return "@" + a[1:].decode(errors="replace") if a[:1] == b"\0" else a.decode(errors="replace")


def _notify_address(text: str) -> bytes:
    """NOTIFY_SOCKET -> the AF_UNIX address: a path, or "@name" for the abstract "\\0name"."""
    if text.startswith("@") and len(text) > 1:
        raw = b"\0" + os.fsencode(text[1:])
    elif text.startswith("/"):
        raw = os.fsencode(text)
    else:
        raise SystemdError(f"NOTIFY_SOCKET={text!r} is neither an absolute path nor an "
                           "@abstract socket name; systemd notifications are off")
    if len(raw) > 108:
        raise SystemdError(f"NOTIFY_SOCKET={text!r} is longer than a Unix socket address "
                           "(108 bytes); systemd notifications are off")
    return raw


def _watchdog_usec(environ) -> int | None:
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


def _status(text: str | None) -> dict:
    # STATUS is one line; collapse whatever whitespace a message may carry.
    return {} if text is None else {"STATUS": " ".join(text.split())}


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _check_fdname(name: str) -> None:
    """FDNAME / LISTEN_FDNAMES rule: 1-255 printable ASCII characters, no ':'."""
    if not (isinstance(name, str) and 0 < len(name) <= _MAX_FDNAME
            and all(" " < c < "\x7f" and c != ":" for c in name)):
        raise ValueError(f"bad fd name {name!r}: 1-255 printable ASCII characters, "
                         "no ':' and no spaces")


# ---------------------------------------------------------------------------------------
# Socket activation (and fds coming back from the fd store)

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds(environ=os.environ, unset: bool = True) -> list[tuple[int, str]]:
    """The fds systemd passed to this process, as [(fd, name)], fds counting from 3.

    They count only when LISTEN_PID is this process; otherwise (or without LISTEN_FDS)
    the answer is []. Names come from LISTEN_FDNAMES ("unknown" without it, as in
    sd_listen_fds_with_names). Each fd is made close-on-exec. With `unset` (the default)
    LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are removed from `environ` in every case,
    so no child ever sees them. Malformed values raise SystemdError."""
    values = {k: environ.get(k) for k in _LISTEN_VARS}
    if unset:
        for k in _LISTEN_VARS:
            environ.pop(k, None)
    pid, count, names = values["LISTEN_PID"], values["LISTEN_FDS"], values["LISTEN_FDNAMES"]
    if not pid or not count:
        return []
    if not pid.isdigit():
        raise SystemdError(f"LISTEN_PID={pid!r} is not a process id")
    if int(pid) != os.getpid():
        return []
    if not count.isdigit():
        raise SystemdError(f"LISTEN_FDS={count!r} is not a number of file descriptors")
    n = int(count)
    if n == 0:
        return []
    if names is None:
        name_list = ["unknown"] * n
    else:
        name_list = names.split(":") if names else [""]
        if len(name_list) != n:
            raise SystemdError(f"LISTEN_FDNAMES={names!r} names {len(name_list)} file "
                               f"descriptor(s) but LISTEN_FDS={n}")
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n))
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as e:
            raise SystemdError(f"LISTEN_FDS={n} but fd {fd} is not open: {e.strerror}") from None
    return list(zip(fds, name_list))


@dataclass(frozen=True)
class SocketAddress:
    """What a passed fd is: family, type, whether it listens, and its address written
    as a listen address ("unix:/run/x.sock", "tcp:127.0.0.1:9000", "tcp:[::1]:9000";
    "unix:@name" for an abstract socket; None when it has no such form)."""
    family: int
    type: int
    listening: bool
    address: str | None


def socket_address(fd: int) -> SocketAddress | None:
    """Describe the socket behind `fd` (None when it is not a socket). The fd is only
    inspected: it stays open and keeps its flags."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        family, kind = sock.family, sock.type
        listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        try:
            name = sock.getsockname()
        except OSError:
            name = None
        return SocketAddress(family, kind, listening, _listen_text(family, name))
    finally:
        sock.detach()


def _listen_text(family, name) -> str | None:
    if family == socket.AF_UNIX:
        if isinstance(name, bytes):                     # abstract (or undecodable)
            if name[:1] == b"\0":
                return "unix:@" + name[1:].decode(errors="surrogateescape")
            name = os.fsdecode(name)
        if not name:
            return None                                 # unnamed socket
        if name.startswith("\0"):
            return "unix:@" + name[1:]
        return f"unix:{name}"
    if family == socket.AF_INET:
        return f"tcp:{name[0]}:{name[1]}"
    if family == socket.AF_INET6:
        host = str(ipaddress.ip_address(name[0].split("%")[0]))
        return f"tcp:[{host}]:{name[1]}"
    return None


def pick(passed, listen) -> int | None:
    """The passed fd a pool should adopt for `listen` (a config.Listen or its text).

    ``systemd:NAME`` matches the fd passed under NAME; every other address matches a
    listening stream socket bound to exactly that address. None when nothing matches;
    SystemdError when more than one fd matches, or when the named fd is not a listening
    stream socket (a pool could not serve on it)."""
    text = str(listen)
    if text.startswith("systemd:"):
        want = text[len("systemd:"):]
        found = [fd for fd, name in passed if name == want]
        if not found:
            return None
        if len(found) > 1:
            raise SystemdError(f"{text}: systemd passed {len(found)} sockets named {want!r}; "
                               "a pool takes one (give each ListenStream= its own socket unit "
                               "or FileDescriptorName=)")
        info = socket_address(found[0])
        if info is None or info.type != socket.SOCK_STREAM or not info.listening:
            raise SystemdError(f"{text}: the fd systemd passed under that name is not a "
                               "listening stream socket (use ListenStream=, Accept=no)")
        return found[0]
    found = []
    for fd, _name in passed:
        info = socket_address(fd)
        if (info is not None and info.address == text and info.listening
                and info.type == socket.SOCK_STREAM):
            found.append(fd)
    if len(found) > 1:
        raise SystemdError(f"{text}: systemd passed {len(found)} sockets bound to it")
    return found[0] if found else None
