//! Three withdraw processes over one event store directory: no lock is shared between
//! them, so only the store's create-if-absent commit keeps them from both winning.

use futures::future::join_all;
use tally_testkit::{seed, Function, Req, Step};

const BIN: &str = env!("CARGO_BIN_EXE_withdraw");

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn withdrawals_spread_over_three_processes_let_exactly_the_balance_through() {
    let dir = tempfile::tempdir().unwrap();
    seed(
        dir.path(),
        &[Step::Open("acc"), Step::Deposit("acc", "300.00")],
    )
    .await;
    let processes = [
        Function::server(BIN, dir.path()).await,
        Function::server(BIN, dir.path()).await,
        Function::server(BIN, dir.path()).await,
    ];
    let req = Req::post("/accounts/acc/withdraw").json(r#"{"Amount": 10.00}"#);
    let answers = join_all((0..60).map(|n| processes[n % 3].call(&req))).await;
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let refused = answers
        .iter()
        .filter(|a| a.status == 422 && a.body["type"] == "/problems/insufficient-funds")
        .count();
    assert_eq!((ok, refused), (30, 30), "{answers:?}");
    let mut revisions: Vec<u64> = answers
        .iter()
        .filter(|a| a.status == 200)
        .map(|a| a.body["revision"].as_u64().unwrap())
        .collect();
    revisions.sort();
    assert_eq!(
        revisions,
        (3..=32).collect::<Vec<_>>(),
        "one revision per success, no gap"
    );
    let last = answers
        .iter()
        .filter(|a| a.body["revision"] == 32)
        .map(|a| a.body["balance"].clone())
        .next();
    assert_eq!(last, Some(serde_json::json!("0.00")));
}
