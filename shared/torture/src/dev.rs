//! The `dev` topology: `make dev`'s gateway as its own process on a directory store,
//! SIGKILLed and restarted by the nemesis while the clients run.

use crate::check::{self, Observed};
use crate::client::{account_names, Client, History};
use crate::report::Report;
use crate::{Binaries, FaultCounts, Plan, QUIET};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// The gateway under test: one process at a time on a fixed port and data directory.
struct Gateway {
    binary: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    inject: String,
    child: Option<Child>,
}

impl Gateway {
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn start(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let child = Command::new(&self.binary)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TALLY_DATA_DIR", &self.data)
            .env("HOST", "127.0.0.1")
            .env("PORT", self.port.to_string())
            .env("RUST_LOG", "warn")
            .env("TALLY_FAULT_INJECTION", &self.inject)
            .stdout(Stdio::from(log.try_clone().map_err(|e| e.to_string())?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("{}: {e}", self.binary.display()))?;
        self.child = Some(child);
        wait_ready(&self.base(), Duration::from_secs(30)).await
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}

/// Wait until `base/readyz` answers 200.
pub async fn wait_ready(base: &str, within: Duration) -> Result<(), String> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("{base} did not become ready within {within:?}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18080)
}

/// Run the `dev` topology in `work` (data and logs), printing progress with `progress`.
pub async fn run(
    plan: &Plan,
    binaries: &Binaries,
    work: &Path,
    progress: impl Fn(String) + Send + Sync + 'static,
) -> Result<Report, String> {
    let data = work.join("data");
    std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    let gateway = Arc::new(tokio::sync::Mutex::new(Gateway {
        binary: binaries.path("gateway"),
        data: data.clone(),
        log: work.join("gateway.log"),
        port: free_port(),
        inject: plan.inject.clone(),
        child: None,
    }));
    gateway.lock().await.start().await?;
    let base = gateway.lock().await.base();

    let started = Instant::now();
    let deadline = started + Duration::from_secs(plan.seconds);
    let history = History::default();
    let faults: Arc<Mutex<FaultCounts>> = Arc::default();
    let progress = Arc::new(progress);

    let clients: Vec<_> = (0..plan.clients)
        .map(|id| {
            let client = Client::new(id, plan, base.clone(), history.clone(), started);
            tokio::spawn(client.run(deadline, 8))
        })
        .collect();

    // The nemesis: SIGKILL the gateway and start it again, on a seeded schedule. The
    // clients' hang-ups and keyed retries are counted from the history.
    let nemesis = {
        let gateway = gateway.clone();
        let faults = faults.clone();
        let mut rng = fastrand::Rng::with_seed(plan.seed ^ 0x006e_656d_6573_6973);
        let every = plan.fault_every_ms.max(100);
        tokio::spawn(async move {
            // The first fault comes early, so even a short run injects one.
            let mut next = Duration::from_millis(rng.u64(every / 4..every));
            loop {
                if Instant::now() + next >= deadline {
                    break;
                }
                tokio::time::sleep(next).await;
                let mut gw = gateway.lock().await;
                gw.kill().await;
                *faults
                    .lock()
                    .expect("faults")
                    .entry("sigkill-gateway")
                    .or_default() += 1;
                tokio::time::sleep(Duration::from_millis(rng.u64(50..600))).await;
                gw.start().await?;
                drop(gw);
                next = Duration::from_millis(rng.u64(every / 2..every * 3 / 2));
            }
            Ok::<(), String>(())
        })
    };

    let ticker = {
        let history = history.clone();
        let faults = faults.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let faults: u64 = faults.lock().expect("faults").values().sum();
                progress(format!(
                    "torture dev: {:>4}s  {} operations, {} faults",
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
    nemesis.await.map_err(|e| e.to_string())??;
    ticker.abort();
    let load_seconds = started.elapsed().as_secs_f64();

    // Quiet: the gateway up, nothing injected, the projection caught up.
    progress(format!(
        "torture dev: load done after {load_seconds:.0}s; quiet for {QUIET:?}, then checking"
    ));
    wait_ready(&base, Duration::from_secs(30)).await?;
    tokio::time::sleep(QUIET).await;

    let ops = history.ops();
    let mut fault_counts = faults.lock().expect("faults").clone();
    for (kind, n) in check::client_faults(&ops) {
        fault_counts.insert(kind, n);
    }
    let observed = Observed::from_api(&base, &account_names(plan)).await?;
    gateway.lock().await.kill().await;
    let store = tally_embedded::DirEventStore::open(&data).map_err(|e| e.to_string())?;
    let verdict = check::check(&ops, &store, &observed).await?;
    Ok(Report::new(
        "dev",
        plan,
        load_seconds,
        &ops,
        fault_counts,
        verdict,
    ))
}
