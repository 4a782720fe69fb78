#!/usr/bin/env bash
# tests/e2e/75-metrics.sh — the metrics that k8s/monitoring uses exist in the LIVE programs
# (issue 7): starts a stack of its own (lib-stack.sh: temp stack dir, free ports, database
# tollgate_e2e_<random> dropped at the end, Redis key prefix e2e<random> whose keys are deleted
# at the end), drives traffic through the sidecar and the control plane, scrapes both /metrics,
# runs `promtool check metrics` on each and requires every metric name of the Grafana dashboard
# and the PrometheusRule to be in the scrapes. The checks are in metrics_check.py (names shared
# with k8s_check.py through monitoring_names.py).
#
#   python     $REPO/target/e2e-venv (shared with 20-identity.sh and 70-k8s.sh) with PyYAML;
#   promtool   from PATH, else unpacked from Debian's `prometheus` package into target/tools
#              (ensure_promtool, scripts/lib.sh): nothing installed, no Prometheus server.
#
# Env: REPO (default: this checkout), DATABASE_URL / REDIS_URL (the servers to use),
# TOLLGATE_SKIP_BUILD=1 to use the binaries already built. Arguments go to metrics_check.py (e.g.
# `--dashboard FILE` or `--rules FILE` to check a copy). Last line: `metrics: N passed, M failed`.
set -euo pipefail
# shellcheck source=tests/e2e/lib-stack.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-stack.sh"
e2e_stack_logs 30 control-plane sidecar

ensure_tools
e2e_venv --check 'import yaml' pyyaml
ensure_promtool
info "metrics: promtool $("$PROMTOOL" --version 2>&1 | head -n 1 | awk '{print $3}')"

# Usage buckets are drained once their minute has closed; no extra grace here, so the drain's
# counters move within about a minute of the traffic (the check waits for them).
export TOLLGATE_USAGE_CLOSE_GRACE=0s
e2e_up
[[ " $PARTS " == *" sidecar "* ]] ||
    die "the stack started no sidecar (parts: $PARTS); build it: cargo build -p tollgate-sidecar"

"$VENV/bin/python" -u "$REPO/tests/e2e/metrics_check.py" \
    --repo "$REPO" \
    --promtool "$PROMTOOL" \
    --cp "$CP" \
    --proxy "$SIDECAR" \
    --admin "http://127.0.0.1:$TOLLGATE_SIDECAR_ADMIN_PORT" \
    --wait 90 \
    "$@"
