#!/usr/bin/env bash
# The identity provider on 127.0.0.1: oidc-provider (npm, pinned in scripts/idp/), a
# standards-compliant OpenID Connect provider issuing client-credentials access tokens
# as JWTs for the audience `tally` (see scripts/idp/server.mjs for its clients).
#
#   scripts/idp.sh up                      install once (under $TALLY_CACHE/idp), start on :$IDP_PORT
#   scripts/idp.sh token [client] [scope]  print an access token (default: alice, her full scope)
#   scripts/idp.sh issuer                  print the issuer URL
#   scripts/idp.sh down                    stop it
set -euo pipefail

CACHE=${TALLY_CACHE:-$HOME/.cache/tally}
RUN=$CACHE/run
IDP_PORT=${IDP_PORT:-9400}
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=$CACHE/idp
ISSUER=http://127.0.0.1:$IDP_PORT
mkdir -p "$RUN"

log() { echo "idp: $*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

node_ok() {
  command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 \
    && node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a==20&&b>=19)?0:1)'
}

install() {
  if ! node_ok; then
    log "installing Node.js (apt): oidc-provider needs Node 20.19 or later"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
    node_ok || { log "Node.js 20.19 or later is needed"; exit 1; }
  fi
  mkdir -p "$DIR"
  if ! cmp -s "$HERE/idp/package-lock.json" "$DIR/package-lock.json" || [ ! -d "$DIR/node_modules/oidc-provider" ]; then
    log "installing oidc-provider into $DIR"
    cp "$HERE/idp/package.json" "$HERE/idp/package-lock.json" "$DIR/"
    (cd "$DIR" && npm ci --omit=dev --no-audit --no-fund --loglevel=error >&2)
  fi
  cp "$HERE/idp/server.mjs" "$DIR/server.mjs"
}

up() {
  install
  if port_open "$IDP_PORT"; then return; fi
  log "starting the identity provider on $ISSUER"
  IDP_PORT=$IDP_PORT IDP_KEYS=$RUN/idp-keys.json nohup node "$DIR/server.mjs" >"$RUN/idp.log" 2>&1 &
  echo $! >"$RUN/idp.pid"
  for _ in $(seq 1 100); do
    if curl -fsS "$ISSUER/.well-known/openid-configuration" >/dev/null 2>&1; then return; fi
    sleep 0.1
  done
  log "the identity provider did not come up (see $RUN/idp.log)"; exit 1
}

# What each client asks for when no scope is given: all it may have (server.mjs).
full_scope() {
  case "$1" in
    alice|bob) echo "accounts:read accounts:write transfers:write" ;;
    reader) echo "accounts:read" ;;
    tally-ops) echo "ops accounts:read" ;;
    *) echo "" ;;
  esac
}

token() { # client, scope
  local client=${1:-alice}
  local scope=${2:-$(full_scope "$client")}
  port_open "$IDP_PORT" || { log "the identity provider is not up: scripts/idp.sh up"; exit 1; }
  local body
  body=$(curl -sS -u "$client:$client-secret" -d grant_type=client_credentials \
    --data-urlencode "scope=$scope" "$ISSUER/token")
  python3 -c '
import json, sys
answer = json.load(sys.stdin)
if "access_token" not in answer:
    sys.exit("idp: refused: %s" % answer)
print(answer["access_token"])' <<<"$body"
}

case "${1:-up}" in
  up) up ;;
  token) shift; token "$@" ;;
  issuer) echo "$ISSUER" ;;
  down)
    if [ -f "$RUN/idp.pid" ]; then kill "$(cat "$RUN/idp.pid")" 2>/dev/null || true; rm -f "$RUN/idp.pid"; fi ;;
  *) echo "usage: $0 up|token [client] [scope]|issuer|down" >&2; exit 2 ;;
esac
