//! The harness works: a quick run against `make dev`'s gateway, in-process, measures
//! every operation and the projection lag, with no errors, and renders its report.

use tally_bench::{markdown, run, Plan};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_run_measures_every_operation_and_the_projection_lag() {
    let dir = tempfile::tempdir().unwrap();
    let host = tally_host::Host::embedded(dir.path()).await.unwrap();
    let app = tally_host::gateway_app(&host);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let plan = Plan::quick();
    let report = run("dev", &base, &plan, |_| {}).await;

    assert_eq!(report.errors(), 0, "{report:#?}");
    assert_eq!(report.setup.count, plan.accounts as u64);
    assert_eq!(report.levels.len(), plan.concurrency.len());
    for level in &report.levels {
        let total: u64 = level.ops.values().map(|f| f.count).sum();
        assert_eq!(total, plan.ops as u64, "every operation was measured once");
        for (name, f) in &level.ops {
            assert!(
                f.count > 0,
                "{name} ran at concurrency {}",
                level.concurrency
            );
            assert!(f.p50_ms > 0.0 && f.p50_ms <= f.p99_ms && f.p99_ms <= f.max_ms);
        }
        assert!(level.projection_lag.count > 0, "lag was sampled");
        assert_eq!(level.lag_timeouts, 0);
    }
    let md = markdown(&report);
    for name in [
        "deposit",
        "withdraw",
        "balance",
        "history",
        "projection lag",
    ] {
        assert!(md.contains(&format!("| {name}")), "{md}");
    }
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["levels"][1]["concurrency"], 4);
}
