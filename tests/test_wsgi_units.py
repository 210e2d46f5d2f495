"""Pure parts of spawnd-wsgi: environ building, the input stream, start_response rules."""
from __future__ import annotations

import io
import subprocess
import sys
import time

import pytest
from hypothesis import given, strategies as st

from spawnd.fastcgi.protocol import ProtocolError, decode_pairs, encode_pairs
from spawnd.wsgi.environ import (NotMounted, build_environ, decode_params, merge_params,
                                 normalise_prefix, split_path, wsgi_base)
from spawnd.wsgi.main import read_env_file, UsageError
from spawnd.wsgi.response import FILE_BLOCK, run_app
from spawnd.wsgi.server import normalise_ip, parse_allowed
from spawnd.wsgi.stream import EMPTY, InputStream


@pytest.mark.parametrize("script,path,prefix,expected", [
    ("/a/b", None, None, ("", "/a/b")),            # nginx stock params: app at root
    (None, None, None, ("", "/")),
    ("/app", "/x", None, ("/app", "/x")),
    ("/", "", None, ("", "/")),                    # SCRIPT_NAME is never "/"
    ("/app/", "", None, ("/app", "/")),
    ("/app", "x", None, ("/app", "/x")),           # PATH_INFO starts with "/"
    ("/pre/x/y", None, "/pre", ("/pre", "/x/y")),
    ("/pre", "/x", "/pre", ("/pre", "/x")),
    ("/pre", None, "/pre", ("/pre", "")),
    ("/anything", None, "", ("", "/anything")),
])
def test_split_path(script, path, prefix, expected):
    assert split_path(script, path, prefix) == expected


@pytest.mark.parametrize("script", ["/prefix", "/other", "/pre"])
def test_split_path_outside_the_prefix(script):
    with pytest.raises(NotMounted):
        split_path(script, None, "/pre/x")


def test_normalise_prefix():
    assert normalise_prefix("/app/") == "/app" and normalise_prefix("/") == ""
    with pytest.raises(ValueError):
        normalise_prefix("app")


def test_build_environ_merges_drops_and_decodes():
    env = build_environ([
        (b"SCRIPT_NAME", b"/caf\xc3\xa9"), (b"HTTP_X", b"1"), (b"HTTP_X", b"2"),
        (b"HTTP_COOKIE", b"a=1"), (b"HTTP_COOKIE", b"b=2"),
        (b"HTTP_CONTENT_TYPE", b"text/x"), (b"HTTP_CONTENT_LENGTH", b"5"),
        (b"CONTENT_LENGTH", b""), (b"SERVER_NAME", b"one"), (b"SERVER_NAME", b"two"),
        (b"HTTPS", b"on")])
    assert env["PATH_INFO"] == "/caf\xc3\xa9" and env["SCRIPT_NAME"] == ""
    assert env["HTTP_X"] == "1, 2" and env["HTTP_COOKIE"] == "a=1; b=2"
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env
    assert env["CONTENT_TYPE"] == "text/x" and "CONTENT_LENGTH" not in env
    assert env["SERVER_NAME"] == "two" and env["wsgi.url_scheme"] == "https"
    assert env["QUERY_STRING"] == "" and env["REQUEST_METHOD"] == "GET"


def test_request_scheme_wins_over_https():
    env = build_environ([(b"REQUEST_SCHEME", b"http"), (b"HTTPS", b"")])
    assert env["wsgi.url_scheme"] == "http"


@pytest.mark.parametrize("scheme,https,expected", [
    (b"HTTPS", b"", "https"), (b"Http", b"on", "http"), (b"ftp", b"on", "https"),
    (b"", b"1", "https"), (None, b"off", "http"),
])
def test_request_scheme_in_any_case_else_https(scheme, https, expected):
    params = [(b"HTTPS", https)] + ([(b"REQUEST_SCHEME", scheme)] if scheme is not None
                                    else [])
    assert build_environ(params)["wsgi.url_scheme"] == expected


def test_content_headers_dropped_each_alone_and_empty_content_values_removed():
    env = build_environ([(b"HTTP_CONTENT_LENGTH", b"5"), (b"CONTENT_TYPE", b""),
                         (b"CONTENT_LENGTH", b"5")])
    assert "HTTP_CONTENT_LENGTH" not in env and "CONTENT_TYPE" not in env
    assert env["CONTENT_LENGTH"] == "5"
    env = build_environ([(b"HTTP_CONTENT_TYPE", b"text/x"), (b"CONTENT_TYPE", b"a/b")])
    assert "HTTP_CONTENT_TYPE" not in env and env["CONTENT_TYPE"] == "a/b"


def test_required_names_kept_when_all_sent_and_defaulted_when_one_is_missing():
    sent = {"REQUEST_METHOD": "POST", "QUERY_STRING": "a=1", "SERVER_NAME": "h",
            "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1"}
    env = build_environ([(k.encode(), v.encode()) for k, v in sent.items()])
    assert {k: env[k] for k in sent} == sent
    env = build_environ([(k.encode(), v.encode()) for k, v in sent.items()
                         if k != "SERVER_PORT"])
    assert env["SERVER_PORT"] == "80" and env["REQUEST_METHOD"] == "POST"


@pytest.mark.parametrize("value,expected", [
    ("127.0.0.1, ::1", {"127.0.0.1", "::1"}),
    ("::ffff:10.0.0.1", {"10.0.0.1"}),
    ("fe80::1%eth0", {"fe80::1"}),
    ("", None), (" , ", None), (None, None),
])
def test_parse_allowed(value, expected):
    got = parse_allowed(value)
    assert (None if got is None else {str(a) for a in got}) == expected


def test_parse_allowed_rejects_names():
    with pytest.raises(ValueError, match="'localhost'"):
        parse_allowed("127.0.0.1,localhost")
    assert normalise_ip("::ffff:127.0.0.1") == normalise_ip("127.0.0.1")


def chunks_source(data: bytes, sizes, views: bool = False):
    """Chunks of data as a wsgi.input source; ``views``: as read-only memoryviews, the
    way FastCGI STDIN records reach the stream."""
    parts, pos = [], 0
    for size in sizes:
        if pos >= len(data):
            break
        parts.append(data[pos:pos + size])
        pos += size
    if pos < len(data):
        parts.append(data[pos:])
    if views:
        parts = [memoryview(p) for p in parts]
    it = iter(parts)
    return lambda: next(it, b"")


@given(st.binary(max_size=300).map(lambda b: b.replace(b"\0", b"\n")),
       st.lists(st.integers(1, 40), max_size=30),
       st.lists(st.tuples(st.sampled_from(["read", "readline", "readall"]),
                          st.integers(-1, 50)), max_size=20),
       st.booleans())
def test_input_stream_behaves_like_bytesio(data, sizes, ops, views):
    stream, ref = InputStream(chunks_source(data, sizes, views)), io.BytesIO(data)
    for op, n in ops:
        if op == "read":
            got, want = stream.read(n), ref.read(n)
        elif op == "readline":
            got, want = stream.readline(n), ref.readline(n)
        else:
            got, want = stream.read(), ref.read()
        assert type(got) is bytes and got == want
    assert list(stream) == list(ref)
    assert stream.read(10) == b"" and stream._eof


def test_readline_after_a_partial_read_of_a_view_chunk():
    """read(n) leaves the rest of a memoryview chunk buffered; readline() goes on from
    there (a multipart parser does exactly this)."""
    stream = InputStream(chunks_source(b"abcdefghij\nline2\nline3\n", [100], views=True))
    assert stream.read(3) == b"abc"
    assert [stream.readline() for _ in range(4)] == [b"defghij\n", b"line2\n", b"line3\n", b""]


def _big_source(total: int, line_end: bool = False):
    """total bytes in 32 KiB pieces (nginx's STDIN record size), ending in a newline."""
    piece = b"x" * 32768
    left = [total]

    def next_chunk() -> bytes:
        n = min(left[0], len(piece))
        left[0] -= n
        return piece[:n - 1] + b"\n" if line_end and n and not left[0] else piece[:n]
    return next_chunk


@pytest.mark.parametrize("op", ["read", "readline", "readline_limited"])
def test_input_stream_large_reads_are_linear(op):
    """32 MiB in one read(n), a 64 MiB line: the old buffer + chunk copying per record
    took 9 s and 5 s here; joining the chunks once takes a few hundredths."""
    total = (32 if op == "read" else 64) << 20
    stream = InputStream(_big_source(total, line_end=True))
    t0 = time.monotonic()
    if op == "read":
        data = stream.read(total - 5)
        rest = stream.read()
    elif op == "readline":
        data, rest = stream.readline(), stream.read()
    else:
        data, rest = stream.readline(total - 5), stream.read()
    took = time.monotonic() - t0
    assert len(data) + len(rest) == total and data.count(b"\n") + rest.count(b"\n") == 1
    assert len(data) == (total if op == "readline" else total - 5)
    assert took < 2.0, f"{op} of {total >> 20} MiB took {took:.1f} s"


def test_input_stream_readlines_hint():
    stream = InputStream(chunks_source(b"a\nbb\nccc\ndddd\n", [3]))
    assert stream.readlines(4) == [b"a\n", b"bb\n"]
    assert stream.readlines() == [b"ccc\n", b"dddd\n"]


def test_the_shared_empty_body_is_at_its_end_and_reading_it_changes_nothing():
    """spawnd-wsgi gives one EMPTY stream to every request that has no body."""
    assert EMPTY._eof
    state = (EMPTY._buf, EMPTY._pos, EMPTY._eof)
    assert [EMPTY.read(), EMPTY.read(5), EMPTY.read(0), EMPTY.readline(),
            EMPTY.readline(3), EMPTY.readlines(), list(EMPTY)] == [b"", b"", b"", b"",
                                                                  b"", [], []]
    EMPTY.drain()
    assert (EMPTY._buf, EMPTY._pos, EMPTY._eof) == state and EMPTY._eof


class ListSink:
    def __init__(self):
        self.calls = []

    def send(self, data, end=False):
        self.calls.append((data, end))


def test_list_result_is_one_send_with_the_end():
    sink = ListSink()
    def app(environ, start_response):
        start_response("200 OK", [("A", "b")])
        return [b"x", b"y"]
    assert run_app(app, {}, sink)
    assert sink.calls == [(b"Status: 200 OK\r\nA: b\r\n\r\nxy", True)]


def test_generator_result_coalesces_headers_with_first_chunk_and_closes():
    sink, closed = ListSink(), []
    class Result:
        def __iter__(self):
            yield b""
            yield b"one"
            yield b"two"
        def close(self):
            closed.append(True)
    def app(environ, start_response):
        start_response("204 No Content", [])
        return Result()
    assert run_app(app, {}, sink)
    assert sink.calls == [(b"Status: 204 No Content\r\n\r\none", False),
                          (b"two", False), (b"", True)]
    assert closed == [True]


def test_exc_info_replaces_unsent_headers_and_reraises_after_sending(capsys):
    sink = ListSink()
    def app(environ, start_response):
        start_response("200 OK", [])
        try:
            raise ValueError("x")
        except ValueError:
            start_response("500 Oops", [("X", "y")], sys.exc_info())
        return [b"err"]
    assert run_app(app, {}, sink)
    assert sink.calls[0][0].startswith(b"Status: 500 Oops\r\nX: y\r\n")

    sink = ListSink()
    def late(environ, start_response):
        write = start_response("200 OK", [])
        write(b"sent")
        try:
            raise ValueError("late")
        except ValueError:
            start_response("500 Oops", [], sys.exc_info())
        return []
    assert not run_app(late, {}, sink)                # broken off: for the caller to abort
    assert sink.calls == [(b"Status: 200 OK\r\n\r\nsent", False)]      # and never ended
    assert "ValueError: late" in capsys.readouterr().err


class Closing:
    """A result iterable that records its close() and can fail at any step."""

    def __init__(self, chunks, fail_at=None):
        self.chunks, self.fail_at, self.closed = chunks, fail_at, 0

    def __iter__(self):
        for i, chunk in enumerate(self.chunks):
            if i == self.fail_at:
                raise RuntimeError("failed in the iterable")
            yield chunk

    def close(self):
        self.closed += 1


def test_an_iterable_that_fails_is_closed_once_whatever_was_sent(capsys):
    for fail_at, expect_ok, expect in [
            (0, True, None),                        # nothing sent: a 500 instead
            (1, False, [(b"Status: 200 OK\r\n\r\na", False)])]:    # broken off
        sink, result = ListSink(), Closing([b"a", b"b"], fail_at)
        def app(environ, start_response):
            start_response("200 OK", [])
            return result
        assert run_app(app, {}, sink) is expect_ok
        assert result.closed == 1
        if expect is None:
            assert sink.calls[0][0].startswith(b"Status: 500 ") and sink.calls[-1][1]
        else:
            assert sink.calls == expect
        assert "failed in the iterable" in capsys.readouterr().err


def test_a_second_start_response_without_exc_info_is_an_error(capsys):
    sink = ListSink()
    def app(environ, start_response):
        start_response("200 OK", [])
        start_response("404 Not Found", [])
        return [b"body"]
    assert run_app(app, {}, sink)
    assert [c[1] for c in sink.calls] == [True]
    assert sink.calls[0][0].startswith(b"Status: 500 ")
    assert "second time without exc_info" in capsys.readouterr().err


def test_file_wrapper_reads_in_large_blocks_and_closes_the_file(tmp_path):
    data = bytes(range(256)) * 2600                # 665,600 bytes: 2 whole blocks + a part
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    f = open(path, "rb")
    sink = ListSink()
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](f, 4096)      # a small blksize is raised
    environ = wsgi_base(multithread=False, multiprocess=False, run_once=False)
    assert run_app(app, environ, sink)
    head = b"Status: 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n"
    assert [len(c[0]) for c in sink.calls] == [len(head) + FILE_BLOCK, FILE_BLOCK,
                                               len(data) - 2 * FILE_BLOCK, 0]
    assert b"".join(c[0] for c in sink.calls) == head + data and sink.calls[-1][1]
    assert f.closed


@pytest.mark.parametrize("status,headers,error", [
    ("200", [], "ValueError: invalid WSGI status"),
    ("OK", [], "ValueError: invalid WSGI status"),
    (b"200 OK", [], "ValueError: invalid WSGI status"),
    ("200 OK\r", [], "ValueError: invalid WSGI status"),
    ("200 O\nK", [("A", "b")], "ValueError: invalid WSGI status"),
    ("200 OK", [("A", "b"), ("X", "a\r\nY: b")], "ValueError: invalid characters"),
    ("200 OK", [("X", "a\r")], "ValueError: invalid characters"),
    ("200 OK", [("X", "\na")], "ValueError: invalid characters"),
    ("200 OK", [("X\n", "a")], "ValueError: invalid characters"),
    ("200 OK", [("\rX", "a")], "ValueError: invalid characters"),
    ("200 OK", [("X:Y", "a")], "ValueError: invalid characters"),
    ("200 OK", [("X", 1)], "TypeError: header 'X': 1 is not a pair of str"),
    ("200 OK", [(b"X", "a")], "TypeError: header b'X'"),
    ("200 OK", [("X", b"a")], "TypeError: header 'X'"),
    ("200 OK", [("X", "a", "b")], "TypeError: header ('X', 'a', 'b')"),
    ("200 OK", [("X",)], "TypeError: header ('X',)"),
    ("200 OK", None, "TypeError: invalid WSGI headers None"),
])
def test_bad_status_or_headers_become_500(status, headers, error, capsys):
    sink = ListSink()
    def app(environ, start_response):
        start_response(status, headers)
        return [b"body"]
    assert run_app(app, {}, sink)
    assert sink.calls[0][0].startswith(b"Status: 500 ")
    err = capsys.readouterr().err
    assert "Traceback" in err and error in err, err


@given(st.lists(st.tuples(st.text("ab:\r\n\u00e9\u20ac", max_size=6),
                          st.text("ab:\r\n\u00e9\u20ac", max_size=6)), max_size=4),
       st.text("ab\r\n\u00e9\u20ac", max_size=6))
def test_start_response_takes_exactly_the_headers_without_line_breaks(headers, reason):
    """The whole block's line ends are counted instead of each header tested: the
    outcome is the per-header rule's, whatever the characters."""
    status = "200 " + reason
    ok = not any(c in status for c in "\r\n") and all(
        ":" not in n and not any(c in n + v for c in "\r\n") for n, v in headers) \
        and all(ord(c) < 256 for c in status + "".join(n + v for n, v in headers))
    sink = ListSink()
    def app(environ, start_response):
        start_response(status, headers)
        return [b""]
    run_app(app, {}, sink, errors=io.StringIO())
    head = sink.calls[0][0]
    assert head.startswith(b"Status: 500 ") != ok
    if ok:
        expected = "".join(f"{n}: {v}\r\n" for n, v in headers)
        assert head == f"Status: {status}\r\n{expected}\r\n".encode("latin-1")


def test_env_file(tmp_path):
    f = tmp_path / "env"
    f.write_text("# comment\n\nA=1\nexport B = 'two words'\nC=\"x=y\"\n")
    assert read_env_file(str(f)) == {"A": "1", "B": "two words", "C": "x=y"}
    f.write_text("A=1\nnot a pair\n")
    with pytest.raises(UsageError, match=r"env:2: expected KEY=VALUE"):
        read_env_file(str(f))
    with pytest.raises(UsageError, match="cannot read env file"):
        read_env_file(str(tmp_path / "missing"))


def test_wsgi_base_has_every_pep3333_key():
    from spawnd.wsgi.environ import wsgi_base
    env = wsgi_base(multithread=True, multiprocess=False, run_once=True)
    assert {"wsgi.version", "wsgi.errors", "wsgi.multithread", "wsgi.multiprocess",
            "wsgi.run_once", "wsgi.url_scheme"} - set(env) == {"wsgi.url_scheme"}
    assert env["wsgi.multithread"] and not env["wsgi.multiprocess"] and env["wsgi.run_once"]
    assert env["wsgi.input_terminated"] is True and env["wsgi.version"] == (1, 0)


# decode_params is the one-pass PARAMS decoder of the runner's hot path: it must give
# exactly what the general path gives (decode_pairs, then merge_params), duplicates,
# 4-byte lengths and non-ASCII bytes included, and fail the same way.
_NAMES = st.sampled_from([b"HTTP_COOKIE", b"HTTP_ACCEPT", b"QUERY_STRING", b"X", b""]) \
    | st.binary(max_size=300)
_PAIRS = st.lists(st.tuples(_NAMES, st.binary(max_size=300)), max_size=12)


@given(_PAIRS)
def test_decode_params_equals_the_general_path(pairs):
    data = encode_pairs(pairs)
    assert decode_params(data) == merge_params(decode_pairs(data))


@given(_PAIRS, st.integers(min_value=1, max_value=40))
def test_decode_params_rejects_a_truncated_stream_like_decode_pairs(pairs, cut):
    data = encode_pairs(pairs + [(b"NAME", b"v" * 200)])[:-cut]
    with pytest.raises(ProtocolError) as mine:
        decode_params(data)
    with pytest.raises(ProtocolError) as general:
        decode_pairs(data)
    assert str(mine.value) == str(general.value)


def test_decode_params_merges_duplicates_as_the_environ_rules_say():
    data = encode_pairs([(b"HTTP_COOKIE", b"a=1"), (b"HTTP_COOKIE", b"b=2"),
                         (b"HTTP_ACCEPT", b"x"), (b"HTTP_ACCEPT", b"y"),
                         (b"DOCUMENT_ROOT", b"/a"), (b"DOCUMENT_ROOT", b"/b"),
                         (b"PATH_INFO", "/\u00e9".encode())])
    assert decode_params(data) == {"HTTP_COOKIE": "a=1; b=2", "HTTP_ACCEPT": "x, y",
                                   "DOCUMENT_ROOT": "/b", "PATH_INFO": "/\u00c3\u00a9"}


def test_the_accept_bound_interrupts_even_when_its_first_shot_came_too_early(tmp_path):
    """The timer that bounds accept4() repeats: a shot that fires while the thread is
    still in Python (waiting for the GIL, say) interrupts nothing, and the next one must.
    Here the first shot is spent on purpose before accept4() on an empty queue. Then
    the runner's ``ThreadTimer.accept``: EINTR on an empty queue, a non-blocking
    close-on-exec descriptor when one is queued, and the timer off afterwards."""
    code = f"""
import ctypes, errno, os, signal, socket, threading, time
from spawnd.wsgi.server import ACCEPT_BOUND, KICK, ThreadTimer, _accept4, _ignore
signal.signal(KICK, _ignore)
ls = socket.socket(socket.AF_UNIX)
ls.bind({str(tmp_path / "l.sock")!r})
ls.listen(1)
timer = ThreadTimer(KICK, threading.get_native_id(), ACCEPT_BOUND)
timer.start()
time.sleep(ACCEPT_BOUND * 1.5)          # the first shot lands here, not in accept4
t0 = time.monotonic()
fd = _accept4(ls.fileno(), None, None, 0)
err = ctypes.get_errno()
timer.cancel()
print(fd, errno.errorcode.get(err), round(time.monotonic() - t0, 3))
# the runner's own use: timer.accept() bounds one accept4 in the same way
fd, err = timer.accept(ls.fileno())
print(fd, errno.errorcode.get(err))
peer = socket.socket(socket.AF_UNIX)
peer.connect({str(tmp_path / "l.sock")!r})
fd, err = timer.accept(ls.fileno())
print(fd >= 0, err, os.get_blocking(fd), os.get_inheritable(fd))
shots = []                              # and cancels it: no shot comes afterwards
signal.signal(KICK, lambda *_: shots.append(1))
time.sleep(ACCEPT_BOUND * 3)
print(len(shots))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=10)
    assert out.returncode == 0, out.stderr
    first, empty, taken, quiet = out.stdout.splitlines()
    fd, err, took = first.split()
    assert (fd, err) == ("-1", "EINTR") and float(took) < 0.5, out.stdout
    assert empty == "-1 EINTR" and taken == "True 0 False False" and quiet == "0", out.stdout
