#!/usr/bin/env bash
# bench/load.sh — the whole system on this machine under wrk; the figures go to bench/RESULTS.md.
#
#   bench/load.sh                              everything, end to end (about 20 minutes)
#   BENCH_ONLY=scale bench/load.sh             one phase (or several: BENCH_ONLY="runs refusal")
#   BENCH_DURATION=2 BENCH_WARMUP=1 BENCH_SCALE_REQUESTS=20000 BENCH_SCALE_USERS=50 \
#       BENCH_OUT=/tmp/r.md BENCH_PLOTS=/tmp/plots bench/load.sh      a smoke run
#
# Phases (BENCH_ONLY picks some; all by default, in this order):
#   runs     POST /l3/{patient} (a metered iDoctor route) through
#              app      wrk → demo app                 (fixed X-User-Id: the app has no authentication)
#              nginx    wrk → nginx → demo app         (Debian's nginx as a plain reverse proxy)
#              jwt      wrk → sidecar → demo app       (Bearer JWTs of many users, rotating)
#              api_key  wrk → sidecar → demo app       (X-API-Key of many users, rotating)
#            and the two sidecar paths again with the control plane paused (SIGSTOP): then the
#            sidecar is the only Redis client, so INFO commandstats give exactly what a decision
#            costs (EVALSHA per admitted request, the commands decide.lua runs, µs inside Redis).
#            Each at saturation ("max") and at an offered load every path sustains ("paced": each
#            connection waits a random BENCH_PACE_MS on average between requests). Recorded:
#            requests/s, p50/p99, Redis commands per admitted request (commandstats deltas; the
#            admitted count is the sidecar's tollgate_sidecar_requests_total{decision="allowed"}),
#            CPU per process, the sidecar's resident memory; one MONITOR sample attributes every
#            command to the process that sent it.
#   sweep    app, nginx, jwt and api_key at saturation for each connection count of BENCH_SWEEP
#            (the control plane draining); RESULTS.md links SVG plots of req/s and p99 against
#            connections (gnuplot).
#   refusal  one user whose quota is exhausted hammers the sidecar (control plane paused):
#            Redis commands (EVALSHA) per refused request, refused/s, latency, sidecar CPU.
#   peers    bench/src/bin/peers.rs (`tollgate-peers`): Tollgate's decide.lua and Limitador
#            (crate limitador 0.14, Redis storage, plain and cached) on the same Redis, two
#            instances each: decisions/s, p50/p99, Redis commands per decision for each
#            concurrency of BENCH_SWEEP, and admission accuracy (N concurrent requests against a
#            remaining R). The control plane is paused meanwhile.
#   scale    BENCH_SCALE_REQUESTS admitted requests (API keys) from BENCH_SCALE_USERS users with
#            the control plane draining: Redis used_memory, DBSIZE and keys by kind (user hashes,
#            usage buckets, settle markers, ...) before, right after, after the settle window and
#            after the drain caught up; the users' own state (MEMORY USAGE of their hashes); rows
#            PostgreSQL wrote (pg_stat_user_tables n_tup_ins + n_tup_upd of usage_minutes,
#            usage_months, usage_drains); the ledger's calls against the admitted count; and the
#            control plane's + PostgreSQL's CPU from the load's start until the drain caught up.
#
# Everything runs on loopback on free ports, each process under `timeout` and stopped on exit:
# a private redis-server (so that commandstats count only this benchmark; BENCH_REDIS_URL uses
# another one instead), a throwaway database on the PostgreSQL at DATABASE_URL (created, migrated,
# seeded, dropped), the control plane with a fresh Ed25519 JWT key, the demo app, the sidecar
# (all release builds: the control plane drains usage as in production), nginx with a private
# config. The system nginx is never touched; shared Redis and PostgreSQL are never flushed.
#
# Environment (defaults in brackets):
#   BENCH_ONLY ["runs sweep refusal peers scale"]   phases to run
#   BENCH_DURATION [15]   seconds per measured run       BENCH_WARMUP [3]  seconds of warm-up
#   BENCH_CONNECTIONS [32]  BENCH_THREADS [2]            BENCH_USERS [200] distinct users
#   BENCH_PACE_MS [10]    mean pause per connection in the paced runs
#   BENCH_SWEEP ["8 32 128"]  connection counts of the sweep, and the peers' concurrencies
#   BENCH_SCALE_USERS [1000]  BENCH_SCALE_REQUESTS [1000000]  the scale run (users are created
#                         up to max(BENCH_USERS, BENCH_SCALE_USERS); the runs use the first ones)
#   BENCH_SETTLE_WINDOW_S [10]  the sidecar's settle window (TOLLGATE_SIDECAR_SETTLE_WINDOW)
#   BENCH_USAGE_CLOSE_GRACE_S [10]  the drain's close grace (TOLLGATE_USAGE_CLOSE_GRACE)
#   BENCH_PEER_SECONDS [10]  BENCH_PEER_USERS [1000]  per throughput point of the peers phase
#   BENCH_PEER_REQUESTS [1000]  BENCH_PEER_REMAINING [100]  BENCH_PEER_ROUNDS [5]  accuracy test
#   BENCH_PEER_SYSTEMS ["tollgate,limitador"]  add limitador_cached (CachedRedisStorage) by hand: in the
#                         run of 2026-11-30 its first throughput point never finished (no CPU, no
#                         progress for 7 minutes), so it is not in the default set
#   BENCH_NOISE_LIMIT [0.2]  cores other processes may use during a run before it is repeated
#   BENCH_MAX_SECONDS [3600]  hard bound on every process this script starts
#   DATABASE_URL [postgres://postgres@127.0.0.1:5432/tollgate]  server for the throwaway database
#   BENCH_REDIS_URL       use this Redis instead of a private one (its commandstats then include
#                         other clients' commands; only this run's keys are deleted at the end)
#   BENCH_OUT [bench/RESULTS.md]  the file whose MEASURED part is rewritten
#   BENCH_PLOTS [bench/plots]     where the SVG plots go (linked from BENCH_OUT)
#   BENCH_KEEP=1          keep the temporary directory (logs, wrk output, snapshots)
#   BENCH_SKIP_BUILD=1    use the binaries already built
#   BENCH_CP_PROFILE [release]  the control plane's cargo profile ("control plane draining as in
#                         production"; dev only to compare with older figures)
#   BENCH_PERF [1]        profile the sidecar with `perf record` in one extra run, if perf exists
#                         (BENCH_ONLY=profile: that run alone; BENCH_PERF_CALLGRAPH=1 adds call chains)
#   BENCH_SIDECAR_ENV     extra NAME=VALUE settings for the sidecar, space-separated, to compare
#                         settings (e.g. "TOLLGATE_SIDECAR_WORKER_THREADS=1")
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$REPO/bench"
DURATION=${BENCH_DURATION:-15}
WARMUP=${BENCH_WARMUP:-3}
CONNS=${BENCH_CONNECTIONS:-32}
THREADS=${BENCH_THREADS:-2}
USERS=${BENCH_USERS:-200}
PACE_MS=${BENCH_PACE_MS:-10}
# A run during which processes outside the benchmark kept more than this many cores busy (a build,
# another test suite) is measured again, up to three times; the quietest attempt is reported.
NOISE_LIMIT=${BENCH_NOISE_LIMIT:-0.2}
MAX_SECONDS=${BENCH_MAX_SECONDS:-3600}
CP_PROFILE=${BENCH_CP_PROFILE:-release}
PHASES=" ${BENCH_ONLY:-runs sweep refusal peers scale} "
SWEEP=${BENCH_SWEEP:-8 32 128}
SCALE_USERS=${BENCH_SCALE_USERS:-1000}
SCALE_REQUESTS=${BENCH_SCALE_REQUESTS:-1000000}
SETTLE_S=${BENCH_SETTLE_WINDOW_S:-10}
CLOSE_GRACE_S=${BENCH_USAGE_CLOSE_GRACE_S:-10}
OUT=${BENCH_OUT:-$BENCH/RESULTS.md}
PLOTS=${BENCH_PLOTS:-$BENCH/plots}
GRANT=100000000

# phase NAME: whether BENCH_ONLY selects it.
phase() { [[ $PHASES == *" $1 "* ]]; }
for p in $PHASES; do
    [[ " runs sweep refusal peers scale profile " == *" $p "* ]] || { echo "unknown phase in BENCH_ONLY: $p" >&2; exit 2; }
done

log() { printf '[load %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# --- tools ----------------------------------------------------------------------------------

# need COMMAND PACKAGE: installs the Debian package if the command is missing. A package whose
# maintainer script would start a system service (nginx) is installed with services held back.
need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    [[ $(id -u) -eq 0 ]] || die "$1 is missing: apt-get install $2"
    log "installing Debian package $2 (for $1)"
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1 ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }
    ((made_policy)) && rm -f "$policy"
    command -v "$1" >/dev/null 2>&1 || die "$2 installed but $1 is still missing"
}
for tool in nginx:nginx wrk:wrk jq:jq curl:curl redis-server:redis-server redis-cli:redis-tools \
    psql:postgresql-client openssl:openssl python3:python3 gnuplot:gnuplot-nox; do
    need "${tool%%:*}" "${tool#*:}"
done

# --- build ----------------------------------------------------------------------------------

TARGET=$(cd "$REPO" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)

# build_peers: tollgate-peers with Limitador. limitador 0.14.0 does not compile with its
# `redis_storage` feature alone (two items the Redis storage uses are gated on `disk_storage`,
# i.e. RocksDB), so it is built from a copy of the crate in the target directory with those two
# gates widened, through `--config patch...`; Cargo.lock is restored afterwards (the patch makes
# Cargo rewrite it).
build_peers() {
    local src patched lock
    src=$(cd "$REPO" && cargo metadata --format-version 1 --features tollgate-bench/limitador |
        jq -r '.packages[] | select(.name == "limitador") | .manifest_path' | head -n 1)
    [[ -n $src && -f $src ]] || die "cannot find the limitador crate's source (cargo metadata)"
    src=$(dirname "$src")
    patched="$TARGET/limitador-patched/$(basename "$src")"
    if [[ ! -e $patched/.patched ]]; then
        rm -rf "$patched" && mkdir -p "$(dirname "$patched")" && cp -r "$src" "$patched"
        sed -i 's/^\(\s*\)#\[cfg(feature = "disk_storage")\]$/\1#[cfg(any(feature = "disk_storage", feature = "redis_storage"))]/' \
            "$patched/src/storage/keys.rs" "$patched/src/counter.rs"
        [[ $(grep -c 'feature = "redis_storage"))]' "$patched/src/storage/keys.rs" "$patched/src/counter.rs" |
            awk -F: '{ n += $2 } END { print n }') -ge 2 ]] || die "could not patch $patched (did limitador change?)"
        touch "$patched/.patched"
    fi
    lock=$(mktemp)
    cp "$REPO/Cargo.lock" "$lock"
    (cd "$REPO" && cargo build --release -p tollgate-bench --features tollgate-bench/limitador \
        --bin tollgate-peers --config "patch.crates-io.limitador.path='$patched'")
    local rc=$?
    cp "$lock" "$REPO/Cargo.lock" && rm -f "$lock"
    return $rc
}

if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
    log "building: release sidecar, demo app and peers harness, $CP_PROFILE control plane"
    (cd "$REPO" && cargo build --release -p tollgate-sidecar -p tollgate-demo-idoctor &&
        cargo build --profile "$CP_PROFILE" -p tollgate-control-plane) || die "build failed"
    if phase peers; then build_peers || die "building tollgate-peers failed"; fi
fi
SIDECAR_BIN="$TARGET/release/tollgate-sidecar"
APP_BIN="$TARGET/release/idoctor-demo"
PEERS_BIN="$TARGET/release/tollgate-peers"
CP_DIR=$CP_PROFILE
[[ $CP_PROFILE == dev ]] && CP_DIR=debug
CP_BIN="$TARGET/$CP_DIR/tollgate-control-plane"
for bin in "$SIDECAR_BIN" "$APP_BIN" "$CP_BIN" $(phase peers && echo "$PEERS_BIN"); do
    [[ -x $bin ]] || die "$bin is not built"
done

# --- processes ------------------------------------------------------------------------------

TMP=$(mktemp -d /tmp/tollgate-bench.XXXXXX)
RUN_ID=$(od -An -N5 -tx1 /dev/urandom | tr -d ' \n')
PREFIX="bench$RUN_ID"
WRAPPERS=()  # pids of the `timeout` wrappers, in start order
DB_NAME=""
PG_ADMIN_URL=""
# Set by `start` (NAME_PID, NAME_WRAPPER).
redis_PID="" cp_PID="" app_PID="" app_WRAPPER="" nginx_PID="" sidecar_PID=""
CP_STOPPED=0

# start NAME COMMAND...: runs COMMAND in the background under `timeout`, output to $TMP/NAME.log.
# Sets NAME_PID to the command's own pid (the wrapper's child).
start() {
    local name=$1 wrapper child="" _
    shift
    timeout -k 5 "$MAX_SECONDS" "$@" >"$TMP/$name.log" 2>&1 &
    wrapper=$!
    WRAPPERS+=("$wrapper")
    for _ in $(seq 1 100); do
        child=$(pgrep -P "$wrapper" | head -n 1 || true)
        [[ -n $child ]] && break
        sleep 0.05
    done
    [[ -n $child ]] || die "$name did not start; see $TMP/$name.log"
    printf -v "${name}_PID" '%s' "$child"
    printf -v "${name}_WRAPPER" '%s' "$wrapper"
}

# stop_wrapper PID: TERM (timeout passes it on), up to 10 s, then KILL.
stop_wrapper() {
    local pid=$1 _
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    pkill -KILL -P "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? i
    set +e
    trap - EXIT INT TERM
    if ((CP_STOPPED)); then kill -CONT "$cp_PID" 2>/dev/null; fi
    for ((i = ${#WRAPPERS[@]} - 1; i >= 0; i--)); do
        stop_wrapper "${WRAPPERS[i]}"
    done
    if [[ -n "${BENCH_REDIS_URL:-}" ]]; then
        # A shared Redis: remove exactly what this run created.
        redis-cli -u "$REDIS_URL" --scan --pattern "$PREFIX:*" 2>/dev/null |
            xargs -r -n 500 redis-cli -u "$REDIS_URL" del >/dev/null 2>&1
    fi
    if [[ -n $DB_NAME ]]; then
        psql -q "$PG_ADMIN_URL" -c "DROP DATABASE IF EXISTS $DB_NAME WITH (FORCE)" >/dev/null 2>&1 ||
            log "could not drop database $DB_NAME"
    fi
    if [[ "${BENCH_KEEP:-0}" == 1 || $rc -ne 0 ]]; then
        log "logs and snapshots kept in $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# wait_http URL [SECONDS]: until URL answers 2xx.
wait_http() {
    local url=$1 deadline=$((SECONDS + ${2:-60}))
    until [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)" == 2?? ]]; do
        ((SECONDS < deadline)) || die "$url did not answer within ${2:-60}s"
        sleep 0.2
    done
}

REDIS_PORT=$(free_port)
CP_PORT=$(free_port)
CP_INTERNAL_PORT=$(free_port)
APP_PORT=$(free_port)
NGINX_PORT=$(free_port)
SIDECAR_PORT=$(free_port)
ADMIN_PORT=$(free_port)

# Redis.
if [[ -n "${BENCH_REDIS_URL:-}" ]]; then
    REDIS_URL=$BENCH_REDIS_URL
    log "using the Redis at $REDIS_URL (commandstats include its other clients)"
else
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
    start redis redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
        --dir "$TMP" --daemonize no
    for _ in $(seq 1 100); do
        redis-cli -u "$REDIS_URL" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
    redis-cli -u "$REDIS_URL" ping >/dev/null || die "private redis-server did not start"
fi

# A throwaway database.
BASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/tollgate}
BASE_URL=${BASE_URL%%\?*}
PG_ADMIN_URL="${BASE_URL%/*}/postgres"
DB_NAME="tollgate_bench_$RUN_ID"
psql -q "$PG_ADMIN_URL" -c "CREATE DATABASE $DB_NAME" >/dev/null || die "cannot create a database on $PG_ADMIN_URL"
DB_URL="${BASE_URL%/*}/$DB_NAME"

# The control plane.
openssl genpkey -algorithm ed25519 -out "$TMP/jwt.pem" 2>/dev/null
CP_URL="http://127.0.0.1:$CP_PORT"
CP_ENV=(
    DATABASE_URL="$DB_URL" REDIS_URL="$REDIS_URL" TOLLGATE_REDIS_PREFIX="$PREFIX"
    TOLLGATE_LISTEN="127.0.0.1:$CP_PORT" TOLLGATE_PUBLIC_URL="$CP_URL"
    TOLLGATE_INTERNAL_LISTEN="127.0.0.1:$CP_INTERNAL_PORT"
    TOLLGATE_DATA_DIR="$TMP/cp-data" TOLLGATE_JWT_PRIVATE_KEY="$(cat "$TMP/jwt.pem")"
    TOLLGATE_JWT_KID="bench-$RUN_ID" TOLLGATE_ACCESS_TOKEN_TTL=2h TOLLGATE_LOG=warn
    TOLLGATE_USAGE_CLOSE_GRACE="${CLOSE_GRACE_S}s"
)
mkdir -p "$TMP/cp-data"
env "${CP_ENV[@]}" "$CP_BIN" migrate >"$TMP/migrate.log" 2>&1 || die "migrate failed; see $TMP/migrate.log"
env "${CP_ENV[@]}" "$CP_BIN" seed >"$TMP/seed.log" 2>&1 || die "seed failed; see $TMP/seed.log"
start cp env "${CP_ENV[@]}" "$CP_BIN" serve
wait_http "$CP_URL/readyz" 120
log "control plane ready on $CP_URL (database $DB_NAME, redis prefix $PREFIX)"

# The demo app; restarted before every run so each starts with an empty in-memory store.
start_app() {
    if [[ -n $app_WRAPPER ]]; then
        stop_wrapper "$app_WRAPPER"
    fi
    start app env IDOCTOR_LISTEN="127.0.0.1:$APP_PORT" "$APP_BIN"
    wait_http "http://127.0.0.1:$APP_PORT/health" 30
}
start_app

# nginx as a plain reverse proxy, with the settings a production pass-through uses (a worker per
# core, upstream keep-alive, access log on as the sidecar logs every request too).
mkdir -p "$TMP/nginx"
cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes auto;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log $TMP/nginx/access.log;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    upstream app {
        server 127.0.0.1:$APP_PORT;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Request-Id \$request_id;
        }
    }
}
EOF
start nginx nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx" -e "$TMP/nginx/error.log"
wait_http "http://127.0.0.1:$NGINX_PORT/health" 30
log "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') proxying 127.0.0.1:$NGINX_PORT → app"

# The sidecar: the iDoctor routes file with the per-user rate limit raised to 1000/s with a burst
# of 100,000, so that it never refuses the benchmark (the GCRA work in decide.lua still runs).
sed -e 's/^\(    rate: \)100$/\11000/' -e 's/^\(    burst: \)200$/\1100000/' \
    "$REPO/demo/idoctor/routes.yaml" >"$TMP/routes.yaml"
if ! grep -q 'rate: 1000$' "$TMP/routes.yaml" || ! grep -q 'burst: 100000$' "$TMP/routes.yaml"; then
    die "could not raise the rate limit in the routes file (did its layout change?)"
fi
start sidecar env REDIS_URL="$REDIS_URL" TOLLGATE_REDIS_PREFIX="$PREFIX" \
    TOLLGATE_SIDECAR_LISTEN="127.0.0.1:$SIDECAR_PORT" \
    TOLLGATE_SIDECAR_ADMIN_LISTEN="127.0.0.1:$ADMIN_PORT" \
    TOLLGATE_SIDECAR_UPSTREAM="http://127.0.0.1:$APP_PORT" \
    TOLLGATE_SIDECAR_ROUTES="$TMP/routes.yaml" \
    TOLLGATE_SIDECAR_CONTROL_PLANE_URL="$CP_URL" \
    TOLLGATE_SIDECAR_CONTROL_PLANE_INTERNAL_URL="http://127.0.0.1:$CP_INTERNAL_PORT" \
    TOLLGATE_SIDECAR_SETTLE_WINDOW="${SETTLE_S}s" \
    ${BENCH_SIDECAR_ENV:-} "$SIDECAR_BIN"
wait_http "http://127.0.0.1:$ADMIN_PORT/readyz" 60
log "sidecar ready on 127.0.0.1:$SIDECAR_PORT"

# --- Redis and PostgreSQL state ---------------------------------------------------------------

# redis_state OUT: used_memory, DBSIZE, every key of this run (SCAN) and the MEMORY USAGE of each
# user and API-key hash, in OUT.* files that `report.py state` summarises.
redis_state() {
    local out=$1
    redis-cli -u "$REDIS_URL" info memory | tr -d '\r' >"$out.memory"
    redis-cli -u "$REDIS_URL" dbsize | tr -d '\r' >"$out.dbsize"
    redis-cli -u "$REDIS_URL" --scan --pattern "$PREFIX:*" >"$out.keys"
    grep -E ':u:|:k:' "$out.keys" | sed 's/^/MEMORY USAGE /' |
        redis-cli -u "$REDIS_URL" >"$out.key_memory" 2>/dev/null || true
    grep -E ':u:|:k:' "$out.keys" >"$out.key_memory.keys" || true
    date +%s%N >"$out.wall_ns"
}

# pg_state OUT: what the usage drain wrote so far (pg_stat_user_tables, row counts).
pg_state() {
    local out=$1
    # Statistics reach pg_stat_user_tables when a backend's transaction ends, up to a second
    # later (PostgreSQL 15 flushes them at most once a second).
    sleep 1.2
    psql -tA -F ' ' "$DB_URL" -c "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del, n_live_tup
        FROM pg_stat_user_tables WHERE relname IN ('usage_minutes', 'usage_months', 'usage_drains')" \
        >"$out.pg_stat"
    psql -tA -F ' ' "$DB_URL" -c "SELECT 'rows_minutes', count(*) FROM usage_minutes
        UNION ALL SELECT 'rows_months', count(*) FROM usage_months
        UNION ALL SELECT 'rows_drains', count(*) FROM usage_drains" >"$out.pg_rows"
}

# bucket_keys / marker_keys: how many usage buckets (live or staged) and settle markers exist.
count_keys() {
    redis-cli -u "$REDIS_URL" --scan --pattern "$PREFIX:{s:*}:$1:*" | wc -l
}

# wait_quiet [SECONDS]: until no usage bucket and no settle marker is left in Redis (the drain
# has recorded every closed minute, the markers have expired), so that a measurement of state
# starts from the users' own state alone.
wait_quiet() {
    local deadline=$((SECONDS + ${1:-180})) b m
    while b=$(count_keys b) && m=$(count_keys m) && ((b + m > 0)); do
        if ((SECONDS >= deadline)); then
            log "still $b usage buckets and $m settle markers after ${1:-180}s; going on"
            return 0
        fi
        sleep 2
    done
}

# --- users ------------------------------------------------------------------------------------

# Checked HTTP: http METHOD URL OUT [curl args...]; fails unless 2xx.
http() {
    local method=$1 url=$2 out=$3 code
    shift 3
    code=$(curl -sS --max-time 30 -o "$out" -w '%{http_code}' -X "$method" \
        -H 'content-type: application/json' "$@" "$url") || return 1
    [[ $code == 2?? ]] || {
        echo "$method $url: $code $(head -c 300 "$out")" >&2
        return 1
    }
}
ADMIN_EMAIL="admin-$RUN_ID@bench.example"
ADMIN_PASSWORD="bench-admin-$RUN_ID"
USER_PASSWORD="bench-user-$RUN_ID"
printf '%s\n' "$ADMIN_PASSWORD" | env "${CP_ENV[@]}" "$CP_BIN" admin create --email "$ADMIN_EMAIL" \
    >"$TMP/admin.log" 2>&1 || die "admin create failed; see $TMP/admin.log"
http POST "$CP_URL/v1/auth/login" "$TMP/admin.json" \
    -d "{\"email\":\"$ADMIN_EMAIL\",\"password\":\"$ADMIN_PASSWORD\"}" || die "admin login failed"
ADMIN_TOKEN=$(jq -r .access_token "$TMP/admin.json")

# make_user I [GRANT]: register, an API key, and (unless GRANT is 0) a grant of the metered quota
# type; without a grant the user has the free plan's 100 calls a month.
make_user() {
    local i=$1 grant=${2:-$GRANT} dir="$TMP/users" token id
    http POST "$CP_URL/v1/auth/register" "$dir/$i.json" \
        -d "{\"email\":\"user-$i-$RUN_ID@bench.example\",\"password\":\"$USER_PASSWORD\"}" || return 1
    token=$(jq -r .access_token "$dir/$i.json")
    id=$(jq -r .user.id "$dir/$i.json")
    http POST "$CP_URL/v1/api-keys" "$dir/$i.key.json" -H "authorization: Bearer $token" \
        -d '{"name":"bench"}' || return 1
    ((grant > 0)) || return 0
    http POST "$CP_URL/v1/admin/users/$id/grants" "$dir/$i.grant.json" \
        -H "authorization: Bearer $ADMIN_TOKEN" \
        -d "{\"app\":\"idoctor\",\"type\":\"api_calls_l3_detect\",\"amount\":$grant,\"reason\":\"bench\"}" || return 1
}
export -f make_user http
export TMP CP_URL RUN_ID USER_PASSWORD ADMIN_TOKEN GRANT

# creds KIND FIRST LAST: one credential header per line for users FIRST..LAST.
creds() {
    local kind=$1 i
    for i in $(seq "$2" "$3"); do
        if [[ $kind == jwt ]]; then
            printf 'Authorization: Bearer %s\n' "$(jq -r .access_token "$TMP/users/$i.json")"
        else
            printf 'X-API-Key: %s\n' "$(jq -r .key "$TMP/users/$i.key.json")"
        fi
    done
}

# check_creds FILE MIN_LIMIT: every credential works through the sidecar and sees at least this
# quota limit (the control plane writes limits into Redis asynchronously, within about a second).
check_creds() {
    local file=$1 min=$2 line limit deadline=$((SECONDS + 60))
    while IFS= read -r line; do
        while :; do
            limit=$(curl -s -o /dev/null -D - --max-time 5 -X POST -H "$line" \
                "http://127.0.0.1:$SIDECAR_PORT/l3/check" | tr -d '\r' |
                awk 'tolower($1) == "x-quota-limit:" { print $2 }')
            [[ -n $limit ]] && ((limit >= min)) && break
            ((SECONDS < deadline)) || die "a credential from $file is not admitted with its quota (limit '${limit}')"
            sleep 0.2
        done
    done <"$file"
}

N_USERS=$USERS
if phase scale && ((SCALE_USERS > N_USERS)); then N_USERS=$SCALE_USERS; fi
mkdir -p "$TMP/users" "$TMP/state"
redis_state "$TMP/state/no-users"
log "registering $N_USERS users, each with an API key and a grant of $GRANT api_calls_l3_detect"
seq 1 "$N_USERS" | xargs -P 4 -I{} bash -c 'make_user {}' 2>"$TMP/users.err" ||
    die "creating users failed: $(head -n 5 "$TMP/users.err")"
creds jwt 1 "$USERS" >"$TMP/creds-jwt"
creds key 1 "$USERS" >"$TMP/creds-key"
creds key 1 "$N_USERS" >"$TMP/creds-key-all"
printf 'X-User-Id: bench-user\n' >"$TMP/creds-app"
check_creds "$TMP/creds-jwt" "$GRANT"
check_creds "$TMP/creds-key-all" "$GRANT"
log "all users admitted through the sidecar (JWT: $USERS, API key: $N_USERS)"
redis_state "$TMP/state/users"

# The refusal run's user: the free plan (100 calls a month), used up before the run.
if phase refusal; then
    make_user refusal 0 || die "creating the refusal user failed"
    printf 'X-API-Key: %s\n' "$(jq -r .key "$TMP/users/refusal.key.json")" >"$TMP/creds-refusal"
    check_creds "$TMP/creds-refusal" 1
    log "refusal user: using up its quota"
    for _ in $(seq 1 200); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -X POST \
            -H "$(cat "$TMP/creds-refusal")" "http://127.0.0.1:$SIDECAR_PORT/l3/p-0")
        [[ $code == 402 ]] && break
    done
    # 402 quota_exceeded (429 would be a rate limit, which this run is not about).
    [[ $code == 402 ]] || die "the refusal user's quota was not used up (last status $code)"
fi

# --- measuring --------------------------------------------------------------------------------

CLK_TCK=$(getconf CLK_TCK)

# ticks PID...: user+system CPU ticks of these processes (all their threads).
ticks() {
    local pid total=0 stat
    for pid in "$@"; do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        stat=${stat##*) }
        # Fields after the command: state is 3rd overall, utime 14th, stime 15th.
        read -r -a f <<<"$stat"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# pg_pids: the PostgreSQL processes working for this run (see snapshot).
pg_pids() {
    psql -tA "$DB_URL" -c "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()
        AND (datname = current_database() OR backend_type <> 'client backend')" 2>/dev/null || true
}

# snapshot FILE: everything a run's deltas are computed from.
snapshot() {
    local out=$1
    redis-cli -u "$REDIS_URL" info commandstats >"$out.redis"
    {
        echo "clk_tck $CLK_TCK"
        echo "sidecar $(ticks "$sidecar_PID")"
        echo "app $(ticks "$app_PID")"
        # shellcheck disable=SC2046 # pids
        echo "nginx $(ticks "$nginx_PID" $(pgrep -P "$nginx_PID"))"
        if [[ -n $redis_PID ]]; then echo "redis $(ticks "$redis_PID")"; fi
        echo "control_plane $(ticks "$cp_PID")"
        # PostgreSQL: this run's database's backends and the server's own processes (WAL writer,
        # checkpointer, ...), per pid, so that a backend that starts or ends between two
        # snapshots does not turn the difference negative (other databases' backends come and go).
        echo "postgres_pids $(for pid in $(pg_pids); do printf '%s:%s ' "$pid" "$(ticks "$pid")"; done)"
        # process time (user, nice, system), all time, interrupts (irq + softirq), steal
        echo "machine $(awk '/^cpu / { print $2 + $3 + $4, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $7 + $8, $9 }' /proc/stat)"
        echo "sidecar_ctx $(cat /proc/"$sidecar_PID"/task/*/status 2>/dev/null |
            awk '/ctxt_switches/ { n += $2 } END { print n + 0 }')"
        echo "wall_ns $(date +%s%N)"
    } >"$out.proc"
    curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$out.metrics" || true
}

# sidecar_idle: until the sidecar has no request in flight (wrk closes its connections with
# requests under way; each still finishes its phases, decide included), at most 3 s.
sidecar_idle() {
    local _
    for _ in $(seq 1 30); do
        curl -s --max-time 2 "http://127.0.0.1:$ADMIN_PORT/metrics" |
            awk '$1 == "tollgate_sidecar_in_flight_requests" { found = 1; exit ($2 != 0) } END { if (!found) exit 0 }' &&
            return 0
        sleep 0.1
    done
}

# cpu_of_children FILE: CPU seconds of this shell's reaped children so far, from `times` output
# (its second line). `times` must run in this shell itself: a subshell's children start at zero.
cpu_of_children() {
    tail -n 1 "$1" | awk '{
        split($1, u, "m"); split($2, s, "m");
        print u[1] * 60 + substr(u[2], 1, length(u[2]) - 1) + s[1] * 60 + substr(s[2], 1, length(s[2]) - 1) }'
}

# admitted_so_far: the sidecar's admitted-request counter, all routes.
admitted_so_far() {
    curl -s --max-time 2 "http://127.0.0.1:$ADMIN_PORT/metrics" |
        awk '/^tollgate_sidecar_requests_total\{/ && /decision="allowed"/ { n += $NF } END { printf "%d\n", n }'
}

pause_cp() {
    kill -STOP "$cp_PID"
    CP_STOPPED=1
}
resume_cp() {
    if ((CP_STOPPED)); then
        kill -CONT "$cp_PID"
        CP_STOPPED=0
    fi
}

# run_case NAME MODE URL CREDS [CONNECTIONS]: warm up, then one measured wrk run, summarised into
# results.jsonl. A NAME ending in _cp_paused, and the refusal run, run with the control plane
# stopped (SIGSTOP): the sidecar needs nothing from it once the JWKS and the users' limits are
# loaded, and without the usage drain the sidecar is the only client of Redis, so commandstats
# count exactly what it sends.
run_case() {
    local name=$1 mode=$2 url=$3 creds=$4 conns=${5:-$CONNS} attempt best="" noise best_noise=""
    for attempt in 1 2 3; do
        measure_case "$name" "$mode" "$url" "$creds" "$attempt" "$conns"
        noise=$(jq -r .other_cores "$TMP/case.json")
        if [[ -z $best ]] || awk -v a="$noise" -v b="$best_noise" 'BEGIN { exit !(a < b) }'; then
            best=$(cat "$TMP/case.json")
            best_noise=$noise
        fi
        awk -v n="$noise" -v t="$NOISE_LIMIT" 'BEGIN { exit !(n <= t) }' && break
        log "$name/$mode: $noise cores were busy with processes not of this benchmark; measuring again"
    done
    jq -c --argjson attempts "$attempt" '. + {attempts: $attempts}' <<<"$best" >>"$TMP/results.jsonl"
    tail -n 1 "$TMP/results.jsonl" | jq -r '"        \(.rps | floor) req/s, p50 \(.p50_ms) ms, p99 \(.p99_ms) ms, non-2xx \(.non_2xx), evalsha/admitted \(.evalsha_per_admitted), not ours \(.other_cores) cores"' >&2
}

# measure_case NAME MODE URL CREDS ATTEMPT CONNECTIONS: one warm-up and one measured run →
# $TMP/case.json.
measure_case() {
    local name=$1 mode=$2 url=$3 creds=$4 attempt=$5 conns=$6 pace=0 dir sampler note=""
    if [[ $mode == paced ]]; then
        pace=$PACE_MS
        note=" (random pauses between requests, mean ${pace} ms per connection)"
    fi
    dir="$TMP/runs/$name-$mode-c$conns-$attempt"
    mkdir -p "$dir"
    start_app
    if [[ $name == *_cp_paused || $name == refusal ]]; then pause_cp; fi
    log "$name/$mode: warm-up ${WARMUP}s"
    BENCH_CREDS=$creds BENCH_PACE_MS=$pace wrk -t"$THREADS" -c"$conns" -d"${WARMUP}s" \
        -s "$BENCH/wrk.lua" "$url" >"$dir/warmup.txt" 2>&1
    if [[ $name == api_key && $mode == max && $attempt == 1 && ! -e $TMP/runs/monitor ]]; then
        mkdir -p "$TMP/runs/monitor"
        monitor_sample "$TMP/runs/monitor" "$url" "$creds"
    fi
    sidecar_idle
    # The sidecar's resident set, twice a second, while wrk runs.
    (
        while :; do
            ps -o rss= -p "$sidecar_PID" 2>/dev/null | tr -d ' '
            sleep 0.5
        done
    ) >"$dir/rss.txt" &
    sampler=$!
    snapshot "$dir/before"
    times >"$dir/times.before"
    log "$name/$mode: measuring ${DURATION}s at $conns connections$note"
    BENCH_CREDS=$creds BENCH_PACE_MS=$pace wrk -t"$THREADS" -c"$conns" -d"${DURATION}s" --latency \
        -s "$BENCH/wrk.lua" "$url" >"$dir/wrk.txt" 2>&1
    times >"$dir/times.after"
    sidecar_idle
    snapshot "$dir/after"
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    echo "wrk_cpu_s $(awk -v a="$(cpu_of_children "$dir/times.after")" \
        -v b="$(cpu_of_children "$dir/times.before")" 'BEGIN { print a - b }')" >>"$dir/after.proc"
    resume_cp
    python3 "$BENCH/report.py" case --name "$name" --mode "$mode" --pace "$pace" --dir "$dir" \
        --connections "$conns" --lua "$REPO/lua" >"$TMP/case.json"
}

# monitor_sample DIR URL CREDS: five seconds of MONITOR under load (one drain pass runs every 5 s),
# each command attributed to the process whose connection sent it (or to a Lua script), against
# the sidecar's admitted requests.
monitor_sample() {
    local dir=$1 url=$2 creds=$3 wrk_pid
    BENCH_CREDS=$creds BENCH_PACE_MS=0 wrk -t"$THREADS" -c"$CONNS" -d8s -s "$BENCH/wrk.lua" "$url" \
        >"$dir/monitor-wrk.txt" 2>&1 &
    wrk_pid=$!
    sleep 1
    curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$dir/monitor-before.metrics"
    python3 "$BENCH/report.py" monitor --url "$REDIS_URL" --seconds 5 --out "$dir/monitor.txt"
    curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$dir/monitor-after.metrics"
    ss -tnpH state established >"$dir/monitor-ss.txt" 2>/dev/null || true
    wait "$wrk_pid" || true
}

: >"$TMP/results.jsonl"
log "phases:$PHASES; runs ${DURATION}s after ${WARMUP}s of warm-up, $CONNS connections, $THREADS wrk threads"
START_NS=$(date +%s%N)

APP_URL="http://127.0.0.1:$APP_PORT"
NGINX_URL="http://127.0.0.1:$NGINX_PORT"
SIDECAR_URL="http://127.0.0.1:$SIDECAR_PORT"

if phase runs; then
    for mode in max paced; do
        run_case app "$mode" "$APP_URL" "$TMP/creds-app"
        run_case nginx "$mode" "$NGINX_URL" "$TMP/creds-app"
        run_case jwt "$mode" "$SIDECAR_URL" "$TMP/creds-jwt"
        run_case api_key "$mode" "$SIDECAR_URL" "$TMP/creds-key"
        run_case jwt_cp_paused "$mode" "$SIDECAR_URL" "$TMP/creds-jwt"
        run_case api_key_cp_paused "$mode" "$SIDECAR_URL" "$TMP/creds-key"
    done
fi

if phase sweep; then
    for c in $SWEEP; do
        for path in app nginx jwt api_key; do
            # The runs phase measured these at $CONNS connections already.
            if phase runs && ((c == CONNS)); then continue; fi
            case $path in
            app) url=$APP_URL creds="$TMP/creds-app" ;;
            nginx) url=$NGINX_URL creds="$TMP/creds-app" ;;
            jwt) url=$SIDECAR_URL creds="$TMP/creds-jwt" ;;
            api_key) url=$SIDECAR_URL creds="$TMP/creds-key" ;;
            esac
            run_case "$path" max "$url" "$creds" "$c"
        done
    done
fi

if phase refusal; then
    run_case refusal max "$SIDECAR_URL" "$TMP/creds-refusal"
fi

if phase peers; then
    # The control plane paused and the sidecar idle: the harness is Redis's only client.
    log "peers: Tollgate's decide and Limitador on this Redis (concurrency $SWEEP, ${BENCH_PEER_SECONDS:-10}s each)"
    pause_cp
    timeout -k 5 "$MAX_SECONDS" "$PEERS_BIN" --redis "$REDIS_URL" \
        --users "${BENCH_PEER_USERS:-1000}" --seconds "${BENCH_PEER_SECONDS:-10}" \
        --concurrency "$SWEEP" --requests "${BENCH_PEER_REQUESTS:-1000}" \
        --remaining "${BENCH_PEER_REMAINING:-100}" --rounds "${BENCH_PEER_ROUNDS:-5}" \
        --systems "${BENCH_PEER_SYSTEMS:-tollgate,limitador}" --clk-tck "$CLK_TCK" \
        >"$TMP/peers.jsonl" 2>"$TMP/peers.log" || die "tollgate-peers failed: $(tail -n 5 "$TMP/peers.log")"
    resume_cp
fi

# The sidecar's CPU profile: a flat cpu-clock profile (perf needs no hardware counters for that)
# of one more JWT run at saturation, not counted above.
PROFILE=""
if { phase runs || phase profile; } && [[ "${BENCH_PERF:-1}" == 1 ]] && command -v perf >/dev/null 2>&1; then
    dir="$TMP/runs/profile"
    mkdir -p "$dir"
    log "profile: perf record of the sidecar during ${DURATION}s of jwt/max"
    BENCH_CREDS="$TMP/creds-jwt" wrk -t"$THREADS" -c"$CONNS" -d"$((DURATION + 2))s" \
        -s "$BENCH/wrk.lua" "$SIDECAR_URL" >"$dir/wrk.txt" 2>&1 &
    wrk_pid=$!
    sleep 1
    # BENCH_PERF_CALLGRAPH=1: with call chains (DWARF unwinding), to see who calls a hot symbol.
    graph=() report=(--no-children --sort sym --percent-limit 0)
    if [[ "${BENCH_PERF_CALLGRAPH:-0}" == 1 ]]; then
        graph=(--call-graph dwarf,32768) report=(--children --sort sym --percent-limit 0.5)
    fi
    if timeout -k 5 $((DURATION + 30)) perf record -q -F 499 -e cpu-clock "${graph[@]}" \
        -p "$sidecar_PID" -o "$dir/perf.data" -- sleep "$DURATION" >"$dir/perf-record.log" 2>&1; then
        perf report -i "$dir/perf.data" --stdio "${report[@]}" \
            >"$dir/perf.txt" 2>/dev/null && PROFILE="$dir/perf.txt"
    fi
    wait "$wrk_pid" || true
fi

# The scale run: state before, right after, after the settle window, after the drain caught up.
if phase scale; then
    dir="$TMP/scale"
    mkdir -p "$dir"
    log "scale: waiting until no usage bucket or settle marker is left (the drain closes a minute ${CLOSE_GRACE_S}s after its end)"
    wait_quiet 240
    # The control plane's and PostgreSQL's CPU while nothing happens, for scale.
    snapshot "$dir/idle-before"
    sleep 10
    snapshot "$dir/idle-after"
    redis_state "$dir/before"
    pg_state "$dir/before"
    snapshot "$dir/load-before"
    date +%s%3N >"$dir/start_ms"
    log "scale: $SCALE_REQUESTS requests from $SCALE_USERS users (API keys) at $CONNS connections"
    head -n "$SCALE_USERS" "$TMP/creds-key-all" >"$TMP/creds-scale"
    times >"$dir/times.before"
    # wrk stops on SIGINT (and still reports); sent once the sidecar has admitted enough.
    BENCH_CREDS="$TMP/creds-scale" wrk -t"$THREADS" -c"$CONNS" -d"$((MAX_SECONDS / 2))s" --latency \
        -s "$BENCH/wrk.lua" "$SIDECAR_URL" >"$dir/wrk.txt" 2>&1 &
    wrk_pid=$!
    allowed0=$(admitted_so_far)
    while kill -0 "$wrk_pid" 2>/dev/null; do
        if (($(admitted_so_far) - allowed0 >= SCALE_REQUESTS)); then
            kill -INT "$wrk_pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    wait "$wrk_pid" || true
    times >"$dir/times.after"
    sidecar_idle
    snapshot "$dir/load-after"
    redis_state "$dir/right-after"
    log "scale: waiting out the settle window (${SETTLE_S}s)"
    sleep $((SETTLE_S + 1))
    redis_state "$dir/settled"
    log "scale: waiting for the drain to catch up"
    wait_quiet 240
    snapshot "$dir/drained"
    redis_state "$dir/drained"
    pg_state "$dir/drained"
    psql -tA "$DB_URL" -c "SELECT coalesce(sum(calls), 0) FROM usage_minutes
        WHERE minute >= date_trunc('minute', to_timestamp($(cat "$dir/start_ms") / 1000.0))" \
        >"$dir/ledger_calls"
    echo "wrk_cpu_s $(awk -v a="$(cpu_of_children "$dir/times.after")" \
        -v b="$(cpu_of_children "$dir/times.before")" 'BEGIN { print a - b }')" >>"$dir/load-after.proc"
    python3 "$BENCH/report.py" scale --dir "$dir" --users "$SCALE_USERS" \
        --users-state "$TMP/state" >"$TMP/scale.json" || die "report.py scale failed"
    jq -r '"        admitted \(.admitted), redis growth \(.growth_beyond_users_mb) MB beyond the users, pg rows \(.pg_rows_written)"' \
        "$TMP/scale.json" >&2
fi

# --- report -----------------------------------------------------------------------------------

RSS_IDLE_KB=$(ps -o rss= -p "$sidecar_PID" | tr -d ' ')
META=("duration=$DURATION" "warmup=$WARMUP" "connections=$CONNS" "threads=$THREADS" \
    "users=$USERS" "pace_ms=$PACE_MS" "grant=$GRANT" "rss_after_kb=$RSS_IDLE_KB" \
    "phases=$(echo $PHASES)" "sweep=$SWEEP" "settle_s=$SETTLE_S" "close_grace_s=$CLOSE_GRACE_S" \
    "scale_users=$SCALE_USERS" "scale_requests=$SCALE_REQUESTS" \
    "nginx=$(nginx -v 2>&1 | sed 's/.*nginx\///')" "wrk=$(wrk -v 2>&1 | head -n 1 | awk '{ print $2 }')" \
    "redis=$(redis-cli -u "$REDIS_URL" info server | tr -d '\r' | awk -F: '$1 == "redis_version" { print $2 }')" \
    "redis_private=$([[ -n "${BENCH_REDIS_URL:-}" ]] && echo no || echo yes)" "cp_profile=$CP_PROFILE" "noise_limit=$NOISE_LIMIT" \
    "postgres=$(psql -tA "$PG_ADMIN_URL" -c 'show server_version' 2>/dev/null | awk '{ print $1 }')" \
    "rustc=$(rustc --version | awk '{ print $2 }')" \
    "elapsed_s=$((($(date +%s%N) - START_NS) / 1000000000))" \
    "commit=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null)$(cd "$REPO" && git diff --quiet HEAD 2>/dev/null || echo '+changes')"
)
# Kept with the runs, so that the report can be written again from them (BENCH_KEEP=1).
printf '%s\n' "${META[@]}" >"$TMP/meta.txt"
python3 "$BENCH/report.py" write --results "$TMP/results.jsonl" --out "$OUT" --plots "$PLOTS" \
    --runs "$TMP/runs" --profile "$PROFILE" --peers "$TMP/peers.jsonl" --scale "$TMP/scale.json" \
    --meta "${META[@]}"
log "wrote $OUT (plots in $PLOTS)"
