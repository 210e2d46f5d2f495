"""FastCGI 1.0 as a sans-IO state machine, for both ends of a connection.

CONTRACT STUB (to be implemented): the public names and signatures below are what the
runner (spawnd/wsgi), the client, the probes and the tests build on. Keep them.

Bytes go in with ``receive_data(data) -> list[Event]`` (``b""`` means the peer closed);
bytes come out of the ``send_*``/``end_request``/``begin_request`` methods and, for
replies the connection produces by itself, of ``data_to_send()``. No sockets, no threads.
Every violation of the protocol raises ``ProtocolError`` (one type) and the connection is
then unusable: the caller closes it.
"""
from __future__ import annotations

from dataclasses import dataclass

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


class ProtocolError(Exception):
    """The peer broke the protocol; close this connection (and only this one)."""


# ---- events a server (application side) receives -------------------------------------
@dataclass(frozen=True, slots=True)
class Request:
    """BEGIN_REQUEST plus the complete PARAMS stream (emitted at the empty PARAMS record)."""
    request_id: int
    role: int
    keep_conn: bool
    params: tuple[tuple[bytes, bytes], ...]   # in wire order, duplicates kept


@dataclass(frozen=True, slots=True)
class StdinData:
    request_id: int
    data: bytes             # never empty


@dataclass(frozen=True, slots=True)
class StdinEnd:
    request_id: int


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: int


# ---- events a client (web server side) receives --------------------------------------
@dataclass(frozen=True, slots=True)
class Stdout:
    request_id: int
    data: bytes             # never empty; the empty end-of-stream record is not an event


@dataclass(frozen=True, slots=True)
class Stderr:
    request_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class EndRequest:
    request_id: int
    app_status: int
    protocol_status: int


@dataclass(frozen=True, slots=True)
class GetValuesResult:
    values: dict[bytes, bytes]


@dataclass(frozen=True, slots=True)
class UnknownType:
    record_type: int


class ServerConnection:
    """The application's end of one transport connection.

    Management records are answered by the connection itself (queued for
    ``data_to_send()``): GET_VALUES with FCGI_MAX_CONNS / FCGI_MAX_REQS / FCGI_MPXS_CONNS
    from the constructor arguments (unknown names omitted), unknown types with
    UNKNOWN_TYPE. A BEGIN_REQUEST for a role not in ``roles`` is answered with
    END_REQUEST(UNKNOWN_ROLE); a second concurrent request when ``mpxs_conns`` is False
    with END_REQUEST(CANT_MPX_CONN); more than ``max_reqs`` concurrent with OVERLOADED.
    """

    def __init__(self, *, max_conns: int = 1, max_reqs: int = 1, mpxs_conns: bool = False,
                 roles: tuple[int, ...] = (RESPONDER, AUTHORIZER),
                 max_params_size: int = 1 << 20) -> None:
        raise NotImplementedError

    def receive_data(self, data: bytes) -> list:
        """Feed bytes (b"" = EOF). Returns the complete events, in order."""
        raise NotImplementedError

    def data_to_send(self) -> bytes:
        """Automatic replies produced by receive_data (and cleared by this call)."""
        raise NotImplementedError

    def send_stdout(self, request_id: int, data: bytes) -> bytes:
        """Frame data as STDOUT records (split at 65535, padded to 8). b"" -> b""."""
        raise NotImplementedError

    def send_stderr(self, request_id: int, data: bytes) -> bytes:
        raise NotImplementedError

    def end_request(self, request_id: int, app_status: int = 0,
                    protocol_status: int = REQUEST_COMPLETE) -> bytes:
        """Close the STDOUT (and STDERR, if used) streams and send END_REQUEST.

        STDIN records that arrive later for this id (the client was still streaming) are
        discarded until its empty STDIN record, then the id is free again."""
        raise NotImplementedError

    @property
    def keep_conn(self) -> bool:
        """False once a request without FCGI_KEEP_CONN has been ended: close after
        flushing (drain the peer's unread input first, or nginx sees a reset)."""
        raise NotImplementedError


class ClientConnection:
    """The web server's end: build requests, parse responses."""

    def __init__(self) -> None:
        raise NotImplementedError

    def begin_request(self, request_id: int = 1, role: int = RESPONDER,
                      keep_conn: bool = False,
                      params=()) -> bytes:
        """BEGIN_REQUEST + PARAMS records + the empty PARAMS record.
        params: iterable of (name, value) as str (latin-1) or bytes."""
        raise NotImplementedError

    def send_stdin(self, request_id: int, data: bytes) -> bytes:
        """STDIN records; b"" gives the empty end-of-stream record."""
        raise NotImplementedError

    def abort_request(self, request_id: int) -> bytes:
        raise NotImplementedError

    def get_values(self, names) -> bytes:
        raise NotImplementedError

    def receive_data(self, data: bytes) -> list:
        """Returns Stdout / Stderr / EndRequest / GetValuesResult / UnknownType events."""
        raise NotImplementedError
