#!/usr/bin/env bash
# Where the stack's CPU goes, per process: `make stack` on S3 as `make bench` runs it
# (the `perf` build, a bucket, topic and database of its own), first idle, then under
# `tally-bench load` at one concurrency (no transfers); each process's CPU time from
# /proc before and after, as a share of a core and in ms per command (deposits and
# withdrawals). moto, tansu, Redis and PostgreSQL (every backend of the server, so
# anything else using it on the machine counts too) are counted with the functions.
#
#   scripts/cpu-per-command.sh                  c=64, 3000 operations, 20 s idle
#   CONCURRENCY=16 OPS=2000 IDLE=10 scripts/cpu-per-command.sh
#
# The functions log at `warn` into .stack/cpu-logs/; STACK_RUST_LOG sets another level,
# and with TALLY_LOG_SPANS=1 scripts/span-times.py reads where each command's time went.
#
# Needs the `perf` build (`cargo build --profile perf --workspace --bins`, what
# `make bench` builds) and the services (`./scripts/services.sh up`). Nothing is kept:
# the figures go to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

CONCURRENCY=${CONCURRENCY:-64}
OPS=${OPS:-3000}
IDLE=${IDLE:-20}
PROFILE=${PROFILE:-perf}
PORT=${CPU_PORT:-18095}
BIN=${CARGO_TARGET_DIR:-target}/$PROFILE
OUT=$(mktemp -d)

./scripts/services.sh up >/dev/null
# scripts/stack.sh builds too; first, so that the stack is measured, not the build.
cargo build --profile "$PROFILE" --workspace --bins
eval "$(./scripts/services.sh env)"
id=cpu-$(date -u +%Y%m%d%H%M%S)
export STORE=s3 TALLY_STORE=s3 TALLY_S3_BUCKET=$id TALLY_KAFKA_TOPIC=$id
export TALLY_DATABASE_URL=postgres://postgres@127.0.0.1:5432/${id//-/_}
psql -h 127.0.0.1 -U postgres -d postgres -qc "create database ${id//-/_}"
stack=
cleanup() {
  [ -n "$stack" ] && kill "$stack" 2>/dev/null && wait "$stack" 2>/dev/null || true
  psql -h 127.0.0.1 -U postgres -d postgres -qc "drop database if exists ${id//-/_}" >/dev/null 2>&1 || true
  rm -rf "$OUT"
}
trap cleanup EXIT INT TERM
PROFILE=$PROFILE PORT=$PORT RUST_LOG=${STACK_RUST_LOG:-warn} STACK_LOGS=.stack/cpu-logs ./scripts/stack.sh >/dev/null 2>&1 &
stack=$!
# Until every function answers through the gateway (a 4xx is an answer; 502/503 is not).
for _ in $(seq 1 600); do
  down=0
  for route in "GET /accounts/probe" "GET /accounts/probe/balance" "GET /accounts/probe/transactions" \
               "POST /accounts" "POST /accounts/probe/deposit" "POST /accounts/probe/withdraw"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -X "${route% *}" -H 'content-type: application/json' -d '{}' "http://127.0.0.1:$PORT${route#* }" || true)
    case $code in 000|502|503) down=1 ;; esac
  done
  [ $down = 0 ] && break
  sleep 0.2
done
. scripts/stack-env.sh
export TALLY_BENCH_TOKEN=$(./scripts/idp.sh token alice)
# Open the accounts and warm every function (a level of 200 operations), then wait
# until the projector has copied every stream into segments and packed the topic (it
# does both once the traffic has stopped for a few seconds): idle is measured after.
"$BIN/tally-bench" --out "$OUT" load --target "cpu=http://127.0.0.1:$PORT" --concurrency 4 --ops 200 --transfers 0 >/dev/null 2>&1
gauge() { curl -fsS http://127.0.0.1:8111/metrics 2>/dev/null | awk -v g="$1" '$1 == g {print $2}'; }
for _ in $(seq 1 240); do
  [ "$(gauge tally_segments_streams_behind)" = 0 ] && [ "$(gauge tally_packs_behind)" = 0 ] && break
  sleep 0.5
done
sleep 2

sample() { python3 scripts/cpu-sample.py "$BIN"; }
a=$(sample); sleep "$IDLE"; b=$(sample)
rm -f "$OUT"/*.json
# The load opens its accounts first: CPU is counted from the start of its level.
"$BIN/tally-bench" --out "$OUT" load --target "cpu=http://127.0.0.1:$PORT" --concurrency "$CONCURRENCY" --ops "$OPS" --transfers 0 >/dev/null 2>"$OUT/load.log" &
load=$!
until grep -q "at concurrency $CONCURRENCY" "$OUT/load.log"; do
  kill -0 $load 2>/dev/null || { cat "$OUT/load.log" >&2; exit 1; }
  sleep 0.05
done
c0=$(sample)
wait $load
c=$(sample)
python3 scripts/cpu-sample.py --report "$a" "$b" "$c0" "$c" "$(ls "$OUT"/*-cpu.json)"
