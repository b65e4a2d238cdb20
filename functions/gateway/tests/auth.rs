//! Who may do what, over real HTTP: the gateway (and the projector's operations
//! routes) with bearer tokens required, against an issuer on loopback whose tokens the
//! test signs by hand — so that every defect of the bad-token corpus can be made. (The
//! end-to-end tests on `make stack` get theirs from a real identity provider.)

use jsonwebtoken::Algorithm;
use serde_json::{json, Value};
use std::path::Path;
use tally_auth::testing::{ed, jwk, rsa, sign, TestIssuer, ED_KEY_1, ED_KEY_2, RSA_PUBLIC};
use tally_es::{Revision, StreamId};
use tally_host::Host;
use tally_testkit::cases::Api;

const ALL: &str = "accounts:read accounts:write transfers:write";

struct Served {
    api: Api,
    host: Host,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// `app` on a loopback port.
async fn serve(app: axum::Router, host: Host) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = Api::new(format!("http://{}", listener.local_addr().unwrap()));
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Served { api, host, server }
}

/// The gateway over `dir` with tokens of `issuer` required (and `legacy` owning the
/// accounts opened before owners).
async fn gateway(dir: &Path, issuer: &TestIssuer, legacy: Option<&str>) -> Served {
    let mut config = tally_host::Config::with_data_dir(dir);
    config.auth_issuer = Some(issuer.url.clone());
    config.auth_legacy_owner = legacy.map(str::to_owned);
    let host = Host::build(&config, tally_host::Role::Gateway)
        .await
        .unwrap();
    host.start_projection().await.unwrap();
    host.start_saga().await.unwrap();
    serve(tally_host::gateway_app(&host), host.clone()).await
}

/// Every commit of every stream in the store, as bytes: what "nothing was written"
/// is checked against.
async fn everything(host: &Host) -> Vec<Vec<u8>> {
    let mut all = vec![];
    for stream in host.store.streams().await.unwrap() {
        for commit in host.store.read(&stream, Revision::new(1)).await.unwrap() {
            all.push(commit.to_bytes());
        }
    }
    all
}

fn problem_type(body: &Value) -> &str {
    body["type"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_valid_token_nothing_is_answered_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::start(vec![
        jwk(&rsa(), Algorithm::RS256, "rsa-1"),
        jwk(&ed(ED_KEY_1), Algorithm::EdDSA, "ed-1"),
    ])
    .await;
    let gw = gateway(dir.path(), &issuer, None).await;
    let alice = gw.api.with_token(issuer.token("alice", ALL));
    assert_eq!(alice.post("/accounts", r#"{"ID": "acc-a"}"#).await.0, 201);
    assert_eq!(
        alice
            .post("/accounts/acc-a/deposit", r#"{"Amount": 10}"#)
            .await
            .0,
        200
    );
    let before = everything(&gw.host).await;

    // No token at all: 401 with a bare challenge (RFC 6750 §3.1), on every route.
    let (s, body, headers) = gw
        .api
        .send(
            "POST",
            "/accounts/acc-a/withdraw",
            Some(r#"{"Amount": 1}"#),
            &[],
        )
        .await;
    assert_eq!(
        (s, problem_type(&body)),
        (401, "/problems/unauthenticated"),
        "{body}"
    );
    assert_eq!(headers["www-authenticate"], r#"Bearer realm="tally""#);
    for path in ["/accounts/acc-a", "/accounts/acc-a/balance", "/transfers/x"] {
        assert_eq!(gw.api.get(path).await.0, 401, "{path}");
    }
    // Health, readiness and metrics stay open.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(gw.api.get(path).await.0, 200, "{path}");
    }

    // The bad-token corpus, each on a withdrawal from alice's account.
    let now = jsonwebtoken::get_current_timestamp();
    let good = issuer.claims("alice", ALL);
    let with = |field: &str, value: Value| {
        let mut c = good.clone();
        c[field] = value;
        c
    };
    let rs = |claims: &Value| sign(Algorithm::RS256, Some("rsa-1"), claims, &rsa());
    let valid = rs(&good);
    let (head, rest) = valid.split_once('.').unwrap();
    let signature = rest.split_once('.').unwrap().1;
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let corpus = [
        ("expired", rs(&with("exp", json!(now - 120)))),
        ("not yet valid", rs(&with("nbf", json!(now + 120)))),
        ("wrong audience", rs(&with("aud", json!("another-api")))),
        (
            "wrong issuer",
            rs(&with("iss", json!("https://idp.invalid"))),
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&good)
            ),
        ),
        (
            "HS256 signed with the public key",
            sign(
                Algorithm::HS256,
                Some("rsa-1"),
                &good,
                &jsonwebtoken::EncodingKey::from_secret(RSA_PUBLIC).unwrap(),
            ),
        ),
        (
            "unknown kid",
            sign(Algorithm::EdDSA, Some("ed-2"), &good, &ed(ED_KEY_2)),
        ),
        (
            "tampered payload",
            format!("{head}.{}.{signature}", b64(&with("sub", json!("mallory")))),
        ),
        ("garbage", "not.a.token".to_owned()),
    ];
    for (name, token) in corpus {
        let (s, body, headers) = gw
            .api
            .with_token(token)
            .send(
                "POST",
                "/accounts/acc-a/withdraw",
                Some(r#"{"Amount": 5}"#),
                &[],
            )
            .await;
        assert_eq!(
            (s, problem_type(&body)),
            (401, "/problems/unauthenticated"),
            "{name}: {body}"
        );
        assert_eq!(
            headers["www-authenticate"], r#"Bearer realm="tally", error="invalid_token""#,
            "{name}"
        );
    }
    assert_eq!(everything(&gw.host).await, before, "the store is unchanged");
    let (_, b) = alice.get("/accounts/acc-a/balance").await;
    assert_eq!(b["balance"], "10.00");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_is_its_openers_and_other_subjects_are_told_it_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::with_rsa().await;
    let gw = gateway(dir.path(), &issuer, None).await;
    let alice = gw.api.with_token(issuer.token("alice", ALL));
    let bob = gw.api.with_token(issuer.token("bob", ALL));
    let (s, b, _) = alice
        .send(
            "POST",
            "/accounts",
            Some(r#"{"ID": "acc-a"}"#),
            &[("idempotency-key", "open-1")],
        )
        .await;
    assert_eq!(s, 201, "{b}");
    alice
        .post("/accounts/acc-a/deposit", r#"{"Amount": 50}"#)
        .await;
    assert_eq!(bob.post("/accounts", r#"{"ID": "acc-b"}"#).await.0, 201);
    let before = everything(&gw.host).await;

    // Bob learns of alice's account exactly what he learns of one that does not exist.
    for id in ["acc-a", "no-such-account"] {
        let reads = [
            format!("/accounts/{id}"),
            format!("/accounts/{id}/balance"),
            format!("/accounts/{id}/balance?min_revision=99"),
            format!("/accounts/{id}/balance?as_of_revision=1"),
            format!("/accounts/{id}/transactions"),
            format!("/accounts/{id}/statement?from=2026-01-01&to=2026-12-31"),
        ];
        for path in &reads {
            let (s, body) = bob.get(path).await;
            assert_eq!(
                (s, problem_type(&body)),
                (404, "/problems/account-not-found"),
                "{path}: {body}"
            );
        }
        for (path, body) in [
            (format!("/accounts/{id}/withdraw"), r#"{"Amount": 1}"#),
            (format!("/accounts/{id}/deposit"), r#"{"Amount": 1}"#),
            (format!("/accounts/{id}/close"), ""),
        ] {
            let (s, b, _) = bob
                .send("POST", &path, Some(body), &[("if-match", "\"2\"")])
                .await;
            assert_eq!(
                (s, problem_type(&b)),
                (404, "/problems/account-not-found"),
                "{path}: {b}"
            );
        }
        let transfer = json!({"from": id, "to": "acc-b", "amount": "1.00"}).to_string();
        let (s, b, _) = bob
            .send(
                "POST",
                "/transfers",
                Some(&transfer),
                &[("idempotency-key", "t-1")],
            )
            .await;
        assert_eq!(
            (s, problem_type(&b)),
            (404, "/problems/account-not-found"),
            "{b}"
        );
    }
    // Opening names the client's chosen id: taken is taken, whoever asks — and alice's
    // idempotency key does not hand bob alice's answer.
    let (s, b, _) = bob
        .send(
            "POST",
            "/accounts",
            Some(r#"{"ID": "acc-a"}"#),
            &[("idempotency-key", "open-1")],
        )
        .await;
    assert!(matches!(s, 409 | 422), "{s} {b}");
    assert_eq!(everything(&gw.host).await, before, "bob changed nothing");

    // Alice still does what she likes with hers; an operator reaches every account.
    let (s, b) = alice
        .post("/accounts/acc-a/withdraw", r#"{"Amount": 20}"#)
        .await;
    assert_eq!((s, b["balance"].as_str()), (200, Some("30.00")), "{b}");
    let ops = gw
        .api
        .with_token(issuer.token("ops-bot", "ops accounts:read"));
    let (s, b) = ops.get("/accounts/acc-a/balance?min_revision=3").await;
    assert_eq!((s, b["balance"].as_str()), (200, Some("30.00")), "{b}");
    assert_eq!(ops.get("/accounts/acc-b").await.0, 200);
    // Forgetting a holder: never for another subject; for the owner, or `ops` alone.
    assert_eq!(bob.post("/accounts/acc-a/forget", "").await.0, 404);
    let ops_only = gw.api.with_token(issuer.token("ops-bot", "ops"));
    let (s, b) = ops_only.post("/accounts/acc-a/forget", "").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(alice.post("/accounts/acc-b/forget", "").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_scope_is_a_403_on_ones_own_account_and_a_404_on_anothers() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::with_rsa().await;
    let gw = gateway(dir.path(), &issuer, None).await;
    let alice = gw.api.with_token(issuer.token("alice", ALL));
    alice.post("/accounts", r#"{"ID": "acc-a"}"#).await;
    alice
        .post("/accounts/acc-a/deposit", r#"{"Amount": 50}"#)
        .await;
    gw.api
        .with_token(issuer.token("bob", ALL))
        .post("/accounts", r#"{"ID": "acc-b"}"#)
        .await;
    let before = everything(&gw.host).await;

    let alice_reads = gw.api.with_token(issuer.token("alice", "accounts:read"));
    let (s, b, headers) = alice_reads
        .send(
            "POST",
            "/accounts/acc-a/withdraw",
            Some(r#"{"Amount": 1}"#),
            &[],
        )
        .await;
    assert_eq!(
        (s, problem_type(&b)),
        (403, "/problems/insufficient-scope"),
        "{b}"
    );
    assert_eq!(
        headers["www-authenticate"],
        r#"Bearer realm="tally", error="insufficient_scope", scope="accounts:write""#
    );
    assert_eq!(
        alice_reads.post("/accounts", r#"{"ID": "acc-c"}"#).await.0,
        403
    );
    let transfer = json!({"from": "acc-a", "to": "acc-b", "amount": "1.00"}).to_string();
    let (s, _, _) = alice_reads
        .send(
            "POST",
            "/transfers",
            Some(&transfer),
            &[("idempotency-key", "t-1")],
        )
        .await;
    assert_eq!(s, 403);
    // Without the scope, another subject's account is still not there.
    let (s, b, _) = alice_reads
        .send(
            "POST",
            "/accounts/acc-b/withdraw",
            Some(r#"{"Amount": 1}"#),
            &[],
        )
        .await;
    assert_eq!((s, problem_type(&b)), (404, "/problems/account-not-found"));
    let alice_writes = gw.api.with_token(issuer.token("alice", "accounts:write"));
    assert_eq!(alice_writes.get("/accounts/acc-a/balance").await.0, 403);
    assert_eq!(alice_writes.get("/accounts/acc-b/balance").await.0, 404);
    assert_eq!(everything(&gw.host).await, before);
    assert_eq!(alice_reads.get("/accounts/acc-a/balance").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_is_seen_by_the_owners_of_its_two_accounts_only() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::with_rsa().await;
    let gw = gateway(dir.path(), &issuer, None).await;
    let alice = gw.api.with_token(issuer.token("alice", ALL));
    let bob = gw.api.with_token(issuer.token("bob", ALL));
    let carol = gw.api.with_token(issuer.token("carol", ALL));
    alice.post("/accounts", r#"{"ID": "acc-a"}"#).await;
    alice
        .post("/accounts/acc-a/deposit", r#"{"Amount": 50}"#)
        .await;
    bob.post("/accounts", r#"{"ID": "acc-b"}"#).await;
    let (s, t, _) = tally_testkit::cases::transfer(&alice, "t-1", "acc-a", "acc-b", "20.00").await;
    assert_eq!(s, 202, "{t}");
    let id = t["id"].as_str().unwrap().to_owned();
    let done = tally_testkit::cases::settled(&alice, &id, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(bob.get(&format!("/transfers/{id}")).await.0, 200);
    let (s, b) = carol.get(&format!("/transfers/{id}")).await;
    assert_eq!((s, problem_type(&b)), (404, "/problems/transfer-not-found"));
    let (_, b) = bob.get("/accounts/acc-b/balance?min_revision=2").await;
    assert_eq!(b["balance"], "20.00");
    // The same key from another subject names another transfer.
    carol.post("/accounts", r#"{"ID": "acc-c"}"#).await;
    carol
        .post("/accounts/acc-c/deposit", r#"{"Amount": 5}"#)
        .await;
    let (s, t2, _) = tally_testkit::cases::transfer(&carol, "t-1", "acc-c", "acc-b", "1.00").await;
    assert_eq!(s, 202, "{t2}");
    assert_ne!(t2["id"], t["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_opened_before_owners_are_reached_by_operators_and_the_legacy_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    {
        // What an older version wrote: an opening without an owner (v1).
        let config = tally_host::Config::with_data_dir(dir.path());
        let host = Host::build(&config, tally_host::Role::Gateway)
            .await
            .unwrap();
        let opened = include_str!("../../../shared/domain/tests/fixtures/AccountOpened.v1.json");
        host.store
            .append(&tally_es::StoredCommit::from_bytes(opened.as_bytes()).unwrap())
            .await
            .unwrap();
    }
    let issuer = TestIssuer::with_rsa().await;
    let gw = gateway(dir.path(), &issuer, Some("heritage")).await;
    let path = "/accounts/account123/balance";
    assert_eq!(
        gw.api
            .with_token(issuer.token("alice", ALL))
            .get(path)
            .await
            .0,
        404
    );
    assert_eq!(
        gw.api
            .with_token(issuer.token("heritage", ALL))
            .get(path)
            .await
            .0,
        200
    );
    assert_eq!(
        gw.api
            .with_token(issuer.token("root", "ops accounts:read"))
            .get(path)
            .await
            .0,
        200
    );
    let (s, _) = gw
        .api
        .with_token(issuer.token("heritage", ALL))
        .post("/accounts/account123/deposit", r#"{"Amount": 1}"#)
        .await;
    assert_eq!(s, 200);
    let stream = StreamId::parse("account123").unwrap();
    assert_eq!(
        gw.host
            .store
            .read(&stream, Revision::new(1))
            .await
            .unwrap()
            .len(),
        2
    );
}

/// The projector's operations routes need `ops`; the gateway never routes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_need_the_ops_scope_and_are_not_behind_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::with_rsa().await;
    let gw = gateway(dir.path(), &issuer, None).await;
    let ops = gw.api.with_token(issuer.token("root", "ops"));
    assert_eq!(
        ops.post("/projector/rebuild", "").await.0,
        404,
        "not routed by the gateway"
    );

    let router = tally_api::router(gw.host.state.clone(), |r| r.function == "projector");
    let app = tally_runtime::app(
        "projector",
        router,
        std::sync::Arc::new(tally_runtime::AlwaysReady),
    );
    let projector = serve(app, gw.host.clone()).await;
    for path in ["/projector/rebuild", "/projector/catch-up"] {
        assert_eq!(projector.api.post(path, "").await.0, 401, "{path}");
        let (s, b) = projector
            .api
            .with_token(issuer.token("alice", ALL))
            .post(path, "")
            .await;
        assert_eq!(
            (s, problem_type(&b)),
            (403, "/problems/insufficient-scope"),
            "{path}"
        );
        let (s, b) = projector
            .api
            .with_token(issuer.token("root", "ops"))
            .post(path, "")
            .await;
        assert_eq!(s, 200, "{path}: {b}");
    }
    assert_eq!(projector.api.get("/healthz").await.0, 200);
}
