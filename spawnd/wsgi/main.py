"""spawnd-wsgi: serve a WSGI application over FastCGI (or once, as a CGI script).

    spawnd-wsgi [OPTIONS] MODULE[:CALLABLE]

CALLABLE defaults to ``application`` (the PEP 3333 / mod_wsgi convention); it may be a
dotted path (``pkg.mod:obj.wsgi_app``) and may end in ``()`` to call a factory with no
arguments (``app:create_app()``). Exit status: 0 after a normal stop, 2 for a usage or
start-up error (bad option, import failure, no listening socket), 1 when the single CGI
response could not be written.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import socket
import stat
import sys
import traceback

from spawnd.wsgi.environ import normalise_prefix

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class UsageError(Exception):
    pass


def duration(text: str) -> float:
    """spawnd's own duration syntax (config.parse_duration). Imported here, when an
    option needs it: spawnd.config loads YAML, which a runner otherwise never uses."""
    from spawnd.config import parse_duration
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1: {text!r}")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spawnd-wsgi",
        description="Serve a WSGI application on the FastCGI listening socket on fd 0 "
                    "(as spawnd starts it), on --bind, or once as a CGI script when fd 0 "
                    "is not a listening socket and GATEWAY_INTERFACE is set; with none of "
                    "these it exits with status 2.",
        epilog="Exit status: 0 after a normal stop (TERM/INT or --max-requests, even "
               "when --graceful-timeout cuts requests short); 1 when a CGI response "
               "could not be completed; 2 for a usage or start-up error; the "
               "application's own status if it raises SystemExit. Environment: "
               "FCGI_WEB_SERVER_ADDRS, a comma-separated list of IP addresses allowed "
               "to connect over TCP (Unix-socket peers are always allowed; a malformed "
               "entry: exit 2).")
    p.add_argument("app", metavar="MODULE[:CALLABLE]",
                   help="the application; CALLABLE defaults to 'application', may be a "
                        "dotted path and may end in '()' to call a factory")
    p.add_argument("--bind", metavar="unix:PATH|tcp:HOST:PORT",
                   help="bind and listen here instead of using fd 0 (development)")
    p.add_argument("--backlog", type=positive, default=1024,
                   help="listen backlog for --bind (default 1024)")
    p.add_argument("--threads", type=positive, default=1,
                   help="worker threads running the application (default 1: the "
                        "application runs in the event loop thread)")
    p.add_argument("--script-name", metavar="PREFIX",
                   help="the application is mounted at PREFIX: SCRIPT_NAME+PATH_INFO is "
                        "split there (404 outside it)")
    p.add_argument("--max-requests", type=positive, default=None, metavar="N",
                   help="exit (status 0) after N requests, finishing those in flight")
    p.add_argument("--graceful-timeout", type=duration, default=30.0, metavar="DURATION",
                   help="at TERM/INT/--max-requests, how long requests in flight may "
                        "still take (default 30s)")
    p.add_argument("--io-timeout", type=duration, default=60.0, metavar="DURATION",
                   help="a blocked read or write on a connection fails after this "
                        "(default 60s; 0: no limit)")
    p.add_argument("--chdir", metavar="DIR",
                   help="change to DIR before importing, and put DIR first on sys.path")
    p.add_argument("-e", "--env-file", action="append", default=[], metavar="FILE",
                   help="KEY=VALUE lines added to the environment before importing "
                        "(repeatable; '#' comments and blank lines are ignored)")
    return p


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE per line; optional 'export ' prefix; one level of matching quotes."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read env file {path}: {exc}") from None
    env = {}
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("export "):
            text = text[7:].lstrip()
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise UsageError(f"{path}:{n}: expected KEY=VALUE, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


def load_app(spec: str):
    module_name, _, attr = spec.partition(":")
    attr = attr or "application"
    call = attr.endswith("()")
    if call:
        attr = attr[:-2]
    if not module_name or not all(part.isidentifier() for part in attr.split(".")):
        raise UsageError(f"expected MODULE[:CALLABLE], got {spec!r}")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        if getattr(exc, "name", None) and module_name.startswith(exc.name or "\0"):
            raise UsageError(f"cannot import {module_name!r}: {exc} (sys.path starts "
                             f"with {sys.path[:3]})") from None
        raise UsageError(f"importing {module_name!r} failed:\n"
                         f"{traceback.format_exc()}") from None
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise UsageError(f"importing {module_name!r} failed:\n"
                         f"{traceback.format_exc()}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            hint = ""
            if part == "application" and hasattr(obj, "app"):
                hint = f" (it has 'app': use {module_name}:app)"
            raise UsageError(f"{module_name!r} has no attribute {attr!r}{hint}") from None
    if call:
        try:
            obj = obj()
        except Exception:
            raise UsageError(f"calling {spec} failed:\n{traceback.format_exc()}") from None
    if not callable(obj):
        raise UsageError(f"{spec} is not callable (it is {type(obj).__name__})")
    return obj


def listener_on_fd0() -> socket.socket | None:
    """The listening socket on fd 0, None when fd 0 is something else (CGI mode)."""
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return None
    if not stat.S_ISSOCK(mode):
        return None
    sock = socket.socket(fileno=0)
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        try:
            sock.getpeername()
            listening = 0
        except OSError as exc:
            listening = exc.errno == errno.ENOTCONN
    if listening:
        return sock
    sock.detach()
    return None


def bind(address: str, backlog: int):
    """--bind: the address as spawnd's ``listen:`` parses it, bound as spawnd binds a
    pool's socket (a stale socket file is replaced, a live one or anything else at the
    path is refused). Returns a spawnd.listen.Bound; its close() removes the socket file
    only while it is still the one made here."""
    from spawnd import config, listen
    try:
        where = config.parse_listen(address, os.getcwd())
    except ValueError as exc:
        raise UsageError(f"--bind: {exc}") from None
    if where.kind == "systemd":
        raise UsageError(f"--bind: expected unix:PATH or tcp:HOST:PORT, got {address!r}")
    try:
        return listen.bind(where, config.SocketOptions(backlog=backlog))
    except listen.ListenError as exc:
        raise UsageError(f"--bind {address}: {exc}") from None


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as exc:
        print(f"spawnd-wsgi: error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    try:
        prefix = normalise_prefix(args.script_name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for path in args.env_file:
        os.environ.update(read_env_file(path))
    if args.chdir:
        try:
            os.chdir(args.chdir)
        except OSError as exc:
            raise UsageError(f"--chdir {args.chdir}: {exc.strerror}") from None
    sys.path.insert(0, os.getcwd())
    from spawnd.wsgi.server import Server, parse_allowed
    try:
        allowed = parse_allowed(os.environ.get("FCGI_WEB_SERVER_ADDRS"))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    bound = bind(args.bind, args.backlog) if args.bind else None
    listener = bound.sock if bound else listener_on_fd0()
    try:
        if listener is None and "GATEWAY_INTERFACE" not in os.environ:
            raise UsageError("fd 0 is not a listening socket and GATEWAY_INTERFACE is not "
                             "set (not a CGI request): start me from spawnd, or use --bind")
        if listener is None:
            # CGI: fd 1 carries the response and nothing else; what the application
            # prints, at import too, goes to stderr (the web server's error log).
            sys.stdout = sys.stderr
            from spawnd.wsgi.cgi import serve_cgi
            return serve_cgi(load_app(args.app), prefix)
        server = Server(load_app(args.app), listener, threads=args.threads, script_name=prefix,
                        max_requests=args.max_requests or 0,
                        graceful_timeout=args.graceful_timeout, io_timeout=args.io_timeout,
                        allowed=allowed, multiprocess=not args.bind)
        where = args.bind or f"fd 0 ({_describe(listener)})"
        return server.serve(ready=f"serving {args.app} on {where} with {args.threads} "
                                  "thread(s)")
    finally:
        if bound:
            bound.close()       # removes the socket file only if it is still ours
        elif listener is not None:
            listener.detach()


def _describe(sock: socket.socket) -> str:
    try:
        name = sock.getsockname()
    except OSError:
        return "?"
    if isinstance(name, tuple):
        return f"tcp:{name[0]}:{name[1]}"
    return f"unix:{name}" if name else "unix"


if __name__ == "__main__":
    sys.exit(main())
