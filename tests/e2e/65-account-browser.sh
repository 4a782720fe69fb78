#!/usr/bin/env bash
# tests/e2e/65-account-browser.sh — the account page (/account) in headless Chromium at 1280 and
# 390 px (issue 15): sign in, the quota falls after a metered call, an API key is created, copied,
# used and revoked, orders are listed, and the calls show in the 30-day usage chart. The
# screenshots it takes are docs/images/account-desktop.png and account-phone.png (set
# TOLLGATE_SCREENSHOTS to write them elsewhere).
#
# The chart needs the calls drained into the usage aggregates, which happens once their minute
# has closed: the control plane runs with TOLLGATE_USAGE_CLOSE_GRACE=0s, and the test waits for
# the minute (about a minute; no rows are seeded).
set -euo pipefail
# shellcheck source=tests/e2e/lib-stack.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-stack.sh"

ensure_tools
[[ -x "$(cargo_bin_dir "${TOLLGATE_PROFILE:-dev}")/tollgate-paysim" ]] || die "tollgate-paysim is not built"
e2e_browser
SHOTS=${TOLLGATE_SCREENSHOTS:-$REPO/docs/images}
mkdir -p "$SHOTS"
# Inherited by the stack's control plane: a minute's usage is drained as soon as it ends.
export TOLLGATE_USAGE_CLOSE_GRACE=0s
e2e_up
NODE_PATH="$NODE_DIR/node_modules" node "$REPO/tests/e2e/account_browser.mjs" "$CHROMIUM" "$CP" "$SIDECAR" "$PAYSIM" "$SHOTS"
