#!/usr/bin/env bash
# `make bench`: the load driver (tally-bench) against `make dev` (the gateway on the
# embedded backends) and against `make stack` (every function as its own process on
# S3, Kafka, PostgreSQL and Redis), provisioning the services as the tests do.
# Results: bench/results/<time>-<target>.{json,md}, and a summary on stdout.
#
#   make bench                   200 accounts, 4,000 operations at concurrency 1, 16, 64
#   BENCH_QUICK=1 make bench     a handful of operations, debug build: checks the harness
#   BENCH_ARGS="--ops 10000"     more tally-bench flags (tally-bench --help)
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${BENCH_QUICK:-}
PROFILE=${BENCH_PROFILE:-$([ -n "$QUICK" ] && echo debug || echo release)}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
BIN=$TARGET_DIR/$PROFILE
DEV_PORT=${BENCH_DEV_PORT:-18080}
STACK_PORT=${BENCH_STACK_PORT:-18090}
args=(${BENCH_ARGS:-})
[ -n "$QUICK" ] && args+=(--quick)

TALLY_BENCH_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo -dirty)
export TALLY_BENCH_COMMIT

./scripts/services.sh up
eval "$(./scripts/services.sh env)"

echo "bench: building ($PROFILE)" >&2
if [ "$PROFILE" = debug ]; then cargo build --workspace --bins; else cargo build --profile "$PROFILE" --workspace --bins; fi

wait_healthy() {
  for _ in $(seq 1 300); do
    curl -fsS "$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "bench: $1 did not become ready" >&2
  return 1
}

# Until every function answers through the gateway (a 4xx is an answer; 503 is not).
wait_routes() {
  for _ in $(seq 1 300); do
    local down=0
    for route in "GET /accounts/probe" "GET /accounts/probe/balance" "GET /accounts/probe/transactions" \
                 "POST /accounts" "POST /accounts/probe/deposit" "POST /accounts/probe/withdraw" "POST /accounts/probe/close"; do
      code=$(curl -s -o /dev/null -w '%{http_code}' -X "${route% *}" -H 'content-type: application/json' -d '{}' "$1${route#* }")
      case $code in 000|502|503) down=1 ;; esac
    done
    [ $down = 0 ] && return 0
    sleep 0.2
  done
  echo "bench: not every function answers behind $1" >&2
  return 1
}

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

# make dev: every route in one process, embedded backends in a fresh directory.
data=$(mktemp -d)
HOST=127.0.0.1 PORT=$DEV_PORT TALLY_DATA_DIR=$data RUST_LOG=warn "$BIN/gateway" >/dev/null 2>&1 &
pids+=($!)
wait_healthy "http://127.0.0.1:$DEV_PORT"
wait_routes "http://127.0.0.1:$DEV_PORT"
"$BIN/tally-bench" --target "dev=http://127.0.0.1:$DEV_PORT" "${args[@]}"
kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true; pids=()
rm -rf "$data"

# make stack: one process per function on the real backends.
PROFILE=$PROFILE PORT=$STACK_PORT RUST_LOG=warn STACK_LOGS=.stack/bench-logs ./scripts/stack.sh &
pids+=($!)
wait_healthy "http://127.0.0.1:$STACK_PORT"
wait_routes "http://127.0.0.1:$STACK_PORT"
"$BIN/tally-bench" --target "stack=http://127.0.0.1:$STACK_PORT" "${args[@]}"
