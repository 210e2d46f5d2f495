"""Byte-driven tests of the sans-IO FastCGI layer (spawnd.fastcgi.protocol).

Records in these tests are built by hand with ``struct`` (``rec`` below), not with the
library's own encoder, so a symmetric bug in encoder and parser cannot hide.
"""
from __future__ import annotations

import struct

import pytest

from spawnd.fastcgi import protocol as p
from spawnd.fastcgi.protocol import (
    AbortRequest, ClientConnection, EndRequest, GetValuesResult, ProtocolError, Request,
    ServerConnection, Stderr, StdinData, StdinEnd, Stdout, UnknownType)


# ---- hand-built wire bytes -----------------------------------------------------------
def rec(rtype: int, rid: int, content: bytes = b"", pad: int = 0, version: int = 1) -> bytes:
    return struct.pack(">BBHHBB", version, rtype, rid, len(content), pad, 0) + content \
        + b"\xee" * pad


def begin(rid: int = 1, role: int = p.RESPONDER, flags: int = 0) -> bytes:
    return rec(p.BEGIN_REQUEST, rid, struct.pack(">HB5x", role, flags))


def nv(name: bytes, value: bytes) -> bytes:
    def length(n: int) -> bytes:
        return bytes([n]) if n < 128 else struct.pack(">I", n | 0x80000000)
    return length(len(name)) + length(len(value)) + name + value


def end_body(app: int, status: int) -> bytes:
    return struct.pack(">IB3x", app, status)


def simple_request(rid: int = 1, flags: int = 0, body: bytes = b"",
                   params: bytes = nv(b"REQUEST_METHOD", b"GET")) -> bytes:
    out = begin(rid, flags=flags) + rec(p.PARAMS, rid, params) + rec(p.PARAMS, rid)
    if body:
        out += rec(p.STDIN, rid, body)
    return out + rec(p.STDIN, rid)


def records(data: bytes) -> list[tuple[int, int, bytes, int]]:
    """Parse records by hand: (type, id, content, padding), checking the framing."""
    out, i = [], 0
    while i < len(data):
        version, rtype, rid, clen, plen, reserved = struct.unpack_from(">BBHHBB", data, i)
        assert version == 1 and reserved == 0
        out.append((rtype, rid, data[i + 8:i + 8 + clen], plen))
        i += 8 + clen + plen
    assert i == len(data), "trailing partial record"
    return out


# ---- record layout -------------------------------------------------------------------
def test_record_header_layout_and_padding():
    assert p.encode_record(p.STDOUT, 0x1234, b"abc") == \
        b"\x01\x06\x12\x34\x00\x03\x05\x00abc\x00\x00\x00\x00\x00"
    assert p.encode_record(p.STDOUT, 1, b"12345678") == \
        b"\x01\x06\x00\x01\x00\x08\x00\x00" + b"12345678"
    assert p.encode_record(p.STDIN, 1) == b"\x01\x05\x00\x01\x00\x00\x00\x00"
    with pytest.raises(ValueError):
        p.encode_record(p.STDOUT, 1, b"x" * 65536)


def test_every_output_record_is_padded_to_8():
    server = ServerConnection()
    server.receive_data(simple_request())
    for size in (0, 1, 7, 8, 9, 65535, 65536, 200_000):
        out = server.send_stdout(1, b"y" * size)
        assert len(out) % 8 == 0
        assert sum(len(c) for _, _, c, _ in records(out)) == size
        assert all(len(c) + pad == ((len(c) + 7) & ~7) for _, _, c, pad in records(out))


def test_begin_request_bytes():
    client = ClientConnection()
    wire = client.begin_request(7, p.AUTHORIZER, keep_conn=True, params=[("A", b"b")])
    assert records(wire) == [
        (p.BEGIN_REQUEST, 7, b"\x00\x02\x01\x00\x00\x00\x00\x00", 0),
        (p.PARAMS, 7, b"\x01\x01Ab", 4),
        (p.PARAMS, 7, b"", 0)]
    assert client.send_stdin(7, b"") == rec(p.STDIN, 7)
    assert client.abort_request(7) == rec(p.ABORT_REQUEST, 7)


# ---- name-value pairs ----------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 127, 128, 129, 255, 256, 65535, 65536, 1 << 20])
def test_name_value_length_boundaries(n):
    name, value = b"N" * n, b"v" * (n // 2 + 1)
    encoded = p.encode_pairs([(name, value)])
    prefix = 1 if n < 128 else 4
    assert encoded[:prefix] == (bytes([n]) if n < 128 else struct.pack(">I", n | 1 << 31))
    assert encoded == nv(name, value)
    assert p.decode_pairs(encoded) == ((name, value),)


def test_name_value_str_is_latin1_and_order_and_duplicates_kept():
    pairs = [("X", "\xe9"), (b"X", b"2"), ("", "")]
    assert p.decode_pairs(p.encode_pairs(pairs)) == ((b"X", b"\xe9"), (b"X", b"2"),
                                                      (b"", b""))
    with pytest.raises(UnicodeEncodeError):
        p.encode_pairs([("X", "\u20ac")])


@pytest.mark.parametrize("data", [
    b"\x01",                          # no value length
    b"\x80\x00\x00",                  # 4-byte name length cut short
    b"\x01\x80\x00",                  # 4-byte value length cut short
    b"\x02\x01ab",                    # value runs past the end
    b"\x80\x00\x01\x00\x00abc",       # 256-byte name in a 5-byte stream
    nv(b"ok", b"1") + b"\x05",        # good pair, then a truncated one
])
def test_name_value_truncated(data):
    with pytest.raises(ProtocolError):
        p.decode_pairs(data)


# ---- server: the ordinary path -------------------------------------------------------
def nginx_request(body: bytes) -> tuple[bytes, list]:
    """What nginx sends: id 1, one PARAMS record, STDIN in 32 KiB records."""
    params = [(b"SCRIPT_FILENAME", b"/srv/x.php"), (b"QUERY_STRING", b"a=1"),
              (b"REQUEST_METHOD", b"POST"), (b"CONTENT_LENGTH", str(len(body)).encode()),
              (b"HTTP_X_LONG", b"L" * 300), (b"HTTP_HOST", b"localhost")]
    wire = begin(1, flags=p.KEEP_CONN) + rec(p.PARAMS, 1, b"".join(nv(*kv) for kv in params),
                                             pad=3)
    wire += rec(p.PARAMS, 1)
    chunks = [body[i:i + 32768] for i in range(0, len(body), 32768)]
    for chunk in chunks:
        wire += rec(p.STDIN, 1, chunk, pad=-len(chunk) & 7)
    wire += rec(p.STDIN, 1)
    events = [Request(1, p.RESPONDER, True, tuple(params))]
    events += [StdinData(1, chunk) for chunk in chunks] + [StdinEnd(1)]
    return wire, events


def test_nginx_request_split_at_every_byte_boundary():
    body = bytes(range(256)) * 129 + b"tail"        # 33028 bytes: two STDIN records
    wire, expected = nginx_request(body)
    assert ServerConnection().receive_data(wire) == expected
    for cut in range(1, len(wire)):               # b"" would mean EOF
        server = ServerConnection()
        events = server.receive_data(wire[:cut]) + server.receive_data(wire[cut:])
        assert events == expected, f"split at byte {cut}"
        assert server.receive_data(b"") == []


def test_nginx_request_fed_one_byte_at_a_time():
    wire, expected = nginx_request(b"q" * 40000)
    server = ServerConnection()
    events = []
    for i in range(len(wire)):
        events += server.receive_data(wire[i:i + 1])
    assert events == expected


def test_memoryview_and_bytearray_input():
    wire, expected = nginx_request(b"z" * 100)
    assert ServerConnection().receive_data(bytearray(wire)) == expected
    assert ServerConnection().receive_data(memoryview(wire)) == expected


def test_params_split_across_records_even_inside_length_bytes():
    stream = nv(b"A" * 200, b"B" * 300) + nv(b"C", b"D" * 1000) + nv(b"E", b"")
    # cut points inside the first pair's 4-byte name length, between the pairs, inside
    # the second pair's 4-byte value length
    cuts = [0, 2, 3, 7, 508, 510, 511, len(stream)]
    wire = begin(1)
    for a, b in zip(cuts, cuts[1:]):
        wire += rec(p.PARAMS, 1, stream[a:b])
    wire += rec(p.PARAMS, 1)
    (request,) = ServerConnection().receive_data(wire)
    assert request.params == ((b"A" * 200, b"B" * 300), (b"C", b"D" * 1000), (b"E", b""))


def test_request_event_only_at_empty_params_record():
    server = ServerConnection()
    assert server.receive_data(begin(1) + rec(p.PARAMS, 1, nv(b"A", b"1"))) == []
    assert server.receive_data(rec(p.PARAMS, 1)) == [
        Request(1, p.RESPONDER, False, ((b"A", b"1"),))]


def test_response_bytes_and_end_request():
    server = ServerConnection()
    server.receive_data(simple_request(3))
    out = server.send_stdout(3, b"Status: 200\r\n\r\nhi") + server.end_request(3, 5)
    assert records(out) == [(p.STDOUT, 3, b"Status: 200\r\n\r\nhi", 7),
                            (p.STDOUT, 3, b"", 0),
                            (p.END_REQUEST, 3, end_body(5, p.REQUEST_COMPLETE), 0)]
    assert server.send_stdout(3, b"") == b""
    assert server.active_requests == 0


def test_stderr_stream_closed_at_end_when_used():
    server = ServerConnection()
    server.receive_data(simple_request(1))
    out = server.send_stderr(1, b"oops") + server.end_request(1, 1)
    assert [(t, c) for t, _, c, _ in records(out)] == [
        (p.STDERR, b"oops"), (p.STDOUT, b""), (p.STDERR, b""),
        (p.END_REQUEST, end_body(1, 0))]


def test_large_stdout_split_at_65535():
    server = ServerConnection()
    server.receive_data(simple_request())
    data = bytes(range(256)) * 600                      # 153600 bytes
    recs = records(server.send_stdout(1, data))
    assert [len(c) for _, _, c, _ in recs] == [65535, 65535, 153600 - 2 * 65535]
    assert b"".join(c for _, _, c, _ in recs) == data


@pytest.mark.parametrize("size", [0, 1, 8, 65535, 65536, 153600])
@pytest.mark.parametrize("stderr", [False, True])
def test_end_request_frames_the_last_stdout_data_in_front(size, stderr):
    server = ServerConnection()
    server.receive_data(simple_request(2))
    if stderr:
        server.send_stderr(2, b"warn")
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    recs = records(server.end_request(2, 3, stdout=data))
    closing = [(p.STDOUT, b"")] + [(p.STDERR, b"")] * stderr \
        + [(p.END_REQUEST, end_body(3, p.REQUEST_COMPLETE))]
    n = len(recs) - len(closing)
    assert [(t, c) for t, _, c, _ in recs[n:]] == closing
    assert all(t == p.STDOUT and rid == 2 and 0 < len(c) <= 65535 and (len(c) + pad) % 8 == 0
               for t, rid, c, pad in recs[:n])
    assert b"".join(c for _, _, c, _ in recs[:n]) == data
    assert server.active_requests == 0
    with pytest.raises(ValueError):                    # over: stdout or not
        server.end_request(2, stdout=b"late")


def test_end_request_for_unknown_id_is_a_caller_error():
    server = ServerConnection()
    with pytest.raises(ValueError):
        server.end_request(1)
    server.receive_data(simple_request())
    server.end_request(1)
    with pytest.raises(ValueError):
        server.end_request(1)


# ---- keep-alive ----------------------------------------------------------------------
def test_keep_conn_on_allows_a_second_request_on_the_same_id():
    server = ServerConnection()
    for _ in range(3):
        events = server.receive_data(simple_request(1, flags=p.KEEP_CONN))
        assert events[0].keep_conn is True
        server.end_request(1)
        assert server.keep_conn is True


def test_keep_conn_off_turns_false_after_end_request():
    server = ServerConnection()
    (request, _) = server.receive_data(begin(1) + rec(p.PARAMS, 1) + rec(p.STDIN, 1, b"x"))
    assert request.keep_conn is False
    assert server.keep_conn is True                    # not ended yet
    server.end_request(1)
    assert server.keep_conn is False


def test_stdin_after_end_request_is_discarded_until_its_end():
    server = ServerConnection()
    events = server.receive_data(begin(1) + rec(p.PARAMS, 1) + rec(p.STDIN, 1, b"a"))
    assert events[-1] == StdinData(1, b"a")
    server.end_request(1)                              # app answered early (e.g. 413)
    assert not server.input_ended(1)                   # the client is still sending
    assert server.receive_data(rec(p.STDIN, 1, b"b" * 100)) == []
    assert server.receive_data(rec(p.STDIN, 1)) == []
    assert server.input_ended(1)
    with pytest.raises(ProtocolError):                 # now the id is free: strict again
        server.receive_data(rec(p.STDIN, 1, b"c"))


@pytest.mark.parametrize("whole", [True, False])
def test_input_ended_follows_the_stdin_stream(whole):
    """Whether the one-pass parse of a whole request or record-by-record framing."""
    server = ServerConnection()
    head = begin(1, flags=p.KEEP_CONN) + rec(p.PARAMS, 1, nv(b"A", b"b")) + rec(p.PARAMS, 1)
    assert server.input_ended(1)                       # never begun
    if whole:
        server.receive_data(head + rec(p.STDIN, 1))
    else:
        for byte in range(len(head)):
            server.receive_data(head[byte:byte + 1])
        assert not server.input_ended(1)
        server.receive_data(rec(p.STDIN, 1, b"x"))
        assert not server.input_ended(1)
        server.receive_data(rec(p.STDIN, 1))
    assert server.input_ended(1)                       # before end_request
    server.end_request(1)
    assert server.input_ended(1)                       # and after


def test_new_begin_request_reuses_a_discarding_id():
    server = ServerConnection()
    server.receive_data(begin(1, flags=p.KEEP_CONN) + rec(p.PARAMS, 1) + rec(p.STDIN, 1, b"a"))
    server.end_request(1)
    events = server.receive_data(simple_request(1, flags=p.KEEP_CONN))
    assert [type(e) for e in events] == [Request, StdinEnd]


# ---- management records --------------------------------------------------------------
def test_get_values_known_and_unknown_names():
    server = ServerConnection(max_conns=8, max_reqs=4, mpxs_conns=True)
    query = nv(b"FCGI_MAX_CONNS", b"") + nv(b"NOPE", b"") + nv(b"FCGI_MPXS_CONNS", b"") \
        + nv(b"FCGI_MAX_REQS", b"")
    assert server.receive_data(rec(p.GET_VALUES, 0, query)) == []
    ((rtype, rid, content, _),) = records(server.data_to_send())
    assert (rtype, rid) == (p.GET_VALUES_RESULT, 0)
    assert p.decode_pairs(content) == ((b"FCGI_MAX_CONNS", b"8"), (b"FCGI_MPXS_CONNS", b"1"),
                                       (b"FCGI_MAX_REQS", b"4"))
    assert server.data_to_send() == b""                # cleared


def test_get_values_only_unknown_names_gives_empty_result():
    server = ServerConnection()
    server.receive_data(rec(p.GET_VALUES, 0, nv(b"X", b"")))
    assert records(server.data_to_send()) == [(p.GET_VALUES_RESULT, 0, b"", 0)]


def test_get_values_round_trip_through_client():
    client, server = ClientConnection(), ServerConnection()
    server.receive_data(client.get_values([b"FCGI_MPXS_CONNS", "FCGI_MAX_CONNS", "Z"]))
    assert client.receive_data(server.data_to_send()) == [
        GetValuesResult({b"FCGI_MPXS_CONNS": b"0", b"FCGI_MAX_CONNS": b"1"})]


@pytest.mark.parametrize("rtype,rid", [(12, 0), (255, 0), (0, 0), (12, 5)])
def test_unknown_type_is_answered_not_an_error(rtype, rid):
    server = ServerConnection()
    assert server.receive_data(rec(rtype, rid, b"whatever")) == []
    assert records(server.data_to_send()) == [
        (p.UNKNOWN_TYPE, 0, bytes([rtype]) + b"\0" * 7, 0)]
    assert server.receive_data(simple_request())[0].request_id == 1   # still usable
    client = ClientConnection()
    assert client.receive_data(p.encode_record(p.UNKNOWN_TYPE, 0, bytes([rtype]) + bytes(7))
                               ) == [UnknownType(rtype)]


def test_unknown_role_filter_is_refused_and_its_streams_ignored():
    server = ServerConnection()
    assert server.receive_data(begin(2, role=p.FILTER, flags=p.KEEP_CONN)) == []
    assert records(server.data_to_send()) == [
        (p.END_REQUEST, 2, end_body(0, p.UNKNOWN_ROLE), 0)]
    assert server.active_requests == 0
    ignored = rec(p.PARAMS, 2, nv(b"A", b"b")) + rec(p.PARAMS, 2) + rec(p.STDIN, 2, b"in") \
        + rec(p.STDIN, 2) + rec(p.DATA, 2, b"file") + rec(p.DATA, 2)
    assert server.receive_data(ignored) == []
    assert server.keep_conn is True
    with pytest.raises(ProtocolError):               # its last stream ended: id is free
        server.receive_data(rec(p.DATA, 2, b"more"))


def test_unknown_role_without_keep_conn_closes_the_connection():
    server = ServerConnection(roles=(p.RESPONDER,))
    server.receive_data(begin(1, role=p.AUTHORIZER) + rec(p.PARAMS, 1) + rec(p.STDIN, 1))
    assert records(server.data_to_send())[0][2] == end_body(0, p.UNKNOWN_ROLE)
    assert server.keep_conn is False


def test_filter_role_cannot_be_enabled():
    with pytest.raises(ValueError):
        ServerConnection(roles=(p.RESPONDER, p.FILTER))


def test_cant_mpx_conn_for_a_second_concurrent_request():
    server = ServerConnection()
    assert [type(e) for e in server.receive_data(begin(1) + rec(p.PARAMS, 1))] == [Request]
    assert server.receive_data(simple_request(2, body=b"ignored")) == []
    assert records(server.data_to_send()) == [
        (p.END_REQUEST, 2, end_body(0, p.CANT_MPX_CONN), 0)]
    assert server.active_requests == 1
    assert server.receive_data(rec(p.STDIN, 1, b"mine")) == [StdinData(1, b"mine")]


def test_overloaded_beyond_max_reqs_when_multiplexing():
    server = ServerConnection(max_reqs=2, mpxs_conns=True)
    events = server.receive_data(simple_request(1) + simple_request(2) + simple_request(3))
    assert {e.request_id for e in events} == {1, 2}
    assert records(server.data_to_send()) == [
        (p.END_REQUEST, 3, end_body(0, p.OVERLOADED), 0)]
    server.end_request(1)
    assert server.receive_data(simple_request(3))[0] == Request(
        3, p.RESPONDER, False, ((b"REQUEST_METHOD", b"GET"),))


def test_multiplexed_requests_interleaved():
    server = ServerConnection(max_reqs=2, mpxs_conns=True)
    wire = begin(1) + begin(2) + rec(p.PARAMS, 2) + rec(p.PARAMS, 1) + rec(p.STDIN, 1, b"1") \
        + rec(p.STDIN, 2, b"2") + rec(p.STDIN, 2) + rec(p.STDIN, 1)
    assert server.receive_data(wire) == [
        Request(2, p.RESPONDER, False, ()), Request(1, p.RESPONDER, False, ()),
        StdinData(1, b"1"), StdinData(2, b"2"), StdinEnd(2), StdinEnd(1)]


def test_abort_request_of_an_active_request_is_an_event():
    server = ServerConnection()
    server.receive_data(begin(1) + rec(p.PARAMS, 1) + rec(p.STDIN, 1, b"part"))
    assert server.receive_data(rec(p.ABORT_REQUEST, 1)) == [AbortRequest(1)]
    out = server.end_request(1, 1)
    assert records(out)[-1] == (p.END_REQUEST, 1, end_body(1, 0), 0)


def test_abort_before_params_end_is_answered_automatically():
    server = ServerConnection()
    assert server.receive_data(begin(1) + rec(p.PARAMS, 1, nv(b"A", b"1"))
                               + rec(p.ABORT_REQUEST, 1)) == []
    assert records(server.data_to_send())[-1] == (
        p.END_REQUEST, 1, end_body(0, p.REQUEST_COMPLETE), 0)
    assert server.active_requests == 0
    assert server.receive_data(rec(p.PARAMS, 1) + rec(p.STDIN, 1)) == []   # discarded


def test_abort_crossing_end_request_is_ignored_but_never_begun_is_an_error():
    server = ServerConnection()
    server.receive_data(simple_request(1, flags=p.KEEP_CONN))
    server.end_request(1)
    assert server.receive_data(rec(p.ABORT_REQUEST, 1)) == []
    assert server.data_to_send() == b""
    with pytest.raises(ProtocolError):
        server.receive_data(rec(p.ABORT_REQUEST, 9))


# ---- server: malformed input ---------------------------------------------------------
BAD_SERVER_INPUT = {
    "wrong version": rec(p.BEGIN_REQUEST, 1, bytes(8), version=2),
    "version 0": b"\x00" + begin(1)[1:],
    "begin body 7 bytes": rec(p.BEGIN_REQUEST, 1, bytes([0, 1, 0, 0, 0, 0, 0])),
    "begin body 9 bytes": rec(p.BEGIN_REQUEST, 1, bytes([0, 1]) + bytes(7)),
    "begin on id 0": begin(0),
    "begin twice": begin(1) + begin(1),
    "begin twice after params": begin(1) + rec(p.PARAMS, 1) + begin(1),
    "params for unknown id": rec(p.PARAMS, 4, nv(b"A", b"b")),
    "params on id 0": rec(p.PARAMS, 0, nv(b"A", b"b")),
    "params after params ended": begin(1) + rec(p.PARAMS, 1) + rec(p.PARAMS, 1, nv(b"A", b"")),
    "empty params twice": begin(1) + rec(p.PARAMS, 1) + rec(p.PARAMS, 1),
    "stdin before params ended": begin(1) + rec(p.STDIN, 1, b"x"),
    "stdin after stdin ended": simple_request() + rec(p.STDIN, 1, b"x"),
    "stdin for unknown id": rec(p.STDIN, 3, b"x"),
    "stdin on id 0": rec(p.STDIN, 0, b""),
    "truncated name length": begin(1) + rec(p.PARAMS, 1, b"\x80\x00") + rec(p.PARAMS, 1),
    "missing value length": begin(1) + rec(p.PARAMS, 1, b"\x05") + rec(p.PARAMS, 1),
    "pair past stream end": begin(1) + rec(p.PARAMS, 1, b"\x03\x03abcde") + rec(p.PARAMS, 1),
    "data for a responder": simple_request() + rec(p.DATA, 1, b"x"),
    "abort on id 0": rec(p.ABORT_REQUEST, 0),
    "abort never begun": rec(p.ABORT_REQUEST, 2),
    "get_values on id 1": rec(p.GET_VALUES, 1, nv(b"FCGI_MAX_CONNS", b"")),
    "get_values malformed": rec(p.GET_VALUES, 0, b"\x0e"),
    "stdout to server": simple_request() + rec(p.STDOUT, 1, b"x"),
    "stderr to server": simple_request() + rec(p.STDERR, 1, b"x"),
    "end_request to server": simple_request() + rec(p.END_REQUEST, 1, bytes(8)),
    "get_values_result to server": rec(p.GET_VALUES_RESULT, 0),
    "unknown_type to server": rec(p.UNKNOWN_TYPE, 0, bytes(8)),
}


@pytest.mark.parametrize("wire", BAD_SERVER_INPUT.values(), ids=BAD_SERVER_INPUT.keys())
def test_server_rejects_malformed_input(wire):
    server = ServerConnection()
    with pytest.raises(ProtocolError):
        server.receive_data(wire)
    with pytest.raises(ProtocolError):               # the connection stays failed
        server.receive_data(simple_request(9))


@pytest.mark.parametrize("wire", BAD_SERVER_INPUT.values(), ids=BAD_SERVER_INPUT.keys())
def test_malformed_input_split_at_every_byte_boundary_fails_alike(wire):
    """Wherever the bytes are cut (the one-pass parse of a whole request, or record by
    record), the fault is found, and named the same."""
    with pytest.raises(ProtocolError) as whole:
        ServerConnection().receive_data(wire)
    for cut in range(1, len(wire)):
        server = ServerConnection()
        with pytest.raises(ProtocolError) as split:
            server.receive_data(wire[:cut])
            server.receive_data(wire[cut:])
        assert str(split.value) == str(whole.value), f"split at byte {cut}"


def test_params_size_limit_enforced_while_accumulating():
    server = ServerConnection(max_params_size=1000)
    server.receive_data(begin(1) + rec(p.PARAMS, 1, b"x" * 600))
    with pytest.raises(ProtocolError, match="exceed 1000"):
        server.receive_data(rec(p.PARAMS, 1, b"x" * 600))   # before any empty PARAMS
    ok = ServerConnection(max_params_size=1000)
    stream = nv(b"A", b"v" * 990)
    assert len(stream) <= 1000
    assert ok.receive_data(begin(1) + rec(p.PARAMS, 1, stream) + rec(p.PARAMS, 1))


def test_eof_between_records_is_fine_inside_a_record_is_not():
    server = ServerConnection()
    server.receive_data(simple_request())
    assert server.receive_data(b"") == []
    assert server.receive_data(b"") == []
    with pytest.raises(ProtocolError):
        server.receive_data(b"more")
    for partial in (b"\x01\x05", begin(1)[:-1]):
        broken = ServerConnection()
        assert broken.receive_data(partial) == []
        with pytest.raises(ProtocolError, match="inside a record"):
            broken.receive_data(b"")


def test_padding_and_reserved_bytes_are_ignored():
    wire = rec(p.BEGIN_REQUEST, 1, struct.pack(">HB5s", 1, 0, b"RSRVD"), pad=255)
    wire += rec(p.PARAMS, 1, nv(b"A", b"b"), pad=1) + rec(p.PARAMS, 1, pad=8)
    assert ServerConnection().receive_data(wire) == [
        Request(1, p.RESPONDER, False, ((b"A", b"b"),))]


# ---- client side ---------------------------------------------------------------------
def test_client_parses_a_response():
    client = ClientConnection()
    client.begin_request(1)
    wire = rec(p.STDERR, 1, b"warn") + rec(p.STDOUT, 1, b"Status: 404\r\n\r\n", pad=1) \
        + rec(p.STDOUT, 1, b"body") + rec(p.STDOUT, 1) + rec(p.STDERR, 1) \
        + rec(p.END_REQUEST, 1, end_body(7, 0))
    assert client.receive_data(wire) == [
        Stderr(1, b"warn"), Stdout(1, b"Status: 404\r\n\r\n"), Stdout(1, b"body"),
        EndRequest(1, 7, 0)]
    assert client.active_requests == frozenset()
    assert client.receive_data(b"") == []


def test_client_end_request_without_closing_stdout_is_tolerated():
    client = ClientConnection()
    client.begin_request(2)
    assert client.receive_data(rec(p.END_REQUEST, 2, end_body(0, p.UNKNOWN_ROLE))) == [
        EndRequest(2, 0, p.UNKNOWN_ROLE)]


def test_client_begin_request_checks_ids():
    client = ClientConnection()
    client.begin_request(1)
    with pytest.raises(ValueError):
        client.begin_request(1)
    for bad in (0, 65536):
        with pytest.raises(ValueError):
            client.begin_request(bad)


def _client_with(*ids):
    client = ClientConnection()
    for rid in ids:
        client.begin_request(rid)
    return client


BAD_CLIENT_INPUT = {
    "wrong version": rec(p.STDOUT, 1, b"x", version=0),
    "stdout for unknown id": rec(p.STDOUT, 2, b"x"),
    "stdout on id 0": rec(p.STDOUT, 0, b"x"),
    "stdout after end": rec(p.STDOUT, 1) + rec(p.STDOUT, 1, b"x"),
    "stderr after end": rec(p.STDERR, 1) + rec(p.STDERR, 1, b"x"),
    "end_request 7 bytes": rec(p.END_REQUEST, 1, bytes(7)),
    "end_request 9 bytes": rec(p.END_REQUEST, 1, bytes(9)),
    "end_request twice": rec(p.END_REQUEST, 1, bytes(8)) * 2,
    "end_request for unknown id": rec(p.END_REQUEST, 3, bytes(8)),
    "stdout after end_request": rec(p.END_REQUEST, 1, bytes(8)) + rec(p.STDOUT, 1, b"x"),
    "get_values_result on id 1": rec(p.GET_VALUES_RESULT, 1),
    "get_values_result malformed": rec(p.GET_VALUES_RESULT, 0, b"\x80"),
    "unknown_type on id 1": rec(p.UNKNOWN_TYPE, 1, bytes(8)),
    "unknown_type body 1 byte": rec(p.UNKNOWN_TYPE, 0, b"\x0c"),
    "begin_request to client": begin(1),
    "stdin to client": rec(p.STDIN, 1, b"x"),
    "params to client": rec(p.PARAMS, 1),
    "get_values to client": rec(p.GET_VALUES, 0),
    "abort to client": rec(p.ABORT_REQUEST, 1),
    "unknown type from app": rec(20, 1, b""),
}


@pytest.mark.parametrize("wire", BAD_CLIENT_INPUT.values(), ids=BAD_CLIENT_INPUT.keys())
def test_client_rejects_malformed_input(wire):
    client = _client_with(1)
    with pytest.raises(ProtocolError):
        client.receive_data(wire)
    with pytest.raises(ProtocolError):
        client.receive_data(b"")


def test_client_eof_inside_record():
    client = _client_with(1)
    assert client.receive_data(rec(p.STDOUT, 1, b"abc")[:5]) == []
    with pytest.raises(ProtocolError):
        client.receive_data(b"")


# ---- round trips through both classes ------------------------------------------------
def test_round_trip_large_request_and_response():
    client, server = ClientConnection(), ServerConnection(max_params_size=1 << 21)
    params = [("BIG", "p" * 100_000), (b"EMPTY", b""), ("QUERY_STRING", "x=1&y=\xff")]
    body = bytes(range(256)) * 1000
    wire = client.begin_request(1, keep_conn=True, params=params) + \
        client.send_stdin(1, body) + client.send_stdin(1, b"")
    events = server.receive_data(wire)
    request = events[0]
    assert request == Request(1, p.RESPONDER, True, tuple(
        (k.encode("latin-1") if isinstance(k, str) else k,
         v.encode("latin-1") if isinstance(v, str) else v) for k, v in params))
    assert b"".join(e.data for e in events if isinstance(e, StdinData)) == body
    assert events[-1] == StdinEnd(1)
    answer = b"Content-Type: a/b\r\n\r\n" + body
    out = server.send_stdout(1, answer) + server.send_stderr(1, b"log") + \
        server.end_request(1, 3)
    back = client.receive_data(out)
    assert b"".join(e.data for e in back if isinstance(e, Stdout)) == answer
    assert [e for e in back if isinstance(e, Stderr)] == [Stderr(1, b"log")]
    assert back[-1] == EndRequest(1, 3, p.REQUEST_COMPLETE)
    assert server.keep_conn and client.active_requests == frozenset()


def test_round_trip_refusal_reaches_client():
    client, server = ClientConnection(), ServerConnection()
    server.receive_data(client.begin_request(1, role=p.FILTER) + client.send_stdin(1, b""))
    assert client.receive_data(server.data_to_send()) == [EndRequest(1, 0, p.UNKNOWN_ROLE)]


def test_instances_share_no_state():
    a, b = ServerConnection(), ServerConnection()
    a.receive_data(begin(1))
    assert b.receive_data(simple_request(1))[0].request_id == 1
    with pytest.raises(ProtocolError):
        a.receive_data(begin(1))
    assert b.active_requests == 1


def test_stdin_within_one_piece_is_a_view_of_it_and_split_stdin_is_joined_once():
    """A body is not copied on its way through the parser: a STDIN record that arrives
    whole is a read-only view of the bytes that carried it; one split across pieces
    is joined (then it is a view of that one joined copy)."""
    server = ServerConnection()
    begin = rec(p.BEGIN_REQUEST, 1, struct.pack(">HB5x", p.RESPONDER, 0)) \
        + rec(p.PARAMS, 1, p.encode_pairs([("A", "1")])) + rec(p.PARAMS, 1)
    body = bytes(range(256)) * 128             # 32 KiB, like one of nginx's records
    wire = begin + rec(p.STDIN, 1, body, pad=3)
    events = server.receive_data(wire)
    data = events[-1].data
    assert isinstance(data, memoryview) and data.readonly and data.obj is wire
    assert data == body
    cut = len(wire) - 1000                     # now the record arrives in two pieces
    server = ServerConnection()
    first = server.receive_data(wire[:cut])
    assert [type(e) for e in first] == [Request]
    [ev] = server.receive_data(wire[cut:])
    assert ev.data == body and ev.data.obj is not wire and len(ev.data.obj) == len(body) + 8 + 3
