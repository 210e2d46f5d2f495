"""The WSGI application every server runs in bench_wsgi.py (module ``benchapp``).

    /hello   "hello" (5 bytes), the hello-world case
    /big     64 KiB of a fixed pattern
    /post    reads wsgi.input to its end (in 64 KiB reads) and answers the number of
             bytes read; with the query string "crc" also their CRC-32 (the benchmark's
             correctness check; not under load, where zlib's ~270 us per MiB would be
             the same for every server and hide the servers' own cost)

Each answer is a one-element list with a Content-Length, the common shape of a small
WSGI response. Anything else is a 404.
"""
import zlib

HELLO = b"hello"
BIG = (b"0123456789abcdef" * 4096)[:65536]
CHUNK = 1 << 16


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/hello":
        body = HELLO
    elif path == "/big":
        body = BIG
    elif path == "/post":
        read = environ["wsgi.input"].read
        want_crc = environ.get("QUERY_STRING") == "crc"
        size, crc = 0, 0
        while True:
            data = read(CHUNK)
            if not data:
                break
            size += len(data)
            if want_crc:
                crc = zlib.crc32(data, crc)
        body = b"%d %08x" % (size, crc) if want_crc else b"%d" % size
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain"),
                                         ("Content-Length", "10")])
        return [b"Not Found\n"]
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
