#!/usr/bin/env python3
"""tests/e2e/faults_check.py — issue #12's metering fault scenarios against a live stack
(85-faults.sh), every one under a bounded load of metered calls (POST /l3/{patient} through the
sidecar; patient `fail` makes the demo app answer 500, which the sidecar refunds):

  burst        2,000 calls of 20 users sent at once, 30 % failing: each user's `used`
               (GET /v1/quota) equals its 2xx answers exactly, and no 503.
  redis-pause  CLIENT PAUSE 2000 ALL, then 2000 WRITE, on the private Redis under load: errors,
               seconds from the end of the pause to the first 200, `used` == 2xx answers.
  pg-kill      pg_terminate_backend of every connection to the stack's database, three times
               under load (sidecar calls and /v1/quota): the control plane answers again, the
               sidecar never notices.
  drain faults at the next minute boundary, when the closed minute has buckets in many shards
               (96 more users make a few calls each just before it), each fault catching a
               drain pass inside its transaction (this script holds a SHARE lock on
               usage_minutes; the pass waits on it with its stamps claimed, nothing committed):
               pg_terminate_backend then; the control plane SIGKILLed then; and SIGKILLed after
               the pass committed but before it deleted its staged buckets (Redis writes paused
               to hold it there). The control plane is started again each time with the
               environment and command line of the process it replaces (/proc/PID/environ),
               recorded in the stack's pid files so that `scripts/stack down` stops it. Once
               every closed bucket is drained: ledger == 2xx answers for every user so far.
  redis-loss   the private redis-server SIGKILLed under load and started again empty: seconds
               to the first 200 (token and API key), `/v1/quota` during the rebuild never below
               what the ledger held for the user before the loss, and the calls lost.

Every scenario uses its own users. At the end, after the last minute has closed and drained,
per user: ledger (usage_minutes; usage_months agrees) == counter (/v1/quota used) == 2xx answers,
except the redis-loss users, whose counter == ledger and whose missing calls must be exactly
those of the minute Redis lost.

Standard library, psql and redis-cli. Traffic goes to 127.0.0.1 only, bounded in count and
time. Each scenario prints what it measured. Last line: `faults: N passed, M failed`.

`faults_check.py redis-start --port P --dir D` starts the private Redis (85-faults.sh uses it, so
that the restart here uses the very same arguments).
"""

import argparse
import asyncio
import base64
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

APP, QUOTA = "idoctor", "api_calls_l3_detect"
FAIL_SHARE = 0.3
RESULTS = []
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def check(name, ok, detail=""):
    RESULTS.append(bool(ok))
    print(f"{'ok' if ok else 'not ok'} - {name}{': ' + detail if detail else ''}", flush=True)


def note(text):
    print(f"# {text}", flush=True)


def call(method, url, body=None, headers=None, timeout=15):
    """(status, parsed JSON or text); status 0 when nothing answered."""
    data = None
    headers = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _NO_PROXY.open(req, timeout=timeout) as r:
            status, text = r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        return 0, str(e)
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text


def minute_start(t):
    return int(t // 60) * 60


# --- the private Redis -----------------------------------------------------------------------

def redis_start(port, folder):
    """Starts an empty, non-persistent redis-server on 127.0.0.1:port; waits for PING."""
    subprocess.run(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", folder, "--daemonize", "yes",
         "--pidfile", os.path.join(folder, "redis.pid"),
         "--logfile", os.path.join(folder, "redis.log")],
        check=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if redis_cli(port, "PING") == "PONG":
            return
        time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not answer PING")


def redis_cli(port, *args):
    r = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                       timeout=20)
    return r.stdout.strip()


def pid_gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def port_closed(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


def wait_gone(pid, port, seconds=10):
    """Until the process is gone and its port refuses connections: a killed multi-threaded
    process shows as a zombie while its other threads still hold its sockets."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pid_gone(pid) and port_closed(port):
            return True
        time.sleep(0.02)
    return False


def log_summary(path, since, top=4):
    """The most frequent WARN/ERROR lines of a JSON log since `since` (epoch seconds)."""
    counts = {}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since))
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if '"level":"WARN"' not in line and '"level":"ERROR"' not in line:
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("timestamp", "") < stamp:
                    continue
                key = f"{entry.get('level')} {entry.get('message')}"
                if entry.get("error"):
                    key += f" ({str(entry['error'])[:90]})"
                counts[key] = counts.get(key, 0) + 1
    except OSError:
        return "no log"
    lines = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return "; ".join(f"{n} x {k}" for k, n in lines) or "none"


class Stack:
    def __init__(self, a):
        self.cp, self.proxy = a.cp.rstrip("/"), a.proxy.rstrip("/")
        self.cp_port = int(self.cp.rsplit(":", 1)[1])
        self.proxy_host, self.proxy_port = self.proxy.split("//", 1)[1].split(":")
        self.proxy_port = int(self.proxy_port)
        self.stack_dir, self.db_url = a.stack_dir, a.database_url
        self.redis_port, self.redis_dir, self.prefix = a.redis_port, a.redis_dir, a.prefix
        self.cp_children = []

    # PostgreSQL, through psql (the stack's own database only).
    def psql(self, sql):
        r = subprocess.run(["psql", self.db_url, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                            "-c", sql], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"psql: {r.stderr.strip()}")
        return [line.split("|") for line in r.stdout.splitlines() if line]

    def terminate_backends(self):
        rows = self.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                         "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        return int(rows[0][0])

    def waiting_on_lock(self):
        rows = self.psql("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                         "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")
        return int(rows[0][0])

    def drain_stamps(self):
        return int(self.psql("SELECT count(*) FROM usage_drains")[0][0])

    def ledger(self, table="usage_minutes"):
        """{user id: calls} of the metered quota (cost 1: calls == amount == `used`)."""
        rows = self.psql(f"SELECT user_id, sum(calls), sum(amount) FROM {table} "
                         f"WHERE app_id = '{APP}' AND quota_key = '{QUOTA}' GROUP BY user_id")
        return {r[0]: int(r[1]) for r in rows}

    # Redis.
    def redis(self, *args):
        return redis_cli(self.redis_port, *args)

    def bucket_minutes(self):
        """Minute starts (s) of the usage buckets in Redis, live or staged."""
        out = subprocess.run(["redis-cli", "-p", str(self.redis_port), "--scan", "--pattern",
                              f"{self.prefix}:{{s:*}}:b:*"], capture_output=True, text=True,
                             timeout=30).stdout.split()
        minutes = []
        for key in out:
            part = key.split(":b:", 1)[1]
            minutes.append((int(part.split(":")[0]) // 1000, part.endswith(":d")))
        return minutes

    def staged(self):
        """{stamp: [(shard, minute start s)]} of the staged buckets."""
        keys = subprocess.run(["redis-cli", "-p", str(self.redis_port), "--scan", "--pattern",
                               f"{self.prefix}:{{s:*}}:b:*:d"], capture_output=True, text=True,
                              timeout=30).stdout.split()
        out = {}
        for key in keys:
            shard = int(key.split("{s:", 1)[1].split("}", 1)[0])
            minute = int(key.split(":b:", 1)[1].split(":")[0]) // 1000
            stamp = self.redis("HGET", key, "_id")
            if stamp:  # else drained since the scan
                out.setdefault(stamp, []).append((shard, minute))
        return {k: sorted(v) for k, v in out.items()}

    def closed_buckets(self):
        now = minute_start(time.time())
        return [m for m in self.bucket_minutes() if m[0] < now]

    def log(self, part):
        return os.path.join(self.stack_dir, "logs", f"{part}.log")

    def redis_pid(self):
        with open(os.path.join(self.redis_dir, "redis.pid")) as f:
            return int(f.read().strip())

    # The control plane's process.
    def cp_pid(self):
        with open(os.path.join(self.stack_dir, "pids", "control-plane.pid")) as f:
            return int(f.read().strip())

    def cp_kill(self):
        """SIGKILL; returns what it takes to start the same program again."""
        pid = self.cp_pid()
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [v for v in f.read().split(b"\0") if v]
        cwd = os.readlink(f"/proc/{pid}/cwd")
        os.kill(pid, signal.SIGKILL)
        for child in self.cp_children:
            if child.pid == pid:
                child.wait(timeout=10)
        if not wait_gone(pid, self.cp_port):
            raise RuntimeError(f"the control plane (pid {pid}) survived SIGKILL")
        return env, argv, cwd

    def cp_start(self, env, argv, cwd):
        """Starts the control plane like scripts/stack does (own session, log appended, pid
        files), and waits for /readyz; seconds it took."""
        started = time.monotonic()
        log = open(os.path.join(self.stack_dir, "logs", "control-plane.log"), "ab")
        child = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=log, start_new_session=True)
        log.close()
        self.cp_children.append(child)
        pids = os.path.join(self.stack_dir, "pids")
        with open(f"/proc/{child.pid}/stat") as f:
            start_time = f.read().rsplit(")", 1)[1].split()[19]
        for name, value in (("control-plane.pid", child.pid), ("control-plane.start", start_time)):
            with open(os.path.join(pids, name + ".tmp"), "w") as f:
                f.write(f"{value}\n")
            os.replace(os.path.join(pids, name + ".tmp"), os.path.join(pids, name))
        while time.monotonic() - started < 60:
            if child.poll() is not None:
                raise RuntimeError(f"the restarted control plane exited ({child.returncode})")
            if call("GET", self.cp + "/readyz", timeout=2)[0] == 200:
                return time.monotonic() - started
            time.sleep(0.1)
        raise RuntimeError("the restarted control plane is not ready after 60 s")

    def cp_metric(self, name, labels):
        status, text = call("GET", self.cp + "/metrics")
        if status != 200 or not isinstance(text, str):
            return None
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


class LockHolder:
    """A psql session holding SHARE on usage_minutes: a drain pass then waits inside its
    transaction (its stamps claimed, nothing committed) until the lock goes."""

    def __init__(self, stack):
        self.p = subprocess.Popen(["psql", stack.db_url, "-X", "-q", "-v", "ON_ERROR_STOP=1"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        self.p.stdin.write("BEGIN;\nLOCK TABLE usage_minutes IN SHARE MODE;\n\\echo locked\n")
        self.p.stdin.flush()
        if self.p.stdout.readline().strip() != "locked":
            raise RuntimeError("could not lock usage_minutes")

    def release(self):
        try:
            self.p.stdin.write("ROLLBACK;\n\\q\n")
            self.p.stdin.close()
        except OSError:
            pass  # terminated by pg_terminate_backend: the lock went with it
        self.p.wait(timeout=30)


# --- users and their calls -------------------------------------------------------------------

class User:
    def __init__(self, group, n):
        self.group, self.n = group, n
        self.id = self.token = self.api_key = self.shard = None
        self.lock = threading.Lock()
        self.ok = 0              # 2xx answers of metered calls
        self.unknown = 0         # sent, no answer: may or may not have been counted
        self.events = []         # (sent, done, status, error code, "token" or "api_key")

    def note(self, sent, done, status, code, via="token"):
        with self.lock:
            if 200 <= status < 300:
                self.ok += 1
            elif status == 0:
                self.unknown += 1
            self.events.append((sent, done, status, code, via))


def jwt_sub(token):
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"]


def setup_users(stack, admin, groups):
    users = [User(g, i) for g, n in groups for i in range(n)]
    tag = f"{os.getpid()}-{time.time_ns()}"
    errors = []

    def make(u):
        status, body = call("POST", stack.cp + "/v1/auth/register", {
            "email": f"faults-{u.group}-{u.n}-{tag}@example.com",
            "password": "faults-password-1"}, timeout=60)
        if status != 201:
            errors.append(f"register {status} {body}")
            return
        u.token = body["access_token"]
        u.id = jwt_sub(u.token)
        u.shard = uuid.UUID(u.id).int % 1024
        status, body = call("POST", f"{stack.cp}/v1/admin/users/{u.id}/grants", {
            "app": APP, "type": QUOTA, "amount": 1000000, "reason": "faults e2e: ample quota"},
            headers={"Authorization": f"Bearer {admin}"}, timeout=60)
        if status != 201:
            errors.append(f"grant {status} {body}")

    run_threads(make, users, 8)
    if errors:
        raise RuntimeError(f"setting up users failed: {errors[:3]}")
    return users


def run_threads(fn, items, width):
    items = list(items)
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not items:
                    return
                item = items.pop()
            fn(item)

    threads = [threading.Thread(target=worker) for _ in range(width)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def used(stack, user):
    """(status, used) of the metered quota from GET /v1/quota."""
    status, body = call("GET", f"{stack.cp}/v1/quota?app={APP}",
                        headers={"Authorization": f"Bearer {user.token}"}, timeout=10)
    if status != 200:
        return status, None
    for q in body.get("quotas", []):
        if q.get("type") == QUOTA:
            return status, q.get("used")
    return status, None


def settle_counters(stack, users, seconds=15.0):
    """Waits until every user's counter equals its 2xx answers (refunds may still be landing);
    (seconds waited, {user: (used, ok)} of those that never did)."""
    started = time.monotonic()
    while True:
        off = {}
        for u in users:
            _, n = used(stack, u)
            if n != u.ok:
                off[u] = (n, u.ok)
        if not off or time.monotonic() - started > seconds:
            return time.monotonic() - started, off
        time.sleep(0.5)


def describe_off(off):
    return ", ".join(f"{u.group}{u.n}: used {n} vs {ok} ok" for u, (n, ok) in list(off.items())[:6])


def tally(users, since=None, until=None):
    out = {}
    for u in users:
        for sent, done, status, code, _ in u.events:
            if (since is None or done >= since) and (until is None or done < until):
                key = f"{status}" + (f" {code}" if code else "")
                out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


class Load:
    """Keep-alive workers sending metered calls (30 % failing) for their users, each at most one
    call per `interval`, until stopped: a bounded load."""

    def __init__(self, stack, users, per_user=2, interval=0.03, api_key_user=None):
        self.stack, self.stop_at = stack, None
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.worker, args=(u, i, "token"), daemon=True)
                        for u in users for i in range(per_user)]
        if api_key_user is not None:
            self.threads.append(threading.Thread(target=self.worker, daemon=True,
                                                 args=(api_key_user, 0, "api_key")))
        self.interval = interval
        self.lost = []  # (exception, on a reused connection, the answer before on it)

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=60)
        if self.lost:
            kinds = {}
            for e in self.lost:
                kinds[e] = kinds.get(e, 0) + 1
            note(f"calls without an answer (error, on a reused connection, the answer before "
                 f"on it): {kinds}")

    def worker(self, user, i, via):
        conn, last = None, None
        n = i
        auth = ({"X-API-Key": user.api_key} if via == "api_key"
                else {"Authorization": f"Bearer {user.token}"})
        while not self.stopping.is_set():
            n += 1
            fail = (n % 10) < 3
            path = f"/l3/{'fail' if fail else f'p{user.n}-{n}'}"
            reused = conn is not None
            if conn is None:
                conn = http.client.HTTPConnection(self.stack.proxy_host, self.stack.proxy_port,
                                                  timeout=30)
            sent = time.time()
            try:
                # No body: the demo app does not read one, and a body it leaves unread makes
                # the connection close after the answer (not what these scenarios measure).
                conn.request("POST", path, headers=auth)
                r = conn.getresponse()
                body = r.read()
                code = None
                if r.status >= 400:
                    try:
                        code = json.loads(body).get("error", {}).get("code")
                    except ValueError:
                        pass
                user.note(sent, time.time(), r.status, code, via)
                last = (r.status, code, r.getheader("connection"))
                if (r.getheader("connection") or "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                user.note(sent, time.time(), 0, "no answer", via)
                self.lost.append((type(e).__name__, reused, last))
                conn.close()
                conn = None
            wait = self.interval - (time.time() - sent)
            if wait > 0:
                self.stopping.wait(wait)
        if conn is not None:
            conn.close()


class QuotaPoller:
    """GET /v1/quota for each user every `every` seconds: (time, user, status, used)."""

    def __init__(self, stack, users, every=0.25):
        self.stack, self.users, self.every = stack, users, every
        self.samples = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopping.set()
        self.thread.join(timeout=60)

    def run(self):
        while not self.stopping.is_set():
            for u in self.users:
                status, n = used(self.stack, u)
                self.samples.append((time.time(), u, status, n))
            self.stopping.wait(self.every)


def refusals(statuses):
    """The answers of a tally that are neither a success nor the app's own failure."""
    return {k: v for k, v in statuses.items() if not k.startswith("2") and k != "500 analysis_failed"}


def first_after(users, t, via=None, status=200):
    """Seconds from t to the first answer with this status sent at or after t (None: never)."""
    done = [e[1] for u in users for e in u.events
            if e[0] >= t and e[2] == status and (via is None or e[4] == via)]
    return round(min(done) - t, 2) if done else None


# --- the scenarios ---------------------------------------------------------------------------

async def burst_call(stack, user, path, gate, connected, start):
    """One call on a connection of its own: connect, wait for `start`, send, read the answer."""
    request = (f"POST {path} HTTP/1.1\r\nHost: {stack.proxy_host}\r\n"
               f"Authorization: Bearer {user.token}\r\nContent-Type: application/json\r\n"
               f"Content-Length: 2\r\nConnection: close\r\n\r\n{{}}").encode()
    try:
        async with gate:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(stack.proxy_host, stack.proxy_port), 30)
    except (OSError, asyncio.TimeoutError):
        connected.append(False)
        user.note(time.time(), time.time(), 0, "no connection")
        return
    connected.append(True)
    await start.wait()
    sent = time.time()
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 60)
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
        code = None
        if status >= 400:
            try:
                code = json.loads(data.split(b"\r\n\r\n", 1)[1]).get("error", {}).get("code")
            except (ValueError, IndexError, AttributeError):
                pass
        user.note(sent, time.time(), status, code if status else "no answer")
    except (OSError, asyncio.TimeoutError, ValueError):
        user.note(sent, time.time(), 0, "no answer")
    finally:
        writer.close()


async def burst_all(stack, calls):
    """Opens one connection per call (200 connects at a time), then sends every request at once."""
    gate, start, connected = asyncio.Semaphore(200), asyncio.Event(), []
    tasks = [asyncio.ensure_future(burst_call(stack, u, p, gate, connected, start))
             for u, p in calls]
    deadline = time.monotonic() + 60
    while len(connected) < len(calls) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    start.set()
    await asyncio.gather(*tasks)
    return connected.count(False)


def burst(stack, users):
    per_user = 2000 // len(users)
    calls = []
    for u in users:
        for i in range(per_user):
            calls.append((u, "/l3/fail" if i < per_user * FAIL_SHARE else f"/l3/p{u.n}-{i}"))
    random.Random(12).shuffle(calls)  # users and failures interleaved
    note(f"burst: {len(calls)} calls of {len(users)} users at once, "
         f"{int(per_user * FAIL_SHARE)} of each user's {per_user} failing")
    stack.redis("CONFIG", "RESETSTAT")
    started, begun = time.monotonic(), time.time()
    errors = asyncio.run(burst_all(stack, calls))
    took = time.monotonic() - started
    statuses = tally(users)
    note(f"burst: connected and answered in {took:.1f}s: {statuses}; connections refused {errors}")
    n503 = sum(v for k, v in statuses.items() if k.startswith("503"))
    check("burst: every call answered", sum(statuses.values()) == len(calls) and not errors
          and "0 no answer" not in statuses, f"{sum(statuses.values())} of {len(calls)}")
    if n503:
        stats = [line for line in stack.redis("INFO", "commandstats").splitlines()
                 if line.startswith("cmdstat_evalsha:")]
        note(f"burst: sidecar log: {log_summary(stack.log('sidecar'), begun)}; Redis "
             f"{stats[0] if stats else 'no evalsha'}; load average {os.getloadavg()[0]:.1f} "
             f"on {os.cpu_count()} cores")
    check("burst: no 503 while Redis is healthy", n503 == 0, f"{n503} x 503")
    waited, off = settle_counters(stack, users)
    ok = sum(u.ok for u in users)
    check("burst: each user's used == its 2xx answers", not off,
          f"{ok} successes over {len(users)} users, counters agree after {waited:.1f}s"
          if not off else describe_off(off))


def pause(stack, users):
    load = Load(stack, users).start()
    time.sleep(2)
    measured, measured_from = [], time.time()
    for mode in ("ALL", "WRITE"):
        t0 = time.time()
        stack.redis("CLIENT", "PAUSE", "2000", mode)
        time.sleep(2 + 3)
        end = t0 + 2
        during = tally(users, t0, end + 0.2)
        recovery = first_after(users, end)
        errors = sum(refusals(during).values())
        note(f"redis-pause {mode}: during the 2s pause {during}; first 200 {recovery}s after it ended")
        measured.append((mode, errors, recovery))
    load.stop()
    note(f"redis-pause: sidecar log: {log_summary(stack.log('sidecar'), measured_from)}")
    for mode, errors, recovery in measured:
        check(f"redis-pause {mode}: calls are served again within 2s of the pause's end",
              recovery is not None and recovery <= 2.0, f"{recovery}s ({errors} refused meanwhile)")
    totals = tally(users)
    unknown = sum(u.unknown for u in users)
    note(f"redis-pause: all calls {totals}")
    check("redis-pause: every call answered", unknown == 0, f"{unknown} without an answer")
    waited, off = settle_counters(stack, users)
    check("redis-pause: each user's used == its 2xx answers", not off,
          f"{sum(u.ok for u in users)} successes, counters agree after {waited:.1f}s"
          if not off else describe_off(off))


def touch(stack, users, calls=3):
    """A few calls per user (one failing), many users at once: buckets in many shards."""
    def run(u):
        conn = http.client.HTTPConnection(stack.proxy_host, stack.proxy_port, timeout=30)
        for i in range(calls):
            sent = time.time()
            try:
                conn.request("POST", f"/l3/{'fail' if i == 0 else f'p{u.n}-{i}'}",
                             headers={"Authorization": f"Bearer {u.token}", "Connection": "close"})
                r = conn.getresponse()
                r.read()
                u.note(sent, time.time(), r.status, None if r.status < 400 else "error")
            except (OSError, http.client.HTTPException):
                u.note(sent, time.time(), 0, "no answer")
            conn.close()
            conn = http.client.HTTPConnection(stack.proxy_host, stack.proxy_port, timeout=30)
    run_threads(run, users, 16)


def pg_traffic(stack, users, spread, until):
    """Load and /v1/quota polls; PostgreSQL connections terminated three times; then, shortly
    before `until` (epoch seconds), a few calls of each of the `spread` users, so that the
    minute then closing has buckets in many shards."""
    load = Load(stack, users, per_user=1).start()
    poller = QuotaPoller(stack, users, every=0.1).start()
    begun = time.time()
    time.sleep(2)
    kills = []
    for _ in range(3):
        t = time.time()
        n = stack.terminate_backends()
        kills.append((t, n))
        time.sleep(2.5)
    while time.time() < until - 8:
        time.sleep(0.1)
    touch(stack, spread)
    while time.time() < until:
        time.sleep(0.1)
    load.stop()
    poller.stop()
    for t, n in kills:
        api = [s for s in poller.samples if s[0] >= t]
        bad = [s for s in api if s[2] != 200 and s[0] < t + 2.5]
        first = next((s[0] for s in api if s[2] == 200), None)
        note(f"pg-kill: terminated {n} connections; /v1/quota answers in the next 2.5s: "
             f"{len(bad)} not 200 {sorted({s[2] for s in bad})}; first 200 after "
             f"{round(first - t, 2) if first else None}s; sidecar calls then: "
             f"{tally(users, t, t + 2.5)}")
    failed_api = sum(1 for s in poller.samples if s[2] != 200)
    sidecar = tally(users)
    bad_sidecar = refusals(sidecar)
    note(f"pg-kill: sidecar calls {sidecar}; /v1/quota polls {len(poller.samples)}, "
         f"{failed_api} not 200; control plane log: {log_summary(stack.log('control-plane'), begun)}")
    if bad_sidecar:
        note(f"pg-kill: sidecar log: {log_summary(stack.log('sidecar'), begun)}")
    check("pg-kill under load: the sidecar answers every call, no 5xx of its own (Redis is healthy)",
          not bad_sidecar, f"{bad_sidecar}")
    check("pg-kill under load: the control plane answers again within 2.5s of each kill",
          all(any(s[2] == 200 and t <= s[0] < t + 2.5 for s in poller.samples) for t, _ in kills),
          f"{failed_api} of {len(poller.samples)} /v1/quota polls failed")
    waited, off = settle_counters(stack, users)
    check("pg-kill under load: each user's used == its 2xx answers", not off,
          f"{sum(u.ok for u in users)} successes" if not off else describe_off(off))


def wait_for_lock_waiter(stack, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if stack.waiting_on_lock():
            return True
        time.sleep(0.1)
    return False


def wait_drained(stack, seconds):
    """Until no bucket of a closed minute is left in Redis, seen twice 1.5 s apart (a SCAN can
    miss a key a pass renames meanwhile); seconds it took, or None."""
    started = time.monotonic()
    empty = 0
    while time.monotonic() - started < seconds:
        empty = empty + 1 if not stack.closed_buckets() else 0
        if empty == 2:
            return time.monotonic() - started
        time.sleep(1.5 if empty else 0.5)
    return None


def drain_faults(stack, users):
    """At a minute boundary whose closed minute has buckets of many shards: the faults that hit
    a drain pass, each caught with the SHARE lock on usage_minutes. Returns once everything
    closed is in the ledger, having checked that nothing was lost or doubled."""
    fault_of, shards_of = {}, {}  # stamp -> the fault that left its buckets staged, their shards

    def left_staged(fault):
        stamps = stack.staged()
        for stamp, buckets in stamps.items():
            fault_of.setdefault(stamp, fault)
            shards_of.setdefault(stamp, set()).update(sh for sh, _ in buckets)
        return sum(len(v) for k, v in stamps.items() if fault_of[k] == fault)

    # pg-kill mid-drain: the pass waits for the lock inside its transaction; kill every backend.
    lock = LockHolder(stack)
    caught = wait_for_lock_waiter(stack, 20)
    n = stack.terminate_backends() if caught else 0
    lock.release()
    check("pg-kill mid-drain: a drain pass was caught inside its transaction", caught,
          f"{n} connections terminated, {left_staged('pg-kill')} buckets left staged")

    # cp-kill inside the transaction.
    lock = LockHolder(stack)
    caught = wait_for_lock_waiter(stack, 45)
    if caught:
        env, argv, cwd = stack.cp_kill()
        lock.release()
        staged = left_staged("cp-kill in the transaction")
        ready = stack.cp_start(env, argv, cwd)
    else:
        lock.release()
    check("cp-kill mid-drain (in the transaction): caught and restarted", caught,
          f"{staged} buckets left staged; ready again {ready:.1f}s after the restart"
          if caught else "")

    # cp-kill after the commit, before the staged buckets are deleted: writes to Redis paused
    # so that the pass stops there.
    lock = LockHolder(stack)
    caught = wait_for_lock_waiter(stack, 45)
    committed = False
    if caught:
        stamps = stack.drain_stamps()
        stack.redis("CLIENT", "PAUSE", "10000", "WRITE")
        lock.release()
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not committed:
            committed = stack.drain_stamps() > stamps
            time.sleep(0.02)
        env, argv, cwd = stack.cp_kill()
        stack.redis("CLIENT", "UNPAUSE")
        staged = left_staged("cp-kill after the commit")
        ready = stack.cp_start(env, argv, cwd)
    else:
        lock.release()
    check("cp-kill mid-drain (committed, not yet deleted): caught and restarted",
          caught and committed, f"{staged} buckets left staged (and any of an earlier fault "
          f"it was recording); ready again {ready:.1f}s after the restart" if caught else "")
    note("buckets the faults left staged (stamp, fault: shards): " + "; ".join(
        f"{k[:8]}, {fault_of.get(k, '?')}: {sorted(v)}" for k, v in shards_of.items()))

    # Everything closed reaches the ledger: the staged buckets after the drain's patience (30 s).
    took = wait_drained(stack, 75)
    dup = stack.cp_metric("tollgate_cp_usage_entries_drained_total", {"kind": "duplicate"})
    check("after the drain faults every closed bucket is drained", took is not None,
          f"in {took:.1f}s; the restarted control plane counted {dup} entries duplicate"
          if took is not None else f"buckets left: {sorted(set(stack.closed_buckets()))[:5]}")
    # Nothing lost or doubled: every user with calls before the faults has them all in the
    # ledger, once.
    ledger = stack.ledger()
    off = [u for u in users if ledger.get(u.id, 0) != u.ok]
    stamp_of = {sh: k for k, v in shards_of.items() for sh in v}

    def where(u):
        stamp = stamp_of.get(u.shard)
        return f"staged as {stamp[:8]} by {fault_of.get(stamp)}" if stamp else "not left staged"

    check("pg-kill and cp-kill mid-drain: ledger == 2xx answers for every user (nothing lost "
          "or doubled)", not off, f"{sum(u.ok for u in users)} calls of {len(users)} users"
          if not off else "; ".join(f"{u.group}{u.n} (shard {u.shard}, {where(u)}): ledger "
                                    f"{ledger.get(u.id, 0)} vs {u.ok} ok" for u in off))
    for stamp, shards in shards_of.items():
        mine = [u for u in users if u.shard in shards]
        lost = sorted(u.shard for u in mine if ledger.get(u.id, 0) != u.ok)
        if lost:
            note(f"stamp {stamp[:8]} ({fault_of.get(stamp)}): users in shards "
                 f"{sorted(u.shard for u in mine)}, those in {lost} not in the ledger")


def redis_loss(stack, users):
    ledger_before = stack.ledger()
    before = {u: ledger_before.get(u.id, 0) for u in users}
    check("redis-loss: every user has usage in the ledger before the loss",
          all(v > 0 for v in before.values()), f"{sorted(before.values())}")
    load = Load(stack, users, api_key_user=users[0]).start()
    poller = QuotaPoller(stack, users, every=0.1).start()
    time.sleep(3)
    t_kill = time.time()
    pid = stack.redis_pid()
    os.kill(pid, signal.SIGKILL)
    if not wait_gone(pid, stack.redis_port):
        raise RuntimeError(f"redis-server (pid {pid}) survived SIGKILL")
    time.sleep(max(0.0, t_kill + 1 - time.time()))
    redis_start(stack.redis_port, stack.redis_dir)
    t_up = time.time()
    deadline = t_up + 20
    while time.time() < deadline:
        if all(first_after(users, t_up, via) is not None for via in ("token", "api_key")):
            break
        time.sleep(0.2)
    time.sleep(3)
    load.stop()
    poller.stop()
    t_end = time.time()
    token_back = first_after(users, t_up, "token")
    key_back = first_after(users, t_up, "api_key")
    refused = [e[1] - t_up for u in users for e in u.events
               if e[4] == "api_key" and e[2] == 401 and e[0] >= t_kill]
    after_up = tally(users, t_up, t_up + 10)
    note(f"redis-loss: killed at +0s, started empty at +{t_up - t_kill:.1f}s; answers while "
         f"down {tally(users, t_kill, t_up)}; in the 10s after {after_up}")
    note(f"redis-loss: first 200 {token_back}s after the restart with a token, {key_back}s "
         f"with an API key ({len(refused)} API-key calls answered 401 meanwhile, the last "
         f"{max(refused) if refused else 0:.2f}s after the restart); sidecar log: "
         f"{log_summary(stack.log('sidecar'), t_kill)}; control "
         f"plane log: {log_summary(stack.log('control-plane'), t_kill)}")
    check("redis-loss: token calls are served within 10s of the restart",
          token_back is not None and token_back <= 10, f"{token_back}s")
    check("redis-loss: API-key calls are served within 10s of the restart",
          key_back is not None and key_back <= 10, f"{key_back}s")
    low = [(round(t - t_up, 1), f"{u.group}{u.n}", n, before[u]) for t, u, status, n in poller.samples
           if status == 200 and n is not None and n < before[u]]
    answered = sum(1 for s in poller.samples if s[0] >= t_up and s[2] == 200)
    unavailable = sum(1 for s in poller.samples if s[2] != 200)
    note(f"redis-loss: /v1/quota polls {len(poller.samples)} ({answered} answered after the "
         f"restart, {unavailable} not 200)")
    check("redis-loss: /v1/quota never shows less than the ledger held during the rebuild",
          not low and answered > 0, f"{low[:5]}" if low else f"{answered} answers after the restart")
    # The calls decided in the minute Redis lost, before the loss: at least those sent and
    # answered inside it, at most those answered after its start and sent before the kill.
    m0 = minute_start(t_kill)
    lo = sum(1 for u in users for e in u.events if 200 <= e[2] < 300 and e[0] >= m0 and e[1] <= t_kill)
    hi = sum(1 for u in users for e in u.events if 200 <= e[2] < 300 and e[1] >= m0 and e[0] <= t_kill)
    return t_end, (lo, hi)


def final(stack, groups, restart_users, lost_bounds, t_end):
    """One wait for the last minute to close and drain, then ledger == counter == 2xx answers."""
    close = minute_start(t_end) + 60
    note(f"waiting {max(0, close - time.time()):.0f}s for the last minute to close, then for the drain")
    while time.time() < close + 1:
        time.sleep(0.5)
    took = wait_drained(stack, 30)
    check("every closed minute is drained", took is not None,
          f"{took:.1f}s after the minute closed" if took is not None
          else f"{len(stack.closed_buckets())} buckets left")
    minutes, months = stack.ledger("usage_minutes"), stack.ledger("usage_months")
    for name, users in groups:
        rows = []
        bad_counter, bad_ok, unknown = [], [], 0
        for u in users:
            _, counter = used(stack, u)
            ledger = minutes.get(u.id, 0)
            rows.append((ledger, counter, u.ok))
            unknown += u.unknown
            if counter != ledger or months.get(u.id, 0) != ledger:
                bad_counter.append(f"{u.group}{u.n}: ledger {ledger} (months "
                                   f"{months.get(u.id, 0)}) counter {counter}")
            if u not in restart_users and ledger != u.ok:
                bad_ok.append(f"{u.group}{u.n}: ledger {ledger} vs {u.ok} ok")
        sums = [sum(r[i] or 0 for r in rows) for i in range(3)]
        note(f"{name}: ledger {sums[0]}, counters {sums[1]}, 2xx answers {sums[2]}, "
             f"without an answer {unknown}")
        check(f"{name}: ledger == counter for every user (usage_months agrees)", not bad_counter,
              "; ".join(bad_counter[:4]))
        if name == "redis-loss":
            lost = sums[2] - sums[0]
            lo, hi = lost_bounds
            note(f"redis-loss: {lost} successful calls are in neither counter nor ledger; "
                 f"the minute Redis lost held between {lo} and {hi} of them")
            check("redis-loss: only the calls of the undrained minute are lost", lo <= lost <= hi,
                  f"lost {lost}, expected {lo}..{hi}")
        else:
            check(f"{name}: ledger == 2xx answers for every user (nothing lost or doubled)",
                  not bad_ok, "; ".join(bad_ok[:4]))


def run(a):
    stack = Stack(a)
    t0 = time.monotonic()
    status, body = call("POST", stack.cp + "/v1/auth/login",
                        {"email": a.admin_email, "password": a.admin_password}, timeout=60)
    if status != 200:
        raise RuntimeError(f"admin login failed: {status} {body}")
    admin = body["access_token"]
    groups = [("burst", 20), ("pause", 4), ("pg", 8), ("loss", 4), ("spread", 96)]
    users = setup_users(stack, admin, groups)
    by = {g: [u for u in users if u.group == g] for g, _ in groups}
    status, body = call("POST", stack.cp + "/v1/api-keys", {"name": "faults"},
                        headers={"Authorization": f"Bearer {by['loss'][0].token}"})
    if status != 201:
        raise RuntimeError(f"creating an API key failed: {status} {body}")
    by["loss"][0].api_key = body["key"]
    note(f"setup: {len(users)} users with grants in {time.monotonic() - t0:.1f}s")

    # The redis-loss users' first calls, drained before the loss, so a rebuild has a figure.
    warm = Load(stack, by["loss"]).start()
    time.sleep(1)
    warm.stop()

    for name, fn, group in (("burst", burst, "burst"), ("redis-pause", pause, "pause")):
        started = time.monotonic()
        fn(stack, by[group])
        note(f"{name}: {time.monotonic() - started:.1f}s")

    # pg-kill under load until just before the next minute boundary at least 20 s away, so
    # that the closed minute holds buckets of every group when the drain faults begin.
    boundary = minute_start(time.time() + 20) + 60
    started = time.monotonic()
    lock_at = boundary - 1.5
    pg_traffic(stack, by["pg"], by["spread"], lock_at)
    note(f"pg-kill under load: {time.monotonic() - started:.1f}s")

    started = time.monotonic()
    drain_faults(stack, by["burst"] + by["pause"] + by["pg"] + by["spread"])
    note(f"drain faults: {time.monotonic() - started:.1f}s")

    # Redis lost: not across a minute boundary, so that only the open minute is lost.
    if minute_start(time.time() + 15) != minute_start(time.time()):
        time.sleep(minute_start(time.time()) + 61 - time.time())
        wait_drained(stack, 30)
    started = time.monotonic()
    t_end, bounds = redis_loss(stack, by["loss"])
    note(f"redis-loss: {time.monotonic() - started:.1f}s")

    final(stack, [("burst", by["burst"]), ("redis-pause", by["pause"]), ("pg-kill", by["pg"]),
                  ("drain faults (spread users)", by["spread"]), ("redis-loss", by["loss"])],
          set(by["loss"]), bounds, t_end)
    note(f"all scenarios: {time.monotonic() - t0:.1f}s")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    start = sub.add_parser("redis-start")
    start.add_argument("--port", type=int, required=True)
    start.add_argument("--dir", required=True)
    r = sub.add_parser("run")
    for name in ("--cp", "--proxy", "--stack-dir", "--database-url", "--redis-dir", "--prefix",
                 "--admin-email", "--admin-password"):
        r.add_argument(name, required=True)
    r.add_argument("--redis-port", type=int, required=True)
    a = p.parse_args()
    if a.command == "redis-start":
        redis_start(a.port, a.dir)
        return
    try:
        run(a)
    except (RuntimeError, KeyError) as e:
        check("the scenarios ran to the end", False, str(e))
    passed = sum(RESULTS)
    print(f"faults: {passed} passed, {len(RESULTS) - passed} failed")
    sys.exit(0 if RESULTS and passed == len(RESULTS) else 1)


if __name__ == "__main__":
    main()
