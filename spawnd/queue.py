"""Listen-queue depth of a listening socket, exactly, from the kernel.

``depth(sock) -> (queued, backlog)``: how many connections the kernel has completed and
queued on a listening socket that no process has accept()ed yet, and how many it may
queue. This is the number that says "every child is busy and clients are waiting".

- TCP (IPv4 and IPv6): ``getsockopt(IPPROTO_TCP, TCP_INFO)``. For a socket in the LISTEN
  state Linux reports the accept-queue length in ``tcpi_unacked`` and the backlog
  (``sk_max_ack_backlog``) in ``tcpi_sacked``.
- Unix stream: the sock_diag netlink interface. One SOCK_DIAG_BY_FAMILY request for the
  socket's inode with UDIAG_SHOW_RQLEN; for a listening socket the UNIX_DIAG_RQLEN
  attribute holds (queued connections, backlog). The kernel answers within the send
  call, so the reply is read without waiting; one netlink socket is opened on first
  use and kept.

Both are plain system calls of a few microseconds, safe to call from the event loop.
A Unix listening socket accepts one connection more than its backlog before it refuses
(the kernel's test is ``queued > backlog``), so ``queued`` may reach ``backlog + 1``; a TCP
one does the same.
"""
from __future__ import annotations

import atexit
import errno
import os
import socket
import struct
import threading

__all__ = ["depth", "QueueError"]

TCP_LISTEN = 10                      # the kernel's TCP_LISTEN state (also used for Unix)

# struct tcp_info: eight u8 fields, then u32 rto, ato, snd_mss, rcv_mss, unacked, sacked
_TCP_INFO = struct.Struct("=B7x4xIIIII")    # state, (rto) ato snd_mss rcv_mss unacked sacked
_TCP_INFO_LEN = 32                   # enough for tcpi_sacked, present since Linux 2.6

# netlink / sock_diag (linux/netlink.h, linux/sock_diag.h, linux/unix_diag.h)
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
UDIAG_SHOW_RQLEN = 0x10
UNIX_DIAG_RQLEN = 4
_NLMSGHDR = struct.Struct("=IHHII")          # len, type, flags, seq, pid
_UNIX_DIAG_REQ = struct.Struct("=BBHIII2I")  # family, protocol, pad, states, ino, show, cookie
_UNIX_DIAG_MSG = struct.Struct("=BBBxI2I")   # family, type, state, ino, cookie
_RTATTR = struct.Struct("=HH")               # len, type
_RQLEN = struct.Struct("=II")                # rqueue, wqueue
_NO_COOKIE = 0xFFFFFFFF


class QueueError(OSError):
    """The depth could not be read: not a listening stream socket, or the kernel
    refused the query (the errno says why)."""


def depth(sock) -> tuple[int, int]:
    """(queued, backlog) of a listening TCP or Unix stream socket (object or fd)."""
    if isinstance(sock, socket.socket):
        return _depth(sock)
    wrapped = socket.socket(fileno=sock)     # an fd of ours: borrow it, never close it
    try:
        return _depth(wrapped)
    finally:
        wrapped.detach()


def _depth(sock: socket.socket) -> tuple[int, int]:
    if sock.type != socket.SOCK_STREAM:
        raise QueueError(errno.EINVAL, f"fd {sock.fileno()} is not a stream socket")
    domain = sock.family
    if domain == socket.AF_INET or domain == socket.AF_INET6:
        return _tcp_depth(sock)
    if domain == socket.AF_UNIX:
        return _diag.unix_depth(os.fstat(sock.fileno()).st_ino)
    raise QueueError(errno.EAFNOSUPPORT,
                     f"fd {sock.fileno()}: no queue depth for address family {domain}")


def _tcp_depth(sock: socket.socket) -> tuple[int, int]:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    state, _ato, _snd_mss, _rcv_mss, unacked, sacked = _TCP_INFO.unpack_from(raw)
    if state != TCP_LISTEN:
        raise QueueError(errno.EINVAL, f"fd {sock.fileno()} is not a listening socket")
    return unacked, sacked


class _UnixDiag:
    """One kept netlink socket for sock_diag requests (lazily opened)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0
        self._lock = threading.Lock()

    def unix_depth(self, inode: int) -> tuple[int, int]:
        with self._lock:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW
                                           | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                                           NETLINK_SOCK_DIAG)
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            seq = self._seq
            body = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 1 << TCP_LISTEN,
                                       inode & 0xFFFFFFFF, UDIAG_SHOW_RQLEN,
                                       _NO_COOKIE, _NO_COOKIE)
            msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                                 NLM_F_REQUEST, seq, 0) + body
            self._sock.sendto(msg, (0, 0))
            while True:
                try:
                    reply = self._sock.recv(8192)
                except BlockingIOError:      # the kernel answers inside sendto()
                    raise QueueError(errno.EIO, "sock_diag sent no answer") from None
                result = _parse(reply, seq, inode)
                if result is not None:
                    return result

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _parse(reply: bytes, seq: int, inode: int) -> tuple[int, int] | None:
    """The (queued, backlog) in a sock_diag reply; None if the reply is for another
    (earlier, abandoned) request."""
    length, mtype, _flags, rseq, _pid = _NLMSGHDR.unpack_from(reply)
    if rseq != seq:
        return None
    body = reply[_NLMSGHDR.size:length]
    if mtype == NLMSG_ERROR:
        code = -struct.unpack_from("=i", body)[0]
        if code == errno.ENOENT:
            raise QueueError(code, f"no Unix socket with inode {inode} (closed?)")
        raise QueueError(code, f"sock_diag: {os.strerror(code)}")
    if mtype != SOCK_DIAG_BY_FAMILY:
        raise QueueError(errno.EPROTO, f"sock_diag: unexpected message type {mtype}")
    _family, _type, state, _ino, _c0, _c1 = _UNIX_DIAG_MSG.unpack_from(body)
    if state != TCP_LISTEN:
        raise QueueError(errno.EINVAL, f"Unix socket inode {inode} is not listening")
    off = _UNIX_DIAG_MSG.size
    while off + _RTATTR.size <= len(body):
        alen, atype = _RTATTR.unpack_from(body, off)
        if alen < _RTATTR.size:
            break
        if atype == UNIX_DIAG_RQLEN:
            return _RQLEN.unpack_from(body, off + _RTATTR.size)
        off += (alen + 3) & ~3
    raise QueueError(errno.EPROTO, "sock_diag: no UNIX_DIAG_RQLEN in the answer")


_diag = _UnixDiag()
atexit.register(_diag.close)
