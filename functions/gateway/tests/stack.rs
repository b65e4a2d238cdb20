//! `make stack` in a test: every function its own process on the real backends (S3,
//! Kafka, PostgreSQL, Redis on 127.0.0.1), the gateway in proxy mode in front. The seed
//! walk-through, the concurrency case and every bad input must behave exactly as
//! against `make dev` (`api.rs` runs the same checks in-process).

use std::path::{Path, PathBuf};
use std::time::Duration;
use tally_testkit::cases::{self, Api};
use tally_testkit::services::{fresh_database, oidc_token, required_env, unique};
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

/// What alice and bob may have: everything but operations.
const OWNER: &str = "accounts:read accounts:write transfers:write";

struct Stack {
    env: Vec<(String, String)>,
    _functions: Vec<Function>,
    projector: Function,
    relay: Function,
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
            // Bearer tokens of the real identity provider, in every function.
            ("TALLY_AUTH_ISSUER", required_env("TALLY_TEST_OIDC_ISSUER")),
            // Commits on the topic signed by their producers, checked by their consumers.
            (
                "TALLY_STREAM_KEY",
                "c3RhY2stdGVzdC1zdHJlYW0ta2V5LTMyLWJ5dGVzLWxvbmchIQ==".into(),
            ),
            // Holders' data keys are wrapped by this master key (32 bytes).
            (
                "TALLY_MASTER_KEY",
                "c3RhY2stdGVzdC1tYXN0ZXIta2V5LTMyLWJ5dGVzISE=".into(),
            ),
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
            env,
            _functions: functions,
            projector,
            relay,
            _saga: saga,
            gateway,
            bucket,
            s3_endpoint,
        }
    }

    /// The gateway, as alice (a token of the identity provider).
    async fn api(&self) -> Api {
        self.anonymous()
            .with_token(oidc_token("alice", OWNER).await)
    }

    /// The gateway, without a token.
    fn anonymous(&self) -> Api {
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
    let api = stack.api().await;

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

/// Who may do what, end to end: every function checks the bearer tokens of the real
/// identity provider (`scripts/idp.sh`) itself; an account is its opener's; operations
/// need `ops` and are not behind the gateway; what is refused writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_the_stack_tokens_of_the_identity_provider_decide_who_may_do_what() {
    let dir = tempfile::tempdir().unwrap();
    let stack = Stack::start(dir.path()).await;
    let alice = stack.api().await;
    let bob = stack.anonymous().with_token(oidc_token("bob", OWNER).await);
    let (s, b) = alice.post("/accounts", r#"{"ID": "alices"}"#).await;
    assert_eq!(s, 201, "{b}");
    alice
        .post("/accounts/alices/deposit", r#"{"Amount": 100}"#)
        .await;
    assert_eq!(bob.post("/accounts", r#"{"ID": "bobs"}"#).await.0, 201);
    let before = stack.commit_keys().await;

    // No token, a token altered in transit: 401 from the function behind the gateway.
    let (s, b) = stack
        .anonymous()
        .post("/accounts/alices/withdraw", r#"{"Amount": 1}"#)
        .await;
    assert_eq!(
        (s, b["type"].as_str()),
        (401, Some("/problems/unauthenticated")),
        "{b}"
    );
    let token = oidc_token("alice", OWNER).await;
    let (head, rest) = token.split_once('.').unwrap();
    let (payload, signature) = rest.split_once('.').unwrap();
    let mut forged = payload.to_owned();
    forged.replace_range(
        ..4,
        if &payload[..4] == "eyJz" {
            "eyJa"
        } else {
            "eyJz"
        },
    );
    let tampered = stack
        .anonymous()
        .with_token(format!("{head}.{forged}.{signature}"));
    assert_eq!(
        tampered
            .post("/accounts/alices/withdraw", r#"{"Amount": 1}"#)
            .await
            .0,
        401
    );
    // Another owner: told alice's account does not exist, on every route.
    for path in [
        "/accounts/alices",
        "/accounts/alices/balance",
        "/accounts/alices/transactions",
    ] {
        let (s, b) = bob.get(path).await;
        assert_eq!(
            (s, b["type"].as_str()),
            (404, Some("/problems/account-not-found")),
            "{path}"
        );
    }
    assert_eq!(
        bob.post("/accounts/alices/withdraw", r#"{"Amount": 1}"#)
            .await
            .0,
        404
    );
    // A token without the scope: 403 on her own account.
    let reading = stack
        .anonymous()
        .with_token(oidc_token("alice", "accounts:read").await);
    let (s, b) = reading
        .post("/accounts/alices/withdraw", r#"{"Amount": 1}"#)
        .await;
    assert_eq!(
        (s, b["type"].as_str()),
        (403, Some("/problems/insufficient-scope")),
        "{b}"
    );
    assert_eq!(
        stack.commit_keys().await,
        before,
        "nothing refused was written"
    );

    // Operations: not behind the gateway; on the projector's and the relay's own ports,
    // 401 without a token, 403 without `ops`, done with it.
    let ops = oidc_token("tally-ops", "ops accounts:read").await;
    assert_eq!(
        stack
            .anonymous()
            .with_token(ops.clone())
            .post("/projector/catch-up", "")
            .await
            .0,
        404
    );
    for (function, path) in [
        (&stack.projector, "/projector/catch-up"),
        (&stack.relay, "/relay/sweep"),
    ] {
        let direct = Api::new(function.base_url().unwrap());
        assert_eq!(direct.post(path, "").await.0, 401, "{path}");
        assert_eq!(
            direct.with_token(token.clone()).post(path, "").await.0,
            403,
            "{path}"
        );
        let (s, b) = direct.with_token(ops.clone()).post(path, "").await;
        assert_eq!(s, 200, "{path}: {b}");
    }
    // An operator reaches every account.
    let (s, b) = stack
        .anonymous()
        .with_token(ops)
        .get("/accounts/alices/balance?min_revision=2")
        .await;
    assert_eq!((s, b["balance"].as_str()), (200, Some("100.00")), "{b}");
}

/// Crypto-shredding end to end: a holder's details, given at the opening, are in no S3
/// object, topic message, read-model row or cache entry in the clear; after `forget`
/// they read as erased — also after a rebuild of the read model — while the balance
/// stays, and nothing anywhere opens to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_the_stack_a_forgotten_holder_is_in_the_clear_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let stack = Stack::start(dir.path()).await;
    let alice = stack.api().await;
    let (name, email) = ("Mary Somerville-9e2b", "mary.9e2b@example.com");
    let holder = serde_json::json!({"name": name, "email": email});
    let (s, b) = alice
        .post(
            "/accounts",
            &serde_json::json!({"ID": "somerville", "holder": holder}).to_string(),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    alice
        .post("/accounts/somerville/deposit", r#"{"Amount": 80}"#)
        .await;
    let (s, b) = alice.get("/accounts/somerville").await;
    assert_eq!((s, &b["holder"]), (200, &holder), "{b}");
    // Free text the holder writes: a transfer's reference, sealed under their key.
    alice.post("/accounts", r#"{"ID": "somerville-2"}"#).await;
    let note = "for Mary's telescope-9e2b";
    let body = serde_json::json!({"from": "somerville", "to": "somerville-2", "amount": "5.00", "reference": note});
    let (s, t, _) = alice
        .send(
            "POST",
            "/transfers",
            Some(&body.to_string()),
            &[("idempotency-key", "scope-1")],
        )
        .await;
    assert_eq!((s, t["reference"].as_str()), (202, Some(note)), "{t}");
    let transfer = t["id"].as_str().unwrap().to_owned();
    let done = cases::settled(&alice, &transfer, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    let (s, b) = alice.post("/accounts/somerville/forget", "").await;
    assert_eq!((s, b["balance"].as_str()), (200, Some("75.00")), "{b}");
    let (_, t) = alice.get(&format!("/transfers/{transfer}")).await;
    assert_eq!(t["reference_erased"], true, "{t}");
    let (_, b) = alice.get("/accounts/somerville").await;
    assert_eq!(b["holder"], serde_json::json!({"erased": true}));
    let (_, b) = alice
        .get("/accounts/somerville/balance?min_revision=4")
        .await;
    assert_eq!(b["balance"], "75.00");

    // The projector rebuilds its read model from S3: still erased, same balance.
    let env = |k: &str| {
        stack
            .env
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let ops = oidc_token("tally-ops", "ops accounts:read").await;
    let (s, b) = Api::new(stack.projector.base_url().unwrap())
        .with_token(ops)
        .post("/projector/rebuild", "")
        .await;
    assert_eq!(s, 200, "{b}");
    let (_, b) = alice.get("/accounts/somerville").await;
    assert_eq!(
        (&b["holder"], b["balance"].as_str()),
        (&serde_json::json!({"erased": true}), Some("75.00"))
    );

    let clear = |bytes: &[u8]| {
        let has = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
        has(name) || has(email) || has(note)
    };
    // Every object in the bucket: commits, segments, snapshots, the outbox, keys.
    let s3 = tally_testkit::services::s3_store(&stack.s3_endpoint, &stack.bucket);
    let keys = s3.keys("").await.unwrap();
    assert!(keys.iter().any(|k| k.starts_with("streams/somerville/")));
    for key in &keys {
        let body = s3.object(key).await.unwrap().unwrap_or_default();
        assert!(!clear(&body), "{key} holds the holder in the clear");
    }
    // The holder's key is gone; the other account's stays.
    let opening = s3
        .object("streams/somerville/00000000000000000001.json")
        .await
        .unwrap()
        .unwrap();
    let opening: serde_json::Value = serde_json::from_slice(&opening).unwrap();
    let key = opening["events"][0]["data"]["holder"]["key"]
        .as_str()
        .unwrap();
    assert!(
        !keys.contains(&format!("keys/{key}")),
        "the data key is destroyed: {keys:?}"
    );
    assert_eq!(keys.iter().filter(|k| k.starts_with("keys/")).count(), 1);
    // Every message on the topic.
    let messages = topic_messages(&env("TALLY_KAFKA_BROKERS"), &env("TALLY_KAFKA_TOPIC")).await;
    assert!(messages.len() >= 3, "{} messages", messages.len());
    assert!(
        !messages.iter().any(|m| clear(m)),
        "a message holds the holder in the clear"
    );
    // Every row of the read model.
    let pool = tally_postgres::connect(&env("TALLY_DATABASE_URL"), 1)
        .await
        .unwrap();
    for table in ["accounts", "transactions"] {
        let rows: Vec<String> =
            sqlx::query_scalar(&format!("SELECT row_to_json(t)::text FROM {table} t"))
                .fetch_all(&pool)
                .await
                .unwrap();
        assert!(
            !rows.iter().any(|r| clear(r.as_bytes())),
            "{table} holds the holder"
        );
    }
    // Every entry in Redis under the stack's prefix.
    let redis = redis::Client::open(env("TALLY_REDIS_URL")).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let prefix = env("TALLY_REDIS_PREFIX");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    for key in keys {
        let dump: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!clear(&dump.unwrap_or_default()), "{key} holds the holder");
    }
}

/// Every message value on `topic`, read from the start by a stock consumer.
async fn topic_messages(brokers: &str, topic: &str) -> Vec<Vec<u8>> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::Message;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("scan"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut values = vec![];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await {
            Ok(Ok(m)) => values.push(m.payload().unwrap_or_default().to_vec()),
            Ok(Err(e)) => panic!("reading the topic: {e}"),
            Err(_) => break,
        }
    }
    values
}
