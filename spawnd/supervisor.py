"""The supervisor: spawnd's single event loop.

One wait (epoll via selectors) serves everything: signals arrive as bytes on a wake-up
socket (signal.set_wakeup_fd), children's output on their pipes, and deadlines come from a
timer heap that sets the wait's timeout. With no timer due the loop sleeps until an event:
there is no polling tick. Signal handlers do nothing but wake the loop; the loop then
dispatches handle_<signal>, reaps every exited process (spawnd is a child subreaper, so
orphaned grandchildren come here too), and lets each pool bring its children back to the
wanted count.
"""
from __future__ import annotations

import ctypes
import dataclasses
import heapq
import itertools
import os
import selectors
import signal
import socket
import time

from . import config as configmod
from . import health, listen, ptrace, systemd
from .control import AdminServer, CommandError
from .log import log
from .metrics import exposition
from .pool import BACKOFF, STOPPED, Pool, format_lines

PR_SET_CHILD_SUBREAPER = 36
MAX_SCALE = 10000           # spawnctl scale: a typo must not fork a million children
READ_CHUNK = 65536          # per readiness event and pipe: a flooding child cannot hog the loop
MAX_LINE = 16384            # longer lines are cut; memory per pipe stays bounded


class Timer:
    __slots__ = ("when", "fn", "args", "cancelled")

    def __init__(self, when, fn, args):
        self.when, self.fn, self.args, self.cancelled = when, fn, args, False

    def cancel(self) -> None:
        self.cancelled = True
        self.fn = self.args = None      # do not keep a child alive until the due time


class Loop:
    """Timers and fd callbacks around one selector."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._timers: list = []
        self._seq = itertools.count()

    def call_later(self, delay: float, fn, *args) -> Timer:
        t = Timer(time.monotonic() + max(0.0, delay), fn, args)
        heapq.heappush(self._timers, (t.when, next(self._seq), t))
        return t

    def add_reader(self, fd: int, callback) -> None:
        self.selector.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def run_once(self) -> None:
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        timeout = max(0.0, timers[0][0] - time.monotonic()) if timers else None
        for key, mask in self.selector.select(timeout):
            key.data(mask)
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            t = heapq.heappop(timers)[2]
            if not t.cancelled:
                t.fn(*t.args)


class OutputReader:
    """Forwards one child's output pipe line by line as "pool[pid]: text"."""

    def __init__(self, loop: Loop, pool, pid: int, fd: int, on_close=None):
        self.loop, self.pool, self.pid, self.fd = loop, pool, pid, fd
        self.on_close = on_close
        self.buf = bytearray()
        self.dropping = 0          # bytes dropped so far from an over-long line
        loop.add_reader(fd, self.on_readable)

    def on_readable(self, _mask=None) -> None:
        try:
            data = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        buf = self.buf
        buf += data
        lines = []
        start = 0
        while (nl := buf.find(b"\n", start)) >= 0:
            if self.dropping:
                lines.append(f"[... {self.dropping + nl - start} more bytes of that line dropped]")
                self.dropping = 0
            else:
                lines.append(buf[start:nl].decode("utf-8", "replace").rstrip("\r"))
            start = nl + 1
        del buf[:start]
        if len(buf) > MAX_LINE:
            if not self.dropping:
                lines.append(buf[:MAX_LINE].decode("utf-8", "replace")
                             + f" [line longer than {MAX_LINE} bytes, cut]")
                self.dropping = len(buf) - MAX_LINE
            else:
                self.dropping += len(buf)
            buf.clear()
        if lines:
            self.pool.output(self.pid, lines)

    def close(self) -> None:
        if self.fd < 0:
            return
        if self.buf and not self.dropping:
            self.pool.output(self.pid, [self.buf.decode("utf-8", "replace")])
        self.buf.clear()
        self.loop.remove_reader(self.fd)
        os.close(self.fd)
        if self.on_close is not None:
            self.on_close(self)
        self.fd = -1


class Supervisor:
    # Every signal whose default action would end spawnd (and orphan its children) is
    # caught: QUIT stops gracefully like TERM; USR2 is logged and ignored.
    HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
               signal.SIGUSR2, signal.SIGCHLD)

    def __init__(self, config, config_path: str, passed=(), notify=None):
        self.config = config
        self.passed = list(passed)          # [(fd, name)] from systemd
        self.notify = notify or systemd.Notifier(None)
        self._status_line = None
        self.config_path = config_path
        self.loop = Loop()
        self.pools: dict[str, Pool] = {}
        self.readers: dict[int, OutputReader] = {}
        self.shutting_down = False
        self.exit_code: int | None = None
        self.admin: AdminServer | None = None
        self.metrics_server = None
        self._resource_timer = None
        self.started = time.time()

    # ---- start-up -----------------------------------------------------------------
    def bind_all(self) -> list[str]:
        """Bind every pool's socket; on any error close them all and return the errors."""
        bound, errors, adopted = {}, [], set()
        for name, pc in self.config.pools.items():
            try:
                fd = systemd.pick(self.passed, pc.listen)
                if fd is not None:
                    bound[name] = listen.adopt(fd, pc.listen)
                    adopted.add(fd)
                else:
                    bound[name] = listen.bind(pc.listen, pc.socket, (pc.uid, pc.gid))
            except (listen.ListenError, systemd.SystemdError) as e:
                errors.append(f"{pc.where.get('listen', name)}: {e}")
        if errors:
            for b in bound.values():
                b.close()
            return errors
        for fd, name in self.passed:
            if fd not in adopted:           # a pool that no longer exists
                log.info(f"systemd passed a socket ({name}) no pool uses; closing it")
                os.close(fd)
                if name in self.config.pools or name == "unknown":
                    continue
                self.notify.remove_fds(name)
        self.passed = []
        for name, pc in self.config.pools.items():
            self.pools[name] = Pool(pc, bound[name], self)
        return []

    def open_metrics(self) -> list[str]:
        """The optional HTTP endpoint for Prometheus (spawnd.metrics_listen)."""
        d = self.config.daemon
        if d.metrics_listen is None:
            return []
        from .httpmetrics import MetricsServer
        host, port = d.metrics_listen
        self.metrics_server = MetricsServer(self.loop, host, port, lambda: exposition(self))
        try:
            self.metrics_server.open()
        except OSError as e:
            self.metrics_server = None
            return [f"{d.where.get('metrics_listen', self.config_path)}: cannot listen on "
                    f"{host}:{port}: {e.strerror or e}"]
        return []

    def open_admin(self) -> list[str]:
        d = self.config.daemon
        self.admin = AdminServer(self, d.admin_socket, d.admin_mode, d.admin_group)
        try:
            self.admin.open()
        except listen.ListenError as e:
            self.admin = None
            return [f"{d.where.get('admin_socket', self.config_path)}: {e}"]
        return []

    def run(self) -> int:
        self._setup_signals()
        _set_subreaper()
        for pool in self.pools.values():
            pool.start()
        running = sum(len(p.children) for p in self.pools.values())
        log.info(f"ready: {len(self.pools)} pool(s), {running} child(ren) started")
        self._schedule_resources()
        if self.notify.enabled:
            for pool in self.pools.values():
                self._store(pool)
            self.notify.ready(self.summary())
            interval = self.notify.watchdog_interval()
            if interval:
                self.loop.call_later(interval, self._watchdog, interval)
        try:
            while self.exit_code is None:
                self.loop.run_once()
        except BaseException:
            # A bug must not leave children running on their sockets without a supervisor
            # (the next start would find the sockets "in use"): end them all, then fail.
            import traceback    # only here: it costs ~2 ms of every start-up
            log.error("internal error, stopping every child:\n" + traceback.format_exc())
            self._kill_everything()
            self._kill_orphans()        # they left their groups: killpg missed them
            reap_children(5.0)
            self.exit_code = 70
        self._kill_orphans()
        if self.admin is not None:
            self.admin.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        self._close_sockets()
        log.info("exiting")
        return self.exit_code

    # ---- resource recycling -------------------------------------------------------------
    def _schedule_resources(self) -> None:
        """One timer, every sample_interval while there is a pool: listen-queue depth of
        every pool (for the maximum seen and how often it was full), and RSS/CPU of the
        children of pools with recycle limits (one pass over /proc for all of them)."""
        if self._resource_timer is None and self.pools:
            self._resource_timer = self.loop.call_later(self.config.daemon.sample_interval,
                                                        self._sample_resources)

    def _sample_resources(self) -> None:
        self._resource_timer = None
        for pool in self.pools.values():
            pool.sample_queue()
        pools = [p for p in self.pools.values() if p.config.recycle and
                 (p.config.recycle.max_rss or p.config.recycle.max_cpu)]
        if pools:
            snapshot, now = health.Snapshot(), time.monotonic()
            for pool in pools:
                pool.check_resources(snapshot, now)
        self._schedule_resources()

    # ---- systemd -----------------------------------------------------------------------
    def summary(self) -> str:
        """One line for `systemctl status`."""
        running = sum(len(p.live_children()) for p in self.pools.values())
        desired = sum(p.desired for p in self.pools.values() if p.wanted)
        text = f"{len(self.pools)} pool(s), {running}/{desired} children running"
        trouble = [f"{p.name} {p.state}" for p in self.pools.values()
                   if p.state in ("backoff", "degraded")]
        trouble += [f"{p.name} unhealthy" for p in self.pools.values() if p.health == "unhealthy"]
        return text + ("; " + ", ".join(trouble) if trouble else "")

    def pool_changed(self, pool) -> None:
        """Called by pools after every change: keep systemd's STATUS= line current."""
        if self.notify.enabled and not self.shutting_down:
            line = self.summary()
            if line != self._status_line:
                self._status_line = line
                self.notify.status(line)

    def _store(self, pool) -> None:
        """Put a socket spawnd bound itself into systemd's fd store, so that a restart of
        spawnd takes it back and no client is refused meanwhile."""
        if pool.bound.path is not None or not pool.bound.address.startswith("systemd:"):
            if self.notify.store_fds(pool.name, [pool.bound.fileno()]):
                pool.bound.keep_file = True

    def _watchdog(self, interval: float) -> None:
        # Sent from a loop timer: if the loop wedges, the pings stop and systemd acts.
        self.notify.watchdog()
        self.loop.call_later(interval, self._watchdog, interval)

    def _setup_signals(self) -> None:
        rsock, wsock = socket.socketpair()
        rsock.setblocking(False)
        wsock.setblocking(False)
        self._wake = (rsock, wsock)
        signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
        for sig in self.HANDLED:
            signal.signal(sig, _noop)
        self.loop.add_reader(rsock.fileno(), self._on_signals)

    # ---- the Loop interface pools use ---------------------------------------------------
    def call_later(self, delay, fn, *args):
        return self.loop.call_later(delay, fn, *args)

    def watch_output(self, pool, ch) -> None:
        self.readers[ch.output_fd] = OutputReader(
            self.loop, pool, ch.pid, ch.output_fd,
            on_close=lambda r: self.readers.pop(r.fd, None))

    # ---- signals ------------------------------------------------------------------------
    def _on_signals(self, _mask=None) -> None:
        try:
            data = self._wake[0].recv(4096)
        except BlockingIOError:
            return
        for signum in dict.fromkeys(data):      # each signal once per wake-up, in order
            handler = getattr(self, f"handle_{signal.Signals(signum).name.lower()}", None)
            if handler is not None:
                handler()

    def handle_sigchld(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if os.WIFSTOPPED(status):       # a child being retired under ptrace
                if not any(pool.child_trace_stop(pid, status) for pool in self.pools.values()):
                    ptrace.detach(pid)      # nobody's any more: never leave it stopped
                continue
            for pool in self.pools.values():
                if pool.child_exited(pid, status):
                    break
        for pool in list(self.pools.values()):
            pool.check_groups()

    def handle_sigterm(self) -> None:
        self.shutdown()

    handle_sigint = handle_sigquit = handle_sigterm

    def handle_sigusr2(self) -> None:
        log.info("SIGUSR2 ignored (spawnctl signal POOL USR2 sends it to a pool's children)")

    def handle_sighup(self) -> None:
        if self.shutting_down:
            log.info("SIGHUP ignored: shutting down")
            return
        def done(result=None, error=None):
            if error:
                log.error(f"reload failed, nothing changed: {error}")
        self.reload(done)

    def handle_sigusr1(self) -> None:
        log.info("SIGUSR1: logging goes to stderr; no log file to reopen")

    # ---- shutdown -----------------------------------------------------------------------
    def shutdown(self) -> None:
        if self.shutting_down:
            log.warning("second stop request: killing every child now")
            self._kill_everything()
            return
        self.shutting_down = True
        log.info(f"stopping {len(self.pools)} pool(s)")
        self.notify.stopping(f"stopping {len(self.pools)} pool(s)")
        self.loop.call_later(self.config.daemon.shutdown_timeout, self._shutdown_deadline)
        for pool in self.pools.values():
            pool.stop()
        self._pool_stopped(None)
        for pool in self.pools.values():
            pool.when(lambda p: p.state == "stopped", self._pool_stopped)

    def _pool_stopped(self, _pool) -> None:
        if all(p.state == "stopped" for p in self.pools.values()):
            self.exit_code = 0

    def _shutdown_deadline(self) -> None:
        if self.exit_code is None:
            log.warning(f"shutdown_timeout ({self.config.daemon.shutdown_timeout:g}s) reached; "
                        "killing the remaining processes")
            self._kill_everything()

    def _kill_everything(self) -> None:
        for pool in self.pools.values():
            pool.wanted = False             # nothing restarts what is being killed
            pool.kill_all()

    def _kill_orphans(self) -> None:
        """Processes that left their group (setsid) and outlived their parent became our
        children (subreaper); at exit nothing of ours may survive."""
        import psutil                       # not on the start-up path
        for proc in psutil.Process().children():
            log.warning(f"killing leftover process {proc.pid} ({proc.name()}) "
                        "that left its child's process group")
            try:
                proc.kill()
                os.waitpid(proc.pid, 0)
            except (psutil.Error, ChildProcessError):
                pass

    def _close_sockets(self) -> None:
        for pool in self.pools.values():
            pool.bound.close()
        for reader in list(self.readers.values()):
            reader.close()


    # ---- admin commands (control.AdminConnection calls command()) -----------------------
    def command(self, cmd: str, args: dict, reply, conn=None) -> None:
        handler = getattr(self, f"cmd_{cmd}", None)
        if handler is None:
            known = ", ".join(sorted(n[4:] for n in dir(self) if n.startswith("cmd_")))
            raise CommandError(f"unknown command {cmd!r} (known: {known})")
        if self.shutting_down and cmd not in ("status", "logs", "metrics"):
            raise CommandError("spawnd is shutting down")
        handler(args, reply, conn)

    def _pool(self, args) -> Pool:
        name = args.get("pool")
        if not isinstance(name, str) or not name:
            raise CommandError("this command needs a pool name")
        pool = self.pools.get(name)
        if pool is None:
            raise CommandError(f"no pool named {name!r} (pools: {', '.join(self.pools) or 'none'})")
        return pool

    def cmd_status(self, args, reply, conn):
        pools = [self._pool(args)] if args.get("pool") else list(self.pools.values())
        reply({"pid": os.getpid(), "uptime": round(time.time() - self.started, 3),
               "config": self.config_path,
               "pools": [p.status(snap) for snap in [health.Snapshot()] for p in pools]})

    def cmd_start(self, args, reply, conn):
        pool = self._pool(args)
        pool.start()
        pool.when(lambda p: p.settled() or p.state == BACKOFF,
                  lambda p: reply({"pool": p.name, "state": p.state,
                                   "running": len(p.live_children())}))

    def cmd_stop(self, args, reply, conn):
        pool = self._pool(args)
        pool.stop()
        pool.when(lambda p: p.state == STOPPED, lambda p: reply({"pool": p.name, "state": p.state}))

    def cmd_restart(self, args, reply, conn):
        pool = self._pool(args)
        if not pool.wanted:
            raise CommandError(f"pool {pool.name!r} is stopped; use start")
        before = {c.pid for c in pool.live_children()}
        pool.rolling_restart()
        pool.when(lambda p: not p.rolling and (p.settled() or p.state == BACKOFF),
                  lambda p: reply({"pool": p.name, "state": p.state,
                                   "replaced": len(before - set(p.children)),
                                   "children": sorted(p.children)})
                  if p.state != BACKOFF else reply(error=f"pool {p.name!r}: a new child failed; "
                                                         f"{p.last_exit or p.last_error}"))

    def cmd_scale(self, args, reply, conn):
        pool = self._pool(args)
        n = args.get("processes")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise CommandError("scale needs a number of processes >= 0")
        if n > MAX_SCALE:
            raise CommandError(f"scale: at most {MAX_SCALE} processes per pool")
        pool.scale(n)
        pool.when(lambda p: p.settled() or p.state == BACKOFF or not p.wanted,
                  lambda p: reply({"pool": p.name, "state": p.state, "desired": p.desired,
                                   "running": len(p.live_children())}))

    def cmd_signal(self, args, reply, conn):
        pool = self._pool(args)
        name = str(args.get("signal", "")).upper()
        try:
            sig = signal.Signals(int(name)) if name.isdigit() else \
                signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        except (KeyError, ValueError):
            raise CommandError(f"unknown signal {args.get('signal')!r}") from None
        pids = [c.pid for c in pool.children.values()]
        for pid in pids:                # the children themselves, not their process groups
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        reply({"pool": pool.name, "signal": sig.name, "children": pids})

    def cmd_logs(self, args, reply, conn):
        pool = self._pool(args)
        n = args.get("lines", 50)
        if not isinstance(n, int) or n < 0:
            raise CommandError("lines must be a number >= 0")
        lines = format_lines(list(pool.logs)[-n:]) if n else []
        if not args.get("follow") or conn is None:
            reply({"pool": pool.name, "lines": lines})
            return
        # Follow: the first reply carries the backlog, each later line one more object.
        reply({"pool": pool.name, "lines": lines})
        conn.busy = True                # nothing else on this connection from now on
        send = lambda batch: conn.send({"ok": True, "result": {"pool": pool.name, "lines": batch}})
        pool.followers.add(send)
        conn.follow = lambda: pool.followers.discard(send)

    def cmd_metrics(self, args, reply, conn):
        reply({"text": exposition(self)})

    def cmd_shutdown(self, args, reply, conn):
        reply({"shutting_down": True})
        self.shutdown()

    def cmd_reload(self, args, reply, conn):
        self.reload(reply)

    # ---- reload ---------------------------------------------------------------------------
    CHILD_FIELDS = ("command", "uid", "gid", "groups", "cwd", "chroot", "umask", "env",
                    "inherit_env", "allowed_clients", "rlimits")

    def reload(self, reply) -> None:
        """Re-read the config; apply the differences pool by pool; reply when complete.
        A bad config, or a new socket that cannot be bound, changes nothing."""
        try:
            new = configmod.load(self.config_path)
        except configmod.ConfigError as e:
            reply(error="configuration invalid:\n" + "\n".join(e.errors))
            return
        except OSError as e:
            reply(error=f"cannot read {self.config_path}: {e.strerror}")
            return
        old_pools, new_pools = self.pools, new.pools
        stopping = [n for n in new_pools if n in old_pools and old_pools[n].removing]
        if stopping:
            reply(error=f"pool(s) {', '.join(stopping)} removed by the previous reload are still "
                        "stopping; reload again once they are gone (spawnctl status)")
            return
        added = [n for n in new_pools if n not in old_pools]
        removed = [n for n in old_pools if n not in new_pools and not old_pools[n].removing]
        kept = [n for n in new_pools if n in old_pools]
        rebind = [n for n in kept if new_pools[n].listen != old_pools[n].config.listen]
        bound, errors = {}, []
        for name in added + rebind:
            pc = new_pools[name]
            try:
                bound[name] = listen.bind(pc.listen, pc.socket, (pc.uid, pc.gid))
            except listen.ListenError as e:
                errors.append(f"{pc.where.get('listen', name)}: {e}")
        for name in kept:                   # new permissions for a socket that stays
            pc, b = new_pools[name], old_pools[name].bound
            if name not in rebind and pc.socket != old_pools[name].config.socket \
                    and not b.still_ours():
                errors.append(f"{pc.where.get('socket', name)}: {b.address}: the socket file "
                              "is gone or was replaced; cannot apply new socket settings")
        if errors:
            for b in bound.values():
                b.close()
            reply(error="\n".join(errors))
            return
        log.info(f"reloading {self.config_path}")
        self.notify.reloading(f"reloading {self.config_path}")
        user_reply = reply

        def reply(result=None, error=None):
            self.notify.ready(self.summary())
            user_reply(result, error)
        self.config = configmod.Config(new.daemon if self.admin is None else
                                       _keep_admin(self.config.daemon, new.daemon),
                                       new.pools, new.files)
        done = {"added": added, "removed": removed, "restarted": [], "scaled": [],
                "updated": [], "unchanged": []}
        waiting = []
        for name in removed:
            pool = self.pools[name]
            pool.removing = True
            pool.stop()
            waiting.append(pool)
            pool.when(lambda p: p.state == STOPPED, self._forget_pool)
        for name in kept:
            what = self._apply(self.pools[name], new_pools[name], bound.get(name))
            done[what].append(name)
            if what != "unchanged":
                waiting.append(self.pools[name])
        for name in added:
            pool = self.pools[name] = Pool(new_pools[name], bound[name], self)
            self._store(pool)
            pool.start()
            waiting.append(pool)
        pending = set(waiting)

        def finished(pool):
            pending.discard(pool)
            if not pending:
                log.info("reload complete: " + ", ".join(
                    f"{k} {' '.join(v)}" for k, v in done.items() if v and k != "unchanged"))
                reply(done)
        self._schedule_resources()
        if not pending:
            reply(done)
        for pool in waiting:
            pool.when(lambda p: p.state == STOPPED if p.name in removed else
                      (p.settled() or p.state == BACKOFF or not p.wanted), finished)

    def _apply(self, pool: Pool, new, new_bound) -> str:
        old = pool.config
        if old == new:
            return "unchanged"
        pool.config = new
        restart = new_bound is not None or any(
            getattr(old, f) != getattr(new, f) for f in self.CHILD_FIELDS)
        if new_bound is not None:
            pool.retired_bounds.append(pool.bound)
            pool.bound = new_bound
            self.notify.remove_fds(pool.name)
            self._store(pool)
            if not pool.wanted:
                for b in pool.retired_bounds:
                    b.close()
                pool.retired_bounds = []
        elif new.socket != old.socket:
            try:
                listen.update(pool.bound, new.socket, (new.uid, new.gid))
            except listen.ListenError as e:     # checked before; a race at worst
                log.error(f"{pool.name}: {e}")
        scaled = new.processes != old.processes
        if scaled:
            pool.desired = new.processes.min
        if pool.wanted and (scaled or new.probe != old.probe):
            pool._stop_monitoring()
            pool.health = "unknown" if new.probe else None
            pool._start_monitoring()
        if restart and pool.wanted:
            pool.rolling_restart("reload")
            return "restarted"
        if scaled and pool.wanted:
            pool.scale(pool.desired)
            return "scaled"
        return "updated"

    def _forget_pool(self, pool: Pool) -> None:
        if self.pools.get(pool.name) is pool:
            del self.pools[pool.name]
        self.notify.remove_fds(pool.name)
        pool.bound.keep_file = False
        pool.bound.close()
        log.info(f"{pool.name}: removed")


def _keep_admin(old, new):
    """The admin socket is not moved by a reload (the reply goes through it)."""
    if (old.admin_socket, old.admin_mode, old.admin_group) != \
            (new.admin_socket, new.admin_mode, new.admin_group):
        log.warning("admin socket settings changed: they take effect at the next restart")
    if old.metrics_listen != new.metrics_listen:
        log.warning("metrics_listen changed: it takes effect at the next restart")
    return dataclasses.replace(new, admin_socket=old.admin_socket, admin_mode=old.admin_mode,
                               admin_group=old.admin_group)


def _noop(signum, frame) -> None:
    """Signal handler: the wake-up fd already carries the signal to the loop."""


def _set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("cannot become a child subreaper: orphaned grandchildren escape")


def reap_children(timeout: float) -> None:
    """Reap our children until none is left or timeout passes. SIGCHLD is blocked
    meanwhile and waited for with sigtimedwait, so the wait is bounded (a blocking
    waitpid would wait forever for a child that ignores the kill) and polls nothing."""
    deadline = time.monotonic() + timeout
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return
            signal.sigtimedwait({signal.SIGCHLD}, left)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
