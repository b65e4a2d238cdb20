# Sourced by scripts/stack.sh and scripts/bench.sh (after `services.sh env`): the
# variables every `make stack` process reads, defaulting to the services of
# scripts/services.sh, and the `tally` database they use. STORE=postgres (or
# TALLY_STORE=postgres) keeps the events in PostgreSQL — in the `tally` database unless
# TALLY_EVENT_STORE_URL names another — instead of the S3 server.
psql -h 127.0.0.1 -U postgres -d postgres -Atqc "select 1 from pg_database where datname = 'tally'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -d postgres -qc "create database tally"

export TALLY_STORE=${TALLY_STORE:-${STORE:-s3}}
case $TALLY_STORE in
  s3 | postgres) ;;
  *) echo "STORE=$TALLY_STORE: one of s3, postgres" >&2; exit 2 ;;
esac
export TALLY_S3_BUCKET=${TALLY_S3_BUCKET:-tally}
export TALLY_S3_ENDPOINT=${TALLY_S3_ENDPOINT:-$TALLY_TEST_S3_ENDPOINT}
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-tally} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-tally-secret}
export AWS_REGION=${AWS_REGION:-us-east-1}
export TALLY_KAFKA_BROKERS=${TALLY_KAFKA_BROKERS:-$TALLY_TEST_KAFKA_BROKERS}
export TALLY_KAFKA_TOPIC=${TALLY_KAFKA_TOPIC:-tally.commits}
export TALLY_DATABASE_URL=${TALLY_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/tally}
export TALLY_REDIS_URL=${TALLY_REDIS_URL:-$TALLY_TEST_REDIS_URL}
