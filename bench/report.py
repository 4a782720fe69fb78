#!/usr/bin/env python3
"""bench/report.py — the arithmetic of bench/load.sh (standard library only).

  report.py case --name N --mode M --pace MS --dir RUN_DIR --lua LUA_DIR   one run → one JSON line
  report.py monitor --url REDIS_URL --seconds S --out FILE                 MONITOR for S seconds
  report.py write --results results.jsonl --runs RUNS_DIR --out RESULTS.md --meta k=v ...

`write` replaces only the part of RESULTS.md between the MEASURED markers; the analysis around it
is written by hand and kept.
"""

import argparse
import datetime
import json
import os
import platform
import re
import socket
import sys
import time
import urllib.parse
from collections import Counter, defaultdict

BEGIN = "<!-- BEGIN MEASURED (bench/load.sh rewrites this part) -->"
END = "<!-- END MEASURED -->"

# What the sidecar itself sends (sidecar/src/store.rs, lib.rs): decide/settle by SHA, the API-key
# lookup, the key-use note, readiness pings, script loading, the invalidation subscription.
SIDECAR_COMMANDS = {"evalsha", "eval", "hgetall", "zadd", "ping", "script|load", "subscribe"}
SIDECAR_CASES = ("jwt", "api_key", "jwt_cp_paused", "api_key_cp_paused")
CASES = ("app", "nginx") + SIDECAR_CASES
CASE_LABELS = {
    "app": "demo app directly",
    "nginx": "nginx → app",
    "jwt": "sidecar (JWT) → app",
    "api_key": "sidecar (API key) → app",
    "jwt_cp_paused": "sidecar (JWT) → app, control plane paused",
    "api_key_cp_paused": "sidecar (API key) → app, control plane paused",
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
            if len(parts) >= 2:
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
    admitted = requests - non_2xx

    before_calls, before_usec = read_commandstats(os.path.join(d, "before.redis"))
    after_calls, after_usec = read_commandstats(os.path.join(d, "after.redis"))
    delta = {c: after_calls[c] - before_calls.get(c, 0) for c in after_calls}
    delta = {c: n for c, n in delta.items() if n > 0}
    delta_usec = {c: after_usec[c] - before_usec.get(c, 0) for c in delta}
    inside = script_commands(args.lua)
    sidecar_calls = sum(n for c, n in delta.items() if c in SIDECAR_COMMANDS)
    script_inner = sum(n for c, n in delta.items() if c in inside and c not in SIDECAR_COMMANDS)
    others = {c: n for c, n in delta.items() if c not in SIDECAR_COMMANDS and c not in inside}

    pb, pa = read_proc(os.path.join(d, "before.proc")), read_proc(os.path.join(d, "after.proc"))
    clk = pa["clk_tck"][0]
    wall = (pa["wall_ns"][0] - pb["wall_ns"][0]) / 1e9
    cpu = {}
    for proc in ("sidecar", "app", "nginx", "redis", "control_plane", "postgres"):
        if proc in pa and proc in pb:
            cpu[proc] = (pa[proc][0] - pb[proc][0]) / clk
    cpu["wrk"] = pa.get("wrk_cpu_s", [0.0])[0]
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

    mb = read_metrics(os.path.join(d, "before.metrics"))
    ma = read_metrics(os.path.join(d, "after.metrics"))

    def mean_ms(name):
        n = metric_sum(ma, name + "_count") - metric_sum(mb, name + "_count")
        s = metric_sum(ma, name + "_sum") - metric_sum(mb, name + "_sum")
        return round(s / n * 1000, 3) if n else None

    allowed = metric_sum(ma, "tollgate_sidecar_requests_total", decision="allowed") - metric_sum(
        mb, "tollgate_sidecar_requests_total", decision="allowed"
    )

    rss = []
    with open(os.path.join(d, "rss.txt")) as f:
        rss = [int(x) for x in f.read().split() if x.isdigit()]

    is_sidecar = args.name in SIDECAR_CASES
    # The denominator is counted in Redis, at the same instants as commandstats: wrk's count
    # misses the requests in flight when it stops (up to one per connection), and so does the
    # sidecar's `allowed` counter for those of them whose client went away mid-request.
    # Redis's own count of admitted requests is the usage events decide.lua appended (one XADD per
    # admitted fixed-cost request; refunds would append markers, and there are none here).
    events = delta.get("xadd", 0)
    denominator = events if is_sidecar else 0
    out = {
        "case": args.name,
        "mode": args.mode,
        "pace_ms": int(args.pace),
        "duration_s": round(duration, 2),
        "requests": requests,
        "rps": round(requests / duration, 1),
        "non_2xx": non_2xx,
        "socket_errors": socket_errors,
        "admitted": admitted,
        "p50_ms": round(w["p50_us"] / 1000, 3),
        "p90_ms": round(w["p90_us"] / 1000, 3),
        "p99_ms": round(w["p99_us"] / 1000, 3),
        "p999_ms": round(w["p999_us"] / 1000, 3),
        "mean_ms": round(w["mean_us"] / 1000, 3),
        "max_ms": round(w["max_us"] / 1000, 3),
        "redis_delta": delta,
        "redis_usec": delta_usec,
        "sidecar_calls": sidecar_calls,
        "redis_admitted": events if is_sidecar else None,
        "sidecar_calls_per_admitted": round(sidecar_calls / denominator, 5) if denominator else None,
        "script_inner_per_admitted": round(script_inner / denominator, 3) if denominator else None,
        "other_commands": others,
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
        "sidecar_allowed": int(allowed) if is_sidecar else None,
        "decision_mean_ms": mean_ms("tollgate_sidecar_decision_duration_seconds") if is_sidecar else None,
        "upstream_mean_ms": mean_ms("tollgate_sidecar_upstream_duration_seconds") if is_sidecar else None,
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


def write(args):
    rows = [json.loads(l) for l in open(args.results) if l.strip()]
    meta = dict(kv.split("=", 1) for kv in args.meta)
    by = {(r["case"], r["mode"]): r for r in rows}
    model, mem_kb = machine()
    measured = datetime.datetime.fromtimestamp(os.path.getmtime(args.results), datetime.timezone.utc)
    now = measured.strftime("%Y-%m-%d %H:%M UTC")
    L = []
    add = L.append
    add(BEGIN)
    add("")
    add(f"Measured {now} by `bench/load.sh` (commit {meta.get('commit', '?')}).")
    add("")
    add("### Machine and software")
    add("")
    add(f"- {os.cpu_count()} cores (`nproc`), {model}, {mem_kb / 1024 / 1024:.1f} GiB memory, "
        f"Linux {platform.release()}; everything below ran on this one machine at once.")
    add(f"- wrk {meta.get('wrk')}, nginx {meta.get('nginx')} (Debian), Redis {meta.get('redis')} "
        f"({'a private redis-server started by the script' if meta.get('redis_private') == 'yes' else 'a shared server'}), "
        f"PostgreSQL {meta.get('postgres')}, rustc {meta.get('rustc')}; sidecar and demo app in the "
        f"release profile, control plane in the {meta.get('cp_profile', 'dev')} profile (it sets up, "
        f"then drains the usage events into PostgreSQL while the sidecar runs).")
    add(f"- Load: `wrk -t{meta['threads']} -c{meta['connections']} -d{meta['duration']}s --latency "
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
    add("- Sidecar: `tollgate-sidecar` with `demo/idoctor/routes.yaml`, its per-user limit raised to "
        "`rate: 1000, burst: 100000` (see problem B below), everything else default (fail-closed, 50 ms "
        "Redis timeout, one JSON log line per request to a file).")
    add(f"- Set-up through the control plane's API: `tollgate-control-plane migrate`, `seed`, `serve`; "
        f"`admin create`; {meta['users']} × (`POST /v1/auth/register`, `POST /v1/api-keys`, "
        f"`POST /v1/admin/users/{{id}}/grants` of api_calls_l3_detect); then every credential is "
        f"checked through the sidecar before the first run. Before each run the demo app is "
        f"restarted (empty store) and the usage streams are drained to empty.")
    add("")
    for mode, title in (("max", "Saturation (max)"), ("paced", f"Paced (random pauses, mean {meta['pace_ms']} ms per connection)")):
        add(f"### {title}")
        add("")
        add("| path | req/s | vs nginx | p50 ms | p90 ms | p99 ms | p99.9 ms | non-2xx | Redis calls / admitted | sidecar RSS max |")
        add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        ng = by.get(("nginx", mode))
        for c in CASES:
            r = by.get((c, mode))
            if not r:
                continue
            rel = f"{r['rps'] / ng['rps'] * 100:.0f} %" if ng else "—"
            rss = f"{r['sidecar_rss_max_kb'] / 1024:.1f} MB" if c in SIDECAR_CASES and r["sidecar_rss_max_kb"] else "—"
            calls = fmt(r["sidecar_calls_per_admitted"], 4) if r["sidecar_calls_per_admitted"] is not None else "—"
            add(f"| {CASE_LABELS[c]} | {r['rps']:,.0f} | {rel} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                f"{r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {r['non_2xx'] + r['socket_errors']} | {calls} | {rss} |")
        add("")
    add("### CPU per request (µs of CPU time per completed request) and cores used")
    add("")
    procs = ("wrk", "sidecar", "app", "nginx", "redis", "control_plane", "postgres")
    add("| run | " + " | ".join(procs) + " | irq (cores) | not ours (cores) | machine busy (cores of %d) |" % os.cpu_count())
    add("| --- |" + " ---: |" * (len(procs) + 3))
    for r in rows:
        cells = []
        for p in procs:
            us = r["cpu_us_per_request"].get(p)
            cores = r["cpu_cores"].get(p)
            cells.append("—" if us is None or (us == 0 and p in ("sidecar", "nginx")) else f"{us:.0f} ({cores:.2f})")
        tries = f" ({r['attempts']} tries)" if r.get("attempts", 1) > 1 else ""
        add(f"| {r['case']}/{r['mode']}{tries} | " + " | ".join(cells) +
            f" | {r['irq_cores']:.2f} | {r['other_cores']:.2f} | {r['machine_busy_cores']:.2f} |")
    add("")
    add("Per process: CPU µs per request, and in brackets the cores it kept busy on average. "
        "`postgres` is every PostgreSQL process on the server (the usage ledger's inserts, plus "
        "whatever else the server was doing); `control_plane` is mostly the usage drain; "
        "*irq* is interrupt time (loopback TCP is processed in softirq, so mostly ours); *not ours* "
        "is other processes' time (a build, another test suite): a run with more than "
        f"{meta.get('noise_limit', '0.2')} cores of it was measured again, up to three times, and "
        "the quietest attempt is shown.")
    add("")
    add("### Redis commands per admitted request (INFO commandstats deltas over the measured run)")
    add("")
    add("Admitted is counted three ways: usage events `decide.lua` appended (XADD; Redis's own count, "
        "the denominator), the sidecar's `tollgate_sidecar_requests_total{decision=\"allowed\"}`, and "
        "wrk's 2xx responses. The last two miss requests still in flight when wrk stops and closes "
        "its connections.")
    add("")
    add("| run | admitted: events / sidecar counter / wrk 2xx | sidecar round trips | per admitted | inside scripts / admitted | evalsha µs in Redis | other clients' commands |")
    add("| --- | ---: | --- | ---: | ---: | ---: | --- |")
    for r in rows:
        if r["case"] not in SIDECAR_CASES:
            continue
        d = r["redis_delta"]
        mine = ", ".join(f"{c} {n:,}" for c, n in sorted(d.items()) if c in SIDECAR_COMMANDS) or "none"
        ev = r["redis_usec"].get("evalsha")
        ev_per = f"{ev / d['evalsha']:.1f}" if ev and d.get("evalsha") else "—"
        others = ", ".join(f"{c} {n:,}" for c, n in sorted(r["other_commands"].items())) or "none"
        add(f"| {r['case']}/{r['mode']} | {r['redis_admitted']:,} / {r['sidecar_allowed']:,} / {r['admitted']:,} | {mine} | {fmt(r['sidecar_calls_per_admitted'], 5)} | "
            f"{fmt(r['script_inner_per_admitted'], 2)} | {ev_per} | {others} |")
    add("")
    mon_dir = os.path.join(args.runs, "monitor")
    mon = attribute_monitor(mon_dir) if os.path.exists(os.path.join(mon_dir, "monitor.txt")) else None
    if mon:
        add("### Who sent what: one second of MONITOR during the API-key warm-up")
        add("")
        add("Each command is attributed to the process owning the client connection (`ss -tnp`; "
            "names are cut to 15 characters by the kernel), or to a Lua script's own `redis.call`. "
            f"For scale: the sidecar's admitted-request counter rose by {mon['sidecar_allowed']:,} "
            "between two metric scrapes around the sample (a slightly longer window than the sample).")
        add("")
        add("| sender | command | count |")
        add("| --- | --- | ---: |")
        for who, cmd, n in mon["counts"][:20]:
            add(f"| {who} | {cmd} | {n:,} |")
        add("")
    add("### Sidecar internals during the runs")
    add("")
    add("| run | decision mean ms (auth + Redis) | upstream mean ms | context switches / request | RSS max |")
    add("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if r["case"] in SIDECAR_CASES:
            add(f"| {r['case']}/{r['mode']} | {fmt(r['decision_mean_ms'], 3)} | {fmt(r['upstream_mean_ms'], 3)} | "
                f"{fmt(r['sidecar_ctx_switches_per_request'], 2)} | {r['sidecar_rss_max_kb'] / 1024:.1f} MB |")
    add(f"\nThe sidecar's RSS after all runs: {int(meta['rss_after_kb']) / 1024:.1f} MB.")
    add("")
    if args.profile and os.path.exists(args.profile):
        L.extend(profile_section(args.profile))
    add("### Targets")
    add("")
    add("| target | measured | verdict |")
    add("| --- | --- | --- |")
    for line in verdicts(by):
        add(line)
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


def verdicts(by):
    out = []
    for mode in ("max", "paced"):
        for c in SIDECAR_CASES:
            r = by.get((c, mode))
            if r and r["sidecar_calls_per_admitted"] is not None:
                x = r["sidecar_calls_per_admitted"]
                extra = r["sidecar_calls"] - r["redis_admitted"]
                verdict = "met" if extra == 0 else f"missed by {extra:+,} calls ({(x - 1) * 100:+.3f} %)"
                out.append(f"| exactly 1.0 Redis call per admitted request ({c}, {mode}) | {x:.5f} "
                           f"({r['sidecar_calls']:,} calls for {r['redis_admitted']:,} admitted) | {verdict} |")
    ng = by.get(("nginx", "max"))
    for c in SIDECAR_CASES:
        r = by.get((c, "max"))
        if r and ng:
            share = r["rps"] / ng["rps"]
            out.append(f"| ≥ 50 % of nginx's pass-through req/s ({c}) | {r['rps']:,.0f} vs {ng['rps']:,.0f} = "
                       f"{share * 100:.0f} % | {'met' if share >= 0.5 else f'missed by {(0.5 - share) * 100:.0f} points'} |")
    for mode in ("paced", "max"):
        app = by.get(("app", mode))
        for c in SIDECAR_CASES:
            r = by.get((c, mode))
            if r and app:
                added = r["p99_ms"] - app["p99_ms"]
                out.append(f"| ≤ 1 ms added p99 at 32 connections ({c}, {mode}) | {r['p99_ms']:.2f} − {app['p99_ms']:.2f} "
                           f"= {added:+.2f} ms | {'met' if added <= 1.0 else f'missed by {added - 1:.2f} ms'} |")
    rss = [(by[(c, m)]["sidecar_rss_max_kb"], c, m) for c in SIDECAR_CASES for m in ("max", "paced")
           if (c, m) in by and by[(c, m)]["sidecar_rss_max_kb"]]
    if rss:
        kb, c, m = max(rss)
        mb = kb / 1024
        out.append(f"| ≤ 40 MB resident under load | max {mb:.1f} MB ({c}/{m}) | {'met' if mb <= 40 else f'missed by {mb - 40:.1f} MB'} |")
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
    w.add_argument("--profile", default="")
    w.add_argument("--meta", nargs="*", default=[])
    args = p.parse_args()
    {"case": case, "monitor": monitor, "write": write}[args.cmd](args)


if __name__ == "__main__":
    main()
