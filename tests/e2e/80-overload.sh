#!/usr/bin/env bash
# tests/e2e/80-overload.sh — issue #12's fault scenarios against release or dev binaries: a stack
# of its own (lib-stack.sh: temp stack dir, free ports, database tollgate_e2e_<random> dropped at
# the end, Redis key prefix e2e<random> whose keys are deleted at the end) with short timeouts,
# then overload_check.py: 20,000 idle connections to the sidecar (the admin port answers, a new
# client is answered, the idle ones are closed within the idle timeout), request heads that
# trickle into both programs, the control plane's 413 for Content-Length 10^12 and its idle,
# slow-head and unfinished-body connections, and SIGTERM to the sidecar under keep-alive and
# upload traffic (every request sent before the signal is answered). Each prints what it
# measured; the run takes one to two minutes.
#
# Only 127.0.0.1 is loaded, and only this stack's processes; the shared PostgreSQL and Redis
# see no more than a few hundred requests. The machine's open-files limit must allow 10,000
# sockets per process (the idle connections are held by two helper processes).
#
# Env: REPO (default: this checkout), DATABASE_URL / REDIS_URL (the servers to use),
# TOLLGATE_SKIP_BUILD=1 / TOLLGATE_PROFILE=release|dev to pick the binaries.
# Last line: `overload: N passed, M failed`.
set -euo pipefail
# shellcheck source=tests/e2e/lib-stack.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-stack.sh"
e2e_stack_logs 40 control-plane sidecar

ensure_tools
nofile=$(ulimit -n)
if [[ "$nofile" != unlimited ]] && ((nofile < 10100)); then
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    nofile=$(ulimit -n)
    [[ "$nofile" == unlimited ]] || ((nofile >= 10100)) ||
        die "the open-files limit is $nofile; this test needs 10,100 per process (ulimit -n)"
fi

# Short timeouts, so each scenario takes seconds; caps that 20,000 connections exceed.
export TOLLGATE_SIDECAR_MAX_CONNECTIONS=1000 TOLLGATE_SIDECAR_IDLE_TIMEOUT=5s \
    TOLLGATE_SIDECAR_HEADER_READ_TIMEOUT=2s TOLLGATE_SIDECAR_BODY_READ_TIMEOUT=2s \
    TOLLGATE_MAX_CONNECTIONS=1000 TOLLGATE_IDLE_TIMEOUT=3s TOLLGATE_HEADER_READ_TIMEOUT=2s \
    TOLLGATE_BODY_READ_TIMEOUT=2s TOLLGATE_SHUTDOWN_GRACE=10s

e2e_up
[[ " $PARTS " == *" sidecar "* ]] ||
    die "the stack started no sidecar (parts: $PARTS); build it: cargo build -p tollgate-sidecar"
info "overload: open-files limit $nofile; sidecar pid $(cat "$TOLLGATE_STACK_DIR/pids/sidecar.pid")"

python3 -u "$REPO/tests/e2e/overload_check.py" \
    --proxy-port "$TOLLGATE_SIDECAR_PORT" \
    --admin-port "$TOLLGATE_SIDECAR_ADMIN_PORT" \
    --cp-port "$TOLLGATE_CP_PORT" \
    --sidecar-pid "$(cat "$TOLLGATE_STACK_DIR/pids/sidecar.pid")" \
    --sidecar-max-connections 1000 \
    --sidecar-idle-timeout 5 --sidecar-header-timeout 2 \
    --cp-idle-timeout 3 --cp-header-timeout 2 --cp-body-timeout 2 \
    --grace 10
