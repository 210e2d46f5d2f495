"""A bounded, concurrent HTTP load generator for tests: threads + http.client, no tools.

Each request uses its own connection, so every request succeeds or fails on its own (no
stale keep-alive connection can turn into a spurious error). Results are counted:

- ok: the response arrived and check(status, headers, body) accepted it;
- failed: {status: count} for responses check() rejected;
- errors: {exception type name: count} for requests that got no response at all
  (ConnectionRefusedError, ConnectionResetError, RemoteDisconnected, TimeoutError, ...);
- details: the first few failures and errors, described, for assertion messages.

    res = run_load(url, clients=4, requests=400)
    assert res.ok == 400, res

    with LoadInBackground(url, clients=4) as load:
        wait_for(lambda: load.result().ok >= 50, what="load running")
        os.kill(child, signal.SIGKILL)
    assert not load.result().errors
"""
from __future__ import annotations

import dataclasses
import http.client
import itertools
import threading
import time
import urllib.parse

MAX_DETAILS = 10


def _default_check(status: int, headers, body: bytes) -> bool:
    return status == 200


@dataclasses.dataclass
class LoadResult:
    ok: int = 0
    failed: dict = dataclasses.field(default_factory=dict)
    errors: dict = dataclasses.field(default_factory=dict)
    details: list = dataclasses.field(default_factory=list)
    elapsed: float = 0.0

    @property
    def total(self) -> int:
        return self.ok + sum(self.failed.values()) + sum(self.errors.values())

    def __str__(self) -> str:
        rate = self.total / self.elapsed if self.elapsed else 0.0
        lines = [f"{self.total} requests in {self.elapsed:.2f}s ({rate:.0f}/s): ok={self.ok} "
                 f"failed={self.failed} errors={self.errors}"]
        lines += [f"  {d}" for d in self.details]
        return "\n".join(lines)


class _Target:
    def __init__(self, url: str):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"load: only http://HOST[:PORT]/PATH URLs are supported, not {url!r}")
        self.url = url
        self.host, self.port = u.hostname, u.port or 80
        self.path = (u.path or "/") + (f"?{u.query}" if u.query else "")


class LoadInBackground:
    """Run load until stopped, or until max_requests were sent or max_seconds passed.

    A context manager: entering starts the client threads, leaving stops them (in-flight
    requests finish, bounded by timeout) and joins them. result() may be read at any time
    and returns a snapshot."""

    def __init__(self, url_or_urls, *, clients: int = 8, max_requests: int = 1_000_000,
                 max_seconds: float = 60, timeout: float = 10, method: str = "GET",
                 body: bytes | None = None, headers: dict | None = None, check=None):
        urls = [url_or_urls] if isinstance(url_or_urls, str) else list(url_or_urls)
        if not urls:
            raise ValueError("load: no URL given")
        if clients < 1:
            raise ValueError(f"load: clients must be >= 1, not {clients}")
        self._targets = itertools.cycle([_Target(u) for u in urls])
        self._clients, self._max_requests, self._max_seconds = clients, max_requests, max_seconds
        self._timeout, self._method, self._body = timeout, method, body
        self._headers = dict(headers or {})
        self._check = check or _default_check
        self._lock = threading.Lock()
        self._result = LoadResult()
        self._issued = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = 0.0
        self._ended: float | None = None

    # ---- control ------------------------------------------------------------------------
    def start(self) -> "LoadInBackground":
        self._started = time.monotonic()
        self._threads = [threading.Thread(target=self._client, daemon=True, name=f"load-{i}")
                         for i in range(self._clients)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> LoadResult:
        self._stop.set()
        return self.join()

    def join(self, timeout: float | None = None) -> LoadResult:
        """Wait for the clients to finish (stop(), max_requests or max_seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            raise AssertionError(f"load clients still running after {timeout}s: "
                                 f"{self.result()}")
        with self._lock:
            if self._ended is None:
                self._ended = time.monotonic()
        return self.result()

    def result(self) -> LoadResult:
        with self._lock:
            r = self._result
            end = self._ended if self._ended is not None else time.monotonic()
            return LoadResult(r.ok, dict(r.failed), dict(r.errors), list(r.details),
                              end - self._started)

    def __enter__(self) -> "LoadInBackground":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- the clients --------------------------------------------------------------------
    def _next(self) -> _Target | None:
        with self._lock:
            if (self._stop.is_set() or self._issued >= self._max_requests
                    or time.monotonic() - self._started >= self._max_seconds):
                return None
            self._issued += 1
            return next(self._targets)

    def _client(self) -> None:
        while (target := self._next()) is not None:
            self._one(target)

    def _one(self, target: _Target) -> None:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=self._timeout)
        try:
            conn.request(self._method, target.path, body=self._body, headers=self._headers)
            resp = conn.getresponse()
            body = resp.read()
            status, headers = resp.status, resp.headers
        except Exception as e:  # no response: count by exception type
            self._record(None, f"{target.url}: {type(e).__name__}: {e}", type(e).__name__)
            return
        finally:
            conn.close()
        try:
            good = bool(self._check(status, headers, body))
        except Exception as e:
            good, why = False, f"check raised {type(e).__name__}: {e}"
        else:
            why = "rejected by check"
        if good:
            self._record(status)
        else:
            self._record(status, f"{target.url}: {status} {why}: {body[:200]!r}")

    def _record(self, status: int | None, detail: str | None = None,
                error: str | None = None) -> None:
        with self._lock:
            r = self._result
            if error is not None:
                r.errors[error] = r.errors.get(error, 0) + 1
            elif detail is None:
                r.ok += 1
            else:
                r.failed[status] = r.failed.get(status, 0) + 1
            if detail is not None and len(r.details) < MAX_DETAILS:
                r.details.append(detail)


def run_load(url_or_urls, *, clients: int = 8, requests: int = 2000, timeout: float = 10,
             method: str = "GET", body: bytes | None = None, headers: dict | None = None,
             check=None, max_seconds: float = 120) -> LoadResult:
    """Send `requests` requests from `clients` threads (URLs taken in turn) and count them."""
    load = LoadInBackground(url_or_urls, clients=clients, max_requests=requests,
                            max_seconds=max_seconds, timeout=timeout, method=method,
                            body=body, headers=headers, check=check)
    load.start()
    return load.join()
