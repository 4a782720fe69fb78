# tests/e2e/lib-stack.sh — sourced by end-to-end tests that need a whole stack of their own:
# a temporary state folder, five free ports, a fresh database tollgate_e2e_<hex> (dropped at the
# end) and a Redis key prefix e2e<hex> (its keys deleted at the end), so a test never meets a
# developer's stack or another test. `e2e_up` starts it; the EXIT trap (lib-e2e.sh) takes
# everything down, after showing the stack's logs if the script failed.
# shellcheck shell=bash

# shellcheck source=tests/e2e/lib-e2e.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-e2e.sh"

STACK="$REPO/scripts/stack"
E2E_RAND=$(printf '%04x%04x' "$RANDOM" "$RANDOM")
E2E_DB="tollgate_e2e_$E2E_RAND"
E2E_BASE_DATABASE_URL=${DATABASE_URL:-$DEFAULT_DATABASE_URL}
export DATABASE_URL
DATABASE_URL=$(url_with_db "$E2E_BASE_DATABASE_URL" "$E2E_DB")
# The control plane and the sidecar keep their keys under this prefix (and the control plane
# reconciles, and prunes, its prefix at start), so this run meets no one else's keys.
export TOLLGATE_REDIS_PREFIX="e2e$E2E_RAND"

# Six distinct free ports, so this never meets a developer's stack on the default ones.
E2E_PORTS=()
for var in TOLLGATE_CP_PORT TOLLGATE_CP_INTERNAL_PORT TOLLGATE_APP_PORT TOLLGATE_SIDECAR_PORT TOLLGATE_SIDECAR_ADMIN_PORT TOLLGATE_PAYSIM_PORT; do
    port=$(free_port)
    while [[ " ${E2E_PORTS[*]} " == *" $port "* ]]; do port=$(free_port); done
    E2E_PORTS+=("$port")
    export "$var=$port"
done
unset var port
# For the scripts that source this file:
# shellcheck disable=SC2034
{
    CP="http://127.0.0.1:$TOLLGATE_CP_PORT"
    SIDECAR="http://127.0.0.1:$TOLLGATE_SIDECAR_PORT"
    PAYSIM="http://127.0.0.1:$TOLLGATE_PAYSIM_PORT"
    # What `up` actually used (set by e2e_up) and which parts it started.
    USED_DATABASE_URL=""
    USED_REDIS_URL=""
    PG_PRIVATE=0
    REDIS_PRIVATE=0
    PARTS=""
}

# e2e_stack_logs LINES [PART...]: when the script fails, show the last LINES lines of these parts'
# logs (no PART: of all of them). The default is 20 lines of all of them.
e2e_stack_logs() {
    local lines=$1 part paths=()
    shift
    for part in "$@"; do
        paths+=("$TOLLGATE_STACK_DIR/logs/$part.log")
    done
    [[ $# -gt 0 ]] || paths=("$TOLLGATE_STACK_DIR/logs")
    e2e_fail_logs "$lines" "${paths[@]}"
}
e2e_stack_logs 20

e2e_stack_down() {
    # Idempotent; stops exactly what `up` started (a private PostgreSQL/Redis goes with --purge).
    "$STACK" down --purge >/dev/null 2>&1 || true
    # Everything that writes under the prefix is stopped now, so no key appears after this. When
    # `up` failed half-way, the Redis it used is the one it was given (a private one is gone).
    local redis=${USED_REDIS_URL:-${REDIS_URL:-$DEFAULT_REDIS_URL}}
    if [[ "$REDIS_PRIVATE" != 1 ]] && redis_reachable "$redis"; then
        delete_prefixed_keys "$redis" "$TOLLGATE_REDIS_PREFIX"
    fi
    # Drop the database only on a server we did not start, and only the one this test named.
    if [[ "$PG_PRIVATE" != 1 ]] && pg_reachable "$E2E_BASE_DATABASE_URL"; then
        psql "$(url_with_db "$E2E_BASE_DATABASE_URL" postgres)" -X -q -v ON_ERROR_STOP=1 \
            -c "DROP DATABASE IF EXISTS $E2E_DB WITH (FORCE)" >/dev/null 2>&1 ||
            warn "could not drop database $E2E_DB"
    fi
}
e2e_at_exit e2e_stack_down

# e2e_up: `scripts/stack up` (its summary only with E2E_UP_VERBOSE=1), then what it actually used
# (it may start private servers) and which parts it started.
e2e_up() {
    echo "# scripts/stack up (stack dir $TOLLGATE_STACK_DIR, ports ${E2E_PORTS[*]}, database $E2E_DB, redis prefix $TOLLGATE_REDIS_PREFIX)"
    if [[ "${E2E_UP_VERBOSE:-0}" == 1 ]]; then
        "$STACK" up
    else
        "$STACK" up >/dev/null
    fi
    local state
    state=$(
        # shellcheck source=/dev/null
        source "$TOLLGATE_STACK_DIR/stack.env"
        printf '%s\n' "$DATABASE_URL" "$PG_PRIVATE" "$REDIS_URL" "$REDIS_PRIVATE" "$PARTS"
    )
    # shellcheck disable=SC2034 # for the scripts that source this file
    {
        read -r USED_DATABASE_URL
        read -r PG_PRIVATE
        read -r USED_REDIS_URL
        read -r REDIS_PRIVATE
        read -r PARTS
    } <<<"$state"
}
