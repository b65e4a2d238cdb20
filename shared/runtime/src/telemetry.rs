//! Prometheus metrics: one recorder per process, rendered by `GET /metrics`.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::Instant;

/// Latency buckets (seconds): sub-millisecond to seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// One request's measurements, kept while the recorder is still being built.
struct Measured {
    labels: [(&'static str, String); 3],
    status: String,
    seconds: f64,
}

/// `Some` until the recorder exists: what requests measured meanwhile.
static PENDING: Mutex<Option<Vec<Measured>>> = Mutex::new(Some(Vec::new()));
/// Set once `PENDING` has been replayed into the recorder.
static READY: AtomicBool = AtomicBool::new(false);

fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        // Slow at times: the recorder's clock (quanta) calibrates the TSC on first use,
        // for up to 200 ms on a machine whose clocks are noisy.
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
            .expect("non-empty buckets")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (a test embedding several apps):
        // then this one simply renders nothing new.
        let _ = metrics::set_global_recorder(recorder);
        let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
        for m in pending.take().unwrap_or_default() {
            record(m);
        }
        READY.store(true, Ordering::Release);
        handle
    })
}

/// Build the recorder now, on a thread of its own, so that no request waits for its
/// clock's calibration: requests measured meanwhile are kept and recorded once it
/// exists. Called when a function starts; idempotent.
pub(crate) fn start_recorder() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        std::thread::spawn(|| {
            handle();
        });
    });
}

fn record(m: Measured) {
    metrics::histogram!("tally_http_request_duration_seconds", &m.labels).record(m.seconds);
    let mut labels = m.labels.to_vec();
    labels.push(("status", m.status));
    metrics::counter!("tally_http_requests_total", &labels).increment(1);
}

/// Count the request and time it, labelled by the matched route (never the raw path,
/// which would carry account ids into label values).
/// (`app()` has started building the recorder.)
pub(crate) async fn track(function: &'static str, request: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(request).await;
    let measured = Measured {
        labels: [
            ("function", function.to_owned()),
            ("method", method),
            ("route", route),
        ],
        status: response.status().as_u16().to_string(),
        seconds: start.elapsed().as_secs_f64(),
    };
    note(measured);
    response
}

/// Record `measured` now, or keep it for the recorder if it does not exist yet.
fn note(measured: Measured) {
    if READY.load(Ordering::Acquire) {
        record(measured);
    } else {
        let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
        match pending.as_mut() {
            Some(waiting) => waiting.push(measured),
            // The recorder got there between the check and the lock.
            None => {
                drop(pending);
                record(measured);
            }
        }
    }
}

/// `GET /metrics`: the Prometheus text format.
pub(crate) async fn render() -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        handle().render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(status: &str) -> Measured {
        Measured {
            labels: [
                ("function", "t".into()),
                ("method", "GET".into()),
                ("route", "/early".into()),
            ],
            status: status.into(),
            seconds: 0.001,
        }
    }

    /// The one `/early` request counter with `status`, as `GET /metrics` renders it.
    fn count(status: &str) -> String {
        let text = handle().render();
        let counters: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.starts_with("tally_http_requests_total{")
                    && l.contains(r#"route="/early""#)
                    && l.contains(&format!(r#"status="{status}""#))
            })
            .filter_map(|l| l.rsplit(' ').next())
            .collect();
        assert_eq!(counters.len(), 1, "one counter for {status} in:\n{text}");
        counters[0].to_string()
    }

    #[test]
    fn requests_measured_before_the_recorder_exists_are_recorded_once_it_does() {
        assert!(
            !READY.load(Ordering::Acquire),
            "nothing built the recorder yet"
        );
        note(measured("200"));
        note(measured("200"));
        note(measured("404"));
        assert_eq!(PENDING.lock().unwrap().as_ref().map(Vec::len), Some(3));

        handle();
        assert!(READY.load(Ordering::Acquire));
        assert!(PENDING.lock().unwrap().is_none());
        assert_eq!(count("200"), "2");
        assert_eq!(count("404"), "1");

        // Once built, a measurement is recorded at once.
        note(measured("200"));
        assert_eq!(count("200"), "3");
    }
}
