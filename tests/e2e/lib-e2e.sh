# tests/e2e/lib-e2e.sh — sourced by every end-to-end test script (lib-stack.sh builds on it):
# scripts/lib.sh, a temporary folder E2E_TMP (removed at the end), the shared Python venv, and an
# EXIT trap that, when the script fails, shows the tail of the logs it was given (e2e_fail_logs),
# then runs the clean-ups registered with e2e_at_exit, last registered first.
# shellcheck shell=bash

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)}
E2E_TMP=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-e2e-$(basename "$0" .sh).XXXXXX")
# Traversable, so that a private PostgreSQL (run as the postgres user) can live inside it.
chmod 755 "$E2E_TMP"
# Also for the scripts that start no stack: nothing they run can meet a developer's .stack.
export TOLLGATE_STACK_DIR="$E2E_TMP/stack"
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"

VENV="$REPO/target/e2e-venv"
E2E_FAIL_LINES=20
E2E_FAIL_LOGS=()
E2E_AT_EXIT=()

# e2e_fail_logs LINES PATH...: when the script fails, show the last LINES lines of each PATH (a
# folder: of every *.log in it). Replaces what was set before.
e2e_fail_logs() {
    E2E_FAIL_LINES=$1
    shift
    E2E_FAIL_LOGS=("$@")
}

# e2e_at_exit FUNCTION: the EXIT trap runs FUNCTION (the last registered first); its failure
# does not change the script's exit status.
e2e_at_exit() {
    E2E_AT_EXIT=("$1" "${E2E_AT_EXIT[@]}")
}

e2e_cleanup() {
    local rc=$? path log fn
    if [[ $rc -ne 0 ]]; then
        for path in "${E2E_FAIL_LOGS[@]}"; do
            for log in "$path" "$path"/*.log; do
                [[ -f "$log" && -s "$log" ]] || continue
                echo "---- last $E2E_FAIL_LINES lines of $(basename "$log") ----" >&2
                tail -n "$E2E_FAIL_LINES" "$log" >&2 || true
            done
        done
    fi
    for fn in "${E2E_AT_EXIT[@]}"; do
        "$fn" || true
    done
    rm -rf "$E2E_TMP"
    exit "$rc"
}
trap e2e_cleanup EXIT
trap 'exit 130' INT TERM

# e2e_venv_locked COMMAND...: runs COMMAND (in a subshell) holding the venv's lock: e2e runs may
# share this checkout's target folder, and one creator or installer at a time.
e2e_venv_locked() {
    mkdir -p "$REPO/target"
    (
        flock -w 600 8 || die "another run holds $REPO/target/e2e-venv.lock"
        "$@"
    ) 8>"$REPO/target/e2e-venv.lock"
}

# e2e_venv [--check PYTHON] PACKAGE...: the shared venv $VENV under target/, with these packages
# installed. With --check, pip runs only when the Python code PYTHON (say, the imports the
# script needs) fails in the venv, and must make it pass.
e2e_venv() {
    local check=""
    if [[ "${1:-}" == --check ]]; then
        check=$2
        shift 2
    fi
    e2e_venv_locked e2e_venv_install "$check" "$@"
}

e2e_venv_ready() {
    [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "$1" >/dev/null 2>&1
}

# e2e_venv_install CHECK PACKAGE...: e2e_venv's work, under the lock.
e2e_venv_install() {
    local check=$1
    shift
    if [[ -n "$check" ]]; then
        e2e_venv_ready "$check" && return 0
        info "installing $* into $VENV"
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        command -v python3 >/dev/null 2>&1 || apt_install python3
        rm -rf "$VENV"
        python3 -m venv "$VENV" >/dev/null 2>&1 || {
            # Debian ships venv (with ensurepip) separately.
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV" || die "python3 -m venv failed"
        }
    fi
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >&2 || die "pip install $* failed"
    if [[ -n "$check" ]]; then
        e2e_venv_ready "$check" || die "after pip install $*, this fails in $VENV: $check"
    fi
}

# e2e_browser: CHROMIUM (Debian's package) and NODE_DIR (playwright-core from npm, under
# target/; no browser download), installed when missing, for the tests that drive a page.
e2e_browser() {
    CHROMIUM=$(command -v chromium || true)
    if [[ -z "$CHROMIUM" ]]; then
        apt_install chromium
        CHROMIUM=$(command -v chromium) || die "chromium did not install"
    fi
    command -v node >/dev/null 2>&1 || apt_install nodejs npm
    NODE_DIR="$REPO/target/e2e-node"
    e2e_venv_locked e2e_browser_install
}

e2e_browser_install() {
    if [[ ! -d "$NODE_DIR/node_modules/playwright-core" ]]; then
        mkdir -p "$NODE_DIR"
        (cd "$NODE_DIR" && npm install --silent --no-audit --no-fund playwright-core@1 >&2) || die "npm install playwright-core failed"
    fi
}
