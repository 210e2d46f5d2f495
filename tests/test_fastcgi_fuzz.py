"""Property tests: whatever bytes arrive, the FastCGI layer raises ProtocolError or
nothing, and one failed connection never affects another."""
from __future__ import annotations

import types

from hypothesis import HealthCheck, example, given, settings
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
    # A request whose PARAMS never ended (the stream stopped inside them) is active
    # without the application having heard of it.
    unheard = sum(1 for req in server._reqs.values() if req.phase == p._PARAMS)
    assert server.active_requests == len(live) + unheard
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
# found by the fuzzer: the stream ends inside a request's PARAMS (a record of an unknown
# type swallows the rest), so a request is active that the application never heard of
@example(p.encode_record(p.BEGIN_REQUEST, 1, b"\0\1" + bytes(6))
         + p.encode_record(0, 0, bytes(40)), [], False)
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


class RecordByRecord(ServerConnection):
    """The reference: ServerConnection without its one-pass parse of a whole request."""

    def _whole_request(self, data, events):
        return None


class Counting(ServerConnection):
    """ServerConnection as it is, counting the requests its one-pass parse took (it
    raises only after taking one: from framing the rest of the data, or decoding)."""
    taken = 0

    def _whole_request(self, data, events):
        try:
            records = super()._whole_request(data, events)
        except ProtocolError:
            self.taken += 1
            raise
        self.taken += records is not None
        return records


def trace(server: ServerConnection, data: bytes, cuts: list[int], early_end: bool) -> list:
    """Everything the application side can observe, chunk by chunk: events, automatic
    replies, the error (message), open requests, keep_conn."""
    seen, live = [], set()
    for chunk in chunked(data, cuts) + [b""]:
        try:
            events = server.receive_data(chunk)
        except ProtocolError as exc:
            seen.append(("error", str(exc), server.active_requests, server.keep_conn))
            return seen
        for event in events:
            rid = getattr(event, "request_id", None)
            if isinstance(event, Request):
                live.add(rid)
            if rid in live and (early_end or isinstance(event, (StdinEnd, AbortRequest))):
                seen.append(server.end_request(rid))
                live.discard(rid)
        seen.append((events, server.data_to_send(), server.active_requests,
                     server.keep_conn))
    return seen


def same_as_record_by_record(data: bytes, cuts: list[int], early_end: bool) -> int:
    """Asserts the one-pass parse changes nothing observable; returns how often it ran."""
    options = dict(max_reqs=2, mpxs_conns=True, max_params_size=2000)
    fast = Counting(**options)
    assert trace(fast, data, cuts, early_end) == \
        trace(RecordByRecord(**options), data, cuts, early_end)
    return fast.taken


@st.composite
def whole_requests(draw):
    """A request as the one-pass parse looks for it (BEGIN_REQUEST, PARAMS split into
    records at drawn points, the empty PARAMS record, STDIN), with a few header and
    BEGIN_REQUEST body bytes set to drawn values, so most faults are in the part that
    parse reads. Returns the bytes of the records."""
    rid = draw(st.integers(0, 3))                 # (0: not a request id)
    body = p.encode_pairs(draw(st.lists(st.tuples(names, st.integers(0, 900).map(
        lambda n: b"v" * n)), max_size=4)))      # near and over max_params_size (2000)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(body)), max_size=3))))
    pieces = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)]) if a < b]
    role = draw(st.sampled_from([p.RESPONDER, p.AUTHORIZER, p.FILTER, 9]))
    records = [p.encode_record(p.BEGIN_REQUEST, rid, bytes([0, role, draw(
        st.integers(0, 3))]) + bytes(5))]
    records += [p.encode_record(p.PARAMS, rid, piece) for piece in pieces]
    records.append(p.encode_record(p.PARAMS, rid))
    records += [p.encode_record(p.STDIN, rid, c) for c in draw(st.lists(chunks, max_size=2))]
    records.append(p.encode_record(p.STDIN, rid))
    data = bytearray(b"".join(records))
    starts = [0]
    for record in records[:-1]:
        starts.append(starts[-1] + len(record))
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(starts[:4])) + draw(st.integers(0, 15))
        if where < len(data):
            data[where] = draw(st.sampled_from([0, 1, 2, 4, 5, 8, 255, data[where] ^ 1]))
    return bytes(data)


@FUZZ
@given(st.one_of(server_streams(), mutated(server_streams())), cut_lists, st.booleans())
def test_one_pass_parse_of_a_whole_request_is_record_by_record(data, cuts, early_end):
    same_as_record_by_record(data, cuts, early_end)


@FUZZ
@given(st.lists(whole_requests(), min_size=1, max_size=3), st.booleans(), st.booleans())
def test_one_pass_parse_of_faulty_requests_is_record_by_record(requests, early_end, split):
    """Each request in a piece of its own, as a web server writes it (``split``: the
    last one in two), with faults where the one-pass parse looks."""
    data = b"".join(requests)
    cuts = [sum(map(len, requests[:i])) for i in range(1, len(requests))]
    if split:
        cuts.append(len(data) - len(requests[-1]) // 2)
    same_as_record_by_record(data, cuts, early_end)


def test_one_pass_parse_takes_what_nginx_sends():
    """The differential test above proves something only if the one-pass parse runs:
    it takes nginx's request (one PARAMS record) and a client's several PARAMS records,
    on a new connection and on a kept one, and leaves the STDIN records to the framer."""
    client = ClientConnection()
    big = [(b"HTTP_X_%d" % i, b"v" * 300) for i in range(300)]     # > one record
    first = client.begin_request(1, keep_conn=True, params=[(b"A", b"1")])
    second = (client.begin_request(2, keep_conn=True, params=big)
              + p.encode_record(p.STDIN, 2, b"body") + p.encode_record(p.STDIN, 2))
    assert len(second) > p.MAX_CONTENT + 100      # two PARAMS records
    for early_end in (False, True):
        assert same_as_record_by_record(first + p.encode_record(p.STDIN, 1), [],
                                        early_end) == 1
    server = Counting(max_params_size=1 << 20)
    assert server.receive_data(first + p.encode_record(p.STDIN, 1)) == [
        Request(1, p.RESPONDER, True, ((b"A", b"1"),)), StdinEnd(1)]
    server.end_request(1)
    assert server.receive_data(second) == [Request(2, p.RESPONDER, True, tuple(big)),
                                           StdinData(2, b"body"), StdinEnd(2)]
    assert server.taken == 2
    # a record's padding is part of it: the end of the PARAMS stream is not there yet
    padded = (ClientConnection().begin_request(1, params=[(b"A", b"1")])[:-8]
              + p._HEADER.pack(1, p.PARAMS, 1, 0, 8) + bytes(8) + p.encode_record(p.STDIN, 1))
    assert same_as_record_by_record(padded, [len(padded) - 12], False) == 0
    # an empty STDIN record with padding: the padding is consumed with it, or, when it
    # has not all come, the record is left to the framer
    padded = (ClientConnection().begin_request(1, params=[(b"A", b"1")])
              + p._HEADER.pack(1, p.STDIN, 1, 0, 8) + bytes(8)
              + ClientConnection().get_values([b"FCGI_MAX_REQS"]))
    for cut in ([], [len(padded) - 20]):
        assert same_as_record_by_record(padded, cut, False) == 1
    # BEGIN_REQUEST with padding (no web server sends it): record by record; a
    # request with no PARAMS at all (the empty PARAMS record comes first): taken
    begin = p._HEADER.pack(1, p.BEGIN_REQUEST, 1, 8, 8) + b"\0\1" + bytes(14)
    assert same_as_record_by_record(begin + p.encode_record(p.PARAMS, 1)
                                    + p.encode_record(p.STDIN, 1), [], False) == 0
    assert same_as_record_by_record(ClientConnection().begin_request(1, params=[])
                                    + p.encode_record(p.STDIN, 1), [], False) == 1
    # the empty STDIN record of another request, or of another version: not consumed
    for header in (p._HEADER.pack(1, p.STDIN, 2, 0, 0), p._HEADER.pack(2, p.STDIN, 1, 0, 0)):
        assert same_as_record_by_record(ClientConnection().begin_request(
            1, params=[(b"A", b"1")]) + header, [], False) == 1
    # not taken: a second request while one runs (refused: CANT_MPX_CONN), a request
    # not all there yet, a role not served (refused: UNKNOWN_ROLE)
    assert server.receive_data(client.begin_request(3, params=[(b"B", b"2")])) == []
    reply = server.data_to_send()
    assert (reply[1], reply[12], server.taken) == (p.END_REQUEST, p.CANT_MPX_CONN, 2)
    server.end_request(2)
    server.receive_data(p.encode_record(p.STDIN, 3))        # the refused one's end
    assert server.receive_data(client.begin_request(4, params=[(b"C", b"3")])[:-1]) == []
    assert server.taken == 2
    refused = Counting(roles=(p.RESPONDER,))
    refused.receive_data(ClientConnection().begin_request(1, p.AUTHORIZER))
    assert refused.taken == 0 and refused.data_to_send().startswith(b"\x01\x03")


def test_no_module_level_mutable_state():
    mutable = (list, dict, set, bytearray)
    found = {name: type(value).__name__ for name, value in vars(p).items()
             if isinstance(value, mutable) and not name.startswith("__")}
    assert found == {}
    assert isinstance(p.TYPE_NAMES, types.MappingProxyType)
