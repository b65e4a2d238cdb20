//! A fake Lambda Runtime API, enough for `lambda_runtime` to fetch events and post
//! responses, and API Gateway v2 events.

use crate::{Answer, Req};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Result<Value, Value>>>>>;

#[derive(Clone)]
struct Shared {
    events: Arc<tokio::sync::Mutex<mpsc::Receiver<(String, Value)>>>,
    pending: Pending,
}

/// The Runtime API a Lambda function polls, on 127.0.0.1.
pub struct FakeLambdaRuntime {
    address: String,
    sender: mpsc::Sender<(String, Value)>,
    pending: Pending,
    server: tokio::task::JoinHandle<()>,
}

impl FakeLambdaRuntime {
    /// Start serving on a free loopback port.
    pub async fn start() -> Self {
        let (sender, receiver) = mpsc::channel(16);
        let pending: Pending = Arc::default();
        let shared = Shared {
            events: Arc::new(tokio::sync::Mutex::new(receiver)),
            pending: pending.clone(),
        };
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(response),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            address,
            sender,
            pending,
            server,
        }
    }

    /// `host:port`, the value of `AWS_LAMBDA_RUNTIME_API`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Hand `event` to the function; its response, or the error it reported.
    pub async fn invoke_raw(&self, event: Value) -> Result<Value, Value> {
        let id = format!("req-{:032x}", fastrand::u128(..));
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id.clone(), tx);
        self.sender.send((id, event)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .expect("the function answered within 30 s")
            .expect("the runtime stayed up")
    }

    /// Hand `event` to the function and wait for its API Gateway v2 response.
    pub async fn invoke(&self, event: Value) -> Answer {
        let response = self
            .invoke_raw(event)
            .await
            .unwrap_or_else(|e| panic!("the function reported an error: {e}"));
        let status = response["statusCode"].as_u64().unwrap_or(0) as u16;
        let headers = response["headers"].as_object().cloned().unwrap_or_default();
        let content_type = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .and_then(|(_, v)| v.as_str())
            .unwrap_or("")
            .to_owned();
        let raw = response["body"].as_str().unwrap_or("").to_owned();
        let text = if response["isBase64Encoded"].as_bool() == Some(true) {
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(raw)
                    .unwrap(),
            )
            .unwrap()
        } else {
            raw
        };
        Answer {
            status,
            content_type,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        }
    }
}

impl Drop for FakeLambdaRuntime {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn next(State(shared): State<Shared>) -> impl IntoResponse {
    let (id, event) = shared
        .events
        .lock()
        .await
        .recv()
        .await
        .expect("the test keeps the runtime alive");
    let deadline = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 30_000;
    let mut headers = HeaderMap::new();
    headers.insert("lambda-runtime-aws-request-id", id.parse().unwrap());
    headers.insert(
        "lambda-runtime-deadline-ms",
        deadline.to_string().parse().unwrap(),
    );
    headers.insert(
        "lambda-runtime-invoked-function-arn",
        "arn:aws:lambda:us-east-1:000000000000:function:test"
            .parse()
            .unwrap(),
    );
    headers.insert(
        "lambda-runtime-trace-id",
        "Root=1-00000000-000000000000000000000000".parse().unwrap(),
    );
    headers.insert("content-type", "application/json".parse().unwrap());
    (headers, event.to_string())
}

fn finish(shared: &Shared, id: &str, result: Result<Value, Value>) -> StatusCode {
    match shared.pending.lock().unwrap().remove(id) {
        Some(tx) => {
            let _ = tx.send(result);
            StatusCode::ACCEPTED
        }
        None => StatusCode::NOT_FOUND,
    }
}

async fn response(
    State(shared): State<Shared>,
    Path(id): Path<String>,
    body: String,
) -> StatusCode {
    finish(
        &shared,
        &id,
        Ok(serde_json::from_str(&body).unwrap_or(Value::String(body))),
    )
}

async fn error(State(shared): State<Shared>, Path(id): Path<String>, body: String) -> StatusCode {
    finish(
        &shared,
        &id,
        Err(serde_json::from_str(&body).unwrap_or(Value::String(body))),
    )
}

async fn init_error(body: String) -> StatusCode {
    eprintln!("function init error: {body}");
    StatusCode::ACCEPTED
}

/// An API Gateway HTTP API (payload 2.0) / function URL event for `req`.
pub fn apigw_v2_event(req: &Req) -> Value {
    let (path, query) = match req.uri.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (req.uri.clone(), String::new()),
    };
    let mut headers = serde_json::Map::new();
    headers.insert("host".into(), json!("abc123.lambda-url.us-east-1.on.aws"));
    for (k, v) in &req.headers {
        headers.insert(k.to_ascii_lowercase(), json!(v));
    }
    let mut query_map = serde_json::Map::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        query_map.insert(k.to_owned(), json!(v));
    }
    json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": headers,
        "queryStringParameters": if query_map.is_empty() { Value::Null } else { Value::Object(query_map) },
        "requestContext": {
            "accountId": "000000000000",
            "apiId": "abc123",
            "domainName": "abc123.lambda-url.us-east-1.on.aws",
            "domainPrefix": "abc123",
            "http": {
                "method": req.method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
                "userAgent": "tally-testkit"
            },
            "requestId": "test-request",
            "routeKey": "$default",
            "stage": "$default",
            "time": "26/Nov/2026:10:00:00 +0000",
            "timeEpoch": 1_795_000_000_000u64
        },
        "body": req.body,
        "isBase64Encoded": false
    })
}
