#!/usr/bin/env bash
# tests/e2e/50-purchase.sh — the whole purchase through the local stack, for all three channels
# (issue 6): register, order `pro`, pay at the simulator as the buyer would, the order turns
# `paid`, /v1/quota shows `pro`, and the sidecar admits calls the free plan would refuse.
set -euo pipefail
# shellcheck source=tests/e2e/lib-stack.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-stack.sh"

ensure_tools
[[ -x "$(cargo_bin_dir "${TOLLGATE_PROFILE:-dev}")/tollgate-paysim" ]] || die "tollgate-paysim is not built"
e2e_venv requests
e2e_up
"$VENV/bin/python" -u "$REPO/tests/e2e/purchase_check.py" "$CP" "$SIDECAR" "$PAYSIM"
