//! The public API end to end: the gateway's router with the embedded backends, served
//! on a real loopback port, driven over real HTTP.

use futures::future::join_all;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tally_es::{Revision, StreamId};
use tally_host::Host;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A gateway on a free port over a data directory.
struct Gateway {
    base: String,
    addr: std::net::SocketAddr,
    embedded: Host,
    client: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

impl Gateway {
    async fn start(dir: &Path) -> Self {
        let embedded = Host::embedded(dir).await.unwrap();
        embedded.start_projection().await.unwrap();
        let app = tally_host::gateway_app(&embedded);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            base: format!("http://{addr}"),
            addr,
            embedded,
            client: reqwest::Client::new(),
            server,
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            req = req
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            headers,
        )
    }

    async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let (s, b, _) = self.send("POST", path, Some(body), &[]).await;
        (s, b)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let (s, b, _) = self.send("GET", path, None, &[]).await;
        (s, b)
    }

    /// A raw HTTP/1.1 request, for paths a client library would normalise.
    async fn raw(&self, request_line_path: &str, body: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let req = format!(
            "POST {request_line_path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        (status, out)
    }

    async fn revisions(&self, id: &str) -> Vec<u64> {
        let commits = self
            .embedded
            .store
            .read(&StreamId::parse(id).unwrap(), Revision::new(1))
            .await
            .unwrap();
        commits
            .iter()
            .flat_map(|c| c.revision.get()..=c.last_revision().get())
            .collect()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

#[tokio::test]
async fn the_seed_walk_through_works_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path()).await;
    assert_eq!(gw.post("/accounts", r#"{"ID": "account123"}"#).await.0, 201);
    let (s, b) = gw
        .post("/accounts/account123/deposit", r#"{"Amount": 500.00}"#)
        .await;
    assert_eq!((s, b["balance"].as_str()), (200, Some("500.00")));
    let (s, b) = gw.get("/accounts/account123/balance").await;
    assert_eq!((s, b["balance"].as_str()), (200, Some("500.00")));
    let (s, b) = gw
        .post("/accounts/account123/withdraw", r#"{"Amount": 150.00}"#)
        .await;
    assert_eq!((s, b["revision"].as_u64()), (200, Some(3)));
    let (_, b) = gw.get("/accounts/account123/balance?min_revision=3").await;
    assert_eq!(
        b,
        json!({"id": "account123", "balance": "350.00", "currency": "USD", "revision": 3})
    );
    drop(gw);

    let gw = Gateway::start(dir.path()).await;
    let (s, b) = gw.get("/accounts/account123/balance").await;
    assert_eq!((s, b["balance"].as_str()), (200, Some("350.00")));
    let (s, b) = gw.get("/accounts/account123").await;
    assert_eq!(
        (s, b["status"].as_str(), b["revision"].as_u64()),
        (200, Some("open"), Some(3))
    );
}

#[tokio::test]
async fn a_client_reads_its_own_writes_without_asking_for_a_revision() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path()).await;
    gw.post("/accounts", r#"{"ID": "ryw"}"#).await;
    for n in 1..=50 {
        let (s, b) = gw.post("/accounts/ryw/deposit", r#"{"Amount": 1}"#).await;
        assert_eq!(s, 200);
        let (_, balance) = gw.get("/accounts/ryw/balance").await;
        assert_eq!(balance["balance"], b["balance"], "after deposit {n}");
        let (_, page) = gw.get("/accounts/ryw/transactions?limit=100").await;
        assert_eq!(page["items"].as_array().unwrap().len(), n);
    }
}

#[tokio::test]
async fn lower_case_field_names_and_decimal_strings_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path()).await;
    assert_eq!(gw.post("/accounts", r#"{"id": "lower"}"#).await.0, 201);
    let (s, b) = gw
        .post("/accounts/lower/deposit", r#"{"amount": "12.30"}"#)
        .await;
    assert_eq!((s, b["balance"].as_str()), (200, Some("12.30")));
    let (s, b) = gw
        .post("/accounts/lower/withdraw", r#"{"amount": 2.3}"#)
        .await;
    assert_eq!(
        (s, b["balance"].as_str(), b["amount"].as_str()),
        (200, Some("10.00"), Some("2.30"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_withdrawals_of_ten_from_five_hundred_let_exactly_fifty_through() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path()).await;
    gw.post("/accounts", r#"{"ID": "busy"}"#).await;
    gw.post("/accounts/busy/deposit", r#"{"Amount": 500.00}"#)
        .await;
    let answers =
        join_all((0..100).map(|_| gw.post("/accounts/busy/withdraw", r#"{"Amount": 10.00}"#)))
            .await;
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let refused: Vec<_> = answers.iter().filter(|(s, _)| *s != 200).collect();
    assert_eq!(ok, 50);
    assert_eq!(refused.len(), 50);
    for (s, b) in refused {
        assert_eq!(*s, 422, "{b}");
        assert_eq!(b["type"], "/problems/insufficient-funds");
    }
    let (_, b) = gw.get("/accounts/busy/balance?min_revision=52").await;
    assert_eq!(b["balance"], "0.00");
    assert_eq!(
        gw.revisions("busy").await,
        (1..=52).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
}

/// (method, path, body, content type, extra header, status, problem kind)
type Case<'a> = (
    &'a str,
    String,
    &'a str,
    Option<&'a str>,
    Option<(&'a str, &'a str)>,
    u16,
    &'a str,
);

#[tokio::test]
async fn bad_input_gets_the_right_problem_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path()).await;
    gw.post("/accounts", r#"{"ID": "acc"}"#).await;
    gw.post("/accounts/acc/deposit", r#"{"Amount": 100.00}"#)
        .await;
    gw.post("/accounts", r#"{"ID": "shut"}"#).await;
    gw.post("/accounts/shut/close", "").await;
    let long_id = "x".repeat(65);
    let big = format!(r#"{{"Amount": 1, "pad": "{}"}}"#, "x".repeat(20_000));
    let d = "/accounts/acc/deposit";
    let w = "/accounts/acc/withdraw";
    // (method, path, body, content type, extra header, status, problem kind)
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("POST", d.into(), r#"{"Amount": "#, Some("application/json"), None, 400, "malformed-json"),
        ("POST", d.into(), r#"not json"#, Some("application/json"), None, 400, "malformed-json"),
        ("POST", d.into(), r#"{"Amount": 1}"#, Some("text/plain"), None, 415, "unsupported-media-type"),
        ("POST", d.into(), r#"{"Amount": 1}"#, None, None, 415, "unsupported-media-type"),
        ("POST", d.into(), r#"{}"#, Some("application/json"), None, 422, "invalid-request"),
        ("POST", d.into(), r#"{"Amount": 1, "Currency": "EUR"}"#, Some("application/json"), None, 422, "invalid-request"),
        ("POST", d.into(), r#"[1]"#, Some("application/json"), None, 422, "invalid-request"),
        ("POST", d.into(), r#"{"Amount": true}"#, Some("application/json"), None, 422, "invalid-amount"),
        ("POST", d.into(), r#"{"Amount": null}"#, Some("application/json"), None, 422, "invalid-amount"),
        ("POST", d.into(), r#"{"Amount": {"v": 1}}"#, Some("application/json"), None, 422, "invalid-amount"),
        ("POST", d.into(), r#"{"Amount": 0}"#, Some("application/json"), None, 422, "invalid-amount"),
        ("POST", d.into(), r#"{"Amount": 0.00}"#, Some("application/json"), None, 422, "invalid-amount"),
        ("POST", d.into(), r#"{"Amount": -5.00}"#, Some("application/json"), None, 422, "invalid-amount"),
        ("POST", w.into(), r#"{"Amount": -5.00}"#, Some("application/json"), None, 422, "invalid-amount"),
        ("POST", d.into(), r#"{"Amount": 1.001}"#, Some("application/json"), None, 422, "invalid-amount"),
        ("POST", d.into(), r#"{"Amount": "0.005"}"#, Some("application/json"), None, 422, "invalid-amount"),
        ("POST", d.into(), r#"{"Amount": 1e30}"#, Some("application/json"), None, 422, "invalid-amount"),
        ("POST", d.into(), r#"{"Amount": 1000000.01}"#, Some("application/json"), None, 422, "invalid-amount"),
        ("POST", d.into(), r#"{"Amount": 99999999999999999999999999999}"#, Some("application/json"), None, 422, "invalid-amount"),
        ("POST", d.into(), r#"{"Amount": NaN}"#, Some("application/json"), None, 400, "malformed-json"),
        ("POST", d.into(), r#"{"Amount": Infinity}"#, Some("application/json"), None, 400, "malformed-json"),
        ("POST", d.into(), r#"{"Amount": "NaN"}"#, Some("application/json"), None, 422, "invalid-amount"),
        ("POST", d.into(), r#"{"Amount": "-Infinity"}"#, Some("application/json"), None, 422, "invalid-amount"),
        ("POST", d.into(), big.as_str(), Some("application/json"), None, 413, "payload-too-large"),
        ("POST", "/accounts/a%2Fb/deposit".into(), r#"{"Amount": 1}"#, Some("application/json"), None, 400, "invalid-account-id"),
        ("POST", "/accounts/a%00b/deposit".into(), r#"{"Amount": 1}"#, Some("application/json"), None, 400, "invalid-account-id"),
        ("POST", "/accounts/a%0Ab/deposit".into(), r#"{"Amount": 1}"#, Some("application/json"), None, 400, "invalid-account-id"),
        ("POST", "/accounts/a%7Fb/deposit".into(), r#"{"Amount": 1}"#, Some("application/json"), None, 400, "invalid-account-id"),
        ("POST", "/accounts/%2E%2E%2Facc/deposit".into(), r#"{"Amount": 1}"#, Some("application/json"), None, 400, "invalid-account-id"),
        ("POST", format!("/accounts/{long_id}/deposit"), r#"{"Amount": 1}"#, Some("application/json"), None, 400, "invalid-account-id"),
        ("GET", format!("/accounts/{long_id}/balance"), "", None, None, 400, "invalid-account-id"),
        ("POST", "/accounts".into(), r#"{"ID": ""}"#, Some("application/json"), None, 400, "invalid-account-id"),
        ("POST", "/accounts".into(), r#"{"ID": "../etc"}"#, Some("application/json"), None, 400, "invalid-account-id"),
        ("POST", "/accounts".into(), r#"{"ID": "a/b"}"#, Some("application/json"), None, 400, "invalid-account-id"),
        ("POST", "/accounts".into(), "{\"ID\": \"a\\u0000b\"}", Some("application/json"), None, 400, "invalid-account-id"),
        ("POST", "/accounts".into(), r#"{"ID": 123}"#, Some("application/json"), None, 422, "invalid-request"),
        ("POST", "/accounts".into(), r#"{"ID": "acc"}"#, Some("application/json"), None, 409, "account-already-exists"),
        ("POST", "/accounts/nobody/deposit".into(), r#"{"Amount": 1}"#, Some("application/json"), None, 404, "account-not-found"),
        ("POST", "/accounts/nobody/close".into(), "", None, None, 404, "account-not-found"),
        ("GET", "/accounts/nobody/balance".into(), "", None, None, 404, "account-not-found"),
        ("GET", "/accounts/nobody".into(), "", None, None, 404, "account-not-found"),
        ("GET", "/accounts/nobody/transactions".into(), "", None, None, 404, "account-not-found"),
        ("POST", w.into(), r#"{"Amount": 100.01}"#, Some("application/json"), None, 422, "insufficient-funds"),
        ("POST", "/accounts/acc/close".into(), "", None, None, 409, "balance-not-zero"),
        ("POST", "/accounts/shut/deposit".into(), r#"{"Amount": 1}"#, Some("application/json"), None, 409, "account-closed"),
        ("POST", "/accounts/shut/close".into(), "", None, None, 409, "account-closed"),
        ("POST", d.into(), r#"{"Amount": 1}"#, Some("application/json"), Some(("idempotency-key", "")), 400, "invalid-header"),
        ("POST", d.into(), r#"{"Amount": 1}"#, Some("application/json"), Some(("if-match", "\"abc\"")), 400, "invalid-header"),
        ("POST", d.into(), r#"{"Amount": 1}"#, Some("application/json"), Some(("if-match", "\"1\"")), 412, "revision-mismatch"),
        ("GET", "/accounts/acc/balance?min_revision=x".into(), "", None, None, 400, "invalid-query"),
        ("GET", "/accounts/acc/balance?min_revision=99".into(), "", None, None, 422, "revision-not-reached"),
        ("GET", "/accounts/acc/transactions?limit=0".into(), "", None, None, 400, "invalid-query"),
        ("GET", "/accounts/acc/transactions?limit=1000".into(), "", None, None, 400, "invalid-query"),
        ("GET", "/accounts/acc/transactions?cursor=-1".into(), "", None, None, 400, "invalid-query"),
        ("DELETE", "/accounts/acc".into(), "", None, None, 405, "method-not-allowed"),
        ("GET", "/nowhere".into(), "", None, None, 404, "not-found"),
    ];
    let before = snapshot(dir.path());
    for (method, path, body, content_type, header, status, kind) in &cases {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = gw.client.request(m, format!("{}{path}", gw.base));
        if let Some(ct) = content_type {
            req = req.header("content-type", *ct);
        }
        if let Some((k, v)) = header {
            req = req.header(*k, *v);
        }
        if !body.is_empty() {
            req = req.body(body.to_string());
        }
        let res = req.send().await.unwrap();
        let got = res.status().as_u16();
        let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
        let b: Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
        let case = format!(
            "{method} {} {}",
            &path[..path.len().min(60)],
            &body[..body.len().min(60)]
        );
        assert_eq!(got, *status, "{case}: {b}");
        assert_eq!(ct, "application/problem+json", "{case}");
        assert_eq!(b["type"], format!("/problems/{kind}"), "{case}: {b}");
        assert_eq!(b["status"], *status, "{case}");
        assert!(
            b["title"].is_string() && b["detail"].is_string(),
            "{case}: {b}"
        );
    }
    // Paths a client library would normalise, sent raw.
    for path in [
        "/accounts//deposit",
        "/accounts/../deposit",
        "/accounts/./deposit",
        "/accounts/..%2F..%2Fetc/deposit",
    ] {
        let (status, text) = gw.raw(path, r#"{"Amount": 1}"#).await;
        assert_eq!(status, 400, "{path}: {text}");
        assert!(text.contains("application/problem+json"), "{path}: {text}");
        assert!(
            text.contains("/problems/invalid-account-id"),
            "{path}: {text}"
        );
    }
    assert_eq!(
        snapshot(dir.path()),
        before,
        "bad input must change nothing in the store"
    );
    let (_, b) = gw.get("/accounts/acc/balance").await;
    assert_eq!(b["balance"], "100.00");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_command_with_the_same_idempotency_key_returns_the_first_answer_and_appends_nothing(
) {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path()).await;
    let key = [("idempotency-key", "k-open")];
    let (s1, b1, _) = gw
        .send("POST", "/accounts", Some(r#"{"ID": "idem"}"#), &key)
        .await;
    let (s2, b2, h2) = gw
        .send("POST", "/accounts", Some(r#"{"ID": "idem"}"#), &key)
        .await;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!(b1, b2);
    assert_eq!(h2["idempotent-replayed"], "true");

    // Twenty concurrent retries of one deposit: one commit, twenty identical answers.
    let key = [("idempotency-key", "k-dep")];
    let answers = join_all((0..20).map(|_| {
        gw.send(
            "POST",
            "/accounts/idem/deposit",
            Some(r#"{"Amount": 7.50}"#),
            &key,
        )
    }))
    .await;
    for (s, b, _) in &answers {
        assert_eq!(*s, 200);
        assert_eq!(b, &answers[0].1);
    }
    assert_eq!(answers[0].1["balance"], "7.50");
    assert_eq!(gw.revisions("idem").await, vec![1, 2]);

    // The same key with another request is refused and writes nothing.
    let (s, b, _) = gw
        .send(
            "POST",
            "/accounts/idem/deposit",
            Some(r#"{"Amount": 8.00}"#),
            &key,
        )
        .await;
    assert_eq!(
        (s, b["type"].as_str()),
        (422, Some("/problems/idempotency-key-reused"))
    );
    assert_eq!(gw.revisions("idem").await, vec![1, 2]);

    // A replay still answers with the first result after other commands moved on.
    gw.post("/accounts/idem/deposit", r#"{"Amount": 1}"#).await;
    let (s, b, _) = gw
        .send(
            "POST",
            "/accounts/idem/deposit",
            Some(r#"{"Amount": 7.50}"#),
            &key,
        )
        .await;
    assert_eq!(
        (s, b["revision"].as_u64(), b["balance"].as_str()),
        (200, Some(2), Some("7.50"))
    );
}

#[tokio::test]
async fn if_match_writes_only_at_the_expected_revision() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path()).await;
    let (_, _, h) = gw
        .send("POST", "/accounts", Some(r#"{"ID": "cas"}"#), &[])
        .await;
    assert_eq!(h["etag"], "\"1\"");
    let (s, b, h) = gw
        .send(
            "POST",
            "/accounts/cas/deposit",
            Some(r#"{"Amount": 5}"#),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!((s, b["revision"].as_u64()), (200, Some(2)));
    assert_eq!(h["etag"], "\"2\"");
    let (s, b, _) = gw
        .send(
            "POST",
            "/accounts/cas/deposit",
            Some(r#"{"Amount": 5}"#),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(
        (s, b["type"].as_str()),
        (412, Some("/problems/revision-mismatch"))
    );
    assert_eq!(gw.revisions("cas").await, vec![1, 2]);
}

#[tokio::test]
async fn history_pages_with_a_cursor_without_gaps_or_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path()).await;
    gw.post("/accounts", r#"{"ID": "hist"}"#).await;
    for n in 1..=25 {
        gw.post("/accounts/hist/deposit", &format!(r#"{{"Amount": {n}}}"#))
            .await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/accounts/hist/transactions?limit=10&cursor={c}&min_revision=26"),
            None => "/accounts/hist/transactions?limit=10&min_revision=26".to_owned(),
        };
        let (s, b) = gw.get(&path).await;
        assert_eq!(s, 200, "{b}");
        pages += 1;
        for item in b["items"].as_array().unwrap() {
            seen.push(item["amount"].as_str().unwrap().to_owned());
        }
        match b["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (1..=25).map(|n| format!("{n}.00")).collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn an_emptied_account_closes_and_then_refuses_money() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path()).await;
    gw.post("/accounts", r#"{"ID": "bye"}"#).await;
    gw.post("/accounts/bye/deposit", r#"{"Amount": 3}"#).await;
    gw.post("/accounts/bye/withdraw", r#"{"Amount": 3}"#).await;
    let (s, b) = gw.post("/accounts/bye/close", "").await;
    assert_eq!((s, b["status"].as_str()), (200, Some("closed")));
    let (_, b) = gw.get("/accounts/bye?min_revision=4").await;
    assert_eq!(b["status"], "closed");
    let (s, _) = gw.post("/accounts/bye/withdraw", r#"{"Amount": 1}"#).await;
    assert_eq!(s, 409);
}

#[tokio::test]
async fn health_and_readiness_answer_and_every_response_has_a_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path()).await;
    let (s, _, h) = gw.send("GET", "/healthz", None, &[]).await;
    assert_eq!(s, 200);
    assert!(h.contains_key("x-request-id"));
    let (s, _, h) = gw
        .send("GET", "/readyz", None, &[("x-request-id", "mine-1")])
        .await;
    assert_eq!(s, 200);
    assert_eq!(h["x-request-id"], "mine-1");
}
