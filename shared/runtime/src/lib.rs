//! `tally-runtime`: how every Tally function runs.
//!
//! [`serve`] takes a function's router and runs it
//!
//! * under the Lambda runtime (`lambda_http`) when `AWS_LAMBDA_RUNTIME_API` is set —
//!   `cargo lambda watch`, AWS Lambda;
//! * otherwise as a plain HTTP server on `$HOST:$PORT` (default `0.0.0.0:8080`) — a
//!   pod, `make dev`, tests — bounded against slow and greedy clients ([`server`]: a
//!   header timeout, a connection limit) and shutting down gracefully on SIGTERM or
//!   Ctrl-C.
//!
//! Both modes get the same layers: `/healthz` (the process is alive), `/readyz` (its
//! backends answer), an `x-request-id` on every request and response, a tracing span
//! per request, panics turned into a 500 problem, and problem+json for unknown routes
//! and methods. Logs are JSON lines on stdout, filtered by `RUST_LOG`. `/metrics`
//! serves Prometheus text: requests and their latency per function, route, method and
//! status (`tally_http_requests_total`, `tally_http_request_duration_seconds`).
//!
//! Handlers read ids and query parameters from the URI only: Lambda-only request
//! extensions do not exist in server mode.

mod problem;

/// Every binary's allocator: mimalloc in place of glibc's malloc. A command, a query and
/// a rebuild allocate in many small pieces (JSON, headers, the S3 SDK's layers); glibc
/// spent 12–16 % of the functions' CPU and ≈ 23 % of a rebuild's in malloc and free
/// (`perf`; bench/README "The allocator and COPY in the rebuild").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
pub mod server;
mod telemetry;

pub use problem::{problem, Problem};

use async_trait::async_trait;
use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use std::sync::Arc;
use tower_http::{
    catch_panic::CatchPanicLayer,
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::{DefaultOnResponse, TraceLayer},
};

/// The error type of `main`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What `/readyz` asks.
#[async_trait]
pub trait Readiness: Send + Sync + 'static {
    /// `Ok` when the function's backends can serve requests.
    async fn check(&self) -> Result<(), String>;
}

/// Always ready (for functions without backends).
pub struct AlwaysReady;

#[async_trait]
impl Readiness for AlwaysReady {
    async fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Set up JSON logs on stdout, filtered by `RUST_LOG` (default `info`). Safe to call
/// more than once. With `TALLY_LOG_SPANS=1`, every enabled span logs when it closes,
/// with `time.busy` and `time.idle`: the stages of a command (`command.load`,
/// `command.append`, ... at `debug`, so `RUST_LOG=info,tally_app=debug`) and the S3
/// SDK's calls (`RUST_LOG=aws_sdk_s3=debug`, one span per call named after its
/// operation), for finding where time goes.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let spans = match std::env::var("TALLY_LOG_SPANS").as_deref() {
        Ok("1" | "true") => tracing_subscriber::fmt::format::FmtSpan::CLOSE,
        _ => tracing_subscriber::fmt::format::FmtSpan::NONE,
    };
    let _ = tracing_subscriber::fmt()
        .with_span_events(spans)
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_ansi(false)
        .try_init();
}

/// Whether this process runs under the Lambda runtime.
pub fn lambda_mode() -> bool {
    std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some()
}

/// Wrap a function's router with the health routes and the common layers.
pub fn app(function: &'static str, router: Router, readiness: Arc<dyn Readiness>) -> Router {
    telemetry::start_recorder();
    let health = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(telemetry::render))
        .with_state(readiness);
    router
        .merge(health)
        .layer(axum::middleware::from_fn(move |req, next| {
            telemetry::track(function, req, next)
        }))
        .fallback(|| async {
            problem(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not Found",
                "no route matches this path",
            )
        })
        .method_not_allowed_fallback(|| async {
            problem(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method Not Allowed",
                "this path does not accept this method",
            )
        })
        .layer(CatchPanicLayer::custom(|_| {
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal Server Error",
                "the request failed unexpectedly",
            )
            .into_response()
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http()
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO))
                .make_span_with(move |req: &http::Request<_>| {
                    let request_id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    tracing::info_span!("request", function, method = %req.method(),
                    path = %req.uri().path(), request_id)
                }),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

async fn readyz(State(readiness): State<Arc<dyn Readiness>>) -> axum::response::Response {
    match readiness.check().await {
        Ok(()) => "ready".into_response(),
        Err(reason) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "Not Ready",
            reason,
        )
        .into_response(),
    }
}

/// `<function> probe`: ask the server this process's environment describes
/// (`127.0.0.1:$PORT`) for `/readyz`, and exit 0 when it is ready, 1 otherwise — a
/// health check for images without a shell or curl (docker compose, `HEALTHCHECK`).
/// Returns without doing anything when the first argument is not `probe`.
pub async fn probe_if_asked() {
    if std::env::args().nth(1).as_deref() != Some("probe") {
        return;
    }
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let ready = tokio::time::timeout(std::time::Duration::from_secs(3), async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port.parse().ok()?))
            .await
            .ok()?;
        stream
            .write_all(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.") && &head[8..12] == b" 200")
    })
    .await;
    std::process::exit(if matches!(ready, Ok(Some(true))) {
        0
    } else {
        1
    });
}

/// Run `router` as the function `function` until the runtime or a signal stops it.
pub async fn serve(
    function: &'static str,
    router: Router,
    readiness: Arc<dyn Readiness>,
) -> Result<(), BoxError> {
    let app = app(function, router, readiness);
    if lambda_mode() {
        tracing::info!(
            function,
            mode = "lambda",
            "starting under the Lambda runtime"
        );
        return lambda_http::run(app).await;
    }
    let host = std::env::var("HOST").unwrap_or_else(|_| "0.0.0.0".into());
    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p.parse().map_err(|e| format!("PORT={p:?}: {e}"))?,
        Err(_) => 8080,
    };
    let limits = server::Limits::from_env()?;
    let listener = tokio::net::TcpListener::bind((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot listen on {host}:{port}: {e}"))?;
    tracing::info!(function, mode = "http", addr = %listener.local_addr()?,
        max_connections = limits.max_connections,
        header_timeout_ms = limits.header_timeout.as_millis() as u64, "listening");
    server::serve(listener, app, limits, shutdown_signal()).await?;
    tracing::info!(function, "stopped");
    Ok(())
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received; draining");
}
