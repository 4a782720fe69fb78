#!/usr/bin/env bash
# tests/e2e/75-metrics.sh — the metrics that k8s/monitoring uses exist in the LIVE programs
# (issue 7): starts a stack of its own (like 10-stack.sh: temp stack dir, free ports, database
# tollgate_e2e_<random> dropped at the end, Redis key prefix e2e<random> whose keys are deleted
# at the end), drives traffic through the sidecar and the control plane, scrapes both /metrics,
# runs `promtool check metrics` on each and requires every metric name of the Grafana dashboard
# and the PrometheusRule to be in the scrapes. The checks are in metrics_check.py (names shared
# with k8s_check.py through monitoring_names.py).
#
#   python     $REPO/target/e2e-venv (shared with 20-identity.sh and 70-k8s.sh) with PyYAML;
#   promtool   from PATH, else unpacked from Debian's `prometheus` package into target/tools
#              (ensure_promtool, scripts/lib.sh): nothing installed, no Prometheus server.
#
# Env: REPO (default: this checkout), DATABASE_URL / REDIS_URL (the servers to use),
# TOLLGATE_SKIP_BUILD=1 to use the binaries already built. Arguments go to metrics_check.py (e.g.
# `--dashboard FILE` or `--rules FILE` to check a copy). Last line: `metrics: N passed, M failed`.
set -euo pipefail

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-e2e-metrics.XXXXXX")
# Traversable, so that a private PostgreSQL (run as the postgres user) can live inside it and
# go away with it.
chmod 755 "$TMP"
export TOLLGATE_STACK_DIR="$TMP/stack"
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"

STACK="$REPO/scripts/stack"
VENV="$REPO/target/e2e-venv"
RAND=$(printf '%04x%04x' "$RANDOM" "$RANDOM")
DB_NAME="tollgate_e2e_$RAND"
BASE_DATABASE_URL=${DATABASE_URL:-$DEFAULT_DATABASE_URL}
export DATABASE_URL
DATABASE_URL=$(url_with_db "$BASE_DATABASE_URL" "$DB_NAME")
# The control plane and the sidecar keep their keys under this prefix (and the control plane
# reconciles, and prunes, its prefix at start), so this run meets no one else's keys.
export TOLLGATE_REDIS_PREFIX="e2e$RAND"

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

USED_REDIS_URL=""
REDIS_PRIVATE=0
PG_PRIVATE=0

cleanup() {
    local rc=$?
    local log
    if [[ $rc -ne 0 ]]; then
        for log in control-plane sidecar; do
            if [[ -f "$TOLLGATE_STACK_DIR/logs/$log.log" ]]; then
                echo "---- last 30 lines of the $log's log ----" >&2
                tail -n 30 "$TOLLGATE_STACK_DIR/logs/$log.log" >&2 || true
            fi
        done
    fi
    # Idempotent; stops exactly what `up` started (a private PostgreSQL/Redis goes with --purge).
    "$STACK" down --purge >/dev/null 2>&1 || true
    # Everything that writes under the prefix is stopped now, so no key appears after this.
    if [[ -n "$USED_REDIS_URL" && "$REDIS_PRIVATE" != 1 ]] && redis_reachable "$USED_REDIS_URL"; then
        delete_prefixed_keys "$USED_REDIS_URL" "$TOLLGATE_REDIS_PREFIX"
    fi
    # Drop the database only on a server we did not start, and only the one this test named.
    if [[ "$PG_PRIVATE" != 1 ]] && pg_reachable "$BASE_DATABASE_URL"; then
        psql "$(url_with_db "$BASE_DATABASE_URL" postgres)" -X -q -v ON_ERROR_STOP=1 \
            -c "DROP DATABASE IF EXISTS $DB_NAME WITH (FORCE)" >/dev/null 2>&1 ||
            echo "warning: could not drop database $DB_NAME" >&2
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- tools ----------------------------------------------------------------------------------

venv_ready() {
    [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import yaml' >/dev/null 2>&1
}

# One creator or installer at a time (e2e runs may share this checkout's target folder).
make_venv() {
    venv_ready && return 0
    if [[ ! -x "$VENV/bin/python" ]]; then
        rm -rf "$VENV"
        if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
            # Debian ships venv (with ensurepip) separately.
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV" || die "python3 -m venv failed"
        fi
    fi
    info "installing PyYAML into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check pyyaml >&2 || die "pip install pyyaml failed"
    venv_ready || die "PyYAML is not importable from $VENV"
}

ensure_tools
mkdir -p "$REPO/target"
(
    flock -w 600 8 || die "another run holds $REPO/target/e2e-venv.lock"
    make_venv
) 8>"$REPO/target/e2e-venv.lock"
ensure_promtool
info "metrics: promtool $("$PROMTOOL" --version 2>&1 | head -n 1 | awk '{print $3}')"

# --- the stack ------------------------------------------------------------------------------

echo "# scripts/stack up (stack dir $TOLLGATE_STACK_DIR, database $DB_NAME, redis prefix $TOLLGATE_REDIS_PREFIX)"
"$STACK" up >/dev/null

# What `up` actually used (it may have started a private PostgreSQL/Redis), and which parts.
state=$(
    # shellcheck source=/dev/null
    source "$TOLLGATE_STACK_DIR/stack.env"
    printf '%s\n' "$PG_PRIVATE" "$REDIS_URL" "$REDIS_PRIVATE" "$PARTS"
)
{
    read -r PG_PRIVATE
    read -r USED_REDIS_URL
    read -r REDIS_PRIVATE
    read -r PARTS
} <<<"$state"
[[ " $PARTS " == *" sidecar "* ]] ||
    die "the stack started no sidecar (parts: $PARTS); build it: cargo build -p tollgate-sidecar"

"$VENV/bin/python" -u "$REPO/tests/e2e/metrics_check.py" \
    --repo "$REPO" \
    --promtool "$PROMTOOL" \
    --cp "http://127.0.0.1:$TOLLGATE_CP_PORT" \
    --proxy "http://127.0.0.1:$TOLLGATE_SIDECAR_PORT" \
    --admin "http://127.0.0.1:$TOLLGATE_SIDECAR_ADMIN_PORT" \
    "$@"
