"""Property tests: whatever bytes arrive, the FastCGI layer raises ProtocolError or
nothing, and one failed connection never affects another."""
from __future__ import annotations

import types

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spawnd.fastcgi import protocol as p
from spawnd.fastcgi.protocol import (AbortRequest, ClientConnection, EndRequest,
                                     ProtocolError, Request, ServerConnection, StdinData,
                                     StdinEnd, Stderr, Stdout)

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# Sizes are drawn, contents are cheap fills: generating random bytes is what makes
# hypothesis slow, and the parser's interesting inputs are lengths (127/128...) and
# framing, which the mutations then corrupt byte by byte.
names = st.integers(0, 140).map(lambda n: b"N" * n)
values = st.integers(0, 300).map(lambda n: b"v" * n)
param_lists = st.lists(st.tuples(names, values), max_size=5)
chunks = st.integers(1, 60).map(lambda n: bytes([n]) * n)


@st.composite
def server_streams(draw):
    """A valid web-server -> application byte stream (several requests, management)."""
    client = ClientConnection()
    out = []
    for rid in draw(st.lists(st.integers(1, 4), min_size=1, max_size=3, unique=True)):
        role = draw(st.sampled_from([p.RESPONDER, p.RESPONDER, p.AUTHORIZER, p.FILTER]))
        out.append(client.begin_request(rid, role, draw(st.booleans()), draw(param_lists)))
        for chunk in draw(st.lists(chunks, max_size=3)):
            out.append(client.send_stdin(rid, chunk))
        if draw(st.booleans()):
            out.append(client.abort_request(rid))
        out.append(client.send_stdin(rid, b""))
    if draw(st.booleans()):
        out.append(client.get_values([b"FCGI_MAX_CONNS", b"X", b"FCGI_MPXS_CONNS"]))
    if draw(st.booleans()):
        out.append(p.encode_record(draw(st.integers(12, 255)), 0, b"?"))
    return b"".join(out)


@st.composite
def client_streams(draw):
    """A valid application -> web-server stream for request ids 1..3."""
    out = []
    for rid in (1, 2, 3):
        for chunk in draw(st.lists(chunks, max_size=3)):
            out.append(p.encode_record(draw(st.sampled_from([p.STDOUT, p.STDERR])), rid,
                                       chunk))
        out.append(p.encode_record(p.STDOUT, rid))
        out.append(p.encode_record(p.END_REQUEST, rid, bytes(4) + bytes([draw(
            st.integers(0, 3))]) + bytes(3)))
    out.append(p.encode_record(p.GET_VALUES_RESULT, 0, p.encode_pairs([(b"A", b"1")])))
    return b"".join(out)


@st.composite
def mutated(draw, streams):
    data = bytearray(draw(streams))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "set"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "insert" or not data:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 4))]
        elif op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        else:
            data[pos] = draw(st.integers(0, 255))
    return bytes(data)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if a < b]


def drive_server(data: bytes, cuts: list[int], early_end: bool, react: bool = True) -> list:
    """Feed a fresh ServerConnection like a runner would, ending requests as it goes
    (``react``: after each chunk's events; so with reactions the events depend on the
    chunking, as they do for a real runner). Returns the events."""
    server = ServerConnection(max_reqs=2, mpxs_conns=True, max_params_size=2000)
    events, live = [], set()
    for chunk in chunked(data, cuts) + [b""]:
        for event in server.receive_data(chunk):
            events.append(event)
            rid = getattr(event, "request_id", None)
            if isinstance(event, Request):
                live.add(rid)
            if react and rid in live and (early_end or isinstance(event, (StdinEnd, AbortRequest))):
                server.send_stdout(rid, b"Status: 200\r\n\r\nok")
                server.end_request(rid)
                live.discard(rid)
        server.data_to_send()
    assert server.active_requests == len(live)
    return events


def drive_client(data: bytes, cuts: list[int]) -> list:
    client = ClientConnection()
    for rid in (1, 2, 3):
        client.begin_request(rid)
    events = []
    for chunk in chunked(data, cuts) + [b""]:
        events += client.receive_data(chunk)
    return events


cut_lists = st.lists(st.integers(0, 10_000), max_size=6)


@FUZZ
@given(st.binary(max_size=300), cut_lists, st.booleans())
def test_random_bytes_only_raise_protocol_error(data, cuts, early_end):
    for drive in (lambda: drive_server(data, cuts, early_end),
                  lambda: drive_client(data, cuts)):
        try:
            drive()
        except ProtocolError:
            pass
    # and leave nothing behind: fresh connections parse valid streams as always
    assert drive_server(VALID_SERVER, cuts, early_end, react=False) == VALID_SERVER_EVENTS
    assert drive_client(VALID_CLIENT, cuts) == VALID_CLIENT_EVENTS


VALID_SERVER = (ClientConnection().begin_request(1, params=[(b"A", b"1"), (b"B" * 130, b"")])
                + p.encode_record(p.STDIN, 1, b"body") + p.encode_record(p.STDIN, 1))
VALID_SERVER_EVENTS = [Request(1, p.RESPONDER, False, ((b"A", b"1"), (b"B" * 130, b""))),
                       StdinData(1, b"body"), StdinEnd(1)]
VALID_CLIENT = (p.encode_record(p.STDOUT, 1, b"out") + p.encode_record(p.STDERR, 2, b"err")
                + p.encode_record(p.END_REQUEST, 1, bytes(8))
                + p.encode_record(p.END_REQUEST, 2, b"\0\0\0\x05\x03\0\0\0"))
VALID_CLIENT_EVENTS = [Stdout(1, b"out"), Stderr(2, b"err"), EndRequest(1, 0, 0),
                       EndRequest(2, 5, 3)]


@FUZZ
@given(mutated(server_streams()), cut_lists, st.booleans())
def test_mutated_server_streams(data, cuts, early_end):
    try:
        drive_server(data, cuts, early_end)
    except ProtocolError:
        pass
    # A fresh connection afterwards is unaffected by the failed one.
    assert drive_server(VALID_SERVER, cuts, early_end, react=False) == VALID_SERVER_EVENTS


@FUZZ
@given(mutated(client_streams()), cut_lists)
def test_mutated_client_streams(data, cuts):
    try:
        drive_client(data, cuts)
    except ProtocolError:
        pass
    assert drive_client(VALID_CLIENT, cuts) == VALID_CLIENT_EVENTS


@settings(FUZZ, max_examples=150)
@given(server_streams(), cut_lists, st.booleans())
def test_valid_streams_parse_the_same_however_chunked(data, cuts, early_end):
    drive_server(data, cuts, early_end)                # reacting runner: no error
    events = drive_server(data, cuts, early_end, react=False)
    assert events == drive_server(data, [], early_end, react=False)
    assert not events or isinstance(events[0], Request)


def test_no_module_level_mutable_state():
    mutable = (list, dict, set, bytearray)
    found = {name: type(value).__name__ for name, value in vars(p).items()
             if isinstance(value, mutable) and not name.startswith("__")}
    assert found == {}
    assert isinstance(p.TYPE_NAMES, types.MappingProxyType)
