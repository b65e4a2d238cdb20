//! Serverless figures per function: cold start (process start → first `200` from
//! `/healthz`, on an empty data directory), the size of the binary, and resident memory
//! after 1,000 requests of the function's own route. Every function runs alone on the embedded backends (one
//! temporary data directory shared in turn), so the figures are the function's own, not
//! its backends'.

use serde::Serialize;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The HTTP functions in the order they run (commands first: they create the accounts
/// the others read), then the jobs (size only).
pub const FUNCTIONS: &[&str] = &[
    "open-account",
    "deposit",
    "withdraw",
    "close-account",
    "get-account",
    "get-balance",
    "list-transactions",
    "projector",
    "relay",
    "gateway",
];
pub const JOBS: &[&str] = &["migrate", "admin"];
/// Functions that cannot run on the embedded backends: the relay publishes the S3
/// outbox to Kafka. They get the real backends' variables, or only their size without.
pub const NEEDS_BACKENDS: &[&str] = &["relay"];
/// The variables passed to [`NEEDS_BACKENDS`] functions (from `--with-backends`).
pub const BACKEND_VARS: &[&str] = &[
    "TALLY_S3_BUCKET",
    "TALLY_S3_ENDPOINT",
    "TALLY_S3_PREFIX",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "TALLY_KAFKA_BROKERS",
    "TALLY_KAFKA_TOPIC",
];

/// The figures of one function.
#[derive(Clone, Debug, Serialize)]
pub struct FunctionFigures {
    pub function: String,
    pub binary_bytes: u64,
    /// Median of the runs (milliseconds); `None` for jobs.
    pub cold_start_ms: Option<f64>,
    pub cold_start_runs_ms: Vec<f64>,
    /// Resident set after the requests (kB, `VmRSS`).
    pub rss_after_requests_kb: Option<u64>,
    /// The requests sent, and how many got no answer or a 5xx.
    pub requests: usize,
    pub failed_requests: usize,
    /// What the requests were.
    pub route: String,
}

/// All functions.
#[derive(Clone, Debug, Serialize)]
pub struct ServerlessReport {
    pub commit: Option<String>,
    pub started_at: String,
    /// The cargo profile of the binaries measured.
    pub profile: String,
    pub functions: Vec<FunctionFigures>,
}

/// A request of function `f`, number `i`: method, path, body.
fn request(f: &str, i: usize) -> (&'static str, String, Option<String>) {
    let amount = |a: &str| Some(format!(r#"{{"Amount": "{a}"}}"#));
    match f {
        "open-account" => (
            "POST",
            "/accounts".into(),
            Some(format!(r#"{{"ID": "sl-{i}"}}"#)),
        ),
        "deposit" => ("POST", "/accounts/sl-0/deposit".into(), amount("1.00")),
        "withdraw" => ("POST", "/accounts/sl-0/withdraw".into(), amount("0.01")),
        "close-account" => ("POST", format!("/accounts/sl-{}/close", i + 1), None),
        "get-account" => ("GET", "/accounts/sl-0".into(), None),
        "get-balance" => ("GET", "/accounts/sl-0/balance".into(), None),
        "list-transactions" => ("GET", "/accounts/sl-0/transactions?limit=10".into(), None),
        "gateway" => match i % 3 {
            0 => (
                "POST",
                "/accounts".into(),
                Some(format!(r#"{{"ID": "gw-{}"}}"#, i / 3)),
            ),
            1 => (
                "POST",
                format!("/accounts/gw-{}/deposit", i / 3),
                amount("1.00"),
            ),
            _ => ("GET", format!("/accounts/gw-{}/balance", i / 3), None),
        },
        _ => ("GET", "/healthz".into(), None),
    }
}

fn route(f: &str) -> String {
    match f {
        "gateway" => "open, deposit, balance in turn".into(),
        _ => {
            let (method, path, _) = request(f, 0);
            format!(
                "{method} {}",
                path.replace("sl-0", "{id}").replace("sl-1", "{id}")
            )
        }
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn(
    binary: &Path,
    data_dir: &Path,
    port: u16,
    env: &[(String, String)],
) -> std::io::Result<Child> {
    let mut command = Command::new(binary);
    command.env_clear().envs(env.iter().cloned());
    for keep in ["PATH", "HOME", "TMPDIR"] {
        if let Ok(v) = std::env::var(keep) {
            command.env(keep, v);
        }
    }
    command
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("TALLY_DATA_DIR", data_dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// Spawn and wait for the first `200` from `/healthz`; the time it took.
async fn cold_start(
    client: &reqwest::Client,
    binary: &Path,
    data_dir: &Path,
    env: &[(String, String)],
) -> Result<(Child, u16, Duration), String> {
    let port = free_port().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut child =
        spawn(binary, data_dir, port, env).map_err(|e| format!("{}: {e}", binary.display()))?;
    let url = format!("http://127.0.0.1:{port}/healthz");
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(r) = client.get(&url).send().await {
            if r.status().is_success() {
                return Ok((child, port, start.elapsed()));
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "{} exited with {status} before answering",
                binary.display()
            ));
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let _ = child.kill();
    Err(format!(
        "{} did not answer /healthz within 10 s",
        binary.display()
    ))
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Measure every function in `bin_dir`: `runs` cold starts each (the median is
/// reported), then `requests` requests on the last process and its resident memory.
/// `backends`: the variables for [`NEEDS_BACKENDS`] functions; without them those
/// are reported by size only.
pub async fn measure(
    bin_dir: &Path,
    profile: &str,
    runs: usize,
    requests: usize,
    backends: Option<&[(String, String)]>,
    progress: impl Fn(&str),
) -> Result<ServerlessReport, String> {
    let started_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let data = tempfile::tempdir().map_err(|e| e.to_string())?;
    // A fresh connection per probe: a cold start includes the first accept.
    let probe = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| e.to_string())?;
    let client = crate::with_token(reqwest::Client::builder())
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let mut functions = Vec::new();
    for f in FUNCTIONS {
        let binary = bin_dir.join(f);
        let binary_bytes = std::fs::metadata(&binary)
            .map_err(|e| format!("{}: {e}", binary.display()))?
            .len();
        let env = match (NEEDS_BACKENDS.contains(f), backends) {
            (false, _) => Vec::new(),
            (true, Some(vars)) => vars.to_vec(),
            (true, None) => {
                functions.push(size_only(
                    f,
                    binary_bytes,
                    "(needs S3 and Kafka: --with-backends)",
                ));
                continue;
            }
        };
        progress(&format!(
            "serverless: {f}: {runs} cold starts, then {requests} requests"
        ));
        let mut starts = Vec::new();
        // Cold starts on an empty data directory: what the function itself costs, not
        // the embedded read model's catch-up of what earlier functions wrote.
        for _ in 0..runs.max(1) {
            let empty = tempfile::tempdir().map_err(|e| e.to_string())?;
            let (child, _, took) = cold_start(&probe, &binary, empty.path(), &env).await?;
            starts.push(took.as_secs_f64() * 1000.0);
            stop(child);
        }
        // The requests go to a process on the shared directory (the accounts exist).
        let (child, port, _) = cold_start(&probe, &binary, data.path(), &env).await?;
        let mut failed = 0;
        for i in 0..requests {
            let (method, path, body) = request(f, i);
            let url = format!("http://127.0.0.1:{port}{path}");
            let mut r = match method {
                "POST" => client.post(&url),
                _ => client.get(&url),
            };
            if let Some(body) = body {
                r = r.header("content-type", "application/json").body(body);
            }
            match r.send().await {
                Ok(answer) if answer.status().as_u16() < 500 => {
                    let _ = answer.bytes().await;
                }
                _ => failed += 1,
            }
        }
        let rss = rss_kb(child.id());
        stop(child);
        let mut sorted = starts.clone();
        sorted.sort_by(f64::total_cmp);
        functions.push(FunctionFigures {
            function: f.to_string(),
            binary_bytes,
            cold_start_ms: Some(sorted[sorted.len() / 2]),
            cold_start_runs_ms: starts,
            rss_after_requests_kb: rss,
            requests,
            failed_requests: failed,
            route: route(f),
        });
    }
    for job in JOBS {
        let binary = bin_dir.join(job);
        let binary_bytes = std::fs::metadata(&binary)
            .map_err(|e| format!("{}: {e}", binary.display()))?
            .len();
        functions.push(size_only(job, binary_bytes, "(a job: runs and exits)"));
    }
    Ok(ServerlessReport {
        commit: std::env::var("TALLY_BENCH_COMMIT").ok(),
        started_at,
        profile: profile.into(),
        functions,
    })
}

fn size_only(function: &str, binary_bytes: u64, why: &str) -> FunctionFigures {
    FunctionFigures {
        function: function.to_string(),
        binary_bytes,
        cold_start_ms: None,
        cold_start_runs_ms: Vec::new(),
        rss_after_requests_kb: None,
        requests: 0,
        failed_requests: 0,
        route: why.into(),
    }
}

/// The report as a Markdown table.
pub fn markdown(report: &ServerlessReport) -> String {
    let mut md = format!(
        "# tally-bench: serverless figures\n\nCommit {}, started {}, `{}` profile binaries; \
         every function alone on the embedded backends.\n\n\
         | function | binary MB | cold start ms (median) | cold starts ms | RSS MB after requests | requests (failed) | route |\n\
         | --- | ---: | ---: | --- | ---: | ---: | --- |\n",
        report.commit.as_deref().unwrap_or("unknown"),
        report.started_at,
        report.profile
    );
    for f in &report.functions {
        let mb = |bytes: u64| bytes as f64 / 1_000_000.0;
        md.push_str(&format!(
            "| {} | {:.1} | {} | {} | {} | {} ({}) | {} |\n",
            f.function,
            mb(f.binary_bytes),
            f.cold_start_ms.map_or("—".into(), |v| format!("{v:.1}")),
            f.cold_start_runs_ms
                .iter()
                .map(|v| format!("{v:.1}"))
                .collect::<Vec<_>>()
                .join(", "),
            f.rss_after_requests_kb
                .map_or("—".into(), |kb| format!("{:.1}", kb as f64 / 1000.0)),
            f.requests,
            f.failed_requests,
            f.route,
        ));
    }
    md
}
