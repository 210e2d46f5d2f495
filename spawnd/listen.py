"""Pool listening sockets: bind them safely, keep them, close them.

A pool's socket is bound once and lives as long as the pool, whatever its children do, so
clients queue in the kernel's backlog instead of being refused while children restart.
spawnd never accepts on these sockets; they stay blocking because the file description is
shared with every child (fd 0), and programs such as php-cgi expect accept() to block.

Unix paths follow one rule set: a live server answering at the path -> refuse ("in use");
a stale socket -> remove it; anything that is not a socket (regular file, directory,
symlink) -> refuse and never delete it. Owner, group and mode are applied after bind() but
before listen(): until listen() a connect() is refused, so there is no moment at which the
socket accepts clients with the wrong permissions.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass


class ListenError(Exception):
    """A pool's socket could not be set up; the message says why."""


@dataclass
class Bound:
    """A bound, listening socket and what is needed to clean it up."""
    sock: socket.socket
    address: str                       # canonical listen text, for messages
    path: str | None = None            # unix socket file we created
    inode: tuple[int, int] | None = None   # (st_dev, st_ino) of that file
    keep_file: bool = False            # in systemd's fd store: the file must outlive us

    def fileno(self) -> int:
        return self.sock.fileno()

    def still_ours(self) -> bool:
        """True when the socket has no file, or its file is still the one we created."""
        if self.path is None or self.inode is None:
            return True
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self.inode

    def close(self) -> None:
        """Close the socket; remove its file if it is still the one we created."""
        if self.path is not None and self.inode is not None and not self.keep_file \
                and self.still_ours():
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.sock.close()


DEFAULT_MODE = 0o660


def bind(listen, options, owner: tuple[int, int] | None = None) -> Bound:
    """Bind and listen according to a config.Listen and config.SocketOptions.

    A Unix socket file gets options.mode (default 0660) and options.uid/gid, each
    defaulting to owner (the pool's user and group), like php-fpm's listen.owner."""
    if listen.kind == "unix":
        return _bind_unix(listen, options, owner or (None, None))
    if listen.kind == "tcp":
        return _bind_tcp(listen, options)
    raise ListenError(f"{listen}: no socket was passed by systemd under that name")


def _bind_tcp(listen, options) -> Bound:
    sock = socket.socket(listen.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if listen.family == socket.AF_INET6:
            # Like nginx: [::] means IPv6 only; write a second pool for IPv4.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listen.host, listen.port))
        sock.listen(options.backlog)
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot listen on {listen}: {e.strerror or e}") from None
    return Bound(sock, str(listen))


def _bind_unix(listen, options, owner) -> Bound:
    path = listen.path
    clear_stale(path, str(listen))
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        try:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        except OSError as e:
            raise ListenError(f"cannot create directory {parent} for {listen}: "
                              f"{e.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Create the file owner-only; the configured mode is applied before listen().
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot bind {listen}: {e.strerror or e}") from None
    finally:
        os.umask(old_umask)
    try:
        st = os.lstat(path)
        _set_permissions(path, options, owner)
        sock.listen(options.backlog)
    except OSError as e:
        _unlink_quietly(path)
        sock.close()
        raise ListenError(f"cannot set up {listen}: {e.strerror or e}") from None
    return Bound(sock, str(listen), path, (st.st_dev, st.st_ino))


def adopt(fd: int, listen) -> Bound:
    """Take over a listening socket systemd passed (socket activation or the fd store).
    Its file, if any, belongs to systemd's socket unit or to the stored socket: never
    removed by spawnd."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)          # children's accept() must block
    return Bound(sock, str(listen))


def update(bound: Bound, options, owner: tuple[int, int] | None = None) -> None:
    """Apply changed socket options to a socket that keeps its address (reload)."""
    try:
        if bound.path is not None:
            _set_permissions(bound.path, options, owner or (None, None))
        bound.sock.listen(options.backlog)      # a second listen() changes the backlog
    except OSError as e:
        raise ListenError(f"cannot update {bound.address}: {e.strerror or e}") from None


def _set_permissions(path: str, options, owner) -> None:
    st = os.lstat(path)
    uid = options.uid if options.uid is not None else owner[0]
    gid = options.gid if options.gid is not None else owner[1]
    if (uid, gid) != (st.st_uid, st.st_gid):
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    os.chmod(path, DEFAULT_MODE if options.mode is None else options.mode)


def clear_stale(path: str, what: str) -> None:
    """Remove a stale socket at path; refuse a live one or anything that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ListenError(f"cannot check {what}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else
                "a symbolic link" if stat.S_ISLNK(st.st_mode) else
                "a regular file" if stat.S_ISREG(st.st_mode) else "not a socket")
        raise ListenError(f"{path} exists and is {kind}; refusing to remove it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)    # a live server with a full backlog must not block spawnd
    try:
        probe.connect(path)
    except BlockingIOError:
        pass                    # EAGAIN: alive, its queue is full -> "in use" below
    except ConnectionRefusedError:
        _unlink_quietly(path)   # stale: nobody listens there any more
        return
    except OSError as e:
        if e.errno == errno.ENOENT:
            return
        raise ListenError(f"cannot check existing socket {path}: {e.strerror}") from None
    finally:
        probe.close()
    raise ListenError(f"{path} is in use by a running server")


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
