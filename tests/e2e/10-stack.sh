#!/usr/bin/env bash
# tests/e2e/10-stack.sh — the README's `scripts/stack up` brings up a working system on ports and
# a database of its own, a second `up` changes nothing, and `scripts/stack down` leaves nothing
# running that `up` started.
#
# Env: REPO (default: this checkout), DATABASE_URL / REDIS_URL (the servers to use; a fresh
# database tollgate_e2e_<random> is created on that PostgreSQL and dropped at the end).
set -euo pipefail

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-e2e-stack.XXXXXX")
# Traversable, so that a private PostgreSQL (run as the postgres user) can live inside it and
# go away with it.
chmod 755 "$TMP"
export TOLLGATE_STACK_DIR="$TMP/stack"
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"

STACK="$REPO/scripts/stack"
RAND=$(printf '%04x%04x' "$RANDOM" "$RANDOM")
DB_NAME="tollgate_e2e_$RAND"
# A Redis key prefix of its own: the control plane reconciles (and prunes) its prefix at start.
export TOLLGATE_REDIS_PREFIX="e2e$RAND"
BASE_DATABASE_URL=${DATABASE_URL:-$DEFAULT_DATABASE_URL}
export DATABASE_URL
DATABASE_URL=$(url_with_db "$BASE_DATABASE_URL" "$DB_NAME")

# Five distinct free ports, so this never meets a developer's stack on the default ones.
used=" "
for var in TOLLGATE_CP_PORT TOLLGATE_APP_PORT TOLLGATE_SIDECAR_PORT TOLLGATE_SIDECAR_ADMIN_PORT TOLLGATE_PAYSIM_PORT; do
    port=$(free_port)
    while [[ "$used" == *" $port "* ]]; do
        port=$(free_port)
    done
    used+="$port "
    export "$var=$port"
done
read -r -a ALL_PORTS <<<"$used"
CP="http://127.0.0.1:$TOLLGATE_CP_PORT"

cleanup() {
    local rc=$?
    local used_redis="" redis_private=0
    if [[ -f "$TOLLGATE_STACK_DIR/stack.env" ]]; then
        used_redis=$(. "$TOLLGATE_STACK_DIR/stack.env" && echo "$REDIS_URL")
        redis_private=$(. "$TOLLGATE_STACK_DIR/stack.env" && echo "${REDIS_PRIVATE:-0}")
    fi
    # Idempotent: after the test's own `down` this stops nothing.
    "$STACK" down --purge >/dev/null 2>&1 || true
    if [[ -n "$used_redis" && "$redis_private" != 1 ]] && redis_reachable "$used_redis"; then
        delete_prefixed_keys "$used_redis" "$TOLLGATE_REDIS_PREFIX"
    fi
    # Drop the database only on a server we did not start (a private one went with --purge), and
    # only the one this test named.
    if [[ "${PG_PRIVATE:-0}" != 1 ]] && pg_reachable "$BASE_DATABASE_URL"; then
        psql "$(url_with_db "$BASE_DATABASE_URL" postgres)" -X -q -v ON_ERROR_STOP=1 \
            -c "DROP DATABASE IF EXISTS $DB_NAME WITH (FORCE)" >/dev/null 2>&1 ||
            echo "warning: could not drop database $DB_NAME" >&2
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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

echo "# scripts/stack up (stack dir $TOLLGATE_STACK_DIR, ports ${ALL_PORTS[*]}, database $DB_NAME)"
"$STACK" up

# What `up` actually used (it may have started a private PostgreSQL/Redis).
state=$(
    # shellcheck source=/dev/null
    source "$TOLLGATE_STACK_DIR/stack.env"
    printf '%s\n' "$DATABASE_URL" "$PG_PRIVATE" "$PARTS"
)
{
    read -r USED_DATABASE_URL
    read -r PG_PRIVATE
    read -r PARTS
} <<<"$state"

# --- control plane ops endpoints and conventions ---
check "control plane /healthz is 200" code_is 200 "$CP/healthz"
check "control plane /readyz is 200" code_is 200 "$CP/readyz"
metrics=$(curl -sS --noproxy "*" --max-time 5 "$CP/metrics" || true)
check "control plane /metrics is Prometheus text" grep -q '^# TYPE' <<<"$metrics"

headers="$TMP/headers" body="$TMP/body"
status=$(curl -sS --noproxy "*" --max-time 5 -D "$headers" -o "$body" -w '%{http_code}' "$CP/e2e-no-such-route-$RAND" || true)
check "unknown route is 404" test "$status" = 404
check "unknown route body says not_found" grep -q '"not_found"' "$body"
check "response carries X-Request-Id" grep -qi '^x-request-id: *[^[:space:]]' "$headers"

curl -sS --noproxy "*" --max-time 5 -D "$headers" -o /dev/null -H "X-Request-Id: e2e-$RAND" "$CP/healthz" || true
check "a client's X-Request-Id is echoed" grep -qix "x-request-id: *e2e-$RAND" <(tr -d '\r' <"$headers")

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

none_alive() {
    local pid rc=0
    for pid in "${pids[@]}"; do
        if pid_alive "$pid"; then
            echo "    pid $pid still alive" >&2
            rc=1
        fi
    done
    return $rc
}
none_listening() {
    local port rc=0
    for port in "$@"; do
        if port_in_use "$port"; then
            echo "    port $port still in use" >&2
            rc=1
        fi
    done
    return $rc
}
check "no recorded pid is alive after down (${pids[*]})" none_alive
check "nothing listens on the stack's ports after down" none_listening "${ALL_PORTS[@]}" "${private_ports[@]}"
status_rc=0
"$STACK" status >/dev/null 2>&1 || status_rc=$?
check "'stack status' says down (exit 3) after down" test "$status_rc" = 3

if [[ $failures -gt 0 ]]; then
    echo "10-stack: $failures of $checks checks failed"
    exit 1
fi
echo "10-stack: all $checks checks passed"
