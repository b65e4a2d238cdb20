#!/usr/bin/env bash
# The seed project's walk-through, against a running Tally (default: make dev on :8080).
# With TOKEN set (make stack: TOKEN=$(make -s token)), every request carries it.
set -euo pipefail
BASE=${1:-http://localhost:8080}
ID=${ID:-account123}
auth=()
if [ -n "${TOKEN:-}" ]; then auth=(-H "Authorization: Bearer $TOKEN"); fi
run() { echo "\$ curl $*" >&2; curl -sS "${auth[@]}" "$@"; echo; }
run -X POST "$BASE/accounts" -H 'Content-Type: application/json' -d "{\"ID\": \"$ID\"}"
run -X POST "$BASE/accounts/$ID/deposit" -H 'Content-Type: application/json' -d '{"Amount": 500.00}'
run "$BASE/accounts/$ID/balance"
run -X POST "$BASE/accounts/$ID/withdraw" -H 'Content-Type: application/json' -d '{"Amount": 150.00}'
run "$BASE/accounts/$ID/balance"
