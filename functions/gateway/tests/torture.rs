//! `make torture` in short: the fault harness against the gateway binary (the `dev`
//! topology). A seeded run with faults finds no violation; and every checker catches
//! the violation of a deliberately broken build — a checker that cannot fail proves
//! nothing.

use std::path::PathBuf;
use tally_torture::{dev, stack, Binaries, Plan};

fn binaries() -> Binaries {
    let gateway = PathBuf::from(env!("CARGO_BIN_EXE_gateway"));
    Binaries {
        dir: gateway.parent().unwrap().to_path_buf(),
    }
}

async fn run(plan: Plan) -> tally_torture::report::Report {
    let work = tempfile::tempdir().unwrap();
    let report = dev::run(&plan, &binaries(), work.path(), |line| eprintln!("{line}"))
        .await
        .unwrap();
    eprintln!("{}", report.markdown());
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_seeded_run_with_faults_finds_no_violation() {
    let report = run(Plan::short(20261201)).await;
    assert_eq!(report.total_violations(), 0, "{}", report.markdown());
    for fault in ["sigkill-gateway", "client-hang-up", "client-retry-same-key"] {
        assert!(
            report.faults.get(fault).copied().unwrap_or(0) > 0,
            "{fault} was injected: {:?}",
            report.faults
        );
    }
    assert!(
        report.checked.acknowledged_commands > 50,
        "{:?}",
        report.checked
    );
    assert!(
        report.checked.transfers > 10,
        "transfers ran: {:?}",
        report.checked
    );
    // The picture: an SVG with the run's seconds and its faults in the legend.
    let svg = tally_torture::picture::svg(&report).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    assert!(
        svg.contains("sigkill-gateway"),
        "the faults are in the legend"
    );
    assert_eq!(report.seconds.len(), report.load_seconds.ceil() as usize);
    assert!(report.seconds.iter().map(|s| s.ok).sum::<u64>() > 0);
}

/// Every function of `make stack` as its own process on S3, Kafka, PostgreSQL and
/// Redis, under every fault kind the stack nemesis has: every invariant holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_seeded_run_of_the_stack_topology_finds_no_violation() {
    let report = run_stack(short_stack_plan(20261202)).await;
    assert_clean_stack_run(&report);
}

/// The same processes with the event store in PostgreSQL (`TALLY_STORE=postgres`), its
/// backends terminated and its commit table locked while traffic runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_seeded_run_of_the_stack_topology_on_postgres_finds_no_violation() {
    let report = run_stack_on(stack::StoreKind::Postgres, short_stack_plan(20261205)).await;
    assert_eq!(report.topology, "stack-pg");
    assert_clean_stack_run(&report);
    assert!(
        !report.faults.contains_key("s3-paused") && !report.faults.contains_key("s3-killed"),
        "no S3 in this topology: {:?}",
        report.faults
    );
    assert!(
        report
            .faults
            .get("event-store-locked")
            .copied()
            .unwrap_or(0)
            > 0,
        "the commit table was locked during the load: {:?}",
        report.faults
    );
}

/// 25 s of load with a fault every 0.6 s.
fn short_stack_plan(seed: u64) -> Plan {
    let mut plan = Plan::short(seed);
    plan.seconds = 25;
    plan.fault_every_ms = 600;
    plan
}

/// No violation, at least ten faults, and enough commands and transfers to judge by.
#[track_caller]
fn assert_clean_stack_run(report: &tally_torture::report::Report) {
    assert_eq!(report.total_violations(), 0, "{}", report.markdown());
    let injected: u64 = report.faults.values().sum();
    assert!(injected >= 10, "{:?}", report.faults);
    assert!(
        report.checked.acknowledged_commands > 30,
        "{:?}",
        report.checked
    );
    assert!(
        report.checked.transfers > 0,
        "transfers ran: {:?}",
        report.checked
    );
}

async fn run_stack(plan: Plan) -> tally_torture::report::Report {
    run_stack_on(stack::StoreKind::S3, plan).await
}

/// One stack at a time: a dozen processes each, whose PostgreSQL pools share one
/// server's connections.
static ONE_STACK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn run_stack_on(kind: stack::StoreKind, plan: Plan) -> tally_torture::report::Report {
    let _turn = ONE_STACK.lock().await;
    let work = tempfile::tempdir().unwrap();
    let report = stack::run_on(kind, &plan, &binaries(), work.path(), |line| {
        eprintln!("{line}")
    })
    .await
    .unwrap();
    eprintln!("{}", report.markdown());
    report
}

/// The topic checker reads the broker with a stock consumer: with the publish skipped
/// (and the outbox entry forgotten), commits are missing there even though the read
/// model still gets them from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_commits_missing_from_the_topic() {
    let mut plan = Plan::short(11);
    plan.seconds = 6;
    plan.fault_every_ms = 10_000_000;
    plan.settle_seconds = 5;
    plan.inject = "skip-publish".into();
    let report = run_stack(plan).await;
    assert!(
        report.violations["every-commit-on-the-topic"] > 0,
        "{}",
        report.markdown()
    );
}

/// A short run of a build broken by `inject`, without restarts (a restart catches the
/// read model up from the store and would hide some breakages).
async fn broken(inject: &str) -> tally_torture::report::Report {
    let mut plan = Plan::short(7);
    plan.seconds = 6;
    plan.fault_every_ms = 10_000_000;
    plan.settle_seconds = 2;
    plan.inject = inject.into();
    run(plan).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_a_retried_command_applied_twice() {
    let report = broken("apply-retries-twice").await;
    assert!(
        report.violations["exactly-once"] > 0,
        "{}",
        report.markdown()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_a_dropped_projection() {
    let report = broken("drop-projection").await;
    assert!(
        report.violations["read-model-equals-store"] > 0,
        "{}",
        report.markdown()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_a_skipped_publish() {
    let report = broken("skip-publish").await;
    assert!(
        report.violations["read-model-equals-store"] > 0,
        "{}",
        report.markdown()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_a_stale_balance() {
    let report = broken("stale-balance").await;
    assert!(
        report.violations["monotonic-reads"] > 0,
        "{}",
        report.markdown()
    );
    assert!(
        report.violations["min-revision"] > 0,
        "{}",
        report.markdown()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_a_wrong_past() {
    let report = broken("stale-history").await;
    assert!(
        report.violations["history-equals-store"] > 0,
        "{}",
        report.markdown()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_a_transfer_credit_never_made() {
    let report = broken("skip-credit").await;
    assert!(
        report.violations["exactly-once"] > 0,
        "{}",
        report.markdown()
    );
    assert!(
        report.violations["conservation"] > 0,
        "{}",
        report.markdown()
    );
}
