#!/usr/bin/env bash
# tests/e2e/60-checkout-browser.sh — a person buying a plan through the checkout page, in headless
# Chromium at a desktop and a phone width, with screenshots under target/e2e-screenshots/
# (issue 6). Chromium comes from Debian's packages and playwright-core from npm (no browser
# download); both are installed when missing.
set -euo pipefail
# shellcheck source=tests/e2e/lib-stack.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-stack.sh"

ensure_tools
[[ -x "$(cargo_bin_dir "${TOLLGATE_PROFILE:-dev}")/tollgate-paysim" ]] || die "tollgate-paysim is not built"
e2e_browser
SHOTS="$REPO/target/e2e-screenshots"
mkdir -p "$SHOTS"
e2e_up
NODE_PATH="$NODE_DIR/node_modules" node "$REPO/tests/e2e/checkout_browser.mjs" "$CHROMIUM" "$CP" "$PAYSIM" "$SHOTS"
