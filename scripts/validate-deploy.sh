#!/usr/bin/env bash
# Validate the deployment offline, no cluster needed (`make test` runs it):
#
#   lint       helm lint --strict charts/tally, with the default values and with each
#              values file under charts/tally/ci/
#   render     helm template with each of them (default values need no --set)
#   schemas    every rendered object, and `kubectl kustomize k8s/`, against the
#              Kubernetes 1.33 schemas (kubernetes-validate --strict); the custom
#              resources (HTTPRoute, ScaledObject, ServiceMonitor) against the schemas
#              under charts/tally/ci/crd-schemas/; an object with no schema fails
#   snapshot   the renders equal the committed charts/tally/ci/rendered/*.yaml
#              (`scripts/validate-deploy.sh --update` rewrites them after a chart change)
#   refused    each values file under charts/tally/ci/invalid/ is refused by helm lint
#              and helm template, with an error naming every `# expect:` of the file
#              (a file with `# refused-by: template` only by helm template: helm lint
#              turns the `fail` of a template check into a log line)
#   contract   scripts/check_deploy.py: one Deployment per function; values routes ==
#              openapi.json == Cargo.toml's cargo-lambda router; HTTPRoute and Ingress
#              send each public route to its function; hardening, probes, RBAC, hooks;
#              the rebuild Job with and without rebuild.stopProjector (all-features,
#              rebuild values); TALLY_STORE and the S3 settings (default: s3; the
#              postgres-store values: postgres, no TALLY_S3_*, TALLY_EVENT_STORE_URL);
#              the chart's default backends are the Services of k8s/
#   compose    scripts/validate-compose.sh (docker-compose.yml)
#
# The tools come from scripts/tools.sh (installed once under $TALLY_CACHE/tools).
# Last line: `deploy: N passed, M failed`; the exit status is 1 when anything failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

CHART=charts/tally
RELEASE=tally
NAMESPACE=tally   # the namespace of k8s/ and `make kind`
KUBERNETES_VERSION=1.33.0
UPDATE=false
case "${1:-}" in
  --update) UPDATE=true ;;
  "") ;;
  *) echo "usage: $0 [--update]" >&2; exit 2 ;;
esac

./scripts/tools.sh || { echo "validate-deploy: scripts/tools.sh failed"; echo "deploy: 0 passed, 1 failed"; exit 1; }
eval "$(./scripts/tools.sh env)"
HELM=$TALLY_HELM_BIN
KUBECTL=$TALLY_KUBECTL_BIN
PYTHON=$TALLY_TOOLS_PYTHON

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
PASSED=0
FAILED=0

pass() { PASSED=$((PASSED + 1)); echo "  ok   $*"; }
fail() { FAILED=$((FAILED + 1)); echo "  FAIL $*"; }

# run DESCRIPTION COMMAND...: one check; its output is shown only when it fails.
run() {
  local description=$1; shift
  if "$@" >"$OUT/log" 2>&1; then
    pass "$description"
  else
    fail "$description"
    sed 's/^/       | /' "$OUT/log" | tail -40
  fi
}

# counted DESCRIPTION COMMAND...: a checker that prints its own checks and ends with
# `<word>: P passed, F failed`; its counts join ours.
counted() {
  local description=$1; shift
  echo "-- $description"
  "$@" 2>&1 | tee "$OUT/log"
  local status=${PIPESTATUS[0]}
  local counts
  counts=$(tail -n 1 "$OUT/log" | sed -nE 's/^[a-z-]+: ([0-9]+) passed, ([0-9]+) failed.*$/\1 \2/p')
  if [ -n "$counts" ]; then
    PASSED=$((PASSED + ${counts% *}))
    FAILED=$((FAILED + ${counts#* }))
    if [ "$status" -ne 0 ] && [ "${counts#* }" -eq 0 ]; then fail "$description: exit status $status"; fi
  elif [ "$status" -eq 0 ]; then
    pass "$description"
  else
    fail "$description: exit status $status"
  fi
}

# The values files the chart must accept: the defaults (no file) and charts/tally/ci/*.yaml.
VARIANTS=(default)
for file in "$CHART"/ci/*-values.yaml; do
  VARIANTS+=("$(basename "$file" -values.yaml)")
done
values_args() { [ "$1" = default ] || echo "-f $CHART/ci/$1-values.yaml"; }

echo "== helm lint, helm template ($("$HELM" version --short))"
RENDERS=()
for variant in "${VARIANTS[@]}"; do
  # shellcheck disable=SC2046 # values_args is empty or two words
  run "helm lint --strict ($variant values)" "$HELM" lint --strict "$CHART" $(values_args "$variant")
  # shellcheck disable=SC2046
  if "$HELM" template "$RELEASE" "$CHART" -n "$NAMESPACE" $(values_args "$variant") >"$OUT/$variant.yaml" 2>"$OUT/log"; then
    pass "helm template ($variant values): $(grep -c '^kind: ' "$OUT/$variant.yaml") objects"
    RENDERS+=("$OUT/$variant.yaml")
  else
    fail "helm template ($variant values)"
    sed 's/^/       | /' "$OUT/log"
    rm -f "$OUT/$variant.yaml"
  fi
done

echo "== kubectl kustomize k8s/"
INFRA=""
if [ ! -f k8s/kustomization.yaml ]; then
  fail "k8s/kustomization.yaml is missing"
elif "$KUBECTL" kustomize k8s/ >"$OUT/k8s.yaml" 2>"$OUT/log"; then
  pass "kubectl kustomize k8s/: $(grep -c '^kind: ' "$OUT/k8s.yaml") objects"
  INFRA=$OUT/k8s.yaml
  RENDERS+=("$INFRA")
else
  fail "kubectl kustomize k8s/"
  sed 's/^/       | /' "$OUT/log"
fi

echo "== schemas (Kubernetes $KUBERNETES_VERSION, strict)"
for render in "${RENDERS[@]}"; do
  # Built-in kinds; kubernetes-validate only warns about kinds it has no schema for,
  # which check_deploy.py schemas then validates against ci/crd-schemas/ (or fails).
  run "kubernetes-validate --strict -k $KUBERNETES_VERSION $(basename "$render")" \
    "$TALLY_KUBERNETES_VALIDATE_BIN" --strict -k "$KUBERNETES_VERSION" --quiet --no-warn "$render"
done
if [ ${#RENDERS[@]} -gt 0 ]; then
  counted "every object has a schema and passes it" "$PYTHON" scripts/check_deploy.py schemas "${RENDERS[@]}"
else
  fail "schemas: nothing rendered"
fi

echo "== rendered snapshots ($CHART/ci/rendered/)"
mkdir -p "$CHART/ci/rendered"
for variant in default all-features; do
  snapshot=$CHART/ci/rendered/$variant.yaml
  [ -f "$OUT/$variant.yaml" ] || { fail "$snapshot: no render"; continue; }
  if [ "$UPDATE" = true ]; then
    cp "$OUT/$variant.yaml" "$snapshot"
    pass "$snapshot updated"
  elif diff -u "$snapshot" "$OUT/$variant.yaml" >"$OUT/log" 2>&1; then
    pass "$snapshot is up to date"
  else
    fail "$snapshot differs from the render: review, then run scripts/validate-deploy.sh --update"
    sed 's/^/       | /' "$OUT/log" | head -40
  fi
done

echo "== values the schema must refuse ($CHART/ci/invalid/)"
for file in "$CHART"/ci/invalid/*.yaml; do
  expected=$(sed -n 's/^# expect: //p' "$file")
  if [ -z "$expected" ]; then fail "$file: no '# expect:' line"; continue; fi
  commands=$(sed -n 's/^# refused-by: //p' "$file")
  for command in ${commands:-lint template}; do
    if [ "$command" = lint ]; then
      "$HELM" lint --strict "$CHART" -f "$file" >"$OUT/log" 2>&1
    else
      "$HELM" template "$RELEASE" "$CHART" -n "$NAMESPACE" -f "$file" >"$OUT/log" 2>&1
    fi
    status=$?
    missing=$(while IFS= read -r want; do grep -qF -- "$want" "$OUT/log" || echo "$want"; done <<<"$expected")
    if [ "$status" -eq 0 ]; then
      fail "helm $command accepts $(basename "$file"), which it must refuse"
    elif [ -n "$missing" ]; then
      fail "helm $command refuses $(basename "$file"), but does not name: $(echo "$missing" | paste -sd '|')"
      sed 's/^/       | /' "$OUT/log" | head -20
    else
      pass "helm $command refuses $(basename "$file"), naming $(echo "$expected" | paste -sd ' ')"
    fi
  done
done

echo "== contract"
if [ -f "$OUT/default.yaml" ] && [ -f "$OUT/all-features.yaml" ] && [ -f "$OUT/rebuild.yaml" ] \
    && [ -f "$OUT/postgres-store.yaml" ]; then
  counted "chart == code == k8s/" "$PYTHON" scripts/check_deploy.py contract \
    --default "$OUT/default.yaml" --all-features "$OUT/all-features.yaml" \
    --all-features-values "$CHART/ci/all-features-values.yaml" \
    --rebuild "$OUT/rebuild.yaml" --rebuild-values "$CHART/ci/rebuild-values.yaml" \
    --postgres-store "$OUT/postgres-store.yaml" --postgres-store-values "$CHART/ci/postgres-store-values.yaml" \
    ${INFRA:+--infra "$INFRA"}
else
  fail "contract: the default, all-features, rebuild or postgres-store render is missing"
fi

echo "== docker-compose.yml"
if [ -x scripts/validate-compose.sh ]; then
  counted "scripts/validate-compose.sh" ./scripts/validate-compose.sh
else
  fail "scripts/validate-compose.sh is missing or not executable"
fi

echo "deploy: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
