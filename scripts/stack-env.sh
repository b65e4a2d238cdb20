# Sourced by scripts/stack.sh and scripts/bench.sh (after `services.sh env`): the
# variables every `make stack` process reads, defaulting to the services of
# scripts/services.sh. STORE=postgres (or TALLY_STORE=postgres) keeps the events in
# PostgreSQL instead of the S3 server. Each store has a read model, topic and cache
# prefix of its own — the `tally` database, `tally.commits` and `tally:` for S3,
# `tally_pg`, `tally-pg.commits` and `tally-pg:` for PostgreSQL (whose events are in
# that database too unless TALLY_EVENT_STORE_URL names another) — so switching stores
# never mixes one store's accounts into the other's views.
export TALLY_STORE=${TALLY_STORE:-${STORE:-s3}}
case $TALLY_STORE in
  s3) database=tally topic=tally.commits prefix=tally: ;;
  postgres) database=tally_pg topic=tally-pg.commits prefix=tally-pg: ;;
  *) echo "STORE=$TALLY_STORE: one of s3, postgres" >&2; exit 2 ;;
esac
if [ -z "${TALLY_DATABASE_URL:-}" ]; then
  psql -h 127.0.0.1 -U postgres -d postgres -Atqc "select 1 from pg_database where datname = '$database'" | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -d postgres -qc "create database $database"
  export TALLY_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$database
fi
export TALLY_KAFKA_TOPIC=${TALLY_KAFKA_TOPIC:-$topic}
export TALLY_REDIS_PREFIX=${TALLY_REDIS_PREFIX:-$prefix}
export TALLY_S3_BUCKET=${TALLY_S3_BUCKET:-tally}
export TALLY_S3_ENDPOINT=${TALLY_S3_ENDPOINT:-$TALLY_TEST_S3_ENDPOINT}
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-tally} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-tally-secret}
export AWS_REGION=${AWS_REGION:-us-east-1}
export TALLY_KAFKA_BROKERS=${TALLY_KAFKA_BROKERS:-$TALLY_TEST_KAFKA_BROKERS}
export TALLY_REDIS_URL=${TALLY_REDIS_URL:-$TALLY_TEST_REDIS_URL}
# Bearer tokens of the identity provider scripts/idp.sh runs (AUTH=off: none, as in
# `make dev` — but `make stack` listens on loopback only either way).
if [ "${AUTH:-on}" = off ]; then
  unset TALLY_AUTH_ISSUER
else
  export TALLY_AUTH_ISSUER=${TALLY_AUTH_ISSUER:-$TALLY_TEST_OIDC_ISSUER}
fi
# The key commits on the topic are signed and checked with (tally_kafka::mac): one
# per machine, kept with the services' state.
if [ -z "${TALLY_STREAM_KEY:-}" ]; then
  key_file=${TALLY_CACHE:-$HOME/.cache/tally}/run/stream-key
  [ -s "$key_file" ] || python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())' >"$key_file"
  export TALLY_STREAM_KEY=$(cat "$key_file")
fi
# The master key that wraps holders' data keys (tally_vault): one per machine, kept
# with the services' state (in production: a Secret, or a KMS).
if [ -z "${TALLY_MASTER_KEY:-}" ]; then
  master_file=${TALLY_CACHE:-$HOME/.cache/tally}/run/master-key
  [ -s "$master_file" ] || (umask 077; python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())' >"$master_file")
  export TALLY_MASTER_KEY=$(cat "$master_file")
fi
