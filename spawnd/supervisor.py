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
import heapq
import itertools
import os
import selectors
import signal
import socket
import time

from . import listen
from .log import log
from .pool import Pool

PR_SET_CHILD_SUBREAPER = 36
READ_CHUNK = 65536          # per readiness event and pipe: a flooding child cannot hog the loop
MAX_LINE = 16384            # longer lines are cut; memory per pipe stays bounded


class Timer:
    __slots__ = ("when", "fn", "args", "cancelled")

    def __init__(self, when, fn, args):
        self.when, self.fn, self.args, self.cancelled = when, fn, args, False

    def cancel(self) -> None:
        self.cancelled = True


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
        for key, _ in self.selector.select(timeout):
            key.data()
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            t = heapq.heappop(timers)[2]
            if not t.cancelled:
                t.fn(*t.args)


class OutputReader:
    """Forwards one child's output pipe line by line as "pool[pid]: text"."""

    def __init__(self, loop: Loop, pool_name: str, pid: int, fd: int, on_close=None):
        self.loop, self.pool_name, self.pid, self.fd = loop, pool_name, pid, fd
        self.on_close = on_close
        self.buf = bytearray()
        self.dropping = 0          # bytes dropped so far from an over-long line
        loop.add_reader(fd, self.on_readable)

    def on_readable(self) -> None:
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
        start = 0
        while (nl := buf.find(b"\n", start)) >= 0:
            if self.dropping:
                self._say(f"[... {self.dropping + nl - start} more bytes of that line dropped]")
                self.dropping = 0
            else:
                self._say(buf[start:nl].decode("utf-8", "replace").rstrip("\r"))
            start = nl + 1
        del buf[:start]
        if len(buf) > MAX_LINE:
            if not self.dropping:
                self._say(buf[:MAX_LINE].decode("utf-8", "replace")
                          + f" [line longer than {MAX_LINE} bytes, cut]")
                self.dropping = len(buf) - MAX_LINE
            else:
                self.dropping += len(buf)
            buf.clear()

    def _say(self, text: str) -> None:
        log.child_line(self.pool_name, self.pid, text)

    def close(self) -> None:
        if self.fd < 0:
            return
        if self.buf and not self.dropping:
            self._say(self.buf.decode("utf-8", "replace"))
        self.buf.clear()
        self.loop.remove_reader(self.fd)
        os.close(self.fd)
        if self.on_close is not None:
            self.on_close(self)
        self.fd = -1


class Supervisor:
    HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)

    def __init__(self, config, config_path: str):
        self.config = config
        self.config_path = config_path
        self.loop = Loop()
        self.pools: dict[str, Pool] = {}
        self.readers: dict[int, OutputReader] = {}
        self.shutting_down = False
        self.exit_code: int | None = None

    # ---- start-up -----------------------------------------------------------------
    def bind_all(self) -> list[str]:
        """Bind every pool's socket; on any error close them all and return the errors."""
        bound, errors = {}, []
        for name, pc in self.config.pools.items():
            try:
                bound[name] = listen.bind(pc.listen, pc.socket, (pc.uid, pc.gid))
            except listen.ListenError as e:
                errors.append(f"{pc.where.get('listen', name)}: {e}")
        if errors:
            for b in bound.values():
                b.close()
            return errors
        for name, pc in self.config.pools.items():
            self.pools[name] = Pool(pc, bound[name], self)
        return []

    def run(self) -> int:
        self._setup_signals()
        _set_subreaper()
        for pool in self.pools.values():
            pool.start()
        running = sum(len(p.children) for p in self.pools.values())
        log.info(f"ready: {len(self.pools)} pool(s), {running} child(ren) started")
        while self.exit_code is None:
            self.loop.run_once()
        self._close_sockets()
        log.info("exiting")
        return self.exit_code

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
            self.loop, pool.name, ch.pid, ch.output_fd,
            on_close=lambda r: self.readers.pop(r.fd, None))

    # ---- signals ------------------------------------------------------------------------
    def _on_signals(self) -> None:
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
            for pool in self.pools.values():
                if pool.child_exited(pid, status):
                    break
        for pool in list(self.pools.values()):
            pool.check_groups()

    def handle_sigterm(self) -> None:
        self.shutdown()

    handle_sigint = handle_sigterm

    def handle_sighup(self) -> None:
        log.warning("SIGHUP: configuration reload is not implemented yet; nothing changed")

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
        self.loop.call_later(self.config.daemon.shutdown_timeout, self._shutdown_deadline)
        for pool in self.pools.values():
            pool.stop(on_stopped=self._pool_stopped)
        self._pool_stopped(None)

    def _pool_stopped(self, _pool) -> None:
        if self.shutting_down and all(p.state == "stopped" for p in self.pools.values()):
            self.exit_code = 0

    def _shutdown_deadline(self) -> None:
        if self.exit_code is None:
            log.warning(f"shutdown_timeout ({self.config.daemon.shutdown_timeout:g}s) reached; "
                        "killing the remaining processes")
            self._kill_everything()

    def _kill_everything(self) -> None:
        for pool in self.pools.values():
            pool.kill_all()

    def _close_sockets(self) -> None:
        for pool in self.pools.values():
            pool.bound.close()
        for reader in list(self.readers.values()):
            reader.close()


def _noop(signum, frame) -> None:
    """Signal handler: the wake-up fd already carries the signal to the loop."""


def _set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("cannot become a child subreaper: orphaned grandchildren escape")
