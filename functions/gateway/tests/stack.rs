//! `make stack` in a test: every function its own process on the real backends (S3,
//! Kafka, PostgreSQL, Redis on 127.0.0.1), the gateway in proxy mode in front. The seed
//! walk-through, the concurrency case and every bad input must behave exactly as
//! against `make dev` (`api.rs` runs the same checks in-process).

use std::path::{Path, PathBuf};
use std::time::Duration;
use tally_testkit::cases::{self, Api};
use tally_testkit::services::{fresh_database, required_env, unique};
use tally_testkit::Function;

/// A binary of another function, built by `cargo test --workspace` (or `make test`).
fn sibling(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_gateway")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build every function first (`make test` does; or `cargo build --workspace --bins`)",
        path.display()
    );
    path
}

struct Stack {
    _functions: Vec<Function>,
    _projector: Function,
    _relay: Function,
    _saga: Function,
    gateway: Function,
    bucket: String,
    s3_endpoint: String,
}

impl Stack {
    async fn start(dir: &Path) -> Self {
        let s3_endpoint = required_env("TALLY_TEST_S3_ENDPOINT");
        let bucket = unique("stack");
        let env: Vec<(String, String)> = [
            ("TALLY_S3_BUCKET", bucket.clone()),
            ("TALLY_S3_ENDPOINT", s3_endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            (
                "TALLY_KAFKA_BROKERS",
                required_env("TALLY_TEST_KAFKA_BROKERS"),
            ),
            ("TALLY_KAFKA_TOPIC", unique("commits")),
            ("TALLY_KAFKA_GROUP", unique("projector")),
            ("TALLY_DATABASE_URL", fresh_database().await),
            ("TALLY_REDIS_URL", required_env("TALLY_TEST_REDIS_URL")),
            ("TALLY_REDIS_PREFIX", format!("{}:", unique("stack"))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();

        let migrate = tokio::process::Command::new(sibling("migrate"))
            .envs(env.iter().cloned())
            .env("TALLY_DATA_DIR", dir)
            .status()
            .await
            .unwrap();
        assert!(migrate.success(), "the migrate job succeeds");

        let mut functions = Vec::new();
        let mut upstreams = Vec::new();
        // One process per function of the route table.
        for name in tally_api::ROUTES.iter().map(|r| r.function) {
            let f = Function::server_with(sibling(name).to_str().unwrap(), dir, &env).await;
            upstreams.push(format!("{name}={}", f.base_url().unwrap()));
            functions.push(f);
        }
        let projector =
            Function::server_with(sibling("projector").to_str().unwrap(), dir, &env).await;
        let relay = Function::server_with(sibling("relay").to_str().unwrap(), dir, &env).await;
        let saga =
            Function::server_with(sibling("transfer-saga").to_str().unwrap(), dir, &env).await;
        let mut gateway_env = env.clone();
        gateway_env.push(("TALLY_UPSTREAMS".into(), upstreams.join(",")));
        let gateway = Function::server_with(env!("CARGO_BIN_EXE_gateway"), dir, &gateway_env).await;
        Self {
            _functions: functions,
            _projector: projector,
            _relay: relay,
            _saga: saga,
            gateway,
            bucket,
            s3_endpoint,
        }
    }

    fn api(&self) -> Api {
        Api::new(self.gateway.base_url().unwrap())
    }

    /// Every commit key in the bucket (the outbox aside: it drains by itself).
    async fn commit_keys(&self) -> Vec<String> {
        tally_testkit::services::s3_store(&self.s3_endpoint, &self.bucket)
            .keys("streams/")
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stack_behaves_like_make_dev() {
    let dir = tempfile::tempdir().unwrap();
    let stack = Stack::start(dir.path()).await;
    let api = stack.api();

    cases::seed_walkthrough(&api, "account123").await;
    cases::balance_reads_its_own_writes(&api, "fresh").await;
    cases::hundred_concurrent_withdrawals(&api, "busy").await;
    let store = tally_testkit::services::s3_store(&stack.s3_endpoint, &stack.bucket);
    cases::as_of_balances_agree_with_a_fold_of_the_store(&api, &store, "past", 20261202).await;
    cases::statements_agree_with_a_fold_of_the_store(&api, &store, "monthly", 20261202).await;
    // The transfer saga is a process of its own, following the topic.
    cases::transfers_move_money_once(&api, "moves").await;

    cases::bad_input_fixtures(&api).await;
    let before = stack.commit_keys().await;
    cases::bad_inputs_are_refused(&api).await;
    assert_eq!(
        stack.commit_keys().await,
        before,
        "bad input must change nothing in the store"
    );

    // The projector (a separate process, through Kafka) catches up without being asked.
    let mut balance = serde_json::Value::Null;
    for _ in 0..200 {
        balance = api.get("/accounts/account123/balance").await.1;
        if balance["revision"] == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(balance["balance"], "350.00", "{balance}");
}
