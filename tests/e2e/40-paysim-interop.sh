#!/usr/bin/env bash
# tests/e2e/40-paysim-interop.sh — the payment simulator against independent implementations of
# the two protocols (issue 6): python-alipay-sdk and wechatpayv3 play the merchant, in both
# directions. They sign the requests the simulator must accept (and forged ones it must refuse),
# verify the simulator's signed answers with their own code, and verify (and, for WeChat,
# decrypt) the notifications it sends. The checks are in paysim_interop.py.
#
# Needs only the built simulator (target/<profile>/tollgate-paysim; built here with
# `cargo build -p tollgate-paysim` unless TOLLGATE_SKIP_BUILD=1), openssl and python3. No
# database, no Redis, no fixed port: fresh keys and a free port in a temporary folder.
set -euo pipefail

# shellcheck source=tests/e2e/lib-e2e.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-e2e.sh"

SIM_PID=""
stop_sim() {
    if [[ -n "$SIM_PID" ]] && kill -0 "$SIM_PID" 2>/dev/null; then
        kill "$SIM_PID" 2>/dev/null || true
        wait "$SIM_PID" 2>/dev/null || true
    fi
    SIM_PID=""
}
e2e_at_exit stop_sim
e2e_fail_logs 40 "$E2E_TMP/paysim.log"

# --- the simulator binary -------------------------------------------------------------------

PROFILE=${TOLLGATE_PROFILE:-dev}
BIN="$(cargo_bin_dir "$PROFILE")/tollgate-paysim"
if [[ ! -x "$BIN" ]]; then
    [[ "${TOLLGATE_SKIP_BUILD:-0}" == 1 ]] && die "$BIN is not built (TOLLGATE_SKIP_BUILD=1)"
    info "building: cargo build -p tollgate-paysim --profile $PROFILE"
    cargo_env
    (cd "$REPO" && cargo build -p tollgate-paysim --profile "$PROFILE" >&2) || die "cargo build failed"
    [[ -x "$BIN" ]] || die "$BIN not found after the build"
fi
command -v openssl >/dev/null 2>&1 || apt_install openssl
command -v python3 >/dev/null 2>&1 || apt_install python3
command -v curl >/dev/null 2>&1 || apt_install curl

# --- the merchant's SDKs --------------------------------------------------------------------

e2e_venv --check 'from alipay import AliPay; from wechatpayv3 import WeChatPay; import requests' \
    python-alipay-sdk wechatpayv3 requests

# --- keys and the simulator -----------------------------------------------------------------

bash "$REPO/paysim/gen-keys.sh" "$E2E_TMP/keys"

# A port found free can be taken before the simulator binds it: try a few.
BASE=""
for _ in 1 2 3; do
    port=$(free_port)
    PAYSIM_LISTEN="127.0.0.1:$port" PAYSIM_KEYS_DIR="$E2E_TMP/keys" TOLLGATE_LOG_FORMAT=text \
        "$BIN" >"$E2E_TMP/paysim.log" 2>&1 &
    SIM_PID=$!
    deadline=$((SECONDS + 20))
    while kill -0 "$SIM_PID" 2>/dev/null && [[ "$(http_code "http://127.0.0.1:$port/healthz")" != 200 ]]; do
        ((SECONDS < deadline)) || break
        sleep 0.2
    done
    if [[ "$(http_code "http://127.0.0.1:$port/healthz")" == 200 ]]; then
        BASE="http://127.0.0.1:$port"
        break
    fi
    stop_sim
done
[[ -n "$BASE" ]] || die "the simulator did not start (see its log above)"
info "# tollgate-paysim at $BASE (keys $E2E_TMP/keys)"

# python-alipay-sdk stamps `timestamp` with the local clock, which Alipay reads as Beijing time:
# give the merchant process Beijing time (a POSIX TZ string, so no tzdata is needed). Requests
# to this machine must not go through a developer's proxy.
TZ=CST-8 NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost" \
    timeout 300 "$VENV/bin/python" -u "$REPO/tests/e2e/paysim_interop.py" "$BASE" "$E2E_TMP/keys"
