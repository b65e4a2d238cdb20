//! `tally-torture`: the fault harness behind `make torture`.
//!
//! A run is a *history* and a *checker*, as in Jepsen. Seeded clients send a random mix
//! of opens, deposits, withdrawals, transfers (always keyed), closes and reads — with and without
//! `Idempotency-Key` and `If-Match`, most of them on a few hot accounts — and record
//! every operation as *ok*, *fail* (a definite refusal) or *info* (the outcome is
//! unknown: a timeout, a hang-up, a 503 of unknown outcome). Meanwhile a seeded
//! *nemesis* injects faults: clients that hang up mid-request and retry with the same
//! key, and SIGKILL and restart of the process under test. After a quiet period the
//! checker reads the event store itself and the read model through the API, and
//! reports every violation by invariant; an *info* operation is allowed either way.
//!
//! Topologies: `dev` (the `make dev` gateway as its own process on a directory store)
//! and `stack` (every function of `make stack` as its own process on S3, Kafka,
//! PostgreSQL and Redis, with private S3, broker and Redis servers the nemesis can
//! pause, kill and restart).
//! The same seed gives the same operations and the same fault schedule; timings are
//! measured and reported, never asserted.

pub mod check;
pub mod client;
pub mod dev;
pub mod picture;
pub mod procs;
pub mod report;
pub mod stack;

use client::{Client, History, Op};
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to run.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub seed: u64,
    /// How long the load and the faults run (the quiet period and the check come after).
    pub seconds: u64,
    /// Concurrent clients.
    pub clients: usize,
    /// Accounts in play; the first `hot` take most of the traffic.
    pub accounts: usize,
    pub hot: usize,
    /// Mean time between two faults of the nemesis (milliseconds).
    pub fault_every_ms: u64,
    /// How long the read model may take to equal the store after the load before a
    /// difference counts as a violation.
    pub settle_seconds: u64,
    /// Fault kinds the nemesis leaves out (by the name the report counts them under),
    /// e.g. `broker-killed`. Empty: every kind.
    pub leave_out: Vec<String>,
    /// `TALLY_FAULT_INJECTION` for the process under test: a deliberately broken build,
    /// to prove a checker catches its violation. Empty: none.
    pub inject: String,
}

impl Plan {
    /// The default run (`make torture`): 5 minutes.
    pub fn standard(seed: u64) -> Self {
        Self {
            seed,
            seconds: 300,
            clients: 8,
            accounts: 24,
            hot: 3,
            fault_every_ms: 1500,
            settle_seconds: 60,
            leave_out: Vec::new(),
            inject: String::new(),
        }
    }

    /// A short run that still injects every fault kind and checks every invariant
    /// (`make test`).
    pub fn short(seed: u64) -> Self {
        Self {
            seconds: 12,
            fault_every_ms: 700,
            ..Self::standard(seed)
        }
    }
}

/// Where the binaries under test are.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub dir: PathBuf,
}

impl Binaries {
    /// The directory of the running executable (`target/<profile>/`), where cargo puts
    /// the workspace's binaries too.
    pub fn beside_current_exe() -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        let dir = exe
            .parent()
            .map(|d| {
                // Test binaries live in target/<profile>/deps.
                if d.ends_with("deps") {
                    d.parent().unwrap_or(d).to_path_buf()
                } else {
                    d.to_path_buf()
                }
            })
            .unwrap_or_default();
        Ok(Self { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// One fault the nemesis injected, by kind (for the report).
pub type FaultCounts = BTreeMap<&'static str, u64>;

/// How long the checker waits after the load for the system to settle (relays,
/// projections, restarts).
pub const QUIET: Duration = Duration::from_secs(3);

/// The nemesis's side of a run: when the next fault is due, and the count by kind.
pub struct Nemesis {
    rng: fastrand::Rng,
    every: u64,
    deadline: Instant,
    first: bool,
    faults: Arc<Mutex<FaultCounts>>,
    started: Instant,
    timeline: Arc<Mutex<Vec<FaultAt>>>,
}

/// One fault the nemesis injected, and when (milliseconds into the load).
#[derive(Clone, Debug, serde::Serialize)]
pub struct FaultAt {
    pub at_ms: u64,
    pub kind: &'static str,
}

impl Nemesis {
    /// Wait until the next fault is due; `None` once the load is over. The first comes
    /// early, so even a short run injects some.
    pub async fn next_fault(&mut self) -> Option<()> {
        let wait = if self.first {
            self.first = false;
            self.rng.u64(self.every / 4..self.every)
        } else {
            self.rng.u64(self.every / 2..self.every * 3 / 2)
        };
        let wait = Duration::from_millis(wait);
        if Instant::now() + wait >= self.deadline {
            return None;
        }
        tokio::time::sleep(wait).await;
        Some(())
    }

    /// A seeded pick in `range`.
    pub fn pick(&mut self, range: std::ops::Range<usize>) -> usize {
        self.rng.usize(range)
    }

    /// Sleep a seeded number of milliseconds in `range`.
    pub async fn pause(&mut self, range: std::ops::Range<u64>) {
        tokio::time::sleep(Duration::from_millis(self.rng.u64(range))).await;
    }

    /// Count one fault of `kind`, and note when it came.
    pub fn count(&self, kind: &'static str) {
        self.counter().count(kind);
    }

    /// What counts faults for a task of its own (one that learns later what happened).
    pub fn counter(&self) -> FaultCounter {
        FaultCounter {
            faults: self.faults.clone(),
            started: self.started,
            timeline: self.timeline.clone(),
        }
    }
}

/// Counts faults into a run's report, from any task.
#[derive(Clone)]
pub struct FaultCounter {
    faults: Arc<Mutex<FaultCounts>>,
    started: Instant,
    timeline: Arc<Mutex<Vec<FaultAt>>>,
}

impl FaultCounter {
    /// Count one fault of `kind`, and note when it came.
    pub fn count(&self, kind: &'static str) {
        *self.faults.lock().expect("faults").entry(kind).or_default() += 1;
        self.timeline.lock().expect("timeline").push(FaultAt {
            at_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            kind,
        });
    }
}

/// What the load phase produced.
pub struct Load {
    pub ops: Vec<Op>,
    pub faults: FaultCounts,
    /// The nemesis's faults in the order they came (the clients' own are in `ops`).
    pub timeline: Vec<FaultAt>,
    pub seconds: f64,
}

/// Run the clients against `base` for the plan's seconds while `nemesis` injects
/// faults, printing progress every 5 s; the faults the clients injected themselves
/// (hang-ups, retries) are counted from the history.
pub async fn drive<N, F>(
    plan: &Plan,
    topology: &'static str,
    base: String,
    progress: impl Fn(String) + Send + Sync + 'static,
    nemesis: N,
) -> Result<Load, String>
where
    N: FnOnce(Nemesis) -> F,
    F: Future<Output = Result<(), String>> + Send + 'static,
{
    let started = Instant::now();
    let deadline = started + Duration::from_secs(plan.seconds);
    let history = History::default();
    let faults: Arc<Mutex<FaultCounts>> = Arc::default();
    let timeline: Arc<Mutex<Vec<FaultAt>>> = Arc::default();
    let clients: Vec<_> = (0..plan.clients)
        .map(|id| {
            let client = Client::new(id, plan, base.clone(), history.clone(), started);
            tokio::spawn(client.run(deadline, 8))
        })
        .collect();
    let nemesis = tokio::spawn(nemesis(Nemesis {
        rng: fastrand::Rng::with_seed(plan.seed ^ 0x006e_656d_6573_6973),
        every: plan.fault_every_ms.max(100),
        deadline,
        first: true,
        faults: faults.clone(),
        started,
        timeline: timeline.clone(),
    }));
    let progress = Arc::new(progress);
    let ticker = {
        let (history, faults, progress) = (history.clone(), faults.clone(), progress.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let faults: u64 = faults.lock().expect("faults").values().sum();
                progress(format!(
                    "torture {topology}: {:>4}s  {} operations, {} faults",
                    started.elapsed().as_secs(),
                    history.len(),
                    faults
                ));
            }
        })
    };
    for client in clients {
        client.await.map_err(|e| e.to_string())?;
    }
    let nemesis = nemesis.await.map_err(|e| e.to_string());
    ticker.abort();
    nemesis??;
    let seconds = started.elapsed().as_secs_f64();
    progress(format!(
        "torture {topology}: load done after {seconds:.0}s; quiet, then checking"
    ));
    let ops = history.ops();
    let mut faults = faults.lock().expect("faults").clone();
    for (kind, n) in check::client_faults(&ops) {
        faults.insert(kind, n);
    }
    let timeline = timeline.lock().expect("timeline").clone();
    Ok(Load {
        ops,
        faults,
        timeline,
        seconds,
    })
}

/// Evidence for a read model judged level with the store and then found apart from it
/// by the final check (which reads the store again, with the same reading of the read
/// model): how many commits the store held at each check, and whether a third reading of
/// both still finds them apart. The violations stay; this says which side moved.
async fn explain_late_differences(
    ops: &[Op],
    store: &dyn tally_es::EventStore,
    base: &str,
    accounts: &[String],
    settled: &check::Verdict,
    last: &mut check::Verdict,
) -> Result<(), String> {
    if !last
        .violations
        .iter()
        .any(|v| v.invariant == "read-model-equals-store")
    {
        return Ok(());
    }
    let again = check::Observed::from_api(base, accounts).await?;
    let third = check::check(ops, store, &again).await?;
    for v in last
        .violations
        .iter_mut()
        .filter(|v| v.invariant == "read-model-equals-store")
    {
        let account = v.detail.split(':').next().unwrap_or_default().to_owned();
        let still = third
            .violations
            .iter()
            .find(|t| t.invariant == v.invariant && t.detail.starts_with(&format!("{account}:")));
        v.detail.push_str(&format!(
            " [the read model was judged level with the store at {} commits; this check read \
             {} commits; a third reading ({} commits) finds {}]",
            settled.commits,
            last.commits,
            third.commits,
            still.map_or("them level".to_owned(), |t| format!("`{}`", t.detail)),
        ));
    }
    Ok(())
}

/// The streams whose head differs between two readings, as `stream: from → to`.
fn moved_streams(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> Vec<String> {
    let mut streams: Vec<&String> = before.keys().chain(after.keys()).collect();
    streams.sort();
    streams.dedup();
    streams
        .into_iter()
        .filter(|s| before.get(*s) != after.get(*s))
        .map(|s| {
            let at = |heads: &std::collections::BTreeMap<String, u64>| {
                heads.get(s).copied().unwrap_or(0)
            };
            format!("{s}: {} → {}", at(before), at(after))
        })
        .collect()
}

/// After the load: read the read model through the API and check the history against
/// the store, again every second while the read model is still behind the store (the
/// projection settling after the last fault), up to `within`. A read model judged level
/// is checked once more with its past (the final verdict), and that reading of the store
/// must find it as the judging one did (the same head of every stream): a store that
/// moved in between (the saga's sweep driving on a transfer left pending by a fault, a
/// command whose client hung up landing now) leaves the read model judged against a
/// store that is gone, and a transfer driven while the check read the store is seen
/// half (its accounts read before its steps, its stream after), so the settling goes on.
/// Returns the verdict and how long the read model took to settle.
pub async fn settle_and_check(
    ops: &[Op],
    store: &dyn tally_es::EventStore,
    base: &str,
    accounts: &[String],
    within: Duration,
) -> Result<(check::Verdict, f64), String> {
    let started = Instant::now();
    let mut moved = Vec::new();
    let mut last_said = 0;
    loop {
        let mut observed = check::Observed::from_api(base, accounts).await?;
        let verdict = check::check(ops, store, &observed).await?;
        // Behind: the projection, or a transfer the saga has not ended yet.
        let behind = verdict.violations.iter().any(|v| {
            matches!(
                v.invariant,
                "read-model-equals-store" | "every-transfer-ended"
            )
        });
        let out_of_time = started.elapsed() >= within;
        if behind && !out_of_time {
            // Every 10 s, what the read model is still waiting for (a long settle is
            // worth a look: what a fault left usually reaches it within seconds).
            let waited = started.elapsed().as_secs();
            if waited > 0 && waited.is_multiple_of(10) && waited != last_said {
                last_said = waited;
                let waiting: Vec<&str> = verdict
                    .violations
                    .iter()
                    .filter(|v| {
                        matches!(
                            v.invariant,
                            "read-model-equals-store" | "every-transfer-ended"
                        )
                    })
                    .map(|v| v.detail.as_str())
                    .collect();
                eprintln!(
                    "torture: settling for {waited}s; {} behind, e.g. {}",
                    waiting.len(),
                    waiting
                        .iter()
                        .take(2)
                        .copied()
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let settled = started.elapsed().as_secs_f64();
        // The accounts' past, once the read model has been judged (see read_past), and
        // the whole verdict again with it.
        observed.read_past(base).await?;
        let mut last = check::check(ops, store, &observed).await?;
        if !behind {
            if last.heads != verdict.heads && !out_of_time {
                moved.extend(moved_streams(&verdict.heads, &last.heads));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            explain_late_differences(ops, store, base, accounts, &verdict, &mut last).await?;
        }
        last.moved_after_judged = moved;
        return Ok((last, settled));
    }
}
