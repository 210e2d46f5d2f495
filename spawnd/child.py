"""How one child is started: the children's contract of SPEC.md.

fd 0 is the pool's (blocking) listening socket, fd 1 and fd 2 are one pipe read by spawnd,
and nothing else is open. The child leads its own process group, runs as the pool's user,
group and supplementary groups, in its cwd/chroot with its umask and rlimits, and sees a
clean environment.

subprocess.Popen does the careful part and takes its fast vfork path when no preexec_fn is
given. Only chroot and rlimits need code in the child between fork and exec; Popen runs
preexec_fn after it has already switched user, so when one is needed the identity switch
moves into the same function (chroot and raising limits must happen while still root).
"""
from __future__ import annotations

import os
import resource
import subprocess
import time
from dataclasses import dataclass, field

from . import health

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def environment(pool, parent_env=os.environ) -> dict[str, str]:
    """The child's environment: PATH and LANG, then inherit_env, then env, then
    FCGI_WEB_SERVER_ADDRS from allowed_clients."""
    env = {"PATH": BASE_PATH, "LANG": parent_env.get("LANG", "C.UTF-8")}
    for name in pool.inherit_env:
        if name in parent_env:
            env[name] = parent_env[name]
    env.update(pool.env)
    if pool.allowed_clients:
        env["FCGI_WEB_SERVER_ADDRS"] = ",".join(pool.allowed_clients)
    return env


@dataclass(eq=False)
class Child:
    """One running child process (the leader of its own process group)."""
    pid: int
    popen: subprocess.Popen
    output_fd: int                 # read end of the child's stdout/stderr pipe
    started: float                 # time.monotonic() at spawn
    started_wall: float = field(default_factory=time.time)
    state: str = "starting"        # starting -> running -> stopping
    restarts: int = 0              # restarts of the pool before this child started
    generation: int = 0            # a rolling restart replaces older generations
    timers: list = field(default_factory=list)
    _sample: tuple | None = None   # (monotonic time, CPU seconds) at the last status
    cpu_sample: tuple | None = None   # the same, for recycling (max_cpu)
    cpu_over: int = 0              # consecutive samples above max_cpu
    start_failed: bool = False     # killed for missing probe.start_timeout
    idle_since: float | None = None   # scaling: first seen waiting in accept()

    @property
    def pgid(self) -> int:
        return self.pid

    def status(self, now: float, snapshot: "health.Snapshot", window: bool = True) -> dict:
        """pid, state, uptime, RSS and CPU% over the child's whole process tree.
        CPU% is measured since the previous status call (since start for the first);
        ``window=False`` (a metrics scrape, which has no use for it) leaves that window
        to the status callers."""
        rss, cpu = snapshot.tree_usage(self.pid)
        busy = self.cpu_percent("_sample", now, cpu) if window else None
        return {"pid": self.pid, "state": self.state, "uptime": round(now - self.started, 3),
                "started": self.started_wall, "restarts": self.restarts, "rss": rss,
                "cpu_seconds": round(cpu, 3),
                "cpu_percent": None if busy is None else round(busy, 1)}

    def cpu_percent(self, window: str, now: float, cpu: float) -> float:
        """CPU% of the tree (cpu: its CPU seconds now) since the previous call for the same
        window attribute (status's ``_sample``, recycling's ``cpu_sample``), or since start;
        then the window starts again."""
        then, cpu_then = getattr(self, window) or (self.started, 0.0)
        setattr(self, window, (now, cpu))
        return 100.0 * (cpu - cpu_then) / (now - then) if now > then else 0.0

    def reaped(self, returncode: int) -> None:
        """Tell Popen the status we reaped, so it never waits for this pid itself."""
        self.popen.returncode = returncode


def spawn(pool, listen_fd: int) -> Child:
    """Start one child of pool on listen_fd. Raises OSError with the exec error."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        kwargs = dict(stdin=listen_fd, stdout=write_fd, stderr=write_fd,
                      close_fds=True, process_group=0, env=environment(pool),
                      umask=-1 if pool.umask is None else pool.umask)
        if pool.chroot or pool.rlimits:
            kwargs["preexec_fn"] = _prepare(pool)
        else:
            kwargs.update(cwd=pool.cwd, **_identity_kwargs(pool))
        popen = subprocess.Popen(list(pool.command), **kwargs)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    os.set_blocking(read_fd, False)
    return Child(pid=popen.pid, popen=popen, output_fd=read_fd, started=time.monotonic())


def _identity_kwargs(pool) -> dict:
    """Popen's own user switch, when it is a switch at all."""
    if pool.uid == os.geteuid() and pool.gid == os.getegid() and not pool.groups:
        return {}
    kwargs = {"user": pool.uid, "group": pool.gid}
    if os.geteuid() == 0:
        kwargs["extra_groups"] = list(pool.groups)
    return kwargs


def _prepare(pool):
    """preexec_fn for pools with chroot or rlimits (runs in the forked child)."""
    rlimits = [(res, soft, hard) for res, soft, hard in pool.rlimits]
    root, cwd = pool.chroot, pool.cwd
    uid, gid, groups = pool.uid, pool.gid, list(pool.groups)
    switch = (uid, gid) != (os.geteuid(), os.getegid()) or bool(groups)

    def prepare():
        try:
            for res, soft, hard in rlimits:
                resource.setrlimit(res, (soft, hard))
            if root:
                os.chroot(root)
                os.chdir(cwd or "/")
            elif cwd:
                os.chdir(cwd)
            if switch:
                if os.geteuid() == 0:
                    os.setgroups(groups)
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
        except OSError as e:
            # fd 2 is spawnd's pipe: say what failed, Popen then reports the exception.
            os.write(2, f"spawnd: cannot prepare child: {e}\n".encode())
            raise
    return prepare
