"""One pool's state machine: desired versus running children, restarts, backoff, stop.

The pool never waits. It starts children through child.spawn, asks the supervisor's loop
for timers (loop.call_later) and is told about exits (child_exited) and about process
groups that may have emptied (check_groups). Every state change has a named cause.

Restart rules
- restart: always | on-failure | never decides whether an exited child is replaced.
- A failure is an exit with a non-zero status or by a signal spawnd did not send, or a
  command that cannot be started. A failure of a child that ran less than
  backoff.reset_after extends the pool's failure streak; the replacement then waits
  backoff.initial * 2**(streak-1), capped at backoff.max. A child that ran at least
  reset_after before failing resets the streak, so it is replaced at once.
- A clean exit (status 0: php-cgi after PHP_FCGI_MAX_REQUESTS, a runner's --max-requests)
  is a recycle, replaced at once; but a slot is never restarted sooner than ready_after after
  its previous start, so a program that exits 0 at once cannot spin the CPU.
- A child counts as started ("running") once it has been alive ready_after.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

from . import child as childmod
from .log import log

# Pool states, as shown by status.
STOPPED, STARTING, RUNNING, BACKOFF, DEGRADED, STOPPING = (
    "stopped", "starting", "running", "backoff", "degraded", "stopping")


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


class Pool:
    def __init__(self, config, bound, loop):
        self.config = config
        self.name = config.name
        self.bound = bound
        self.loop = loop
        self.desired = config.processes.min
        self.wanted = False             # start() sets, stop() clears
        self.children: dict[int, childmod.Child] = {}
        self.lingering: dict[int, object] = {}   # pgid -> SIGKILL timer, groups outliving their leader
        self.streak = 0                 # consecutive quick failures
        self.retry_at: float | None = None
        self._retry_timer = None
        self._pending_slots = 0         # replacements waiting for a slot timer
        self.restarts = 0
        self.last_exit: str | None = None
        self.last_error: str | None = None
        self.on_stopped = None          # callback when a stop completes

    # ---- commands ---------------------------------------------------------------
    def start(self) -> None:
        self.wanted = True
        self.streak = 0
        self.manage()

    def stop(self, on_stopped=None) -> None:
        """Gracefully stop every child; the socket stays bound."""
        self.wanted = False
        self.on_stopped = on_stopped
        self._cancel_retry()
        for ch in list(self.children.values()):
            self._stop_child(ch)
        self._check_stopped()

    def kill_all(self) -> None:
        """SIGKILL every process group of the pool now (shutdown deadline)."""
        for pgid in [ch.pgid for ch in self.children.values()] + list(self.lingering):
            _killpg(pgid, signal.SIGKILL)

    # ---- state ------------------------------------------------------------------
    @property
    def state(self) -> str:
        if not self.wanted:
            return STOPPING if self.children or self.lingering else STOPPED
        if self.retry_at is not None:
            return BACKOFF
        live = [c for c in self.children.values() if c.state != "stopping"]
        if len(live) < self.desired:
            return DEGRADED
        if any(c.state == "starting" for c in live):
            return STARTING
        return RUNNING

    def live_children(self) -> list:
        return [c for c in self.children.values() if c.state != "stopping"]

    # ---- bringing the count to what is wanted -------------------------------------
    def manage(self) -> None:
        """Start children until the desired count is reached (unless backing off)."""
        if not self.wanted or self.retry_at is not None:
            return
        while len(self.live_children()) + self._pending_slots < self.desired:
            if not self._spawn_one():
                return

    def _spawn_one(self) -> bool:
        try:
            ch = childmod.spawn(self.config, self.bound.fileno())
        except (OSError, subprocess.SubprocessError) as e:
            self.last_error = _exec_error(self.config.command[0], e)
            log.error(f"{self.name}: cannot start {self.config.command[0]}: {self.last_error}")
            self._failed()
            return False
        ch.restarts = self.restarts
        self.children[ch.pid] = ch
        self.last_error = None
        self.loop.watch_output(self, ch)
        ch.timers.append(self.loop.call_later(self.config.ready_after, self._ready, ch))
        log.info(f"{self.name}: started child {ch.pid}")
        return True

    def _ready(self, ch) -> None:
        if ch.state == "starting":
            ch.state = "running"

    def _failed(self) -> None:
        """Extend the failure streak and schedule the next attempt."""
        self.streak += 1
        b = self.config.backoff
        delay = min(b.initial * (2 ** (self.streak - 1)), b.max)
        self._cancel_retry()
        self.retry_at = time.monotonic() + delay
        self._retry_timer = self.loop.call_later(delay, self._retry)
        log.warning(f"{self.name}: {self.streak} consecutive failure(s); "
                    f"next start in {_fmt(delay)}")

    def _retry(self) -> None:
        self.retry_at = None
        self._retry_timer = None
        self.manage()

    def _cancel_retry(self) -> None:
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        self._retry_timer = None
        self.retry_at = None

    # ---- events from the supervisor -----------------------------------------------
    def child_exited(self, pid: int, status: int) -> bool:
        ch = self.children.pop(pid, None)
        if ch is None:
            return False
        ch.reaped(os.waitstatus_to_exitcode(status))
        for t in ch.timers:
            t.cancel()
        ran = time.monotonic() - ch.started
        how = describe_status(status)
        self.last_exit = how
        if _group_alive(ch.pgid):
            # Its own children (php-cgi workers, CGI scripts) outlive it: stop them too.
            _killpg(ch.pgid, self.config.stop.signal)
            self.lingering[ch.pgid] = self.loop.call_later(
                self.config.stop.timeout, _killpg, ch.pgid, signal.SIGKILL)
        if ch.state == "stopping":
            log.info(f"{self.name}: child {pid} stopped ({how})")
            self._check_stopped()
            return True
        failed = not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)
        log.log(log.WARNING if failed else log.INFO,
                f"{self.name}: child {pid} {how} after {_fmt(ran)}")
        if not self.wanted:
            self._check_stopped()
            return True
        policy = self.config.restart
        if policy == "never" or (policy == "on-failure" and not failed):
            self.desired = max(0, self.desired - 1)
            return True
        self.restarts += 1
        if failed:
            if ran >= self.config.backoff.reset_after:
                self.streak = 0
            else:
                self._failed()
                return True
        if self.retry_at is None:
            wait = ch.started + self.config.ready_after - time.monotonic()
            if wait > 0 and not failed:
                self._pending_slots += 1
                self.loop.call_later(wait, self._slot_free)
            else:
                self.manage()
        return True

    def _slot_free(self) -> None:
        self._pending_slots -= 1
        self.manage()

    def check_groups(self) -> None:
        """Forget lingering process groups that have emptied."""
        for pgid in [p for p in self.lingering if not _group_alive(p)]:
            self.lingering.pop(pgid).cancel()
        self._check_stopped()

    def _check_stopped(self) -> None:
        if not self.wanted and not self.children and not self.lingering:
            cb, self.on_stopped = self.on_stopped, None
            if cb is not None:
                cb(self)

    def _stop_child(self, ch) -> None:
        if ch.state == "stopping":
            return
        ch.state = "stopping"
        for t in ch.timers:
            t.cancel()
        ch.timers = [self.loop.call_later(self.config.stop.timeout, self._kill_child, ch)]
        _killpg(ch.pgid, self.config.stop.signal)

    def _kill_child(self, ch) -> None:
        if ch.pid in self.children:
            log.warning(f"{self.name}: child {ch.pid} still running after "
                        f"{_fmt(self.config.stop.timeout)}; sending SIGKILL")
            _killpg(ch.pgid, signal.SIGKILL)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exec_error(program: str, e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def _fmt(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds:.1f}s"
