//! The plain HTTP server, bounded against slow and greedy clients.
//!
//! * A request's head must arrive within [`Limits::header_timeout`] of the connection
//!   being ready for it (a new connection, or a kept-alive one between requests), or the
//!   connection is closed (hyper's `header_read_timeout`). A body must arrive within
//!   [`BODY_TIMEOUT`] of the handler starting to read it (the API's body extractor), or
//!   the answer is 408 and the connection is closed.
//! * At most [`Limits::max_connections`] connections are served at once; past that, new
//!   connections wait in the listen backlog until one closes, so a flood of half-sent
//!   requests holds a bounded number of sockets for a bounded time, and a normal request
//!   is still served after at most one header timeout.
//! * SIGTERM or Ctrl-C stops accepting, lets the requests in flight finish (at most
//!   [`DRAIN`]), then returns.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How long the handlers may wait for a request body (see `tally_api::extract`).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a shutdown waits for the requests in flight.
pub const DRAIN: Duration = Duration::from_secs(20);

/// The server's bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time allowed for a request's head.
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_timeout: Duration::from_secs(5),
        }
    }
}

impl Limits {
    /// The defaults, with `TALLY_MAX_CONNECTIONS` and `TALLY_HEADER_TIMEOUT_MS` if set.
    pub fn from_env() -> Result<Self, String> {
        let mut limits = Self::default();
        if let Ok(v) = std::env::var("TALLY_MAX_CONNECTIONS") {
            limits.max_connections = v
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("TALLY_MAX_CONNECTIONS={v:?}: a positive number"))?;
        }
        if let Ok(v) = std::env::var("TALLY_HEADER_TIMEOUT_MS") {
            let ms: u64 = v
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("TALLY_HEADER_TIMEOUT_MS={v:?}: a positive number"))?;
            limits.header_timeout = Duration::from_millis(ms);
        }
        Ok(limits)
    }
}

/// Serve `app` on `listener` within `limits` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment, never spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // A connection that ends in an error (a timeout, a reset) needs no report.
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after the drain period; stopping anyway");
    }
    Ok(())
}
