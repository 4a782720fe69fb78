# tests/e2e/lib-stack.sh — sourced by end-to-end tests that need a whole stack of their own:
# a temporary state folder, five free ports, a fresh database tollgate_e2e_<hex> (dropped at the
# end) and a Redis key prefix e2e<hex> (its keys deleted at the end), so a test never meets a
# developer's stack or another test. `e2e_up` starts it; the EXIT trap takes everything down.
# shellcheck shell=bash

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)}
E2E_TMP=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-e2e.XXXXXX")
# Traversable, so that a private PostgreSQL (run as the postgres user) can live inside it.
chmod 755 "$E2E_TMP"
export TOLLGATE_STACK_DIR="$E2E_TMP/stack"
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"

STACK="$REPO/scripts/stack"
VENV="$REPO/target/e2e-venv"
E2E_RAND=$(printf '%04x%04x' "$RANDOM" "$RANDOM")
E2E_DB="tollgate_e2e_$E2E_RAND"
E2E_BASE_DATABASE_URL=${DATABASE_URL:-$DEFAULT_DATABASE_URL}
export DATABASE_URL
DATABASE_URL=$(url_with_db "$E2E_BASE_DATABASE_URL" "$E2E_DB")
export TOLLGATE_REDIS_PREFIX="e2e$E2E_RAND"

e2e_used=" "
for var in TOLLGATE_CP_PORT TOLLGATE_APP_PORT TOLLGATE_SIDECAR_PORT TOLLGATE_SIDECAR_ADMIN_PORT TOLLGATE_PAYSIM_PORT; do
    port=$(free_port)
    while [[ "$e2e_used" == *" $port "* ]]; do port=$(free_port); done
    e2e_used+="$port "
    export "$var=$port"
done
CP="http://127.0.0.1:$TOLLGATE_CP_PORT"
SIDECAR="http://127.0.0.1:$TOLLGATE_SIDECAR_PORT"
PAYSIM="http://127.0.0.1:$TOLLGATE_PAYSIM_PORT"
USED_DATABASE_URL=""
USED_REDIS_URL=""
PG_PRIVATE=0
REDIS_PRIVATE=0

e2e_cleanup() {
    local rc=$?
    if [[ $rc -ne 0 && -d "$TOLLGATE_STACK_DIR/logs" ]]; then
        for log in "$TOLLGATE_STACK_DIR"/logs/*.log; do
            echo "---- last 20 lines of $(basename "$log") ----" >&2
            tail -n 20 "$log" >&2 || true
        done
    fi
    "$STACK" down --purge >/dev/null 2>&1 || true
    if [[ -n "$USED_REDIS_URL" && "$REDIS_PRIVATE" != 1 ]] && redis_reachable "$USED_REDIS_URL"; then
        delete_prefixed_keys "$USED_REDIS_URL" "$TOLLGATE_REDIS_PREFIX"
    fi
    if [[ "$PG_PRIVATE" != 1 ]] && pg_reachable "$E2E_BASE_DATABASE_URL"; then
        psql "$(url_with_db "$E2E_BASE_DATABASE_URL" postgres)" -X -q \
            -c "DROP DATABASE IF EXISTS $E2E_DB WITH (FORCE)" >/dev/null 2>&1 || true
    fi
    rm -rf "$E2E_TMP"
    exit "$rc"
}
trap e2e_cleanup EXIT
trap 'exit 130' INT TERM

# e2e_up: `scripts/stack up`, then what it actually used (it may start private servers).
e2e_up() {
    "$STACK" up >/dev/null
    local state
    state=$(
        # shellcheck source=/dev/null
        source "$TOLLGATE_STACK_DIR/stack.env"
        printf '%s\n' "$DATABASE_URL" "$PG_PRIVATE" "$REDIS_URL" "$REDIS_PRIVATE"
    )
    {
        read -r USED_DATABASE_URL
        read -r PG_PRIVATE
        read -r USED_REDIS_URL
        read -r REDIS_PRIVATE
    } <<<"$state"
}

# e2e_venv PACKAGE...: the shared venv under target/, with these packages importable.
e2e_venv() {
    mkdir -p "$REPO/target"
    exec 8>"$REPO/target/e2e-venv.lock"
    flock -w 600 8 || die "another run holds $REPO/target/e2e-venv.lock"
    if [[ ! -x "$VENV/bin/python" ]]; then
        rm -rf "$VENV"
        python3 -m venv "$VENV" >/dev/null 2>&1 || {
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV" || die "python3 -m venv failed"
        }
    fi
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >&2 || die "pip install $* failed"
    exec 8>&-
}
