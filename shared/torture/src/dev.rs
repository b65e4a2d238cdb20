//! The `dev` topology: `make dev`'s gateway as its own process on a directory store,
//! SIGKILLed and restarted by the nemesis while the clients run.

use crate::client::account_names;
use crate::procs::{wait_ready, Proc};
use crate::report::Report;
use crate::{drive, settle_and_check, Binaries, Plan, QUIET};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tally_testkit::services::free_port;

/// Run the `dev` topology in `work` (data and logs), printing progress with `progress`.
pub async fn run(
    plan: &Plan,
    binaries: &Binaries,
    work: &Path,
    progress: impl Fn(String) + Send + Sync + 'static,
) -> Result<Report, String> {
    let data = work.join("data");
    std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    let mut gateway = Proc::new(
        "gateway",
        binaries.path("gateway"),
        vec![
            ("TALLY_DATA_DIR".into(), data.display().to_string()),
            ("TALLY_FAULT_INJECTION".into(), plan.inject.clone()),
        ],
        work.join("gateway.log"),
        free_port(),
    );
    gateway.start().await?;
    let base = gateway.base();
    wait_ready(&base, Duration::from_secs(30)).await?;
    let gateway = Arc::new(tokio::sync::Mutex::new(gateway));

    // The nemesis: SIGKILL the gateway and start it again, on a seeded schedule. The
    // clients' hang-ups and keyed retries are counted from the history.
    let load = {
        let gateway = gateway.clone();
        drive(
            plan,
            "dev",
            base.clone(),
            progress,
            move |mut nemesis| async move {
                while let Some(()) = nemesis.next_fault().await {
                    let mut gw = gateway.lock().await;
                    gw.kill().await;
                    nemesis.count("sigkill-gateway");
                    nemesis.pause(50..600).await;
                    gw.start().await?;
                }
                Ok(())
            },
        )
        .await?
    };

    wait_ready(&base, Duration::from_secs(30)).await?;
    tokio::time::sleep(QUIET).await;
    let store = tally_embedded::DirEventStore::open(&data).map_err(|e| e.to_string())?;
    let (verdict, settled) = settle_and_check(
        &load.ops,
        &store,
        &base,
        &account_names(plan),
        Duration::from_secs(plan.settle_seconds),
    )
    .await?;
    gateway.lock().await.kill().await;
    Ok(Report::new("dev", plan, &load, settled, verdict))
}
