"""wsgi.input: a read-only byte stream pulled chunk by chunk from a source.

The source is a callable returning the next chunk of the body (``b""`` at its end), as
bytes or as a read-only memoryview (FastCGI STDIN records arrive as views of the
received data, so a read that joins chunks copies each byte once). It
is called only when the application asks for more than is buffered, so at most one
chunk is held here: a large upload is never accumulated unless the application itself
asks for it in one call. A call that needs several chunks collects them in a list and
joins them once, so ``read(n)`` and ``readline()`` are linear in what they return. The stream always ends at the end of the body (the
FastCGI STDIN stream, or CONTENT_LENGTH bytes in CGI mode): ``wsgi.input_terminated``.
"""
from __future__ import annotations


class InputStream:
    __slots__ = ("_next", "_buf", "_pos", "_eof")

    def __init__(self, next_chunk) -> None:
        """``next_chunk``: the source; None for an empty body (the stream is at its end)."""
        self._next = next_chunk
        self._buf = b""
        self._pos = 0
        self._eof = next_chunk is None

    def _pull(self) -> bytes:
        """The next chunk from the source (b"" at the end, and from then on)."""
        if self._eof:
            return b""
        chunk = self._next()
        if not chunk:
            self._eof = True
        return chunk

    def read(self, size: int | None = -1) -> bytes:
        buf, pos = self._buf, self._pos
        if size is None or size < 0:
            parts = [buf[pos:]]
            self._buf, self._pos = b"", 0
            while chunk := self._pull():
                parts.append(chunk)
            return b"".join(parts)
        if len(buf) - pos >= size:          # the common case: served from the buffer
            self._pos = pos + size
            out = buf[pos:pos + size]
            return out if type(out) is bytes else out.tobytes()
        # Collect whole chunks and join once: linear in the size read.
        parts = [buf[pos:]]
        need = size - (len(buf) - pos)
        self._buf, self._pos = b"", 0
        while need > 0:
            chunk = self._pull()
            if not chunk:
                break
            if len(chunk) > need:
                parts.append(chunk[:need])
                self._buf, self._pos = chunk, need
                break
            parts.append(chunk)
            need -= len(chunk)
        return b"".join(parts)

    def readline(self, size: int | None = -1) -> bytes:
        limit = -1 if size is None or size < 0 else size
        buf, pos = self._buf, self._pos
        if type(buf) is not bytes:          # find() needs bytes
            buf, pos = buf[pos:].tobytes(), 0
            self._buf, self._pos = buf, 0
        parts = []
        while True:
            end = buf.find(b"\n", pos)
            stop = len(buf) if end < 0 else end + 1
            if limit >= 0 and stop - pos > limit:
                stop = pos + limit
            if not parts and (end >= 0 or stop - pos == limit):
                self._pos = stop            # the common case: one slice of the buffer
                return buf[pos:stop]
            parts.append(buf[pos:stop])
            if limit >= 0:
                limit -= stop - pos
            if stop < len(buf) or end >= 0 or limit == 0:
                self._buf, self._pos = buf, stop
                return b"".join(parts)
            buf, pos = bytes(self._pull()), 0
            if not buf:
                self._buf, self._pos = b"", 0
                return b"".join(parts)

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
        while self._pull():
            pass


# The wsgi.input of every request whose body is known to be empty when it starts: a
# stream at its end is never changed by reading it (each read stores the same empty
# buffer), so one object serves them all, in any thread.
EMPTY = InputStream(None)
