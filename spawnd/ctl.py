"""spawnctl: the control client. A thin client of the admin protocol (control.py).

Exit status: 0 success, 1 the daemon answered with an error (or, for `request`, a non-2xx
status or a protocol error), 2 usage error, 3 the daemon cannot be reached.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys

DEFAULT_SOCKET = "/run/spawnd/spawnd.sock"
DEFAULT_CONFIG = "/etc/spawnd/spawnd.yaml"


class Unreachable(Exception):
    pass


class DaemonError(Exception):
    pass


# ---- talking to the daemon -----------------------------------------------------------------
class Client:
    def __init__(self, path: str, timeout: float | None = None):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            raise Unreachable(f"{path} does not exist: is spawnd running?") from None
        except ConnectionRefusedError:
            raise Unreachable(f"{path}: connection refused: is spawnd running?") from None
        except PermissionError:
            raise Unreachable(f"{path}: permission denied (run as root, or as a member "
                              f"of spawnd's admin_group for read-only commands)") from None
        except OSError as e:
            raise Unreachable(f"{path}: {e.strerror or e}") from None
        self.file = self.sock.makefile("rb")

    def call(self, cmd: str, **args):
        self.sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
        return self.read()

    def read(self):
        line = self.file.readline()
        if not line:
            raise Unreachable(f"{self.path}: spawnd closed the connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise DaemonError(reply.get("error", "unknown error"))
        return reply.get("result")


def admin_socket_from_config(path: str) -> str | None:
    """admin_socket as named by a config file (relative to the file's directory)."""
    import yaml
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        value = (data.get("spawnd") or {}).get("admin_socket")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if not isinstance(value, str):
        return None
    return os.path.join(os.path.dirname(os.path.abspath(path)), value)


# ---- output --------------------------------------------------------------------------------
def _table(rows: list[list[str]], indent: str = "") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in rows)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def format_status(result) -> str:
    out = []
    for p in result["pools"]:
        state = p["state"]
        if state == "backoff" and p.get("retry_in") is not None:
            state += f" (retry in {_duration(p['retry_in'])}, {p['failures']} failures)"
        out.append(_table([["POOL", "STATE", "LISTEN", "CHILDREN", "RESTARTS"],
                           [p["name"], state, p["listen"], f"{p['running']}/{p['desired']}",
                            str(p["restarts"])]]))
        if p.get("last_exit") or p.get("last_error"):
            out.append(f"  last exit: {p.get('last_error') or p.get('last_exit')}")
        if p["children"]:
            rows = [["PID", "STATE", "UPTIME", "RESTARTS", "RSS", "CPU%"]]
            for c in p["children"]:
                rows.append([str(c["pid"]), c["state"], _duration(c["uptime"]),
                             str(c["restarts"]), _size(c["rss"]), f"{c['cpu_percent']:.1f}"])
            out.append(_table(rows, "  "))
        out.append("")
    return "\n".join(out).rstrip() + ("\n" if out else "no pools\n")


def format_result(cmd: str, result) -> str:
    if cmd == "status":
        return format_status(result)
    if cmd == "metrics":
        return result["text"]
    if cmd == "reload":
        parts = [f"{k}: {', '.join(v)}" for k, v in result.items() if v and k != "unchanged"]
        return "reloaded; " + ("; ".join(parts) if parts else "nothing changed") + "\n"
    if cmd == "restart":
        return f"{result['pool']}: {result['state']}, replaced {result['replaced']} child(ren)\n"
    if cmd in ("start", "stop", "scale"):
        extra = f", {result['running']}/{result['desired']} running" if "desired" in result else \
            f", {result['running']} running" if "running" in result else ""
        return f"{result['pool']}: {result['state']}{extra}\n"
    if cmd == "signal":
        return f"{result['pool']}: sent {result['signal']} to {len(result['children'])} child(ren)\n"
    if cmd == "shutdown":
        return "spawnd is shutting down\n"
    return json.dumps(result, indent=2) + "\n"


# ---- command line --------------------------------------------------------------------------
def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number of processes >= 0, not {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given before the command is not reset by the subcommand's default.
    common.add_argument("-s", "--socket", default=argparse.SUPPRESS, metavar="ADMIN_SOCKET",
                        help=f"the daemon's admin socket (default: the config's admin_socket, "
                             f"else {DEFAULT_SOCKET})")
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, metavar="FILE",
                        help=f"read admin_socket from this config (default: {DEFAULT_CONFIG})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the daemon's reply as JSON")
    p = argparse.ArgumentParser(prog="spawnctl", parents=[common],
                                description="Control a running spawnd through its admin socket.",
                                epilog="Exit status: 0 success, 1 the daemon answered with an "
                                       "error, 2 usage error, 3 spawnd cannot be reached.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    def cmd(name, help_text):
        return sub.add_parser(name, parents=[common], help=help_text, description=help_text)

    cmd("status", "pools, their state and children").add_argument("pool", nargs="?")
    for name, text in (("start", "start a pool's children"),
                       ("stop", "gracefully stop a pool's children (the socket stays bound)"),
                       ("restart", "rolling restart: replace children one at a time")):
        cmd(name, text).add_argument("pool")
    c = cmd("scale", "change the number of children")
    c.add_argument("pool")
    c.add_argument("processes", type=_count)
    c = cmd("signal", "send a signal to every child of a pool")
    c.add_argument("pool")
    c.add_argument("signal")
    cmd("reload", "re-read the configuration and apply the differences")
    c = cmd("request", "send one FastCGI request to a pool's socket and print the response")
    c.add_argument("pool")
    from .fastcgi.client import add_request_options
    add_request_options(c)
    c = cmd("logs", "recent lines the pool's children wrote")
    c.add_argument("pool")
    c.add_argument("-n", "--lines", type=int, default=50)
    c.add_argument("-f", "--follow", action="store_true")
    cmd("metrics", "Prometheus text exposition of every pool and child")
    cmd("shutdown", "stop every pool and exit spawnd (like SIGTERM)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    as_json = getattr(args, "json", False)
    path = getattr(args, "socket", None)
    if path is None:
        path = admin_socket_from_config(getattr(args, "config", DEFAULT_CONFIG)) or DEFAULT_SOCKET
    try:
        if args.cmd == "request":
            return _request(args, path, as_json)
        client = Client(path)
        if args.cmd == "logs":
            return _logs(client, args, as_json)
        call_args = {k: v for k, v in (("pool", getattr(args, "pool", None)),
                                       ("processes", getattr(args, "processes", None)),
                                       ("signal", getattr(args, "signal", None)))
                     if v is not None}
        result = client.call(args.cmd, **call_args)
    except Unreachable as e:
        print(f"spawnctl: cannot reach spawnd: {e}", file=sys.stderr)
        return 3
    except DaemonError as e:
        print(f"spawnctl: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(result, indent=2) + "\n" if as_json
                     else format_result(args.cmd, result))
    return 0


def _logs(client: Client, args, as_json: bool) -> int:
    result = client.call("logs", pool=args.pool, lines=args.lines, follow=args.follow)
    while True:
        if as_json:
            print(json.dumps(result), flush=True)
        else:
            for line in result["lines"]:
                print(line, flush=True)
        if not args.follow:
            return 0
        try:
            result = client.read()
        except KeyboardInterrupt:
            return 0


def _request(args, path: str, as_json: bool) -> int:
    """The FastCGI client (spawnd.fastcgi.client), pointed at the pool's socket."""
    from .fastcgi import client as fcgi
    address = Client(path).call("status", pool=args.pool)["pools"][0]["listen"]
    try:
        resp = fcgi.request_from_options(address, args)
    except ValueError as e:
        print(f"spawnctl: {e}", file=sys.stderr)
        return 2
    except fcgi.ConnectError as e:
        print(f"spawnctl: cannot connect to {address}: {e.strerror or e}", file=sys.stderr)
        return 3
    except fcgi.FastCGIError as e:
        print(f"spawnctl: request to {address} failed: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"status": resp.status, "reason": resp.reason, "headers": resp.headers,
                          "body": resp.body.decode("utf-8", "replace"),
                          "stderr": resp.stderr.decode("utf-8", "replace")}))
    else:
        fcgi.write_response(resp, sys.stdout.buffer, sys.stderr.buffer)
    return fcgi.exit_status(resp)


if __name__ == "__main__":
    sys.exit(main())
