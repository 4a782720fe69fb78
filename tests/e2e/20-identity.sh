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
# shellcheck source=tests/e2e/lib-stack.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-stack.sh"
e2e_stack_logs 40 control-plane

ensure_tools
# The Python checker's environment.
e2e_venv --check 'import jwt, argon2, requests, cryptography' 'pyjwt[crypto]' argon2-cffi requests
e2e_up

"$VENV/bin/python" -u "$REPO/tests/e2e/identity_check.py" \
    "$CP" "$USED_DATABASE_URL" "$TOLLGATE_STACK_DIR/logs" "$USED_REDIS_URL" "$TOLLGATE_REDIS_PREFIX"
