#!/usr/bin/env bash
# Provision the services the tests and `make stack` use, all on 127.0.0.1, and print
# the environment that points at them (eval "$(scripts/services.sh env)").
#
#   scripts/services.sh up     install what is missing, start what is stopped
#   scripts/services.sh env    print the TALLY_TEST_* variables
#   scripts/services.sh down   stop the S3 and Kafka servers this script started
#
# PostgreSQL and Redis are the machine's own (Debian packages, started if stopped,
# installed if absent). The S3 server is moto (PyPI, in a virtualenv) run by
# scripts/moto-server, whose conditional writes are atomic; the Kafka-protocol broker is
# tansu (crates.io), with in-memory storage here (the tests that restart a broker start
# their own, on SQLite or S3 storage). Both are installed once under $TALLY_CACHE
# (default ~/.cache/tally) and reused by later runs. The identity provider (OpenID
# Connect, client credentials) is oidc-provider from npm, run by scripts/idp.sh.
set -euo pipefail

CACHE=${TALLY_CACHE:-$HOME/.cache/tally}
RUN=$CACHE/run
S3_PORT=${TALLY_S3_PORT:-4566}
KAFKA_PORT=${TALLY_KAFKA_PORT:-9092}
TANSU_VERSION=0.6.0
MOTO_VERSION=5.2.5
mkdir -p "$CACHE" "$RUN"

log() { echo "services: $*" >&2; }

have() { command -v "$1" >/dev/null 2>&1; }

apt_install() {
  if ! have apt-get; then log "cannot install $*: no apt-get"; return 1; fi
  log "installing $* (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

wait_for() { # name, command...
  local name=$1; shift
  for _ in $(seq 1 100); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  log "$name did not come up"; return 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

postgres_up() {
  if ! have pg_ctlcluster; then apt_install postgresql postgresql-client; fi
  if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    log "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
    wait_for PostgreSQL pg_isready -h 127.0.0.1 -p 5432 -q
  fi
  psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'select 1' >/dev/null \
    || { log "PostgreSQL at 127.0.0.1:5432 does not let user postgres in (trust auth expected)"; return 1; }
}

redis_up() {
  if ! have redis-server; then apt_install redis-server; fi
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    log "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_for Redis redis-cli -h 127.0.0.1 -p 6379 ping
  fi
}

moto_bin() { echo "$CACHE/venv/bin/moto_server"; }
# moto's own server lets two conditional creates of one key both succeed when they
# arrive together; scripts/moto-server serializes its writes (see moto_server.py).
MOTO_KIND=serialized-writes-2
moto_launcher() { echo "$(cd "$(dirname "$0")" && pwd)/moto-server"; }

moto_install() {
  if [ -x "$(moto_bin)" ]; then return; fi
  log "installing moto $MOTO_VERSION (S3 server) into $CACHE/venv"
  python3 -m venv "$CACHE/venv"
  "$CACHE/venv/bin/pip" install -q "moto[s3]==$MOTO_VERSION" flask flask-cors
}

# SQLite storage (libsql) lets a test kill the broker and start it again without losing
# what it acknowledged; the S3 storage (dynostore) stays for the older tests.
TANSU_FEATURES=dynostore,libsql
tansu_bin() { echo "$CACHE/tansu-$TANSU_VERSION-${TANSU_FEATURES//,/-}/bin/tansu"; }

tansu_install() {
  if [ -x "$(tansu_bin)" ]; then return; fi
  log "installing tansu $TANSU_VERSION (Kafka-protocol broker) into $(dirname "$(dirname "$(tansu_bin)")"); this takes about 10 minutes once"
  cargo install tansu --version "$TANSU_VERSION" --locked --features "$TANSU_FEATURES" \
    --root "$(dirname "$(dirname "$(tansu_bin)")")" >&2
}

start_bg() { # name, pidfile, command...
  local name=$1 pidfile=$2; shift 2
  nohup "$@" >"$RUN/$name.log" 2>&1 &
  echo $! >"$pidfile"
}

moto_up() {
  moto_install
  if port_open "$S3_PORT" && [ "$(cat "$RUN/moto.kind" 2>/dev/null)" != "$MOTO_KIND" ] && [ -f "$RUN/moto.pid" ]; then
    log "restarting the S3 server on :$S3_PORT with serialized writes"
    kill "$(cat "$RUN/moto.pid")" 2>/dev/null || true
    for _ in $(seq 1 50); do port_open "$S3_PORT" || break; sleep 0.1; done
  fi
  if ! port_open "$S3_PORT"; then
    log "starting moto on 127.0.0.1:$S3_PORT"
    # Its access log in UTC: `tally-bench load --s3-log` reads the times as such.
    TZ=UTC TALLY_CACHE=$CACHE start_bg moto "$RUN/moto.pid" "$(moto_launcher)" -H 127.0.0.1 -p "$S3_PORT"
    echo "$MOTO_KIND" >"$RUN/moto.kind"
    wait_for moto port_open "$S3_PORT"
  fi
}

tansu_up() {
  tansu_install
  if ! port_open "$KAFKA_PORT"; then
    log "starting tansu on 127.0.0.1:$KAFKA_PORT"
    start_bg tansu "$RUN/tansu.pid" "$(tansu_bin)" broker \
      --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --storage-engine memory://tansu/
    wait_for tansu port_open "$KAFKA_PORT"
  fi
}

print_env() {
  cat <<ENV
export TALLY_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres
export TALLY_TEST_REDIS_URL=redis://127.0.0.1:6379
export TALLY_TEST_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
export TALLY_TEST_S3_LOG=$RUN/moto.log
export TALLY_TEST_KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT
export TALLY_TANSU_BIN=$(tansu_bin)
export TALLY_REDIS_SERVER_BIN=$(command -v redis-server)
export TALLY_MOTO_BIN=$(moto_launcher)
export TALLY_TEST_S3_SERVER='moto $MOTO_VERSION'
export TALLY_TEST_BROKER='tansu $TANSU_VERSION (memory storage)'
export TALLY_TEST_OIDC_ISSUER=$("$(dirname "$0")/idp.sh" issuer)
ENV
}

case "${1:-up}" in
  up)
    postgres_up
    redis_up
    moto_up
    tansu_up
    "$(dirname "$0")/idp.sh" up
    log "ready: PostgreSQL :5432, Redis :6379, S3 (moto) :$S3_PORT, Kafka (tansu) :$KAFKA_PORT, OpenID Connect provider $("$(dirname "$0")/idp.sh" issuer)"
    ;;
  env) print_env ;;
  down)
    for name in moto tansu; do
      if [ -f "$RUN/$name.pid" ]; then kill "$(cat "$RUN/$name.pid")" 2>/dev/null || true; rm -f "$RUN/$name.pid"; fi
    done
    "$(dirname "$0")/idp.sh" down
    ;;
  *) echo "usage: $0 up|env|down" >&2; exit 2 ;;
esac
