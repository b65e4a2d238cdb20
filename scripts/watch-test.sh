#!/usr/bin/env bash
# `make watch` end to end, as a new user runs it (part of `make test`): cargo-lambda from
# PyPI (pinned, by scripts/watch.sh), every function under `cargo lambda watch` against
# the local services (no Docker), the seed walk-through through the emulator's router,
# and the projector invoked with a Kafka batch (`cargo lambda invoke`). Fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${TALLY_CACHE:-$HOME/.cache/tally}
PORT=${WATCH_TEST_PORT:-19000}
LOG=$CACHE/run/watch-test.log
mkdir -p "$CACHE/run"
export PATH="$CACHE/cargo-lambda-1.9.2/bin:$PATH"

# Its own bucket, topic and database (dropped by the next `make test`), so the
# projector's fixture batch never lands in what `make stack` or `make torture` check.
psql -h 127.0.0.1 -U postgres -d postgres -qc "drop database if exists tally_t_watch" >/dev/null 2>&1
psql -h 127.0.0.1 -U postgres -d postgres -qc "create database tally_t_watch" >/dev/null
export TALLY_DATABASE_URL=postgres://postgres@127.0.0.1:5432/tally_t_watch
export TALLY_S3_BUCKET=tally-watch-test TALLY_KAFKA_TOPIC=tally-watch-test.commits

# Its own process group, so that stopping it stops every function it started.
WATCH_PORT=$PORT setsid ./scripts/watch.sh --ignore-changes >"$LOG" 2>&1 &
watch=$!
stop() { kill -TERM -- "-$watch" 2>/dev/null || true; wait "$watch" 2>/dev/null || true; }
trap stop EXIT
fail() { echo "watch-test: $*" >&2; echo "--- $LOG (last 40 lines)" >&2; tail -40 "$LOG" >&2; exit 1; }

for _ in $(seq 1 600); do
  curl -s -o /dev/null "http://127.0.0.1:$PORT/" 2>/dev/null && break
  kill -0 "$watch" 2>/dev/null || fail "make watch stopped before it listened on :$PORT"
  sleep 1
done
curl -s -o /dev/null "http://127.0.0.1:$PORT/" || fail "nothing listens on :$PORT after 600 s"

BASE=http://127.0.0.1:$PORT
ID=watch-$(date +%s)-$$
# The first request to a function compiles it (cargo lambda watch builds on demand).
call() {
  local method=$1 path=$2 body=${3:-} want=$4 out status
  out=$(mktemp)
  status=$(curl -sS --max-time 900 -o "$out" -w '%{http_code}' -X "$method" "$BASE$path" \
    -H 'Content-Type: application/json' ${body:+-d "$body"}) || fail "$method $path: no answer"
  echo "watch-test: $method $path -> $status $(cat "$out")" >&2
  [ "$status" = "$want" ] || fail "$method $path answered $status, not $want"
  cat "$out"; rm -f "$out"
}
call POST /accounts "{\"ID\": \"$ID\"}" 201 >/dev/null
call POST "/accounts/$ID/deposit" '{"Amount": 500.00}' 200 >/dev/null
call GET "/accounts/$ID/balance" "" 200 | grep -q '"balance":"500.00"' || fail "the balance is not 500.00"
call POST "/accounts/$ID/withdraw" '{"Amount": 150.00}' 200 >/dev/null
call GET "/accounts/$ID/balance" "" 200 | grep -q '"balance":"350.00"' || fail "the balance is not 350.00"

answer=$(cargo lambda invoke projector --invoke-port "$PORT" \
  --data-file functions/projector/tests/fixtures/kafka-event.json 2>&1) || fail "projector invoke: $answer"
echo "watch-test: projector <- Kafka batch: $answer" >&2
python3 - "$answer" <<'PY' || fail "the projector did not take the batch's two commits"
import json, sys
a = json.loads(sys.argv[1].strip().splitlines()[-1])
assert a["commits"] == 2 and a["applied"] + a["duplicates"] == 2, a
PY
echo "watch-test: make watch serves the walk-through on :$PORT and the projector takes Kafka batches" >&2
