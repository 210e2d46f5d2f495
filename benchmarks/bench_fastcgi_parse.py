"""Micro-benchmark: cost of the pure-Python FastCGI layer per request.

Parses the bytes nginx sends for a typical GET (BEGIN_REQUEST, one PARAMS record with the
stock fastcgi_params plus browser headers, the empty PARAMS and STDIN records) with
``ServerConnection`` and frames a small response (``send_stdout`` + ``end_request``).
This is the protocol's share of the runner's per-request cost: no sockets, no WSGI.

    python benchmarks/bench_fastcgi_parse.py [--seconds S]

Also reports a POST with a 100 KiB body in 32 KiB STDIN records (as nginx sends it) and
the request direction alone (``ClientConnection.begin_request``).
"""
from __future__ import annotations

import argparse
import time

from spawnd.fastcgi.protocol import ClientConnection, ServerConnection, StdinEnd

NGINX_PARAMS = [
    ("QUERY_STRING", "page=2&sort=name"),
    ("REQUEST_METHOD", "GET"),
    ("CONTENT_TYPE", ""),
    ("CONTENT_LENGTH", ""),
    ("SCRIPT_NAME", "/app"),
    ("REQUEST_URI", "/app/items/42?page=2&sort=name"),
    ("DOCUMENT_URI", "/app/items/42"),
    ("DOCUMENT_ROOT", "/var/www/html"),
    ("SERVER_PROTOCOL", "HTTP/1.1"),
    ("REQUEST_SCHEME", "http"),
    ("GATEWAY_INTERFACE", "CGI/1.1"),
    ("SERVER_SOFTWARE", "nginx/1.22.1"),
    ("REMOTE_ADDR", "127.0.0.1"),
    ("REMOTE_PORT", "51234"),
    ("SERVER_ADDR", "127.0.0.1"),
    ("SERVER_PORT", "8080"),
    ("SERVER_NAME", "localhost"),
    ("REDIRECT_STATUS", "200"),
    ("PATH_INFO", "/items/42"),
    ("HTTP_HOST", "localhost:8080"),
    ("HTTP_USER_AGENT", "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 "
                        "Firefox/120.0"),
    ("HTTP_ACCEPT", "text/html,application/xhtml+xml,application/xml;q=0.9,"
                    "image/avif,image/webp,*/*;q=0.8"),
    ("HTTP_ACCEPT_LANGUAGE", "en-US,en;q=0.5"),
    ("HTTP_ACCEPT_ENCODING", "gzip, deflate, br"),
    ("HTTP_CONNECTION", "keep-alive"),
    ("HTTP_COOKIE", "session=0123456789abcdef0123456789abcdef; theme=dark"),
    ("HTTP_UPGRADE_INSECURE_REQUESTS", "1"),
]
RESPONSE = (b"Status: 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
            b"Content-Length: 13\r\n\r\nHello, World!")


def nginx_bytes(body: bytes = b"") -> bytes:
    client = ClientConnection()
    params = list(NGINX_PARAMS)
    if body:
        params[1] = ("REQUEST_METHOD", "POST")
        params[3] = ("CONTENT_LENGTH", str(len(body)))
    wire = [client.begin_request(1, keep_conn=True, params=params)]
    for start in range(0, len(body), 32768):
        wire.append(client.send_stdin(1, body[start:start + 32768]))
    wire.append(client.send_stdin(1, b""))
    return b"".join(wire)


def serve_one(conn: ServerConnection, wire: bytes) -> bytes:
    events = conn.receive_data(wire)
    assert isinstance(events[-1], StdinEnd), events
    rid = events[0].request_id
    return conn.send_stdout(rid, RESPONSE) + conn.end_request(rid)


def rate(fn, seconds: float) -> float:
    """Calls per second of fn(), over about ``seconds``."""
    n, batch, start = 0, 100, time.perf_counter()
    while True:
        for _ in range(batch):
            fn()
        n += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    get = nginx_bytes()
    post = nginx_bytes(b"x" * 102400)
    keep = ServerConnection()
    print(f"GET request: {len(get)} bytes on the wire, {len(NGINX_PARAMS)} params")
    results = {
        "GET, new connection each request": lambda: serve_one(ServerConnection(), get),
        "GET, keep-alive connection": lambda: serve_one(keep, get),
        "POST 100 KiB body, new connection": lambda: serve_one(ServerConnection(), post),
        "client begin_request (build only)": lambda: ClientConnection().begin_request(
            1, params=NGINX_PARAMS),
    }
    for name, fn in results.items():
        per_s = rate(fn, args.seconds)
        print(f"{name:40s} {per_s:10,.0f} req/s  {1e6 / per_s:6.1f} us/req")


if __name__ == "__main__":
    main()
