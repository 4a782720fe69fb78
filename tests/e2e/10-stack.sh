#!/usr/bin/env bash
# tests/e2e/10-stack.sh — the README's `scripts/stack up` brings up a working system on ports and
# a database of its own, a second `up` changes nothing, and `scripts/stack down` leaves nothing
# running that `up` started.
#
# Env: REPO (default: this checkout), DATABASE_URL / REDIS_URL (the servers to use; a fresh
# database tollgate_e2e_<random> is created on that PostgreSQL and dropped at the end, and the
# keys under the run's Redis prefix are deleted at the end: lib-stack.sh).
set -euo pipefail
# shellcheck source=tests/e2e/lib-stack.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-stack.sh"

checks=0
failures=0
check() {
    local desc=$1
    shift
    checks=$((checks + 1))
    if "$@"; then
        echo "ok - $desc"
    else
        echo "not ok - $desc"
        failures=$((failures + 1))
    fi
}

# has_lines TEXT WORD...: every WORD is one of TEXT's lines.
has_lines() {
    local text=$1 word
    shift
    for word in "$@"; do
        grep -qxF -- "$word" <<<"$text" || {
            echo "    missing '$word' in: $(tr '\n' ' ' <<<"$text")" >&2
            return 1
        }
    done
}

code_is() {
    local want=$1 url=$2 got
    got=$(http_code "$url")
    [[ "$got" == "$want" ]] || {
        echo "    GET $url -> $got, want $want" >&2
        return 1
    }
}

E2E_UP_VERBOSE=1 e2e_up

# --- control plane ops endpoints and conventions ---
check "control plane /healthz is 200" code_is 200 "$CP/healthz"
check "control plane /readyz is 200" code_is 200 "$CP/readyz"
metrics=$(curl -sS --noproxy "*" --max-time 5 "$CP/metrics" || true)
check "control plane /metrics is Prometheus text" grep -q '^# TYPE' <<<"$metrics"

headers="$E2E_TMP/headers" body="$E2E_TMP/body"
status=$(curl -sS --noproxy "*" --max-time 5 -D "$headers" -o "$body" -w '%{http_code}' "$CP/e2e-no-such-route-$E2E_RAND" || true)
check "unknown route is 404" test "$status" = 404
check "unknown route body says not_found" grep -q '"not_found"' "$body"
check "response carries X-Request-Id" grep -qi '^x-request-id: *[^[:space:]]' "$headers"

curl -sS --noproxy "*" --max-time 5 -D "$headers" -o /dev/null -H "X-Request-Id: e2e-$E2E_RAND" "$CP/healthz" || true
check "a client's X-Request-Id is echoed" grep -qix "x-request-id: *e2e-$E2E_RAND" <(tr -d '\r' <"$headers")

# --- demo app (and the optional parts, when this build has them) ---
check "demo app /health is 200" code_is 200 "http://127.0.0.1:$TOLLGATE_APP_PORT/health"
if [[ " $PARTS " == *" sidecar "* ]]; then
    check "sidecar admin /readyz is 200" code_is 200 "http://127.0.0.1:$TOLLGATE_SIDECAR_ADMIN_PORT/readyz"
fi
if [[ " $PARTS " == *" paysim "* ]]; then
    keys=$(curl -sS --noproxy "*" --max-time 5 "http://127.0.0.1:$TOLLGATE_PAYSIM_PORT/sim/keys" || true)
    check "payment simulator /sim/keys has alipay and wechat keys" python3 -c '
import json, sys
k = json.loads(sys.argv[1])
assert k["alipay"]["app_id"] and k["alipay"]["gateway_private_key"], "alipay"
assert k["wechat"]["mchid"] and k["wechat"]["apiv3_key"], "wechat"
' "$keys"
fi

# --- seed data ---
plans=$(psql "$USED_DATABASE_URL" -XAt -c "select id::text from plans" 2>&1 || true)
check "seeded plans free, pro, enterprise" has_lines "$plans" free pro enterprise
quota_types=$(psql "$USED_DATABASE_URL" -XAt -c "select key from quota_types where app_id = 'idoctor'" 2>&1 || true)
check "seeded idoctor quota types" has_lines "$quota_types" \
    api_calls_full_process api_calls_l3_detect api_calls_muscle_seg storage_bytes

# --- idempotent up, status ---
pids=()
for f in "$TOLLGATE_STACK_DIR"/pids/*.pid; do
    pids+=("$(cat "$f")")
done
again=$("$STACK" up 2>&1) && again_rc=0 || again_rc=$?
check "second 'stack up' succeeds" test "$again_rc" = 0
check "second 'stack up' says it is already up" grep -qi 'already up' <<<"$again"
pids_after=()
for f in "$TOLLGATE_STACK_DIR"/pids/*.pid; do
    pids_after+=("$(cat "$f")")
done
check "second 'stack up' restarted nothing" test "${pids[*]}" = "${pids_after[*]}"
check "'stack status' reports everything ready" "$STACK" status

# --- down ---
private_ports=()
for marker in postgres redis; do
    if [[ -f "$TOLLGATE_STACK_DIR/$marker.started" ]]; then
        private_ports+=("$(marker_get "$TOLLGATE_STACK_DIR/$marker.started" port)")
    fi
done
check "'stack down' succeeds" "$STACK" down

# none PREDICATE NOUN STATE ITEM...: PREDICATE holds for no ITEM (each it holds for is named).
none() {
    local predicate=$1 noun=$2 state=$3 item rc=0
    shift 3
    for item in "$@"; do
        if "$predicate" "$item"; then
            echo "    $noun $item $state" >&2
            rc=1
        fi
    done
    return $rc
}
check "no recorded pid is alive after down (${pids[*]})" none pid_alive pid "still alive" "${pids[@]}"
check "nothing listens on the stack's ports after down" \
    none port_in_use port "still in use" "${E2E_PORTS[@]}" "${private_ports[@]}"
status_rc=0
"$STACK" status >/dev/null 2>&1 || status_rc=$?
check "'stack status' says down (exit 3) after down" test "$status_rc" = 3

if [[ $failures -gt 0 ]]; then
    echo "10-stack: $failures of $checks checks failed"
    exit 1
fi
echo "10-stack: all $checks checks passed"
