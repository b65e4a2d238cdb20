//! The harness works: a quick run against `make dev`'s gateway, in-process, measures
//! every operation and the projection lag, with no errors, and renders its report.

use tally_bench::{markdown, run, Plan};

/// `make dev`'s gateway in-process on a free port: its data directory and base URL.
async fn dev_gateway() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let host = tally_host::Host::embedded(dir.path()).await.unwrap();
    host.start_saga().await.unwrap();
    let app = tally_host::gateway_app(&host);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (dir, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_run_measures_every_operation_and_the_projection_lag() {
    let (_dir, base) = dev_gateway().await;

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
    assert_eq!(report.transfers.len(), plan.concurrency.len());
    for t in &report.transfers {
        assert_eq!(
            t.request.count, plan.transfers as u64,
            "every transfer requested"
        );
        assert_eq!(t.timeouts, 0, "every transfer ended");
        assert_eq!(
            t.outcomes.get("completed").copied(),
            Some(plan.transfers as u64),
            "funded accounts: every transfer completes ({:?})",
            t.outcomes
        );
        assert_eq!(t.to_end.count, plan.transfers as u64);
        assert!(t.to_end.per_second > 0.0);
        assert!(
            t.request.p50_ms <= t.to_end.p50_ms,
            "an end comes after its request"
        );
    }
    let md = markdown(&report);
    assert!(md.contains("## transfers"), "{md}");
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
    // What the chart and scripts/bench-targets.py read: the level's deposits and
    // withdrawals over its seconds, every one of them answered here.
    for (level, written) in report.levels.iter().zip(json["levels"].as_array().unwrap()) {
        let commands = (level.ops["deposit"].count + level.ops["withdraw"].count) as f64;
        let per_second = written["commands_per_second"].as_f64().unwrap();
        assert!(
            (per_second - commands / level.seconds).abs() < 1e-6,
            "{written}"
        );
        assert_eq!(
            written["successful_commands_per_second"],
            written["commands_per_second"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_ceiling_run_measures_every_backend_and_the_report_divides_by_the_slowest() {
    use tally_bench::ceiling::{measure, Backends};
    use tally_testkit::services::{fresh_database, required_env, s3_config, unique};
    let backends = Backends {
        s3: s3_config(&required_env("TALLY_TEST_S3_ENDPOINT"), &unique("ceiling")),
        kafka_brokers: required_env("TALLY_TEST_KAFKA_BROKERS"),
        database_url: fresh_database().await,
        s3_server: "the test S3 server".into(),
        broker: "the test broker".into(),
        store: "s3".into(),
    };
    let ceiling = measure(&backends, &[1, 4], 12, |_| {}).await.unwrap();
    assert_eq!(ceiling.levels.len(), 2);
    for level in &ceiling.levels {
        for (name, f) in [
            ("S3", level.s3_conditional_put.as_ref().unwrap()),
            ("broker", &level.broker_produce),
            ("PostgreSQL", &level.postgres_upsert),
        ] {
            assert_eq!(f.count, 12, "{name} at {}", level.concurrency);
            assert!(f.errors.is_empty(), "{name}: {:?}", f.errors);
            assert!(f.per_second > 0.0);
        }
        let (_, slowest) = level.slowest("s3");
        assert!(slowest <= level.s3_conditional_put.as_ref().unwrap().per_second);
        assert!(slowest <= level.broker_produce.per_second);
        assert!(slowest <= level.postgres_upsert.per_second);
    }
    // Beside a Tally on the PostgreSQL store, S3 is neither measured nor counted.
    let on_postgres = Backends {
        store: "postgres".into(),
        ..backends.clone()
    };
    let ceiling_pg = measure(&on_postgres, &[2], 6, |_| {}).await.unwrap();
    let level = &ceiling_pg.levels[0];
    assert!(level.s3_conditional_put.is_none());
    let (name, slowest) = level.slowest("postgres");
    assert!(!name.starts_with("S3"), "{name}");
    assert_eq!(
        slowest,
        level
            .broker_produce
            .per_second
            .min(level.postgres_upsert.per_second)
    );

    // In a report, the stack's commands/s is divided by the slowest backend.
    let (_dir, base) = dev_gateway().await;
    let mut report = run("dev", &base, &Plan::quick(), |_| {}).await;
    report.ceiling = Some(ceiling);
    let md = markdown(&report);
    assert!(md.contains("## ceiling"), "{md}");
    assert!(md.contains(" % |"), "a fraction per level: {md}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serverless_figures_cover_every_function_binary() {
    // The function binaries sit beside this test's directory (target/<profile>/);
    // `make test` builds them before the tests.
    let bin_dir = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .to_path_buf();
    use tally_testkit::services::{required_env, unique};
    let relay_env: Vec<(String, String)> = [
        ("TALLY_S3_BUCKET", unique("serverless")),
        ("TALLY_S3_ENDPOINT", required_env("TALLY_TEST_S3_ENDPOINT")),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        (
            "TALLY_KAFKA_BROKERS",
            required_env("TALLY_TEST_KAFKA_BROKERS"),
        ),
        ("TALLY_KAFKA_TOPIC", unique("serverless")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let report =
        tally_bench::serverless::measure(&bin_dir, "debug", 1, 10, Some(&relay_env), |_| {})
            .await
            .unwrap_or_else(|e| {
                panic!("{e} (build the binaries first: cargo build --workspace --bins)")
            });
    let names: Vec<_> = report
        .functions
        .iter()
        .map(|f| f.function.as_str())
        .collect();
    for f in tally_bench::serverless::FUNCTIONS {
        assert!(names.contains(f), "{f} measured");
    }
    for f in &report.functions {
        assert!(f.binary_bytes > 0, "{}", f.function);
        if tally_bench::serverless::JOBS.contains(&f.function.as_str()) {
            assert_eq!(f.cold_start_ms, None);
            continue;
        }
        assert!(f.cold_start_ms.is_some_and(|ms| ms > 0.0), "{}", f.function);
        assert!(
            f.rss_after_requests_kb.is_some_and(|kb| kb > 0),
            "{}",
            f.function
        );
        assert_eq!((f.requests, f.failed_requests), (10, 0), "{}", f.function);
    }
    let md = tally_bench::serverless::markdown(&report);
    assert!(md.contains("| deposit |"), "{md}");
}
