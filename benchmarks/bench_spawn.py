#!/usr/bin/env python3
"""Spawn benchmark: spawn-fcgi, multiwatch and spawnd side by side, on fcgiwrap children.

Measures, in one run (issue "spawnd core", Measure section):
  (a) time from launch until N = 1, 8, 32 fcgiwrap children are all blocked in accept() on
      the listening socket;
  (b) time from kill -9 of one child until its replacement is blocked in accept()
      (multiwatch and spawnd; spawn-fcgi does not restart children);
  (c) the idle supervisor's CPU time, wake-ups (epoll_wait/poll/select returns, counted
      by strace -c) and voluntary context switches over an idle period.

"Blocked in accept() on the listening socket" is read from /proc: fd 0 is the socket
whose inode /proc/net/unix lists for the path, and /proc/PID/syscall shows accept(4) on
fd 0 (tests/support/proc.py: in_accept). Run as root (children run as nobody; reading
their /proc/PID/syscall needs root). See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

from support.proc import in_accept, unix_listener_inode  # noqa: E402

FCGIWRAP = "/usr/sbin/fcgiwrap"
SPAWND = os.path.join(REPO, ".venv", "bin", "spawnd")
POLL = 0.0005          # seconds between two scans of /proc while waiting
PR_SET_CHILD_SUBREAPER = 36
CHILD_MIN_AGE = 0.15   # (b): a victim has lived this long, past both supervisors' backoff window


# ---- observing children ------------------------------------------------------------------

from _common import first_line  # noqa: E402

def accepting(inode: int) -> set[int]:
    """Pids whose fd 0 is the listening socket `inode` and that are blocked in accept on it."""
    want = f"socket:[{inode}]"
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink(f"/proc/{name}/fd/0") != want:
                    continue
            except OSError:
                continue
            if in_accept(int(name)):
                found.add(int(name))
    return found


def wait_until(predicate, timeout: float, what: str):
    deadline = time.perf_counter() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.perf_counter() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(POLL)


def reap_orphans() -> None:
    """We are a subreaper: collect any orphan (spawn-fcgi's children) that has exited."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# ---- the three contenders ----------------------------------------------------------------

class Contender:
    name = "?"
    restarts = True

    def __init__(self, workdir: str):
        self.dir = workdir
        self.sock = os.path.join(workdir, f"{self.key}.sock")
        self.proc: subprocess.Popen | None = None
        self.inode: int | None = None
        self.bound_after: float | None = None   # seconds from launch to a listening socket

    key = "x"

    def argv(self, n: int) -> list[str]:
        raise NotImplementedError

    @property
    def supervisor_pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def launch(self, n: int) -> float:
        """Start with n children; return seconds until all n are blocked in accept()."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)
        self.inode = None
        argv = self.argv(n)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.log)

        def ready():
            if self.inode is None:
                self.inode = unix_listener_inode(self.sock)
                if self.inode is None:
                    self._check_alive()
                    return False
                self.bound_after = time.perf_counter() - t0
            return len(accepting(self.inode)) == n
        wait_until(ready, 30, f"{self.name}: {n} children in accept()")
        return time.perf_counter() - t0

    def _check_alive(self):
        if self.proc.poll() not in (None, 0):
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                               f"see {self.log.name}")

    def children(self) -> set[int]:
        return accepting(self.inode)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        self.log = open(os.path.join(self.dir, f"{self.key}.log"), "ab")
        return self

    def __exit__(self, *exc):
        try:
            self.stop()
        finally:
            self.log.close()


class SpawnFcgi(Contender):
    """spawn-fcgi -F N: forks N children, then exits; nobody restarts them."""
    name, key, restarts = "spawn-fcgi -F", "spawnfcgi", False

    def argv(self, n):
        return ["spawn-fcgi", "-s", self.sock, "-F", str(n), "-u", "nobody", "-g", "nogroup",
                "--", FCGIWRAP]

    @property
    def supervisor_pid(self):
        return None

    def stop(self):
        pids = accepting(self.inode) if self.inode else set()
        if self.proc:
            self.proc.wait(15)
        # Its children are ours now (subreaper); fcgiwrap idle in accept() dies on TERM.
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            reap_orphans()
            pids = {p for p in pids if os.path.exists(f"/proc/{p}")}
            time.sleep(0.01)
        self.proc = None


class Multiwatch(Contender):
    """spawn-fcgi -n -- multiwatch -f N -- fcgiwrap (multiwatch is the supervisor)."""
    name, key = "multiwatch", "multiwatch"

    def argv(self, n):
        ms = int(CHILD_MIN_AGE * 1000) - 50
        return ["spawn-fcgi", "-s", self.sock, "-n", "-u", "nobody", "-g", "nogroup", "--",
                shutil.which("multiwatch"), "-f", str(n), "--signal", "TERM", "-t", str(ms), "--", FCGIWRAP]


class Spawnd(Contender):
    """spawnd -c CONFIG with one pool of N fcgiwrap children running as nobody."""
    name, key = "spawnd", "spawnd"

    def argv(self, n):
        config = os.path.join(self.dir, "spawnd.yaml")
        reset = int(CHILD_MIN_AGE * 1000) - 50
        with open(config, "w") as f:
            f.write(f"spawnd:\n"
                    f"  admin_socket: {self.dir}/admin.sock\n"
                    f"pools:\n"
                    f"  cgi:\n"
                    f"    command: [{FCGIWRAP}]\n"
                    f"    listen: unix:{self.sock}\n"
                    f"    processes: {n}\n"
                    f"    user: nobody\n"
                    f"    backoff: {{reset_after: {reset}ms}}\n")
        return [SPAWND, "-c", config]


def spawnd_available(workdir: str) -> str | None:
    """None if `spawnd -t -c CONFIG` accepts our config here, else why not."""
    if not os.access(SPAWND, os.X_OK):
        return f"{SPAWND} not found (run scripts/setup)"
    argv = Spawnd(workdir).argv(1)
    out = subprocess.run([SPAWND, "-t", *argv[1:]], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return f"spawnd -t failed: {(out.stdout + out.stderr).strip()[:300]}"
    return None


# ---- the measurements --------------------------------------------------------------------

def measure_startup(contender_cls, workdir, n, runs) -> tuple[list[float], list[float]]:
    """(seconds to all n children in accept(), seconds to a listening socket), per run."""
    ready, bound = [], []
    for _ in range(runs):
        with contender_cls(workdir) as c:
            ready.append(c.launch(n))
            bound.append(c.bound_after)
        reap_orphans()
    return ready, bound


def wall_time(argv: list[str], runs: int) -> float:
    """Median wall time of running argv to its end (its output discarded)."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def spawnd_check_time(workdir: str, runs: int) -> float:
    """Median wall time of `spawnd -t -c CONFIG`: interpreter start, every import and the
    config parse, but no socket and no child. The floor under spawnd's start-up time."""
    return wall_time([SPAWND, "-t", *Spawnd(workdir).argv(1)[1:]], runs)


def measure_kills(contender_cls, workdir, n, kills) -> list[float]:
    """Seconds from SIGKILL of the child longest in accept() to a full pool again."""
    latencies = []
    with contender_cls(workdir) as c:
        c.launch(n)
        seen = {pid: time.monotonic() for pid in c.children()}
        for _ in range(kills):
            victim = min(seen, key=seen.get)
            # Pacing, not synchronisation: let the victim outlive the backoff windows, so
            # both supervisors replace it at once rather than after a crash-loop delay.
            time.sleep(max(0.0, seen[victim] + CHILD_MIN_AGE - time.monotonic()))
            t0 = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            now = wait_until(lambda: (lambda s: s if len(s) == n and victim not in s else None)(
                c.children()), 10, f"{c.name}: replacement of {victim} in accept()")
            latencies.append(time.perf_counter() - t0)
            del seen[victim]
            for pid in now - set(seen):
                seen[pid] = time.monotonic()
    return latencies


def _cpu_and_switches(pid: int) -> tuple[float, int]:
    """(seconds on CPU, voluntary context switches), summed over pid's threads. CPU time
    comes from schedstat (nanoseconds), not from the clock-tick counts in /proc/PID/stat."""
    cpu, switches = 0, 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            cpu += int(f.read().split()[0])
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    switches += int(line.split()[1])
    return cpu / 1e9, switches


WAIT_CALLS = "epoll_wait,epoll_pwait,epoll_pwait2,poll,ppoll,select,pselect6"


def _strace_calls(pid: int, seconds: float, out: str) -> int:
    """Number of wait-type system calls (= wake-ups) pid's threads made in `seconds`."""
    st = subprocess.Popen(["strace", "-f", "-c", "-o", out, "-e", f"trace={WAIT_CALLS}",
                           "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.2 + seconds)   # 0.2 s for strace to attach to every thread
    st.send_signal(signal.SIGINT)
    err = st.communicate(timeout=10)[1]
    if st.returncode not in (0, None) and not os.path.exists(out):
        raise RuntimeError(f"strace failed: {err.decode(errors='replace')}")
    with open(out) as f:
        for line in f:
            parts = line.split()
            if parts and parts[-1] == "total":
                return int(parts[3])
    return 0


def measure_idle(contender_cls, workdir, n, seconds) -> dict:
    with contender_cls(workdir) as c:
        c.launch(n)
        pid = c.supervisor_pid
        time.sleep(1.0)   # let start-up work (ready timers, logging) finish first
        cpu0, sw0 = _cpu_and_switches(pid)
        time.sleep(seconds)
        cpu1, sw1 = _cpu_and_switches(pid)
        wakeups = _strace_calls(pid, seconds, os.path.join(workdir, f"{c.key}.strace"))
        if len(c.children()) != n:
            raise RuntimeError(f"{c.name}: children left accept() while idle")
    return {"cpu_ms": (cpu1 - cpu0) * 1000, "switches": sw1 - sw0, "wakeups": wakeups}


# ---- report ------------------------------------------------------------------------------

def p99(xs):
    return sorted(xs)[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


def ms(x):
    return "n/a" if x is None else f"{x * 1000:.1f}"


def ratio(a, b):
    if a is None or b is None:
        return "n/a"
    if b == 0:
        return "both 0" if a == 0 else "inf"
    return f"{a / b:.2f}x"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def versions() -> str:
    first = first_line
    return "; ".join([first(["spawn-fcgi", "-v"]), first(["multiwatch", "-v"]),
                      first([SPAWND, "--version"]) if os.path.exists(SPAWND) else "spawnd ?",
                      f"fcgiwrap {FCGIWRAP}"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="short run: 1 start-up run per N, 20 kills, 2 s idle")
    ap.add_argument("--sizes", default="1,8,32", help="pool sizes for (a) (default 1,8,32)")
    ap.add_argument("--runs", type=int, help="start-up runs per size (default 5)")
    ap.add_argument("--kills", type=int, help="kills for (b) (default 100)")
    ap.add_argument("--kill-pool", type=int, default=8, help="pool size for (b) and (c)")
    ap.add_argument("--idle", type=float, help="idle seconds for (c) (default 10)")
    ap.add_argument("--only", help="comma-separated subset of spawn-fcgi,multiwatch,spawnd")
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    runs = args.runs or (1 if args.quick else 5)
    kills = args.kills or (20 if args.quick else 100)
    idle = args.idle or (2.0 if args.quick else 10.0)
    sizes = [int(s) for s in args.sizes.split(",")]

    if os.geteuid() != 0:
        ap.error("run as root: children run as nobody, and their /proc/PID/syscall needs root")
    for tool in ("spawn-fcgi", "multiwatch", "strace", FCGIWRAP):
        if not shutil.which(tool):
            ap.error(f"{tool} not found (apt-get install spawn-fcgi multiwatch strace fcgiwrap)")

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)   # spawn-fcgi's children stay ours

    workdir = tempfile.mkdtemp(prefix="bench-spawn-")
    os.chmod(workdir, 0o755)
    try:
        contenders = {"spawn-fcgi": SpawnFcgi, "multiwatch": Multiwatch, "spawnd": Spawnd}
        if args.only:
            contenders = {k: v for k, v in contenders.items() if k in args.only.split(",")}
        if "spawnd" in contenders:
            # A packaged spawnd is byte-compiled when installed; a source tree run with
            # PYTHONDONTWRITEBYTECODE (or read-only) would compile every changed module
            # at each start (config.py alone: ~11 ms), which no installation pays.
            subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(REPO, "spawnd")],
                           check=True)
            why = spawnd_available(workdir)
            if why:
                print(f"note: spawnd column skipped: {why}", file=sys.stderr)
                del contenders["spawnd"]
        return report(contenders, workdir, sizes, runs, kills, idle, args.kill_pool)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def report(contenders, workdir, sizes, runs, kills, idle, pool) -> int:
    names = ["spawn-fcgi", "multiwatch", "spawnd"]
    print(f"# bench_spawn: {platform.node()}, Linux {platform.release()}, "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"versions: {versions()}\n")

    print(f"## (a) launch -> N fcgiwrap children blocked in accept(), ms "
          f"(median of {runs} run(s))\n")
    rows, bound_rows = [], []
    for n in sizes:
        med, bound = {}, {}
        for name in names:
            if name in contenders:
                print(f"  (a) {name} N={n} ...", file=sys.stderr)
                r, b = measure_startup(contenders[name], workdir, n, runs)
                med[name], bound[name] = statistics.median(r), statistics.median(b)
        rows.append([n, *(ms(med.get(k)) for k in names),
                     ratio(med.get("spawnd"), med.get("spawn-fcgi")),
                     ratio(med.get("spawnd"), med.get("multiwatch"))])
        bound_rows.append([n, *(ms(bound.get(k)) for k in names)])
    print(table(["N", *names, "spawnd / spawn-fcgi", "spawnd / multiwatch"], rows))
    print("\nOf which: launch -> listening socket present (ms, median):\n")
    print(table(["N", *names], bound_rows))
    if "spawnd" in contenders:
        print(f"\nFor scale: `spawnd -t -c CONFIG` (start, imports, config parse; no socket, "
              f"no child) takes {ms(spawnd_check_time(workdir, max(runs, 3)))} ms.")
        # an interpreter that runs nothing: a floor under (a) for any Python daemon
        floor = {" ".join(argv): wall_time(argv, 20) for argv in
                 ([sys.executable, "-c", "pass"], ["/usr/bin/python3", "-I", "-S", "-c", "pass"])}
        print("The interpreter alone, before any line of spawnd (median of 20): "
              + "; ".join(f"`{cmd}` {ms(t)} ms" for cmd, t in floor.items()) + ".")

    print(f"\n## (b) kill -9 of one child -> replacement in accept(), ms "
          f"(N={pool}, {kills} kills)\n")
    lat = {}
    for name in ("multiwatch", "spawnd"):
        if name in contenders:
            print(f"  (b) {name} ...", file=sys.stderr)
            lat[name] = measure_kills(contenders[name], workdir, pool, kills)
    stats = {"median": statistics.median, "p99": p99, "max": max}
    rows = []
    for label, fn in stats.items():
        v = {k: fn(x) for k, x in lat.items()}
        rows.append([label, ms(v.get("multiwatch")), ms(v.get("spawnd")),
                     ratio(v.get("spawnd"), v.get("multiwatch"))])
    print(table(["", "multiwatch", "spawnd", "spawnd / multiwatch"], rows))
    print("\nspawn-fcgi does not restart children.")

    print(f"\n## (c) idle supervisor with {pool} children, over {idle:g} s\n")
    res = {}
    for name in ("multiwatch", "spawnd"):
        if name in contenders:
            print(f"  (c) {name} ...", file=sys.stderr)
            res[name] = measure_idle(contenders[name], workdir, pool, idle)
    rows = []
    for key, label in (("cpu_ms", "CPU time, ms"),
                       ("wakeups", "wake-ups (wait calls, strace -c)"),
                       ("switches", "voluntary context switches")):
        v = {k: r[key] for k, r in res.items()}
        fmt = (lambda x: "n/a" if x is None else f"{x:.1f}" if key == "cpu_ms" else f"{x:.0f}")
        rows.append([label, fmt(v.get("multiwatch")), fmt(v.get("spawnd")),
                     ratio(v.get("spawnd"), v.get("multiwatch"))])
    print(table(["", "multiwatch", "spawnd", "spawnd / multiwatch"], rows))
    print("\nspawn-fcgi has exited once its children are started (nothing idles).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
