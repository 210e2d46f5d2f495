"""Running one WSGI call: start_response, write(), the result iterable, close().

The output goes to a *sink* with one method, ``send(data, end=False)``: ``data`` is raw
CGI response bytes (the header block, then body bytes); ``end=True`` finishes the
response; a sink ignores anything sent after the end. A response the application
breaks off after its headers went out is never ended: ``run_app`` returns False and the
caller aborts it. Each call is one write, so the header block travels with the first body
chunk, and a list/tuple result is sent together with the end of the response. The
application's ``close()`` is called in every case; if it raises after the response was
complete, the traceback is logged and the response stands. A sink raises ``PeerGone`` (and
only that) when the web server is gone, so an OSError from the application is an
application error.
"""
from __future__ import annotations

import sys
import traceback

# A sequence result up to this size is sent with the end of the response in one go.
COALESCE_LIMIT = 1 << 20
FILE_BLOCK = 1 << 18

ERROR_500 = (b"Status: 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
             b"Content-Length: 22\r\n\r\nInternal Server Error\n")
NOT_FOUND = (b"Status: 404 Not Found\r\nContent-Type: text/plain\r\n"
             b"Content-Length: 10\r\n\r\nNot Found\n")


class FileWrapper:
    """wsgi.file_wrapper: iterates a file-like object in large blocks and closes it."""

    def __init__(self, filelike, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = max(blksize, FILE_BLOCK)
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        read = self.filelike.read
        size = self.blksize
        while True:
            data = read(size)
            if not data:
                return
            yield data


class PeerGone(Exception):
    """The web server closed the connection; nothing more can be sent."""


class _Spent:
    """The sink of a response once run_app has returned: a write() the application
    makes later (a callable it kept) goes nowhere, whatever the sink answers next."""

    @staticmethod
    def send(data: bytes, end: bool = False) -> None:
        pass


_SPENT = _Spent()


class _Response:
    __slots__ = ("sink", "status", "headers", "sent", "ended")

    def __init__(self, sink) -> None:
        self.sink = sink
        self.status: str | None = None
        self.headers: bytes | None = None
        self.sent = False
        self.ended = False          # the end of the response was sent

    def start_response(self, status, headers, exc_info=None):
        if exc_info is not None:
            try:
                if self.sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None       # no reference cycle through the traceback
        elif self.status is not None:
            raise AssertionError("start_response called a second time without exc_info")
        if type(status) is not str or len(status) < 4 or not status[:3].isdigit() \
                or status[3] != " ":
            raise ValueError(f"invalid WSGI status {status!r}")
        lines = ["Status: ", status, "\r\n"]
        try:
            for name, value in headers:
                if ":" in name:
                    raise ValueError
                lines += (name, ": ", value, "\r\n")
            lines.append("\r\n")
            block = "".join(lines)      # (TypeError unless every part is a str)
        except (TypeError, ValueError):
            block = None
        # The block's only line ends are its own: none came in the status, a name or
        # a value. Counted once on the whole block, not tested per header.
        ends = len(lines) // 4 + 1     # 3 + 4 per header + 1 parts: headers + 2 ends
        if block is None or block.count("\n") != ends or block.count("\r") != ends:
            raise _bad_header(status, headers)
        self.status = status
        self.headers = block.encode("latin-1")
        return self.write

    def write(self, data) -> None:
        """The legacy write() callable, also used for every body chunk."""
        if self.status is None:
            raise AssertionError("write() before start_response")
        if not self.sent:
            data = self.headers + data
            self.sent = True
        elif not data:
            return
        self.sink.send(data)

    def finish(self, last: bytes = b"") -> None:
        if self.status is None:
            raise AssertionError("the application returned without calling start_response")
        if not self.sent:
            last = self.headers + last
            self.sent = True
        self.sink.send(last, end=True)
        self.ended = True


def _bad_header(status: str, headers) -> Exception:
    """The error start_response raises for a status line or headers it refused: names
    the first fault."""
    if "\r" in status or "\n" in status:
        return ValueError(f"invalid WSGI status {status!r}")
    try:
        items = list(headers)       # (an iterator was used up: then the last error)
    except TypeError:
        items = ()
    for item in items:
        try:
            name, value = item
        except (TypeError, ValueError):
            return TypeError(f"header {item!r} is not a (name, value) pair")
        if type(name) is not str or type(value) is not str:
            return TypeError(f"header {name!r}: {value!r} is not a pair of str")
        if "\r" in value or "\n" in value or ":" in name or "\n" in name or "\r" in name:
            return ValueError(f"invalid characters in header {name!r}: {value!r}")
    return TypeError(f"invalid WSGI headers {headers!r}")


def run_app(app, environ: dict, sink, errors=None) -> bool:
    """Call ``app`` and send its response to ``sink``; returns False if the response
    could not be completed: the peer went away, or the application failed after the
    headers were sent (then the end is not sent either: the caller aborts the response,
    so that nobody mistakes what was sent for all of it). Application errors are logged
    to ``errors`` (default sys.stderr) and answered with a 500 when nothing was sent yet."""
    resp = _Response(sink)
    result = None
    try:
        try:
            result = app(environ, resp.start_response)
            if type(result) in (list, tuple) and \
                    sum(map(len, result)) <= COALESCE_LIMIT:
                resp.finish(b"".join(result))
                return True
            write = resp.write
            for chunk in result:
                if chunk:
                    write(chunk)
            resp.finish()
            return True
        finally:
            if hasattr(result, "close"):
                result.close()
    except PeerGone:
        return False
    except Exception:
        return _app_error(resp, sink, errors)
    finally:
        resp.sink = _SPENT          # (a sink may serve the next request)


def _app_error(resp: _Response, sink, errors) -> bool:
    stream = errors or sys.stderr
    try:
        stream.write("spawnd-wsgi: error in the application\n" + traceback.format_exc())
        stream.flush()
    except (OSError, ValueError):
        pass
    if resp.ended:      # e.g. close() raised after a complete response: nothing to add
        return True
    if resp.sent:       # part of a response is out: it cannot be made whole
        return False
    try:
        sink.send(ERROR_500, end=True)
        return True
    except PeerGone:
        return False
