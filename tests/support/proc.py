"""Polling with a deadline, and /proc inspection of real processes (tests and benchmarks).

Everything here reads the kernel's view of a process; reading another user's /proc/PID/fd,
environ, syscall or mem needs root (or ptrace rights), which the test suite has.
"""
from __future__ import annotations

import os
import socket
import struct
import time

import psutil


# ---- waiting ------------------------------------------------------------------------------

def wait_for(predicate, timeout: float = 10, interval: float = 0.005, what: str = "condition"):
    """Poll predicate() until it returns a truthy value, and return that value.

    On timeout raise AssertionError naming `what` and the last value predicate() returned,
    so a failing test says what it saw. OSError and psutil.Error (a process that vanished
    between two reads of /proc, a socket not there yet) count as "not yet" and are shown as
    the last value; any other exception is a bug in the predicate and propagates at once."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = predicate()
        except (OSError, psutil.Error) as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                 f"last seen: {last!r}")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind port 0, read it back, close)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---- /proc readers ------------------------------------------------------------------------

def _read(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/{name}") as f:
        return f.read()


def open_fds(pid: int) -> dict[int, str]:
    """fd number -> readlink target ("socket:[123]", "pipe:[45]", "/dev/null", ...)."""
    out = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            out[int(name)] = os.readlink(f"{base}/{name}")
        except FileNotFoundError:  # closed while we looked
            pass
    return out


def status(pid: int) -> dict:
    """Selected /proc/PID/status fields, parsed: Uid, Gid (lists of 4 ints: real, effective,
    saved, filesystem), Groups (list of ints), Umask (int), plus every other field as its
    raw string (Name, State, VmRSS, voluntary_ctxt_switches, ...)."""
    out: dict = {}
    for line in _read(pid, "status").splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(v) for v in value.split()]
        elif key == "Umask":
            out[key] = int(value, 8)
        else:
            out[key] = value
    return out


def limits(pid: int) -> dict[str, tuple]:
    """/proc/PID/limits as {"Max open files": (soft, hard), ...}; "unlimited" is None."""
    out = {}
    lines = _read(pid, "limits").splitlines()
    header = lines[0]
    soft_at, hard_at, units_at = (header.index(h) for h in ("Soft Limit", "Hard Limit", "Units"))
    for line in lines[1:]:
        name = line[:soft_at].strip()
        vals = (line[soft_at:hard_at].strip(), line[hard_at:units_at].strip())
        out[name] = tuple(None if v == "unlimited" else int(v) for v in vals)
    return out


def environ(pid: int) -> dict[str, str]:
    """The environment the process was started with (/proc/PID/environ)."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        raw = f.read()
    out = {}
    for item in raw.split(b"\0"):
        if item:
            k, _, v = item.partition(b"=")
            out[k.decode("utf-8", "surrogateescape")] = v.decode("utf-8", "surrogateescape")
    return out


def wchan(pid: int) -> str:
    """The kernel function pid sleeps in ("hrtimer_nanosleep", ...), or "0" if running."""
    return _read(pid, "wchan")


def cwd(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/cwd")


def pgid(pid: int) -> int:
    return os.getpgid(pid)


def socket_inode(pid: int, fd: int) -> int | None:
    """Inode of the socket open on pid's fd, or None if that fd is not a socket."""
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except FileNotFoundError:
        return None
    if target.startswith("socket:[") and target.endswith("]"):
        return int(target[8:-1])
    return None


def unix_listener_inode(path: str) -> int | None:
    """Inode of the listening Unix socket bound at path (from /proc/net/unix), or None."""
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            # Flags has __SO_ACCEPTCON (0x10000) for a listening socket.
            if len(parts) > 7 and parts[7] == path and int(parts[3], 16) & 0x10000:
                return int(parts[6])
    return None


def descendants(pid: int, zombies: bool = False) -> list[psutil.Process]:
    """Every descendant of pid (children, grandchildren, ...), zombies only if asked for;
    [] if pid is gone."""
    try:
        found = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    if zombies:
        return found
    alive = []
    for p in found:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def process_group_members(group: int, zombies: bool = False) -> list[int]:
    """Pids of the processes whose process group is `group`; zombies only if asked for
    (under the test suite's subreaper, exited orphans stay zombies of pytest)."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = _read(int(name), "stat")
            except (FileNotFoundError, ProcessLookupError):
                continue
            # comm (field 2) may hold spaces and parens: split after its closing paren.
            state, _ppid, pg = stat[stat.rindex(")") + 2:].split()[:3]
            if int(pg) == group and (zombies or state != "Z"):
                members.append(int(name))
    return sorted(members)


# ---- idle in accept() ---------------------------------------------------------------------
# System call numbers, from the kernel's UAPI tables: x86_64 from
# arch/x86/entry/syscalls/syscall_64.tbl (asm/unistd_64.h), the others from the generic
# table include/uapi/asm-generic/unistd.h (which has no poll/select/epoll_wait: only the
# p-variants). Checked against /usr/include/x86_64-linux-gnu/asm/unistd_64.h and
# /usr/include/asm-generic/unistd.h on Debian 12.
_GENERIC = {"accept": 202, "accept4": 242, "ppoll": 73, "pselect6": 72,
            "epoll_pwait": 22, "epoll_pwait2": 441}
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"accept": 43, "accept4": 288, "poll": 7, "ppoll": 271, "select": 23,
               "pselect6": 270, "epoll_wait": 232, "epoll_pwait": 281, "epoll_pwait2": 441},
    "aarch64": _GENERIC,
    "riscv64": _GENERIC,
    "loongarch64": _GENERIC,
}


def _syscall_table() -> dict[int, str]:
    machine = os.uname().machine
    try:
        return {nr: name for name, nr in SYSCALLS[machine].items()}
    except KeyError:
        raise RuntimeError(f"in_accept: no system call table for {machine}") from None


def blocked_syscall(pid: int) -> tuple[str, list[int]] | None:
    """(name, arguments) of the system call pid is blocked in, if it is one of accept,
    accept4, poll, ppoll, select, pselect6, epoll_wait, epoll_pwait(2); else None
    (running, blocked in something else, or not in a system call)."""
    fields = _read(pid, "syscall").split()
    if not fields or not fields[0].isdigit():  # "running", or "-1 sp pc" (not in a call)
        return None
    name = _syscall_table().get(int(fields[0]))
    return (name, [int(a, 16) for a in fields[1:7]]) if name else None


def _read_mem(pid: int, addr: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(size)


def _waits_on_fd0(pid: int, name: str, args: list[int]) -> bool:
    if name in ("accept", "accept4"):
        return args[0] == 0
    if name in ("poll", "ppoll"):             # (struct pollfd *fds, nfds, ...)
        n = min(args[1], 64)
        raw = _read_mem(pid, args[0], 8 * n)   # struct pollfd {int fd; short events, revents}
        return any(fd == 0 for fd, _, _ in struct.iter_unpack("ihh", raw))
    if name in ("select", "pselect6"):        # (nfds, fd_set *readfds, ...)
        if args[0] < 1 or args[1] == 0:
            return False
        return bool(_read_mem(pid, args[1], 1)[0] & 1)
    # epoll_wait(epfd, ...): the epoll instance lists its targets as "tfd: N" in fdinfo.
    for line in _read(pid, f"fdinfo/{args[0]}").splitlines():
        if line.startswith("tfd:") and int(line.split()[1]) == 0:
            return True
    return False


def in_accept(pid: int) -> bool:
    """True if pid (its main thread) is blocked waiting for a connection on fd 0: in
    accept()/accept4() on fd 0, or in poll/select/epoll_wait with fd 0 among the watched
    descriptors. False if it is running, or blocked in anything else (serving a request,
    waiting for a CGI child). False too if the process is gone."""
    try:
        call = blocked_syscall(pid)
        return call is not None and _waits_on_fd0(pid, *call)
    except (FileNotFoundError, ProcessLookupError, OSError):
        return False


def run_until(loop, condition, timeout: float = 10.0, what: str = "condition") -> None:
    """Run a spawnd event loop (spawnd.supervisor.Loop) until condition() is true; fail
    after timeout saying what was awaited. A timer at the deadline wakes the loop, so
    a loop with nothing to do still returns to check."""
    deadline = time.monotonic() + timeout
    guard = loop.call_later(timeout, lambda: None)
    try:
        while not condition():
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                     f"loop has {len(loop.selector.get_map())} fd(s)")
            loop.run_once()
    finally:
        guard.cancel()


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of pid so far, in clock ticks (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        return sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
