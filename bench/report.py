#!/usr/bin/env python3
"""bench/report.py — the arithmetic of bench/load.sh (standard library only).

  report.py case --name N --mode M --pace MS --connections C --dir RUN_DIR --lua LUA_DIR
                                                     one wrk run → one JSON line
  report.py monitor --url REDIS_URL --seconds S --out FILE     MONITOR for S seconds
  report.py scale --dir SCALE_DIR --users N --users-state STATE_DIR     the scale run → JSON
  report.py write --results results.jsonl --runs RUNS_DIR --out RESULTS.md --plots DIR
                  [--peers peers.jsonl] [--scale scale.json] [--profile perf.txt] --meta k=v ...

`write` replaces only the part of RESULTS.md between the MEASURED markers; the analysis around it
is written by hand and kept. The plots (SVG, by gnuplot) go to --plots and are linked from there.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from collections import Counter, defaultdict

BEGIN = "<!-- BEGIN MEASURED (bench/load.sh rewrites this part) -->"
END = "<!-- END MEASURED -->"

# What the sidecar itself sends (sidecar/src/store.rs, lib.rs): decide/settle by SHA, the API-key
# lookup, the key-use note, readiness pings, script loading, the invalidation subscription. With
# the control plane paused nobody else sends anything, so these are exactly its round trips (the
# drain's scripts also run HGETALL inside Redis, which is why the runs with the control plane
# draining cannot tell the two apart from commandstats alone).
SIDECAR_COMMANDS = {"evalsha", "eval", "hgetall", "zadd", "ping", "script|load", "subscribe"}
SIDECAR_CASES = ("jwt", "api_key", "jwt_cp_paused", "api_key_cp_paused")
# Runs in which the control plane is paused: the sidecar is Redis's only client.
PAUSED_CASES = ("jwt_cp_paused", "api_key_cp_paused", "refusal")
CASES = ("app", "nginx") + SIDECAR_CASES
SWEEP_PATHS = ("app", "nginx", "jwt", "api_key")
# Decisions the sidecar counts as refused by a limit.
REFUSALS = ("quota_exceeded", "rate_limited")
CASE_LABELS = {
    "app": "demo app directly",
    "nginx": "nginx → app",
    "jwt": "sidecar (JWT) → app",
    "api_key": "sidecar (API key) → app",
    "jwt_cp_paused": "sidecar (JWT) → app, control plane paused",
    "api_key_cp_paused": "sidecar (API key) → app, control plane paused",
    "refusal": "sidecar, one user over its quota",
}
PEER_LABELS = {
    "tollgate": "Tollgate `Store::decide` (decide.lua)",
    "limitador": "Limitador, `AsyncRedisStorage`",
    "limitador_cached": "Limitador, `CachedRedisStorage`",
}


def parse_kv_line(line):
    return dict(part.split("=", 1) for part in line.split()[1:])


def read_commandstats(path):
    calls, usec = {}, {}
    with open(path) as f:
        for line in f:
            m = re.match(r"cmdstat_([^:]+):calls=(\d+),usec=(\d+)", line.strip())
            if m:
                calls[m.group(1)] = int(m.group(2))
                usec[m.group(1)] = int(m.group(3))
    return calls, usec


def read_proc(path):
    out = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] == "postgres_pids":
                out["postgres_pids"] = {p.split(":")[0]: float(p.split(":")[1]) for p in parts[1:] if ":" in p}
            elif len(parts) >= 2:
                out[parts[0]] = [float(p) for p in parts[1:]]
    return out


def read_metrics(path):
    """Prometheus text → {(name, frozenset(labels)): value}."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)", line)
            if not m:
                continue
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
            try:
                out[(m.group(1), labels)] = float(m.group(4))
            except ValueError:
                pass
    return out


def metric_sum(metrics, name, **want):
    total = 0.0
    for (n, labels), v in metrics.items():
        if n == name and all((k, val) in labels for k, val in want.items()):
            total += v
    return total


def script_commands(lua_dir):
    """Commands the Lua scripts run inside Redis (counted by commandstats, but no round trip)."""
    found = set()
    for name in os.listdir(lua_dir):
        if name.endswith(".lua"):
            with open(os.path.join(lua_dir, name)) as f:
                found |= {c.lower() for c in re.findall(r'redis\.call\("(\w+)"', f.read())}
    return found


def run_deltas(d, before="before", after="after"):
    """Commandstats, CPU and metric deltas between two snapshots of load.sh's `snapshot`."""
    before_calls, before_usec = read_commandstats(os.path.join(d, before + ".redis"))
    after_calls, after_usec = read_commandstats(os.path.join(d, after + ".redis"))
    delta = {c: after_calls[c] - before_calls.get(c, 0) for c in after_calls}
    # The snapshot's own INFO call is not the system's.
    delta = {c: n for c, n in delta.items() if n > 0 and c != "info"}
    delta_usec = {c: after_usec[c] - before_usec.get(c, 0) for c in delta}
    pb = read_proc(os.path.join(d, before + ".proc"))
    pa = read_proc(os.path.join(d, after + ".proc"))
    clk = pa["clk_tck"][0]
    wall = (pa["wall_ns"][0] - pb["wall_ns"][0]) / 1e9
    cpu = {}
    for proc in ("sidecar", "app", "nginx", "redis", "control_plane"):
        if proc in pa and proc in pb:
            cpu[proc] = (pa[proc][0] - pb[proc][0]) / clk
    # Per pid: a process that started in between counts in full; one that ended is lost.
    before_pg = pb.get("postgres_pids", {})
    cpu["postgres"] = sum(t - before_pg.get(pid, 0.0) for pid, t in pa.get("postgres_pids", {}).items()) / clk
    cpu["wrk"] = pa.get("wrk_cpu_s", [0.0])[0]
    mb = read_metrics(os.path.join(d, before + ".metrics"))
    ma = read_metrics(os.path.join(d, after + ".metrics"))

    def decisions(*names):
        return int(sum(metric_sum(ma, "tollgate_sidecar_requests_total", decision=n)
                       - metric_sum(mb, "tollgate_sidecar_requests_total", decision=n) for n in names))

    return {"delta": delta, "usec": delta_usec, "pb": pb, "pa": pa, "wall": wall, "cpu": cpu,
            "mb": mb, "ma": ma, "allowed": decisions("allowed"), "refused": decisions(*REFUSALS)}


def redis_per_decision(delta, usec, inside, admitted, refused):
    """What Redis did per decision: round trips, commands run inside scripts, µs."""
    evalsha = delta.get("evalsha", 0)
    round_trips = sum(n for c, n in delta.items() if c in SIDECAR_COMMANDS)
    inner = {c: n for c, n in delta.items() if c in inside and c not in SIDECAR_COMMANDS}
    decided = admitted + refused
    return {
        "evalsha": evalsha,
        "round_trips": round_trips,
        "evalsha_per_admitted": round(evalsha / admitted, 5) if admitted else None,
        "round_trips_per_admitted": round(round_trips / admitted, 5) if admitted else None,
        "evalsha_per_refused": round(evalsha / refused, 5) if refused and not admitted else None,
        "round_trips_per_refused": round(round_trips / refused, 5) if refused and not admitted else None,
        # Per EVALSHA: what one script call ran inside Redis (decide.lua's commands, once the
        # control plane is paused), and how long Redis spent on it.
        "inner_per_evalsha": {c: round(n / evalsha, 3) for c, n in sorted(inner.items())} if evalsha else {},
        "inner_total_per_evalsha": round(sum(inner.values()) / evalsha, 4) if evalsha else None,
        "evalsha_usec_per_call": round(usec.get("evalsha", 0) / evalsha, 2) if evalsha else None,
        "decided": decided,
    }


def case(args):
    d = args.dir
    with open(os.path.join(d, "wrk.txt")) as f:
        wrk_text = f.read()
    m = re.search(r"^WRK_RESULT .*$", wrk_text, re.M)
    if not m:
        sys.exit(f"no WRK_RESULT in {d}/wrk.txt:\n{wrk_text}")
    w = {k: float(v) for k, v in parse_kv_line(m.group(0)).items()}
    duration = w["duration_us"] / 1e6
    requests = int(w["requests"])
    non_2xx = int(w["status_errors"])
    socket_errors = int(w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["timeouts"])

    r = run_deltas(d)
    delta, delta_usec, pb, pa, wall, cpu = r["delta"], r["usec"], r["pb"], r["pa"], r["wall"], r["cpu"]
    inside = script_commands(args.lua)
    others = {c: n for c, n in delta.items() if c not in SIDECAR_COMMANDS and c not in inside}

    # /proc/stat: process time, all time, interrupts, steal (all CPUs).
    dm = [a - b for a, b in zip(pa["machine"], pb["machine"])]
    ncpu = os.cpu_count() or 1
    cpu_cores = {p: s / wall for p, s in cpu.items()}
    share = (lambda x: x / dm[1] * ncpu) if dm[1] else (lambda x: 0.0)
    process_cores = share(dm[0])
    irq_cores = share(dm[2]) if len(dm) > 2 else 0.0
    steal_cores = share(dm[3]) if len(dm) > 3 else 0.0
    machine_busy = process_cores + irq_cores + steal_cores
    # Process time of everything else on the machine meanwhile (a build, another test suite):
    # noise, flagged and retried by load.sh. Interrupt time (loopback TCP runs in softirq) is ours.
    other_cores = max(0.0, process_cores - sum(cpu_cores.values()))
    ctx = pa["sidecar_ctx"][0] - pb["sidecar_ctx"][0]
    mb, ma = r["mb"], r["ma"]

    def mean_ms(name):
        n = metric_sum(ma, name + "_count") - metric_sum(mb, name + "_count")
        s = metric_sum(ma, name + "_sum") - metric_sum(mb, name + "_sum")
        return round(s / n * 1000, 3) if n else None

    rss = []
    with open(os.path.join(d, "rss.txt")) as f:
        rss = [int(x) for x in f.read().split() if x.isdigit()]

    is_sidecar = args.name in SIDECAR_CASES or args.name == "refusal"
    # The denominator is the sidecar's own count of admitted decisions, read once it has no
    # request in flight (load.sh waits for that), so that it covers the same decisions as the
    # commandstats snapshots around it. wrk's 2xx count misses the requests in flight when it
    # stops and closes its connections.
    allowed = r["allowed"] if is_sidecar else 0
    refused = r["refused"] if is_sidecar else 0
    redis = redis_per_decision(delta, delta_usec, inside, allowed, refused) if is_sidecar else {}
    cp_pg = cpu.get("control_plane", 0.0) + cpu.get("postgres", 0.0)
    out = {
        "case": args.name,
        "mode": args.mode,
        "connections": int(args.connections),
        "cp_paused": args.name in PAUSED_CASES,
        "pace_ms": int(args.pace),
        "duration_s": round(duration, 2),
        "requests": requests,
        "rps": round(requests / duration, 1),
        "non_2xx": non_2xx,
        "socket_errors": socket_errors,
        "wrk_2xx": requests - non_2xx,
        "p50_ms": round(w["p50_us"] / 1000, 3),
        "p90_ms": round(w["p90_us"] / 1000, 3),
        "p99_ms": round(w["p99_us"] / 1000, 3),
        "p999_ms": round(w["p999_us"] / 1000, 3),
        "mean_ms": round(w["mean_us"] / 1000, 3),
        "max_ms": round(w["max_us"] / 1000, 3),
        "redis_delta": delta,
        "redis_usec": delta_usec,
        "other_commands": others,
        "allowed": allowed if is_sidecar else None,
        "refused": refused if is_sidecar else None,
        "evalsha_per_admitted": redis.get("evalsha_per_admitted"),
        "redis": redis,
        "cp_pg_us_per_admitted": round(cp_pg / allowed * 1e6, 1) if allowed else None,
        "cpu_s": {p: round(s, 2) for p, s in cpu.items()},
        "cpu_cores": {p: round(c, 3) for p, c in cpu_cores.items()},
        "cpu_us_per_request": {p: round(s / requests * 1e6, 1) for p, s in cpu.items()} if requests else {},
        "machine_busy_cores": round(machine_busy, 2),
        "other_cores": round(other_cores, 2),
        "irq_cores": round(irq_cores, 2),
        "steal_cores": round(steal_cores, 2),
        "wall_s": round(wall, 2),
        "sidecar_rss_max_kb": max(rss) if rss else None,
        "sidecar_rss_samples": len(rss),
        "sidecar_ctx_switches_per_request": round(ctx / requests, 2) if is_sidecar and requests else None,
        "decision_mean_ms": mean_ms("tollgate_sidecar_decision_duration_seconds") if is_sidecar else None,
        "upstream_mean_ms": mean_ms("tollgate_sidecar_upstream_duration_seconds") if is_sidecar else None,
    }
    print(json.dumps(out, sort_keys=True))


# --- Redis and PostgreSQL state (the scale run) ---------------------------------------------------


def key_kind(key):
    """The kind of a key of common/src/keys.rs's schema."""
    m = re.match(r"^[^:]+:\{s:\d+\}:([ubm]):", key)
    if m:
        kind = m.group(1)
        if kind == "u":
            return "user hashes"
        if kind == "m":
            return "settle markers"
        return "staged buckets" if key.endswith(":d") else "usage buckets"
    if re.match(r"^[^:]+:k:", key):
        return "API-key hashes"
    return "other"


KINDS = ("user hashes", "API-key hashes", "usage buckets", "staged buckets", "settle markers", "other")


def read_state(prefix):
    """One `redis_state` of load.sh: used_memory, DBSIZE, keys by kind, MEMORY USAGE of hashes."""
    used = 0
    with open(prefix + ".memory") as f:
        for line in f:
            if line.startswith("used_memory:"):
                used = int(line.split(":", 1)[1])
    with open(prefix + ".dbsize") as f:
        dbsize = int(f.read().strip() or 0)
    kinds = Counter()
    with open(prefix + ".keys") as f:
        for line in f:
            if line.strip():
                kinds[key_kind(line.strip())] += 1
    hash_mem = Counter()
    if os.path.exists(prefix + ".key_memory"):
        with open(prefix + ".key_memory.keys") as fk, open(prefix + ".key_memory") as fm:
            for key, mem in zip(fk, fm):
                if mem.strip().isdigit():
                    hash_mem[key_kind(key.strip())] += int(mem.strip())
    with open(prefix + ".wall_ns") as f:
        wall_ns = int(f.read().strip())
    return {"used_memory": used, "dbsize": dbsize, "keys": {k: kinds.get(k, 0) for k in KINDS},
            "hash_memory": {k: hash_mem.get(k, 0) for k in ("user hashes", "API-key hashes")},
            "wall_ns": wall_ns}


def read_pg(prefix):
    out = {"stat": {}, "rows": {}}
    with open(prefix + ".pg_stat") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 5:
                out["stat"][parts[0]] = {"ins": int(parts[1]), "upd": int(parts[2]), "del": int(parts[3]),
                                         "live": int(parts[4])}
    with open(prefix + ".pg_rows") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:
                out["rows"][parts[0]] = int(parts[1])
    return out


def scale(args):
    d = args.dir
    with open(os.path.join(d, "wrk.txt")) as f:
        wrk_text = f.read()
    m = re.search(r"^WRK_RESULT .*$", wrk_text, re.M)
    if not m:
        sys.exit(f"no WRK_RESULT in {d}/wrk.txt:\n{wrk_text}")
    w = {k: float(v) for k, v in parse_kv_line(m.group(0)).items()}
    load = run_deltas(d, "load-before", "load-after")
    whole = run_deltas(d, "load-before", "drained")
    idle = run_deltas(d, "idle-before", "idle-after")
    admitted = load["allowed"]
    points = [("before", "before: users only (no bucket, no marker)"),
              ("right-after", "right after the last request"),
              ("settled", "after the settle window"),
              ("drained", "after the drain caught up")]
    states = {name: read_state(os.path.join(d, name)) for name, _ in points}
    base = states["before"]
    timeline = []
    for name, label in points:
        st = states[name]
        users_growth = sum(st["hash_memory"].values()) - sum(base["hash_memory"].values())
        growth = st["used_memory"] - base["used_memory"]
        timeline.append({"point": name, "label": label, **st,
                         "growth": growth, "users_growth": users_growth,
                         "growth_beyond_users": growth - users_growth})
    pg_before = read_pg(os.path.join(d, "before"))
    pg_after = read_pg(os.path.join(d, "drained"))
    written = {}
    for table in ("usage_minutes", "usage_months", "usage_drains"):
        b, a = pg_before["stat"].get(table, {}), pg_after["stat"].get(table, {})
        written[table] = {k: a.get(k, 0) - b.get(k, 0) for k in ("ins", "upd", "del")}
    rows_written = sum(v["ins"] + v["upd"] for v in written.values())
    with open(os.path.join(d, "ledger_calls")) as f:
        ledger_calls = int(f.read().strip() or 0)
    # The users' own state: the scale run's users before it, against the same Redis before any user
    # existed (load.sh's state/no-users), and the MEMORY USAGE of their hashes.
    no_users = read_state(os.path.join(args.users_state, "no-users"))
    n_user_hashes = base["keys"]["user hashes"] or 1
    cp_pg_s = whole["cpu"].get("control_plane", 0.0) + whole["cpu"].get("postgres", 0.0)
    idle_cp_pg_per_s = (idle["cpu"].get("control_plane", 0.0) + idle["cpu"].get("postgres", 0.0)) / idle["wall"] \
        if idle["wall"] else 0.0
    redis = redis_per_decision(load["delta"], load["usec"], set(), admitted, 0)
    out = {
        "users": int(args.users),
        "requests": int(w["requests"]),
        "admitted": admitted,
        "non_2xx": int(w["status_errors"]),
        "rps": round(w["requests"] / (w["duration_us"] / 1e6), 1),
        "load_s": round(load["wall"], 1),
        "p50_ms": round(w["p50_us"] / 1000, 3),
        "p99_ms": round(w["p99_us"] / 1000, 3),
        "drain_wait_s": round((states["drained"]["wall_ns"] - states["right-after"]["wall_ns"]) / 1e9, 1),
        "timeline": timeline,
        "user_state_bytes": round((base["used_memory"] - no_users["used_memory"]) / n_user_hashes),
        "user_hash_bytes": round(base["hash_memory"]["user hashes"] / n_user_hashes),
        "key_hash_bytes": round(base["hash_memory"]["API-key hashes"] / max(1, base["keys"]["API-key hashes"])),
        "growth_beyond_users_mb": round(timeline[-1]["growth_beyond_users"] / 1e6, 2),
        "peak_growth_beyond_users_mb": round(max(t["growth_beyond_users"] for t in timeline) / 1e6, 2),
        "pg_written": written,
        "pg_rows_written": rows_written,
        "pg_rows_per_million": round(rows_written / admitted * 1e6) if admitted else None,
        "pg_rows": pg_after["rows"],
        "ledger_calls": ledger_calls,
        "cp_pg_cpu_s": round(cp_pg_s, 2),
        "cp_pg_window_s": round(whole["wall"], 1),
        "cp_cpu_s": round(whole["cpu"].get("control_plane", 0.0), 2),
        "pg_cpu_s": round(whole["cpu"].get("postgres", 0.0), 2),
        "idle_cp_pg_cores": round(idle_cp_pg_per_s, 4),
        # What Redis does while no request arrives: the drain's passes (1,024 shard calls each).
        "idle_redis_cores": round(idle["cpu"].get("redis", 0.0) / idle["wall"], 4) if idle["wall"] else None,
        "idle_redis_commands_per_s": round(sum(idle["delta"].values()) / idle["wall"]) if idle["wall"] else None,
        "idle_evalsha_per_s": round(idle["delta"].get("evalsha", 0) / idle["wall"]) if idle["wall"] else None,
        "cp_pg_us_per_admitted": round(cp_pg_s / admitted * 1e6, 2) if admitted else None,
        "cp_pg_us_per_admitted_net_idle": round((cp_pg_s - idle_cp_pg_per_s * whole["wall"]) / admitted * 1e6, 2)
        if admitted else None,
        "redis_delta": load["delta"],
        "evalsha_per_admitted": redis["evalsha_per_admitted"],
        "sidecar_cpu_us_per_admitted": round(load["cpu"].get("sidecar", 0.0) / admitted * 1e6, 1) if admitted else None,
        "redis_cpu_us_per_admitted": round(load["cpu"].get("redis", 0.0) / admitted * 1e6, 1) if admitted else None,
    }
    print(json.dumps(out, sort_keys=True))


def attribute_monitor(d):
    """Counts MONITOR lines by (process, command); 'lua' is a script's own calls."""
    owners = {}
    with open(os.path.join(d, "monitor-ss.txt")) as f:
        for line in f:
            m = re.search(r"\s(\S+):(\d+)\s+\S+:\d+\s+users:\(\(\"([^\"]+)\",pid=(\d+)", line)
            if m:
                owners[m.group(2)] = m.group(3)
    counts = Counter()
    with open(os.path.join(d, "monitor.txt")) as f:
        for line in f:
            m = re.match(r'\+?[\d.]+ \[\d+ ([^\]]+)\] "([^"]+)"', line)
            if not m:
                continue
            source, command = m.group(1), m.group(2).lower()
            if source == "lua":
                who = "lua (inside a script)"
            else:
                who = owners.get(source.rsplit(":", 1)[-1], "unknown client")
            counts[(who, command)] += 1
    mb = read_metrics(os.path.join(d, "monitor-before.metrics"))
    ma = read_metrics(os.path.join(d, "monitor-after.metrics"))
    allowed = metric_sum(ma, "tollgate_sidecar_requests_total", decision="allowed") - metric_sum(
        mb, "tollgate_sidecar_requests_total", decision="allowed"
    )
    return {
        "sidecar_allowed": int(allowed),
        "counts": [[who, cmd, n] for (who, cmd), n in counts.most_common()],
    }


def monitor(args):
    """MONITOR for a while, written line by line (redis-cli's buffered output would be lost)."""
    url = urllib.parse.urlparse(args.url)
    s = socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379), timeout=5)
    if url.password:
        user = urllib.parse.unquote(url.username or "default")
        s.sendall(f"AUTH {user} {urllib.parse.unquote(url.password)}\r\n".encode())
        s.recv(1024)
    s.sendall(b"MONITOR\r\n")
    s.settimeout(0.2)
    end = time.monotonic() + float(args.seconds)
    buf = b""
    with open(args.out, "wb") as f:
        while time.monotonic() < end:
            try:
                chunk = s.recv(1 << 20)
            except socket.timeout:
                continue
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\r\n")
            for line in lines:
                f.write(line + b"\n")
    s.close()


# --- RESULTS.md ----------------------------------------------------------------------------------


def machine():
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return model, mem_kb


def fmt(x, nd=2):
    """A number with `nd` decimals (jq turns 1.0 into 1, so ints are formatted alike)."""
    if x is None:
        return "—"
    return f"{float(x):,.{nd}f}"


def load_jsonl(path):
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def table(header, align, rows):
    """A Markdown table; `align` is one of "l"/"r" per column."""
    out = ["| " + " | ".join(header) + " |",
           "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def plot(rows, out_dir, out_md):
    """throughput.svg and p99.svg against connections for every path, by gnuplot; returns links."""
    sweep = [r for r in rows if r["mode"] == "max" and r["case"] in SWEEP_PATHS]
    if len({r["connections"] for r in sweep}) < 2:
        return [], "fewer than two connection counts were measured"
    if not shutil.which("gnuplot"):
        return [], "gnuplot is not installed"
    os.makedirs(out_dir, exist_ok=True)
    data = {}
    for c in SWEEP_PATHS:
        pts = sorted((r["connections"], r["rps"], r["p99_ms"]) for r in sweep if r["case"] == c)
        if pts:
            path = os.path.join(out_dir, f"{c}.dat")
            with open(path, "w") as f:
                f.writelines(f"{n} {rps} {p99}\n" for n, rps, p99 in pts)
            data[c] = path
    xtics = ", ".join(str(n) for n in sorted({r["connections"] for r in sweep}))
    links = []
    for name, col, ylabel, title in (("throughput", 2, "requests/s", "Throughput at saturation"),
                                     ("p99", 3, "p99 latency, ms (log)", "p99 latency at saturation")):
        svg = os.path.join(out_dir, f"{name}.svg")
        series = ", ".join(f"'{path}' using 1:{col} with linespoints lw 2 pt 7 title '{CASE_LABELS[c]}'"
                           for c, path in data.items())
        script = "\n".join([
            "set terminal svg size 760,440 dynamic font 'sans,12' background '#ffffff'",
            f"set output '{svg}'",
            f"set title '{title} against connections (wrk, POST /l3/{{patient}})'",
            "set xlabel 'connections (log scale)'", f"set ylabel '{ylabel}'",
            "set logscale x 2", f"set xtics ({xtics})", "set grid", "set key top left",
            "set logscale y 10" if name == "p99" else "set yrange [0:*]",
            f"plot {series}", ""])
        result = subprocess.run(["gnuplot"], input=script, text=True, capture_output=True)
        if result.returncode != 0:
            return [], f"gnuplot failed: {result.stderr.strip()[:200]}"
        links.append((title, os.path.relpath(svg, os.path.dirname(os.path.abspath(out_md)))))
    for path in data.values():
        os.remove(path)
    return links, None


def write(args):
    rows = load_jsonl(args.results)
    peers = load_jsonl(args.peers)
    scale_run = None
    if args.scale and os.path.exists(args.scale):
        with open(args.scale) as f:
            scale_run = json.load(f)
    meta = dict(kv.split("=", 1) for kv in args.meta)
    conns = int(meta["connections"])
    main = [r for r in rows if r["connections"] == conns]
    by = {(r["case"], r["mode"]): r for r in main}
    model, mem_kb = machine()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    L = []
    add = L.append
    add(BEGIN)
    add("")
    add(f"Measured {now} by `bench/load.sh` (commit {meta.get('commit', '?')}; phases: "
        f"{meta.get('phases', '?')}; {int(meta.get('elapsed_s', 0)) // 60} min "
        f"{int(meta.get('elapsed_s', 0)) % 60} s after set-up).")
    add("")
    add("### Machine and software")
    add("")
    add(f"- {os.cpu_count()} cores (`nproc`), {model}, {mem_kb / 1024 / 1024:.1f} GiB memory, "
        f"Linux {platform.release()}; everything below ran on this one machine at once.")
    add(f"- wrk {meta.get('wrk')}, nginx {meta.get('nginx')} (Debian), Redis {meta.get('redis')} "
        f"({'a private redis-server started by the script' if meta.get('redis_private') == 'yes' else 'a shared server'}), "
        f"PostgreSQL {meta.get('postgres')}, rustc {meta.get('rustc')}; sidecar, demo app and peers harness "
        f"in the release profile, control plane in the {meta.get('cp_profile', 'release')} profile (it sets up, "
        f"then drains the usage buckets into PostgreSQL while the sidecar runs, as in production: closed "
        f"minutes {meta.get('close_grace_s', '10')} s after their end, a pass every 5 s).")
    add(f"- Load: `wrk -t{meta['threads']} -c{conns} -d{meta['duration']}s --latency "
        f"-s bench/wrk.lua URL` after a {meta['warmup']} s warm-up with the same command; "
        f"`POST /l3/p-<n>` (metered, cost 1); the sidecar runs rotate over {meta['users']} users' "
        f"JWTs or API keys, each user holding a grant of {int(meta['grant']):,} calls; the app and nginx "
        f"runs send a fixed `X-User-Id`. *max*: as fast as the connections go (closed loop, so "
        f"latency there is mostly queueing); *paced*: each connection pauses a random time between "
        f"requests, exponentially distributed with a mean of {meta['pace_ms']} ms (wrk's `delay()`), "
        f"so arrivals are close to Poisson at a rate every path sustains.")
    add("- nginx: `nginx -c <private nginx.conf> -p <tmp>` with `worker_processes auto`, "
        "`proxy_pass` to an upstream block with `keepalive 64`, `proxy_http_version 1.1`, "
        "X-Forwarded-For/-Proto and X-Request-Id set, access log on (the sidecar logs every request too).")
    add(f"- Sidecar: `tollgate-sidecar` with `demo/idoctor/routes.yaml`, its per-user limit raised to "
        f"`rate: 1000, burst: 100000` (so that it never refuses the benchmark), settle window "
        f"{meta.get('settle_s', '10')} s, everything else default (fail-closed, 250 ms Redis timeout, one "
        f"JSON log line per request to a file).")
    add(f"- Set-up through the control plane's API: `tollgate-control-plane migrate`, `seed`, `serve`; "
        f"`admin create`; per user `POST /v1/auth/register`, `POST /v1/api-keys`, "
        f"`POST /v1/admin/users/{{id}}/grants` of api_calls_l3_detect; then every credential is "
        f"checked through the sidecar before the first run. Before each run the demo app is "
        f"restarted (empty store). *cp paused*: the control plane stopped with SIGSTOP for the run, "
        f"so that the sidecar is Redis's only client.")
    add("")
    sidecar_label = lambda c: CASE_LABELS[c]
    for mode, title in (("max", f"Saturation (max), {conns} connections"),
                        ("paced", f"Paced (random pauses, mean {meta['pace_ms']} ms per connection)")):
        if not any(m == mode for _, m in by):
            continue
        add(f"### {title}")
        add("")
        ng = by.get(("nginx", mode))
        trs = []
        for c in CASES:
            r = by.get((c, mode))
            if not r:
                continue
            rel = f"{r['rps'] / ng['rps'] * 100:.0f} %" if ng else "—"
            rss = f"{r['sidecar_rss_max_kb'] / 1024:.1f} MB" if c in SIDECAR_CASES and r["sidecar_rss_max_kb"] else "—"
            sc = r["cpu_us_per_request"].get("sidecar") if c in SIDECAR_CASES else None
            trs.append([sidecar_label(c), f"{r['rps']:,.0f}", rel, f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                        f"{r['p99_ms']:.2f}", f"{r['p999_ms']:.2f}", r["non_2xx"] + r["socket_errors"],
                        fmt(sc, 0), rss])
        L.extend(table(["path", "req/s", "vs nginx", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "non-2xx",
                        "sidecar CPU µs / request", "sidecar RSS max"],
                       "lrrrrrrrrr", trs))
        add("")
    if rows:
        add("### CPU per request (µs of CPU time per completed request) and cores used")
        add("")
        procs = ("wrk", "sidecar", "app", "nginx", "redis", "control_plane", "postgres")
        crs = []
        for r in rows:
            cells = []
            for p in procs:
                us = r["cpu_us_per_request"].get(p)
                cores = r["cpu_cores"].get(p)
                cells.append("—" if us is None or (us == 0 and p in ("sidecar", "nginx")) else f"{us:.0f} ({cores:.2f})")
            tries = f" ({r['attempts']} tries)" if r.get("attempts", 1) > 1 else ""
            crs.append([f"{r['case']}/{r['mode']}/c{r['connections']}{tries}"] + cells +
                       [f"{r['irq_cores']:.2f}", f"{r['other_cores']:.2f}", f"{r['machine_busy_cores']:.2f}"])
        L.extend(table(["run"] + list(procs) + ["irq (cores)", "not ours (cores)",
                                                f"machine busy (cores of {os.cpu_count()})"],
                       "l" + "r" * (len(procs) + 3), crs))
        add("")
        add("Per process: CPU µs per request, and in brackets the cores it kept busy on average. "
            "`postgres` is the run database's backends and the server's own processes (the usage drain's upserts, plus "
            "whatever else the server was doing); `control_plane` is mostly the usage drain, which "
            "records a minute's buckets a minute or more after the requests that filled them, so a "
            "short run's figure is the drain of earlier minutes (the scale run below measures it from "
            "the first request until the drain caught up); *irq* is interrupt time (loopback TCP is "
            "processed in softirq, so mostly ours); *not ours* is other processes' time (a build, another "
            f"test suite): a run with more than {meta.get('noise_limit', '0.2')} cores of it was measured "
            "again, up to three times, and the quietest attempt is shown.")
        add("")
    side = [r for r in rows if r["case"] in SIDECAR_CASES]
    if side:
        add("### Redis per decision (INFO commandstats deltas over the measured run)")
        add("")
        add("*Admitted* is the sidecar's `tollgate_sidecar_requests_total{decision=\"allowed\"}` delta, "
            "read once no request is in flight (the denominator), beside wrk's 2xx count (which misses "
            "requests in flight when wrk stops). *Round trips* are the commands only a client sends "
            "(EVALSHA, HGETALL of an API-key lookup, ZADD of a key-use note, PING). *Inside decide.lua* "
            "are the commands Redis ran inside the scripts, per EVALSHA. With the control plane "
            "paused, the sidecar is Redis's only client and these are exactly one decision's cost; "
            "with it draining, its EVALSHAs (`drain_claim.lua`, `drain_done.lua`, 1,024 shard calls a "
            "pass) and their commands are in the same counters, so those rows are upper bounds (the "
            "MONITOR sample below attributes them).")
        add("")
        rrs = []
        for r in side:
            x = r["redis"]
            inner = ", ".join(f"{c} {n:g}" for c, n in x["inner_per_evalsha"].items()) or "—"
            others = ", ".join(f"{c} {n:,}" for c, n in sorted(r["other_commands"].items())) or "none"
            rrs.append([f"{r['case']}/{r['mode']}/c{r['connections']}", "paused" if r["cp_paused"] else "draining",
                        f"{r['allowed']:,} / {r['wrk_2xx']:,}", fmt(x["round_trips_per_admitted"], 4),
                        fmt(x["evalsha_per_admitted"], 4), fmt(x["inner_total_per_evalsha"], 2), inner,
                        fmt(x["evalsha_usec_per_call"], 1), fmt(r["cp_pg_us_per_admitted"], 1), others])
        L.extend(table(["run", "control plane", "admitted: sidecar / wrk 2xx", "round trips / admitted",
                        "EVALSHA / admitted", "inside scripts / EVALSHA", "inside, by command / EVALSHA",
                        "µs in Redis / EVALSHA", "CP + PG CPU µs / admitted", "commands of no script"],
                       "llrrrrlrrl", rrs))
        add("")
    mon_dir = os.path.join(args.runs, "monitor")
    mon = attribute_monitor(mon_dir) if os.path.exists(os.path.join(mon_dir, "monitor.txt")) else None
    if mon:
        add("### Who sent what: five seconds of MONITOR during the API-key warm-up")
        add("")
        add("Each command is attributed to the process owning the client connection (`ss -tnp`; "
            "names are cut to 15 characters by the kernel), or to a Lua script's own `redis.call` "
            "(MONITOR does not say which script). For scale: the sidecar's admitted-request counter "
            f"rose by {mon['sidecar_allowed']:,} between two metric scrapes around the sample (a "
            "slightly longer window than the sample).")
        add("")
        L.extend(table(["sender", "command", "count"], "llr",
                       [[who, cmd, f"{n:,}"] for who, cmd, n in mon["counts"][:24]]))
        add("")
    refusal = [r for r in rows if r["case"] == "refusal"]
    if refusal:
        r = refusal[0]
        x = r["redis"]
        add("### A client hammering after its quota is exhausted")
        add("")
        add(f"One user on the free plan (100 calls a month), used up before the run, sends `POST /l3/p-<n>` "
            f"with its API key at {r['connections']} connections for {r['duration_s']:.0f} s; the control "
            "plane paused, so every Redis command counted is the sidecar's.")
        add("")
        others = ", ".join(f"{c} {n:,}" for c, n in sorted(r["redis_delta"].items())) or "none"
        L.extend(table(["refused/s", "p50 ms", "p99 ms", "refused (sidecar)", "admitted (sidecar)",
                        "EVALSHA / refused", "round trips / refused", "sidecar CPU µs / request",
                        "Redis CPU µs / request", "every Redis command in the run"],
                       "rrrrrrrrrl",
                       [[f"{r['rps']:,.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['refused']:,}",
                         f"{r['allowed']:,}", fmt(x["evalsha_per_refused"], 4), fmt(x["round_trips_per_refused"], 4),
                         fmt(r["cpu_us_per_request"].get("sidecar"), 0), fmt(r["cpu_us_per_request"].get("redis"), 0),
                         others]]))
        add("")
    sweep = sorted((r for r in rows if r["mode"] == "max" and r["case"] in SWEEP_PATHS),
                   key=lambda r: (SWEEP_PATHS.index(r["case"]), r["connections"]))
    if len({r["connections"] for r in sweep}) > 1:
        add("### Throughput and p99 against connections (saturation, control plane draining)")
        add("")
        links, why = plot(rows, args.plots, args.out)
        for title, link in links:
            add(f"![{title}]({link})")
            add("")
        if why:
            add(f"(No plots: {why}.)")
            add("")
        L.extend(table(["path", "connections", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "non-2xx"], "lrrrrrr",
                       [[CASE_LABELS[r["case"]], r["connections"], f"{r['rps']:,.0f}", f"{r['p50_ms']:.2f}",
                         f"{r['p99_ms']:.2f}", f"{r['p999_ms']:.2f}", r["non_2xx"] + r["socket_errors"]]
                        for r in sweep]))
        add("")
    if peers:
        L.extend(peers_section(peers))
    if scale_run:
        L.extend(scale_section(scale_run, meta))
    if side:
        add("### Sidecar internals during the runs")
        add("")
        L.extend(table(["run", "decision mean ms (auth + Redis)", "upstream mean ms",
                        "context switches / request", "RSS max"], "lrrrr",
                       [[f"{r['case']}/{r['mode']}/c{r['connections']}", fmt(r["decision_mean_ms"], 3),
                         fmt(r["upstream_mean_ms"], 3), fmt(r["sidecar_ctx_switches_per_request"], 2),
                         f"{r['sidecar_rss_max_kb'] / 1024:.1f} MB" if r["sidecar_rss_max_kb"] else "—"]
                        for r in side]))
        add(f"\nThe sidecar's RSS after all runs: {int(meta['rss_after_kb']) / 1024:.1f} MB.")
        add("")
    if args.profile and os.path.exists(args.profile):
        L.extend(profile_section(args.profile))
    add("### Targets")
    add("")
    L.extend(table(["target", "measured", "verdict"], "lll", verdicts(by, rows, peers, scale_run)))
    add("")
    add(END)
    section = "\n".join(L)

    text = ""
    if os.path.exists(args.out):
        with open(args.out) as f:
            text = f.read()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + section + tail
    else:
        text = "# Benchmark results\n\n" + section + "\n"
    with open(args.out, "w") as f:
        f.write(text)


def peers_section(peers):
    L = ["### Tollgate's decision beside Limitador, on the same Redis (`tollgate-peers`)", ""]
    thr = [p for p in peers if p["kind"] == "throughput"]
    acc = [p for p in peers if p["kind"] == "accuracy"]
    if thr:
        t = thr[0]
        L.append(f"Both check and update, per decision, a monthly quota and a per-second rate limit of one "
                 f"of {t['users']:,} users, as two instances in one process (two Redis connections, as two "
                 f"sidecars or two Limitador replicas), `concurrency` tasks split over them deciding as fast "
                 f"as they can for {t['seconds']:.0f} s after a 1 s warm-up; limits high enough that nothing "
                 "is refused. Tollgate: `Store::decide` (decide.lua by SHA through fred, what the sidecar "
                 "calls; it also writes the request's settle marker and usage bucket). Limitador 0.14 "
                 "(`default-features = false`, `redis_storage`): `AsyncRateLimiter::"
                 "check_rate_limited_and_update` over `AsyncRedisStorage` (a read script, then an update "
                 "script per counter) and over `CachedRedisStorage` (counters cached in the process, "
                 "flushed to Redis in batches every second). Redis commands count everything Redis "
                 "executed (inside scripts too) per decision; Redis CPU is INFO cpu; client CPU is this "
                 "harness's own (routing, encoding, the Redis client). The control plane is paused and "
                 "the sidecar idle meanwhile.")
        L.append("")
        rows = []
        for p in thr:
            cmds = ", ".join(f"{c} {n / p['decisions']:.3g}" for c, n in sorted(p["redis_commands"].items())
                             if p["decisions"]) or "none"
            rows.append([PEER_LABELS.get(p["system"], p["system"]), p["concurrency"], f"{p['per_s']:,.0f}",
                         f"{p['p50_ms']:.3f}", f"{p['p99_ms']:.3f}", f"{p['p999_ms']:.3f}",
                         f"{p['redis_commands_per_decision']:.3g}", cmds, f"{p['redis_usec_per_decision']:.1f}",
                         f"{p['redis_cpu_us_per_decision']:.1f}", f"{p['client_cpu_us_per_decision']:.1f}",
                         f"{p['refused']:,}"])
        L.extend(table(["system", "concurrency", "decisions/s", "p50 ms", "p99 ms", "p99.9 ms",
                        "Redis commands / decision (EVALSHA included)", "by command / decision", "commandstats µs / decision",
                        "Redis CPU µs / decision", "client CPU µs / decision", "refused"],
                       "lrrrrrrlrrrr", rows))
        L.append("")
    if acc:
        a0 = acc[0]
        L.append(f"Accuracy: {a0['requests']:,} decisions started at once for one fresh user with "
                 f"{a0['remaining']:,} left of its quota, alternating between the two instances; exact "
                 f"admission is {a0['exact']:,}. One round per fresh user, {len(a0['admitted'])} rounds.")
        L.append("")
        L.extend(table(["system", "admitted per round", "exact", "over-admitted (sum)", "under-admitted (sum)"],
                       "llrrr",
                       [[PEER_LABELS.get(a["system"], a["system"]), ", ".join(f"{n:,}" for n in a["admitted"]),
                         f"{a['exact']:,}", f"{a['over_admitted']:,}", f"{a['under_admitted']:,}"] for a in acc]))
        L.append("")
    return L


def scale_section(s, meta):
    L = [f"### Scale: {s['admitted']:,} admitted requests from {s['users']:,} users, control plane draining", ""]
    L.append(f"wrk at {meta['connections']} connections over the users' API keys, stopped (SIGINT) once the "
             f"sidecar had admitted {int(meta.get('scale_requests', 0)):,}: {s['requests']:,} requests in {s['load_s']} s "
             f"({s['rps']:,.0f} req/s, p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms, non-2xx {s['non_2xx']:,}); "
             f"the sidecar admitted {s['admitted']:,}. Before it, the script waited until Redis held no usage "
             "bucket and no settle marker (the users' own state only). The drain caught up (no bucket left) "
             f"{s['drain_wait_s']} s after the last request.")
    L.append("")
    rows = []
    for t in s["timeline"]:
        k = t["keys"]
        rows.append([t["label"], f"{t['used_memory'] / 1e6:,.2f}", f"{t['growth'] / 1e6:+,.2f}",
                     f"{t['users_growth'] / 1e6:+,.2f}", f"{t['growth_beyond_users'] / 1e6:+,.2f}",
                     f"{t['dbsize']:,}", f"{k['user hashes']:,}", f"{k['API-key hashes']:,}",
                     f"{k['usage buckets']:,} / {k['staged buckets']:,}", f"{k['settle markers']:,}", f"{k['other']:,}"])
    L.extend(table(["when", "used_memory MB", "growth MB", "of which users' hashes MB", "growth beyond the users MB",
                    "DBSIZE", "user hashes", "API-key hashes", "buckets live / staged", "settle markers", "other"],
                   "lrrrrrrrrrr", rows))
    L.append("")
    L.append(f"The users' own state: {s['user_state_bytes']:,} bytes of `used_memory` per user (the Redis "
             "before any user existed against the quiet state before this run: user hash, API-key hash, "
             f"the key-use set), of which MEMORY USAGE says {s['user_hash_bytes']:,} bytes for a user hash "
             f"(limits, quota counter, rate-limit state) and {s['key_hash_bytes']:,} for an API-key hash. "
             "*Growth beyond the users* is the growth of `used_memory` less the growth of the MEMORY USAGE "
             "of the user and API-key hashes.")
    L.append("")
    w = s["pg_written"]
    L.extend(table(["table", "inserted", "updated", "deleted", "rows after"], "lrrrr",
                   [[t, f"{w[t]['ins']:,}", f"{w[t]['upd']:,}", f"{w[t]['del']:,}",
                     f"{s['pg_rows'].get('rows_' + t.split('_')[1], 0):,}"] for t in w]))
    L.append("")
    L.append("`postgres` CPU is that of this run's database's backends and of the server's own processes "
             "(WAL writer, checkpointer, ...), summed per process.")
    L.append("")
    L.append(f"PostgreSQL rows written (pg_stat_user_tables n_tup_ins + n_tup_upd, before the run → after the "
             f"drain caught up): {s['pg_rows_written']:,}, i.e. {fmt(s['pg_rows_per_million'], 0)} per "
             f"1,000,000 admitted requests. The ledger's calls for the run's minutes: {s['ledger_calls']:,} "
             f"(the sidecar admitted {s['admitted']:,}). Control plane + PostgreSQL CPU from the first request "
             f"until the drain caught up ({s['cp_pg_window_s']} s): {s['cp_pg_cpu_s']} s (control plane "
             f"{s['cp_cpu_s']} s, PostgreSQL {s['pg_cpu_s']} s), "
             f"{fmt(s['cp_pg_us_per_admitted'], 2)} µs per admitted request; idle they use "
             f"{s['idle_cp_pg_cores']:.4f} cores (10 s measured before the run; Redis meanwhile ran "
             f"{fmt(s.get('idle_redis_commands_per_s'), 0)} commands/s, {fmt(s.get('idle_evalsha_per_s'), 0)} of them "
             f"EVALSHA, {fmt(s.get('idle_redis_cores'), 4)} cores, for the drain's passes), which leaves "
             f"{fmt(s['cp_pg_us_per_admitted_net_idle'], 2)} µs per admitted request that the traffic caused. "
             f"EVALSHA per admitted request during the load, the drain's included: "
             f"{fmt(s['evalsha_per_admitted'], 4)}; sidecar CPU {fmt(s['sidecar_cpu_us_per_admitted'], 1)} µs "
             f"and Redis CPU {fmt(s['redis_cpu_us_per_admitted'], 1)} µs per admitted request.")
    L.append("")
    return L


def verdicts(by, rows, peers, scale_run):
    out = []

    def add(target, measured, ok, miss=""):
        out.append([target, measured, "met" if ok else f"missed{' by ' + miss if miss else ''}"])

    for mode in ("max", "paced"):
        for c in ("jwt_cp_paused", "api_key_cp_paused"):
            r = by.get((c, mode))
            if r and r["redis"].get("round_trips_per_admitted") is not None:
                x = r["redis"]
                add(f"≤ 1.0 Redis calls per admitted request ({c}, {mode})",
                    f"{x['round_trips_per_admitted']:.5f} ({x['round_trips']:,} for {r['allowed']:,})",
                    x["round_trips"] <= r["allowed"], f"{x['round_trips'] - r['allowed']:+,} calls")
            if r and r["redis"].get("inner_total_per_evalsha") is not None:
                n = r["redis"]["inner_total_per_evalsha"]
                add(f"≤ 5 Redis commands per decision ({c}, {mode})", f"{n:.3f} inside each EVALSHA", n <= 5,
                    f"{n - 5:.3f}")
                us = r["redis"]["evalsha_usec_per_call"]
                add(f"≤ 12 µs of Redis per decision ({c}, {mode})", f"{us:.1f} µs per EVALSHA", us <= 12,
                    f"{us - 12:.1f} µs")
    if scale_run and scale_run.get("cp_pg_us_per_admitted") is not None:
        v = scale_run["cp_pg_us_per_admitted"]
        add("≤ 5 µs control plane + PostgreSQL CPU per admitted request (scale run)",
            f"{v:.2f} µs ({scale_run['cp_pg_us_per_admitted_net_idle']:.2f} net of idle)", v <= 5, f"{v - 5:.2f} µs")
    ng = by.get(("nginx", "max"))
    for c in SIDECAR_CASES:
        r = by.get((c, "max"))
        if r and ng:
            share = r["rps"] / ng["rps"]
            add(f"≥ 0.5× nginx's pass-through req/s, aim 0.8× ({c})",
                f"{r['rps']:,.0f} vs {ng['rps']:,.0f} = {share:.2f}×", share >= 0.5, f"{0.5 - share:.2f}×")
    ng = by.get(("nginx", "paced"))
    for c in SIDECAR_CASES:
        r = by.get((c, "paced"))
        if r and ng:
            added = r["p99_ms"] - ng["p99_ms"]
            add(f"≤ 1 ms added p99 over nginx at the paced load ({c})",
                f"{r['p99_ms']:.2f} − {ng['p99_ms']:.2f} = {added:+.2f} ms", added <= 1.0, f"{added - 1:.2f} ms")
    for c in SIDECAR_CASES:
        r = by.get((c, "max"))
        if r and r["cpu_us_per_request"].get("sidecar") is not None:
            us = r["cpu_us_per_request"]["sidecar"]
            add(f"≤ 25 µs sidecar CPU per request ({c}, max)", f"{us:.0f} µs", us <= 25, f"{us - 25:.0f} µs")
    rss = [(r["sidecar_rss_max_kb"], r["case"], r["mode"]) for r in rows
           if r["case"] in SIDECAR_CASES + ("refusal",) and r["sidecar_rss_max_kb"]]
    if rss:
        kb, c, m = max(rss)
        add("≤ 40 MB resident under load", f"max {kb / 1024:.1f} MB ({c}/{m})", kb / 1024 <= 40,
            f"{kb / 1024 - 40:.1f} MB")
    for r in rows:
        if r["case"] == "refusal" and r["redis"].get("round_trips_per_refused") is not None:
            v = r["redis"]["round_trips_per_refused"]
            add("0 Redis calls per refused request (quota exhausted)",
                f"{v:.4f} ({r['redis']['round_trips']:,} for {r['refused']:,} refused)", v == 0, f"{v:.4f}")
    thr = {(p["system"], p["concurrency"]): p for p in peers if p["kind"] == "throughput"}
    acc = {p["system"]: p for p in peers if p["kind"] == "accuracy"}
    for (system, conc), t in sorted(thr.items()):
        if system == "tollgate":
            continue
        tg = thr.get(("tollgate", conc))
        if tg and t["per_s"]:
            ratio = tg["per_s"] / t["per_s"]
            add(f"Tollgate decisions/s ≥ 2× {system}'s (concurrency {conc})",
                f"{tg['per_s']:,.0f} vs {t['per_s']:,.0f} = {ratio:.2f}×", ratio >= 2, f"{2 - ratio:.2f}×")
    if "tollgate" in acc:
        a = acc["tollgate"]
        others = "; ".join(f"{s}: {acc[s]['over_admitted']:,} over" for s in acc if s != "tollgate")
        add("exact admission over two instances (Tollgate)",
            f"over {a['over_admitted']:,}, under {a['under_admitted']:,} in {len(a['admitted'])} rounds"
            + (f" ({others})" if others else ""),
            a["over_admitted"] == 0 and a["under_admitted"] == 0)
    if scale_run:
        v = scale_run["growth_beyond_users_mb"]
        add("≤ 10 MB Redis growth beyond the users' own state (scale run, after the drain)",
            f"{v:+.2f} MB (peak {scale_run['peak_growth_beyond_users_mb']:+.2f} MB, settle markers alive)",
            v <= 10, f"{v - 10:.2f} MB")
    return out


def profile_section(path):
    """Top symbols and CPU by crate from a flat `perf report --sort sym`."""
    by_crate = Counter()
    top = []
    with open(path) as f:
        for line in f:
            m = re.match(r"\s*([\d.]+)%\s+\[([.k])\]\s+(.*\S)", line)
            if not m:
                continue
            pct, kind, sym = float(m.group(1)), m.group(2), m.group(3)
            top.append((pct, kind, sym))
            by_crate[crate_of(kind, sym)] += pct
    L = ["### Where the sidecar's CPU goes (perf, cpu-clock samples, one more jwt/max run)", ""]
    L.append("| share | crate or area |")
    L.append("| ---: | --- |")
    for crate, pct in by_crate.most_common(14):
        L.append(f"| {pct:.1f} % | {crate} |")
    L += ["", "<details><summary>Top 30 symbols</summary>", "", "| share | symbol |", "| ---: | --- |"]
    for pct, kind, sym in sorted(top, reverse=True)[:30]:
        short = re.sub(r"::h[0-9a-f]{16}$", "", sym)
        short = short if len(short) <= 140 else short[:137] + "..."
        short = short.replace("|", "\\|")
        tag = "[k] " if kind == "k" else ""
        L.append(f"| {pct:.2f} % | `{tag}{short}` |")
    L += ["", "</details>", ""]
    return L


def crate_of(kind, sym):
    if kind == "k":
        return "kernel (syscalls: network, futex, scheduling)"
    s = sym.lstrip("<&*")
    s = re.sub(r"^(dyn |impl |mut )", "", s)
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)::", s)
    if m:
        return m.group(1)
    if re.match(r"(__)?(mem|str)\w+|malloc|free|cfree|realloc|_int_\w+|__libc\w*|pthread\w*|__lll\w*|syscall|epoll\w*", s):
        return "libc (malloc/free, memcpy, syscall stubs)"
    return "other: " + s[:40]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("case")
    c.add_argument("--name", required=True)
    c.add_argument("--mode", required=True)
    c.add_argument("--pace", default="0")
    c.add_argument("--connections", default="0")
    c.add_argument("--dir", required=True)
    c.add_argument("--lua", required=True)
    m = sub.add_parser("monitor")
    m.add_argument("--url", required=True)
    m.add_argument("--seconds", default="1")
    m.add_argument("--out", required=True)
    w = sub.add_parser("write")
    w.add_argument("--results", required=True)
    w.add_argument("--runs", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--plots", required=True)
    w.add_argument("--peers", default="")
    w.add_argument("--scale", default="")
    w.add_argument("--profile", default="")
    w.add_argument("--meta", nargs="*", default=[])
    sc = sub.add_parser("scale")
    sc.add_argument("--dir", required=True)
    sc.add_argument("--users", required=True)
    sc.add_argument("--users-state", required=True)
    args = p.parse_args()
    {"case": case, "monitor": monitor, "scale": scale, "write": write}[args.cmd](args)


if __name__ == "__main__":
    main()
