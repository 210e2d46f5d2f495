"""The FastCGI server: one epoll loop that also accepts, optional worker threads.

Threads and who owns what
-------------------------
* The **loop** (the main thread) waits in ``epoll`` on the listening socket, on every
  connection that is idle between requests, on connections being drained before close,
  and on the signal wake-up pipe. It reads an idle connection only when it is readable
  (``MSG_DONTWAIT``), so an idle keep-alive connection never holds it up.
* **Accepting.** The listening socket is watched with ``EPOLLEXCLUSIVE``: when a
  connection arrives the kernel wakes one of the processes *waiting* in ``epoll_wait``
  on it, so a sibling busy in a request is passed over and an idle one takes the
  connection. The socket stays exactly as it was given (blocking, shared with sibling
  processes); nothing here changes its flags or options. A wake-up may still go to more
  than one process, and then ``accept()`` on the blocking socket would wait for the
  next connection: so ``accept4`` (through ctypes, which returns EINTR instead of
  retrying like ``socket.accept``) runs under a POSIX timer that interrupts it with a
  signal to this thread (KICK) every ACCEPT_BOUND until the call returns. It is armed
  and disarmed around each accept: two system calls, and no signal unless the call
  really waited.
* With ``--threads N > 1`` the loop stops watching the listening socket while all N
  threads are in the application, and watches it again when one is free: a connection
  in the shared listen queue then goes to an idle sibling process instead of waiting
  here, and the queue depth stays visible to spawnd's scaling. With ``--threads 1`` the
  loop itself runs the application, so it is not in ``epoll_wait`` while busy and the
  kernel passes it over by itself.
* Once a connection has a complete FastCGI request (BEGIN_REQUEST + PARAMS), it belongs
  to the thread that runs the application: the loop itself with ``--threads 1``, else a
  worker. That thread reads STDIN from the socket only when the application reads
  ``wsgi.input`` (the socket buffer is the backpressure: memory stays bounded however
  large the upload), writes the response, and hands the connection back (re-arming its
  EPOLLONESHOT registration) or closes it.
* With ``--threads 1``, while the application waits for more of its body, the loop
  thread polls that connection together with the others and reads what arrives on them
  into their buffers (bounded: READ_AHEAD each, READ_AHEAD_TOTAL in all): the web server
  can go on sending other requests and bodies instead of waiting for this one to end
  (a Unix socket buffers only ~208 KiB). Requests read ahead are served when the current
  one is done (``_ready``).
* An accepted connection starts as a bare non-blocking descriptor: ``read()`` and
  ``write()`` do what must not wait (a socket object made from a descriptor costs a
  ``getsockname()``, one system call in eight for a request on a new connection). Only a
  connection that has to wait (a response larger than the socket buffer, a body read
  from the socket), or needs a socket's methods (``shutdown()``, TCP options), gets a
  socket object (``Conn.socket``); one that has to wait is then made blocking, with the
  ``--io-timeout`` deadlines (SO_SNDTIMEO/SO_RCVTIMEO), once, so a small request costs
  no ``setsockopt``. Calls that must not wait then use MSG_DONTWAIT.
"""
from __future__ import annotations

import collections
import ctypes
import errno
import ipaddress
import os
import queue
import resource
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback

from spawnd.fastcgi.protocol import (AUTHORIZER, RESPONDER, AbortRequest, ProtocolError,
                                     Request, ServerConnection, StdinData, StdinEnd)
from spawnd.wsgi.environ import NotMounted, build_environ, decode_params, wsgi_base
from spawnd.wsgi.response import NOT_FOUND, PeerGone, run_app
from spawnd.wsgi.stream import EMPTY, InputStream

# 64 KiB: two of nginx's 32 KiB STDIN records. recv(n) allocates n bytes first; above
# glibc's mmap threshold (128 KiB) each call maps fresh memory and faults it in, which
# measured 2 page faults per hello request and ~150 per 1 MiB POST at 256 KiB
# (benchmarks/wsgi.md, "Where spawnd-wsgi's time goes").
RECV_SIZE = 1 << 16
# Reads of a body the application asks for: larger (fewer recv calls and wake-ups of the
# web server per MiB: 1 MiB POST 2-9% less CPU in A/B runs), still under the mmap
# threshold.
BODY_RECV_SIZE = 120 << 10
# --threads 1, while the application waits for more of its request body: what the web
# server sends on the other connections is read into their buffers meanwhile (see
# _read_ahead), up to READ_AHEAD bytes per connection and READ_AHEAD_TOTAL in all.
READ_AHEAD = 1 << 20
READ_AHEAD_TOTAL = 16 << 20
POLL_SLICE = 3600.0         # longest single poll() wait (its timeout is an int of ms)
DRAIN_LIMIT = 1 << 20       # bytes read and discarded before closing a connection
DRAIN_TIME = 2.0            # seconds a draining connection may take
ROLE_NAMES = {RESPONDER: "RESPONDER", AUTHORIZER: "AUTHORIZER"}   # the roles served
PENDING_LIMIT = 1 << 16     # unsent automatic replies before a connection is closed
FRESH_GRACE = 1.0           # at stop, seconds a new connection has to send its request

ACCEPT_BOUND = 0.010        # longest wait in accept4() after a wake-up a sibling took
ACCEPT_PAUSE = 0.1          # no accepting for this long after EMFILE, ENFILE, ENOBUFS, ENOMEM
KICK = signal.SIGRTMIN + 1  # sent to the loop thread only, to interrupt accept4()

_libc = ctypes.CDLL(None, use_errno=True)
# accept4() and timer_settime() run for every connection: they have no argtypes (whose
# conversions cost ~0.15 µs per call) and are given ints, None and ctypes objects made
# once, which ctypes passes as they are. Both return int, ctypes' default.
_accept4 = _libc.accept4
_timer_create = _libc.timer_create
_timer_create.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p))
_timer_settime = _libc.timer_settime
_SIGEV_THREAD_ID = 4
_ACCEPT_FLAGS = socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK


class ThreadTimer:
    """A POSIX timer that sends ``signo`` to one thread (SIGEV_THREAD_ID) every
    ``seconds`` from ``start()`` until ``cancel()``.

    The kernel does the waiting: starting or cancelling it costs one system call, and no
    thread wakes up unless it expires."""

    def __init__(self, signo: int, tid: int, seconds: float) -> None:
        # struct sigevent (64 bytes): sigev_value, sigev_signo, sigev_notify, _tid
        sev = struct.pack("qiii44x", 0, signo, _SIGEV_THREAD_ID, tid)
        self._id = ctypes.c_void_p()
        if _timer_create(time.CLOCK_MONOTONIC, sev, ctypes.byref(self._id)) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        ns = int(seconds * 1e9)
        sec, nsec = ns // 1_000_000_000, ns % 1_000_000_000
        # struct itimerspec: it_interval, it_value. It repeats until cancelled: a shot
        # that comes before the thread is inside the system call it should interrupt
        # (Python only notes the signal) is followed by another one.
        self._on = ctypes.create_string_buffer(struct.pack("qqqq", sec, nsec, sec, nsec))
        self._off = ctypes.create_string_buffer(32)

    def start(self) -> None:
        _timer_settime(self._id, 0, self._on, None)

    def cancel(self) -> None:
        _timer_settime(self._id, 0, self._off, None)

    def accept(self, lfd: int) -> tuple[int, int]:
        """One ``accept4()`` on a blocking listening socket shared with sibling
        processes, bounded by this timer (started and cancelled here): (fd, 0), the new
        descriptor non-blocking and close-on-exec, or (-1, errno) where EINTR means the
        bound expired with nothing to take."""
        self.start()
        fd = _accept4(lfd, None, None, _ACCEPT_FLAGS)
        err = ctypes.get_errno() if fd < 0 else 0     # (before another ctypes call)
        self.cancel()
        return fd, err


def log(message: str) -> None:
    try:
        sys.stderr.write(f"spawnd-wsgi[{os.getpid()}]: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _ignore(signum, frame) -> None:
    """KICK's handler: its only job is to make a waiting accept4() fail with EINTR."""


class ClientDisconnected(ConnectionError):
    """Raised to the application reading wsgi.input when the request cannot continue
    (the web server closed the connection, aborted the request, or broke the protocol)."""


# ---- FCGI_WEB_SERVER_ADDRS -----------------------------------------------------------
def parse_allowed(value: str | None) -> frozenset | None:
    """Comma-separated addresses -> a set of normalised ip_address objects.

    None or a value with no address means "no restriction". IPv4-mapped IPv6 addresses
    are stored as IPv4, and IPv6 zone ids are ignored. ValueError for anything else."""
    if value is None:
        return None
    out = set()
    for item in value.split(","):
        item = item.strip()
        if item:
            try:
                out.add(normalise_ip(item))
            except ValueError:
                raise ValueError(f"FCGI_WEB_SERVER_ADDRS: {item!r} is not an IP address")
    return frozenset(out) or None


def normalise_ip(text: str):
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


# ---- one connection ------------------------------------------------------------------
class RepliesUnread(OSError):
    """The peer keeps sending management records without reading the replies."""


class Conn:
    __slots__ = ("fd", "family", "sock", "proto", "events", "lock", "busy", "closed",
                 "served", "draining", "deadline", "drained", "eof", "pending", "mask",
                 "timeval", "ahead", "rid", "ended")

    def __init__(self, fd: int, family: int, proto: ServerConnection, mask: int,
                 timeval: bytes) -> None:
        self.fd = fd                # non-blocking (ThreadTimer.accept) until blocking()
        self.family = family
        self.sock: socket.SocketType | None = None     # made when first needed
        self.proto = proto
        self.events: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.busy = False           # a thread other than the loop's idle handling owns it
        self.closed = False
        self.served = 0
        self.draining = False
        self.deadline = 0.0
        self.drained = 0
        self.eof = False
        self.pending = b""          # automatic replies the peer has not taken yet
        self.mask = mask            # the connection's epoll registration (0: none yet)
        self.timeval = timeval      # --io-timeout as a struct timeval; None once set
        self.ahead = 0              # bytes read ahead (_read_ahead) since last dispatched
        self.rid = 0                # the request being answered (see send)
        self.ended = True           # its END_REQUEST was sent

    def socket(self) -> socket.SocketType:
        """The connection as a socket object, made when first needed (a blocking call,
        shutdown(), the peer's address): making one from a descriptor costs a
        getsockname() system call, which most connections never need."""
        sock = self.sock
        if sock is None:
            sock = self.sock = socket.SocketType(self.family, socket.SOCK_STREAM, 0,
                                                 self.fd)
            if sock.gettimeout() is not None:
                sock.settimeout(None)   # the application's setdefaulttimeout() is not ours
        return sock

    def blocking(self) -> socket.SocketType:
        """The socket, blocking and with the --io-timeout deadlines set on it (once),
        before a call that may wait: a recv of the body, the rest of a large response."""
        if self.timeval is not None:
            sock = self.socket()
            sock.setblocking(True)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self.timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self.timeval)
            self.timeval = None
        return self.sock

    def recv_now(self, size: int) -> bytes:
        """What has come, up to ``size`` bytes, without waiting (BlockingIOError when
        nothing has). Until a socket object exists the descriptor is non-blocking and
        read() does it; after, recv() with MSG_DONTWAIT."""
        if self.sock is None:
            return os.read(self.fd, size)
        return self.sock.recv(size, socket.MSG_DONTWAIT)

    def send_now(self, data) -> int:
        """Send what the socket takes without waiting; BlockingIOError when nothing."""
        if self.sock is None:
            return os.write(self.fd, data)
        return self.sock.send(data, socket.MSG_DONTWAIT)

    def close_socket(self) -> None:
        if self.sock is None:
            os.close(self.fd)
        else:
            self.sock.close()

    def sendall(self, data: bytes) -> None:
        """Send everything: without waiting when the socket takes it all (the usual
        case), else the rest blocking, under the I/O timeout. OSError propagates."""
        try:
            n = self.send_now(data)
        except BlockingIOError:
            n = 0
        if n < len(data):
            self.blocking().sendall(memoryview(data)[n:])

    def feed(self, data: bytes) -> None:
        """Protocol input; automatic replies (GET_VALUES, refusals) are sent without
        blocking (see ``send_replies``). ProtocolError and OSError propagate."""
        if not data:
            self.eof = True
        self.events.extend(self.proto.receive_data(data))
        out = self.proto.data_to_send()
        if out or self.pending:
            self.send_replies(out)

    def send(self, data: bytes, end: bool = False) -> None:
        """The response sink of request ``rid`` (see run_app): STDOUT records, then
        END_REQUEST. The connection answers one request at a time, so it is its own
        sink: one object fewer per request."""
        if self.ended:
            return                  # the request is over: nothing more belongs to it
        if self.closed or self.eof:
            raise PeerGone()
        if end:
            out = self.proto.end_request(self.rid, stdout=data)
            self.ended = True
        else:
            out = self.proto.send_stdout(self.rid, data)
        if self.pending:            # automatic replies the peer has not taken yet
            out, self.pending = self.pending + out, b""
        try:
            self.sendall(out)
        except OSError as exc:
            self.eof = True
            raise PeerGone() from exc

    def send_replies(self, out: bytes = b"") -> None:
        """Send automatic replies without blocking: a peer that floods GET_VALUES and
        never reads must not stall the thread (the loop serves everybody). What the
        socket does not take waits in ``pending`` (written when the socket is writable,
        or before the next response); past PENDING_LIMIT the peer is cut off."""
        data = self.pending + out if self.pending else out
        try:
            n = self.send_now(data)
        except BlockingIOError:
            n = 0
        self.pending = data[n:]
        if len(self.pending) > PENDING_LIMIT:
            raise RepliesUnread(f"{len(self.pending)} bytes of replies unread")


# ---- the server ----------------------------------------------------------------------
class Server:
    def __init__(self, app, listener: socket.socket, *, threads: int = 1,
                 script_name: str | None = None, max_requests: int = 0,
                 graceful_timeout: float = 30.0, io_timeout: float = 60.0,
                 allowed=None, multiprocess: bool = True) -> None:
        self.app = app
        self.listener = listener
        self.family = listener.family
        self.threads = threads
        self.prefix = script_name
        self.max_requests = max_requests
        self.graceful_timeout = graceful_timeout
        self._tcp = listener.family in (socket.AF_INET, socket.AF_INET6)
        self.allowed = allowed if self._tcp else None
        tv = struct.pack("ll", int(io_timeout), int((io_timeout % 1) * 1e6))
        self._timeval = tv
        # None: no limit, as for the sockets, where a zero timeval means none
        self._io_timeout = io_timeout if tv != bytes(len(tv)) else None
        self.requests = 0
        self.stopping = False
        self.conns: dict[int, Conn] = {}
        self.epoll = select.epoll()
        self._lfd = listener.fileno()
        self._listening = False     # the listening socket is in the epoll set
        self._paused_until = 0.0    # after EMFILE & co: accept again at this time
        self._arm = select.EPOLLIN | (select.EPOLLONESHOT if threads > 1 else 0)
        self._draining: set[Conn] = set()
        self._lock = threading.Lock()
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._max_conns = max(1, min(nofile, 1 << 20) - 16)
        self._roles = tuple(ROLE_NAMES)
        base = wsgi_base(multithread=threads > 1, multiprocess=multiprocess,
                         run_once=False)
        # what every request's environ gets, by role (wsgi.input is per request)
        self._environ_base = {role: {**base, "FCGI_ROLE": name}
                              for role, name in ROLE_NAMES.items()}
        self._exit: BaseException | None = None
        self._stop_event = threading.Event()
        self._in_app = 0            # --threads > 1: connections handed to the workers
        self._ahead_total = 0       # --threads 1: bytes read ahead, not yet dispatched
        self._ready: collections.deque = collections.deque()   # read ahead: to look at
        self._bound: ThreadTimer | None = None
        self._work: queue.SimpleQueue | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- life cycle ----------------------------------------------------------------------
    def serve(self, ready: str | None = None) -> int:
        """Run until stopped (signal or --max-requests); returns the exit status.
        ``ready`` is logged once TERM/INT are handled (tests and people wait for it)."""
        try:
            self._bound = ThreadTimer(KICK, threading.get_native_id(), ACCEPT_BOUND)
        except OSError as exc:
            raise RuntimeError(f"cannot bound accept() with a timer: {exc}") from None
        self.epoll.register(self._wake_r, select.EPOLLIN)
        old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        old_handlers = {sig: signal.signal(sig, self._on_signal)
                        for sig in (signal.SIGTERM, signal.SIGINT)}
        old_handlers[KICK] = signal.signal(KICK, _ignore)
        if ready:
            log(ready)
        try:
            if self.threads > 1:
                self._work = queue.SimpleQueue()
                for n in range(self.threads):
                    threading.Thread(target=self._worker, name=f"wsgi-worker-{n}",
                                     daemon=True).start()
            threading.Thread(target=self._watchdog, name="graceful-timeout",
                             daemon=True).start()
            self._listen(True)
            self._loop()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        if self._exit is not None:
            raise self._exit        # the application's SystemExit/KeyboardInterrupt
        return 0

    def _on_signal(self, signum, frame) -> None:
        self._begin_stop(f"{signal.Signals(signum).name}: finishing requests in flight, "
                         "then exiting")

    def stop(self) -> None:
        """Stop accepting, finish what is in flight, then return from serve()."""
        self._begin_stop()
        self._wake()

    def _begin_stop(self, reason: str | None = None) -> None:
        if self.stopping:
            return
        self.stopping = True
        self._stop_event.set()      # starts the --graceful-timeout watchdog
        if reason:
            log(reason)

    def _watchdog(self) -> None:
        """Enforces --graceful-timeout from its own thread, because the thread that
        would otherwise notice may be the one stuck in the application (--threads 1).
        Exits 0 like any stop: spawnd asked for it (or --max-requests did)."""
        self._stop_event.wait()
        time.sleep(self.graceful_timeout)
        busy = sum(1 for c in list(self.conns.values()) if c.busy)
        log(f"graceful timeout: exiting with {busy} request(s) unfinished")
        os._exit(0)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass

    # -- accepting (the loop thread only) ------------------------------------------------
    def _listen(self, on: bool) -> None:
        """Watch the listening socket (EPOLLEXCLUSIVE: see the module docstring), or stop."""
        if on == self._listening:
            return
        if on:
            self.epoll.register(self._lfd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        else:
            self.epoll.unregister(self._lfd)
        self._listening = on

    def _want_listening(self) -> bool:
        return not (self.stopping or self._in_app >= self.threads or self._paused_until)

    def _accept(self) -> None:
        """Take one connection. The wake-up may have gone to a sibling too, so the
        blocking accept4() runs under the ACCEPT_BOUND timer: EINTR means nothing came."""
        fd, err = self._bound.accept(self._lfd)
        if fd < 0:
            if err in (errno.EINTR, errno.EAGAIN, errno.ECONNABORTED, errno.EPROTO):
                return          # a sibling took it (or it was reset): wait for the next
            if err in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log(f"accept: {os.strerror(err)}; pausing {ACCEPT_PAUSE * 1000:.0f} ms")
                self._paused_until = time.monotonic() + ACCEPT_PAUSE
                self._listen(False)
                return
            log(f"accept failed: {os.strerror(err)}; stopping")
            self._begin_stop()
            return
        self._adopt(fd)

    def _adopt(self, fd: int) -> None:
        # A connection is its descriptor until it needs a socket object (Conn.socket):
        # a Unix one usually never does. TCP needs one at once.
        proto = ServerConnection(max_conns=self._max_conns, max_reqs=self.threads,
                                 mpxs_conns=False, roles=self._roles,
                                 params_decoder=decode_params)
        conn = Conn(fd, self.family, proto, 0, self._timeval)
        if self._tcp:
            try:
                sock = conn.socket()
                if self.allowed is not None and not self._allowed(sock):
                    sock.close()
                    return
                # a response's records in several writes: no Nagle delay
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                log(f"dropping a new connection: {exc}")
                conn.close_socket()
                return
        self.conns[fd] = conn
        # The web server usually writes its request right after connect(): read it now.
        # A connection joins the epoll set only when it has to wait (_rearm_any), so a
        # request that came with its connection, on a connection closed after it, costs
        # no epoll_ctl and no second trip through epoll_wait.
        self._on_readable(conn)

    def _allowed(self, sock: socket.SocketType) -> bool:
        """Is the peer in FCGI_WEB_SERVER_ADDRS (callers test ``self.allowed`` first)?"""
        try:
            peer = normalise_ip(sock.getpeername()[0])
        except (OSError, ValueError):
            peer = None
        if peer not in self.allowed:
            log(f"refusing connection from {peer} (not in FCGI_WEB_SERVER_ADDRS)")
            return False
        return True

    # -- the loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        fresh_deadline = None
        lfd = self._lfd
        while True:
            timeout = -1
            now = time.monotonic()
            if self._draining:
                with self._lock:
                    first = min((c.deadline for c in self._draining), default=now)
                timeout = max(0.0, first - now)
            if self._paused_until:
                if now >= self._paused_until:
                    self._paused_until = 0.0    # the EMFILE pause is over
                else:
                    wait = self._paused_until - now
                    timeout = wait if timeout < 0 else min(timeout, wait)
            if self._listening != self._want_listening():
                self._listen(not self._listening)   # full, free again, paused, stopping
            if self.stopping:
                timeout = 0.02 if timeout < 0 else min(timeout, 0.02)
            for fd, mask in self.epoll.poll(timeout):
                if fd == lfd:
                    if self._listening and self._want_listening():
                        self._accept()
                    continue
                if fd == self._wake_r:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                conn = self.conns.get(fd)
                if conn is not None and not conn.busy:
                    if mask & select.EPOLLOUT and conn.pending:
                        try:
                            conn.send_replies()
                        except OSError:
                            self._close(conn)
                            continue
                    self._on_readable(conn)
            while self._ready:      # read ahead while a request waited for its body
                conn = self._ready.popleft()
                if not conn.closed and not conn.busy and not conn.draining:
                    self._after_input(conn)
            if self._draining:
                self._expire_drains()
            if self.stopping:
                now = time.monotonic()
                if fresh_deadline is None:
                    fresh_deadline = now + min(FRESH_GRACE, self.graceful_timeout)
                    self._close_idle()
                elif now > fresh_deadline:
                    self._close_idle(fresh=True)
                if self._finished():
                    return

    def _finished(self) -> bool:
        for conn in list(self.conns.values()):
            if conn.busy or conn.draining or (conn.served == 0 and not conn.closed):
                return False
        return True

    def _close_idle(self, fresh: bool = False) -> None:
        """At stop: connections between requests are closed, unless a request is
        already waiting in their buffer (then it is served). New connections that have
        not sent a request yet get FRESH_GRACE more (``fresh=True`` closes them too)."""
        for conn in list(self.conns.values()):
            if conn.busy or conn.draining or (conn.served == 0 and not fresh):
                continue
            self._on_readable(conn)
            if not conn.busy and not conn.closed and not conn.draining:
                self._close(conn)

    def _on_readable(self, conn: Conn) -> None:
        if conn.draining:
            return self._drain(conn)
        try:
            data = conn.recv_now(RECV_SIZE)
        except BlockingIOError:     # (a request read ahead may be waiting in events)
            return self._after_input(conn)
        except OSError:
            return self._close(conn)
        if self._take(conn, data):
            self._after_input(conn)

    def _take(self, conn: Conn, data: bytes) -> bool:
        """Feed received bytes to the connection; False (and the connection closed) when
        the peer broke the protocol or is gone."""
        try:
            conn.feed(data)
        except ProtocolError as exc:
            log(f"closing connection: FastCGI protocol error: {exc}")
            self._close(conn, graceful=True)
            return False
        except RepliesUnread as exc:
            log(f"closing connection: {exc}")
            self._close(conn)
            return False
        except OSError:
            self._close(conn)
            return False
        return True

    def _after_input(self, conn: Conn) -> None:
        """An idle connection got input: serve its request, close it, or watch it."""
        if conn.events and type(conn.events[0]) is Request:
            conn.busy = True        # (it is served, by this thread or a worker)
            if conn.ahead:
                self._release(conn)     # its application consumes it now
            self.requests += 1
            if self.max_requests and self.requests >= self.max_requests:
                self._begin_stop(f"served {self.requests} requests (--max-requests):"
                                 " exiting")
            if self._work is None:
                return self._run(conn)  # --threads 1: the loop is the application's thread
            with self._lock:
                self._in_app += 1   # at --threads, the loop stops listening (_loop)
            return self._work.put(conn)
        if conn.ahead and not conn.events:  # what was read ahead is not kept (not a
            self._release(conn)     # request yet: PARAMS are bounded by themselves; dropped)
        if conn.eof:
            return self._close(conn)
        if not conn.proto.keep_conn and not conn.proto.active_requests:
            # A request refused or aborted before it began, without FCGI_KEEP_CONN:
            # its END_REQUEST ends the connection too.
            return self._close(conn, graceful=True)
        self._rearm(conn)

    def _release(self, conn: Conn) -> None:
        """What was read ahead of ``conn`` no longer counts against READ_AHEAD_TOTAL
        (callers test ``conn.ahead`` first: no call on the usual path)."""
        self._ahead_total -= conn.ahead
        conn.ahead = 0

    def _rearm(self, conn: Conn) -> None:
        if not self._rearm_any(conn):
            self._close(conn)

    def _close(self, conn: Conn, graceful: bool = False) -> None:
        """Forget and close; ``graceful``: shut down our side and let the loop read
        what the peer still sends (bounded), so the peer sees no reset."""
        with conn.lock:
            if conn.closed:
                return
            if graceful and not conn.eof:
                try:
                    conn.socket().shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                else:
                    conn.draining = True
                    conn.busy = False
                    conn.deadline = time.monotonic() + DRAIN_TIME
                    with self._lock:
                        self._draining.add(conn)
                    self._rearm_any(conn)
                    if threading.current_thread() is not threading.main_thread():
                        self._wake()    # the loop must learn the new deadline
                    return
            conn.closed = True
            conn.draining = False
            if conn.ahead:
                self._release(conn)
            self.conns.pop(conn.fd, None)
            conn.close_socket()     # also leaves the epoll set (the fd is never dup'ed)
        if self.stopping and threading.current_thread() is not threading.main_thread():
            self._wake()

    def _rearm_any(self, conn: Conn) -> bool:
        """Watch the connection (again; EPOLLOUT too while replies wait): registers a
        connection not yet in the epoll set (mask 0); no system call when the
        level-triggered registration (--threads 1) is already right."""
        want = self._arm | select.EPOLLOUT if conn.pending else self._arm
        old = conn.mask
        if want != old or want & select.EPOLLONESHOT:
            # The mask is set first: once a worker's register() is in the kernel, the
            # loop may take the connection (it is not busy) before the worker runs again,
            # and must then modify the registration, not register it a second time.
            conn.mask = want
            try:
                if old:
                    self.epoll.modify(conn.fd, want)
                else:
                    self.epoll.register(conn.fd, want)
            except OSError:
                conn.mask = old
                return False
        return True

    def _drain(self, conn: Conn) -> None:
        if not self._discard_input(conn):
            return self._rearm(conn)
        with self._lock:
            self._draining.discard(conn)
        self._close(conn)

    @staticmethod
    def _discard_input(conn: Conn) -> bool:
        """Read and drop what a draining connection's peer has sent, without waiting.
        True once there is no more to read (its end, an error, or DRAIN_LIMIT bytes in
        all); False when more may come."""
        try:
            while True:
                data = conn.recv_now(RECV_SIZE)
                conn.drained += len(data)
                if not data or conn.drained > DRAIN_LIMIT:
                    break
        except BlockingIOError:
            return False
        except OSError:
            pass
        conn.eof = True
        return True

    def _expire_drains(self) -> None:
        """Close the draining connections past their deadline. What has already come
        is read first (the loop may have been in an application past the deadline,
        --threads 1): closing with unread input would reset the connection."""
        now = time.monotonic()
        with self._lock:
            expired = [c for c in self._draining if c.deadline <= now]
            self._draining.difference_update(expired)
        for conn in expired:
            self._discard_input(conn)
            conn.eof = True
            self._close(conn)

    # -- serving requests (loop thread with --threads 1, else a worker) ------------------
    def _worker(self) -> None:
        get = self._work.get
        while True:
            self._run(get())

    def _run(self, conn: Conn) -> None:
        """Serve a connection's requests; whatever escapes closes that connection only,
        except SystemExit/KeyboardInterrupt from the application: then the runner stops
        (finishing the other requests in flight) and serve() re-raises it, so the process
        exits with its status whatever --threads is, and spawnd starts a replacement."""
        try:
            self._serve_conn(conn)
        except BaseException as exc:
            self._close(conn)
            if isinstance(exc, (SystemExit, KeyboardInterrupt)):
                if self._exit is None:
                    self._exit = exc
                self._begin_stop(f"the application raised {exc!r}: stopping")
                self._wake()
            else:
                log(f"internal error serving a connection: {exc!r}\n"
                    + traceback.format_exc().rstrip())
        finally:
            if self._work is not None:
                with self._lock:
                    self._in_app -= 1
                    freed = self._in_app == self.threads - 1
                if freed:
                    self._wake()    # the loop listens again

    def _serve_conn(self, conn: Conn) -> None:
        """Serve the connection's request, then give the connection back to the loop, or
        close it. It is the only request there: the protocol refuses (CANT_MPX_CONN) one
        that begins while another is active, and the connection is read only for this
        request's input until it has ended (_next_stdin), so whatever is left in
        ``events`` belongs to it."""
        events = conn.events
        req = events.popleft()
        conn.rid = req.request_id
        conn.ended = False
        if events and type(events[0]) is StdinEnd:
            events.popleft()        # no body, and all of the request has come
            stream = EMPTY
        else:
            stream = InputStream(lambda: self._next_stdin(conn))
        try:
            environ = build_environ(req.params, self.prefix)
        except NotMounted:
            try:
                conn.send(NOT_FOUND, end=True)
            except PeerGone:
                pass
        else:
            environ.update(self._environ_base[req.role])
            environ["wsgi.input"] = stream
            run_app(self.app, environ, conn)
        input_done = conn.proto.input_ended(conn.rid)
        events.clear()              # late STDIN of the finished request
        conn.served += 1
        if conn.closed:
            return
        if conn.eof:
            return self._close(conn)
        if not conn.ended or not conn.proto.keep_conn or self.stopping:
            # Not ended: the application broke its response off after the headers
            # (run_app); with no END_REQUEST the web server sees the response end early,
            # so it does not pass it on, or cache it, as complete. Close now when the
            # peer has nothing more to send; else drain first.
            return self._close(conn, graceful=not input_done)
        with conn.lock:
            conn.busy = False
            if conn.closed:
                return
            watched = self._rearm_any(conn)
        if not watched:             # epoll refused it (max_user_watches?): do not leak it
            self._close(conn)

    def _next_stdin(self, conn: Conn) -> bytes:
        """The next piece of the request's STDIN (b"" at its end), reading the
        socket (blocking, with the I/O timeout) only when nothing is buffered. Once the
        request has ended (answered, or aborted by the web server), its input is over
        for the application: b"" without reading, since what the socket holds then
        belongs to the next request (the loop reads it; the protocol drops what is
        left of this one's STDIN)."""
        if conn.ended:
            return b""
        events = conn.events
        while True:
            while events:
                ev = events[0]
                kind = type(ev)
                if kind is StdinData:
                    events.popleft()
                    return ev.data
                if kind is StdinEnd:
                    events.popleft()
                    return b""
                if kind is AbortRequest:
                    # The web server wants no answer: END_REQUEST now; whatever the
                    # application sends after this is dropped (Conn.send).
                    events.popleft()
                    try:
                        conn.send(b"", end=True)
                    except PeerGone:
                        pass
                    raise ClientDisconnected("the web server aborted the request")
                raise ClientDisconnected(f"unexpected {kind.__name__} in STDIN")
            if conn.eof:
                raise ClientDisconnected("the web server closed the connection")
            try:
                if self._work is None and len(self.conns) > 1:
                    data = self._read_ahead(conn)
                else:
                    data = conn.blocking().recv(BODY_RECV_SIZE)
                conn.feed(data)
            except ProtocolError as exc:
                conn.eof = True
                raise ClientDisconnected(f"FastCGI protocol error: {exc}") from None
            except OSError as exc:
                conn.eof = True
                why = f"nothing came for {self._io_timeout:g}s (--io-timeout)" \
                    if isinstance(exc, (BlockingIOError, TimeoutError)) else exc
                raise ClientDisconnected(f"reading the request body: {why}") from None

    def _read_ahead(self, conn: Conn) -> bytes:
        """--threads 1: the application waits for more of ``conn``'s body. Until it
        comes (at most --io-timeout), read what the web server sends on the other
        connections into their buffers, so that it can go on sending them instead of
        waiting for this request to end: a Unix socket holds only the sender's
        SO_SNDBUF (~208 KiB), a fraction of a large upload. At most READ_AHEAD bytes per
        connection and READ_AHEAD_TOTAL in all are held; a request read this way is
        served by the loop when this one is done (``_ready``). Returns ``conn``'s data
        as ``recv`` would; TimeoutError at the deadline."""
        watch = None
        mine = True                 # first: what may be there already
        while True:
            if mine:
                try:
                    return conn.recv_now(BODY_RECV_SIZE)
                except BlockingIOError:
                    pass            # (after poll: a spurious wake-up)
            if watch is None:
                deadline = None if self._io_timeout is None \
                    else time.monotonic() + self._io_timeout
                watch = select.poll()
                watch.register(conn.fd, select.POLLIN)
                others = set()
                for other in self.conns.values():
                    if other is not conn and other.ahead < READ_AHEAD and not (
                            other.busy or other.closed or other.draining or other.eof):
                        watch.register(other.fd, select.POLLIN)
                        others.add(other.fd)
            if others and self._ahead_total >= READ_AHEAD_TOTAL:
                for fd in others:
                    watch.unregister(fd)
                others.clear()
            wait = POLL_SLICE
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError("timed out")
            mine = False
            for fd, _ in watch.poll(wait * 1000):
                if fd == conn.fd:
                    mine = True
                elif fd in others:
                    other = self.conns.get(fd)
                    if other is None or not self._read_early(other):
                        watch.unregister(fd)
                        others.discard(fd)

    def _read_early(self, conn: Conn) -> bool:
        """One read of another connection's input for ``_read_ahead``, within the
        bounds. False when it is not to be watched any more (at its bound, closed, or
        at its end: the end of input is left in the socket, for the loop to read once
        a request read ahead is answered, so a web server that half-closes after its
        request still gets the answer)."""
        room = min(RECV_SIZE, READ_AHEAD - conn.ahead, READ_AHEAD_TOTAL - self._ahead_total)
        if room <= 0:
            return False
        try:
            data = conn.recv_now(room)
        except BlockingIOError:
            return True
        except OSError:
            self._close(conn)
            return False
        self._ready.append(conn)    # the loop decides what follows, as for _on_readable
        if not data:
            return False
        conn.ahead += len(data)
        self._ahead_total += len(data)
        return self._take(conn, data) and conn.ahead < READ_AHEAD and not conn.draining
