#!/usr/bin/env bash
# tests/e2e/85-faults.sh — issue #12's fault scenarios for metering: a stack of its own
# (lib-stack.sh: temp stack dir, free ports, database tollgate_e2e_<random> dropped at the end,
# Redis key prefix e2e<random>) on a PRIVATE redis-server that this script starts, kills and
# starts again, then faults_check.py:
#
#   burst       2,000 simultaneous metered calls of 20 users, 30 % of them failing in the app
#               (refunded): each user's `used` equals its successful calls, and no 503.
#   redis-pause CLIENT PAUSE 2000 ALL, then WRITE, under load: seconds to the first 200 after
#               each pause, and `used` still equals the successful calls.
#   pg-kill     pg_terminate_backend of every connection to the stack's database under load.
#   drain       at a minute boundary, a drain pass caught inside its transaction (a SHARE lock
#               on usage_minutes holds it there): pg_terminate_backend; the control plane
#               SIGKILLed; SIGKILLed again after the commit, before the staged buckets are
#               deleted; restarted each time. Then ledger == successful calls for every user.
#   redis-loss  Redis killed under load and started again EMPTY: seconds to the first 200 and
#               to the first 200 with an API key, `/v1/quota` never below the ledger during the
#               rebuild, and the calls lost with the undrained minute.
#
# Every scenario has its own users; at the end (one wait for the last minute to close and
# drain) every user's ledger (usage_minutes) equals its counter (/v1/quota used), and equals its
# successful calls except for the calls the Redis loss took (reported). The run takes two to
# four minutes, most of it waiting for minutes to close (usage_close_grace is 0 here).
#
# Only 127.0.0.1 is loaded, with bounded counts; only this stack's processes, this script's own
# redis-server and the stack's own database are touched (the shared PostgreSQL sees a few
# thousand queries and pg_terminate_backend on that one database only).
#
# Env: REPO (default: this checkout), DATABASE_URL (the PostgreSQL to use; REDIS_URL is not
# used: the Redis is this script's), TOLLGATE_SKIP_BUILD=1 / TOLLGATE_PROFILE=release|dev to pick
# the binaries. Last line: `faults: N passed, M failed`.
set -euo pipefail
# shellcheck source=tests/e2e/lib-stack.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-stack.sh"
e2e_stack_logs 40 control-plane sidecar

ensure_tools
command -v redis-server >/dev/null 2>&1 || apt_install redis-server
CHECK="$REPO/tests/e2e/faults_check.py"

# The private Redis: no persistence, so a restart brings it back empty. faults_check.py starts
# it (here and for the restart) with the same arguments, from its pid file's folder.
FAULTS_REDIS_DIR="$E2E_TMP/redis"
FAULTS_REDIS_PORT=$(free_port)
while [[ " ${E2E_PORTS[*]} " == *" $FAULTS_REDIS_PORT "* ]]; do FAULTS_REDIS_PORT=$(free_port); done
mkdir -p "$FAULTS_REDIS_DIR"

# Stops the stack first (it writes to the Redis), then the Redis this script started: the pid
# in its pid file, only while that process is still a redis-server on our port.
faults_down() {
    e2e_stack_down
    local pid
    pid=$(cat "$FAULTS_REDIS_DIR/redis.pid" 2>/dev/null || true)
    if [[ -n "$pid" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "redis-server .*:$FAULTS_REDIS_PORT"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
}
e2e_at_exit faults_down

python3 "$CHECK" redis-start --port "$FAULTS_REDIS_PORT" --dir "$FAULTS_REDIS_DIR"
export REDIS_URL="redis://127.0.0.1:$FAULTS_REDIS_PORT"

# Usage reaches the ledger as soon as its minute has closed (no grace), so that one wait of
# about a minute covers every scenario. The in-flight cap is above the burst, so that any 503
# in it comes from the metering, not from the overload protection. The stack runs debug builds,
# several times slower per request than release: a burst of 2,000 calls keeps the sidecar's
# cores busy long enough that reading Redis's answers alone can take most of the default 250 ms
# deadline on a slow 2-core machine, so the deadline is 1 s here (a call that waited its turn in
# front of Redis would still take seconds and fail the burst check).
export TOLLGATE_USAGE_CLOSE_GRACE=0s TOLLGATE_SIDECAR_MAX_IN_FLIGHT=4096 TOLLGATE_SIDECAR_REDIS_TIMEOUT=1s
e2e_up
[[ " $PARTS " == *" sidecar "* ]] ||
    die "the stack started no sidecar (parts: $PARTS); build it: cargo build -p tollgate-sidecar"
[[ "$USED_REDIS_URL" == "$REDIS_URL" ]] || die "the stack uses $USED_REDIS_URL, not this script's $REDIS_URL"

# An admin, for the grants that give every user ample quota.
# shellcheck source=/dev/null
BIN_DIR=$(source "$TOLLGATE_STACK_DIR/stack.env" && echo "$BIN_DIR")
admin_email="faults-admin-$E2E_RAND@example.com"
admin_password="faults-admin-password-$E2E_RAND"
printf '%s\n' "$admin_password" |
    DATABASE_URL="$USED_DATABASE_URL" REDIS_URL="$REDIS_URL" TOLLGATE_DATA_DIR="$TOLLGATE_STACK_DIR/data" \
        "$BIN_DIR/tollgate-control-plane" admin create --email "$admin_email" >/dev/null ||
    die "tollgate-control-plane admin create failed"

python3 -u "$CHECK" run \
    --cp "$CP" --proxy "$SIDECAR" \
    --stack-dir "$TOLLGATE_STACK_DIR" \
    --database-url "$USED_DATABASE_URL" \
    --redis-port "$FAULTS_REDIS_PORT" --redis-dir "$FAULTS_REDIS_DIR" \
    --prefix "$TOLLGATE_REDIS_PREFIX" \
    --admin-email "$admin_email" --admin-password "$admin_password"
