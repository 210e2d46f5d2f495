"""FastCGI 1.0 as a sans-IO state machine, for both ends of a connection.

Bytes go in with ``receive_data(data) -> list[Event]`` (``b""`` means the peer closed);
bytes come out of the ``send_*``/``end_request``/``begin_request`` methods and, for
replies the connection produces by itself, of ``data_to_send()``. No sockets, no threads,
no clocks. Every violation of the protocol raises ``ProtocolError`` (one type) and the
connection is then unusable: the caller closes it. A connection object is not
thread-safe; use one per transport connection (or a lock around it).

Both ends share one record framer (``_Framer``) and one name-value codec
(``encode_pairs`` / ``decode_pairs``).

Typical application loop (one connection)::

    conn = ServerConnection()
    while True:
        data = sock.recv(65536)
        for event in conn.receive_data(data):       # ProtocolError -> close
            ...  # Request, StdinData, StdinEnd, AbortRequest
        sock.sendall(conn.data_to_send())            # automatic replies, often b""
        # answering: sock.sendall(conn.end_request(rid, stdout=body)), or in parts:
        # conn.send_stdout(rid, part) ... conn.end_request(rid)
        if not data or (not conn.keep_conn and not conn.active_requests):
            break

Decisions the FastCGI 1.0 specification leaves open, made here once:

* Events are produced per *complete* record, so the events never depend on how the input
  was chunked. Partial records wait in a buffer of at most one record (8 + 65535 + 255
  bytes) plus whatever the caller hands over at once.
* The usual start of a request (BEGIN_REQUEST, its PARAMS, the empty PARAMS record and,
  for a request without a body, the empty STDIN record, received at once on a
  connection with no request in progress) is parsed in one pass instead of record by
  record; what comes out is the same.
* A stream is the concatenation of its records: PARAMS are joined and parsed only at the
  empty PARAMS record (a pair may be split anywhere, even inside its length bytes), and
  their accumulated size is bounded by ``max_params_size`` while it grows.
* A request the application refused (UNKNOWN_ROLE, CANT_MPX_CONN, OVERLOADED) or already
  ended with ``end_request`` while the web server was still sending is *discarding*: its
  PARAMS, STDIN and DATA records are dropped until the end of its last input stream
  (the empty STDIN record; the empty DATA record for FILTER) or until a new BEGIN_REQUEST
  reuses the id. After that the id is free and any record for it is an error.
* ABORT_REQUEST for an active request is an ``AbortRequest`` event (the application then
  calls ``end_request``); if it arrives before the PARAMS stream ended, the application
  never heard of the request, so END_REQUEST is queued automatically and no event is
  produced. ABORT_REQUEST for an id that was used on this connection but is no longer
  active crossed our END_REQUEST on the wire and is ignored; for an id never used it is
  an error.
* The FILTER role is not supported (there is no DATA event), so it cannot be passed in
  ``roles``; FILTER requests get UNKNOWN_ROLE.
* ``ServerConnection.keep_conn`` turns False when an END_REQUEST (sent by the application
  or automatically) answers a request that did not set FCGI_KEEP_CONN. The caller closes
  the connection once that is so and ``active_requests`` is 0.
* EOF between records is fine and produces no event (even if a request is unfinished:
  the caller sees the EOF itself); EOF inside a record is a ProtocolError. Data after
  EOF is a ProtocolError.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from types import MappingProxyType

VERSION_1 = 1
# record types
BEGIN_REQUEST, ABORT_REQUEST, END_REQUEST, PARAMS, STDIN, STDOUT, STDERR, DATA, \
    GET_VALUES, GET_VALUES_RESULT, UNKNOWN_TYPE = range(1, 12)
# roles
RESPONDER, AUTHORIZER, FILTER = 1, 2, 3
# BEGIN_REQUEST flags
KEEP_CONN = 1
# END_REQUEST protocol status
REQUEST_COMPLETE, CANT_MPX_CONN, OVERLOADED, UNKNOWN_ROLE = 0, 1, 2, 3
MAX_CONTENT = 65535

# names understood in GET_VALUES
MAX_CONNS_NAME, MAX_REQS_NAME, MPXS_CONNS_NAME = b"FCGI_MAX_CONNS", b"FCGI_MAX_REQS", \
    b"FCGI_MPXS_CONNS"

TYPE_NAMES = MappingProxyType({
    BEGIN_REQUEST: "BEGIN_REQUEST", ABORT_REQUEST: "ABORT_REQUEST",
    END_REQUEST: "END_REQUEST", PARAMS: "PARAMS", STDIN: "STDIN", STDOUT: "STDOUT",
    STDERR: "STDERR", DATA: "DATA", GET_VALUES: "GET_VALUES",
    GET_VALUES_RESULT: "GET_VALUES_RESULT", UNKNOWN_TYPE: "UNKNOWN_TYPE"})
PROTOCOL_STATUS_NAMES = MappingProxyType({
    REQUEST_COMPLETE: "REQUEST_COMPLETE", CANT_MPX_CONN: "CANT_MPX_CONN",
    OVERLOADED: "OVERLOADED", UNKNOWN_ROLE: "UNKNOWN_ROLE"})


class ProtocolError(Exception):
    """The peer broke the protocol; close this connection (and only this one)."""


# ---- events a server (application side) receives -------------------------------------
# Events are slotted dataclasses, to be treated as read-only (they compare by value and
# are not hashable). They are not frozen: a frozen dataclass sets each field through
# object.__setattr__, ~0.25 µs more per event, and a request makes two (Request,
# StdinEnd).
@dataclass(slots=True)
class Request:
    """BEGIN_REQUEST plus the complete PARAMS stream (emitted at the empty PARAMS record)."""
    request_id: int
    role: int
    keep_conn: bool
    params: tuple[tuple[bytes, bytes], ...]   # in wire order, duplicates kept (what
                                              # the connection's params_decoder returns)


@dataclass(slots=True)
class StdinData:
    request_id: int
    data: memoryview        # never empty; a read-only view of the received bytes (no
                            # copy is made for the application's body); bytes(data)
                            # or b"".join(...) when bytes are needed


@dataclass(slots=True)
class StdinEnd:
    request_id: int


@dataclass(slots=True)
class AbortRequest:
    request_id: int


# ---- events a client (web server side) receives --------------------------------------
@dataclass(slots=True)
class Stdout:
    request_id: int
    data: bytes             # never empty; the empty end-of-stream record is not an event


@dataclass(slots=True)
class Stderr:
    request_id: int
    data: bytes


@dataclass(slots=True)
class EndRequest:
    request_id: int
    app_status: int
    protocol_status: int


@dataclass(slots=True)
class GetValuesResult:
    values: dict[bytes, bytes]


@dataclass(slots=True)
class UnknownType:
    record_type: int


# ---- the shared codec ----------------------------------------------------------------
_HEADER = struct.Struct(">BBHHBx")
_BEGIN_BODY = struct.Struct(">HB5x")
_END_BODY = struct.Struct(">IB3x")
_END_RECORD = struct.Struct(">BBHHBxIB3x")                 # END_REQUEST, with its body
_CLOSE_AND_END = struct.Struct(">BBHHBxBBHHBxIB3x")        # empty STDOUT + END_REQUEST
_BEGIN_AND_PARAMS = struct.Struct(">BBHHBxHB5xBBHHBx")     # BEGIN_REQUEST + a PARAMS header
_UNKNOWN_BODY = struct.Struct(">B7x")
_U32 = struct.Struct(">I")
_PAD = tuple(b"\0" * n for n in range(8))
_LEN1 = tuple(bytes((n,)) for n in range(128))


def _type_name(record_type: int) -> str:
    return TYPE_NAMES.get(record_type, f"type {record_type}")


def encode_record(record_type: int, request_id: int, content=b"") -> bytes:
    """One record (content of at most 65535 bytes), padded to a multiple of 8."""
    n = len(content)
    if n > MAX_CONTENT:
        raise ValueError(f"record content of {n} bytes exceeds {MAX_CONTENT}")
    pad = -n & 7
    return b"".join((_HEADER.pack(VERSION_1, record_type, request_id, n, pad),
                     content, _PAD[pad]))


def encode_stream(record_type: int, request_id: int, data, tail: bytes = b"") -> bytes:
    """``data`` as records of ``record_type``, split at 65535 bytes, followed by
    ``tail`` (records already framed) in the same join; b"" -> ``tail``.

    Does not add the empty end-of-stream record."""
    n = len(data)
    if n <= MAX_CONTENT:
        if not n:
            return tail
        pad = -n & 7
        return b"".join((_HEADER.pack(VERSION_1, record_type, request_id, n, pad),
                         data, _PAD[pad], tail))
    parts = []
    view = memoryview(data).cast("B")
    for start in range(0, n, MAX_CONTENT):
        chunk = view[start:start + MAX_CONTENT]
        size = len(chunk)
        pad = -size & 7
        parts += (_HEADER.pack(VERSION_1, record_type, request_id, size, pad),
                  chunk, _PAD[pad])
    parts.append(tail)
    return b"".join(parts)


def _length(n: int) -> bytes:
    if n < 128:
        return _LEN1[n]
    if n > 0x7FFFFFFF:
        raise ValueError(f"name-value length {n} too large")
    return _U32.pack(n | 0x80000000)


def encode_pairs(pairs) -> bytes:
    """Name-value pairs (str as latin-1, or bytes) in FastCGI's length-prefixed form."""
    parts = []
    for name, value in pairs:
        if type(name) is not bytes:
            name = name.encode("latin-1") if isinstance(name, str) else bytes(name)
        if type(value) is not bytes:
            value = value.encode("latin-1") if isinstance(value, str) else bytes(value)
        n, v = len(name), len(value)
        parts += (_LEN1[n] if n < 128 else _length(n), _LEN1[v] if v < 128 else _length(v),
                  name, value)
    return b"".join(parts)


def decode_pairs(data) -> tuple[tuple[bytes, bytes], ...]:
    """Parse a complete name-value stream; ProtocolError if it is truncated."""
    if type(data) is not bytes:
        data = bytes(data)
    pairs = []
    append = pairs.append
    end = len(data)
    i = 0
    unpack = _U32.unpack_from
    try:
        while i < end:
            nlen = data[i]
            if nlen < 128:
                i += 1
            else:
                nlen = unpack(data, i)[0] & 0x7FFFFFFF
                i += 4
            vlen = data[i]
            if vlen < 128:
                i += 1
            else:
                vlen = unpack(data, i)[0] & 0x7FFFFFFF
                i += 4
            name_end = i + nlen
            value_end = name_end + vlen
            if value_end > end:
                raise ProtocolError(f"name-value pair runs {value_end - end} bytes past"
                                    " the end of its stream")
            append((data[i:name_end], data[name_end:value_end]))
            i = value_end
    except (IndexError, struct.error):   # a length's bytes run past the end
        raise ProtocolError("name-value pair truncated in its length bytes") from None
    return tuple(pairs)


class _Framer:
    """Splits a byte stream into complete records: (type, request_id, content).

    ``content`` is a read-only memoryview. A record that lies within one piece given to
    ``feed`` is a slice of that piece (no copy: a 1 MiB upload arrives in 32 KiB STDIN
    records, and each byte copied costs); a record split across pieces is joined once.
    The pieces of an incomplete record are kept as views, not copied into a buffer.
    ``idle``: no part of a record is waiting and the stream has not ended."""

    __slots__ = ("_pending", "_have", "_total", "_eof")

    def __init__(self) -> None:
        self._pending: list = []    # views of an incomplete record's bytes so far
        self._have = 0              # their total length
        self._total = 0             # the record's length with header and padding, once known
        self._eof = False

    @property
    def idle(self) -> bool:
        return not self._have and not self._eof

    def feed(self, data, off: int = 0) -> list[tuple[int, int, memoryview]]:
        """The records completed by ``data[off:]`` (b"" = end of file); the bytes
        before ``off`` were the caller's (ServerConnection._whole_request)."""
        if self._eof:
            if not data:
                return []
            raise ProtocolError("data received after end of file")
        if not data:
            self._eof = True
            if self._have:
                raise ProtocolError(f"connection closed inside a record ({self._have}"
                                    " bytes of it received)")
            return []
        if type(data) is not bytes:
            data = bytes(data)      # views must not see the caller change its buffer
        view = memoryview(data)
        n = len(data)
        records = []
        if self._have:
            off = self._complete(view, off, n, records)
            if off < 0:
                return records
        unpack = _HEADER.unpack_from
        while n - off >= 8:
            version, rtype, rid, clen, plen = unpack(data, off)
            if version != VERSION_1:
                raise ProtocolError(f"unsupported FastCGI version {version}")
            start = off + 8
            if start + clen + plen > n:
                break
            records.append((rtype, rid, view[start:start + clen]))
            off = start + clen + plen
        if off < n:
            self._pending.append(view[off:])
            self._have = n - off
            self._total = 8 + clen + plen if n - off >= 8 else 0
        return records

    def _complete(self, view: memoryview, off: int, n: int, records: list) -> int:
        """Add the head of ``view[off:n]`` to the pending record. Returns where the rest
        of ``view`` starts once that record is complete (appended to records), else -1."""
        pending = self._pending
        if not self._total:
            if self._have + n - off < 8:
                pending.append(view[off:])
                self._have += n - off
                return -1
            # the header itself was split (fewer than 8 bytes pending): a tiny join
            head = b"".join(pending) + view[off:off + 8 - self._have]
            version, _, _, clen, plen = _HEADER.unpack_from(head)
            if version != VERSION_1:
                raise ProtocolError(f"unsupported FastCGI version {version}")
            self._total = 8 + clen + plen
        need = self._total - self._have
        if n - off < need:
            pending.append(view[off:])
            self._have += n - off
            return -1
        pending.append(view[off:off + need])
        record = b"".join(pending)
        pending.clear()
        self._have = self._total = 0
        _, rtype, rid, clen, _ = _HEADER.unpack_from(record)
        records.append((rtype, rid, memoryview(record)[8:8 + clen]))
        return off + need


# ---- the application side ------------------------------------------------------------
_PARAMS, _STDIN, _INPUT_DONE, _DISCARD = range(4)


class _ServerRequest:
    __slots__ = ("role", "keep_conn", "phase", "params", "params_size", "stderr_used")

    def __init__(self, role: int, keep_conn: bool, phase: int) -> None:
        self.role = role
        self.keep_conn = keep_conn
        self.phase = phase
        self.params: list[bytes] = []
        self.params_size = 0
        self.stderr_used = False


class ServerConnection:
    """The application's end of one transport connection.

    Management records are answered by the connection itself (queued for
    ``data_to_send()``): GET_VALUES with FCGI_MAX_CONNS / FCGI_MAX_REQS / FCGI_MPXS_CONNS
    from the constructor arguments (unknown names omitted), unknown types with
    UNKNOWN_TYPE. A BEGIN_REQUEST for a role not in ``roles`` is answered with
    END_REQUEST(UNKNOWN_ROLE); a second concurrent request when ``mpxs_conns`` is False
    with END_REQUEST(CANT_MPX_CONN); more than ``max_reqs`` concurrent with OVERLOADED.
    Refused requests never produce events; their remaining input is discarded (see the
    module docstring).

    ``params_decoder`` turns a request's whole PARAMS stream into ``Request.params``
    (default ``decode_pairs``) and raises ProtocolError when it is malformed; a server
    can decode straight into the form it uses (spawnd-wsgi: an environ dict).
    """

    __slots__ = ("_max_conns", "_max_reqs", "_mpxs", "_roles", "_max_params",
                 "_decode_params", "_framer", "_reqs", "_active", "_used", "_out",
                 "_keep_conn", "_failed")

    def __init__(self, *, max_conns: int = 1, max_reqs: int = 1, mpxs_conns: bool = False,
                 roles: tuple[int, ...] = (RESPONDER, AUTHORIZER),
                 max_params_size: int = 1 << 20, params_decoder=None) -> None:
        if FILTER in roles:
            raise ValueError("the FILTER role is not supported (no DATA events)")
        if max_reqs < 1 or max_conns < 1:
            raise ValueError("max_conns and max_reqs must be at least 1")
        self._max_conns = max_conns     # (GET_VALUES answers are built when asked)
        self._max_reqs = max_reqs
        self._mpxs = mpxs_conns
        self._roles = tuple(roles)
        self._max_params = max_params_size
        self._decode_params = params_decoder or decode_pairs
        self._framer = _Framer()
        self._reqs: dict[int, _ServerRequest] = {}
        self._active = 0            # requests in _reqs not discarding
        self._used: set[int] = set()  # ids ever begun here (for late ABORT_REQUEST)
        self._out: list[bytes] = []
        self._keep_conn = True
        self._failed: str | None = None

    # -- input ---------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list:
        """Feed bytes (b"" = EOF). Returns the complete events, in order."""
        if self._failed is not None:
            raise ProtocolError(f"connection already failed: {self._failed}")
        events: list = []
        try:
            records = None
            if not self._reqs and type(data) is bytes and self._framer.idle:
                records = self._whole_request(data, events)
            if records is None:
                records = self._framer.feed(data)
            for rtype, rid, content in records:
                if rtype == STDIN:
                    self._on_stdin(rid, content, events)
                elif rtype == PARAMS:
                    self._on_params(rid, content, events)
                elif rtype == BEGIN_REQUEST:
                    self._on_begin(rid, content)
                elif rtype == ABORT_REQUEST:
                    self._on_abort(rid, events)
                elif rtype == GET_VALUES:
                    if rid != 0:
                        raise ProtocolError(f"GET_VALUES on request id {rid}, not 0")
                    self._on_get_values(content)
                elif rtype == DATA:
                    self._on_data(rid, content)
                elif END_REQUEST <= rtype <= UNKNOWN_TYPE:
                    raise ProtocolError(f"{_type_name(rtype)} is sent by applications,"
                                        " not to them")
                else:
                    self._out.append(encode_record(UNKNOWN_TYPE, 0,
                                                   _UNKNOWN_BODY.pack(rtype)))
        except ProtocolError as exc:
            self._failed = str(exc)
            raise
        return events

    def _whole_request(self, data: bytes, events: list):
        """The usual start of a request, taken in one pass: BEGIN_REQUEST for a role
        served, its PARAMS records and the empty one, all within ``data`` (a web server
        writes them at once: nginx in one write, with one PARAMS record), and the empty
        STDIN record if it comes next (a request without a body). Called only when no
        request is known and no partial record waits.

        Returns the records framed from the rest of ``data``, with the request begun and
        its events added to ``events``; or None, having changed nothing, when ``data``
        does not start that way: then the record-by-record path takes it all (and
        raises, answers or refuses as the case may be). The rest is framed before the
        request is begun, so a fault in it leaves the state the record-by-record path
        leaves; a differential property test holds the two paths to the same outcome
        (tests/test_fastcgi_fuzz.py)."""
        n = len(data)
        if n < 24:                  # (BEGIN_REQUEST and a PARAMS header)
            return None
        # BEGIN_REQUEST without padding (nginx, Apache, lighttpd) and the header of the
        # first PARAMS record, in one unpack; anything else goes record by record
        version, rtype, rid, clen, plen, role, flags, pversion, ptype, prid, clen1, plen1 \
            = _BEGIN_AND_PARAMS.unpack_from(data)
        if version != VERSION_1 or rtype != BEGIN_REQUEST or clen != 8 or plen or not rid \
                or role not in self._roles:
            return None
        start = 24
        off = start + clen1 + plen1
        if ptype != PARAMS or prid != rid or pversion != VERSION_1 or off > n:
            return None
        unpack = _HEADER.unpack_from
        chunks = []                 # the PARAMS records' contents
        size = clen = clen1
        while clen:
            chunks.append(data[start:start + clen])
            if n - off < 8:
                return None
            version, rtype, prid, clen, plen = unpack(data, off)
            start = off + 8
            off = start + clen + plen
            if rtype != PARAMS or prid != rid or version != VERSION_1 or off > n:
                return None
            size += clen
        if size > self._max_params:
            return None     # (the record-by-record path names the record that overflows)
        phase = _STDIN
        if n - off >= 8:
            version, rtype, srid, clen, plen = unpack(data, off)
            if rtype == STDIN and srid == rid and not clen and version == VERSION_1 \
                    and off + 8 + plen <= n:
                off += 8 + plen
                phase = _INPUT_DONE
        records = self._framer.feed(data, off) if off < n else ()
        # what the records taken do, in their order
        keep_conn = bool(flags & KEEP_CONN)
        self._used.add(rid)
        self._reqs[rid] = req = _ServerRequest(role, keep_conn, _PARAMS)
        self._active += 1
        events.append(Request(rid, role, keep_conn, self._decode_params(
            chunks[0] if len(chunks) == 1 else b"".join(chunks))))
        req.phase = phase           # (after decoding, which may raise, as record by record)
        if phase == _INPUT_DONE:
            events.append(StdinEnd(rid))
        return records

    def _request(self, rid: int, rtype: int) -> _ServerRequest:
        req = self._reqs.get(rid)
        if req is None:
            if rid == 0:
                raise ProtocolError(f"{_type_name(rtype)} on request id 0 (management)")
            raise ProtocolError(f"{_type_name(rtype)} for request id {rid}, which is not"
                                " active")
        return req

    def _on_begin(self, rid: int, content: bytes) -> None:
        if rid == 0:
            raise ProtocolError("BEGIN_REQUEST on request id 0 (management)")
        if len(content) != 8:
            raise ProtocolError(f"BEGIN_REQUEST body is {len(content)} bytes, not 8")
        role, flags = _BEGIN_BODY.unpack(content)
        keep_conn = bool(flags & KEEP_CONN)
        old = self._reqs.get(rid)
        if old is not None and old.phase != _DISCARD:
            raise ProtocolError(f"BEGIN_REQUEST for request id {rid}, which is active")
        self._used.add(rid)
        if role not in self._roles:
            status = UNKNOWN_ROLE
        elif self._active and not self._mpxs:
            status = CANT_MPX_CONN
        elif self._active >= self._max_reqs:
            status = OVERLOADED
        else:
            self._reqs[rid] = _ServerRequest(role, keep_conn, _PARAMS)
            self._active += 1
            return
        self._reqs[rid] = _ServerRequest(role, keep_conn, _DISCARD)
        self._out.append(self._end_records(rid, 0, status, keep_conn, False))

    def _on_params(self, rid: int, content: bytes, events: list) -> None:
        req = self._reqs.get(rid) or self._request(rid, PARAMS)
        phase = req.phase
        if phase == _DISCARD:
            return
        if phase != _PARAMS:
            raise ProtocolError(f"PARAMS for request id {rid} after its PARAMS stream"
                                " ended")
        if content:
            req.params_size += len(content)
            if req.params_size > self._max_params:
                raise ProtocolError(f"PARAMS for request id {rid} exceed"
                                    f" {self._max_params} bytes")
            # a copy, not a view: a view would keep the whole received buffer (headers,
            # padding) alive, which max_params_size does not count
            req.params.append(content.tobytes())
            return
        chunks = req.params
        params = self._decode_params(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        req.params = []
        req.phase = _STDIN
        events.append(Request(rid, req.role, req.keep_conn, params))

    def _on_stdin(self, rid: int, content: bytes, events: list) -> None:
        req = self._reqs.get(rid) or self._request(rid, STDIN)
        phase = req.phase
        if phase == _STDIN:
            if content:
                events.append(StdinData(rid, content))
            else:
                req.phase = _INPUT_DONE
                events.append(StdinEnd(rid))
        elif phase == _DISCARD:
            if not content and req.role != FILTER:
                del self._reqs[rid]
        elif phase == _PARAMS:
            raise ProtocolError(f"STDIN for request id {rid} before its PARAMS ended")
        else:
            raise ProtocolError(f"STDIN for request id {rid} after its STDIN ended")

    def _on_data(self, rid: int, content: bytes) -> None:
        req = self._request(rid, DATA)
        if req.phase != _DISCARD:
            raise ProtocolError(f"DATA for request id {rid}, which is not a FILTER")
        if not content and req.role == FILTER:
            del self._reqs[rid]

    def _on_abort(self, rid: int, events: list) -> None:
        req = self._reqs.get(rid)
        if req is None or req.phase == _DISCARD:
            if rid in self._used:
                return        # crossed our END_REQUEST on the wire
            raise ProtocolError(f"ABORT_REQUEST for request id {rid}, never begun")
        if req.phase == _PARAMS:   # the application never saw it: end it ourselves
            self._out.append(self.end_request(rid))
        else:
            events.append(AbortRequest(rid))

    def _on_get_values(self, content: bytes) -> None:
        known = {MAX_CONNS_NAME: b"%d" % self._max_conns,
                 MAX_REQS_NAME: b"%d" % self._max_reqs,
                 MPXS_CONNS_NAME: b"1" if self._mpxs else b"0"}
        result = [(name, known[name]) for name, _ in decode_pairs(content)
                  if name in known]
        self._out.append(encode_record(GET_VALUES_RESULT, 0, encode_pairs(result)))

    # -- output --------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        """Automatic replies produced by receive_data (and cleared by this call)."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def send_stdout(self, request_id: int, data: bytes) -> bytes:
        """Frame data as STDOUT records (split at 65535, padded to 8). b"" -> b"".

        Pure framing: the request id is not checked (the caller owns it)."""
        return encode_stream(STDOUT, request_id, data)

    def send_stderr(self, request_id: int, data: bytes) -> bytes:
        """Frame data as STDERR records; ``end_request`` then also closes STDERR."""
        req = self._reqs.get(request_id)
        if req is None or req.phase in (_PARAMS, _DISCARD):
            raise ValueError(f"request id {request_id} is not active")
        if data:
            req.stderr_used = True
        return encode_stream(STDERR, request_id, data)

    def end_request(self, request_id: int, app_status: int = 0,
                    protocol_status: int = REQUEST_COMPLETE, stdout: bytes = b"") -> bytes:
        """Close the STDOUT (and STDERR, if used) streams and send END_REQUEST.

        ``stdout``: the response's last STDOUT data, framed in front of the end (what
        ``send_stdout(request_id, stdout) + end_request(request_id)`` gives, with one
        call and one copy fewer). STDIN records that arrive later for this id (the
        client was still streaming) are discarded until its empty STDIN record, then
        the id is free again."""
        req = self._reqs.get(request_id)
        if req is None or req.phase == _DISCARD:
            raise ValueError(f"request id {request_id} is not active")
        if req.phase == _INPUT_DONE:
            del self._reqs[request_id]
        else:
            req.phase = _DISCARD
            req.params = []
        self._active -= 1
        end = self._end_records(request_id, app_status, protocol_status, req.keep_conn,
                                req.stderr_used)
        return encode_stream(STDOUT, request_id, stdout, end) if stdout else end

    def _end_records(self, rid: int, app_status: int, protocol_status: int,
                     keep_conn: bool, stderr_used: bool) -> bytes:
        if not keep_conn:
            self._keep_conn = False
        status = app_status & 0xFFFFFFFF
        if protocol_status != REQUEST_COMPLETE:   # a refused request has no streams
            return _END_RECORD.pack(VERSION_1, END_REQUEST, rid, 8, 0, status,
                                    protocol_status)
        if stderr_used:
            return b"".join((_HEADER.pack(VERSION_1, STDOUT, rid, 0, 0),
                             _HEADER.pack(VERSION_1, STDERR, rid, 0, 0),
                             _END_RECORD.pack(VERSION_1, END_REQUEST, rid, 8, 0, status,
                                              protocol_status)))
        return _CLOSE_AND_END.pack(VERSION_1, STDOUT, rid, 0, 0, VERSION_1, END_REQUEST,
                                   rid, 8, 0, status, protocol_status)

    @property
    def keep_conn(self) -> bool:
        """False once a request without FCGI_KEEP_CONN has been ended: close after
        flushing (drain the peer's unread input first, or nginx sees a reset)."""
        return self._keep_conn

    @property
    def active_requests(self) -> int:
        """Requests begun and not yet ended (by ``end_request`` or automatically)."""
        return self._active

    def input_ended(self, request_id: int) -> bool:
        """Has the client sent all of the request's STDIN (its empty record)? True also
        for an id no longer known (ended with its input complete, or never begun); False
        while STDIN is still to come, before or after ``end_request``."""
        req = self._reqs.get(request_id)
        return req is None or req.phase == _INPUT_DONE


# ---- the web server side -------------------------------------------------------------
class ClientConnection:
    """The web server's end: build requests, parse responses."""

    def __init__(self) -> None:
        self._framer = _Framer()
        # request id -> [stdout ended, stderr ended]
        self._reqs: dict[int, list[bool]] = {}
        self._failed: str | None = None

    def begin_request(self, request_id: int = 1, role: int = RESPONDER,
                      keep_conn: bool = False,
                      params=()) -> bytes:
        """BEGIN_REQUEST + PARAMS records + the empty PARAMS record.
        params: iterable of (name, value) as str (latin-1) or bytes."""
        if not 1 <= request_id <= 0xFFFF:
            raise ValueError(f"request id {request_id} out of range 1..65535")
        if request_id in self._reqs:
            raise ValueError(f"request id {request_id} is already active")
        self._reqs[request_id] = [False, False]
        body = _BEGIN_BODY.pack(role, KEEP_CONN if keep_conn else 0)
        return b"".join((encode_record(BEGIN_REQUEST, request_id, body),
                         encode_stream(PARAMS, request_id, encode_pairs(params)),
                         _HEADER.pack(VERSION_1, PARAMS, request_id, 0, 0)))

    def send_stdin(self, request_id: int, data: bytes) -> bytes:
        """STDIN records; b"" gives the empty end-of-stream record."""
        if not data:
            return _HEADER.pack(VERSION_1, STDIN, request_id, 0, 0)
        return encode_stream(STDIN, request_id, data)

    def abort_request(self, request_id: int) -> bytes:
        return encode_record(ABORT_REQUEST, request_id)

    def get_values(self, names) -> bytes:
        return encode_record(GET_VALUES, 0, encode_pairs((name, b"") for name in names))

    @property
    def active_requests(self) -> frozenset[int]:
        """Ids begun and not yet answered with END_REQUEST."""
        return frozenset(self._reqs)

    def receive_data(self, data: bytes) -> list:
        """Returns Stdout / Stderr / EndRequest / GetValuesResult / UnknownType events."""
        if self._failed is not None:
            raise ProtocolError(f"connection already failed: {self._failed}")
        events: list = []
        try:
            for rtype, rid, content in self._framer.feed(data):
                if rtype == STDOUT or rtype == STDERR:
                    state = self._stream_state(rid, rtype)
                    which = rtype - STDOUT
                    if state[which]:
                        raise ProtocolError(f"{_type_name(rtype)} for request id {rid}"
                                            " after its stream ended")
                    if content:
                        events.append((Stdout if rtype == STDOUT else Stderr)(
                            rid, content.tobytes()))
                    else:
                        state[which] = True
                elif rtype == END_REQUEST:
                    self._stream_state(rid, rtype)
                    if len(content) != 8:
                        raise ProtocolError(f"END_REQUEST body is {len(content)} bytes,"
                                            " not 8")
                    del self._reqs[rid]
                    events.append(EndRequest(rid, *_END_BODY.unpack(content)))
                elif rtype == GET_VALUES_RESULT or rtype == UNKNOWN_TYPE:
                    if rid != 0:
                        raise ProtocolError(f"{_type_name(rtype)} on request id {rid},"
                                            " not 0")
                    if rtype == GET_VALUES_RESULT:
                        events.append(GetValuesResult(dict(decode_pairs(content))))
                    else:
                        if len(content) != 8:
                            raise ProtocolError(f"UNKNOWN_TYPE body is {len(content)}"
                                                " bytes, not 8")
                        events.append(UnknownType(content[0]))
                elif BEGIN_REQUEST <= rtype <= GET_VALUES:
                    raise ProtocolError(f"{_type_name(rtype)} is sent to applications,"
                                        " not by them")
                else:
                    raise ProtocolError(f"unknown record type {rtype} from the"
                                        " application")
        except ProtocolError as exc:
            self._failed = str(exc)
            raise
        return events

    def _stream_state(self, rid: int, rtype: int) -> list[bool]:
        state = self._reqs.get(rid)
        if state is None:
            if rid == 0:
                raise ProtocolError(f"{_type_name(rtype)} on request id 0 (management)")
            raise ProtocolError(f"{_type_name(rtype)} for request id {rid}, which is not"
                                " active")
        return state
