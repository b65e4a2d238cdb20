#!/usr/bin/env bash
# `make watch`: every function under `cargo lambda watch` (the Lambda runtime emulator,
# hot reload) on http://localhost:9000, with the public routes of
# [workspace.metadata.lambda.watch.router] and the environment of
# [workspace.metadata.lambda.env] (Cargo.toml): the docker compose backends on their
# 127.0.0.1 ports (`make backends`). cargo-lambda gives those values precedence over the
# environment and its own --env-var flags, so to point the functions elsewhere, edit them
# there.
#
# Before watching, `migrate` creates the bucket, the topic and the schema (idempotent).
# cargo-lambda comes from PyPI (`pip install cargo-lambda`) when it is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${TALLY_CACHE:-$HOME/.cache/tally}
CARGO_LAMBDA_VERSION=1.9.2

if ! cargo lambda --version >/dev/null 2>&1; then
  venv=$CACHE/cargo-lambda-$CARGO_LAMBDA_VERSION
  if [ ! -x "$venv/bin/cargo-lambda" ]; then
    echo "watch: installing cargo-lambda $CARGO_LAMBDA_VERSION from PyPI into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "cargo-lambda==$CARGO_LAMBDA_VERSION"
  fi
  export PATH="$venv/bin:$PATH"
fi

# migrate gets the same environment as the functions: Cargo.toml's.
while IFS='=' read -r key value; do
  export "$key=$value"
done < <(python3 -c '
import tomllib
for key, value in tomllib.load(open("Cargo.toml", "rb"))["workspace"]["metadata"]["lambda"]["env"].items():
    print(f"{key}={value}")
')

echo "watch: migrate (bucket, topic, schema) on $TALLY_S3_ENDPOINT, $TALLY_KAFKA_BROKERS, ${TALLY_DATABASE_URL%%@*}@…" >&2
cargo run --quiet -p migrate

echo "watch: cargo lambda watch on http://localhost:${WATCH_PORT:-9000} — try: scripts/walkthrough.sh http://localhost:${WATCH_PORT:-9000}" >&2
exec cargo lambda watch --invoke-port "${WATCH_PORT:-9000}" "$@"
