"""wsgi.input: a read-only byte stream pulled chunk by chunk from a source.

The source is a callable returning the next chunk of the body (``b""`` at its end). It
is called only when the application asks for more than is buffered, so at most one
chunk is held here: a large upload is never accumulated unless the application itself
calls ``read()`` without a size. The stream always ends at the end of the body (the
FastCGI STDIN stream, or CONTENT_LENGTH bytes in CGI mode): ``wsgi.input_terminated``.
"""
from __future__ import annotations


class InputStream:
    __slots__ = ("_next", "_buf", "_pos", "_eof")

    def __init__(self, next_chunk) -> None:
        self._next = next_chunk
        self._buf = b""
        self._pos = 0
        self._eof = False

    def _more(self) -> bool:
        """Replace the (consumed) buffer with the next chunk; False at the end."""
        if self._eof:
            return False
        chunk = self._next()
        if not chunk:
            self._eof = True
            return False
        self._buf = self._buf[self._pos:] + chunk if self._pos < len(self._buf) else chunk
        self._pos = 0
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._buf[self._pos:]]
            self._buf, self._pos = b"", 0
            while not self._eof:
                chunk = self._next()
                if not chunk:
                    self._eof = True
                else:
                    parts.append(chunk)
            return b"".join(parts)
        while len(self._buf) - self._pos < size and self._more():
            pass
        start = self._pos
        data = self._buf[start:start + size]
        self._pos = start + len(data)
        return data

    def readline(self, size: int | None = -1) -> bytes:
        limit = -1 if size is None or size < 0 else size
        scanned = 0
        while True:
            end = self._buf.find(b"\n", self._pos + scanned)
            avail = len(self._buf) - self._pos
            if end >= 0:
                n = end + 1 - self._pos
                break
            if 0 <= limit <= avail:
                n = limit
                break
            scanned = avail
            if not self._more():
                n = len(self._buf) - self._pos
                break
        if 0 <= limit < n:
            n = limit
        data = self._buf[self._pos:self._pos + n]
        self._pos += len(data)
        return data

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines, total = [], 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def drain(self) -> None:
        """Consume the rest of the body without keeping it."""
        self._buf, self._pos = b"", 0
        while self._more():
            self._buf, self._pos = b"", 0

    @property
    def finished(self) -> bool:
        return self._eof
