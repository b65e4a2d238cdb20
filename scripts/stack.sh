#!/usr/bin/env bash
# `make stack`: every function as its own process in HTTP-server mode against the real
# backends on 127.0.0.1 — the Kubernetes topology without a cluster — with the public
# routes on :8080 through the gateway in proxy mode. Ctrl-C stops everything.
#
#   make stack                   a debug build: the one `make test` builds, so after it
#                                nothing is left to compile (from scratch ≈ 6 min here)
#   PROFILE=perf make stack      optimised without LTO (`make bench` uses it)
#   PROFILE=release make stack   the shipped build: full LTO, ≈ 30 min from scratch
#   STORE=postgres make stack    the event store in PostgreSQL instead of S3
#   AUTH=off make stack          no bearer tokens (by default every function requires
#                                tokens of the identity provider scripts/idp.sh runs:
#                                TOKEN=$(make -s token))
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${PROFILE:-debug}
LOGS=${STACK_LOGS:-.stack/logs}
mkdir -p "$LOGS"

./scripts/services.sh up
eval "$(./scripts/services.sh env)"

case $PROFILE in
  debug) guess="seconds if \`make test\` built it, ≈ 6 min from scratch on 2 cores" ;;
  perf) guess="optimised without LTO: several times the debug build" ;;
  release) guess="≈ 30 min from scratch on 2 cores (full LTO: each binary links alone)" ;;
  *) guess="unknown" ;;
esac
echo "stack: building every function and the gateway ($PROFILE profile; $guess)" >&2
started=$(date +%s)
if [ "$PROFILE" = debug ]; then cargo build --bins --workspace; else cargo build --profile "$PROFILE" --bins --workspace; fi
echo "stack: built in $(( $(date +%s) - started )) s" >&2
BIN=${CARGO_TARGET_DIR:-target}/$PROFILE

. scripts/stack-env.sh
export HOST=127.0.0.1
export RUST_LOG=${RUST_LOG:-info}

echo "stack: event store: $TALLY_STORE; init (bucket, topic, migrations)" >&2
"$BIN/migrate" >"$LOGS/migrate.log"

pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap stop EXIT INT TERM

port=8101
upstreams=""
for function in open-account deposit withdraw close-account forget-holder get-account get-balance list-transactions transfer get-transfer projector relay transfer-saga; do
  PORT=$port "$BIN/$function" >"$LOGS/$function.log" 2>&1 &
  pids+=($!)
  case $function in projector|relay|transfer-saga) ;; *) upstreams+="${upstreams:+,}$function=http://127.0.0.1:$port" ;; esac
  echo "stack: $function on 127.0.0.1:$port (log: $LOGS/$function.log)" >&2
  port=$((port + 1))
done
TALLY_UPSTREAMS=$upstreams PORT=${PORT:-8080} "$BIN/gateway" >"$LOGS/gateway.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:${PORT:-8080}/healthz" >/dev/null 2>&1; then break; fi
  sleep 0.1
done
if [ -n "${TALLY_AUTH_ISSUER:-}" ]; then
  echo "stack: bearer tokens required (issuer $TALLY_AUTH_ISSUER); get one with: TOKEN=\$(make -s token)" >&2
  echo "stack: public routes on http://localhost:${PORT:-8080} — try: TOKEN=\$(make -s token) make walkthrough" >&2
else
  echo "stack: authentication is OFF (AUTH=off)" >&2
  echo "stack: public routes on http://localhost:${PORT:-8080} — try: make walkthrough" >&2
fi
wait -n "${pids[@]}"
echo "stack: a process exited; stopping" >&2
