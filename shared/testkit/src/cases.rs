//! The API checks every deployment must pass — the seed walk-through, a hundred
//! concurrent withdrawals, and every kind of bad input — written once and run against
//! `make dev` (the gateway in-process) and `make stack` (every function its own process
//! on the real backends).

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// (method, path, body, content type, extra header, status, problem kind)
pub type Case<'a> = (
    &'a str,
    String,
    &'a str,
    Option<&'a str>,
    Option<(&'a str, &'a str)>,
    u16,
    &'a str,
);

/// An HTTP client for one deployment, sending a bearer token if it has one.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
    pub token: Option<String>,
}

impl Api {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: base.into(),
            client: reqwest::Client::new(),
            token: None,
        }
    }

    /// The same deployment, with `Authorization: Bearer {token}` on every request.
    pub fn with_token(&self, token: impl Into<String>) -> Self {
        Self {
            token: Some(token.into()),
            ..self.clone()
        }
    }

    pub async fn send(
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
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
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

    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let (s, b, _) = self.send("POST", path, Some(body), &[]).await;
        (s, b)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let (s, b, _) = self.send("GET", path, None, &[]).await;
        (s, b)
    }

    /// A raw HTTP/1.1 POST, for paths a client library would normalise.
    pub async fn raw_post(&self, path: &str, body: &str) -> (u16, String) {
        let addr = self.base.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let authorization = self
            .token
            .as_ref()
            .map(|t| format!("authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: localhost\r\n{authorization}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        (status, out)
    }
}

/// The seed project's walk-through: create, deposit 500.00, balance, withdraw 150.00,
/// balance 350.00.
pub async fn seed_walkthrough(api: &Api, id: &str) {
    let (s, b) = api.post("/accounts", &format!(r#"{{"ID": "{id}"}}"#)).await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = api
        .post(&format!("/accounts/{id}/deposit"), r#"{"Amount": 500.00}"#)
        .await;
    assert_eq!((s, b["balance"].as_str()), (200, Some("500.00")), "{b}");
    let (s, b) = api
        .get(&format!("/accounts/{id}/balance?min_revision=2"))
        .await;
    assert_eq!((s, b["balance"].as_str()), (200, Some("500.00")), "{b}");
    let (s, b) = api
        .post(&format!("/accounts/{id}/withdraw"), r#"{"Amount": 150.00}"#)
        .await;
    assert_eq!((s, b["revision"].as_u64()), (200, Some(3)), "{b}");
    let (_, b) = api
        .get(&format!("/accounts/{id}/balance?min_revision=3"))
        .await;
    assert_eq!(
        b,
        json!({"id": id, "balance": "350.00", "currency": "USD", "revision": 3})
    );
}

/// The seed project's clients send no `min_revision`: a balance read right after a
/// command must already show it.
pub async fn balance_reads_its_own_writes(api: &Api, id: &str) {
    api.post("/accounts", &format!(r#"{{"ID": "{id}"}}"#)).await;
    for n in 1..=20 {
        let path = if n % 3 == 0 { "withdraw" } else { "deposit" };
        let (s, b) = api
            .post(&format!("/accounts/{id}/{path}"), r#"{"Amount": 1.00}"#)
            .await;
        assert_eq!(s, 200, "{b}");
        let (_, balance) = api.get(&format!("/accounts/{id}/balance")).await;
        assert_eq!(balance["balance"], b["balance"], "right after command {n}");
        assert_eq!(balance["revision"], b["revision"]);
    }
}

/// 100 concurrent withdrawals of 10.00 from 500.00: exactly 50 succeed, 50 are refused
/// for insufficient funds, none fails otherwise; the balance ends at 0.00 (revision 52).
pub async fn hundred_concurrent_withdrawals(api: &Api, id: &str) {
    api.post("/accounts", &format!(r#"{{"ID": "{id}"}}"#)).await;
    api.post(&format!("/accounts/{id}/deposit"), r#"{"Amount": 500.00}"#)
        .await;
    let path = format!("/accounts/{id}/withdraw");
    let answers =
        futures::future::join_all((0..100).map(|_| api.post(&path, r#"{"Amount": 10.00}"#))).await;
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(ok, 50, "{answers:?}");
    for (s, b) in answers.iter().filter(|(s, _)| *s != 200) {
        assert_eq!(*s, 422, "{b}");
        assert_eq!(b["type"], "/problems/insufficient-funds");
    }
    let mut revisions: Vec<u64> = answers
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, b)| b["revision"].as_u64().unwrap())
        .collect();
    revisions.sort();
    assert_eq!(
        revisions,
        (3..=52).collect::<Vec<_>>(),
        "one revision per success"
    );
    let (_, b) = api
        .get(&format!("/accounts/{id}/balance?min_revision=52"))
        .await;
    assert_eq!(b["balance"], "0.00");
}

/// Create what the bad-input cases expect: `acc` holding 100.00 at revision 2, and
/// `shut`, closed.
pub async fn bad_input_fixtures(api: &Api) {
    api.post("/accounts", r#"{"ID": "acc"}"#).await;
    api.post("/accounts/acc/deposit", r#"{"Amount": 100.00}"#)
        .await;
    api.post("/accounts", r#"{"ID": "shut"}"#).await;
    api.post("/accounts/shut/close", "").await;
}

/// Send every bad input and check each gets its problem; the caller checks the store
/// is unchanged.
pub async fn bad_inputs_are_refused(api: &Api) {
    let long_id = "x".repeat(65);
    let big = format!(r#"{{"Amount": 1, "pad": "{}"}}"#, "x".repeat(20_000));
    let d = "/accounts/acc/deposit";
    let w = "/accounts/acc/withdraw";
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
    for (method, path, body, content_type, header, status, kind) in &cases {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = api.client.request(m, format!("{}{path}", api.base));
        if let Some(token) = &api.token {
            req = req.bearer_auth(token);
        }
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
    for path in [
        "/accounts//deposit",
        "/accounts/../deposit",
        "/accounts/./deposit",
        "/accounts/..%2F..%2Fetc/deposit",
    ] {
        let (status, text) = api.raw_post(path, r#"{"Amount": 1}"#).await;
        assert_eq!(status, 400, "{path}: {text}");
        assert!(text.contains("application/problem+json"), "{path}: {text}");
        assert!(
            text.contains("/problems/invalid-account-id"),
            "{path}: {text}"
        );
    }
    let (_, b) = api.get("/accounts/acc/balance").await;
    assert_eq!(b["balance"], "100.00");
}

/// Open `id`, then make `count` random deposits and withdrawals of up to `max_cents`
/// (never overdrawing), pausing up to `max_pause_ms` after each so that their times
/// spread out. Returns the balance (minor units).
async fn open_and_move(
    api: &Api,
    id: &str,
    rng: &mut fastrand::Rng,
    count: usize,
    max_cents: i64,
    max_pause_ms: u64,
) -> i64 {
    let (s, b) = api.post("/accounts", &format!(r#"{{"ID": "{id}"}}"#)).await;
    assert_eq!(s, 201, "{b}");
    let mut balance = 0i64;
    for _ in 0..count {
        let cents = rng.i64(1..max_cents);
        let path = if balance >= cents && rng.bool() {
            balance -= cents;
            "withdraw"
        } else {
            balance += cents;
            "deposit"
        };
        let amount = format!("{}.{:02}", cents / 100, cents % 100);
        let (s, b) = api
            .post(
                &format!("/accounts/{id}/{path}"),
                &format!(r#"{{"Amount": "{amount}"}}"#),
            )
            .await;
        assert_eq!(s, 200, "{path} {amount}: {b}");
        tokio::time::sleep(std::time::Duration::from_millis(rng.u64(0..max_pause_ms))).await;
    }
    balance
}

/// Balances as of a revision and as of a time agree with a fold of the store: `seed`
/// drives random deposits and withdrawals on `id` (spread out in time), then a closing;
/// every revision is asked for, and times at, between and around the commits' own
/// times (to the nanosecond, finer than the store keeps). Then the edges: revision 0 and
/// times before the opening are 404, a revision past the last or a time still to come
/// is 422, a malformed or doubled parameter 400. `store` is the deployment's own.
pub async fn as_of_balances_agree_with_a_fold_of_the_store(
    api: &Api,
    store: &dyn tally_es::EventStore,
    id: &str,
    seed: u64,
) {
    use tally_es::{Aggregate, Commit, Revision, StreamId};
    use time::format_description::well_known::Rfc3339;
    use time::{Duration, OffsetDateTime};

    let mut rng = fastrand::Rng::with_seed(seed);
    let balance = open_and_move(api, id, &mut rng, 12, 5_000, 12).await;
    let amount = format!("{}.{:02}", balance / 100, balance % 100);
    if balance > 0 {
        let (s, b) = api
            .post(
                &format!("/accounts/{id}/withdraw"),
                &format!(r#"{{"Amount": "{amount}"}}"#),
            )
            .await;
        assert_eq!(s, 200, "{b}");
    }
    let (s, b) = api.post(&format!("/accounts/{id}/close"), "").await;
    assert_eq!(s, 200, "{b}");

    // The fold: the balance and the recording time right after every revision.
    let stream = StreamId::parse(id).unwrap();
    let mut state = tally_domain::Account::default();
    let mut history: Vec<(Revision, i64, OffsetDateTime)> = Vec::new();
    for stored in store.read(&stream, Revision::new(1)).await.unwrap() {
        let commit = Commit::<tally_domain::AccountEvent>::decode(&stored).unwrap();
        for (i, event) in commit.events.iter().enumerate() {
            state.apply(event);
            history.push((
                commit.revision.advance(i as u64),
                state.balance,
                commit.recorded_at,
            ));
        }
    }
    let last = history.last().unwrap().0;
    let usd = tally_domain::Currency::USD;

    for (revision, balance, at) in &history {
        let (s, b) = api
            .get(&format!("/accounts/{id}/balance?as_of_revision={revision}"))
            .await;
        assert_eq!(s, 200, "as_of_revision={revision}: {b}");
        assert_eq!(
            b["balance"],
            usd.format(*balance),
            "as_of_revision={revision}"
        );
        assert_eq!(b["revision"], revision.get());
        let answered = OffsetDateTime::parse(b["recorded_at"].as_str().unwrap(), &Rfc3339);
        assert_eq!(answered.unwrap(), *at, "as_of_revision={revision}");
    }

    // Times: each commit's own, a nanosecond before it, and somewhere after it.
    let mut times = Vec::new();
    for (_, _, at) in &history {
        times.push(*at);
        times.push(*at - Duration::nanoseconds(1));
        times.push(*at + Duration::nanoseconds(rng.i64(1..20_000_000)));
    }
    for t in times {
        // The longest start of the stream recorded at or before `t`.
        let expected = history.iter().take_while(|(_, _, at)| *at <= t).last();
        let text = t.format(&Rfc3339).unwrap();
        let (s, b) = api
            .get(&format!("/accounts/{id}/balance?as_of={text}"))
            .await;
        match expected {
            Some((revision, balance, _)) => {
                assert_eq!(s, 200, "as_of={text}: {b}");
                assert_eq!(b["revision"], revision.get(), "as_of={text}");
                assert_eq!(b["balance"], usd.format(*balance), "as_of={text}");
            }
            None => {
                assert_eq!(s, 404, "as_of={text}, before the opening: {b}");
                assert_eq!(b["type"], "/problems/account-not-found");
            }
        }
    }

    let problem = |b: &Value| b["type"].as_str().unwrap_or_default().to_owned();
    let future = (OffsetDateTime::now_utc() + Duration::hours(1))
        .format(&Rfc3339)
        .unwrap();
    for (query, status, kind) in [
        ("as_of_revision=0".to_owned(), 404, "account-not-found"),
        (
            format!("as_of_revision={}", last.next()),
            422,
            "revision-not-reached",
        ),
        (format!("as_of={future}"), 422, "as-of-in-future"),
        ("as_of=yesterday".to_owned(), 400, "invalid-query"),
        ("as_of_revision=two".to_owned(), 400, "invalid-query"),
        // Each well-formed, but not together: a 422, not a 400.
        (
            "as_of_revision=1&as_of=2026-12-01T00:00:00Z".to_owned(),
            422,
            "conflicting-query",
        ),
        (
            "as_of_revision=1&min_revision=1".to_owned(),
            422,
            "conflicting-query",
        ),
    ] {
        let (s, b) = api.get(&format!("/accounts/{id}/balance?{query}")).await;
        assert_eq!(s, status, "{query}: {b}");
        assert_eq!(problem(&b), format!("/problems/{kind}"), "{query}");
    }
    let (s, b) = api
        .get("/accounts/never-opened/balance?as_of_revision=1")
        .await;
    assert_eq!(s, 404, "{b}");
}

/// Statements agree with a fold of the store: after `seed`'s random deposits and
/// withdrawals on `id`, for random periods cut at, between and around the commits'
/// times, the opening balance is the balance before the period, the movements are
/// exactly the store's in it, and closing = opening + in − out, to the cent. Then the
/// edges: a whole-day period (dates), a period before the opening, and bad periods.
pub async fn statements_agree_with_a_fold_of_the_store(
    api: &Api,
    store: &dyn tally_es::EventStore,
    id: &str,
    seed: u64,
) {
    use tally_domain::AccountEvent;
    use tally_es::{Commit, Revision, StreamId};
    use time::format_description::well_known::Rfc3339;
    use time::{Duration, OffsetDateTime};

    let mut rng = fastrand::Rng::with_seed(seed);
    open_and_move(api, id, &mut rng, 15, 9_000, 10).await;

    // The store's movements: (revision, signed amount, balance after, time).
    let stream = StreamId::parse(id).unwrap();
    let mut moves: Vec<(Revision, i64, i64, OffsetDateTime)> = Vec::new();
    let mut times = Vec::new();
    for stored in store.read(&stream, Revision::new(1)).await.unwrap() {
        let commit = Commit::<AccountEvent>::decode(&stored).unwrap();
        times.push(commit.recorded_at);
        for (i, event) in commit.events.iter().enumerate() {
            let revision = commit.revision.advance(i as u64);
            match event {
                AccountEvent::Deposited { amount, balance } => {
                    moves.push((revision, *amount, *balance, commit.recorded_at))
                }
                AccountEvent::Withdrawn { amount, balance } => {
                    moves.push((revision, -*amount, *balance, commit.recorded_at))
                }
                _ => {}
            }
        }
    }
    let usd = tally_domain::Currency::USD;
    let first = *times.first().unwrap();
    let last = *times.last().unwrap();
    let mut cuts: Vec<OffsetDateTime> =
        vec![first - Duration::seconds(1), last + Duration::seconds(1)];
    for t in &times {
        cuts.push(*t);
        cuts.push(*t + Duration::nanoseconds(rng.i64(1..10_000_000)));
    }
    let fmt = |t: OffsetDateTime| t.format(&Rfc3339).unwrap();
    for _ in 0..40 {
        let (mut a, mut b) = (cuts[rng.usize(..cuts.len())], cuts[rng.usize(..cuts.len())]);
        if a == b {
            continue;
        }
        if b < a {
            std::mem::swap(&mut a, &mut b);
        }
        // The store's answer: movements recorded in [a, b) (times rise with revisions
        // here: one writer), the balance before them.
        let inside: Vec<_> = moves.iter().filter(|m| m.3 >= a && m.3 < b).collect();
        let opening = moves
            .iter()
            .take_while(|m| m.3 < a)
            .last()
            .map_or(0, |m| m.2);
        let closing = inside.last().map_or(opening, |m| m.2);
        let query = format!("from={}&to={}", fmt(a), fmt(b));
        let (s, body) = api.get(&format!("/accounts/{id}/statement?{query}")).await;
        assert_eq!(s, 200, "{query}: {body}");
        assert_eq!(body["opening_balance"], usd.format(opening), "{query}");
        assert_eq!(body["closing_balance"], usd.format(closing), "{query}");
        let revisions: Vec<u64> = body["movements"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["revision"].as_u64().unwrap())
            .collect();
        let expected: Vec<u64> = inside.iter().map(|m| m.0.get()).collect();
        assert_eq!(revisions, expected, "{query}");
        let sum = |sign: i64| {
            inside
                .iter()
                .filter(|m| m.1.signum() == sign)
                .map(|m| m.1.abs())
                .sum::<i64>()
        };
        assert_eq!(body["money_in"], usd.format(sum(1)), "{query}");
        assert_eq!(body["money_out"], usd.format(sum(-1)), "{query}");
    }

    // Whole days: today's statement holds everything; one before the opening, nothing.
    let today = OffsetDateTime::now_utc().date();
    let (s, body) = api
        .get(&format!("/accounts/{id}/statement?from={today}&to={today}"))
        .await;
    assert_eq!(s, 200, "{body}");
    if first.date() == today {
        assert_eq!(body["opening_balance"], "0.00");
        assert_eq!(body["movements"].as_array().unwrap().len(), moves.len());
        assert_eq!(body["closing_balance"], usd.format(moves.last().unwrap().2));
    }
    let (s, body) = api
        .get(&format!(
            "/accounts/{id}/statement?from=2001-01-01&to=2001-12-31"
        ))
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["opening_balance"], "0.00");
    assert_eq!(body["closing_balance"], "0.00");
    assert_eq!(body["movements"], serde_json::json!([]));

    for (query, status, kind) in [
        ("to=2026-12-31", 400, "invalid-query"),
        ("from=2026-12-01", 400, "invalid-query"),
        ("from=2026-12-31&to=2026-12-01", 422, "conflicting-query"),
        ("from=2026-13-01&to=2026-12-31", 400, "invalid-query"),
        ("from=yesterday&to=2026-12-31", 400, "invalid-query"),
        (
            "from=2026-12-01T10:00:00Z&to=2026-12-01T10:00:00Z",
            422,
            "conflicting-query",
        ),
    ] {
        let (s, b) = api.get(&format!("/accounts/{id}/statement?{query}")).await;
        assert_eq!(s, status, "{query}: {b}");
        assert_eq!(b["type"], format!("/problems/{kind}"), "{query}");
    }
    let (s, b) = api
        .get("/accounts/never-opened/statement?from=2026-12-01&to=2026-12-31")
        .await;
    assert_eq!(s, 404, "{b}");
}

/// `POST /transfers` with `key`; the status, body and `Location`.
pub async fn transfer(
    api: &Api,
    key: &str,
    from: &str,
    to: &str,
    amount: &str,
) -> (u16, Value, Option<String>) {
    let body = json!({"from": from, "to": to, "amount": amount, "reference": "test"}).to_string();
    let (s, b, h) = api
        .send(
            "POST",
            "/transfers",
            Some(&body),
            &[("idempotency-key", key)],
        )
        .await;
    let location = h
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (s, b, location)
}

/// Poll `GET /transfers/{id}` until the transfer ends (at most `seconds`).
pub async fn settled(api: &Api, id: &str, seconds: u64) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    loop {
        let (s, b) = api.get(&format!("/transfers/{id}")).await;
        assert!(s == 200 || s == 503, "GET /transfers/{id}: {s} {b}");
        if s == 200 && b["status"] != "pending" {
            return b;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "transfer {id} still pending after {seconds} s: {b}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The balance of account `id` as the read model holds it now.
async fn balance_of(api: &Api, id: &str) -> String {
    balance_in(api, &format!("/accounts/{id}")).await
}

/// The balance of account `id` at least at revision `min` (read-your-writes: a
/// transfer's step names the account revision it wrote; without it, the read model
/// may not have projected that step yet).
async fn balance_at(api: &Api, id: &str, min: &Value) -> String {
    let min = min
        .as_u64()
        .unwrap_or_else(|| panic!("a revision, not {min}"));
    balance_in(api, &format!("/accounts/{id}?min_revision={min}")).await
}

/// The balance `GET path` answers, which must be 200.
async fn balance_in(api: &Api, path: &str) -> String {
    let (s, b) = api.get(path).await;
    assert_eq!(s, 200, "{b}");
    b["balance"].as_str().unwrap().to_owned()
}

/// Transfers end to end: a completed one moves the money once (a retry with the key
/// moves nothing), appears in both histories with its counterparty, and each refusal
/// ends `failed` (nothing moved) or `reversed` (the debit refunded); bad requests are
/// refused with their problem and change nothing.
pub async fn transfers_move_money_once(api: &Api, prefix: &str) {
    let [a, b, closed, broke] = ["a", "b", "closed", "broke"].map(|s| format!("{prefix}-{s}"));
    for id in [&a, &b, &closed, &broke] {
        let (s, body) = api.post("/accounts", &json!({"ID": id}).to_string()).await;
        assert_eq!(s, 201, "{body}");
    }
    let (s, _) = api
        .post(&format!("/accounts/{a}/deposit"), r#"{"Amount": "100.00"}"#)
        .await;
    assert_eq!(s, 200);
    let (s, _) = api.post(&format!("/accounts/{closed}/close"), "{}").await;
    assert_eq!(s, 200);

    // Refused at the door: nothing is written.
    let body = json!({"from": a, "to": b, "amount": "1.00"}).to_string();
    let (s, p, _) = api.send("POST", "/transfers", Some(&body), &[]).await;
    assert_eq!(
        (s, p["type"].as_str()),
        (400, Some("/problems/idempotency-key-required"))
    );
    for (body, status, kind) in [
        (
            json!({"from": a, "to": a, "amount": "1.00"}),
            422,
            "same-account",
        ),
        (
            json!({"from": a, "to": b, "amount": "0"}),
            422,
            "invalid-amount",
        ),
        (
            json!({"from": a, "to": b, "amount": "1.001"}),
            422,
            "invalid-amount",
        ),
        (
            json!({"from": "a.b", "to": b, "amount": "1"}),
            422,
            "invalid-request",
        ),
        (json!({"from": a, "to": b}), 422, "invalid-request"),
        (
            json!({"from": a, "to": b, "amount": "1", "reference": "x".repeat(141)}),
            422,
            "invalid-reference",
        ),
    ] {
        let (s, p, _) = api
            .send(
                "POST",
                "/transfers",
                Some(&body.to_string()),
                &[("idempotency-key", "bad-1")],
            )
            .await;
        assert_eq!(
            (s, p["type"].as_str()),
            (status, Some(format!("/problems/{kind}").as_str())),
            "{body}: {p}"
        );
    }
    let (s, p) = api.get("/transfers/not-an-id").await;
    assert_eq!(
        (s, p["type"].as_str()),
        (400, Some("/problems/invalid-transfer-id"))
    );
    let (s, p) = api.get(&format!("/transfers/{}", "0".repeat(32))).await;
    assert_eq!(
        (s, p["type"].as_str()),
        (404, Some("/problems/transfer-not-found"))
    );
    assert_eq!(balance_of(api, &a).await, "100.00");

    // A transfer that completes, and its retry.
    let key = format!("{prefix}-rent");
    let (s, t, location) = transfer(api, &key, &a, &b, "25.00").await;
    assert_eq!(s, 202, "{t}");
    let id = t["id"].as_str().unwrap().to_owned();
    assert_eq!(
        location.as_deref(),
        Some(format!("/transfers/{id}").as_str())
    );
    assert_eq!(
        (t["from"].as_str(), t["amount"].as_str()),
        (Some(a.as_str()), Some("25.00"))
    );
    let done = settled(api, &id, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    let steps: Vec<&str> = done["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["requested", "debited", "credited"]);
    assert_eq!(done["steps"][1]["account"], a.as_str());
    assert_eq!(done["steps"][2]["account"], b.as_str());
    assert_eq!(
        done["steps"][2]["revision"], 2,
        "b's credit is its revision 2"
    );
    let (s, again, _) = transfer(api, &key, &a, &b, "25.00").await;
    assert_eq!((s, again["id"].as_str()), (202, Some(id.as_str())));
    assert_eq!(
        again["status"], "completed",
        "a retry answers with the transfer as it is"
    );
    let (s, p, _) = transfer(api, &key, &a, &b, "26.00").await;
    assert_eq!(
        (s, p["type"].as_str()),
        (422, Some("/problems/idempotency-key-reused"))
    );
    assert_eq!(
        balance_at(api, &a, &done["steps"][1]["revision"]).await,
        "75.00"
    );
    assert_eq!(
        balance_at(api, &b, &done["steps"][2]["revision"]).await,
        "25.00"
    );
    let (_, history) = api
        .get(&format!("/accounts/{a}/transactions?min_revision=3"))
        .await;
    let out = &history["items"][1];
    assert_eq!(
        (
            out["type"].as_str(),
            out["counterparty"].as_str(),
            out["transfer"].as_str()
        ),
        (Some("transfer-out"), Some(b.as_str()), Some(id.as_str())),
        "{history}"
    );
    let (_, history) = api
        .get(&format!("/accounts/{b}/transactions?min_revision=2"))
        .await;
    assert_eq!(history["items"][0]["type"], "transfer-in", "{history}");
    assert_eq!(history["items"][0]["counterparty"], a.as_str());

    // Refusals: insufficient funds fails (nothing moved); a closed or missing
    // counterparty reverses (the debit is refunded).
    let (_, t, _) = transfer(api, &format!("{prefix}-broke"), &broke, &b, "1.00").await;
    let failed = settled(api, t["id"].as_str().unwrap(), 30).await;
    assert_eq!(
        (
            failed["status"].as_str(),
            failed["failure"]["code"].as_str()
        ),
        (Some("failed"), Some("insufficient-funds")),
        "{failed}"
    );
    let mut refunded = Value::Null;
    for (to, code) in [
        (closed.clone(), "account-closed"),
        (format!("{prefix}-nobody"), "account-not-found"),
    ] {
        let (_, t, _) = transfer(api, &format!("{prefix}-to-{to}"), &a, &to, "5.00").await;
        let reversed = settled(api, t["id"].as_str().unwrap(), 30).await;
        assert_eq!(
            (
                reversed["status"].as_str(),
                reversed["failure"]["code"].as_str(),
                reversed["failure"]["account"].as_str()
            ),
            (Some("reversed"), Some(code), Some(to.as_str())),
            "{reversed}"
        );
        // The refund is the last step, on the payer's account.
        let last = reversed["steps"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .clone();
        assert_eq!(
            (last["step"].as_str(), last["account"].as_str()),
            (Some("reversed"), Some(a.as_str())),
            "{reversed}"
        );
        refunded = last["revision"].clone();
    }
    assert_eq!(
        balance_at(api, &a, &refunded).await,
        "75.00",
        "both debits were refunded"
    );
    assert_eq!(balance_of(api, &broke).await, "0.00");
    assert_eq!(balance_of(api, &closed).await, "0.00");
    let (_, history) = api
        .get(&format!("/accounts/{a}/transactions?min_revision=7"))
        .await;
    let kinds: Vec<&str> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "deposit",
            "transfer-out",
            "transfer-out",
            "transfer-refund",
            "transfer-out",
            "transfer-refund"
        ]
    );
}

/// Seeded: `transfers` random transfers among `accounts` accounts at concurrency
/// `concurrency`, in both directions, some larger than a balance, a tenth of them sent
/// twice at once with the same key. Afterwards every transfer has ended, the total is
/// what was deposited, and each one took effect once in both accounts' histories.
pub async fn random_transfers_conserve_money(
    api: &Api,
    prefix: &str,
    seed: u64,
    accounts: usize,
    transfers: usize,
    concurrency: usize,
) {
    use futures::StreamExt;
    let mut rng = fastrand::Rng::with_seed(seed);
    let ids: Vec<String> = (0..accounts).map(|i| format!("{prefix}-{i}")).collect();
    for id in &ids {
        let (s, _) = api.post("/accounts", &json!({"ID": id}).to_string()).await;
        assert_eq!(s, 201);
        let (s, _) = api
            .post(
                &format!("/accounts/{id}/deposit"),
                r#"{"Amount": "100.00"}"#,
            )
            .await;
        assert_eq!(s, 200);
    }
    let plan: Vec<(String, usize, usize, String, bool)> = (0..transfers)
        .map(|n| {
            let from = rng.usize(..accounts);
            let to = (from + 1 + rng.usize(..accounts - 1)) % accounts;
            let cents = rng.u64(1..6_000);
            let amount = format!("{}.{:02}", cents / 100, cents % 100);
            (
                format!("{prefix}-t{n}"),
                from,
                to,
                amount,
                rng.u8(..10) == 0,
            )
        })
        .collect();
    let ids_ref = &ids;
    let requested: Vec<(String, String)> = futures::stream::iter(plan)
        .map(|(key, from, to, amount, twice)| async move {
            let send = || transfer(api, &key, &ids_ref[from], &ids_ref[to], &amount);
            let (first, second) = if twice {
                let (x, y) = tokio::join!(send(), send());
                (x, Some(y))
            } else {
                (send().await, None)
            };
            let mut id = None;
            for (s, b, _) in std::iter::once(first).chain(second) {
                match s {
                    202 => {
                        let got = b["id"].as_str().unwrap().to_owned();
                        assert!(
                            id.as_ref().is_none_or(|i| *i == got),
                            "one key, one transfer"
                        );
                        id = Some(got);
                    }
                    503 => {}
                    other => panic!("transfer {key}: {other} {b}"),
                }
            }
            let id = id.unwrap_or_else(|| panic!("transfer {key}: no 202"));
            (key, id)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;

    let mut ended = std::collections::BTreeMap::new();
    for (_, id) in &requested {
        let t = settled(api, id, 120).await;
        ended.insert(id.clone(), t);
    }
    // Each account at least at the newest revision a transfer's step wrote to it (an
    // ended transfer's last step may not be projected yet).
    let mut written: std::collections::HashMap<String, u64> = Default::default();
    for step in ended.values().flat_map(|t| t["steps"].as_array().unwrap()) {
        if let (Some(account), Some(revision)) =
            (step["account"].as_str(), step["revision"].as_u64())
        {
            let at_least = written.entry(account.to_owned()).or_default();
            *at_least = (*at_least).max(revision);
        }
    }
    // Each account's history: every transfer's movements, by transfer id.
    let mut total = 0i64;
    let mut moves: std::collections::HashMap<(String, String), Vec<String>> = Default::default();
    for id in &ids {
        let min = written.get(id).copied().unwrap_or(0);
        let (s, a) = api.get(&format!("/accounts/{id}?min_revision={min}")).await;
        assert_eq!(s, 200);
        let revision = a["revision"].as_u64().unwrap();
        let balance = a["balance"].as_str().unwrap();
        total += crate::cases::cents(balance);
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!(
                    "/accounts/{id}/transactions?min_revision={revision}&limit=100&cursor={c}"
                ),
                None => format!("/accounts/{id}/transactions?min_revision={revision}&limit=100"),
            };
            let (s, page) = api.get(&path).await;
            assert_eq!(s, 200, "{page}");
            for item in page["items"].as_array().unwrap() {
                assert!(
                    !item["balance"].as_str().unwrap().starts_with('-'),
                    "a negative balance: {item}"
                );
                if let Some(t) = item["transfer"].as_str() {
                    moves
                        .entry((t.to_owned(), id.clone()))
                        .or_default()
                        .push(item["type"].as_str().unwrap().to_owned());
                }
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
    }
    assert_eq!(
        total,
        100 * 100 * accounts as i64,
        "money is conserved: every balance sums to what was deposited"
    );
    for (id, t) in &ended {
        let from = t["from"].as_str().unwrap().to_owned();
        let to = t["to"].as_str().unwrap().to_owned();
        let on = |account: &str| {
            moves
                .get(&(id.clone(), account.to_owned()))
                .cloned()
                .unwrap_or_default()
        };
        let (expected_from, expected_to): (&[&str], &[&str]) = match t["status"].as_str().unwrap() {
            "completed" => (&["transfer-out"], &["transfer-in"]),
            "failed" => (&[], &[]),
            "reversed" => (&["transfer-out", "transfer-refund"], &[]),
            other => panic!("transfer {id} ended {other}"),
        };
        assert_eq!(on(&from), expected_from, "transfer {id} on {from}: {t}");
        assert_eq!(on(&to), expected_to, "transfer {id} on {to}: {t}");
    }
}

/// Decimal text with two decimals ("12.34") in cents.
pub fn cents(text: &str) -> i64 {
    let (whole, frac) = text.split_once('.').unwrap_or((text, "0"));
    whole.parse::<i64>().unwrap() * 100 + frac.parse::<i64>().unwrap()
}
