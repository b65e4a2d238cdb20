#!/usr/bin/env bash
# The test command (`make test`, and so CI): provision the services the tests need on
# 127.0.0.1 (PostgreSQL, Redis, an S3 server, a Kafka-protocol broker — see
# scripts/services.sh) and the deployment validation tools (scripts/tools.sh), then run
# the format check, the offline chart/manifest/compose validation, clippy, every test,
# `make watch` end to end (scripts/watch-test.sh), and schemathesis against the OpenAPI
# document and `make dev` (scripts/schemathesis.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component"
  fi
done

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== services"
./scripts/services.sh up
eval "$(./scripts/services.sh env)"
# Databases the tests created in earlier runs.
psql -h 127.0.0.1 -U postgres -d postgres -Atqc \
  "select 'drop database if exists ' || datname || ';' from pg_database where datname like 'tally_t_%'" \
  | psql -h 127.0.0.1 -U postgres -d postgres -q >/dev/null

echo "== deployment, offline: helm lint and template, Kubernetes 1.33 schemas, compose schema, route tables"
./scripts/validate-deploy.sh

echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build (every function, and the tests)"
cargo build --workspace --bins
cargo test --workspace --no-run
echo "== cargo test"
cargo test --workspace
echo "== make watch, end to end (cargo-lambda from PyPI, the walk-through on its router, a Kafka batch)"
./scripts/watch-test.sh
echo "== the OpenAPI document against make dev (schemathesis, every check, stateful links)"
./scripts/schemathesis.sh
