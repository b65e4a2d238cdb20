//! The verifier against an issuer served on loopback by the test (discovery + JWKS),
//! with the bad-token corpus. (The end-to-end tests take their tokens from a real
//! identity provider; here the tokens are made by hand so every defect can be made.)

use super::testing::*;
use super::*;
use jsonwebtoken::EncodingKey;
use serde_json::{json, Value};

type Issuer = TestIssuer;

impl TestIssuer {
    fn verifier(&self) -> Verifier {
        Verifier::new(AuthConfig::new(&self.url, AUDIENCE))
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test]
async fn a_token_of_the_issuer_proves_its_subject_and_scopes() {
    let issuer = Issuer::start(vec![jwk(&rsa(), Algorithm::RS256, "rsa-1")]).await;
    let verifier = issuer.verifier();
    let claims = issuer.claims("client-a", "accounts:read accounts:write openid");
    let token = sign(Algorithm::RS256, Some("rsa-1"), &claims, &rsa());
    let principal = verifier
        .verify_header(Some(&format!("Bearer {token}")))
        .await
        .unwrap();
    assert_eq!(principal.subject.as_str(), "client-a");
    assert!(principal.scopes.has(Scope::AccountsRead));
    assert!(principal.scopes.has(Scope::AccountsWrite));
    assert!(!principal.scopes.has(Scope::TransfersWrite));
    assert!(!principal.scopes.has(Scope::Ops));
    assert_eq!(
        principal.caller(None),
        Caller::subject(Owner::parse("client-a").unwrap())
    );

    // `scp` as a list (some providers), and `ops` makes an operator.
    let mut claims = issuer.claims("ops-bot", "");
    claims.as_object_mut().unwrap().remove("scope");
    claims["scp"] = json!(["ops", "accounts:read"]);
    let token = sign(Algorithm::RS256, Some("rsa-1"), &claims, &rsa());
    let principal = verifier.verify(&token).await.unwrap();
    assert!(principal.scopes.has(Scope::Ops));
    assert_eq!(principal.caller(None), Caller::Operator);
    assert_eq!(issuer.fetches(), 1, "keys are cached");
}

/// The bad-token corpus: each is refused as invalid, none reaches a handler.
#[tokio::test]
async fn every_token_of_the_bad_token_corpus_is_refused() {
    let issuer = Issuer::start(vec![
        jwk(&rsa(), Algorithm::RS256, "rsa-1"),
        jwk(&ed(ED_KEY_1), Algorithm::EdDSA, "ed-1"),
    ])
    .await;
    let verifier = issuer.verifier();
    let now = jsonwebtoken::get_current_timestamp();
    let good = issuer.claims("client-a", "accounts:read");
    let with = |field: &str, value: Value| {
        let mut c = good.clone();
        c[field] = value;
        c
    };
    let without = |field: &str| {
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove(field);
        c
    };
    let rs = |claims: &Value| sign(Algorithm::RS256, Some("rsa-1"), claims, &rsa());
    let valid = rs(&good);
    assert!(verifier.verify(&valid).await.is_ok());

    let (head, rest) = valid.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let tampered_payload = b64(serde_json::to_string(&with("sub", json!("client-b")))
        .unwrap()
        .as_bytes());
    let none_header = b64(br#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#);
    let payload = b64(serde_json::to_string(&good).unwrap().as_bytes());
    let corpus: Vec<(&str, String)> = vec![
        ("expired", rs(&with("exp", json!(now - 120)))),
        ("not yet valid", rs(&with("nbf", json!(now + 120)))),
        ("wrong audience", rs(&with("aud", json!("someone-else")))),
        (
            "wrong issuer",
            rs(&with("iss", json!("https://evil.example"))),
        ),
        ("no subject", rs(&without("sub"))),
        ("no expiry", rs(&without("exp"))),
        ("no audience", rs(&without("aud"))),
        ("empty subject", rs(&with("sub", json!("")))),
        ("alg none", format!("{none_header}.{payload}.")),
        (
            "HS256 signed with the public key",
            sign(
                Algorithm::HS256,
                Some("rsa-1"),
                &good,
                &EncodingKey::from_secret(RSA_PUBLIC).unwrap(),
            ),
        ),
        (
            "unknown kid",
            sign(Algorithm::EdDSA, Some("ed-2"), &good, &ed(ED_KEY_2)),
        ),
        (
            "a known kid, another key",
            sign(Algorithm::EdDSA, Some("ed-1"), &good, &ed(ED_KEY_2)),
        ),
        (
            "a key of another algorithm",
            sign(Algorithm::EdDSA, Some("rsa-1"), &good, &ed(ED_KEY_1)),
        ),
        (
            "tampered payload",
            format!("{head}.{tampered_payload}.{signature}"),
        ),
        ("not a JWT", "not-a-token".into()),
        (
            "no kid, several keys",
            sign(Algorithm::RS256, None, &good, &rsa()),
        ),
    ];
    for (name, token) in corpus {
        match verifier.verify(&token).await {
            Err(AuthError::Invalid(why)) => eprintln!("{name}: {why}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    // Within the leeway: a token that expired a moment ago still passes.
    assert!(verifier
        .verify(&rs(&with("exp", json!(now - 5))))
        .await
        .is_ok());
    for header in [None, Some("Basic dXNlcjpwYXNz"), Some("Bearer"), Some("")] {
        assert_eq!(
            verifier.verify_header(header).await.unwrap_err(),
            AuthError::Missing,
            "{header:?}"
        );
    }
}

#[tokio::test]
async fn a_rotated_key_is_fetched_on_its_first_token_and_unknown_kids_fetch_at_a_bounded_rate() {
    let issuer = Issuer::start(vec![jwk(&ed(ED_KEY_1), Algorithm::EdDSA, "ed-1")]).await;
    let mut config = AuthConfig::new(&issuer.url, AUDIENCE);
    config.refresh_every = Duration::from_millis(300);
    let verifier = Verifier::new(config);
    let claims = issuer.claims("client-a", "accounts:read");
    // With one key, a token without a kid is checked against it.
    let token = sign(Algorithm::EdDSA, None, &claims, &ed(ED_KEY_1));
    assert!(verifier.verify(&token).await.is_ok());
    assert_eq!(issuer.fetches(), 1);

    // A flood of tokens with made-up kids: one fetch, however many tokens.
    tokio::time::sleep(Duration::from_millis(350)).await;
    for i in 0..50 {
        let forged = sign(
            Algorithm::EdDSA,
            Some(&format!("k{i}")),
            &claims,
            &ed(ED_KEY_2),
        );
        assert!(matches!(
            verifier.verify(&forged).await,
            Err(AuthError::Invalid(_))
        ));
    }
    assert_eq!(issuer.fetches(), 2);

    // The issuer rotates to a new key: its first token is accepted once the rate allows.
    issuer.publish(vec![
        jwk(&ed(ED_KEY_1), Algorithm::EdDSA, "ed-1"),
        jwk(&ed(ED_KEY_2), Algorithm::EdDSA, "ed-2"),
    ]);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let rotated = sign(Algorithm::EdDSA, Some("ed-2"), &claims, &ed(ED_KEY_2));
    assert!(verifier.verify(&rotated).await.is_ok());
    assert_eq!(issuer.fetches(), 3);
    assert!(verifier.verify(&rotated).await.is_ok());
    assert_eq!(issuer.fetches(), 3);
}

#[tokio::test]
async fn an_issuer_out_of_reach_is_unavailable_not_a_bad_token() {
    let issuer = Issuer::start(vec![]).await;
    let url = issuer.url.clone();
    let claims = issuer.claims("client-a", "accounts:read");
    drop(issuer);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let verifier = Verifier::new(AuthConfig::new(&url, AUDIENCE));
    let token = sign(Algorithm::RS256, Some("rsa-1"), &claims, &rsa());
    assert!(matches!(
        verifier.verify(&token).await,
        Err(AuthError::Unavailable(_))
    ));
    assert!(matches!(
        verifier.prefetch().await,
        Err(AuthError::Unavailable(_))
    ));
}

/// A verified token is remembered, so the next request with it costs no signature
/// check; but only while the full check would pass: not past its `exp` (plus the
/// leeway), and not once the keys are fetched again without its key.
#[tokio::test]
async fn a_verified_token_is_remembered_only_while_its_key_is_published_and_it_is_unexpired() {
    let issuer = Issuer::start(vec![
        jwk(&rsa(), Algorithm::RS256, "rsa-1"),
        jwk(&ed(ED_KEY_1), Algorithm::EdDSA, "ed-1"),
    ])
    .await;
    let mut config = AuthConfig::new(&issuer.url, AUDIENCE);
    config.refresh_every = Duration::from_millis(100);
    config.leeway = Duration::ZERO;
    let verifier = Verifier::new(config.clone());
    let claims = issuer.claims("client-a", "accounts:read");
    let token = sign(Algorithm::RS256, Some("rsa-1"), &claims, &rsa());
    let first = verifier.verify(&token).await.unwrap();
    assert_eq!(verifier.remembered_tokens(), 1);
    assert_eq!(verifier.verify(&token).await.unwrap(), first);
    assert_eq!(verifier.remembered_tokens(), 1);
    // A refused token is not remembered, and another token's text is not this one's.
    let tampered = format!("{token}x");
    assert!(verifier.verify(&tampered).await.is_err());
    assert_eq!(verifier.remembered_tokens(), 1);

    // The issuer withdraws the RSA key; a token with an unknown kid has the keys
    // fetched again, and the remembered token goes with its key.
    issuer.publish(vec![jwk(&ed(ED_KEY_1), Algorithm::EdDSA, "ed-1")]);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let unknown = sign(Algorithm::EdDSA, Some("ed-9"), &claims, &ed(ED_KEY_2));
    assert!(verifier.verify(&unknown).await.is_err());
    assert_eq!(issuer.fetches(), 2);
    match verifier.verify(&token).await {
        Err(AuthError::Invalid(why)) => assert!(why.contains("does not publish"), "{why}"),
        other => panic!("a token of a withdrawn key: {other:?}"),
    }

    // A remembered token expires as a checked one does.
    let now = jsonwebtoken::get_current_timestamp();
    let mut short = issuer.claims("client-a", "accounts:read");
    short["exp"] = json!(now + 1);
    let short = sign(Algorithm::EdDSA, Some("ed-1"), &short, &ed(ED_KEY_1));
    assert!(verifier.verify(&short).await.is_ok());
    assert!(verifier.verify(&short).await.is_ok());
    while jsonwebtoken::get_current_timestamp() <= now + 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match verifier.verify(&short).await {
        Err(AuthError::Invalid(why)) => assert!(why.contains("expired"), "{why}"),
        other => panic!("an expired remembered token: {other:?}"),
    }

    // None remembered when none are wanted.
    config.verified_tokens = 0;
    let forgetful = Verifier::new(config);
    let token = sign(Algorithm::EdDSA, Some("ed-1"), &claims, &ed(ED_KEY_1));
    assert!(forgetful.verify(&token).await.is_ok());
    assert!(forgetful.verify(&token).await.is_ok());
    assert_eq!(forgetful.remembered_tokens(), 0);
}
