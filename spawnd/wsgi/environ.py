"""CGI/FastCGI parameters -> a PEP 3333 environ (without the wsgi.* streams).

Decisions, made once here for both the FastCGI and the CGI mode:

* Names and values are decoded as latin-1: every byte survives as one code point (the
  PEP 3333 "native string" convention). A UTF-8 path arrives as its bytes.
* Duplicate names: for HTTP_* headers the values are joined with ", " (HTTP_COOKIE with
  "; ", as RFC 6265 wants for one Cookie header); for any other name the last value wins
  (as when a ``fastcgi_param`` given twice overrides an included one).
* HTTP_CONTENT_TYPE and HTTP_CONTENT_LENGTH are dropped (PEP 3333 forbids them); when the
  server did not send CONTENT_TYPE, the header's value is used for it. An empty
  CONTENT_LENGTH/CONTENT_TYPE is removed: the body is then read to the end of STDIN.
* SCRIPT_NAME/PATH_INFO (see ``split_path``): with ``--script-name`` the server's
  SCRIPT_NAME + PATH_INFO is split at the prefix; otherwise PATH_INFO is trusted when it
  was sent, and when it was not (nginx's stock fastcgi_params send only SCRIPT_NAME, set
  to the whole path) the application is taken to be mounted at the root. PATH_INFO is
  never derived from REQUEST_URI (which is not decoded or normalised).
"""
from __future__ import annotations

import struct
import sys

from spawnd.fastcgi.protocol import decode_pairs
from spawnd.wsgi.response import FileWrapper

_U32 = struct.Struct(">I").unpack_from

REQUIRED_DEFAULTS = {
    "REQUEST_METHOD": "GET",
    "QUERY_STRING": "",
    "SERVER_NAME": "localhost",
    "SERVER_PORT": "80",
    "SERVER_PROTOCOL": "HTTP/1.0",
}
_REQUIRED = frozenset(REQUIRED_DEFAULTS)


class NotMounted(Exception):
    """The request path is outside ``--script-name``: answer 404."""


def normalise_prefix(prefix: str | None) -> str | None:
    """``--script-name`` value -> "" (root) or "/a/b" (no trailing slash)."""
    if prefix is None:
        return None
    prefix = prefix.strip()
    if prefix and not prefix.startswith("/"):
        raise ValueError(f"--script-name must start with '/': {prefix!r}")
    return prefix.rstrip("/")


def split_path(script_name: str | None, path_info: str | None,
               prefix: str | None) -> tuple[str, str]:
    """Return (SCRIPT_NAME, PATH_INFO) following the rules in the module docstring."""
    if prefix is not None:
        full = (script_name or "") + (path_info or "")
        if full == prefix or full.startswith(prefix + "/") or not prefix:
            return prefix, full[len(prefix):]
        raise NotMounted(full)
    if path_info is None:            # no split by the server: the app is at the root
        return "", script_name or "/"
    script = script_name or ""
    if path_info and not path_info.startswith("/"):
        path_info = "/" + path_info
    if script.endswith("/"):         # "/app/" + "x" -> "/app", "/x"; "/" -> "", "/"
        stripped = script.rstrip("/")
        path_info = script[len(stripped):] + path_info.lstrip("/") if path_info \
            else script[len(stripped):]
        if not path_info.startswith("/"):
            path_info = "/" + path_info
        script = stripped
    return script, path_info


def merge_params(params) -> dict:
    """(name, value) pairs, as bytes (FastCGI) or latin-1 str (CGI) -> a dict of str,
    duplicates merged (see the module docstring)."""
    env: dict = {}
    for name, value in params:
        if type(name) is bytes:
            name = name.decode("latin-1")
            value = value.decode("latin-1")
        old = env.get(name)
        if old is not None and name.startswith("HTTP_"):
            value = old + ("; " if name == "HTTP_COOKIE" else ", ") + value
        env[name] = value
    return env


def decode_params(data: bytes) -> dict:
    """A whole FastCGI PARAMS stream -> what ``merge_params`` gives for its pairs, in one
    pass over the bytes.

    The ``params_decoder`` of spawnd-wsgi's connections (the per-request hot path): the
    block is decoded as latin-1 once and each name and value is sliced out of that
    string (latin-1 maps byte offsets to the same character offsets). Duplicates are
    merged on the way: nginx configurations often send a name twice (``include
    fastcgi_params`` followed by an override). A pair that runs past the end of the
    stream: ProtocolError, from ``decode_pairs`` (so both decoders fail alike)."""
    text = data.decode("latin-1")
    env: dict = {}
    end = len(data)
    i = 0
    try:
        while i < end:
            n = data[i]
            if n < 128:
                i += 1
            else:
                n = _U32(data, i)[0] & 0x7FFFFFFF
                i += 4
            v = data[i]
            if v < 128:
                i += 1
            else:
                v = _U32(data, i)[0] & 0x7FFFFFFF
                i += 4
            j = i + n
            i = j + v
            name = text[j - n:j]
            if name in env and name[:5] == "HTTP_":
                env[name] += ("; " if name == "HTTP_COOKIE" else ", ") + text[j:i]
            else:
                env[name] = text[j:i]
    except (IndexError, struct.error):
        i = end + 1
    if i > end:
        decode_pairs(data)          # raises the ProtocolError that names the fault
        raise AssertionError("decode_pairs accepted a stream decode_params refused")
    return env


def build_environ(params, prefix: str | None = None) -> dict:
    """``params``: a dict from ``decode_params`` (taken over, not copied), or an
    iterable of (name, value) as bytes (FastCGI) or latin-1 str (CGI)."""
    env = params if type(params) is dict else merge_params(params)
    if "HTTP_CONTENT_TYPE" in env or "HTTP_CONTENT_LENGTH" in env:
        ctype = env.pop("HTTP_CONTENT_TYPE", None)
        env.pop("HTTP_CONTENT_LENGTH", None)
        if ctype is not None and "CONTENT_TYPE" not in env:
            env["CONTENT_TYPE"] = ctype
    if env.get("CONTENT_TYPE") == "":
        del env["CONTENT_TYPE"]
    if env.get("CONTENT_LENGTH") == "":
        del env["CONTENT_LENGTH"]
    if not _REQUIRED <= env.keys():
        for name, default in REQUIRED_DEFAULTS.items():
            env.setdefault(name, default)
    env["SCRIPT_NAME"], env["PATH_INFO"] = split_path(
        env.get("SCRIPT_NAME"), env.get("PATH_INFO"), prefix)
    scheme = env.get("REQUEST_SCHEME")
    if scheme != "http" and scheme != "https":
        scheme = (scheme or "").lower()
        if scheme not in ("http", "https"):
            scheme = "https" if env.get("HTTPS", "").lower() in ("on", "1") else "http"
    env["wsgi.url_scheme"] = scheme
    return env


def content_length(env: dict) -> int | None:
    """CONTENT_LENGTH as an int, None when absent; ValueError when malformed."""
    raw = env.get("CONTENT_LENGTH")
    if raw is None:
        return None
    n = int(raw.strip())
    if n < 0:
        raise ValueError(f"negative CONTENT_LENGTH {raw!r}")
    return n


def wsgi_base(*, multithread: bool, multiprocess: bool, run_once: bool) -> dict:
    """The wsgi.* keys every request's environ gets (wsgi.input is per request)."""
    return {
        "wsgi.version": (1, 0),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": multithread,
        "wsgi.multiprocess": multiprocess,
        "wsgi.run_once": run_once,
        "wsgi.input_terminated": True,      # wsgi.input always ends where the body ends
        "wsgi.file_wrapper": FileWrapper,
    }
