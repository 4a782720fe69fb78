#!/usr/bin/env bash
# tests/e2e/20-identity.sh — the control plane's accounts, tokens and API keys, checked from the
# outside with independent implementations (issue 3): PyJWT verifies and forges access tokens
# against the published JWKS, argon2-cffi checks the stored password hashes, and every log file
# and Redis value of the run is searched for secrets. The checks are in identity_check.py.
#
# Env: REPO (default: this checkout), DATABASE_URL / REDIS_URL (the servers to use; a fresh
# database tollgate_e2e_<random> is created on that PostgreSQL and dropped at the end, and the
# control plane writes under a Redis key prefix of its own, whose keys are deleted at the end).
set -euo pipefail

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-e2e-identity.XXXXXX")
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
# The control plane (and a sidecar, if the stack starts one) keep their keys under this prefix,
# so this run neither sees nor disturbs anyone else's keys on a shared Redis.
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
CP="http://127.0.0.1:$TOLLGATE_CP_PORT"

USED_REDIS_URL=""
REDIS_PRIVATE=0
PG_PRIVATE=0

cleanup() {
    local rc=$?
    if [[ $rc -ne 0 && -f "$TOLLGATE_STACK_DIR/logs/control-plane.log" ]]; then
        echo "---- last 40 lines of the control plane's log ----" >&2
        tail -n 40 "$TOLLGATE_STACK_DIR/logs/control-plane.log" >&2 || true
        echo "----" >&2
    fi
    # Idempotent; stops exactly what `up` started (a private PostgreSQL/Redis goes with --purge).
    "$STACK" down --purge >/dev/null 2>&1 || true
    # The control plane is stopped now, so no key appears after this.
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

# --- the Python checker's environment -------------------------------------------------------

venv_ready() {
    [[ -x "$VENV/bin/python" ]] &&
        "$VENV/bin/python" -c 'import jwt, argon2, requests, cryptography' >/dev/null 2>&1
}

ensure_venv() {
    mkdir -p "$REPO/target"
    # One creator at a time (two e2e runs may share this checkout's target folder).
    exec 8>"$REPO/target/e2e-venv.lock"
    flock -w 600 8 || die "another run holds $REPO/target/e2e-venv.lock"
    if ! venv_ready; then
        if [[ ! -x "$VENV/bin/python" ]]; then
            rm -rf "$VENV"
            if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
                # Debian ships venv (with ensurepip) separately.
                rm -rf "$VENV"
                apt_install python3-venv
                python3 -m venv "$VENV" || die "python3 -m venv failed"
            fi
        fi
        info "installing the checker's Python packages into $VENV"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
            'pyjwt[crypto]' argon2-cffi requests >&2 || die "pip install failed"
        venv_ready || die "the Python packages are not importable from $VENV"
    fi
    exec 8>&-
}

ensure_tools
ensure_venv

# --- the stack ------------------------------------------------------------------------------

echo "# scripts/stack up (stack dir $TOLLGATE_STACK_DIR, database $DB_NAME, redis prefix $TOLLGATE_REDIS_PREFIX)"
"$STACK" up >/dev/null

# What `up` actually used (it may have started a private PostgreSQL/Redis).
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

"$VENV/bin/python" -u "$REPO/tests/e2e/identity_check.py" \
    "$CP" "$USED_DATABASE_URL" "$TOLLGATE_STACK_DIR/logs" "$USED_REDIS_URL" "$TOLLGATE_REDIS_PREFIX"
