//! The gateway binary's life in server mode: JSON logs with request ids, readiness that
//! follows its backend, and a graceful exit on SIGTERM.

use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_gateway");

#[tokio::test]
async fn it_logs_json_with_request_ids_follows_its_store_for_readiness_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(BIN)
        .env_clear()
        .env("TALLY_DATA_DIR", &data)
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..300 {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            ready = r.status().is_success();
            if ready {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready, "the gateway became ready");
    let r = client
        .post(format!("{base}/accounts"))
        .header("content-type", "application/json")
        .header("x-request-id", "trace-me-42")
        .body(r#"{"ID": "logged"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(probe(port).success(), "`gateway probe` says ready");

    // Readiness follows the store: take its directory away, and /readyz says 503.
    std::fs::remove_dir_all(&data).unwrap();
    let r = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "alive even when not ready");
    assert!(!probe(port).success(), "`gateway probe` says not ready");
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert!(!probe(nobody).success(), "nothing listening: not ready");

    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the gateway stops within 10 s of SIGTERM")
        .unwrap();
    assert!(exit.success(), "a graceful stop exits 0, got {exit}");

    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut logs = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        let value: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        logs.push(value);
    }
    assert!(
        logs.iter()
            .any(|l| l["request_id"] == "trace-me-42" || l["span"]["request_id"] == "trace-me-42"),
        "a log line carries the request id: {logs:#?}"
    );
    assert!(logs.iter().any(|l| l["message"] == "stopped"), "{logs:#?}");
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status_never_by_account_id() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = tally_testkit::Function::server(BIN, dir.path()).await;
    let base = gateway.base_url().unwrap().to_string();
    let client = reqwest::Client::new();
    let open = |id: &'static str| {
        client
            .post(format!("{base}/accounts"))
            .header("content-type", "application/json")
            .body(format!(r#"{{"ID": "{id}"}}"#))
            .send()
    };
    assert_eq!(open("metered-1").await.unwrap().status(), 201);
    assert_eq!(open("metered-2").await.unwrap().status(), 201);
    assert_eq!(open("metered-1").await.unwrap().status(), 409);
    let r = client
        .get(format!("{base}/accounts/metered-1/balance"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let r = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = r.text().await.unwrap();
    let count = |labels: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("tally_http_requests_total{")
                    && labels.split(',').all(|p| l.contains(p))
            })
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_else(|| panic!("no counter with {labels} in:\n{text}"))
            .to_string()
    };
    assert_eq!(count(r#"route="/accounts",status="201""#), "2");
    assert_eq!(count(r#"route="/accounts",status="409""#), "1");
    assert_eq!(count(r#"route="/accounts/{id}/balance",status="200""#), "1");
    assert!(
        text.contains("tally_http_request_duration_seconds_bucket{"),
        "{text}"
    );
    assert!(
        !text.contains("metered-1"),
        "account ids never become label values"
    );
}

/// `gateway probe` against 127.0.0.1:`port` (the health check of the container image).
fn probe(port: u16) -> std::process::ExitStatus {
    std::process::Command::new(BIN)
        .arg("probe")
        .env_clear()
        .env("PORT", port.to_string())
        .status()
        .unwrap()
}

/// Slow and greedy clients: a flood of half-sent requests holds a bounded number of
/// connections for a bounded time, a normal request is served meanwhile, and a body
/// that stops arriving is answered 408 and its connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_dropped_and_never_crowd_out_a_normal_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("TALLY_HEADER_TIMEOUT_MS", "1000"),
        ("TALLY_MAX_CONNECTIONS", "100"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let gateway = tally_testkit::Function::server_with(BIN, dir.path(), &env).await;
    let base = gateway.base_url().unwrap().to_owned();
    let addr = base.trim_start_matches("http://").to_owned();

    // 400 connections, each with half a request head, held open by the client.
    let mut slow = Vec::new();
    for _ in 0..400 {
        let addr = addr.clone();
        slow.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await.ok()?;
            s.write_all(b"POST /accounts HTTP/1.1\r\nhost: x\r\ncontent-type: appl")
                .await
                .ok()?;
            let started = std::time::Instant::now();
            let mut buf = [0u8; 512];
            // The server closes it (EOF or reset); the client never would.
            let closed = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await;
            closed.ok().map(|_| started.elapsed())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{base}/accounts"))
        .header("content-type", "application/json")
        .body(r#"{"ID": "still-served"}"#)
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    eprintln!(
        "a normal request among 400 half-sent ones: {:?}",
        started.elapsed()
    );
    let mut held = vec![];
    for task in slow {
        held.push(
            task.await
                .unwrap()
                .expect("the server closed the half-sent request"),
        );
    }
    held.sort();
    eprintln!(
        "half-sent requests closed after {:?} .. {:?}",
        held[0],
        held[held.len() - 1]
    );
    assert!(held[held.len() - 1] < Duration::from_secs(15));

    // A head in full, a body that stops half way: 408, and the connection is closed.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"POST /accounts HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\r\n{\"ID\": ")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_string(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("/problems/request-timeout"), "{answer}");
    drop(gateway);
}

/// A holder's details never reach a log line, at any level: not when the account is
/// opened or read, not when they are forgotten.
#[tokio::test]
async fn a_holders_details_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(BIN)
        .env_clear()
        .env("TALLY_DATA_DIR", dir.path().join("data"))
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("RUST_LOG", "trace")
        .env("TALLY_LOG_SPANS", "1")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (name, email) = ("Grace Hopper-51c0", "grace.51c0@example.com");
    let send = |method: reqwest::Method, path: &str, body: Option<String>| {
        let mut req = client.request(method, format!("{base}{path}"));
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        req.send()
    };
    let opened = send(
        reqwest::Method::POST,
        "/accounts",
        Some(
            serde_json::json!({"ID": "logged", "holder": {"name": name, "email": email}})
                .to_string(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(opened.status(), 201);
    let read = send(reqwest::Method::GET, "/accounts/logged", None)
        .await
        .unwrap();
    assert!(
        read.text().await.unwrap().contains(name),
        "the owner sees the details"
    );
    let forgot = send(reqwest::Method::POST, "/accounts/logged/forget", None)
        .await
        .unwrap();
    assert_eq!(forgot.status(), 200);
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    child.wait().await.unwrap();
    let mut logs = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .await
        .unwrap();
    assert!(logs.lines().count() > 20, "trace logging was on");
    assert!(!logs.contains(name), "a log line holds the name");
    assert!(!logs.contains(email), "a log line holds the email");
}
