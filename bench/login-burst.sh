#!/usr/bin/env bash
# bench/login-burst.sh — the control plane's resident memory under bursts of concurrent logins
# (issue 13). Builds the release binary, starts it against a throwaway database and Redis
# prefix, registers one user, then fires BURSTS bursts of CONCURRENCY logins at once and prints
# the process's VmRSS after each burst, and VmHWM (the peak) at the end. Figures go to
# docs/deployment.md ("Sizing").
#
#   bench/login-burst.sh                 # 3 bursts of 64, defaults of the program
#   BURSTS=5 CONCURRENCY=128 bench/login-burst.sh
#   TOLLGATE_HASH_CONCURRENCY=4 bench/login-burst.sh   # any setting passes through
#   TOLLGATE_SKIP_BUILD=1 bench/login-burst.sh          # use the release binary already built
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

BURSTS=${BURSTS:-3}
CONCURRENCY=${CONCURRENCY:-64}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-burst.XXXXXX")
PID=""
BASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/tollgate}
BASE_URL=${BASE_URL%%\?*}
PG_ADMIN_URL="${BASE_URL%/*}/postgres"
DB_NAME="tollgate_burst_$$"
PREFIX="burst$$"
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}

cleanup() {
    [[ -n "$PID" ]] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    psql -q "$PG_ADMIN_URL" -c "DROP DATABASE IF EXISTS $DB_NAME WITH (FORCE)" >/dev/null 2>&1 || true
    redis-cli -u "$REDIS_URL" --scan --pattern "$PREFIX:*" 2>/dev/null |
        xargs -r -d '\n' -n 100 redis-cli -u "$REDIS_URL" DEL >/dev/null 2>&1 || true
    rm -rf "$TMP"
}
trap cleanup EXIT

cd "$REPO"
[[ "${TOLLGATE_SKIP_BUILD:-}" == 1 ]] || cargo build --release --locked -p tollgate-control-plane >&2
BIN="$(cargo_bin_dir release)/tollgate-control-plane"
psql -q "$PG_ADMIN_URL" -c "CREATE DATABASE $DB_NAME" >/dev/null
DB_URL="${BASE_URL%/*}/$DB_NAME"
PORT=$(free_port)
INTERNAL=$(free_port)
openssl genpkey -algorithm ed25519 -out "$TMP/jwt.pem" 2>/dev/null
export DATABASE_URL="$DB_URL" REDIS_URL TOLLGATE_REDIS_PREFIX="$PREFIX" TOLLGATE_LOG=warn \
    TOLLGATE_LISTEN="127.0.0.1:$PORT" TOLLGATE_INTERNAL_LISTEN="127.0.0.1:$INTERNAL" \
    TOLLGATE_JWT_PRIVATE_KEY="$(cat "$TMP/jwt.pem")" TOLLGATE_JWT_KID=burst
"$BIN" migrate >/dev/null
"$BIN" seed >/dev/null
"$BIN" serve &
PID=$!
for _ in $(seq 1 100); do
    [[ "$(http_code "http://127.0.0.1:$PORT/readyz")" == 200 ]] && break
    sleep 0.1
done
CP="http://127.0.0.1:$PORT"
BODY='{"email":"burst@example.com","password":"correct horse battery"}'
curl -s -o /dev/null -X POST "$CP/v1/auth/register" -H 'content-type: application/json' -d "$BODY"
rss() { awk -v k="$1:" '$1 == k { print int($2 / 1024) }' "/proc/$PID/status"; }
echo "idle before: $(rss VmRSS) MiB resident"
for b in $(seq 1 "$BURSTS"); do
    codes=$(seq 1 "$CONCURRENCY" | xargs -P "$CONCURRENCY" -I{} \
        curl -s -o /dev/null -w '%{http_code}\n' -X POST "$CP/v1/auth/login" \
        -H 'content-type: application/json' -d "$BODY" | sort | uniq -c | tr -s ' ' | paste -sd, -)
    echo "burst $b ($CONCURRENCY logins: $codes): $(rss VmRSS) MiB resident"
done
sleep 5
echo "5 s later: $(rss VmRSS) MiB resident; peak (VmHWM) $(rss VmHWM) MiB"
