#!/usr/bin/env bash
# `make torture`: the fault harness. Builds the functions and tally-torture, then runs
# each topology under seeded load and faults for TORTURE_SECONDS (default 300) and
# checks the whole history against the event store and the read model. Reports go to
# bench/results/<time>-torture-<topology>.{json,md,svg}; a violation fails the run and
# prints the seed to replay it.
#
#   TORTURE_SEED=42 TORTURE_SECONDS=60 make torture
#   TORTURE_TOPOLOGY=dev make torture        only one topology (dev, stack, stack-pg; default: all three)
#   TORTURE_PROFILE=perf make torture        an optimised build (default: debug)
#   TORTURE_KEEP_LOGS=1 make torture         keep the processes' logs and data of a run that passed
set -euo pipefail
cd "$(dirname "$0")/.."

# The stack topology needs the services (its own S3, broker and Redis are started from them).
./scripts/services.sh up
eval "$(./scripts/services.sh env)"

PROFILE=${TORTURE_PROFILE:-debug}
# Every topology: dev, the stack on S3, and stack-pg (the stack on the PostgreSQL event
# store, whose clients write ten times the S3 stack's commits).
TOPOLOGIES=${TORTURE_TOPOLOGY:-dev stack stack-pg}
export TORTURE_SEED=${TORTURE_SEED:-$(date +%s)}

echo "torture: building ($PROFILE)" >&2
if [ "$PROFILE" = debug ]; then
  cargo build --bins --workspace
else
  cargo build --profile "$PROFILE" --bins --workspace
fi
BIN=${CARGO_TARGET_DIR:-target}/$PROFILE

status=0
for topology in $TOPOLOGIES; do
  "$BIN/tally-torture" --topology "$topology" --out bench/results || status=1
done
exit $status
