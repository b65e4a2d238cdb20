#!/usr/bin/env bash
# Validate the deployment offline, no cluster needed (`make test` runs it):
#
#   lint       helm lint --strict charts/tally, with the default values and with each
#              values file under charts/tally/ci/
#   render     helm template with each of them. The defaults alone are refused (no
#              issuer, no stream key, no master key, k8s/'s credentials): the `default`
#              variant adds charts/tally/ci/default.yaml (an issuer, a stream key, a
#              master key, development: true);
#              the `development` variant is charts/tally/values-development.yaml (the
#              `make kind` values: development, authentication off)
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
#   auth       what no schema says about the renders: TALLY_AUTH_* in the ConfigMaps
#              as values say (none with auth off); every Deployment reads TALLY_STREAM_KEY
#              and TALLY_MASTER_KEY from its Secret (secretKeyRef, optional only with
#              development; the chart's own Secret holds both outside development); the
#              NetworkPolicies select every Deployment once, the public functions from
#              the gateway's peers only, the others from the namespace only, no rule open
#              to every source, the http port only
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

# The values files the chart must accept: the defaults with what they lack
# (ci/default.yaml), the development values it ships, and charts/tally/ci/*-values.yaml.
VARIANTS=(default development)
for file in "$CHART"/ci/*-values.yaml; do
  VARIANTS+=("$(basename "$file" -values.yaml)")
done
values_file() {
  case $1 in
    default) echo "$CHART/ci/default.yaml" ;;
    development) echo "$CHART/values-development.yaml" ;;
    *) echo "$CHART/ci/$1-values.yaml" ;;
  esac
}
values_args() { echo "-f $(values_file "$1")"; }

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

echo "== auth, stream key, master key, network policies"
AUTH_ARGS=()
for variant in "${VARIANTS[@]}"; do
  [ -f "$OUT/$variant.yaml" ] && AUTH_ARGS+=("$variant" "$OUT/$variant.yaml" "$(values_file "$variant")")
done
if [ ${#AUTH_ARGS[@]} -gt 0 ]; then
  counted "TALLY_AUTH_*, TALLY_STREAM_KEY, TALLY_MASTER_KEY, NetworkPolicies" "$PYTHON" - "$NAMESPACE" "$CHART/values.yaml" "${AUTH_ARGS[@]}" <<'PY'
import sys
import yaml

def merge(base, override):
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base.get(key), value) if key in base else value
        return merged
    return override

passed = failed = 0
def check(description, problems):
    global passed, failed
    if problems:
        failed += 1
        print(f"  FAIL {description}")
        for problem in problems:
            print(f"       - {problem}")
    else:
        passed += 1
        print(f"  ok   {description}")

def selects(selector, labels):
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        value = labels.get(e["key"])
        if e["operator"] == "In" and value not in e["values"]: return False
        if e["operator"] == "NotIn" and value in e["values"]: return False
        if e["operator"] == "Exists" and e["key"] not in labels: return False
        if e["operator"] == "DoesNotExist" and e["key"] in labels: return False
    return True

namespace = sys.argv[1]
defaults = yaml.safe_load(open(sys.argv[2]))
args = sys.argv[3:]
for variant, render, values_path in zip(args[0::3], args[1::3], args[2::3]):
    values = merge(defaults, yaml.safe_load(open(values_path)) or {})
    docs = [d for d in yaml.safe_load_all(open(render)) if d]
    kind = lambda k: [d for d in docs if d["kind"] == k]
    auth, dev = values["auth"], bool(values.get("development"))

    problems = []
    for config in kind("ConfigMap"):
        data, name = config.get("data") or {}, config["metadata"]["name"]
        present = sorted(k for k in data if k.startswith("TALLY_AUTH_"))
        if not auth["enabled"]:
            problems += [f"ConfigMap {name}: {k} with auth off" for k in present]
            continue
        want = {"TALLY_AUTH_ISSUER": auth["issuer"], "TALLY_AUTH_AUDIENCE": auth["audience"],
                "TALLY_AUTH_LEEWAY_SECONDS": str(auth["leewaySeconds"]),
                "TALLY_AUTH_DISCOVERY_URL": auth.get("discoveryUrl") or None,
                "TALLY_AUTH_LEGACY_OWNER": auth.get("legacyOwner") or None}
        problems += [f"ConfigMap {name}: {k}={data.get(k)!r}, want {v!r}" for k, v in want.items() if data.get(k) != v]
        if not auth["issuer"]:
            problems.append(f"ConfigMap {name}: auth on without an issuer")
    check(f"{variant}: TALLY_AUTH_* " + ("absent (auth off)" if not auth["enabled"] else f"of {auth['issuer']}"),
          problems)

    # The keys every Deployment reads by name from its Secret: the commit topic's HMAC
    # key, and the master key of the holders' data keys (crypto-shredding).
    secrets = {s["metadata"]["name"]: s.get("stringData") or {} for s in kind("Secret")}
    for key in ("TALLY_STREAM_KEY", "TALLY_MASTER_KEY"):
        problems = []
        for deployment in kind("Deployment"):
            container = deployment["spec"]["template"]["spec"]["containers"][0]
            name = deployment["metadata"]["name"]
            secret = next((r["secretRef"]["name"] for r in container.get("envFrom", []) if "secretRef" in r), None)
            env = {e["name"]: e for e in container.get("env", [])}
            ref = env.get(key, {}).get("valueFrom", {}).get("secretKeyRef")
            if not ref or ref.get("name") != secret or ref.get("key") != key:
                problems.append(f"{name}: {key} is not secretKeyRef {secret}/{key}: {env.get(key)}")
            elif bool(ref.get("optional")) != dev:
                problems.append(f"{name}: {key} optional {ref.get('optional')}, want {dev} (development {dev})")
            if secret in secrets and not dev and not secrets[secret].get(key):
                problems.append(f"Secret {secret}: no {key} outside development")
        if not kind("Deployment"):
            problems.append("no Deployment")
        problems = sorted(set(problems), key=problems.index)  # a Secret's fault, once
        check(f"{variant}: every Deployment reads {key} from its Secret"
              + (" (optional: development)" if dev else " (required)"), problems)

    policies = kind("NetworkPolicy")
    if not values["networkPolicy"]["enabled"]:
        check(f"{variant}: no NetworkPolicy (networkPolicy.enabled false)",
              [f"NetworkPolicy {p['metadata']['name']}" for p in policies])
        continue
    public = {n for n, fn in values["functions"].items()
              if fn.get("enabled", True) and fn["kind"] == "http" and fn.get("routes")}
    monitoring = values["networkPolicy"]["monitoringPeers"] if values["serviceMonitor"]["enabled"] else []
    problems = []
    for deployment in kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        component = labels.get("app.kubernetes.io/component")
        chosen = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        if len(chosen) != 1:
            problems.append(f"{deployment['metadata']['name']}: selected by {len(chosen)} NetworkPolicies, want 1")
            continue
        spec, name = chosen[0]["spec"], chosen[0]["metadata"]["name"]
        if spec.get("policyTypes") != ["Ingress"]:
            problems.append(f"{name}: policyTypes {spec.get('policyTypes')}")
        rules = spec.get("ingress") or []
        for rule in rules:
            if not rule.get("from"):
                problems.append(f"{name}: a rule without `from` admits every source")
            if rule.get("ports") != [{"port": "http", "protocol": "TCP"}]:
                problems.append(f"{name}: a rule on ports {rule.get('ports')}, want the http port only")
        peers = [peer for rule in rules for peer in rule.get("from") or []]
        if component in public:
            local = [peer for peer in peers if "podSelector" in peer and "namespaceSelector" not in peer]
            if local:
                problems.append(f"{component} ({name}): admits pods of its own namespace {local}")
            wanted = list(values["networkPolicy"]["extraPublicPeers"]) + list(monitoring)
            if values["ingress"]["enabled"]:
                wanted += values["networkPolicy"]["ingressControllerPeers"]
            if values["httpRoute"]["enabled"] and values["networkPolicy"]["gatewayPeers"]:
                wanted += values["networkPolicy"]["gatewayPeers"]
            problems += [f"{component} ({name}): peer {peer} missing" for peer in wanted if peer not in peers]
            if values["httpRoute"]["enabled"] and not values["networkPolicy"]["gatewayPeers"]:
                gateways = {(ref.get("namespace") or namespace, ref["name"]) for ref in values["httpRoute"]["parentRefs"]}
                derived = {(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], gateway)
                           for peer in peers if "gateway.networking.k8s.io/gateway-name" in str(peer.get("podSelector"))
                           for gateway in peer["podSelector"]["matchExpressions"][0]["values"]}
                if derived != gateways:
                    problems.append(f"{component} ({name}): Gateway peers {sorted(derived)}, want {sorted(gateways)}")
            if not (values["ingress"]["enabled"] or values["httpRoute"]["enabled"] or values["networkPolicy"]["extraPublicPeers"] or monitoring) and rules:
                problems.append(f"{component} ({name}): rules {rules} with no gateway")
        else:
            if [{"podSelector": {}}] not in [rule.get("from") for rule in rules]:
                problems.append(f"{component} ({name}): no rule from the pods of its namespace")
            others = [peer for peer in peers if peer != {"podSelector": {}} and peer not in monitoring]
            if others:
                problems.append(f"{component} ({name}): admits {others} beyond its namespace and Prometheus")
    problems = sorted(set(problems), key=problems.index)  # a policy's faults, once
    check(f"{variant}: {len(policies)} NetworkPolicies, each Deployment under one: public functions from "
          "the gateway's peers only, the others from the namespace only; http port, no open rule", problems)

print(f"auth: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
else
  fail "auth: nothing rendered"
fi

echo "== docker-compose.yml"
if [ -x scripts/validate-compose.sh ]; then
  counted "scripts/validate-compose.sh" ./scripts/validate-compose.sh
else
  fail "scripts/validate-compose.sh is missing or not executable"
fi

echo "deploy: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
