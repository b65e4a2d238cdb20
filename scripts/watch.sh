#!/usr/bin/env bash
# `make watch`: every function under `cargo lambda watch` (the Lambda runtime emulator,
# hot reload) on http://localhost:9000 (WATCH_PORT), with the public routes of
# [workspace.metadata.lambda.watch.router] (Cargo.toml).
#
# The backends are chosen here, not in Cargo.toml: the docker compose ones if they
# answer on their 127.0.0.1 ports (`make backends`: S3 :9002, PostgreSQL :5433), else
# the services of scripts/services.sh (moto, tansu, and the local PostgreSQL and Redis),
# started if needed, so it runs on a machine without Docker. The functions' environment
# is written to an env file that `cargo lambda watch --env-file` reads (printed at
# start); a TALLY_* variable already set in the shell wins over the defaults in it.
#
# Before watching, `migrate` creates the bucket, the topic and the schema (idempotent).
# cargo-lambda comes from PyPI (`pip install cargo-lambda`) when it is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${TALLY_CACHE:-$HOME/.cache/tally}
CARGO_LAMBDA_VERSION=1.9.2
PORT=${WATCH_PORT:-9000}
ENV_FILE=${WATCH_ENV_FILE:-$CACHE/run/watch.env}

if ! cargo lambda --version >/dev/null 2>&1; then
  venv=$CACHE/cargo-lambda-$CARGO_LAMBDA_VERSION
  if [ ! -x "$venv/bin/cargo-lambda" ]; then
    echo "watch: installing cargo-lambda $CARGO_LAMBDA_VERSION from PyPI into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "cargo-lambda==$CARGO_LAMBDA_VERSION"
  fi
  export PATH="$venv/bin:$PATH"
fi

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if answers 9002 && answers 5433; then
  backends="the docker compose backends (make backends)"
  export TALLY_S3_ENDPOINT=${TALLY_S3_ENDPOINT:-http://127.0.0.1:9002}
  export TALLY_KAFKA_BROKERS=${TALLY_KAFKA_BROKERS:-127.0.0.1:9092}
  export TALLY_DATABASE_URL=${TALLY_DATABASE_URL:-postgres://tally:tally@127.0.0.1:5433/tally}
  export TALLY_REDIS_URL=${TALLY_REDIS_URL:-redis://127.0.0.1:6380}
else
  backends="the local services (scripts/services.sh: no compose backends answer on :9002 and :5433)"
  ./scripts/services.sh up
  eval "$(./scripts/services.sh env)"
  AUTH=off . scripts/stack-env.sh
fi
# The local serverless loop is `make dev`'s kind: no bearer tokens, and a topic it
# trusts (the functions inherit this environment, not only the env file's).
unset TALLY_AUTH_ISSUER TALLY_STREAM_KEY TALLY_MASTER_KEY
export TALLY_STORE=${TALLY_STORE:-${STORE:-s3}}
export TALLY_S3_BUCKET=${TALLY_S3_BUCKET:-tally}
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-tally} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-tally-secret}
export AWS_REGION=${AWS_REGION:-us-east-1}
export TALLY_KAFKA_TOPIC=${TALLY_KAFKA_TOPIC:-tally.commits}
export TALLY_KAFKA_GROUP=${TALLY_KAFKA_GROUP:-tally-projector}
export TALLY_CURRENCY=${TALLY_CURRENCY:-USD}
export TALLY_MAX_AMOUNT=${TALLY_MAX_AMOUNT:-1000000.00}
export TALLY_SNAPSHOT_EVERY=${TALLY_SNAPSHOT_EVERY:-100}
export RUST_LOG=${RUST_LOG:-info}

mkdir -p "$(dirname "$ENV_FILE")"
{
  echo "# written by scripts/watch.sh: $backends"
  for key in TALLY_STORE TALLY_S3_BUCKET TALLY_S3_ENDPOINT AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION \
             TALLY_KAFKA_BROKERS TALLY_KAFKA_TOPIC TALLY_KAFKA_GROUP TALLY_DATABASE_URL TALLY_REDIS_URL \
             TALLY_CURRENCY TALLY_MAX_AMOUNT TALLY_SNAPSHOT_EVERY RUST_LOG; do
    echo "$key=${!key}"
  done
} >"$ENV_FILE"

echo "watch: backends: $backends; the functions' environment: $ENV_FILE" >&2
echo "watch: migrate (bucket, topic, schema) on $TALLY_S3_ENDPOINT, $TALLY_KAFKA_BROKERS, ${TALLY_DATABASE_URL%%@*}@…" >&2
cargo run --quiet -p migrate

echo "watch: cargo lambda watch on http://localhost:$PORT — try: scripts/walkthrough.sh http://localhost:$PORT" >&2
exec cargo lambda watch --invoke-port "$PORT" --env-file "$ENV_FILE" "$@"
