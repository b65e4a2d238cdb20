#!/usr/bin/env bash
# `make bench`: every measurement of Tally, provisioning the services as the tests do.
#
#   1. the load driver (tally-bench load) against `make dev` (the gateway on the
#      embedded backends), the same gateway alone on the PostgreSQL event store
#      (dev-pg), `make stack` (one process per function on S3, Kafka, PostgreSQL and
#      Redis) and `STORE=postgres make stack` (stack-pg: the events in PostgreSQL), the
#      stacks with the bare backends' ceiling measured first;
#   2. rebuilds: `admin rebuild` replaying what each load wrote into an empty
#      PostgreSQL read model (from the directory, S3 and PostgreSQL stores);
#   3. criterion micro-benchmarks (fold, commit encode/decode, a bearer token checked
#      in full and remembered, 10k-event stream load
#      with and without a snapshot from the directory store, S3 and PostgreSQL);
#   4. serverless figures per function (cold start, binary size, RSS after 1k requests);
#   5. the run's chart, when every part ran, and issue 16's targets beside this run's
#      figures (results/<time>-targets.md, by scripts/bench-targets.py).
#
# Results: bench/results/<time>-<what>.{json,md}, and a summary on stdout.
#
#   make bench                   the figures (`perf` profile: release without LTO)
#   BENCH_QUICK=1 make bench     a handful of operations, debug build: checks the harness
#   BENCH_ARGS="--ops 10000"     more `tally-bench load` flags (tally-bench load --help)
#   BENCH_PROFILE=release        measure the shipped build (full LTO: ≈ 11 min more to build here)
#   BENCH_ONLY="stack"           only these parts (dev dev-pg stack stack-pg micro serverless);
#                                the run's chart is drawn only when every part runs
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${BENCH_QUICK:-}
PROFILE=${BENCH_PROFILE:-$([ -n "$QUICK" ] && echo debug || echo perf)}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
BIN=$TARGET_DIR/$PROFILE
DEV_PORT=${BENCH_DEV_PORT:-18080}
STACK_PORT=${BENCH_STACK_PORT:-18090}
OUT=${BENCH_OUT:-bench/results}
args=(${BENCH_ARGS:-})
ONLY=${BENCH_ONLY:-}
want() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }
[ -n "$QUICK" ] && args+=(--quick)
started=$(date +%s)

TALLY_BENCH_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo -dirty)
export TALLY_BENCH_COMMIT
stamp=$(date -u +%Y-%m-%dT%H-%M-%SZ)
mkdir -p "$OUT"

./scripts/services.sh up
eval "$(./scripts/services.sh env)"
export TALLY_BENCH_S3_SERVER=$TALLY_TEST_S3_SERVER TALLY_BENCH_BROKER=$TALLY_TEST_BROKER

echo "bench: building ($PROFILE)" >&2
if [ "$PROFILE" = debug ]; then cargo build --workspace --bins; else cargo build --profile "$PROFILE" --workspace --bins; fi
[ -n "$QUICK" ] || ! want micro || cargo bench --profile "$PROFILE" -p tally-bench --bench domain --bench load --no-run >&2

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

# `admin rebuild` of what a load wrote: its one-line JSON summary, kept in $OUT.
rebuild() {
  local name=$1; shift
  echo "bench: rebuild ($name)" >&2
  env "$@" RUST_LOG=warn "$BIN/migrate" schema >/dev/null
  env "$@" RUST_LOG=warn "$BIN/admin" rebuild | tail -n 1 \
    | python3 -c 'import json, os, sys; r = json.loads(sys.stdin.read()); r["commit"] = os.environ["TALLY_BENCH_COMMIT"]; print(json.dumps(r))' \
    | tee "$OUT/$stamp-rebuild-$name.json"
}

pids=()
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
# A bucket, topic and database of this run's own for each stack, so every run starts
# from nothing (an earlier run's leftovers would be measured too) and each rebuild
# replays exactly what its load wrote.
run_id=bench-$(date -u +%Y%m%d%H%M%S)
pg_run_id=$run_id-pg
run_databases="${run_id//-/_} ${pg_run_id//-/_} tally_bench_pgdev"
cleanup() {
  stop_all
  for db in $run_databases; do psql -h 127.0.0.1 -U postgres -d postgres -qc "drop database if exists $db" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT INT TERM

# Until the gauge $2 in the /metrics of $1 reads 0, at most 2 minutes; $3 says what
# that means, $4 what it means when it does not come.
wait_zero() {
  local start value
  start=$(date +%s)
  for _ in $(seq 1 1200); do
    value=$(curl -fsS "$1/metrics" 2>/dev/null | awk -v gauge="$2" '$1 == gauge {print $2}')
    if [ "${value:-}" = 0 ]; then
      echo "bench: $3 $(( $(date +%s) - start )) s later" >&2
      return 0
    fi
    sleep 0.1
  done
  echo "bench: after 2 min, $4 ($2: ${value:-no figure})" >&2
}
# The projector (or all-in-one gateway) at $1 has every stream it saw in segments.
wait_segments() {
  wait_zero "$1" tally_segments_streams_behind "every stream in segments" \
    "streams still outside segments: the rebuild reads their commits"
}
# The projector at $1 has packed what the topic holds (it packs once the topic has been
# still for a few seconds).
wait_packs() {
  wait_zero "$1" tally_packs_behind "the topic packed" \
    "no pack of the topic's end: the rebuild reads every stream"
}

# An all-in-one gateway on $DEV_PORT with the environment given, measured as target
# NAME, then stopped.
load_gateway() {
  local name=$1; shift
  env HOST=127.0.0.1 PORT="$DEV_PORT" RUST_LOG=warn "$@" "$BIN/gateway" >/dev/null 2>&1 &
  pids+=($!)
  wait_healthy "http://127.0.0.1:$DEV_PORT"
  wait_routes "http://127.0.0.1:$DEV_PORT"
  "$BIN/tally-bench" --out "$OUT" load --target "$name=http://127.0.0.1:$DEV_PORT" "${args[@]}"
  # On the directory store the gateway copies each stream into segments as it settles.
  [ "$name" = dev ] && wait_segments "http://127.0.0.1:$DEV_PORT"
  stop_all
}

# A fresh, empty database for a rebuild's read model.
fresh_rebuild_database() {
  psql -h 127.0.0.1 -U postgres -d postgres -qc "drop database if exists tally_bench_rebuild" -c "create database tally_bench_rebuild"
}
rebuild_url=postgres://postgres@127.0.0.1:5432/tally_bench_rebuild

# 1a. make dev: every route in one process, embedded backends in a fresh directory.
if want dev; then
  data=$(mktemp -d)
  load_gateway dev TALLY_DATA_DIR="$data"
  # 2a. Rebuild: the dev load's directory store → an empty PostgreSQL read model.
  fresh_rebuild_database
  rebuild dev TALLY_DATA_DIR="$data" TALLY_DATABASE_URL=$rebuild_url
  rm -rf "$data"
fi

if want dev-pg; then
  # 1c. dev-pg: the same all-in-one gateway on the PostgreSQL event store (commands,
  # projection and queries in one process; the read model in memory, as make dev's).
  pgdev_url=postgres://postgres@127.0.0.1:5432/tally_bench_pgdev
  psql -h 127.0.0.1 -U postgres -d postgres -qc "drop database if exists tally_bench_pgdev" -c "create database tally_bench_pgdev"
  # No data directory, so no development master key: one of this run's own (transfers seal
  # their references; without a key they answer 503).
  pgdev_master_key=$(python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')
  load_gateway dev-pg TALLY_STORE=postgres TALLY_EVENT_STORE_URL=$pgdev_url TALLY_MASTER_KEY=$pgdev_master_key
  # 2c. Rebuild: the dev-pg load's PostgreSQL event store → an empty PostgreSQL read model.
  fresh_rebuild_database
  rebuild dev-pg TALLY_STORE=postgres TALLY_EVENT_STORE_URL=$pgdev_url TALLY_DATABASE_URL=$rebuild_url TALLY_MASTER_KEY=$pgdev_master_key
fi

ceiling=(--ceiling)
[ -n "$QUICK" ] && ceiling+=(--ceiling-ops 20)
# The stacks run 2,000 operations per level, not 4,000: moto holds the S3 stack near
# 50–70 commands/s, and 4,000 would take it alone past 2.5 min (BENCH_ARGS="--ops N"
# sets both).
stack_ops=()
[ -z "$QUICK" ] && [[ " ${args[*]} " != *" --ops "* ]] && stack_ops=(--ops 2000)
# Transfers: 200 per level on the stacks (each is a saga of several appends), the
# dev gateways keep 1,000.
[ -z "$QUICK" ] && [[ " ${args[*]} " != *" --transfers "* ]] && stack_ops+=(--transfers 200)

# `make stack` on event store STORE (s3, postgres) as target NAME, in bucket, topic and
# database ID: the ceiling, the load, then a rebuild of what it wrote into its read
# model (emptied first). Its variables stay in its subshell.
load_stack() (
  local name=$1 store=$2 id=$3
  trap stop_all EXIT
  export STORE=$store TALLY_STORE=$store TALLY_S3_BUCKET=$id TALLY_KAFKA_TOPIC=$id
  export TALLY_DATABASE_URL=postgres://postgres@127.0.0.1:5432/${id//-/_}
  psql -h 127.0.0.1 -U postgres -d postgres -qc "create database ${id//-/_}"
  PROFILE=$PROFILE PORT=$STACK_PORT RUST_LOG=warn STACK_LOGS=.stack/bench-logs-$name ./scripts/stack.sh &
  pids+=($!)
  wait_healthy "http://127.0.0.1:$STACK_PORT"
  wait_routes "http://127.0.0.1:$STACK_PORT"
  . scripts/stack-env.sh
  # The stack requires bearer tokens (scripts/idp.sh): the load runs as alice.
  export TALLY_BENCH_TOKEN=$(./scripts/idp.sh token alice)
  # On S3, each level's S3 requests by kind, from moto's access log.
  local s3_log=()
  [ "$store" = s3 ] && s3_log=(--s3-log "${TALLY_CACHE:-$HOME/.cache/tally}/run/moto.log" --s3-bucket "$id")
  "$BIN/tally-bench" --out "$OUT" load --target "$name=http://127.0.0.1:$STACK_PORT" "${ceiling[@]}" "${stack_ops[@]}" "${s3_log[@]}" "${args[@]}"
  # On S3 the projector copies each stream into segments as it settles; the rebuild
  # reads those (the projector is the eleventh function of scripts/stack.sh: port 8111).
  [ "$store" = s3 ] && wait_segments http://127.0.0.1:8111
  # Then packs of every stream, with the topic's offsets; the rebuild reads those.
  [ "$store" = s3 ] && wait_packs http://127.0.0.1:8111
  stop_all
  rebuild "$name"
)

# 1b, 2b. make stack: one process per function on S3, Kafka, PostgreSQL and Redis.
want stack && load_stack stack s3 "$run_id"
# 1d, 2d. stack-pg: `STORE=postgres make stack`, the events in PostgreSQL (the run's
# database, beside its read model); the ceiling's fraction is over the backends a
# command on this store needs (no S3).
want stack-pg && load_stack stack-pg postgres "$pg_run_id"

# 3. Micro-benchmarks (skipped in quick mode: criterion's minimum runs take minutes).
if [ -z "$QUICK" ] && want micro; then
  (
    . scripts/stack-env.sh
    # One bucket (and one database) for the 10k-event stream, seeded once and reused.
    psql -h 127.0.0.1 -U postgres -d postgres -Atqc "select 1 from pg_database where datname = 'tally_bench_load'" | grep -q 1 \
      || psql -h 127.0.0.1 -U postgres -d postgres -qc "create database tally_bench_load"
    TALLY_EVENT_STORE_URL=postgres://postgres@127.0.0.1:5432/tally_bench_load \
    TALLY_S3_BUCKET=tally-bench-load cargo bench --profile "$PROFILE" -p tally-bench --bench domain --bench load 2>&1 \
      | tee "$OUT/$stamp-micro.txt" | grep -E '^(fold|commit|auth|load)/|time:|thrpt:' >&2
  )
fi

# 4. Serverless figures.
if want serverless; then
  runs=5 requests=1000
  [ -n "$QUICK" ] && runs=1 requests=20
  ( export TALLY_S3_BUCKET=$run_id TALLY_KAFKA_TOPIC=$run_id
    export TALLY_DATABASE_URL=postgres://postgres@127.0.0.1:5432/${run_id//-/_}
    . scripts/stack-env.sh
    export TALLY_BENCH_TOKEN=$(./scripts/idp.sh token alice)
    "$BIN/tally-bench" --out "$OUT" serverless --bin-dir "$BIN" --profile "$PROFILE" --runs $runs --requests $requests --with-backends )
fi

# The newest load report of a kind (a load report is <time>Z-<target>.json;
# <time>Z-rebuild-<target>.json is not one), and it only if this run wrote it.
newest() { ls -t "$OUT"/*Z-"$1".json 2>/dev/null | head -n 1; }
this_run() { [ -n "$1" ] && [ "$(basename "$1")" \> "$stamp" ] && echo "$1"; }

# 5. The run's charts, from the JSON files it wrote (the newest of each kind).
if [ -z "$ONLY" ]; then
  "$BIN/tally-bench" --out "$OUT" picture --name "$stamp-bench" \
    --load "dev=$(newest dev)" --load "dev-pg=$(newest dev-pg)" \
    --load "stack=$(newest stack)" --load "stack-pg=$(newest stack-pg)" \
    --rebuild "dev=$OUT/$stamp-rebuild-dev.json" --rebuild "dev-pg=$OUT/$stamp-rebuild-dev-pg.json" \
    --rebuild "stack=$OUT/$stamp-rebuild-stack.json" --rebuild "stack-pg=$OUT/$stamp-rebuild-stack-pg.json"
fi

# 6. Issue 16's targets, each beside this run's figure (a part left out: not measured).
if [ -z "$QUICK" ]; then
  python3 scripts/bench-targets.py \
    --stack "$(this_run "$(newest stack)")" --dev-pg "$(this_run "$(newest dev-pg)")" \
    --rebuild-stack "$(ls "$OUT/$stamp-rebuild-stack.json" 2>/dev/null)" \
    --rebuild-dev "$(ls "$OUT/$stamp-rebuild-dev.json" 2>/dev/null)" \
    --micro "$(ls "$OUT/$stamp-micro.txt" 2>/dev/null)" | tee "$OUT/$stamp-targets.md" >&2
fi

echo "bench: done in $(( $(date +%s) - started )) s; results in $OUT/" >&2
