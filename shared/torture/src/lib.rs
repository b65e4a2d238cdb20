//! `tally-torture`: the fault harness behind `make torture`.
//!
//! A run is a *history* and a *checker*, as in Jepsen. Seeded clients send a random mix
//! of opens, deposits, withdrawals, closes and reads — with and without
//! `Idempotency-Key` and `If-Match`, most of them on a few hot accounts — and record
//! every operation as *ok*, *fail* (a definite refusal) or *info* (the outcome is
//! unknown: a timeout, a hang-up, a 503 of unknown outcome). Meanwhile a seeded
//! *nemesis* injects faults: clients that hang up mid-request and retry with the same
//! key, and SIGKILL and restart of the process under test. After a quiet period the
//! checker reads the event store itself and the read model through the API, and
//! reports every violation by invariant; an *info* operation is allowed either way.
//!
//! Topologies: `dev` (the `make dev` gateway as its own process on a directory store).
//! The same seed gives the same operations and the same fault schedule; timings are
//! measured and reported, never asserted.

pub mod check;
pub mod client;
pub mod dev;
pub mod report;

use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

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
