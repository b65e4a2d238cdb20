//! An issuer on loopback for tests (feature `testing`): its discovery document and a
//! JWKS the test can change, and tokens signed with its test keys — every kind of
//! defect included, for bad-token corpora. End-to-end tests take their tokens from a
//! real identity provider instead (`scripts/idp.sh`); this is for unit and HTTP-level
//! tests, which need tokens no provider would issue.

use axum::routing::get;
use axum::Json;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// An RSA private key (PKCS#8 PEM) for tests only.
pub const RSA_KEY: &[u8] = include_bytes!("rsa-test-key.pem");
/// Its public key (SPKI PEM): what an attacker would use as an HMAC secret.
pub const RSA_PUBLIC: &[u8] = include_bytes!("rsa-test-key.pub.pem");
/// Two Ed25519 private keys for tests only.
pub const ED_KEY_1: &[u8] = include_bytes!("ed25519-test-key-1.pem");
pub const ED_KEY_2: &[u8] = include_bytes!("ed25519-test-key-2.pem");

/// The audience test tokens name.
pub const AUDIENCE: &str = "tally";

/// The RSA test key.
pub fn rsa() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_KEY).expect("the test key parses")
}

/// An Ed25519 test key.
pub fn ed(pem: &[u8]) -> EncodingKey {
    EncodingKey::from_ed_pem(pem).expect("the test key parses")
}

/// The public JWK of `key`, named `kid`.
pub fn jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Value {
    let mut jwk = Jwk::from_encoding_key(key, alg).expect("a JWK of the test key");
    jwk.common.key_id = Some(kid.into());
    serde_json::to_value(jwk).expect("a JWK serializes")
}

/// Sign `claims` with `key` under `alg`, naming `kid`.
pub fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, key).expect("the test token signs")
}

/// An issuer on loopback.
pub struct TestIssuer {
    pub url: String,
    jwks: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl TestIssuer {
    /// Serve `keys` (public JWKs) as the issuer's JWKS.
    pub async fn start(keys: Vec<Value>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("an address"));
        let jwks = Arc::new(Mutex::new(json!({ "keys": keys })));
        let fetches = Arc::new(AtomicUsize::new(0));
        let discovery = json!({"issuer": url, "jwks_uri": format!("{url}/jwks")});
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(move || async move { Json(discovery) }),
            )
            .route(
                "/jwks",
                get({
                    let (jwks, fetches) = (jwks.clone(), fetches.clone());
                    move || async move {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        Json(jwks.lock().expect("jwks").clone())
                    }
                }),
            );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            jwks,
            fetches,
            server,
        }
    }

    /// The issuer with the RSA test key published as `rsa-1`.
    pub async fn with_rsa() -> Self {
        Self::start(vec![jwk(&rsa(), Algorithm::RS256, "rsa-1")]).await
    }

    /// Publish `keys` from now on.
    pub fn publish(&self, keys: Vec<Value>) {
        *self.jwks.lock().expect("jwks") = json!({ "keys": keys });
    }

    /// How many times the JWKS was fetched.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Claims that pass, for `sub` with `scope`, valid for five minutes.
    pub fn claims(&self, sub: &str, scope: &str) -> Value {
        let now = jsonwebtoken::get_current_timestamp();
        json!({"iss": self.url, "aud": AUDIENCE, "sub": sub, "scope": scope,
               "iat": now, "nbf": now, "exp": now + 300})
    }

    /// A valid RS256 token (key `rsa-1`) for `sub` with `scope`.
    pub fn token(&self, sub: &str, scope: &str) -> String {
        sign(
            Algorithm::RS256,
            Some("rsa-1"),
            &self.claims(sub, scope),
            &rsa(),
        )
    }
}

impl Drop for TestIssuer {
    fn drop(&mut self) {
        self.server.abort();
    }
}
