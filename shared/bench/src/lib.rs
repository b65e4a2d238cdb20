//! `tally-bench`: the load driver behind `make bench`.
//!
//! One run drives a fixed, seeded workload over HTTP against one target (`make dev`,
//! `make stack`, a cluster): it opens `accounts` accounts, then, at each concurrency
//! level, runs `ops` operations — deposits, withdrawals, balance reads and history
//! reads in fixed proportions, on accounts drawn from a seeded generator — with
//! `concurrency` workers. Every latency goes into an HDR histogram per operation;
//! non-2xx answers are counted by status. Every `lag_every`-th acknowledged command is
//! followed by a poll of `GET /accounts/{id}` (the read model) until it shows the
//! command's revision: the projection lag.
//!
//! Then, at each concurrency level, `transfers` transfers between random pairs of the
//! same accounts: each worker sends `POST /transfers` (with an idempotency key of the
//! run's own) and polls `GET /transfers/{id}` until the transfer has ended; the
//! latency from the request to that end goes into a histogram of its own, and
//! transfers per second counts the ended ones.
//!
//! The same seed gives the same sequence of operations; timings are measured, never
//! asserted.

pub mod ceiling;
pub mod fixtures;
pub mod picture;
pub mod s3log;
pub mod serverless;

/// How long a worker waits for its transfer to end before counting it as still pending
/// (an error). Generous: on the stack over moto a transfer at c=64 takes tens of seconds
/// to end, and the figure to report is how long, not that it is slow.
pub const TRANSFER_WAIT_SECONDS: u64 = 120;

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to run.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub accounts: usize,
    /// Operations per concurrency level.
    pub ops: usize,
    pub concurrency: Vec<usize>,
    pub seed: u64,
    /// Measure the projection lag after every this-many acknowledged commands.
    pub lag_every: usize,
    /// Transfers per concurrency level (0: none).
    pub transfers: usize,
    /// A pause before each level and before the transfers, so that what one level
    /// left in flight (publishes, outbox deletes, lag probes) is done before the next
    /// begins: a level's S3 requests are counted from the server's log by the second.
    pub settle_seconds: u64,
}

impl Plan {
    /// The default run: 200 accounts, 4,000 operations at 1, 16 and 64.
    pub fn standard() -> Self {
        Self {
            accounts: 200,
            ops: 4000,
            concurrency: vec![1, 16, 64],
            seed: 42,
            lag_every: 10,
            transfers: 1000,
            settle_seconds: 2,
        }
    }

    /// `--quick`: only checks the harness works (CI).
    pub fn quick() -> Self {
        Self {
            accounts: 8,
            ops: 120,
            concurrency: vec![1, 4],
            seed: 42,
            lag_every: 5,
            transfers: 24,
            settle_seconds: 0,
        }
    }
}

/// The operations of the workload, and their share of it (per cent).
pub const MIX: &[(Op, u32)] = &[
    (Op::Deposit, 35),
    (Op::Withdraw, 25),
    (Op::Balance, 25),
    (Op::History, 15),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    Open,
    Deposit,
    Withdraw,
    Balance,
    History,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Open => "open",
            Op::Deposit => "deposit",
            Op::Withdraw => "withdraw",
            Op::Balance => "balance",
            Op::History => "history",
        }
    }

    fn is_command(self) -> bool {
        matches!(self, Op::Open | Op::Deposit | Op::Withdraw)
    }
}

/// Latency figures of one operation (milliseconds).
#[derive(Clone, Debug, Serialize)]
pub struct Figures {
    pub count: u64,
    /// Answers that were not 2xx, by status (`0`: no answer at all).
    pub errors: BTreeMap<u16, u64>,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// One concurrency level.
#[derive(Clone, Debug, Serialize)]
pub struct Level {
    pub concurrency: usize,
    pub seconds: f64,
    pub ops: BTreeMap<&'static str, Figures>,
    /// Command acknowledged → its revision visible in `GET /accounts/{id}`.
    pub projection_lag: Figures,
    /// Lag probes that never saw the revision (within 10 s).
    pub lag_timeouts: u64,
    /// Commands (deposits and withdrawals) sent per second, answered or not — what the
    /// tables and `scripts/bench-targets.py` read as the level's commands/s.
    pub commands_per_second: f64,
    /// Of those, the ones answered 2xx or 422 (a refused withdrawal), per second.
    pub successful_commands_per_second: f64,
    /// When the level began and ended (UTC, RFC 3339).
    pub window: [String; 2],
    #[serde(skip)]
    pub bounds: (time::OffsetDateTime, time::OffsetDateTime),
    /// The S3 requests the level caused, from the S3 server's log (`--s3-log`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_requests: Option<S3Requests>,
}

/// The S3 requests of one level (see [`s3log`]).
#[derive(Clone, Debug, Serialize)]
pub struct S3Requests {
    pub by_kind: BTreeMap<String, u64>,
    /// All of them over the commands (deposits and withdrawals) the level sent.
    pub per_command: f64,
}

/// The transfers of one concurrency level.
#[derive(Clone, Debug, Serialize)]
pub struct TransferLevel {
    pub concurrency: usize,
    pub seconds: f64,
    /// `POST /transfers` → its 202 (errors: answers that were not 202).
    pub request: Figures,
    /// `POST /transfers` sent → `GET /transfers/{id}` shows it ended; `per_second` is
    /// the level's transfers per second.
    pub to_end: Figures,
    /// How the transfers ended (`completed`, `failed`, `reversed`).
    pub outcomes: BTreeMap<String, u64>,
    /// Transfers still pending after [`TRANSFER_WAIT_SECONDS`] of polling.
    pub timeouts: u64,
}

/// A whole run against one target.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub target: String,
    /// The commit measured (`TALLY_BENCH_COMMIT`, set by `make bench`).
    pub commit: Option<String>,
    pub base_url: String,
    pub started_at: String,
    pub plan: Plan,
    pub setup: Figures,
    pub levels: Vec<Level>,
    /// Transfers, per concurrency level (after the mixed workload).
    pub transfers: Vec<TransferLevel>,
    /// The bare backends at the same concurrency levels (`--ceiling`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<ceiling::Ceiling>,
}

impl Report {
    /// Deposits and withdrawals sent in `level`.
    pub fn commands(&self, level: &Level) -> u64 {
        commands_in(&level.ops, false)
    }

    /// Count each level's S3 requests in `log` (the S3 server's access log) to `bucket`.
    pub fn count_s3_requests(
        &mut self,
        log: &std::path::Path,
        bucket: &str,
    ) -> std::io::Result<()> {
        for i in 0..self.levels.len() {
            // With what the level left in flight a second after its last answer.
            let (from, to) = self.levels[i].bounds;
            let by_kind = s3log::count(log, bucket, from, to + Duration::from_secs(1))?;
            let per_command = s3log::per_command(&by_kind, self.commands(&self.levels[i]));
            self.levels[i].s3_requests = Some(S3Requests {
                by_kind,
                per_command,
            });
        }
        Ok(())
    }

    /// Non-2xx answers of every operation of every level (a refused withdrawal, 422,
    /// is a normal answer, not counted).
    pub fn errors(&self) -> u64 {
        self.levels
            .iter()
            .flat_map(|l| l.ops.values())
            .chain(std::iter::once(&self.setup))
            .chain(self.transfers.iter().map(|t| &t.request))
            .flat_map(|f| f.errors.values())
            .sum::<u64>()
            + self.transfers.iter().map(|t| t.timeouts).sum::<u64>()
    }
}

struct Recorder {
    histogram: Histogram<u64>,
    errors: BTreeMap<u16, u64>,
}

impl Recorder {
    fn new() -> Self {
        Self {
            // 1 µs .. 60 s, three significant figures.
            histogram: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            errors: BTreeMap::new(),
        }
    }

    /// Record an answer; a 422 (a refused withdrawal) is a normal answer.
    fn record(&mut self, elapsed: Duration, status: u16) {
        self.record_as(
            elapsed,
            status,
            (200..300).contains(&status) || status == 422,
        );
    }

    /// Record an answer, counting `status` as an error unless `ok`.
    fn record_as(&mut self, elapsed: Duration, status: u16, ok: bool) {
        let _ = self
            .histogram
            .record((elapsed.as_micros() as u64).clamp(1, 60_000_000));
        if !ok {
            *self.errors.entry(status).or_default() += 1;
        }
    }

    fn figures(&self, seconds: f64) -> Figures {
        let ms = |v: u64| v as f64 / 1000.0;
        let h = &self.histogram;
        Figures {
            count: h.len(),
            errors: self.errors.clone(),
            per_second: if seconds > 0.0 {
                h.len() as f64 / seconds
            } else {
                0.0
            },
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

/// The HTTP side: one pooled client against `base`.
struct Target {
    client: reqwest::Client,
    base: String,
}

impl Target {
    /// Send one operation; the status (0 when no answer came) and the revision the
    /// answer carries.
    async fn send(&self, op: Op, id: &str, amount_cents: u32) -> (u16, Option<u64>) {
        let amount = format!(
            r#"{{"Amount": "{}.{:02}"}}"#,
            amount_cents / 100,
            amount_cents % 100
        );
        let request = match op {
            Op::Open => self
                .client
                .post(format!("{}/accounts", self.base))
                .header("content-type", "application/json")
                .body(format!(r#"{{"ID": "{id}"}}"#)),
            Op::Deposit | Op::Withdraw => self
                .client
                .post(format!("{}/accounts/{id}/{}", self.base, op.name()))
                .header("content-type", "application/json")
                .body(amount),
            Op::Balance => self
                .client
                .get(format!("{}/accounts/{id}/balance", self.base)),
            Op::History => self
                .client
                .get(format!("{}/accounts/{id}/transactions?limit=10", self.base)),
        };
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let revision = if op.is_command() && status < 300 {
                    response
                        .json::<serde_json::Value>()
                        .await
                        .ok()
                        .and_then(|b| b["revision"].as_u64())
                } else {
                    let _ = response.bytes().await;
                    None
                };
                (status, revision)
            }
            Err(_) => (0, None),
        }
    }

    /// Request a transfer of `cents` from `from` to `to` under `key`: the status (0
    /// when no answer came) and the transfer's id.
    async fn transfer(&self, key: &str, from: &str, to: &str, cents: u32) -> (u16, Option<String>) {
        let body = format!(
            r#"{{"from": "{from}", "to": "{to}", "amount": "{}.{:02}", "reference": "bench"}}"#,
            cents / 100,
            cents % 100
        );
        let sent = self
            .client
            .post(format!("{}/transfers", self.base))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(body)
            .send()
            .await;
        match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                let body = response.json::<serde_json::Value>().await.ok();
                let id = body.and_then(|b| b["id"].as_str().map(str::to_owned));
                (status, id)
            }
            Err(_) => (0, None),
        }
    }

    /// Poll `GET /transfers/{id}` until the transfer has ended (within
    /// [`TRANSFER_WAIT_SECONDS`]): its final status. The interval grows from 1 ms to
    /// 10 ms, so polling neither floods the query nor blurs the latency by more than
    /// that.
    async fn transfer_end(&self, id: &str) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(TRANSFER_WAIT_SECONDS);
        let path = format!("/transfers/{id}");
        self.poll_json(&path, deadline, Duration::from_millis(10), |body| {
            body["status"]
                .as_str()
                .filter(|s| matches!(*s, "completed" | "failed" | "reversed"))
                .map(str::to_owned)
        })
        .await
    }

    /// Poll the read model until account `id` shows `revision`; the time it took.
    async fn lag(&self, id: &str, revision: u64, since: Instant) -> Option<Duration> {
        let deadline = since + Duration::from_secs(10);
        let path = format!("/accounts/{id}");
        self.poll_json(&path, deadline, Duration::from_millis(1), |body| {
            body["revision"]
                .as_u64()
                .is_some_and(|r| r >= revision)
                .then(|| since.elapsed())
        })
        .await
    }

    /// GET `path` until `found` takes something from its JSON body, or `deadline`
    /// passes; the pause between tries starts at 1 ms and grows by half up to `longest`.
    async fn poll_json<T>(
        &self,
        path: &str,
        deadline: Instant,
        longest: Duration,
        found: impl Fn(&serde_json::Value) -> Option<T>,
    ) -> Option<T> {
        let mut pause = Duration::from_millis(1);
        while Instant::now() < deadline {
            if let Ok(r) = self.client.get(format!("{}{path}", self.base)).send().await {
                if let Ok(body) = r.json::<serde_json::Value>().await {
                    if let Some(value) = found(&body) {
                        return Some(value);
                    }
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 3 / 2).min(longest);
        }
        None
    }
}

/// Run `plan` against `base` (e.g. `http://127.0.0.1:8080`), calling `progress` with a
/// line now and then.
pub async fn run(target: &str, base: &str, plan: &Plan, progress: impl Fn(&str)) -> Report {
    let started_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let http = Arc::new(Target {
        client: with_token(reqwest::Client::builder())
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(30))
            .build()
            .expect("an HTTP client"),
        base: base.trim_end_matches('/').to_string(),
    });
    // Account ids unique to this run, so runs against one store never collide.
    let nonce = format!("{:08x}", fastrand::u32(..));
    let ids: Arc<Vec<String>> = Arc::new(
        (0..plan.accounts)
            .map(|i| format!("bench-{nonce}-{i}"))
            .collect(),
    );

    progress(&format!("{target}: opening {} accounts", plan.accounts));
    let setup_start = Instant::now();
    let mut setup = Recorder::new();
    for chunk in ids.chunks(16) {
        let answers = futures::future::join_all(chunk.iter().map(|id| {
            let http = http.clone();
            async move {
                let start = Instant::now();
                let (status, _) = http.send(Op::Open, id, 0).await;
                let (deposit, _) = http.send(Op::Deposit, id, 1_000_00).await;
                (start.elapsed(), status.max(deposit))
            }
        }))
        .await;
        for (elapsed, status) in answers {
            setup.record(elapsed, status);
        }
    }
    let setup = setup.figures(setup_start.elapsed().as_secs_f64());

    let mut levels = Vec::new();
    for (n, &concurrency) in plan.concurrency.iter().enumerate() {
        progress(&format!(
            "{target}: {} operations at concurrency {concurrency}",
            plan.ops
        ));
        tokio::time::sleep(Duration::from_secs(plan.settle_seconds)).await;
        levels.push(level(&http, &ids, plan, concurrency, n as u64, &progress).await);
    }
    let mut transfers = Vec::new();
    if plan.transfers > 0 && ids.len() >= 2 {
        // Apart from the last level as the levels are from each other: a level's S3
        // requests are counted in whole seconds, and the first transfers' would
        // otherwise fall in its last one.
        tokio::time::sleep(Duration::from_secs(plan.settle_seconds)).await;
        for (n, &concurrency) in plan.concurrency.iter().enumerate() {
            progress(&format!(
                "{target}: {} transfers at concurrency {concurrency}",
                plan.transfers
            ));
            let keys = format!("bench-{nonce}-{n}");
            transfers.push(transfer_level(&http, &ids, plan, concurrency, &keys, n as u64).await);
        }
    }
    Report {
        target: target.into(),
        commit: std::env::var("TALLY_BENCH_COMMIT").ok(),
        base_url: base.into(),
        started_at,
        plan: plan.clone(),
        setup,
        levels,
        transfers,
        ceiling: None,
    }
}

/// `plan.transfers` transfers with `concurrency` workers, each waiting for its
/// transfer to end before it requests the next.
async fn transfer_level(
    http: &Arc<Target>,
    ids: &Arc<Vec<String>>,
    plan: &Plan,
    concurrency: usize,
    keys: &str,
    level_no: u64,
) -> TransferLevel {
    struct Tally {
        request: Recorder,
        to_end: Recorder,
        outcomes: BTreeMap<String, u64>,
        timeouts: u64,
    }
    let tally = Arc::new(Mutex::new(Tally {
        request: Recorder::new(),
        to_end: Recorder::new(),
        outcomes: BTreeMap::new(),
        timeouts: 0,
    }));
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (http, ids, tally) = (http.clone(), ids.clone(), tally.clone());
            let share =
                plan.transfers / concurrency + usize::from(w < plan.transfers % concurrency);
            let seed = plan.seed ^ 0x7472_616e ^ (level_no << 32) ^ w as u64;
            let keys = format!("{keys}-{w}");
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(seed);
                for i in 0..share {
                    let from = rng.usize(..ids.len());
                    let to = (from + rng.usize(1..ids.len())) % ids.len();
                    let cents = rng.u32(1..=1_00);
                    let sent = Instant::now();
                    let (status, id) = http
                        .transfer(&format!("{keys}-{i}"), &ids[from], &ids[to], cents)
                        .await;
                    let requested = sent.elapsed();
                    // 202 is the only answer a well-formed transfer gets.
                    let accepted = status == 202;
                    tally
                        .lock()
                        .expect("tally")
                        .request
                        .record_as(requested, status, accepted);
                    let Some(id) = id.filter(|_| accepted) else {
                        continue;
                    };
                    let end = http.transfer_end(&id).await;
                    let mut tally = tally.lock().expect("tally");
                    match end {
                        Some(outcome) => {
                            tally.to_end.record(sent.elapsed(), 200);
                            *tally.outcomes.entry(outcome).or_default() += 1;
                        }
                        None => tally.timeouts += 1,
                    }
                }
            })
        })
        .collect();
    futures::future::join_all(workers).await;
    let seconds = start.elapsed().as_secs_f64();
    let tally = tally.lock().expect("tally");
    TransferLevel {
        concurrency,
        seconds,
        request: tally.request.figures(seconds),
        to_end: tally.to_end.figures(seconds),
        outcomes: tally.outcomes.clone(),
        timeouts: tally.timeouts,
    }
}

async fn level(
    http: &Arc<Target>,
    ids: &Arc<Vec<String>>,
    plan: &Plan,
    concurrency: usize,
    level_no: u64,
    progress: &impl Fn(&str),
) -> Level {
    let recorders: Arc<Mutex<BTreeMap<Op, Recorder>>> = Arc::new(Mutex::new(
        MIX.iter().map(|(op, _)| (*op, Recorder::new())).collect(),
    ));
    let lag = Arc::new(Mutex::new((Recorder::new(), 0u64)));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let began = time::OffsetDateTime::now_utc();
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (http, ids, recorders, lag, done) = (
                http.clone(),
                ids.clone(),
                recorders.clone(),
                lag.clone(),
                done.clone(),
            );
            let share = plan.ops / concurrency + usize::from(w < plan.ops % concurrency);
            let seed = plan.seed ^ (level_no << 32) ^ w as u64;
            let lag_every = plan.lag_every.max(1);
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(seed);
                let mut probes = Vec::new();
                for i in 0..share {
                    let op = pick(&mut rng);
                    let id = &ids[rng.usize(..ids.len())];
                    let cents = rng.u32(1..=5_00);
                    let sent = Instant::now();
                    let (status, revision) = http.send(op, id, cents).await;
                    let elapsed = sent.elapsed();
                    recorders
                        .lock()
                        .expect("recorders")
                        .get_mut(&op)
                        .expect("an op of the mix")
                        .record(elapsed, status);
                    if let (true, Some(revision)) = (i % lag_every == 0, revision) {
                        let (http, id, lag) = (http.clone(), id.clone(), lag.clone());
                        let acked = Instant::now();
                        probes.push(tokio::spawn(async move {
                            let took = http.lag(&id, revision, acked).await;
                            let mut lag = lag.lock().expect("lag");
                            match took {
                                Some(t) => lag.0.record(t, 200),
                                None => lag.1 += 1,
                            }
                        }));
                    }
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                for p in probes {
                    let _ = p.await;
                }
            })
        })
        .collect();
    let ticker = {
        let done = done.clone();
        let total = plan.ops;
        let report = move |d: usize| {
            format!(
                "  {d}/{total} ({:.0}/s)",
                d as f64 / start.elapsed().as_secs_f64()
            )
        };
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                progress(&report(done.load(std::sync::atomic::Ordering::Relaxed)));
            }
        }
    };
    tokio::select! {
        _ = futures::future::join_all(workers) => {}
        _ = ticker => {}
    }
    let seconds = start.elapsed().as_secs_f64();
    let ops = recorders
        .lock()
        .expect("recorders")
        .iter()
        .map(|(op, r)| (op.name(), r.figures(seconds)))
        .collect();
    let lag = lag.lock().expect("lag");
    let ended = time::OffsetDateTime::now_utc();
    let rfc3339 = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let per_second = |n: u64| n as f64 / seconds.max(1e-9);
    Level {
        concurrency,
        seconds,
        commands_per_second: per_second(commands_in(&ops, false)),
        successful_commands_per_second: per_second(commands_in(&ops, true)),
        ops,
        projection_lag: lag.0.figures(seconds),
        lag_timeouts: lag.1,
        window: [rfc3339(began), rfc3339(ended)],
        bounds: (began, ended),
        s3_requests: None,
    }
}

/// The deposits and withdrawals among `ops`: all sent, or only those answered as
/// [`Recorder::record`] counts success.
fn commands_in(ops: &BTreeMap<&'static str, Figures>, successful: bool) -> u64 {
    ["deposit", "withdraw"]
        .iter()
        .filter_map(|op| ops.get(op))
        .map(|f| {
            let failed = if successful {
                f.errors.values().sum::<u64>()
            } else {
                0
            };
            f.count.saturating_sub(failed)
        })
        .sum()
}

fn pick(rng: &mut fastrand::Rng) -> Op {
    let mut roll = rng.u32(0..100);
    for (op, share) in MIX {
        if roll < *share {
            return *op;
        }
        roll -= share;
    }
    MIX[0].0
}

/// A table's errors cell: each status with its count, then how many were still
/// pending at the deadline; a dash for none.
fn errors_cell(errors: &BTreeMap<u16, u64>, pending: u64) -> String {
    let mut cells: Vec<String> = errors.iter().map(|(s, n)| format!("{s}×{n}")).collect();
    if pending > 0 {
        cells.push(format!("{pending} still pending"));
    }
    if cells.is_empty() {
        "—".to_string()
    } else {
        cells.join(" ")
    }
}

/// The report as a Markdown table per level.
pub fn markdown(report: &Report) -> String {
    let mut md = format!(
        "# tally-bench: {} ({})\n\nCommit {}, started {}; {} accounts, {} operations per level, seed {}.\n",
        report.target,
        report.base_url,
        report.commit.as_deref().unwrap_or("unknown"),
        report.started_at,
        report.plan.accounts,
        report.plan.ops,
        report.plan.seed
    );
    for level in &report.levels {
        md.push_str(&format!(
            "\n## concurrency {} ({:.1} s)\n\n| operation | count | per s | p50 ms | p90 ms | p99 ms | max ms | errors |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
            level.concurrency, level.seconds
        ));
        let rows = level
            .ops
            .iter()
            .map(|(name, f)| (name.to_string(), f))
            .chain(std::iter::once((
                format!("projection lag ({} timeouts)", level.lag_timeouts),
                &level.projection_lag,
            )));
        for (name, f) in rows {
            let errors = errors_cell(&f.errors, 0);
            md.push_str(&format!(
                "| {name} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {errors} |\n",
                f.count, f.per_second, f.p50_ms, f.p90_ms, f.p99_ms, f.max_ms
            ));
        }
        if let Some(s3) = &level.s3_requests {
            let kinds = s3
                .by_kind
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            md.push_str(&format!(
                "\nS3 requests: {:.2} per command ({} in all: {kinds}).\n",
                s3.per_command,
                s3.by_kind.values().sum::<u64>()
            ));
        }
    }
    if !report.transfers.is_empty() {
        md.push_str(&format!(
            "\n## transfers ({} per level; each worker waits for its transfer to end)\n\n\
             | concurrency | seconds | transfers/s | request p50 / p99 ms | to end p50 ms | p90 ms | p99 ms | max ms | outcomes | errors |\n\
             | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |\n",
            report.plan.transfers
        ));
        for t in &report.transfers {
            let outcomes = t
                .outcomes
                .iter()
                .map(|(s, n)| format!("{s} {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            let errors = errors_cell(&t.request.errors, t.timeouts);
            md.push_str(&format!(
                "| {} | {:.1} | {:.1} | {:.2} / {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {outcomes} | {errors} |\n",
                t.concurrency,
                t.seconds,
                t.to_end.per_second,
                t.request.p50_ms,
                t.request.p99_ms,
                t.to_end.p50_ms,
                t.to_end.p90_ms,
                t.to_end.p99_ms,
                t.to_end.max_ms,
            ));
        }
    }
    if let Some(ceiling) = &report.ceiling {
        md.push_str(&format!(
            "\n## ceiling: the bare backends ({} calls each; S3: {}, broker: {}, PostgreSQL; event store: {})\n\n\
             | concurrency | S3 conditional PUT/s (p99 ms) | produce acks/s (p99 ms) | upserts/s (p99 ms) | slowest | Tally commands/s | fraction |\n\
             | ---: | ---: | ---: | ---: | --- | ---: | ---: |\n",
            ceiling.ops, ceiling.s3_server, ceiling.broker, ceiling.store
        ));
        for c in &ceiling.levels {
            let (slowest, per_second) = c.slowest(&ceiling.store);
            let tally = report
                .levels
                .iter()
                .find(|l| l.concurrency == c.concurrency)
                .map(|l| l.commands_per_second);
            let (tally, fraction) = match tally {
                Some(t) => (
                    format!("{t:.0}"),
                    format!("{:.0} %", 100.0 * t / per_second.max(1e-9)),
                ),
                None => ("—".into(), "—".into()),
            };
            let s3 = c.s3_conditional_put.as_ref().map_or_else(
                || "—".to_owned(),
                |f| format!("{:.0} ({:.1})", f.per_second, f.p99_ms),
            );
            md.push_str(&format!(
                "| {} | {s3} | {:.0} ({:.1}) | {:.0} ({:.1}) | {slowest} | {tally} | {fraction} |\n",
                c.concurrency,
                c.broker_produce.per_second,
                c.broker_produce.p99_ms,
                c.postgres_upsert.per_second,
                c.postgres_upsert.p99_ms,
            ));
        }
    }
    md
}

/// `builder` sending `Authorization: Bearer $TALLY_BENCH_TOKEN` on every request, if
/// that is set (`make bench` sets it when the functions require tokens).
pub fn with_token(builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
    let Some(token) = std::env::var("TALLY_BENCH_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
    else {
        return builder;
    };
    let mut headers = reqwest::header::HeaderMap::new();
    match reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")) {
        Ok(mut value) => {
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
            builder.default_headers(headers)
        }
        Err(_) => builder,
    }
}
