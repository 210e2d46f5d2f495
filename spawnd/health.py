"""What the kernel says about a child, without the child's help.

- Idle or busy: a thread blocked in accept()/accept4() on fd 0 is waiting for a request;
  /proc/PID/task/TID/syscall shows that system call and its first argument (the fd).
  An event-loop server (spawnd-wsgi) waits instead in epoll_wait() on an epoll set that
  watches fd 0 among its connections; /proc/PID/fdinfo/EPFD lists the watched fds
  ("tfd:"), so that counts as waiting for a request too.
  A child (its whole process group) is idle when some thread waits for a request in one
  of these ways and no thread does anything else than wait: for a client, a child
  process, a lock or an event.
  Stopped tasks (SIGSTOP) keep showing the call they were in, which makes a race-free
  check possible: stop the group, look, then signal or continue it.
- Resource use of a child's whole process tree (RSS, CPU seconds), from one pass over
  /proc for all children at once (Snapshot).
"""
from __future__ import annotations

import os

# System call numbers by machine: (accept, accept4) and the calls that only wait.
_SYSCALLS = {
    "x86_64": {
        "accept": {43, 288},
        # wait4 waitid futex poll ppoll select pselect6 epoll_wait epoll_pwait epoll_pwait2
        # rt_sigsuspend pause rt_sigtimedwait nanosleep? (no: a sleeping script is busy)
        "wait": {61, 247, 202, 7, 271, 23, 270, 232, 281, 441, 130, 34, 128},
        "epoll": {232, 281, 441},       # epoll_wait epoll_pwait epoll_pwait2
    },
    "aarch64": {
        "accept": {202, 242},
        "wait": {260, 95, 98, 73, 72, 22, 441, 133, 137},
        "epoll": {22, 441},             # epoll_pwait epoll_pwait2
    },
}
_NUMBERS = _SYSCALLS.get(os.uname().machine)   # what platform.machine() returns on Linux


def supported() -> bool:
    return _NUMBERS is not None


def _thread_syscalls(pid: int):
    """(number, first argument) for each thread of pid; number -1 when running."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                fields = f.read().split()
        except OSError:
            continue
        if not fields or fields[0] == "running" or fields[0] == "-1":
            yield -1, None
        else:
            yield int(fields[0]), int(fields[1], 16) if len(fields) > 1 else None


def is_accept(number: int, arg0: int | None) -> bool:
    """True for accept()/accept4() on fd 0."""
    return _NUMBERS is not None and number in _NUMBERS["accept"] and arg0 == 0


def sole_acceptor(pid: int, pgid: int) -> bool:
    """True when pid is single-threaded and the only process of its group whose fd 0 is
    the listening socket (fcgiwrap, php-cgi without workers, a libfcgi program)."""
    try:
        if len(os.listdir(f"/proc/{pid}/task")) != 1:
            return False
        inode = os.stat(f"/proc/{pid}/fd/0").st_ino
    except OSError:
        return False
    for other in group_pids(pgid):
        if other == pid:
            continue
        try:
            if os.stat(f"/proc/{other}/fd/0").st_ino == inode:
                return False
        except OSError:
            continue
    return True


def stat_fields(pid) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name: [0] state, [1] ppid, [2] pgid,
    [11] utime, [12] stime, [21] rss pages. None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()


def all_stats():
    """(pid, stat_fields) for every process."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(entry)
            if fields is not None:
                yield int(entry), fields


def group_pids(pgid: int) -> list[int]:
    """Every process in process group pgid."""
    return [pid for pid, fields in all_stats() if int(fields[2]) == pgid]


def group_stopped(pids) -> bool:
    """True when every process in pids is stopped (state T) or gone."""
    for pid in pids:
        fields = stat_fields(pid)
        if fields is not None and fields[0] not in (b"T", b"t", b"Z", b"X"):
            return False
    return True


def epoll_watches_fd0(pid: int, epfd: int) -> bool:
    """True when pid's fd epfd is an epoll set that watches pid's fd 0."""
    try:
        with open(f"/proc/{pid}/fdinfo/{epfd}") as f:
            for line in f:
                if line.startswith("tfd:") and line.split(maxsplit=2)[1] == "0":
                    return True
    except OSError:
        pass
    return False


def group_idle(pids) -> bool:
    """True when some thread waits for a request (in accept(fd 0), or in epoll_wait on a
    set that watches fd 0) and no thread is doing work."""
    if _NUMBERS is None:
        return False
    accepts, waits, epolls = _NUMBERS["accept"], _NUMBERS["wait"], _NUMBERS["epoll"]
    waiting = False
    for pid in pids:
        for number, arg0 in _thread_syscalls(pid):
            if number in accepts and arg0 == 0:
                waiting = True
            elif number not in waits:
                return False
            elif number in epolls and not waiting and arg0 is not None:
                waiting = epoll_watches_fd0(pid, arg0)
    return waiting


_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class Snapshot:
    """Every process's parent, CPU seconds and RSS, from one pass over /proc.

    One read of /proc/PID/stat per process gives all three, so the usage of every child's
    tree costs one scan per status call, not one scan per child."""

    def __init__(self) -> None:
        self.usage: dict[int, tuple[float, int]] = {}
        self.kids: dict[int, list[int]] = {}
        self.groups: dict[int, list[int]] = {}      # pgid -> pids
        for pid, fields in all_stats():
            self.kids.setdefault(int(fields[1]), []).append(pid)
            self.groups.setdefault(int(fields[2]), []).append(pid)
            self.usage[pid] = ((int(fields[11]) + int(fields[12])) / _TICKS,
                               int(fields[21]) * _PAGE)

    def tree_usage(self, pid: int) -> tuple[int, float]:
        """(RSS bytes, CPU seconds) of pid and all its descendants."""
        rss, cpu = 0, 0.0
        todo = [pid]
        while todo:
            p = todo.pop()
            u = self.usage.get(p)
            if u is not None:
                cpu += u[0]
                rss += u[1]
            todo.extend(self.kids.get(p, ()))
        return rss, cpu
