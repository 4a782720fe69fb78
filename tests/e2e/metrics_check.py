"""Live /metrics checks (run by tests/e2e/75-metrics.sh against a stack it started).

Drives traffic through the sidecar and the control plane so that the labelled series exist, then
scrapes both programs' /metrics and checks that
  * `promtool check metrics` accepts each scrape (a parse error or any lint problem fails);
  * every metric name the Grafana dashboard and the Prometheus alert rules use is in the scrapes,
    as the series the expression names (a histogram's `_bucket`/`_sum`/`_count` only when the
    family is a histogram), so renaming a metric in the code but not in k8s/monitoring fails;
  * every label an expression matches on is on that series, and every label value it names
    literally is one the program exports (or, for the few values only an outage produces, one
    its code has), so a label value renamed on one side fails too;
  * the traffic was seen (allowed, unauthorized, public and refunded requests; the ledger drain);
  * the name check itself fails for a renamed name (a self-test on a doctored dashboard).

Needs only the standard library and PyYAML. Prints one PASS/FAIL line per check and ends with
`metrics: N passed, M failed`.
"""

import argparse
import json
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from monitoring_names import (
    DASHBOARD,
    HISTOGRAM_SUFFIXES,
    RULES,
    dashboard_exprs,
    label_matchers,
    literal_values,
    load_dashboard,
    load_rule_spec,
    metric_name,
    raw_metric_names,
    rule_exprs,
)

# Labels Prometheus adds from the scrape target (ServiceMonitor/PodMonitor), not the programs.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "container", "service", "endpoint"}

# Label values an expression may name that appear only after an event this test does not cause
# (a Redis outage, an unreachable or slow app). Not found live, they must at least be string
# literals in that program's source: (family, label) -> source folder.
EVENT_ONLY_VALUES = {
    ("tollgate_sidecar_requests_total", "decision"): "sidecar/src",
}

# Lint problems of `promtool check metrics` that are accepted, as (metric, text) pairs. Empty on
# purpose: both programs follow the Prometheus naming conventions (base units, `_total` on
# counters, help text on every family), so any problem promlint reports is a real one.
ACCEPTED_LINT = set()

# The series a scrape must show once the traffic below has passed (metric, labels, at least).
TRAFFIC_SEEN = [
    ("sidecar", "tollgate_sidecar_requests_total", {"decision": "allowed"}, 1),
    ("sidecar", "tollgate_sidecar_requests_total", {"decision": "unauthorized"}, 1),
    ("sidecar", "tollgate_sidecar_requests_total", {"decision": "public"}, 1),
    ("sidecar", "tollgate_sidecar_refunds_total", {"reason": "app_error"}, 1),
    ("sidecar", "tollgate_sidecar_upstream_duration_seconds_count", {}, 3),
    ("control plane", "tollgate_cp_http_requests_total", {"route": "/v1/auth/register", "status": "201"}, 1),
    ("control plane", "tollgate_cp_usage_entries_drained_total", {}, 1),
]

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, problems, detail=""):
        """`problems`: a list of strings; empty means the check passed."""
        if problems:
            self.failed += 1
            print(f"FAIL {name}: {'; '.join(problems)}")
        else:
            self.passed += 1
            print(f"PASS {name}{': ' + detail if detail else ''}")


def http(method, url, body=None, headers=None, timeout=10):
    """(status, headers, body text); a connection failure is status 0."""
    data = None
    headers = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _NO_PROXY.open(request, timeout=timeout) as response:
            return response.status, response.headers, response.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, {}, str(e)


# --- the exposition format --------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text):
    """{family: type} from the `# TYPE` lines and [(series name, labels, value)] of the samples."""
    families, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                families[parts[2]] = parts[3]
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            if m:
                labels = dict(_LABEL.findall(m.group(3) or ""))
                try:
                    value = float(m.group(4))
                except ValueError:
                    value = float("nan")
                samples.append((m.group(1), labels, value))
    return families, samples


def family_of(raw, families):
    """The family a series name of an expression belongs to in this scrape, and why not if none."""
    if raw in families:
        if families[raw] in ("histogram", "summary"):
            return None, f"{raw} is a {families[raw]}; an expression needs its _bucket, _sum or _count"
        return raw, None
    base = metric_name(raw)
    if base != raw and base in families:
        if families[base] == "histogram" or (families[base] == "summary" and not raw.endswith("_bucket")):
            return base, None
        return None, f"{raw}: {base} is a {families[base]}, not a histogram"
    return None, f"{raw} not found"


def missing_names(used_raw, scrapes):
    """{series name: reason} for every name the expressions use that no scrape has."""
    missing = {}
    for raw in sorted(used_raw):
        reasons = []
        for families, _ in scrapes.values():
            family, why = family_of(raw, families)
            if family:
                break
            reasons.append(why)
        else:
            missing[raw] = reasons[0] if len(set(reasons)) == 1 else "; ".join(sorted(set(reasons)))
    return missing


def in_source(repo, folder, value):
    needle = json.dumps(value)
    return any(needle in p.read_text(errors="replace") for p in (repo / folder).rglob("*.rs"))


def label_problems(repo, matchers, scrapes):
    """{(series, label): (problems, detail)} for the label matchers of the expressions."""
    results = {}
    by_key = {}
    for name, label, op, value in matchers:
        if label not in TARGET_LABELS:
            by_key.setdefault((name, label), []).append((op, value))
    for (name, label), found in sorted(by_key.items()):
        series = [l for _, samples in scrapes.values() for n, l, _ in samples if n == name]
        if not series:
            continue  # the name check reports it
        present = {l[label] for l in series if label in l}
        if not present:
            results[(name, label)] = ([f"no {name} series has the label {label}"], "")
            continue
        problems, notes = [], []
        for op, value in sorted(found):
            for v in literal_values(op, value):
                if v in present:
                    continue
                folder = EVENT_ONLY_VALUES.get((metric_name(name), label))
                if folder and in_source(repo, folder, v):
                    notes.append(f"{v} only after an event, in {folder}")
                else:
                    problems.append(f'{label}{op}"{value}": no series has {label}="{v}" (it has: {", ".join(sorted(present))})')
        results[(name, label)] = (sorted(set(problems)), "; ".join(sorted(set(notes))))
    return results


def total(samples, name, labels):
    return sum(v for n, l, v in samples if n == name and all(l.get(k) == val for k, val in labels.items()))


# --- the steps --------------------------------------------------------------------------------


def drive_traffic(checks, cp, proxy):
    email = f"metrics-{secrets.token_hex(4)}@example.com"
    status, _, body = http("POST", f"{cp}/v1/auth/register", {"email": email, "password": secrets.token_urlsafe(18)})
    token = None
    try:
        token = json.loads(body).get("access_token") if status == 201 else None
    except ValueError:
        pass
    checks.check("register a user on the control plane (201 with an access token)",
                 [] if token else [f"status {status}: {body[:200]}"], email)
    bearer = {"Authorization": f"Bearer {token}"} if token else {}

    got = {}
    for what, method, url, headers in [
        ("control plane GET /healthz", "GET", f"{cp}/healthz", {}),
        ("control plane GET /v1/plans", "GET", f"{cp}/v1/plans", {}),
        ("control plane GET /v1/me", "GET", f"{cp}/v1/me", bearer),
        ("control plane GET /v1/me without credentials", "GET", f"{cp}/v1/me", {}),
        ("control plane unknown route", "GET", f"{cp}/e2e-metrics-no-such-route", {}),
    ]:
        got[what] = http(method, url, headers=headers)[0]
    want = {"control plane GET /healthz": 200, "control plane GET /v1/plans": 200, "control plane GET /v1/me": 200,
            "control plane GET /v1/me without credentials": 401, "control plane unknown route": 404}
    checks.check("control plane answers the calls as expected",
                 [f"{w}: {got[w]}, want {s}" for w, s in want.items() if got[w] != s],
                 ", ".join(f"{got[w]}" for w in want))

    calls = [
        ("POST /process/p1/2026-11-25 with the token (metered)", "POST", "/process/p1/2026-11-25", bearer, 200),
        ("POST /process/p2/2026-11-25 with the token (metered)", "POST", "/process/p2/2026-11-25", bearer, 200),
        ("POST /process/fail/2026-11-25 with the token (app 500, refunded)", "POST", "/process/fail/2026-11-25", bearer, 500),
        ("POST /process/p1/2026-11-25 without credentials", "POST", "/process/p1/2026-11-25", {}, 401),
        ("GET /health (public)", "GET", "/health", {}, 200),
    ]
    for what, method, path, headers, want_status in calls:
        status, _, body = http(method, proxy + path, body={} if method == "POST" else None, headers=headers)
        checks.check(f"sidecar: {what} -> {want_status}",
                     [] if status == want_status else [f"got {status}: {body[:200]}"])


def scrape(url):
    status, headers, body = http("GET", url)
    return status, (headers.get("Content-Type", "") if headers else ""), body


def promtool_problems(promtool, text):
    """Problems `promtool check metrics` reports for a scrape, less ACCEPTED_LINT; [] when none."""
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).strip()
    problems = []
    for line in out.splitlines():
        metric, _, what = line.partition(" ")
        if (metric, what) not in ACCEPTED_LINT:
            problems.append(line)
    if proc.returncode != 0 and not problems and not out:
        problems.append(f"exit {proc.returncode} without output")
    if proc.returncode not in (0, 3):  # 3: lint problems only (each printed, and judged above)
        problems.append(f"exit {proc.returncode}")
    return problems, proc.returncode


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", required=True, type=Path)
    parser.add_argument("--cp", required=True, help="control plane base URL")
    parser.add_argument("--proxy", required=True, help="sidecar proxy base URL")
    parser.add_argument("--admin", required=True, help="sidecar admin base URL")
    parser.add_argument("--promtool", required=True)
    parser.add_argument("--dashboard", type=Path, help=f"default: REPO/{DASHBOARD}")
    parser.add_argument("--rules", type=Path, help=f"default: REPO/{RULES}")
    parser.add_argument("--wait", type=float, default=20.0,
                        help="seconds to wait for the ledger drain and every used series (default 20)")
    args = parser.parse_args()
    checks = Checks()

    dashboard = load_dashboard(args.dashboard or args.repo / DASHBOARD)
    rules = rule_exprs(load_rule_spec(args.rules or args.repo / RULES))
    used_dashboard = raw_metric_names(e for _, e in dashboard_exprs(dashboard))
    used_rules = raw_metric_names(e for _, e in rules)
    used = used_dashboard | used_rules
    checks.check("the dashboard and the alert rules name metrics", [] if used_dashboard and used_rules else ["none found"],
                 f"{len(used_dashboard)} series names in the dashboard, {len(used_rules)} in {len(rules)} rules")

    drive_traffic(checks, args.cp, args.proxy)

    targets = {"control plane": f"{args.cp}/metrics", "sidecar": f"{args.admin}/metrics"}
    # One scrape first, so that the control plane's own /metrics route is counted too.
    for url in targets.values():
        scrape(url)
    # The usage ledger drains in the background: wait (bounded) until every used name and every
    # series the traffic should have made is there, then judge the last scrape.
    deadline = time.monotonic() + args.wait
    while True:
        raw = {who: scrape(url) for who, url in targets.items()}
        scrapes = {who: parse(body) for who, (_, _, body) in raw.items()}
        seen_all = all(total(scrapes[who][1], n, l) >= at_least for who, n, l, at_least in TRAFFIC_SEEN)
        if (not missing_names(used, scrapes) and seen_all) or time.monotonic() >= deadline:
            break
        time.sleep(1)

    for who, url in targets.items():
        status, ctype, body = raw[who]
        families, samples = scrapes[who]
        problems = [] if status == 200 else [f"status {status}"]
        if not ctype.startswith("text/plain"):
            problems.append(f"Content-Type {ctype!r}")
        if not families:
            problems.append("no # TYPE line")
        checks.check(f"{who} GET {url} is the Prometheus text format", problems,
                     f"{len(families)} families, {len(samples)} samples")
        problems, rc = promtool_problems(args.promtool, body)
        checks.check(f"promtool check metrics accepts the {who}'s /metrics", problems, f"exit {rc}")

    for who, name, labels, at_least in TRAFFIC_SEEN:
        got = total(scrapes[who][1], name, labels)
        sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
        checks.check(f"the traffic shows in the {who}'s {name}{{{sel}}} (>= {at_least})",
                     [] if got >= at_least else [f"got {got:g}"], f"{got:g}")

    # The point of the test: every series name the dashboard and the alerts use is scraped live.
    missing = missing_names(used, scrapes)
    for raw_name in sorted(used):
        where = [who for who, (families, _) in scrapes.items() if family_of(raw_name, families)[0]]
        users = " and ".join(w for w, s in (("dashboard", used_dashboard), ("rules", used_rules)) if raw_name in s)
        checks.check(f"{raw_name} (used by the {users}) is in a live scrape",
                     [missing[raw_name]] if raw_name in missing else [], ", ".join(where))
    if missing:
        print("MISSING from the live scrapes: " + ", ".join(sorted(missing)))

    # The labels and label values the expressions match on.
    matchers = label_matchers([e for _, e in dashboard_exprs(dashboard)] + [e for _, e in rules])
    for (name, label), (problems, notes) in label_problems(args.repo, matchers, scrapes).items():
        checks.check(f"{name}: the label {label} and the values the expressions name are live", problems, notes)

    # The name check must fail for a name the code does not have: rename one in a copy of the
    # dashboard and expect exactly that name reported.
    victim = sorted(used_dashboard)[0]
    renamed = victim.replace("tollgate_", "tollgate_renamed_", 1)
    doctored = json.loads(json.dumps(dashboard).replace(victim, renamed))
    doctored_used = raw_metric_names(e for _, e in dashboard_exprs(doctored)) | used_rules
    reported = set(missing_names(doctored_used, scrapes)) - set(missing)
    checks.check("the name check fails for a metric renamed in the dashboard only (self-test)",
                 [] if reported == {renamed} else [f"reported {sorted(reported)}, want [{renamed}]"],
                 f"{victim} -> {renamed} reported missing")

    print(f"metrics: {checks.passed} passed, {checks.failed} failed")
    return 0 if checks.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
