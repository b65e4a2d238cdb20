//! The `stack` topology: every function of `make stack` as its own process — the four
//! command functions, the three queries, the projector, the relay and the gateway in
//! proxy mode — on S3, Kafka, PostgreSQL and Redis. The S3 server (moto, keeping its
//! objects on disk), the broker (tansu, keeping its log in a SQLite file) and Redis are
//! this run's own, so the nemesis can pause, kill and restart them; PostgreSQL is the
//! machine's, in a fresh database whose backends the nemesis terminates.
//!
//! Faults: SIGKILL and restart of any function process; the broker killed and started
//! again; Redis restarted empty; the S3 server paused (SIGSTOP … SIGCONT) and killed
//! and started again; PostgreSQL backends terminated; a rebuild started while traffic
//! runs; deliveries duplicated and reordered (old commits published again, shuffled).
//!
//! The `stack-pg` topology is the same processes with the event store (and its outbox
//! and snapshots) in PostgreSQL (`TALLY_STORE=postgres`), in the read model's database.
//! In place of the S3 faults, the database's backends are terminated once more often,
//! and the commit table is locked for a while (every append and read of commits waits,
//! as on a paused S3 server).

use crate::check;
use crate::client::account_names;
use crate::procs::{wait_ready, Proc};
use crate::report::Report;
use crate::{drive, settle_and_check, Binaries, Plan, QUIET};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_es::{EventPublisher, EventStore, Outbox, Revision};
use tally_postgres::PgEventStore;
use tally_testkit::services::{
    free_port, fresh_database, required_env, s3_config, unique, PrivateService,
};
use tokio::sync::Mutex;

/// The functions, in start order (the gateway comes last, in front of them).
const FUNCTIONS: &[&str] = &[
    "open-account",
    "deposit",
    "withdraw",
    "close-account",
    "forget-holder",
    "get-account",
    "get-balance",
    "list-transactions",
    "projector",
    "relay",
    "transfer",
    "get-transfer",
    "transfer-saga",
];

type Shared<T> = Arc<Mutex<T>>;

/// Where the stack keeps its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// An S3 server of the run's own (moto, on disk): the `stack` topology.
    S3,
    /// PostgreSQL, in the read model's database: the `stack-pg` topology.
    Postgres,
}

impl StoreKind {
    /// The topology's name in reports.
    pub fn topology(self) -> &'static str {
        match self {
            StoreKind::S3 => "stack",
            StoreKind::Postgres => "stack-pg",
        }
    }
}

/// How long the quiet phase waits for the outbox to drain: well past a lease's
/// takeover time (window 5 s + operation timeout 10 s + margin 5 s) and the relay's
/// publishing of what it took over (the replay of seed 1796624949 drained in 43 s).
const DRAIN_WITHIN: Duration = Duration::from_secs(90);

/// The run's event store, as the checker and the nemesis reach it.
enum Store {
    S3 {
        server: Shared<PrivateService>,
        store: tally_s3::S3EventStore,
    },
    Postgres {
        store: PgEventStore,
    },
}

impl Store {
    fn events(&self) -> &dyn EventStore {
        match self {
            Store::S3 { store, .. } => store,
            Store::Postgres { store } => store,
        }
    }

    /// Whether the outbox names no commit at all. On S3 that is more than `pending`
    /// coming back empty: `pending` leaves a batch object to its writer for a couple
    /// of seconds and a lease until its takeover time (20 s after it was written), and
    /// a lease whose writer was killed, or whose publish failed, is published only
    /// then — by the relay taking it over.
    async fn outbox_empty(&self) -> Result<bool, tally_es::StoreError> {
        match self {
            // One LIST: reading every lease's body each time (as `unpublished_streams`
            // does) kept moto too busy for the relay to take them over.
            Store::S3 { store, .. } => store.outbox_is_empty().await,
            Store::Postgres { store } => Ok(store.pending(10).await?.is_empty()),
        }
    }
}

/// The name of the database at `url`.
fn database_of(url: &str) -> String {
    url.rsplit('/').next().unwrap_or_default().to_owned()
}

/// Run the `stack` topology (on S3) in `work` (logs), printing progress with `progress`.
pub async fn run(
    plan: &Plan,
    binaries: &Binaries,
    work: &Path,
    progress: impl Fn(String) + Send + Sync + 'static,
) -> Result<Report, String> {
    run_on(StoreKind::S3, plan, binaries, work, progress).await
}

/// Run the stack topology with its events in `kind` of store.
pub async fn run_on(
    kind: StoreKind,
    plan: &Plan,
    binaries: &Binaries,
    work: &Path,
    progress: impl Fn(String) + Send + Sync + 'static,
) -> Result<Report, String> {
    let broker = PrivateService::durable_broker(&work.join("broker")).await;
    let broker_address = broker.address();
    let redis = PrivateService::redis().await;
    let database_url = fresh_database().await;
    let topic = unique("commits");
    let stream_key = random_key();
    let (store_env, store) = match kind {
        StoreKind::S3 => {
            let s3 = PrivateService::durable_s3(&work.join("s3")).await;
            let bucket = unique("torture");
            let s3_endpoint = format!("http://{}", s3.address());
            let store = tally_s3::S3EventStore::new(&s3_config(&s3_endpoint, &bucket))
                .map_err(|e| e.to_string())?;
            let env = vec![
                ("TALLY_S3_BUCKET", bucket),
                ("TALLY_S3_ENDPOINT", s3_endpoint),
                ("AWS_ACCESS_KEY_ID", "test".into()),
                ("AWS_SECRET_ACCESS_KEY", "test".into()),
                ("AWS_REGION", "us-east-1".into()),
                // Packs written while the load runs (not only once it stops), so that
                // the rebuilds during traffic read through them, under the faults.
                ("TALLY_PACK_AT_MOST_SECONDS", "10".into()),
            ];
            let server = Arc::new(Mutex::new(s3));
            (env, Store::S3 { server, store })
        }
        StoreKind::Postgres => {
            // In the read model's database, as `STORE=postgres make stack` and the chart
            // run it by default: one pool per process for both.
            let store = PgEventStore::new(
                tally_postgres::connect(&database_url, 4)
                    .await
                    .map_err(|e| e.to_string())?,
            );
            let env = vec![("TALLY_STORE", "postgres".to_owned())];
            (env, Store::Postgres { store })
        }
    };
    let env: Vec<(String, String)> = store_env
        .into_iter()
        .chain([
            ("TALLY_KAFKA_BROKERS", broker_address.clone()),
            ("TALLY_KAFKA_TOPIC", topic.clone()),
            ("TALLY_KAFKA_GROUP", unique("projector")),
            ("TALLY_DATABASE_URL", database_url.clone()),
            ("TALLY_REDIS_URL", format!("redis://{}", redis.address())),
            ("TALLY_FAULT_INJECTION", plan.inject.clone()),
            // Commits on the topic are signed and checked, as in production.
            ("TALLY_STREAM_KEY", stream_key.clone()),
            // Holders' data keys are wrapped by a master key, as in production.
            ("TALLY_MASTER_KEY", random_key()),
        ])
        .map(|(k, v)| (k.to_owned(), v))
        .collect();

    // The init job: bucket (with its conditional-write probe) and topic.
    let migrate = tokio::process::Command::new(binaries.path("migrate"))
        .arg("storage")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .envs(env.iter().cloned())
        .status()
        .await
        .map_err(|e| format!("migrate: {e}"))?;
    if !migrate.success() {
        return Err(format!("migrate storage failed: {migrate}"));
    }

    let mut procs: Vec<Shared<Proc>> = Vec::new();
    let mut upstreams = Vec::new();
    for name in FUNCTIONS {
        let mut p = Proc::new(
            name,
            binaries.path(name),
            env.clone(),
            work.join(format!("{name}.log")),
            free_port(),
        );
        p.start().await?;
        if !matches!(*name, "projector" | "relay" | "transfer-saga") {
            upstreams.push(format!("{name}={}", p.base()));
        }
        procs.push(Arc::new(Mutex::new(p)));
    }
    let projector = FUNCTIONS
        .iter()
        .position(|name| *name == "projector")
        .expect("the projector is one of the functions");
    let projector_base = procs[projector].lock().await.base();
    let mut gateway = Proc::new(
        "gateway",
        binaries.path("gateway"),
        vec![("TALLY_UPSTREAMS".into(), upstreams.join(","))],
        work.join("gateway.log"),
        free_port(),
    );
    gateway.start().await?;
    let base = gateway.base();
    procs.push(Arc::new(Mutex::new(gateway)));
    for p in &procs {
        let base = p.lock().await.base();
        wait_ready(&base, Duration::from_secs(30)).await?;
    }

    let kafka = tally_kafka::KafkaStream::new(tally_kafka::KafkaConfig {
        brokers: broker_address.clone(),
        topic: topic.clone(),
        publish_timeout: Duration::from_secs(5),
        fetch_wait: tally_kafka::DEFAULT_FETCH_WAIT,
        // Signed like the functions' publishes, so that the duplicated and reordered
        // deliveries reach the consumers (an unsigned message is passed over).
        key: Some(tally_kafka::StreamKey::parse(&stream_key)?),
    })
    .map_err(|e| e.to_string())?;
    let store = Arc::new(store);
    let broker = Arc::new(Mutex::new(broker));
    let redis = Arc::new(Mutex::new(redis));
    let admin = tally_postgres::connect(&required_env("TALLY_TEST_DATABASE_URL"), 1)
        .await
        .map_err(|e| e.to_string())?;
    let database = database_of(&database_url);

    let load = {
        let (procs, redis) = (procs.clone(), redis.clone());
        let broker = broker.clone();
        let leave_out = plan.leave_out.clone();
        let (store, kafka) = (store.clone(), kafka.clone());
        let http = reqwest::Client::new();
        drive(
            plan,
            kind.topology(),
            base.clone(),
            progress,
            move |mut nemesis| async move {
                while let Some(()) = nemesis.next_fault().await {
                    let roll = nemesis.pick(0..100);
                    let on_s3 = matches!(*store, Store::S3 { .. });
                    let kind = match roll {
                        0..=29 => "sigkill",
                        30..=41 => "broker-killed",
                        42..=51 => "redis-restarted-empty",
                        52..=59 if on_s3 => "s3-paused",
                        60..=67 if on_s3 => "s3-killed",
                        52..=59 => "event-store-locked",
                        60..=79 => "postgres-backends-terminated",
                        80..=87 => "rebuild-during-traffic",
                        _ => "deliveries-duplicated-and-reordered",
                    };
                    if leave_out.iter().any(|k| k == kind) {
                        continue;
                    }
                    match kind {
                        "sigkill" => {
                            let i = nemesis.pick(0..procs.len());
                            let mut p = procs[i].lock().await;
                            p.kill().await;
                            nemesis.count(match p.name.as_str() {
                                "projector" => "sigkill-projector",
                                "relay" => "sigkill-relay",
                                "transfer-saga" => "sigkill-transfer-saga",
                                "gateway" => "sigkill-gateway",
                                "get-account" | "get-balance" | "list-transactions"
                                | "get-transfer" => "sigkill-query-function",
                                _ => "sigkill-command-function",
                            });
                            nemesis.pause(50..500).await;
                            p.start().await?;
                        }
                        "broker-killed" => {
                            let mut b = broker.lock().await;
                            b.stop().await;
                            nemesis.count(kind);
                            nemesis.pause(500..3000).await;
                            b.start().await;
                        }
                        "redis-restarted-empty" => {
                            let mut r = redis.lock().await;
                            r.stop().await;
                            nemesis.count(kind);
                            nemesis.pause(100..600).await;
                            r.start().await;
                        }
                        "s3-paused" => {
                            let Store::S3 { server, .. } = &*store else {
                                continue;
                            };
                            let s = server.lock().await;
                            s.pause();
                            nemesis.count(kind);
                            nemesis.pause(500..3000).await;
                            s.resume();
                        }
                        "s3-killed" => {
                            let Store::S3 { server, .. } = &*store else {
                                continue;
                            };
                            let mut s = server.lock().await;
                            s.stop().await;
                            nemesis.count(kind);
                            nemesis.pause(200..2000).await;
                            s.start().await;
                        }
                        "event-store-locked" => {
                            let Store::Postgres { store } = &*store else {
                                continue;
                            };
                            // Every append and read of commits waits behind the lock.
                            // Not taken within 1 s (behind a rebuild's switch), or on a
                            // connection just terminated: no fault this time.
                            let Ok(mut tx) = store.pool().begin().await else {
                                continue;
                            };
                            let mut locked = Ok(());
                            for statement in [
                                "SET LOCAL lock_timeout = '1s'",
                                "LOCK TABLE event_commits IN ACCESS EXCLUSIVE MODE",
                            ] {
                                if locked.is_ok() {
                                    locked =
                                        sqlx::query(statement).execute(&mut *tx).await.map(|_| ());
                                }
                            }
                            if locked.is_err() {
                                continue;
                            }
                            nemesis.count(kind);
                            nemesis.pause(500..3000).await;
                            // Rolled back, or dropped with its connection: unlocked.
                            let _ = tx.rollback().await;
                        }
                        "postgres-backends-terminated" => {
                            if terminate_backends(&admin, &database).await? > 0 {
                                nemesis.count("postgres-backends-terminated");
                            }
                        }
                        "rebuild-during-traffic" => {
                            // In the background: traffic goes on while it replays.
                            // Counted by how it ended: done (and whether through a pack,
                            // on S3), refused while another ran, or not done.
                            let (http, url) =
                                (http.clone(), format!("{projector_base}/projector/rebuild"));
                            let counter = nemesis.counter();
                            tokio::spawn(async move {
                                let answer = match http.post(url).send().await {
                                    Ok(answer) => answer,
                                    Err(_) => return counter.count("rebuild-cut-off"),
                                };
                                match answer.status().as_u16() {
                                    200 => {
                                        let report: serde_json::Value =
                                            answer.json().await.unwrap_or_default();
                                        counter.count("rebuild-during-traffic");
                                        let through = ["packed", "after_pack"]
                                            .iter()
                                            .filter_map(|k| report[k].as_u64())
                                            .sum::<u64>();
                                        if through > 0 {
                                            counter.count("rebuild-through-a-pack");
                                        }
                                    }
                                    409 => counter.count("rebuild-refused-another-running"),
                                    _ => counter.count("rebuild-failed"),
                                }
                            });
                        }
                        _ => {
                            let published =
                                duplicate_deliveries(store.events(), &kafka, &mut nemesis).await;
                            if published > 0 {
                                nemesis.count("deliveries-duplicated-and-reordered");
                            }
                        }
                    }
                }
                Ok(())
            },
        )
        .await?
    };

    // Quiet: every server up again, every process running; wait for the outbox to
    // drain and the projection to settle.
    if let Store::S3 { server, .. } = &*store {
        server.lock().await.resume();
    }
    let mut crashed = Vec::new();
    for p in &procs {
        let mut p = p.lock().await;
        if let Some(status) = p.exited() {
            crashed.push(format!("{} exited by itself: {status}", p.name));
            p.start().await?;
        }
    }
    wait_ready(&base, Duration::from_secs(30)).await?;
    // Until the outbox is empty: what the relay publishes is on the topic by then (a
    // run whose outbox does not drain is judged as it is: a commit missing from the
    // topic is a violation).
    let quiet = Instant::now();
    let drained = loop {
        if matches!(store.outbox_empty().await, Ok(true)) {
            break true;
        }
        if quiet.elapsed() >= DRAIN_WITHIN {
            break false;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    eprintln!(
        "torture {}: the outbox {} {:.1} s after the load",
        kind.topology(),
        if drained {
            "drained"
        } else {
            "still held entries"
        },
        quiet.elapsed().as_secs_f64()
    );
    tokio::time::sleep(QUIET * 2).await;

    let (mut verdict, settled) = settle_and_check(
        &load.ops,
        store.events(),
        &base,
        &account_names(plan),
        Duration::from_secs(plan.settle_seconds),
    )
    .await?;
    for c in crashed {
        verdict.violate("no-crash", c);
    }
    let on_topic = consume_topic(&broker_address, &topic).await?;
    check_topic(&mut verdict, store.events(), &on_topic).await?;
    for p in &procs {
        p.lock().await.kill().await;
    }
    Ok(Report::new(kind.topology(), plan, &load, settled, verdict))
}

/// Terminate every backend of `database` but the caller's: how many there were.
async fn terminate_backends(admin: &sqlx::PgPool, database: &str) -> Result<i64, String> {
    sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .fetch_one(admin)
    .await
    .map_err(|e| format!("pg_terminate_backend: {e}"))
}

/// Publish up to ten old commits of up to three streams again, shuffled: deliveries
/// duplicated and out of order. Returns how many were published.
async fn duplicate_deliveries(
    store: &dyn EventStore,
    kafka: &tally_kafka::KafkaStream,
    nemesis: &mut crate::Nemesis,
) -> usize {
    let Ok(streams) = store.streams().await else {
        return 0;
    };
    if streams.is_empty() {
        return 0;
    }
    let mut commits = Vec::new();
    for _ in 0..3 {
        let stream = &streams[nemesis.pick(0..streams.len())];
        if let Ok(read) = store.read(stream, Revision::new(1)).await {
            commits.extend(read);
        }
    }
    let mut picked = Vec::new();
    for _ in 0..commits.len().min(10) {
        let i = nemesis.pick(0..commits.len());
        picked.push(commits.swap_remove(i));
    }
    let mut published = 0;
    for commit in &picked {
        if kafka.publish(commit).await.is_ok() {
            published += 1;
        }
    }
    published
}

/// Every message on `topic`, read by a plain librdkafka consumer assigned every
/// partition from its beginning (no consumer group: nothing to join or rebalance) up
/// to each partition's high watermark: the revisions published, by stream.
async fn consume_topic(
    brokers: &str,
    topic: &str,
) -> Result<HashMap<String, HashSet<u64>>, String> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || read_topic(&brokers, &topic))
        .await
        .map_err(|e| e.to_string())?
}

fn read_topic(brokers: &str, topic: &str) -> Result<HashMap<String, HashSet<u64>>, String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    let timeout = Duration::from_secs(10);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("torture-check"))
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| format!("a consumer: {e}"))?;
    let metadata = patiently(&format!("metadata of {topic}"), || {
        consumer.fetch_metadata(Some(topic), timeout)
    })?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut assignment = TopicPartitionList::new();
    let mut remaining = HashMap::new();
    for &p in &partitions {
        let (low, high) = patiently(&format!("watermarks of {topic}/{p}"), || {
            consumer.fetch_watermarks(topic, p, timeout)
        })?;
        if high > low {
            remaining.insert(p, high);
        }
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let mut seen: HashMap<String, HashSet<u64>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !remaining.is_empty() && Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_secs(1)) else {
            continue;
        };
        let message = message.map_err(|e| format!("consuming {topic}: {e}"))?;
        if let Some(commit) = message
            .payload()
            .and_then(|p| tally_es::StoredCommit::from_bytes(p).ok())
        {
            seen.entry(commit.stream.as_str().to_owned())
                .or_default()
                .insert(commit.revision.get());
        }
        if remaining
            .get(&message.partition())
            .is_some_and(|high| message.offset() + 1 >= *high)
        {
            remaining.remove(&message.partition());
        }
    }
    if !remaining.is_empty() {
        return Err(format!(
            "{topic}: partitions {:?} were not read to their end within 300 s",
            remaining.keys().collect::<Vec<_>>()
        ));
    }
    Ok(seen)
}

/// `call`, asked up to six times: a broker still busy with what the load left (the
/// relay, the consumers; tens of thousands of commits on the stack-pg topology) may
/// time out an answer or two.
fn patiently<T>(
    what: &str,
    mut call: impl FnMut() -> rdkafka::error::KafkaResult<T>,
) -> Result<T, String> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match call() {
            Ok(answer) => return Ok(answer),
            Err(e) if attempts >= 6 => return Err(format!("{what}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// `every-commit-on-the-topic`: each commit of the store was published.
async fn check_topic(
    verdict: &mut check::Verdict,
    store: &dyn EventStore,
    on_topic: &HashMap<String, HashSet<u64>>,
) -> Result<(), String> {
    for stream in store.streams().await.map_err(|e| e.to_string())? {
        let commits = store
            .read(&stream, Revision::new(1))
            .await
            .map_err(|e| e.to_string())?;
        let seen = on_topic.get(stream.as_str());
        let missing: Vec<u64> = commits
            .iter()
            .map(|c| c.revision.get())
            .filter(|r| !seen.is_some_and(|s| s.contains(r)))
            .collect();
        if !missing.is_empty() {
            verdict.violate(
                "every-commit-on-the-topic",
                format!(
                    "{stream}: {} commits are not on the topic, at {:?}{}",
                    missing.len(),
                    &missing[..missing.len().min(20)],
                    if missing.len() > 20 { " …" } else { "" }
                ),
            );
        }
    }
    Ok(())
}

/// A stream key for one run (base64 of 32 random bytes).
fn random_key() -> String {
    use base64::Engine;
    let bytes: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
