//! `tally-auth`: who is asking.
//!
//! Every function checks `Authorization: Bearer <JWT>` itself, in-process — a gateway
//! or an ingress may check too, but nothing relies on it. A [`Verifier`] holds one
//! issuer's signing keys, read from the JWKS its OpenID Connect discovery document
//! names (`{issuer}/.well-known/openid-configuration` → `jwks_uri`), and:
//!
//! * accepts only asymmetric algorithms ([`ALGORITHMS`]: never `none`, never an HMAC
//!   algorithm, so a token signed with the public key as an HMAC secret is refused),
//!   and only with a key of the token's algorithm;
//! * finds the key by the token's `kid`; an unknown `kid` makes it fetch the JWKS
//!   again (the issuer rotated its keys), at most once per [`AuthConfig::refresh_every`];
//!   keys older than [`AuthConfig::max_key_age`] are fetched again on the next token;
//! * checks `iss`, `aud`, `exp` and `nbf` (with [`AuthConfig::leeway`]) and requires
//!   `sub`, `exp`, `iss` and `aud` (the `jsonwebtoken` crate does the JOSE);
//! * reads the scopes from `scope` (space-separated, RFC 8693/9068) or `scp` (a list);
//! * remembers the tokens it verified ([`AuthConfig::verified_tokens`] of them, least
//!   recently used out first), so a client's next request with the same token costs a
//!   lookup, not a signature check: a remembered token is taken only with the very key
//!   set it was checked against (any fetch of the keys forgets them all) and only until
//!   its `exp` plus the leeway, as the full check would.
//!
//! What a token proves is a [`Principal`]: its subject (the owner of the accounts it
//! opens) and its [`Scopes`].

use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};
use tally_domain::{Caller, Owner};
use tokio::sync::{Mutex, RwLock};

/// The algorithms a token may be signed with: asymmetric only.
pub const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// What a scope allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Read accounts, balances, history, statements and transfers one owns.
    AccountsRead,
    /// Open, deposit to, withdraw from and close accounts one owns.
    AccountsWrite,
    /// Move money out of accounts one owns.
    TransfersWrite,
    /// Operations: every account, the projector's and the relay's routes.
    Ops,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 4] = [
        Scope::AccountsRead,
        Scope::AccountsWrite,
        Scope::TransfersWrite,
        Scope::Ops,
    ];

    /// The scope's name in tokens.
    pub fn name(self) -> &'static str {
        match self {
            Self::AccountsRead => "accounts:read",
            Self::AccountsWrite => "accounts:write",
            Self::TransfersWrite => "transfers:write",
            Self::Ops => "ops",
        }
    }

    /// The scope of a name, if it is one of Tally's.
    pub fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of scopes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    /// Every scope (authentication off).
    pub fn all() -> Self {
        Self::ALL_BITS
    }

    const ALL_BITS: Scopes = Scopes(0b1111);

    /// The scopes named in a space-separated list; names that are not Tally's are
    /// ignored.
    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        Self(
            names
                .into_iter()
                .filter_map(Scope::named)
                .fold(0, |bits, s| bits | s.bit()),
        )
    }

    /// Whether `scope` is in the set.
    pub fn has(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }
}

impl<const N: usize> From<[Scope; N]> for Scopes {
    fn from(scopes: [Scope; N]) -> Self {
        Self(scopes.into_iter().fold(0, |bits, s| bits | s.bit()))
    }
}

/// What a valid token proves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub subject: Owner,
    pub scopes: Scopes,
}

impl Principal {
    /// The caller this principal is: an operator with `ops`, else its subject (the
    /// legacy owner if it is `legacy_owner`).
    pub fn caller(&self, legacy_owner: Option<&Owner>) -> Caller {
        if self.scopes.has(Scope::Ops) {
            return Caller::Operator;
        }
        Caller::Subject {
            legacy: legacy_owner == Some(&self.subject),
            owner: self.subject.clone(),
        }
    }
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header: a 401 without an error code (RFC 6750 §3.1).
    #[error("this route needs a bearer token (Authorization: Bearer <JWT>)")]
    Missing,
    /// A token that does not prove anything: a 401 with `invalid_token`.
    #[error("invalid bearer token: {0}")]
    Invalid(String),
    /// The issuer's keys could not be fetched: a 503, nothing is decided.
    #[error("the identity provider's signing keys are out of reach: {0}")]
    Unavailable(String),
}

/// How tokens are checked.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// The `iss` every token must carry; the discovery document is under it.
    pub issuer: String,
    /// The `aud` every token must carry (one of).
    pub audience: String,
    /// Where the discovery document is, if not under the issuer (a provider reached by
    /// another name inside the cluster than the one in its tokens).
    pub discovery_url: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// At most one JWKS fetch per this long for unknown `kid`s.
    pub refresh_every: Duration,
    /// Keys fetched longer ago than this are fetched again on the next token.
    pub max_key_age: Duration,
    /// How many verified tokens are remembered (0: every request checks its token's
    /// signature). A client sends the same token until it expires; an RSA signature
    /// check costs tens of microseconds, a lookup well under one.
    pub verified_tokens: usize,
}

impl AuthConfig {
    /// Defaults for `issuer` and `audience`: 30 s leeway, a refresh at most every 10 s,
    /// keys kept 15 minutes, [`DEFAULT_VERIFIED_TOKENS`] tokens remembered.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            discovery_url: None,
            leeway: Duration::from_secs(30),
            refresh_every: Duration::from_secs(10),
            max_key_age: Duration::from_secs(15 * 60),
            verified_tokens: DEFAULT_VERIFIED_TOKENS,
        }
    }

    fn discovery(&self) -> String {
        self.discovery_url.clone().unwrap_or_else(|| {
            format!(
                "{}/.well-known/openid-configuration",
                self.issuer.trim_end_matches('/')
            )
        })
    }
}

/// [`AuthConfig::verified_tokens`]' default: a few kilobytes each at most (the token,
/// its subject and scopes), a few megabytes in all.
pub const DEFAULT_VERIFIED_TOKENS: usize = 4096;

struct Key {
    key: DecodingKey,
    /// The algorithm the JWK pins, if it does.
    algorithm: Option<Algorithm>,
}

#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Key>,
    /// The key of a set with exactly one, for tokens without a `kid`.
    only: Option<String>,
    fetched_at: Option<Instant>,
    /// Counts the fetches: a remembered token names the set it was checked against.
    generation: u64,
}

/// A token that verified: what it proves, until when, against which key set.
struct Verified {
    principal: Principal,
    /// Its `exp` plus the leeway, in seconds since the epoch: past it, the full check
    /// refuses the token.
    until: u64,
    generation: u64,
}

/// Checks bearer tokens of one issuer. Cheap to share (`Arc`).
pub struct Verifier {
    config: AuthConfig,
    http: reqwest::Client,
    keys: RwLock<KeySet>,
    /// Held while fetching (one fetch at a time): when the last attempt was, and why
    /// it failed if it did.
    fetching: Mutex<Option<(Instant, Option<String>)>>,
    /// The tokens verified lately, by their text; `None` when none are remembered.
    verified: Option<std::sync::Mutex<lru::LruCache<String, Verified>>>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    /// Required by the validation; a number of seconds, possibly with a fraction.
    #[serde(default)]
    exp: Option<f64>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

impl Verifier {
    /// A verifier for `config`; keys are fetched on first use.
    pub fn new(config: AuthConfig) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client with a timeout builds");
        Self {
            verified: std::num::NonZeroUsize::new(config.verified_tokens)
                .map(|n| std::sync::Mutex::new(lru::LruCache::new(n))),
            config,
            http,
            keys: RwLock::new(KeySet::default()),
            fetching: Mutex::new(None),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// Fetch the keys now (at start-up: a provider out of reach is said at once).
    pub async fn prefetch(&self) -> Result<usize, AuthError> {
        self.refresh(None).await?;
        Ok(self.keys.read().await.keys.len())
    }

    /// Check an `Authorization` header's value.
    pub async fn verify_header(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let (scheme, token) = header.trim().split_once(' ').ok_or(AuthError::Missing)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Missing);
        }
        self.verify(token.trim()).await
    }

    /// Check a token.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        if let Some(principal) = self.remembered(token).await {
            return Ok(principal);
        }
        let invalid = |why: &str| AuthError::Invalid(why.to_owned());
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("not a signed JWT ({e})")))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        self.refresh_if_old().await?;
        let (claims, generation) = match self.check(token, &header).await? {
            Some(checked) => checked,
            None => {
                // An unknown key: the issuer may have rotated. Fetch again, at a
                // bounded rate, and look once more.
                self.refresh(header.kid.as_deref()).await?;
                self.check(token, &header)
                    .await?
                    .ok_or_else(|| invalid("signed with a key the issuer does not publish"))?
            }
        };
        let subject =
            Owner::parse(&claims.sub).map_err(|e| AuthError::Invalid(format!("`sub`: {e}")))?;
        let scopes = match (&claims.scope, &claims.scp) {
            (Some(scope), _) => Scopes::parse(scope.split_whitespace()),
            (None, Some(scp)) => Scopes::parse(scp.iter().map(String::as_str)),
            (None, None) => Scopes::default(),
        };
        let principal = Principal { subject, scopes };
        self.remember(token, &principal, claims.exp, generation);
        Ok(principal)
    }

    /// How many verified tokens are remembered now.
    pub fn remembered_tokens(&self) -> usize {
        self.verified
            .as_ref()
            .and_then(|v| v.lock().ok().map(|v| v.len()))
            .unwrap_or(0)
    }

    /// What `token` proves, if it verified against the key set held now, before its
    /// `exp` plus the leeway, and the keys are not due to be fetched again.
    async fn remembered(&self, token: &str) -> Option<Principal> {
        let verified = self.verified.as_ref()?;
        let generation = {
            let keys = self.keys.read().await;
            let fresh = keys
                .fetched_at
                .is_some_and(|at| at.elapsed() <= self.config.max_key_age);
            // Keys due to be fetched again: the full path fetches them.
            fresh.then_some(keys.generation)?
        };
        let mut verified = verified.lock().ok()?;
        let hit = verified.get(token)?;
        if hit.generation == generation && jsonwebtoken::get_current_timestamp() <= hit.until {
            return Some(hit.principal.clone());
        }
        verified.pop(token);
        None
    }

    /// Remember that `token` proved `principal` against key set `generation`, until
    /// its `exp` (without one, it is not remembered).
    fn remember(&self, token: &str, principal: &Principal, exp: Option<f64>, generation: u64) {
        let (Some(verified), Some(exp)) = (&self.verified, exp) else {
            return;
        };
        if !exp.is_finite() || exp < 0.0 {
            return;
        }
        // Whole seconds, as the check compares them.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let exp = exp.floor() as u64;
        let until = exp.saturating_add(self.config.leeway.as_secs());
        if let Ok(mut verified) = verified.lock() {
            verified.put(
                token.to_owned(),
                Verified {
                    principal: principal.clone(),
                    until,
                    generation,
                },
            );
        }
    }

    /// Check the token against the key its header names: its claims and the key set's
    /// generation; `None` if no such key is known.
    async fn check(
        &self,
        token: &str,
        header: &jsonwebtoken::Header,
    ) -> Result<Option<(Claims, u64)>, AuthError> {
        let keys = self.keys.read().await;
        let kid = match (&header.kid, &keys.only) {
            (Some(kid), _) => kid,
            (None, Some(only)) => only,
            (None, None) => return Err(AuthError::Invalid("no `kid` in the header".into())),
        };
        let Some(key) = keys.keys.get(kid) else {
            return Ok(None);
        };
        if key.algorithm.is_some_and(|a| a != header.alg) {
            return Err(AuthError::Invalid(format!(
                "key {kid} is for another algorithm than {:?}",
                header.alg
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.config.leeway.as_secs();
        jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
            .map(|data| Some((data.claims, keys.generation)))
            .map_err(|e| AuthError::Invalid(describe(&e)))
    }

    /// Fetch the keys if none are held (an error: nothing can be checked), or if they
    /// are older than `max_key_age` (an error keeps the ones held).
    async fn refresh_if_old(&self) -> Result<(), AuthError> {
        let fetched_at = self.keys.read().await.fetched_at;
        match fetched_at {
            None => self.refresh(None).await,
            Some(at) if at.elapsed() > self.config.max_key_age => {
                if let Err(e) = self.refresh(None).await {
                    tracing::warn!(error = %e, "could not fetch the issuer's keys again; keeping the ones held");
                }
                Ok(())
            }
            Some(_) => Ok(()),
        }
    }

    /// Fetch the JWKS again, unless an attempt was made less than `refresh_every` ago
    /// (then what is held stands, or that attempt's failure) — and, for an unknown
    /// `kid`, unless another task fetched it meanwhile.
    async fn refresh(&self, kid: Option<&str>) -> Result<(), AuthError> {
        let mut last = self.fetching.lock().await;
        {
            let keys = self.keys.read().await;
            if kid.is_some_and(|kid| keys.keys.contains_key(kid)) {
                return Ok(());
            }
            if let Some((at, failure)) = last.as_ref() {
                if at.elapsed() < self.config.refresh_every {
                    return match (keys.fetched_at, failure) {
                        (None, Some(failure)) => Err(AuthError::Unavailable(failure.clone())),
                        _ => Ok(()),
                    };
                }
            }
        }
        let set = match self.fetch().await {
            Ok(set) => set,
            Err(e) => {
                *last = Some((Instant::now(), Some(e.to_string())));
                return Err(e);
            }
        };
        *last = Some((Instant::now(), None));
        // Under `fetching`, so no other fetch moves the generation meanwhile.
        let generation = self.keys.read().await.generation + 1;
        let mut keys = KeySet {
            fetched_at: Some(Instant::now()),
            generation,
            ..KeySet::default()
        };
        for jwk in &set.keys {
            if let Some((kid, key)) = usable(jwk) {
                keys.keys.insert(kid, key);
            }
        }
        if keys.keys.len() == 1 {
            keys.only = keys.keys.keys().next().cloned();
        }
        tracing::info!(keys = keys.keys.len(), issuer = %self.config.issuer, "signing keys fetched");
        *self.keys.write().await = keys;
        Ok(())
    }

    async fn fetch(&self) -> Result<JwkSet, AuthError> {
        let unavailable =
            |what: &str, e: &dyn fmt::Display| AuthError::Unavailable(format!("{what}: {e}"));
        let discovery_url = self.config.discovery();
        let discovery: Discovery = self
            .get(&discovery_url)
            .await
            .map_err(|e| unavailable(&discovery_url, &e))?;
        if discovery.issuer.trim_end_matches('/') != self.config.issuer.trim_end_matches('/') {
            return Err(AuthError::Unavailable(format!(
                "the discovery document names issuer {}, not {}",
                discovery.issuer, self.config.issuer
            )));
        }
        self.get(&discovery.jwks_uri)
            .await
            .map_err(|e| unavailable(&discovery.jwks_uri, &e))
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, reqwest::Error> {
        self.http
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
    }
}

/// A JWK that can verify signatures: public, for signing, of an accepted algorithm.
fn usable(jwk: &Jwk) -> Option<(String, Key)> {
    let kid = jwk.common.key_id.clone()?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let algorithm = match &jwk.common.key_algorithm {
        Some(a) => Some(a.to_string().parse::<Algorithm>().ok()?),
        None => None,
    };
    if algorithm.is_some_and(|a| !ALGORITHMS.contains(&a)) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((kid, Key { key, algorithm }))
}

/// A validation failure in a client's words.
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "the token has expired".into(),
        K::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        K::InvalidIssuer => "the token is from another issuer".into(),
        K::InvalidAudience => "the token is for another audience".into(),
        K::InvalidSignature => "the signature does not verify".into(),
        K::InvalidAlgorithm => "the algorithm does not match the key".into(),
        K::MissingRequiredClaim(claim) => format!("the token has no `{claim}`"),
        _ => format!("the token does not verify ({e})"),
    }
}

#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;
