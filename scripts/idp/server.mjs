// A standards-compliant OpenID Connect provider on 127.0.0.1 for `make stack` and the
// end-to-end tests: `oidc-provider` (npm, pinned in scripts/idp/package.json), issuing
// client-credentials access tokens as JWTs (RS256, RFC 9068) for the audience `tally`.
//
// Clients (development credentials: this provider is never exposed beyond loopback —
// in docker-compose.yml, beyond the compose network and 127.0.0.1):
//   alice, bob      accounts:read accounts:write transfers:write  (two owners)
//   reader          accounts:read
//   tally-ops       ops accounts:read
// The secret of each is `<client_id>-secret`. A token's `sub` is its client id; its
// `scope` is what the request asked for, within what the client may have.
//
//   node scripts/idp/server.mjs            listen on $IDP_PORT (default 9400)
//   env: IDP_PORT, IDP_KEYS (a file of private JWKs: created on first start, kept),
//        IDP_HOST (the address to listen on, default 127.0.0.1; docker-compose.yml: 0.0.0.0),
//        IDP_ISSUER (the issuer, the `iss` of the tokens, default http://127.0.0.1:$IDP_PORT;
//        docker-compose.yml: http://idp:9400, the name the functions reach it by)
import Provider from 'oidc-provider';
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';

const port = Number(process.env.IDP_PORT || 9400);
const host = process.env.IDP_HOST || '127.0.0.1';
const issuer = process.env.IDP_ISSUER || `http://127.0.0.1:${port}`;
const audience = process.env.IDP_AUDIENCE || 'tally';
// RFC 8707 names a resource server by an absolute URI; its tokens carry `aud: tally`.
const resource = 'urn:tally';
const keysFile = process.env.IDP_KEYS || new URL('./keys.json', import.meta.url).pathname;

const SCOPES = ['accounts:read', 'accounts:write', 'transfers:write', 'ops'];
const OWNER = 'accounts:read accounts:write transfers:write';
const clients = [
  ['alice', OWNER],
  ['bob', OWNER],
  ['reader', 'accounts:read'],
  ['tally-ops', 'ops accounts:read'],
].map(([id, scope]) => ({
  client_id: id,
  client_secret: `${id}-secret`,
  grant_types: ['client_credentials'],
  redirect_uris: [],
  response_types: [],
  token_endpoint_auth_method: 'client_secret_basic',
  scope,
}));

// The signing key survives restarts, so tokens issued before one still verify.
function signingKeys() {
  if (existsSync(keysFile)) return JSON.parse(readFileSync(keysFile, 'utf8'));
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = { ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), alg: 'RS256', use: 'sig' };
  const keys = { keys: [jwk] };
  writeFileSync(keysFile, JSON.stringify(keys), { mode: 0o600 });
  return keys;
}

const provider = new Provider(issuer, {
  clients,
  jwks: signingKeys(),
  scopes: SCOPES,
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => resource,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, asked) => {
        if (asked !== resource) throw new Error(`unknown resource ${asked}`);
        return {
          scope: SCOPES.join(' '),
          audience,
          accessTokenTTL: 3600,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  // Access tokens name the client as their subject.
  extraTokenClaims: (ctx, token) => (token.kind === 'ClientCredentials' ? { sub: token.clientId } : undefined),
});
provider.proxy = false;
provider.listen(port, host, () => {
  console.log(JSON.stringify({ msg: 'identity provider listening', host, port, issuer, audience }));
});
