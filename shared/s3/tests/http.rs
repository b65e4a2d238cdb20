//! How the S3 client talks HTTP, against a scripted fake server on 127.0.0.1: what it
//! retries and what it does not, what a request carries, and what an error says.
//! (Behaviour against a real S3 server is in functions/gateway/tests/real_backends.rs.)

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally_es::{AppendError, EventStore, Revision, StoreError, StoredCommit, StreamId};
use tally_s3::{S3Config, S3EventStore};

/// What the fake server saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path_and_query: String,
    if_none_match: Option<String>,
    content_length: Option<String>,
    authorization: Option<String>,
}

#[derive(Clone, Default)]
struct Fake {
    /// The answers still to give, in order; the last one repeats.
    script: Arc<Mutex<VecDeque<(u16, &'static str)>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

async fn answer(State(fake): State<Fake>, request: Request) -> impl IntoResponse {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    fake.seen.lock().unwrap().push(Seen {
        method: request.method().to_string(),
        path_and_query: request.uri().to_string(),
        if_none_match: header("if-none-match"),
        content_length: header("content-length"),
        authorization: header("authorization"),
    });
    let mut script = fake.script.lock().unwrap();
    let (status, body) = if script.len() > 1 {
        script.pop_front().unwrap()
    } else {
        *script.front().unwrap()
    };
    (StatusCode::from_u16(status).unwrap(), body)
}

/// A store whose endpoint is a fake server giving `script`'s answers.
async fn store_answering(script: &[(u16, &'static str)]) -> (S3EventStore, Fake) {
    let fake = Fake::default();
    fake.script.lock().unwrap().extend(script.iter().copied());
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (store_at(&endpoint), fake)
}

fn store_at(endpoint: &str) -> S3EventStore {
    S3EventStore::new(&S3Config {
        endpoint: Some(endpoint.to_owned()),
        bucket: "tally".into(),
        prefix: String::new(),
        region: "us-east-1".into(),
        access_key_id: "test".into(),
        secret_access_key: "test".into(),
        session_token: None,
    })
    .unwrap()
}

fn commit() -> StoredCommit {
    StoredCommit {
        stream: StreamId::parse("acc-1").unwrap(),
        revision: Revision::new(3),
        recorded_at: time::OffsetDateTime::now_utc(),
        events: vec![],
        metadata: Default::default(),
    }
}

fn error(code: &str, message: &str) -> &'static str {
    format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>{message}</Message></Error>")
        .leak()
}

#[tokio::test]
async fn an_append_is_a_signed_conditional_put_of_the_commit_key() {
    let (store, fake) = store_answering(&[(200, "")]).await;
    let commit = commit();
    store.append(&commit).await.unwrap();
    let seen = fake.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let put = &seen[0];
    assert_eq!(put.method, "PUT");
    assert!(
        put.path_and_query
            .starts_with("/tally/streams/acc-1/00000000000000000003.json"),
        "path-style key: {}",
        put.path_and_query
    );
    assert_eq!(put.if_none_match.as_deref(), Some("*"));
    let authorization = put.authorization.as_deref().unwrap_or_default();
    assert!(
        authorization.starts_with("AWS4-HMAC-SHA256 Credential=test/")
            && authorization.contains("if-none-match")
            && authorization.contains("Signature="),
        "signed (SigV4), with If-None-Match among the signed headers: {authorization}"
    );
    assert_eq!(
        put.content_length.as_deref(),
        Some(commit.to_bytes().len().to_string().as_str())
    );
}

#[tokio::test]
async fn a_taken_key_or_a_write_in_flight_is_a_conflict_and_is_not_retried() {
    for status in [412, 409] {
        let (store, fake) = store_answering(&[(status, "")]).await;
        let outcome = store.append(&commit()).await;
        assert!(
            matches!(outcome, Err(AppendError::Conflict { .. })),
            "{status}: {outcome:?}"
        );
        assert_eq!(fake.seen.lock().unwrap().len(), 1, "{status}");
    }
}

#[tokio::test]
async fn a_server_error_is_retried_and_the_write_lands() {
    let slow_down = error("SlowDown", "Please reduce your request rate.");
    let (store, fake) = store_answering(&[(503, slow_down), (500, ""), (200, "")]).await;
    store.append(&commit()).await.unwrap();
    assert_eq!(fake.seen.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn too_many_requests_is_retried() {
    let (store, fake) = store_answering(&[(429, ""), (200, "")]).await;
    store.append(&commit()).await.unwrap();
    assert_eq!(fake.seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_server_that_keeps_failing_is_unavailable_after_three_attempts() {
    let internal = error("InternalError", "We encountered an internal error.");
    let (store, fake) = store_answering(&[(500, internal)]).await;
    let outcome = store.append(&commit()).await;
    let Err(AppendError::Unavailable(why)) = outcome else {
        panic!("expected Unavailable, got {outcome:?}");
    };
    assert!(
        why.contains("HTTP 500") && why.contains("InternalError"),
        "says why: {why}"
    );
    assert_eq!(fake.seen.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn a_refusal_is_not_retried_and_names_the_code_and_the_key() {
    let denied = error("AccessDenied", "Access Denied");
    let (store, fake) = store_answering(&[(403, denied)]).await;
    let outcome = store
        .read(&StreamId::parse("acc-1").unwrap(), Revision::new(1))
        .await;
    let Err(StoreError::Unavailable(why)) = outcome else {
        panic!("expected Unavailable, got {outcome:?}");
    };
    // A read asks for the stream's segment head first (`tally_es::segments`).
    assert!(
        why.contains("AccessDenied: Access Denied") && why.contains("segments/acc-1/head.json"),
        "says why: {why}"
    );
    assert_eq!(fake.seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_missing_bucket_says_so() {
    let (store, _) = store_answering(&[(404, "")]).await;
    let why = store.ready().await.unwrap_err().to_string();
    assert!(why.contains("bucket tally does not exist"), "{why}");
}

#[tokio::test]
async fn a_missing_object_is_none_and_a_listing_follows_continuation_tokens() {
    let page = |keys: &[&str], token: Option<&str>| -> &'static str {
        let contents: String = keys
            .iter()
            .map(|k| format!("<Contents><Key>{k}</Key><LastModified>2026-11-26T10:00:00.000Z</LastModified></Contents>"))
            .collect();
        let more = match token {
            Some(t) => format!(
                "<IsTruncated>true</IsTruncated><NextContinuationToken>{t}</NextContinuationToken>"
            ),
            None => "<IsTruncated>false</IsTruncated>".into(),
        };
        format!("<?xml version=\"1.0\"?><ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">{contents}{more}</ListBucketResult>").leak()
    };
    let (store, fake) = store_answering(&[
        (404, error("NoSuchKey", "The specified key does not exist.")),
        (
            200,
            page(&["snapshots/a/1.json", "snapshots/a/2.json"], Some("next")),
        ),
        (200, page(&["snapshots/a/3.json"], None)),
    ])
    .await;
    let stream = StreamId::parse("acc-1").unwrap();
    assert!(store
        .read_commit(&stream, Revision::new(1))
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        store.keys("snapshots/a/").await.unwrap(),
        [
            "snapshots/a/1.json",
            "snapshots/a/2.json",
            "snapshots/a/3.json"
        ]
    );
    let seen = fake.seen.lock().unwrap().clone();
    assert!(
        seen[2].path_and_query.contains("continuation-token=next"),
        "the second page asks for what follows the token: {seen:?}"
    );
}

#[tokio::test]
async fn a_warm_stream_with_nothing_new_costs_one_get_of_the_next_key() {
    let (store, fake) =
        store_answering(&[(404, error("NoSuchKey", "The specified key does not exist."))]).await;
    let stream = StreamId::parse("acc-1").unwrap();
    assert!(store
        .read_after(&stream, Revision::new(7))
        .await
        .unwrap()
        .is_empty());
    let seen = fake.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, "GET");
    assert!(
        seen[0]
            .path_and_query
            .starts_with("/tally/streams/acc-1/00000000000000000008.json"),
        "{seen:?}"
    );
}

#[tokio::test]
async fn nothing_listening_is_unavailable_within_the_operation_timeout() {
    // A port that was free a moment ago: connections are refused.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let store = store_at(&format!("http://127.0.0.1:{port}"));
    let started = Instant::now();
    let outcome = store.append(&commit()).await;
    assert!(
        matches!(outcome, Err(AppendError::Unavailable(_))),
        "{outcome:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn an_endpoint_that_is_not_a_url_is_refused_at_construction() {
    let mut config = S3Config {
        endpoint: Some("127.0.0.1:9000".into()),
        bucket: "tally".into(),
        prefix: String::new(),
        region: "us-east-1".into(),
        access_key_id: "test".into(),
        secret_access_key: "test".into(),
        session_token: None,
    };
    let why = S3EventStore::new(&config).unwrap_err();
    assert!(why.contains("127.0.0.1:9000"), "{why}");
    config.endpoint = Some("ftp://127.0.0.1/".into());
    assert!(S3EventStore::new(&config).is_err());
}
