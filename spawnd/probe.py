"""A FastCGI health probe that runs on the supervisor's loop and never blocks.

::

    probe = Probe(loop, "unix:/run/spawnd/php.sock", "/ping", {"SCRIPT_FILENAME": ...},
                  timeout=2.0, expect=200, on_done=report)
    probe.start()        # returns at once; report(ok, detail, latency) is called later

The probe connects a non-blocking socket to the pool's address, sends one RESPONDER
request with the CGI parameters a web server would send (``client.build_params``:
GET, REQUEST_URI/SCRIPT_NAME/PATH_INFO/QUERY_STRING from the URI, SERVER_*, REMOTE_ADDR
127.0.0.1; ``params`` override them), reads the answer through the sans-IO
``ClientConnection`` and parses it with ``client.parse_cgi_response``.

``on_done(ok, detail, latency)`` is called exactly once, always from the loop (never from
inside ``start()``): ``ok`` when the CGI status (``Status:`` header, default 200) equals
``expect``; ``detail`` is one line saying what happened ("200 OK", "connect: Connection
refused", "timed out after 2s waiting for the response", "protocol error: ...", ...);
``latency`` is the seconds from ``start()`` to the outcome. The timeout is a loop timer
covering connect, send and receive. The socket and the timer are released before
``on_done`` runs, in every case. ``cancel()`` releases them too and suppresses
``on_done`` (the caller has lost interest, e.g. the pool stopped).

TCP addresses must hold an IP literal (config.py resolves names when it loads), so
nothing here waits for DNS. Only the first ``MAX_RESPONSE`` bytes of the response are kept
(the status and headers are what matter); the rest is read and dropped.
"""
from __future__ import annotations

import errno
import os
import selectors
import socket
import time

from .fastcgi.client import FastCGIError, build_params, parse_address, parse_cgi_response
from .fastcgi.protocol import (PROTOCOL_STATUS_NAMES, REQUEST_COMPLETE, RESPONDER,
                               ClientConnection, EndRequest, ProtocolError, Stdout)

__all__ = ["Probe"]

REQUEST_ID = 1
RECV_SIZE = 65536
MAX_RESPONSE = 65536
_READ, _BOTH = selectors.EVENT_READ, selectors.EVENT_READ | selectors.EVENT_WRITE


def _sockaddr(address: str) -> tuple[int, object]:
    """(family, sockaddr) for connect(); ValueError for bad text or a host name."""
    family, where = parse_address(address)
    if family == socket.AF_UNIX:
        return family, where
    host, port = where
    try:
        info = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0,
                                  socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
    except socket.gaierror:
        raise ValueError(f"probe address {address!r}: the host must be an IP address") \
            from None
    return info[0][0], info[0][4]


class Probe:
    """One FastCGI request on the loop; see the module docstring."""

    def __init__(self, loop, address: str, uri: str = "/", params: dict | None = None,
                 timeout: float = 2.0, expect: int = 200, on_done=None) -> None:
        self.loop = loop
        self.address = address
        self.family, self.sockaddr = _sockaddr(address)      # ValueError: bad address
        self.timeout = timeout
        self.expect = expect
        self.on_done = on_done
        conn = ClientConnection()
        self._conn = conn
        self._out = memoryview(
            conn.begin_request(REQUEST_ID, RESPONDER, False,
                               build_params(address, uri, "GET", None, b"", params))
            + conn.send_stdin(REQUEST_ID, b""))
        self._sock: socket.socket | None = None
        self._timer = None
        self._stdout: list[bytes] = []
        self._kept = 0
        self._started = 0.0
        self._connecting = False
        self.done = False

    # ---- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            raise RuntimeError("a Probe runs once; make a new one")
        self._started = time.monotonic()
        self._timer = self.loop.call_later(self.timeout, self._on_timeout)
        try:
            sock = socket.socket(self.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC)
        except OSError as exc:
            self._fail_soon(f"cannot create a socket: {exc.strerror or exc}")
            return
        self._sock = sock
        code = sock.connect_ex(self.sockaddr)
        if code == errno.EINPROGRESS:
            self._connecting = True          # writable when the handshake is done
        elif code == errno.EAGAIN:           # a Unix listener with a full queue
            self._fail_soon("connect: the listen queue is full")
            return
        elif code:
            self._fail_soon(f"connect: {os.strerror(code)}")
            return
        self.loop.add_reader(sock.fileno(), self._on_event)
        self.loop.selector.modify(sock.fileno(), _BOTH, self._on_event)

    def cancel(self) -> None:
        """Stop now, release everything, and do not call on_done."""
        self.done = True
        self._release()

    # ---- events -----------------------------------------------------------------------
    def _on_event(self, mask: int) -> None:
        if self.done:
            return
        if mask & selectors.EVENT_WRITE:
            if self._connecting:
                self._connecting = False
                code = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self._finish(False, f"connect: {os.strerror(code)}")
                    return
            self._send()
        if mask & selectors.EVENT_READ and not self.done:
            self._receive()

    def _send(self) -> None:
        try:
            sent = self._sock.send(self._out)
        except BlockingIOError:
            return
        except (BrokenPipeError, ConnectionResetError):
            sent = len(self._out)        # it stopped reading: still read what it says
        self._out = self._out[sent:]
        if not self._out:
            self.loop.selector.modify(self._sock.fileno(), _READ, self._on_event)

    def _receive(self) -> None:
        try:
            data = self._sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if self._connecting or exc.errno == errno.ECONNREFUSED:
                self._finish(False, f"connect: {exc.strerror or exc}")
            else:
                self._finish(False, f"connection lost: {exc.strerror or exc}")
            return
        try:
            events = self._conn.receive_data(data)
        except ProtocolError as exc:
            self._finish(False, f"protocol error: {exc}")
            return
        for event in events:
            if type(event) is Stdout and self._kept < MAX_RESPONSE:
                self._stdout.append(event.data)
                self._kept += len(event.data)
            elif type(event) is EndRequest:
                self._answered(event)
                return
        if not data:
            self._finish(False, "connection closed before the answer was complete")

    def _answered(self, end: EndRequest) -> None:
        if end.protocol_status != REQUEST_COMPLETE:
            name = PROTOCOL_STATUS_NAMES.get(end.protocol_status, str(end.protocol_status))
            self._finish(False, f"the application refused the request ({name})")
            return
        try:
            status, reason, _headers, _body = parse_cgi_response(
                b"".join(self._stdout), "response")
        except FastCGIError as exc:
            self._finish(False, str(exc))
            return
        text = f"{status} {reason}".rstrip()
        if status == self.expect:
            self._finish(True, text)
        else:
            self._finish(False, f"status {text}, expected {self.expect}")

    def _on_timeout(self) -> None:
        self._timer = None
        if self.done:
            return
        what = ("connecting" if self._connecting else
                "sending the request" if self._out else "waiting for the response")
        self._finish(False, f"timed out after {self.timeout:g}s {what}")

    # ---- the end ----------------------------------------------------------------------
    def _fail_soon(self, detail: str) -> None:
        """An error found inside start(): report it from the loop, not to start's caller."""
        self._release()
        self._timer = self.loop.call_later(0, self._finish, False, detail)

    def _finish(self, ok: bool, detail: str) -> None:
        if self.done:
            return
        latency = time.monotonic() - self._started
        self.done = True
        self._release()
        if self.on_done is not None:
            self.on_done(ok, detail, latency)

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sock is not None:
            self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
