#!/usr/bin/env python3
"""tests/e2e/overload_check.py — issue #12's fault scenarios against a live stack (80-overload.sh):

  idle-flood   20,000 idle TCP connections to the sidecar's proxy port (held by two helper
               processes of this script, 10,000 each, under the machine's open-files limit):
               the admin port's /healthz and /readyz answer, a new client is answered (served
               or 503 at once), and the idle connections are closed within the idle timeout.
  slow-heads   a request head trickling into the sidecar and into the control plane is cut
               off within the header timeout.
  cp-limits    the control plane answers 413 at once to Content-Length: 10^12, and closes idle,
               trickling-head and unfinished-body connections within its timeouts.
  sigterm      the sidecar gets SIGTERM while keep-alive clients send requests and uploads:
               every request sent before the signal gets a real answer, and it exits in time.

Standard library only. Traffic goes to 127.0.0.1 only, bounded in count and time. Each scenario
prints what it measured. Last line: `overload: N passed, M failed`.
"""

import argparse
import http.client
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

SLACK = 3.0  # seconds on top of a timeout the feature defines, for a loaded machine
RESULTS = []


def check(name, ok, detail=""):
    RESULTS.append(ok)
    print(f"{'ok' if ok else 'not ok'} - {name}{': ' + detail if detail else ''}", flush=True)


def http_get(url, timeout=5.0):
    """(status, seconds, body) of a GET; status 0 when nothing answered."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, time.monotonic() - started, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, time.monotonic() - started, e.read().decode(errors="replace")
    except Exception as e:  # noqa: BLE001 — any failure is "no answer" here
        return 0, time.monotonic() - started, str(e)


def rst_close(sock):
    """Closes with RST: 20,000 client-side TIME_WAITs would tie up this machine's ports."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def metric(url, name, labels):
    """The value of one sample of a Prometheus text scrape, or None."""
    status, _, text = http_get(url)
    if status != 200:
        return None
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


# --- the helper process: holds idle connections and reports when the server closes them -----

def hold(port, count, seconds):
    sel = selectors.DefaultSelector()
    started = time.monotonic()
    pending, open_, failed = 0, 0, 0
    socks = []
    # Connect in batches, so the listener's backlog is never the bottleneck.
    for start in range(0, count, 500):
        batch = []
        for _ in range(min(500, count - start)):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect_ex(("127.0.0.1", port))
            except OSError:
                failed += 1
                s.close()
                continue
            batch.append(s)
        deadline = time.monotonic() + 10
        waiting = set(batch)
        for s in batch:
            sel.register(s, selectors.EVENT_WRITE)
        while waiting and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                s = key.fileobj
                if s in waiting:
                    waiting.discard(s)
                    sel.unregister(s)
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                        socks.append(s)
                        sel.register(s, selectors.EVENT_READ)
                    else:
                        failed += 1
                        s.close()
        for s in waiting:
            sel.unregister(s)
            pending += 1
            s.close()
    connected_at = time.monotonic() - started
    print(json.dumps({"event": "connected", "connected": len(socks), "failed": failed,
                      "timed_out": pending, "seconds": round(connected_at, 2)}), flush=True)
    open_ = {s for s in socks}
    closed_at = []
    deadline = time.monotonic() + seconds
    while open_ and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                open_.discard(s)
                closed_at.append(time.monotonic() - started)
                s.close()
    print(json.dumps({"event": "done", "closed_by_server": len(closed_at),
                      "still_open": len(open_),
                      "last_closed_s": round(max(closed_at), 2) if closed_at else None}), flush=True)
    for s in open_:
        rst_close(s)


def start_holder(port, count, seconds):
    return subprocess.Popen(
        [sys.executable, "-u", __file__, "hold", str(port), str(count), str(seconds)],
        stdout=subprocess.PIPE, text=True)


def idle_flood(a):
    total, per = 20000, 10000
    idle = a.sidecar_idle_timeout
    print(f"# idle flood: {total} idle connections to the proxy port (max_connections "
          f"{a.sidecar_max_connections}, idle_timeout {idle}s)", flush=True)
    # Held until the server has had idle_timeout + slack to close them.
    holders = [start_holder(a.proxy_port, per, idle + 2 * SLACK + 20) for _ in range(total // per)]
    connected = [json.loads(h.stdout.readline()) for h in holders]
    opened = sum(c["connected"] for c in connected)
    flood_done = time.monotonic()
    print(f"# opened {opened} (failed {sum(c['failed'] for c in connected)}, timed out "
          f"{sum(c['timed_out'] for c in connected)}) in {max(c['seconds'] for c in connected)}s", flush=True)
    check("20,000 connections were opened to the proxy port", opened >= total * 0.95, f"{opened}")
    admin = f"http://127.0.0.1:{a.admin_port}"
    for path in ("/healthz", "/readyz"):
        status, seconds, _ = http_get(admin + path)
        check(f"admin {path} answers under the flood", status == 200, f"{status} in {seconds:.3f}s")
    status, seconds, body = http_get(f"http://127.0.0.1:{a.proxy_port}/health")
    check("a new client is answered (served, or 503 at once)",
          status == 200 or (status == 503 and seconds < 1.0), f"{status} in {seconds:.3f}s")
    scrape = f"{admin}/metrics"
    open_now = metric(scrape, "tollgate_sidecar_open_connections", {"listener": "proxy"})
    evicted = metric(scrape, "tollgate_sidecar_overload_total", {"listener": "proxy", "action": "evicted_idle"})
    print(f"# during the flood: open_connections {open_now}, evicted_idle {evicted}", flush=True)
    check("open connections stay within max_connections",
          open_now is not None and open_now <= a.sidecar_max_connections, f"{open_now}")
    done = [json.loads(h.stdout.readline()) for h in holders]
    for h in holders:
        h.wait(timeout=60)
    closed = sum(d["closed_by_server"] for d in done)
    still = sum(d["still_open"] for d in done)
    last = max((d["last_closed_s"] or 0) for d in done)
    left = metric(scrape, "tollgate_sidecar_open_connections", {"listener": "proxy"})
    idled = metric(scrape, "tollgate_sidecar_timeouts_total", {"listener": "proxy", "kind": "idle"})
    # A connection the kernel completed while the accept queue was full is never accepted: the
    # client believes it is open, the sidecar holds nothing for it.
    print(f"# the server closed {closed} of {opened} (evicted {evicted}, idle timeouts {idled}); "
          f"the last {last}s after the flood began; {still} never accepted (accept queue "
          f"overflow) and still open on the client side; open_connections now {left}", flush=True)
    check("every accepted idle connection was closed within the idle timeout",
          left == 0, f"open_connections {left} {idle + 2 * SLACK + 20}s after the flood")
    status, seconds, _ = http_get(f"http://127.0.0.1:{a.proxy_port}/health")
    check("after the flood the proxy serves", status == 200, f"{status} in {seconds:.3f}s")
    fd = metric(scrape, "tollgate_sidecar_accept_errors_total", {"listener": "proxy", "kind": "fd_exhausted"})
    check("the sidecar never ran out of file descriptors", fd == 0, f"accept_errors fd_exhausted {fd}")


def seconds_until_closed(sock, started, limit):
    sock.settimeout(0.5)
    while time.monotonic() - started < limit:
        try:
            if not sock.recv(4096):
                return time.monotonic() - started
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - started
    return None


def trickle(port, started, limit, first, step=b"X-Trickle: y\r\n", every=0.5):
    """Sends `first`, then `step` every `every` seconds; seconds until the server closed."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(first)
    s.setblocking(False)
    closed = None
    while time.monotonic() - started < limit:
        time.sleep(every)
        try:
            if s.recv(4096) == b"":
                closed = time.monotonic() - started
                break
        except BlockingIOError:
            pass
        except OSError:
            closed = time.monotonic() - started
            break
        try:
            s.send(step)
        except OSError:
            closed = time.monotonic() - started
            break
    rst_close(s)
    return closed


def slow_heads(a):
    for name, port, timeout in (("sidecar", a.proxy_port, a.sidecar_header_timeout),
                                ("control plane", a.cp_port, a.cp_header_timeout)):
        started = time.monotonic()
        closed = trickle(port, started, timeout + SLACK, b"GET /health HTTP/1.1\r\nHost: x\r\n")
        check(f"{name}: a trickling request head is cut off within header_read_timeout ({timeout}s)",
              closed is not None, f"closed after {closed:.2f}s" if closed else "still open")


def cp_limits(a):
    cp = a.cp_port
    s = socket.create_connection(("127.0.0.1", cp), timeout=5)
    started = time.monotonic()
    s.sendall(b"POST /v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000000000000\r\n\r\n{")
    answer, first = b"", None
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            first = first or time.monotonic() - started
            answer += chunk
    except (socket.timeout, OSError):
        pass
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "none"
    check("control plane: Content-Length 10^12 is answered 413 at once",
          status == "413" and b"payload_too_large" in answer,
          f"{status} after {first or 0:.3f}s")
    rst_close(s)

    # 300 connections that hold on: idle, trickling a head, and an unfinished body.
    n = 100
    limit = max(a.cp_idle_timeout, a.cp_header_timeout, a.cp_body_timeout) + SLACK
    started = time.monotonic()
    results = {"idle": [], "head": [], "body": []}
    threads = []

    def run(kind):
        if kind == "idle":
            s = socket.create_connection(("127.0.0.1", cp), timeout=5)
            results[kind].append(seconds_until_closed(s, started, limit))
            rst_close(s)
        elif kind == "head":
            results[kind].append(trickle(cp, started, limit, b"GET /healthz HTTP/1.1\r\n"))
        else:
            results[kind].append(trickle(
                cp, started, limit,
                b"POST /v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{\"email\":", step=b"", every=0.5))

    for kind in results:
        for _ in range(n):
            t = threading.Thread(target=run, args=(kind,))
            t.start()
            threads.append(t)
    for t in threads:
        t.join()
    for kind, times in results.items():
        closed = [t for t in times if t is not None]
        timeout = {"idle": a.cp_idle_timeout, "head": a.cp_header_timeout, "body": a.cp_body_timeout}[kind]
        check(f"control plane: {n} {kind} connections closed within their timeout ({timeout}s)",
              len(closed) == n, f"{len(closed)} closed, the last after "
              f"{max(closed) if closed else 0:.2f}s")


def sigterm(a, token):
    stop_at = [None]
    lock = threading.Lock()
    stats = {"answered": 0, "lost": 0, "after": 0, "statuses": {}, "close": 0}
    upload = b"u" * 65536

    def client(i):
        conn = http.client.HTTPConnection("127.0.0.1", a.proxy_port, timeout=20)
        n = 0
        while True:
            n += 1
            kind = n % 3
            try:
                if kind == 0:
                    conn.request("GET", "/health")
                elif kind == 1:
                    conn.request("POST", f"/l3/p{i}", body=b"{}", headers={
                        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
                else:
                    conn.request("POST", "/upload", body=upload, headers={
                        "Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"})
            except OSError:
                with lock:
                    stats["after" if stop_at[0] else "lost"] += 1
                return
            sent = time.monotonic()
            try:
                r = conn.getresponse()
                r.read()
                with lock:
                    stats["answered"] += 1
                    stats["statuses"][r.status] = stats["statuses"].get(r.status, 0) + 1
                    if (r.getheader("connection") or "").lower() == "close":
                        stats["close"] += 1
                if (r.getheader("connection") or "").lower() == "close":
                    conn.close()
                    return
            except (OSError, http.client.HTTPException):
                with lock:
                    if stop_at[0] is None or sent < stop_at[0]:
                        stats["lost"] += 1
                    else:
                        stats["after"] += 1
                return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    with lock:
        stop_at[0] = time.monotonic()
    os.kill(a.sidecar_pid, signal.SIGTERM)
    for t in threads:
        t.join(timeout=a.grace + SLACK)
    exited = None
    while time.monotonic() - stop_at[0] < a.grace + SLACK:
        try:
            os.kill(a.sidecar_pid, 0)
            with open(f"/proc/{a.sidecar_pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    raise ProcessLookupError
        except (ProcessLookupError, FileNotFoundError):
            exited = time.monotonic() - stop_at[0]
            break
        time.sleep(0.05)
    print(f"# SIGTERM under keep-alive traffic: {stats['answered']} answers {stats['statuses']}, "
          f"{stats['close']} with Connection: close, {stats['lost']} lost, {stats['after']} "
          f"refused after the signal; exited {exited if exited is None else round(exited, 2)}s "
          f"after SIGTERM (grace {a.grace}s)", flush=True)
    check("every request sent before SIGTERM got an answer", stats["lost"] == 0,
          f"{stats['lost']} lost of {stats['answered'] + stats['lost']}")
    check("the sidecar exited within the grace", exited is not None, f"{exited}")


def register(cp_port):
    body = json.dumps({"email": f"overload-{os.getpid()}-{time.time_ns()}@example.com",
                       "password": "overload-password-1"}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{cp_port}/v1/auth/register", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["access_token"]


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "hold":
        hold(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
        return
    p = argparse.ArgumentParser()
    p.add_argument("--proxy-port", type=int, required=True)
    p.add_argument("--admin-port", type=int, required=True)
    p.add_argument("--cp-port", type=int, required=True)
    p.add_argument("--sidecar-pid", type=int, required=True)
    p.add_argument("--sidecar-max-connections", type=int, required=True)
    p.add_argument("--sidecar-idle-timeout", type=float, required=True)
    p.add_argument("--sidecar-header-timeout", type=float, required=True)
    p.add_argument("--cp-idle-timeout", type=float, required=True)
    p.add_argument("--cp-header-timeout", type=float, required=True)
    p.add_argument("--cp-body-timeout", type=float, required=True)
    p.add_argument("--grace", type=float, required=True)
    a = p.parse_args()
    token = register(a.cp_port)
    t0 = time.monotonic()
    for scenario in (idle_flood, slow_heads, cp_limits):
        started = time.monotonic()
        scenario(a)
        print(f"# {scenario.__name__}: {time.monotonic() - started:.1f}s", flush=True)
    sigterm(a, token)
    print(f"# all scenarios: {time.monotonic() - t0:.1f}s", flush=True)
    passed = sum(RESULTS)
    print(f"overload: {passed} passed, {len(RESULTS) - passed} failed")
    sys.exit(0 if passed == len(RESULTS) else 1)


if __name__ == "__main__":
    main()
