#!/usr/bin/env bash
# tests/e2e/85-api-doc.sh — docs/api.md as built: every `$` example of its console blocks runs, in
# order, against a fresh stack, and must answer the status (and show the headers) written under
# it (issue 15). That every route of /v1/openapi.json is in docs/api.md is checked by
# control-plane/tests/ops.rs, without a stack.
set -euo pipefail
# shellcheck source=tests/e2e/lib-stack.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-stack.sh"

ensure_tools
[[ -x "$(cargo_bin_dir "${TOLLGATE_PROFILE:-dev}")/tollgate-paysim" ]] || die "tollgate-paysim is not built"
command -v jq >/dev/null 2>&1 || apt_install jq
command -v python3 >/dev/null 2>&1 || apt_install python3
e2e_up
# The examples' variables, pointed at this stack; `admin create` finds the binary on PATH and
# the stack's database in DATABASE_URL.
PATH="$(cargo_bin_dir "${TOLLGATE_PROFILE:-dev}"):$PATH" \
    DATABASE_URL="$USED_DATABASE_URL" \
    CP="$CP" SIDECAR="$SIDECAR" PAYSIM="$PAYSIM" \
    SIDECAR_ADMIN="http://127.0.0.1:$TOLLGATE_SIDECAR_ADMIN_PORT" \
    python3 "$REPO/tests/e2e/api_doc_check.py" "$REPO/docs/api.md"
