#!/usr/bin/env bash
# The test command (`make test`, and so CI): provision what the tests need, then run
# the format check, clippy and every test of the workspace.
#
# Today the tests need no service: the embedded backends run in-process and the Lambda
# runtime is faked on 127.0.0.1 by the tests themselves. Services the real adapters
# need are provisioned here as they arrive.
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
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build (tests and binaries)"
cargo test --workspace --no-run
echo "== cargo test"
cargo test --workspace
