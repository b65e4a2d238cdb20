#!/usr/bin/env bash
# The OpenAPI document against the server (part of `make test`): schemathesis (pinned,
# from PyPI, into ~/.cache/tally) generates requests from openapi.json — examples,
# coverage, fuzzing, and stateful sequences along the document's links (open → deposit
# → balance, transfer → its state) — and runs every check against `make dev`'s gateway
# on a fresh data directory: no 5xx, every response as documented, and no schema-valid
# request refused for its form (schemathesis.toml takes 412 and 422 as answers;
# scripts/schemathesis/tally_checks.py says which problem types of them are state, not
# form). Fails on any failure; SCHEMATHESIS_SEED replays a run.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${TALLY_CACHE:-$HOME/.cache/tally}
VERSION=4.32.5
venv=$CACHE/schemathesis-$VERSION
if [ ! -x "$venv/bin/schemathesis" ]; then
  echo "schemathesis: installing $VERSION from PyPI into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "schemathesis==$VERSION"
fi
BIN=${CARGO_TARGET_DIR:-target}/debug
[ -x "$BIN/gateway" ] || cargo build -p gateway
PORT=${SCHEMATHESIS_PORT:-18280}
SEED=${SCHEMATHESIS_SEED:-1}
mkdir -p "$CACHE/run"
data=$(mktemp -d)
HOST=127.0.0.1 PORT=$PORT TALLY_DATA_DIR=$data RUST_LOG=warn "$BIN/gateway" >"$CACHE/run/schemathesis-gateway.log" 2>&1 &
gateway=$!
trap 'kill "$gateway" 2>/dev/null || true; wait "$gateway" 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null || { echo "schemathesis: the gateway did not start" >&2; exit 1; }

echo "schemathesis $VERSION against make dev on :$PORT, seed $SEED" >&2
PYTHONDONTWRITEBYTECODE=1 SCHEMATHESIS_HOOKS=tally_checks PYTHONPATH=scripts/schemathesis \
  "$venv/bin/schemathesis" run openapi.json --url "http://127.0.0.1:$PORT" \
  --checks all \
  --max-examples "${SCHEMATHESIS_EXAMPLES:-50}" --seed "$SEED" --no-color
