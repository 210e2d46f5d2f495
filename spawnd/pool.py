"""One pool's state machine: desired versus running children, restarts, backoff, retiring.

The pool never waits. It starts children through child.spawn, asks the supervisor's loop
for timers (loop.call_later), and is told about exits (child_exited) and about process
groups that may have emptied (check_groups). After every change it re-evaluates its
waiters, the (condition, callback) pairs through which stop, scale, rolling restart and
reload learn that they are complete. Every state change has a named cause.

Restart rules
- restart: always | on-failure | never decides whether an exited child is replaced.
- A failure is an exit with a non-zero status or by a signal (also one sent with
  `spawnctl signal`) of a child spawnd was not retiring, or a command that cannot be started. A failure of a child that ran less than
  backoff.reset_after extends the pool's failure streak; the replacement then waits
  backoff.initial * 2**(streak-1), capped at backoff.max. A child that ran at least
  reset_after before failing resets the streak, so it is replaced at once.
- A clean exit (status 0: php-cgi after PHP_FCGI_MAX_REQUESTS, a runner's --max-requests)
  is a recycle, replaced at once; but a slot is never restarted sooner than
  max(ready_after, backoff.initial) after its previous start, so a program that exits 0 at
  once cannot spin the CPU.
- A child counts as started ("running") once it has been alive ready_after.

Retiring a child (stop, scale down, rolling restart, shutdown)
- stop.when = idle (default): the child's process group is stopped with SIGSTOP and its
  threads' system calls are read (health.group_idle). If it waits in accept() on fd 0 (or
  in epoll_wait() on a set that watches fd 0) and does nothing else, stop.signal is
  queued and the group continued: it dies before it can accept another connection, and
  no request is cut. If it is busy it is continued and
  looked at again 20 ms later. After half of stop.timeout it gets stop.signal anyway.
  When the child is single-threaded and the only process of its group accepting on the
  socket (fcgiwrap, php-cgi, libfcgi programs), spawnd instead traces it (ptrace) and kills
  it at the entry of its next accept() on fd 0: the call has not run, so no connection is
  taken, and this works even when the listen queue never empties (a saturated pool, where
  the child is never seen waiting). Where ptrace is not allowed, the look-and-signal way
  above is used.
- stop.when = now: stop.signal at once (for programs that finish in-flight work on it,
  such as spawnd-wsgi).
- Either way, SIGKILL to the group at stop.timeout.
"""
from __future__ import annotations

import collections
import os
import random
import signal
import socket
import subprocess
import time

from . import child as childmod
from . import health, ptrace
from . import queue as queuemod
from .log import log

# Pool states, as shown by status.
STOPPED, STARTING, RUNNING, BACKOFF, DEGRADED, STOPPING = (
    "stopped", "starting", "running", "backoff", "degraded", "stopping")
LOG_LINES = 1000         # lines kept per pool for `spawnctl logs`
AGE_SPREAD = 0.1         # max_age is shortened by up to this fraction, at random, per child
CPU_SAMPLES = 3          # max_cpu must be exceeded this many samples in a row
IDLE_RETRY = 0.02        # seconds between two looks at a busy child being retired
READY_POLL = 0.02        # probe.ready: how often a starting child is looked at
STOP_SETTLE = 0.001      # first look after SIGSTOP; the kernel stops the group promptly


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
        self.removing = False           # removed by a reload, stopping before it is forgotten
        self.children: dict[int, childmod.Child] = {}
        self.lingering: dict[int, object] = {}   # pgid -> SIGKILL timer, groups outliving their leader
        self.streak = 0                 # consecutive quick failures
        self._retry_timer = None        # the next start after a failure (backoff)
        self._pending_slots = 0         # clean-exit replacements waiting for their slot
        self.generation = 0             # children of older generations are replaced by restart
        self.rolling = False
        self.retired_bounds = []        # old sockets closed when a rolling restart completes
        self.restarts = 0
        self.replacements = collections.Counter()   # cause -> count (crash, age, rss, cpu, ...)
        self.exits = collections.Counter()          # "0", "1", "SIGKILL", ... -> count
        self.last_exit: str | None = None
        self.last_error: str | None = None
        self._waiters: list = []        # (predicate, callback)
        self.logs = collections.deque(maxlen=LOG_LINES)   # recent child lines, for `logs`
        # health: probes, listen queue, scaling
        self.health = "unknown" if config.probe else None    # healthy | unhealthy
        self.probe_failures = 0
        self.last_probe: dict | None = None
        self._probe = None
        self._probe_timer = None
        self.queue = {"depth": 0, "backlog": 0, "max": 0, "full": 0, "samples": 0}
        self._scale_timer = None
        self._scaled_up_at = 0.0
        self.followers: set = set()     # callables getting each new batch of lines

    # ---- children's output ----------------------------------------------------------------
    def output(self, pid: int, lines: list[str]) -> None:
        """Lines a child wrote: to spawnd's log, the pool's ring buffer and followers."""
        log.child_lines(self.name, pid, lines)
        # (pid, line) pairs: formatted only when somebody asks (spawnctl logs), not here on
        # the loop's busiest path.
        self.logs.extend((pid, line) for line in lines)
        if self.followers:
            tagged = format_lines((pid, line) for line in lines)
            for follower in list(self.followers):
                follower(tagged)

    # ---- waiting for conditions ------------------------------------------------------
    def when(self, predicate, callback) -> None:
        """Call callback(self) once predicate(self) holds (checked after every change)."""
        self._waiters.append((predicate, callback))
        self._changed()

    def _changed(self) -> None:
        if self.rolling:
            self._advance_rolling()
        notify = getattr(self.loop, "pool_changed", None)
        if notify is not None:
            notify(self)
        if not self._waiters:
            return
        ready = [w for w in self._waiters if w[0](self)]
        if ready:
            self._waiters = [w for w in self._waiters if w not in ready]
            for _, callback in ready:
                callback(self)

    def settled(self) -> bool:
        """The wanted children are all running and nothing is starting or stopping."""
        if self.rolling or self.lingering:
            return False
        if not self.wanted:
            return not self.children
        states = [c.state for c in self.children.values()]
        return states.count("running") == self.desired == len(states)

    # ---- commands ----------------------------------------------------------------------
    def start(self) -> None:
        self.wanted = True
        self.streak = 0
        # restart: never / on-failure lower `desired` as children end; start restores it.
        self.desired = max(self.desired, self.config.processes.min)
        self.manage()
        self._start_monitoring()
        self._changed()

    def stop(self) -> None:
        """Gracefully stop every child; the socket stays bound."""
        self.wanted = False
        self.rolling = False
        self._cancel_retry()
        self._stop_monitoring()
        for ch in list(self.children.values()):
            self._retire(ch)
        self._changed()

    def scale(self, n: int) -> None:
        self.desired = n
        live = self.live_children()
        # Retire the youngest first: starting children have served least.
        for ch in sorted(live, key=lambda c: c.started, reverse=True)[:max(0, len(live) - n)]:
            self._retire(ch)
        self.manage()
        self._changed()

    def replace(self, ch, cause: str) -> None:
        """Replace one child gracefully: its successor is started (and ready) first."""
        if ch.pid not in self.children or ch.state == "stopping" or ch.generation < 0:
            return
        log.info(f"{self.name}: replacing child {ch.pid} ({cause})")
        self.replacements[cause] += 1
        ch.generation = -1              # older than any generation: the rolling step takes it
        if self.wanted:
            self.rolling = True
            self._changed()

    def check_resources(self, snapshot, now: float) -> None:
        """Recycle children over max_rss, or over max_cpu for CPU_SAMPLES samples in a row
        (measured over each child's whole process tree)."""
        limits = self.config.recycle
        for ch in list(self.children.values()):
            if ch.state != "running" or ch.generation < 0:
                continue
            rss, cpu = snapshot.tree_usage(ch.pid)
            busy = ch.cpu_percent("cpu_sample", now, cpu)
            if limits.max_rss and rss > limits.max_rss:
                self.replace(ch, "rss")
            elif limits.max_cpu:
                ch.cpu_over = ch.cpu_over + 1 if busy > limits.max_cpu else 0
                if ch.cpu_over >= CPU_SAMPLES:
                    self.replace(ch, "cpu")

    def rolling_restart(self, cause: str = "manual") -> None:
        """Replace every child, one at a time: start a new one, when it is ready retire an
        old one. The socket stays bound; settled() tells when it is done."""
        self.generation += 1
        if self.wanted:
            self.replacements[cause] += len(self.live_children())
            self.rolling = True
        self._changed()

    def kill_all(self) -> None:
        """SIGKILL every process group of the pool now (shutdown deadline)."""
        for pgid in [ch.pgid for ch in self.children.values()] + list(self.lingering):
            _killpg(pgid, signal.SIGKILL)

    # ---- state ---------------------------------------------------------------------------
    @property
    def retry_at(self) -> float | None:
        """When the next start after a failure is due (time.monotonic()); None if none is."""
        return None if self._retry_timer is None else self._retry_timer.when

    @property
    def state(self) -> str:
        if not self.wanted:
            return STOPPING if self.children or self.lingering else STOPPED
        if self.retry_at is not None:
            return BACKOFF
        live = self.live_children()
        if len(live) < self.desired:
            return DEGRADED
        if self.rolling or any(c.state == "starting" for c in live):
            return STARTING
        return RUNNING

    def live_children(self) -> list:
        return [c for c in self.children.values() if c.state != "stopping"]

    # ---- bringing the count to what is wanted --------------------------------------------
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
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            self.last_error = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            log.error(f"{self.name}: cannot start {self.config.command[0]}: {self.last_error}")
            self._failed()
            return False
        ch.generation = self.generation
        ch.restarts = self.restarts
        self.children[ch.pid] = ch
        self.last_error = None
        self.loop.watch_output(self, ch)
        if self.config.probe is not None and self.config.probe.ready:
            ch.timers.append(self.loop.call_later(READY_POLL, self._check_started, ch,
                                                  ch.started + self.config.probe.start_timeout))
        else:
            ch.timers.append(self.loop.call_later(self.config.ready_after, self._ready, ch))
        recycle = self.config.recycle
        if recycle is not None and recycle.max_age:
            age = recycle.max_age * (1 - AGE_SPREAD * random.random())
            ch.timers.append(self.loop.call_later(age, self.replace, ch, "age"))
        log.info(f"{self.name}: started child {ch.pid}")
        return True

    def _ready(self, ch) -> None:
        if ch.state == "starting":
            ch.state = "running"
            self._changed()

    def _failed(self) -> None:
        """Extend the failure streak and schedule the next attempt."""
        self.streak += 1
        b = self.config.backoff
        # Past 2**60 the product would only overflow: the cap has long been reached.
        delay = b.max if self.streak > 60 else min(b.initial * (2 ** (self.streak - 1)), b.max)
        self._cancel_retry()
        self._retry_timer = self.loop.call_later(delay, self._retry)
        if self.rolling:
            log.warning(f"{self.name}: rolling restart abandoned: a new child failed")
            self.rolling = False
        log.warning(f"{self.name}: {self.streak} consecutive failure(s); "
                    f"next start in {_fmt(delay)}")

    def _retry(self) -> None:
        self._retry_timer = None
        self.manage()
        if any(c.generation < self.generation for c in self.children.values()):
            self.rolling = True         # a restart the failure interrupted goes on
        self._changed()

    def _cancel_retry(self) -> None:
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        self._retry_timer = None

    def _advance_rolling(self) -> None:
        """One step of a rolling restart (called after every change while rolling)."""
        if not self.wanted or self.retry_at is not None:
            self.rolling = False
            return
        old = [c for c in self.children.values() if c.generation < self.generation]
        if not old:
            self.rolling = False
            for b in self.retired_bounds:
                b.close()
            self.retired_bounds = []
            log.info(f"{self.name}: replacement complete")
            return
        if any(c.state == "stopping" for c in old):
            return                      # one old child at a time
        live = self.live_children()
        if any(c.state == "starting" for c in live if c.generation == self.generation):
            return                      # wait for the replacement to be ready
        if len(live) <= self.desired and self.desired > 0:
            self._spawn_one()           # surge: one more than desired, for a moment
        else:
            self._retire(min(old, key=lambda c: c.started))

    # ---- health: readiness, probes, listen queue, scaling -----------------------------------
    def _check_started(self, ch, deadline: float) -> None:
        """probe.ready: a child is ready once it waits for a connection (health.group_idle:
        its start-up is over) and then a probe of the pool passes. A probe through the
        shared socket cannot pick one child, so the kernel's view of the child is what
        makes this exact; the probe checks the pool answers. Past probe.start_timeout the
        start has failed."""
        if ch.pid not in self.children or ch.state != "starting":
            return
        if time.monotonic() > deadline:
            log.error(f"{self.name}: child {ch.pid} not ready after "
                      f"{_fmt(self.config.probe.start_timeout)}; killing it")
            ch.start_failed = True
            _killpg(ch.pgid, signal.SIGKILL)
            return
        if not health.group_idle(health.group_pids(ch.pgid)):
            ch.timers.append(self.loop.call_later(READY_POLL, self._check_started, ch, deadline))
            return

        def done(ok, detail, latency):
            if ok:
                self._ready(ch)
            elif ch.pid in self.children:
                ch.timers.append(self.loop.call_later(READY_POLL * 5, self._check_started,
                                                      ch, deadline))
        self._new_probe(done).start()

    def _new_probe(self, on_done):
        from .probe import Probe            # only pools with a probe pay for the import
        pr = self.config.probe
        return Probe(getattr(self.loop, "loop", self.loop), self.probe_address(), pr.uri,
                     dict(pr.params), timeout=pr.timeout, expect=pr.expect, on_done=on_done)

    def probe_address(self) -> str:
        """The pool's socket as a client reaches it (wildcards become loopback)."""
        name = self.bound.sock.getsockname()
        if self.bound.sock.family == socket.AF_UNIX:
            return "unix:" + (name if isinstance(name, str) else name.decode())
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(name[0], name[0])
        return f"tcp:[{host}]:{name[1]}" if ":" in host else f"tcp:{host}:{name[1]}"

    def _start_monitoring(self) -> None:
        if self.config.probe is not None and self._probe_timer is None and self._probe is None:
            self._probe_timer = self.loop.call_later(self.config.probe.interval, self._run_probe)
        if self.config.processes.min < self.config.processes.max and self._scale_timer is None:
            self._scale_timer = self.loop.call_later(self.config.processes.interval, self._scale)

    def _stop_monitoring(self) -> None:
        for t in (self._probe_timer, self._scale_timer):
            if t is not None:
                t.cancel()
        self._probe_timer = self._scale_timer = None
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None

    def _run_probe(self) -> None:
        self._probe_timer = None
        if not self.wanted or self.config.probe is None:
            return
        self._probe = self._new_probe(self._probed)
        self._probe.start()

    def _probed(self, ok: bool, detail: str, latency: float) -> None:
        self._probe = None
        pr = self.config.probe
        if pr is None or not self.wanted:
            return
        self.last_probe = {"ok": ok, "detail": detail, "latency": round(latency, 6),
                           "at": time.time()}
        if ok:
            if self.health == "unhealthy":
                log.info(f"{self.name}: healthy again ({detail}, {latency * 1000:.1f}ms)")
            self.health, self.probe_failures = "healthy", 0
        else:
            self.probe_failures += 1
            log.warning(f"{self.name}: probe {pr.uri} failed ({self.probe_failures}/"
                        f"{pr.failures}): {detail}")
            if self.probe_failures >= pr.failures:
                if self.health != "unhealthy":
                    log.error(f"{self.name}: unhealthy after {self.probe_failures} failed probes")
                self.health = "unhealthy"
                self.probe_failures = 0
                for ch in self.live_children():
                    self.replace(ch, "probe")
        self._probe_timer = self.loop.call_later(pr.interval, self._run_probe)
        self._changed()

    def sample_queue(self, count: bool = True) -> dict:
        """Read the listen queue's depth from the kernel and keep the maximum seen. Only
        the sample_interval timer counts (``count``): "samples" and how many found the
        queue full are a rate, which `status` calls and scaling checks must not skew."""
        try:
            depth, backlog = queuemod.depth(self.bound.sock)
        except OSError:
            return self.queue
        q = self.queue
        q["depth"], q["backlog"] = depth, backlog
        q["max"] = max(q["max"], depth)
        if count:
            q["samples"] += 1
            if backlog and depth >= backlog:
                q["full"] += 1
        return q

    def _scale(self) -> None:
        """processes: {min, max}: add children while connections wait in the listen queue;
        retire a child that has waited in accept() for idle_after (never below min, and not
        within idle_after of the last growth, so the pool does not flap)."""
        self._scale_timer = None
        if not self.wanted:
            return
        procs = self.config.processes
        now = time.monotonic()
        waiting = self.sample_queue(count=False)["depth"]
        live = self.live_children()
        starting = any(c.state == "starting" for c in live)
        if waiting and not starting and self.retry_at is None and self.desired < procs.max:
            grow = min(waiting, procs.max - self.desired)
            self.desired += grow
            self._scaled_up_at = now
            log.info(f"{self.name}: {waiting} connection(s) waiting; scaling up to {self.desired}")
            self.manage()
        elif not waiting and self.desired > procs.min and now - self._scaled_up_at >= procs.idle_after:
            groups = health.Snapshot().groups
            for ch in live:
                idle = ch.state == "running" and health.group_idle(groups.get(ch.pgid, ()))
                if not idle:
                    ch.idle_since = None
                elif ch.idle_since is None:
                    ch.idle_since = now
            idle = [c for c in live if c.idle_since is not None
                    and now - c.idle_since >= procs.idle_after]
            if idle:
                victim = max(idle, key=lambda c: c.started)
                self.desired -= 1
                log.info(f"{self.name}: child {victim.pid} idle for {_fmt(now - victim.idle_since)}; "
                         f"scaling down to {self.desired}")
                self._retire(victim)
        self._scale_timer = self.loop.call_later(procs.interval, self._scale)
        self._changed()

    # ---- events from the supervisor --------------------------------------------------------
    def child_exited(self, pid: int, status: int) -> bool:
        ch = self.children.pop(pid, None)
        if ch is None:
            return False
        ch.reaped(os.waitstatus_to_exitcode(status))
        for t in ch.timers:
            t.cancel()
        ran = time.monotonic() - ch.started
        how = describe_status(status)
        self.exits[how.rsplit(" ", 1)[-1]] += 1
        if _group_alive(ch.pgid):
            # Its own children (php-cgi workers, CGI scripts) outlive it: stop them too.
            _killpg(ch.pgid, self.config.stop.signal)
            _killpg(ch.pgid, signal.SIGCONT)
            self.lingering[ch.pgid] = self.loop.call_later(
                self.config.stop.timeout, _killpg, ch.pgid, signal.SIGKILL)
        if ch.state == "stopping":
            log.info(f"{self.name}: child {pid} stopped ({how})")
        else:
            self._unexpected_exit(ch, status, how, ran)
        self._changed()
        return True

    def _unexpected_exit(self, ch, status, how, ran) -> None:
        self.last_exit = f"child {ch.pid} {how}"
        failed = ch.start_failed or not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)
        log.log(log.WARNING if failed else log.INFO,
                f"{self.name}: child {ch.pid} {how} after {_fmt(ran)}")
        if not self.wanted:
            return
        policy = self.config.restart
        if policy == "never" or (policy == "on-failure" and not failed):
            self.desired = max(0, self.desired - 1)
            return
        self.restarts += 1
        self.replacements["crash" if failed else "exit"] += 1
        if failed:
            if ran < self.config.backoff.reset_after:
                self._failed()
                return
            self.streak = 0
        if self.retry_at is not None:
            return
        gap = max(self.config.ready_after, self.config.backoff.initial)
        wait = ch.started + gap - time.monotonic()
        if wait > 0 and not failed:
            self._pending_slots += 1
            self.loop.call_later(wait, self._slot_free)
        else:
            self.manage()

    def _slot_free(self) -> None:
        self._pending_slots -= 1
        self.manage()
        self._changed()

    def check_groups(self) -> None:
        """Forget lingering process groups that have emptied."""
        gone = [p for p in self.lingering if not _group_alive(p)]
        for pgid in gone:
            self.lingering.pop(pgid).cancel()
        if gone:
            self._changed()

    # ---- retiring a child --------------------------------------------------------------------
    def _retire(self, ch) -> None:
        if ch.state == "stopping":
            return
        ch.state = "stopping"
        for t in ch.timers:
            t.cancel()
        timeout = self.config.stop.timeout
        ch.timers = [self.loop.call_later(timeout, self._kill_child, ch)]
        if self.config.stop.when == "idle" and health.supported():
            if health.sole_acceptor(ch.pid, ch.pgid):
                try:
                    ptrace.seize_and_interrupt(ch.pid)
                    # A program that never calls accept() itself (php-cgi's master before
                    # it forks its workers) gets stop.signal after half the timeout.
                    ch.timers.append(self.loop.call_later(timeout / 2, self._signal_traced, ch))
                    return
                except OSError as e:
                    log.debug(f"{self.name}: cannot trace child {ch.pid} ({e.strerror}); "
                              "looking for an idle moment instead")
            self._look_when_idle(ch, time.monotonic() + timeout / 2)
        else:
            _killpg(ch.pgid, self.config.stop.signal)

    def _signal_traced(self, ch) -> None:
        if ch.pid in self.children:
            log.info(f"{self.name}: child {ch.pid} did not reach accept(); signalling it")
            _killpg(ch.pgid, self.config.stop.signal)

    def child_trace_stop(self, pid: int, status: int) -> bool:
        """A traced child (being retired) stopped: kill it at the entry of its next
        accept() on fd 0, before the call can take a connection; else let it go on."""
        ch = self.children.get(pid)
        if ch is None:
            return False
        try:
            if ptrace.is_syscall_stop(status):
                entry = ptrace.syscall_entry(pid)
                waiting = entry is not None and health.is_accept(*entry)
            elif ptrace.is_event_stop(status):
                # Never decide here: /proc/PID/syscall still names accept() when the call
                # has just returned a connection (seen under load: a reset per ~30
                # retirements). Resume; an idle child's interrupted accept() restarts and
                # stops at its entry at once, which is conclusive.
                waiting = False
            else:                       # a signal on its way to the child: deliver it
                ptrace.resume(pid, os.WSTOPSIG(status))
                return True
            if waiting:
                log.info(f"{self.name}: child {pid} retired between two requests")
                _killpg(ch.pgid, signal.SIGKILL)
            else:
                ptrace.resume(pid)
        except OSError:
            pass                        # it died meanwhile; its exit comes next
        return True

    def _look_when_idle(self, ch, give_up_at: float) -> None:
        if ch.pid not in self.children:
            return
        if time.monotonic() >= give_up_at:
            log.info(f"{self.name}: child {ch.pid} still busy; signalling it anyway")
            _killpg(ch.pgid, self.config.stop.signal)
            return
        _killpg(ch.pgid, signal.SIGSTOP)
        pids = health.group_pids(ch.pgid)
        ch.timers.append(self.loop.call_later(STOP_SETTLE, self._look, ch, pids, give_up_at, 0))

    def _look(self, ch, pids, give_up_at, tries) -> None:
        if ch.pid not in self.children:
            return
        if not health.group_stopped(pids) and tries < 20:
            ch.timers.append(self.loop.call_later(STOP_SETTLE, self._look, ch, pids,
                                                  give_up_at, tries + 1))
            return
        if health.group_idle(pids):
            _killpg(ch.pgid, self.config.stop.signal)   # queued: delivered before accept resumes
            _killpg(ch.pgid, signal.SIGCONT)
            return
        _killpg(ch.pgid, signal.SIGCONT)
        ch.timers.append(self.loop.call_later(IDLE_RETRY, self._look_when_idle, ch, give_up_at))

    def _kill_child(self, ch) -> None:
        if ch.pid in self.children:
            log.warning(f"{self.name}: child {ch.pid} still running after "
                        f"{_fmt(self.config.stop.timeout)}; sending SIGKILL")
            _killpg(ch.pgid, signal.SIGKILL)
            _killpg(ch.pgid, signal.SIGCONT)

    # ---- status ---------------------------------------------------------------------------------
    def status(self, snapshot: "health.Snapshot | None" = None, window: bool = True) -> dict:
        """The pool and its children (``window``: see Child.status)."""
        now = time.monotonic()
        snapshot = snapshot or health.Snapshot()
        return {
            "name": self.name,
            "state": self.state,
            "listen": self.bound.address,
            "desired": self.desired,
            "running": len(self.live_children()),
            "restarts": self.restarts,
            "replacements": dict(self.replacements),
            "exits": dict(self.exits),
            "failures": self.streak,
            "retry_in": None if self.retry_at is None else round(max(0.0, self.retry_at - now), 3),
            "last_exit": self.last_exit,
            "last_error": self.last_error,
            "min": self.config.processes.min,
            "max": self.config.processes.max,
            "queue": dict(self.sample_queue(count=False)),
            "health": self.health,
            "probe": self.last_probe,
            "children": [c.status(now, snapshot, window) for c in sorted(self.children.values(),
                                                              key=lambda c: c.started)],
        }


def format_lines(entries) -> list[str]:
    """(pid, line) pairs from a pool's log buffer as spawnctl logs shows them."""
    return [f"[{pid}] {line}" for pid, line in entries]


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


def _fmt(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds:.1f}s"
