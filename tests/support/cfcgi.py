"""The C FastCGI test program (hello_fcgi.c), and a minimal FastCGI client to query it.

The client is written from the FastCGI 1.0 specification and deliberately shares no code
with spawnd.fastcgi: test support must not depend on the code it helps to test.
"""
from __future__ import annotations

import os
import re
import socket
import struct
import subprocess

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hello_fcgi.c")

# hello pid=123 n=4 method=GET query=a=1 body=0
RESPONSE = re.compile(rb"hello pid=(\d+) n=(\d+) method=(\S*) query=(\S*) body=(\d+)\n")


def build_hello_fcgi(dest_dir: str) -> str:
    """Compile hello_fcgi.c into dest_dir/hello_fcgi (mode 0755) and return its path."""
    out = os.path.join(dest_dir, "hello_fcgi")
    proc = subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", out, SOURCE, "-lfcgi"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building {SOURCE} failed:\n{proc.stderr}")
    os.chmod(out, 0o755)
    return out


# ---- a minimal FastCGI client (one request per connection) ------------------------------
_HEADER = struct.Struct(">BBHHBx")   # version, type, request id, content length, padding
_BEGIN, _END, _PARAMS, _STDIN, _STDOUT, _STDERR = 1, 3, 4, 5, 6, 7
_RESPONDER = 1


def _record(rtype: int, content: bytes = b"", request_id: int = 1) -> bytes:
    return _HEADER.pack(1, rtype, request_id, len(content), 0) + content


def _pair(name: bytes, value: bytes) -> bytes:
    def length(n: int) -> bytes:
        return bytes([n]) if n < 128 else struct.pack(">I", n | 0x80000000)
    return length(len(name)) + length(len(value)) + name + value


def _connect(address: str, timeout: float) -> socket.socket:
    """address: unix:PATH or tcp:HOST:PORT."""
    kind, _, rest = address.partition(":")
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = rest
    elif kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        target = (host, int(port))
    else:
        raise ValueError(f"address must be unix:PATH or tcp:HOST:PORT, not {address!r}")
    s.settimeout(timeout)
    try:
        s.connect(target)
    except BaseException:
        s.close()
        raise
    return s


def fcgi_request(address: str, params: dict[str, str], body: bytes = b"",
                 timeout: float = 10) -> tuple[bytes, bytes, int]:
    """Send one RESPONDER request; return (stdout bytes, stderr bytes, app status)."""
    pairs = b"".join(_pair(k.encode(), v.encode()) for k, v in params.items())
    msg = _record(_BEGIN, struct.pack(">HB5x", _RESPONDER, 0)) + _record(_PARAMS, pairs)
    msg += _record(_PARAMS)
    for i in range(0, len(body), 32768):
        msg += _record(_STDIN, body[i:i + 32768])
    msg += _record(_STDIN)
    out, err = bytearray(), bytearray()
    with _connect(address, timeout) as s:
        s.sendall(msg)
        f = s.makefile("rb")
        while True:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                raise ConnectionError(f"connection closed before END_REQUEST "
                                      f"(stdout so far: {bytes(out)[:200]!r})")
            _, rtype, _, length, padding = _HEADER.unpack(head)
            content = f.read(length + padding)[:length]
            if rtype == _STDOUT:
                out += content
            elif rtype == _STDERR:
                err += content
            elif rtype == _END:
                return bytes(out), bytes(err), struct.unpack(">I", content[:4])[0]


def fcgi_get(address: str, query: str = "", *, method: str = "GET", body: bytes = b"",
             params: dict[str, str] | None = None, timeout: float = 10) -> bytes:
    """A CGI-style request; returns the response body (after the header block).
    params are added to (or replace) the usual CGI ones."""
    all_params = {"REQUEST_METHOD": method, "QUERY_STRING": query, "SCRIPT_NAME": "/hello",
                  "SCRIPT_FILENAME": "/hello", "REQUEST_URI": "/hello?" + query,
                  "SERVER_PROTOCOL": "HTTP/1.1", "CONTENT_LENGTH": str(len(body)),
                  **(params or {})}
    out, err, _ = fcgi_request(address, all_params, body, timeout)
    head, sep, rest = out.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"no header block in FastCGI response {out[:200]!r} "
                             f"(stderr {err[:200]!r})")
    return rest
