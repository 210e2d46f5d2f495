"""Prometheus text exposition (format 0.0.4) of every pool and child.

Written by hand: the format is a few lines of text, and the runtime dependencies stay
PyYAML and psutil."""
from __future__ import annotations

from .health import Snapshot


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def exposition(supervisor) -> str:
    families: dict[str, tuple[str, str, list[str]]] = {}

    def add(name, kind, help_text, labels, value):
        fam = families.setdefault(name, (kind, help_text, []))
        label_text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
        fam[2].append(f"{name}{{{label_text}}} {value}")

    snapshot = Snapshot()
    for pool in supervisor.pools.values():
        st = pool.status(snapshot, window=False)   # leaves spawnctl status's CPU% window
        lp = {"pool": pool.name}
        add("spawnd_pool_up", "gauge", "1 when the pool runs all its desired children",
            lp, int(st["state"] == "running"))
        add("spawnd_pool_desired_children", "gauge", "Children the pool should run",
            lp, st["desired"])
        add("spawnd_pool_running_children", "gauge", "Children running (not being retired)",
            lp, st["running"])
        add("spawnd_pool_restarts_total", "counter", "Children replaced after they exited",
            lp, st["restarts"])
        add("spawnd_pool_backoff", "gauge", "1 while the pool waits before a restart",
            lp, int(st["state"] == "backoff"))
        for cause, n in sorted(st["replacements"].items()):
            add("spawnd_pool_replacements_total", "counter",
                "Children replaced, by cause (crash, exit, age, rss, cpu, probe, manual, reload)",
                {"pool": pool.name, "cause": cause}, n)
        for code, n in sorted(st["exits"].items()):
            add("spawnd_pool_exits_total", "counter",
                "Children that exited, by exit status or killing signal",
                {"pool": pool.name, "status": code}, n)
        q = st["queue"]
        add("spawnd_pool_queue_depth", "gauge", "Connections waiting in the listen queue",
            lp, q["depth"])
        add("spawnd_pool_queue_max", "gauge", "Largest listen-queue depth seen", lp, q["max"])
        add("spawnd_pool_queue_backlog", "gauge", "Listen backlog", lp, q["backlog"])
        add("spawnd_pool_queue_full_total", "counter", "Samples that found the queue full",
            lp, q["full"])
        if st["health"] is not None:
            add("spawnd_pool_healthy", "gauge", "1 when the last probes passed",
                lp, int(st["health"] == "healthy"))
            if st["probe"]:
                add("spawnd_pool_probe_latency_seconds", "gauge", "Latency of the last probe",
                    lp, st["probe"]["latency"])
        for ch in st["children"]:
            lc = {"pool": pool.name, "pid": ch["pid"]}
            add("spawnd_child_rss_bytes", "gauge", "Resident memory of the child's process tree",
                lc, ch["rss"])
            add("spawnd_child_cpu_seconds_total", "counter",
                "CPU time of the child's process tree", lc, ch["cpu_seconds"])
            add("spawnd_child_uptime_seconds", "gauge", "Seconds since the child started",
                lc, ch["uptime"])
    out = []
    for name, (kind, help_text, samples) in families.items():
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(samples)
    return "\n".join(out) + "\n"
