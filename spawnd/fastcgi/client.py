"""A small blocking FastCGI client, built on the sans-IO ``ClientConnection``.

``request(address, uri, ...)`` sends one RESPONDER request the way a web server would
(the usual CGI parameters filled in, headers as ``HTTP_*``) and returns a ``Response``
with the CGI response parsed. It is what ``spawnctl request``, the health probes, the
tests and the benchmarks use. From a shell::

    python -m spawnd.fastcgi.client ADDRESS [URI] [-X METHOD] [-d BODY]
        [-H 'Name: value']... [-e NAME=VALUE]... [--timeout S]

prints ``Status: CODE REASON``, the headers, a blank line and the body on stdout, the
application's stderr records on stderr, and exits 0 for a 2xx status, 1 for any other
status or a failed request, 2 for a usage error and 3 when it cannot connect.

Text given as ``str`` (URI, header and parameter values) is sent as UTF-8, with the
bytes of undecodable command-line arguments kept as they were (``surrogateescape``).
"""
from __future__ import annotations

import argparse
import http
import re
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from .protocol import (PROTOCOL_STATUS_NAMES, REQUEST_COMPLETE, RESPONDER,
                       ClientConnection, EndRequest, GetValuesResult, ProtocolError,
                       Stderr, Stdout, UnknownType)

__all__ = ["FastCGIError", "ConnectError", "Response", "request", "get_values",
           "parse_address",
           "add_request_options", "request_from_options", "write_response", "main"]

REQUEST_ID = 1
_RECV_SIZE = 1 << 16
_SEND_SIZE = 1 << 18


class FastCGIError(OSError):
    """The request failed: timeout, connection lost, protocol error, bad response."""


class ConnectError(FastCGIError, ConnectionError):
    """Nothing accepted the connection (refused, no such socket, unreachable, connect
    timed out). Callers map it to "cannot reach" (exit status 3)."""


@dataclass
class Response:
    status: int                      # from the CGI "Status:" header; 200, or 302 with Location
    reason: str
    headers: list[tuple[str, str]]   # in order, without the CGI "Status" field
    body: bytes
    stderr: bytes = b""
    app_status: int = 0
    protocol_status: int = REQUEST_COMPLETE
    raw: bytes = field(default=b"", repr=False)   # the whole STDOUT stream

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first header called ``name`` (case-insensitive)."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return default


def _b(text) -> bytes:
    if isinstance(text, str):
        return text.encode("utf-8", "surrogateescape")
    return bytes(text)


# ---- addresses -----------------------------------------------------------------------
def parse_address(address: str) -> tuple[int, object]:
    """``unix:/path`` | ``tcp:HOST:PORT`` | ``tcp:[V6]:PORT`` -> (family, sockaddr).

    For TCP the sockaddr is (host, port) with the brackets removed; the family is
    AF_INET6 for a bracketed host, else AF_UNSPEC (resolved on connect)."""
    kind, sep, rest = address.partition(":")
    if kind == "unix" and sep and rest:
        return socket.AF_UNIX, rest
    if kind == "tcp" and sep:
        match = re.fullmatch(r"\[([0-9A-Fa-f:.%a-zA-Z]+)\]:(\d+)|([^:\[\]]+):(\d+)", rest)
        if match:
            v6host, v6port, host, port = match.groups()
            if v6host is not None:
                host, port, family = v6host, v6port, socket.AF_INET6
            else:
                family = socket.AF_UNSPEC
            if 0 < int(port) < 65536:
                return family, (host, int(port))
    raise ValueError(f"bad FastCGI address {address!r}: expected unix:/PATH, "
                     "tcp:HOST:PORT or tcp:[V6ADDR]:PORT")


def _connect(address: str, timeout: float) -> socket.socket:
    family, where = parse_address(address)
    try:
        if family == socket.AF_UNIX:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(where)
            except BaseException:
                sock.close()
                raise
            return sock
        return socket.create_connection(where, timeout=timeout)
    except (TimeoutError, socket.timeout):
        raise ConnectError(f"{address}: connect timed out after {timeout:g}s") from None
    except OSError as exc:
        raise ConnectError(exc.errno, f"{address}: cannot connect: "
                           f"{exc.strerror or exc}") from None


# ---- the request ---------------------------------------------------------------------
def _header_items(headers) -> list[tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, dict):
        return list(headers.items())
    return list(headers)


def build_params(address: str, uri: str, method: str, headers, body: bytes,
                 params: dict | None) -> list[tuple[bytes, bytes]]:
    """The CGI/1.1 parameters a web server would send; ``params`` override them."""
    raw_uri = _b(uri)
    if not raw_uri.startswith(b"/"):
        raw_uri = b"/" + raw_uri
    path, _, query = raw_uri.partition(b"?")
    family, where = parse_address(address)
    port = b"80" if family == socket.AF_UNIX else str(where[1]).encode()
    env: dict[bytes, bytes] = {
        b"GATEWAY_INTERFACE": b"CGI/1.1",
        b"SERVER_SOFTWARE": b"spawnd-fastcgi-client",
        b"SERVER_PROTOCOL": b"HTTP/1.1",
        b"REQUEST_SCHEME": b"http",
        b"REQUEST_METHOD": _b(method.upper()),
        b"REQUEST_URI": raw_uri,
        b"DOCUMENT_URI": path,
        b"SCRIPT_NAME": b"",
        b"PATH_INFO": unquote_to_bytes(path),
        b"QUERY_STRING": query,
        b"SERVER_NAME": b"localhost",
        b"SERVER_PORT": port,
        b"SERVER_ADDR": b"127.0.0.1",
        b"REMOTE_ADDR": b"127.0.0.1",
        b"CONTENT_LENGTH": str(len(body)).encode(),
        b"CONTENT_TYPE": b"",
        b"HTTP_HOST": b"localhost",
    }
    seen: set[bytes] = set()
    for name, value in _header_items(headers):
        key = _b(name).strip().upper().replace(b"-", b"_")
        if key in (b"CONTENT_TYPE", b"CONTENT_LENGTH"):
            env[key] = _b(value)
            continue
        key = b"HTTP_" + key
        if key in seen:                         # repeated header: merge, as HTTP allows
            sep = b"; " if key == b"HTTP_COOKIE" else b", "
            env[key] += sep + _b(value)
        else:
            env[key] = _b(value)
            seen.add(key)
    if not env[b"CONTENT_TYPE"] and body:
        env[b"CONTENT_TYPE"] = b"application/x-www-form-urlencoded"
    for name, value in (params or {}).items():
        env[_b(name)] = _b(value)
    return list(env.items())


def request(address: str, uri: str = "/", *, method: str = "GET",
            params: dict | None = None, headers: dict | list | None = None,
            body: bytes = b"", timeout: float = 10.0, keep_conn: bool = False) -> Response:
    """Send one FastCGI RESPONDER request and return the parsed response.

    ``timeout`` bounds the whole exchange (connect included). Raises ConnectError when
    nothing accepts the connection and FastCGIError for every other failure, including
    a refusal by the application (UNKNOWN_ROLE, CANT_MPX_CONN, OVERLOADED)."""
    body = _b(body)
    wire_params = build_params(address, uri, method, headers, body, params)
    conn = ClientConnection()
    out = (conn.begin_request(REQUEST_ID, RESPONDER, keep_conn, wire_params)
           + (conn.send_stdin(REQUEST_ID, body) if body else b"")
           + conn.send_stdin(REQUEST_ID, b""))
    events = _exchange(address, conn, out, timeout, EndRequest)
    end = events[-1]
    if end.protocol_status != REQUEST_COMPLETE:
        name = PROTOCOL_STATUS_NAMES.get(end.protocol_status, str(end.protocol_status))
        raise FastCGIError(f"{address}: the application refused the request ({name})")
    raw = b"".join(e.data for e in events if type(e) is Stdout)
    status, reason, header_list, content = parse_cgi_response(raw, address)
    return Response(status, reason, header_list, content,
                    b"".join(e.data for e in events if type(e) is Stderr),
                    end.app_status, end.protocol_status, raw)


def get_values(address: str, names=(b"FCGI_MAX_CONNS", b"FCGI_MAX_REQS",
                                    b"FCGI_MPXS_CONNS"), *,
               timeout: float = 10.0) -> dict[bytes, bytes]:
    """Ask the application for its FastCGI limits (a GET_VALUES management record).

    Returns the names it knows with their values; FastCGIError if it answers
    UNKNOWN_TYPE (it does not implement management records)."""
    conn = ClientConnection()
    final = _exchange(address, conn, conn.get_values(names), timeout,
                      (GetValuesResult, UnknownType))[-1]
    if isinstance(final, UnknownType):
        raise FastCGIError(f"{address}: the application does not support GET_VALUES")
    return final.values


def _exchange(address: str, conn: ClientConnection, out: bytes, timeout: float,
              final) -> list:
    """Connect, send ``out`` while receiving, and return every event up to and
    including the first of type ``final``. ``timeout`` bounds the whole exchange."""
    deadline = time.monotonic() + timeout
    events: list = []
    with _connect(address, timeout) as sock, selectors.DefaultSelector() as selector:
        # Full duplex: the application may answer (and fill its socket buffer) before
        # it has read the whole body, so send and receive in one loop.
        sock.setblocking(False)
        pending = memoryview(out)
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while not events or not isinstance(events[-1], final):
            left = deadline - time.monotonic()
            if left <= 0:
                what = "sending the request" if pending else "waiting for the response"
                raise FastCGIError(f"{address}: timed out after {timeout:g}s {what}")
            ready = selector.select(left)
            mask = ready[0][1] if ready else 0
            if mask & selectors.EVENT_WRITE:
                try:
                    pending = pending[sock.send(pending[:_SEND_SIZE]):]
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    pending = pending[:0]   # it stopped reading: read what it said
                if not pending:
                    selector.modify(sock, selectors.EVENT_READ)
            if not mask & selectors.EVENT_READ:
                continue
            try:
                data = sock.recv(_RECV_SIZE)
                new = conn.receive_data(data)
            except BlockingIOError:
                continue
            except ProtocolError as exc:
                raise FastCGIError(f"{address}: protocol error: {exc}") from None
            except OSError as exc:
                raise FastCGIError(f"{address}: connection lost: {exc}") from None
            for event in new:
                events.append(event)
                if isinstance(event, final):
                    return events
            if not data:
                raise FastCGIError(f"{address}: connection closed before the answer"
                                   " was complete")
    return events


_HEAD_END = re.compile(rb"\r?\n\r?\n")


def parse_cgi_response(raw: bytes, where: str = "response"
                       ) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """Split a CGI response into (status, reason, headers, body)."""
    if not raw:
        raise FastCGIError(f"{where}: the application sent no output")
    match = _HEAD_END.search(raw)
    if match is None:
        raise FastCGIError(f"{where}: no blank line after the CGI response headers")
    headers: list[tuple[str, str]] = []
    status_field = None
    for line in raw[:match.start()].decode("latin-1").splitlines():
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise FastCGIError(f"{where}: malformed CGI header line {line!r}")
        name, value = name.strip(), value.strip()
        if name.lower() == "status":
            status_field = value
        else:
            headers.append((name, value))
    if status_field is not None:
        code, _, reason = status_field.partition(" ")
        if not (code.isdigit() and len(code) == 3):
            raise FastCGIError(f"{where}: bad CGI Status {status_field!r}")
        status = int(code)
    else:
        has_location = any(k.lower() == "location" for k, _ in headers)
        status, reason = (302 if has_location else 200), ""
    reason = reason.strip()
    if not reason:
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = ""
    return status, reason, headers, raw[match.end():]


# ---- command line (also used by spawnctl request) ------------------------------------
def add_request_options(parser: argparse.ArgumentParser) -> None:
    """The options of one request: URI, -X, -d, -H, -e, --timeout."""
    parser.add_argument("uri", nargs="?", default="/", help="request URI (default /)")
    parser.add_argument("-X", "--method", help="request method (default GET, or POST"
                        " with -d)")
    parser.add_argument("-d", "--data", metavar="BODY",
                        help="request body; @FILE reads a file, @- standard input")
    parser.add_argument("-H", "--header", action="append", default=[],
                        metavar="'NAME: VALUE'", help="request header (repeatable)")
    parser.add_argument("-e", "--param", action="append", default=[],
                        metavar="NAME=VALUE", help="FastCGI parameter, overriding the"
                        " defaults (repeatable)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="seconds for the whole request (default 10)")


def request_from_options(address: str, opts: argparse.Namespace) -> Response:
    """Run ``request`` with parsed options; ValueError for malformed -H / -e / -d."""
    headers = []
    for text in opts.header:
        name, colon, value = text.partition(":")
        if not colon or not name.strip():
            raise ValueError(f"bad header {text!r}: expected 'Name: value'")
        headers.append((name.strip(), value.strip()))
    params = {}
    for text in opts.param:
        name, eq, value = text.partition("=")
        if not eq or not name:
            raise ValueError(f"bad parameter {text!r}: expected NAME=VALUE")
        params[name] = value
    body = b""
    if opts.data is not None:
        if opts.data == "@-":
            body = sys.stdin.buffer.read()
        elif opts.data.startswith("@"):
            try:
                with open(opts.data[1:], "rb") as f:
                    body = f.read()
            except OSError as exc:
                raise ValueError(f"cannot read the body: {exc}") from None
        else:
            body = _b(opts.data)
    method = opts.method or ("POST" if opts.data is not None else "GET")
    return request(address, opts.uri, method=method, params=params, headers=headers,
                   body=body, timeout=opts.timeout)


def write_response(response: Response, out, err) -> None:
    """Status line, headers, blank line, body to ``out``; stderr records to ``err``
    (both binary streams)."""
    head = [f"Status: {response.status} {response.reason}".rstrip()]
    head += [f"{name}: {value}" for name, value in response.headers]
    out.write(("\n".join(head) + "\n\n").encode("latin-1", "replace"))
    out.write(response.body)
    out.flush()
    if response.stderr:
        err.write(response.stderr)
        err.flush()


def exit_status(response: Response) -> int:
    return 0 if 200 <= response.status < 300 else 1


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m spawnd.fastcgi.client",
        description="Send one FastCGI request and print the response (like cgi-fcgi).",
        epilog="Exit status: 0 for a 2xx response, 1 for another status or a failed"
               " request, 2 for usage errors, 3 when the address cannot be reached.")
    parser.add_argument("address", help="unix:/PATH, tcp:HOST:PORT or tcp:[V6]:PORT")
    add_request_options(parser)
    opts = parser.parse_args(argv)
    try:
        parse_address(opts.address)
        response = request_from_options(opts.address, opts)
    except ValueError as exc:
        parser.error(str(exc))
    except ConnectError as exc:
        print(f"{parser.prog}: {exc.strerror or exc}", file=sys.stderr)
        return 3
    except FastCGIError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 1
    write_response(response, sys.stdout.buffer, sys.stderr.buffer)
    return exit_status(response)


if __name__ == "__main__":
    sys.exit(main())
