//! The no-loss guarantees against real servers: an S3 server (moto), a Kafka-protocol
//! broker (tansu), PostgreSQL and Redis, all on 127.0.0.1 and provisioned by
//! `make test`. Each test uses its own bucket, topic, database and key prefix; a test
//! that plays an outage starts private servers it can stop.

use serde_json::{json, Value};
use std::time::Duration;
use tally_domain::AccountId;
use tally_es::{Revision, StreamId};
use tally_host::{Config, Host, Role};
use tally_testkit::services::{fresh_database, required_env, s3_store, unique, PrivateService};

struct Backends {
    s3_endpoint: String,
    bucket: String,
    brokers: String,
    topic: String,
    database_url: String,
    redis_url: String,
    redis_prefix: String,
}

impl Backends {
    async fn fresh() -> Self {
        Self {
            s3_endpoint: required_env("TALLY_TEST_S3_ENDPOINT"),
            bucket: unique("tally"),
            brokers: required_env("TALLY_TEST_KAFKA_BROKERS"),
            topic: unique("commits"),
            database_url: fresh_database().await,
            redis_url: required_env("TALLY_TEST_REDIS_URL"),
            redis_prefix: format!("{}:", unique("t")),
        }
    }

    fn config(&self, dir: &std::path::Path) -> Config {
        let mut c = Config::with_data_dir(dir);
        c.s3_bucket = Some(self.bucket.clone());
        c.s3_endpoint = Some(self.s3_endpoint.clone());
        c.s3_access_key_id = Some("test".into());
        c.s3_secret_access_key = Some("test".into());
        c.kafka_brokers = Some(self.brokers.clone());
        c.kafka_topic = self.topic.clone();
        c.kafka_group = unique("group");
        c.database_url = Some(self.database_url.clone());
        c.redis_url = Some(self.redis_url.clone());
        c.redis_prefix = self.redis_prefix.clone();
        c
    }

    /// The environment a function process needs to run on these backends.
    fn env(&self) -> Vec<(String, String)> {
        [
            ("TALLY_S3_BUCKET", self.bucket.as_str()),
            ("TALLY_S3_ENDPOINT", &self.s3_endpoint),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("TALLY_KAFKA_BROKERS", &self.brokers),
            ("TALLY_KAFKA_TOPIC", &self.topic),
            ("TALLY_DATABASE_URL", &self.database_url),
            ("TALLY_REDIS_URL", &self.redis_url),
            ("TALLY_REDIS_PREFIX", &self.redis_prefix),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

/// A gateway over `host` on a free loopback port.
struct Api {
    base: String,
    client: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

impl Api {
    async fn start(host: &Host) -> Self {
        let app = tally_host::gateway_app(host);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            base,
            client: reqwest::Client::new(),
            server,
        }
    }

    async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn host(config: &Config, role: Role) -> Host {
    let host = Host::build(config, role).await.unwrap();
    host.init().await.unwrap();
    host
}

/// Wait until the read model shows `id` at `revision` (projected, not caught up).
async fn converged(host: &Host, id: &str, revision: u64) -> tally_app::AccountView {
    let id = AccountId::parse(id).unwrap();
    for _ in 0..600 {
        if let Ok(Some(view)) = host.read_model.account(&id).await {
            if view.revision.get() >= revision {
                return view;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the read model did not reach {id}@{revision} within 30 s");
}

fn stream(id: &str) -> StreamId {
    StreamId::parse(id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_s3_store_passes_the_store_conformance_suite() {
    let endpoint = required_env("TALLY_TEST_S3_ENDPOINT");
    let store = s3_store(&endpoint, &unique("conformance"));
    store.ensure_bucket().await.unwrap();
    store.verify_conditional_writes().await.unwrap();
    tally_es::conformance::assert_store_conforms(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_s3_store_reads_its_segments_as_it_reads_the_commits() {
    let endpoint = required_env("TALLY_TEST_S3_ENDPOINT");
    let store = s3_store(&endpoint, &unique("segments")).with_segment_commits(3);
    store.ensure_bucket().await.unwrap();
    tally_es::conformance::assert_segments_read_as_the_commits(&store).await;
}

/// A one-event commit at `revision` of `stream`.
fn probe_commit(stream: &StreamId, revision: u64) -> tally_es::StoredCommit {
    serde_json::from_value(json!({
        "stream": stream,
        "revision": revision,
        "recorded_at": "2026-12-06T06:00:00Z",
        "events": [{"type": "Probe", "version": 1, "data": {"n": revision}}],
    }))
    .unwrap()
}

/// A stream read from its start with no segments — the command load of every open and
/// of every transfer's request (a new stream), a transfer's first read in a process —
/// GETs its segment head and probes its keys on S3, and lists nothing: a listing costs moto several GETs
/// (the more the more keys the bucket holds), and AWS a dozen. Counted in moto's
/// request log (`make test`'s moto writes one; `TALLY_TEST_S3_LOG`).
#[tokio::test]
async fn a_stream_read_from_its_start_without_segments_is_probed_not_listed() {
    let bucket = unique("probed");
    let store = s3_store(&required_env("TALLY_TEST_S3_ENDPOINT"), &bucket);
    store.ensure_bucket().await.unwrap();
    let new = stream("never-written");
    let short = stream("two-commits");
    for revision in [1, 2] {
        use tally_es::EventStore;
        store.append(&probe_commit(&short, revision)).await.unwrap();
    }
    let listings = || async {
        // moto logs a request once it has answered it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let log = std::fs::read_to_string(required_env("TALLY_TEST_S3_LOG")).unwrap();
        log.lines()
            .filter(|l| l.contains(&format!("/{bucket}/?list-type=2")))
            .count()
    };
    use tally_es::EventStore;
    assert!(store
        .read_after(&new, Revision::ZERO)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store.read_after(&short, Revision::ZERO).await.unwrap(),
        vec![probe_commit(&short, 1), probe_commit(&short, 2)]
    );
    assert_eq!(listings().await, 0, "read from the start by GETs alone");
    // What it saves: `read` lists (and the count above would see it).
    assert_eq!(store.read(&short, Revision::new(1)).await.unwrap().len(), 2);
    assert_eq!(listings().await, 1);
}

/// Segments are a copy the store checks before it trusts: a sealed segment that is gone,
/// one whose bytes are not what the head's digest says, or a head that does not parse,
/// is read around — the commits answer, and nothing reads differently. The next
/// compaction writes them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_or_altered_segment_is_read_around_from_the_commits() {
    use tally_es::{Compact, EventStore};
    let endpoint = required_env("TALLY_TEST_S3_ENDPOINT");
    let bucket = unique("segments");
    let store = s3_store(&endpoint, &bucket).with_segment_commits(4);
    store.ensure_bucket().await.unwrap();
    let s = stream("altered");
    let commits: Vec<_> = (1..=10).map(|r| probe_commit(&s, r)).collect();
    for c in &commits {
        store.append(c).await.unwrap();
    }
    let done = store.compact(&s, Some(Revision::new(10))).await.unwrap();
    assert_eq!(
        (done.covered.get(), done.commits, done.segments),
        (10, 10, 3)
    );
    let sealed = |first: u64, last: u64| format!("segments/altered/{first:020}-{last:020}.json");
    assert_eq!(
        store.keys("segments/altered/").await.unwrap(),
        [
            sealed(1, 4),
            sealed(5, 8),
            "segments/altered/head.json".into()
        ]
    );
    let reads_as_the_commits = |when: &'static str| {
        let (store, s, commits) = (&store, &s, &commits);
        async move {
            for from in [1, 3, 6, 9, 11] {
                let expected: Vec<_> = commits[(from as usize - 1).min(10)..].to_vec();
                assert_eq!(
                    store.read(s, Revision::new(from)).await.unwrap(),
                    expected,
                    "{when}: read from {from}"
                );
            }
        }
    };
    reads_as_the_commits("as compacted").await;

    // The first segment's events altered (valid JSON, its digest no longer the head's).
    let mut altered = commits[..4].to_vec();
    altered[1].events[0].data = json!({"n": 1_000_000});
    let body = serde_json::to_vec(&json!({"stream": "altered", "commits": altered})).unwrap();
    store
        .overwrite(&sealed(1, 4), Some(body.into()))
        .await
        .unwrap();
    reads_as_the_commits("a segment altered").await;

    // The second segment gone.
    store.overwrite(&sealed(5, 8), None).await.unwrap();
    reads_as_the_commits("a segment gone").await;

    // The head unreadable.
    store
        .overwrite("segments/altered/head.json", Some("{not json".into()))
        .await
        .unwrap();
    reads_as_the_commits("the head unreadable").await;

    // The next compaction starts over from the commits and writes it all again.
    let done = store.compact(&s, None).await.unwrap();
    assert_eq!(
        (done.covered.get(), done.commits, done.segments),
        (10, 10, 3)
    );
    reads_as_the_commits("compacted again").await;
    let again = store.compact(&s, None).await.unwrap();
    assert_eq!((again.covered.get(), again.commits), (10, 0));
}

/// The projector copies each stream into segments as it grows — at once past
/// `COMPACT_AFTER` revisions, once quiet (here 1 s) for fewer — and a rebuild from them
/// gives the rows the projector gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_projector_copies_streams_into_segments_as_they_grow_and_a_rebuild_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let backends = Backends::fresh().await;
    let mut config = backends.config(dir.path());
    config.compaction_quiet_seconds = 1;
    let host = host(&config, Role::Gateway).await;
    host.start_projection().await.unwrap();
    let api = Api::start(&host).await;
    api.post("/accounts", r#"{"ID": "busy"}"#).await;
    for _ in 0..70 {
        let (s, _) = api.post("/accounts/busy/deposit", r#"{"Amount": 1}"#).await;
        assert_eq!(s, 200);
    }
    api.post("/accounts", r#"{"ID": "quiet"}"#).await;
    api.post("/accounts/quiet/deposit", r#"{"Amount": 5}"#)
        .await;
    converged(&host, "busy", 71).await;
    converged(&host, "quiet", 2).await;
    let compactor = host
        .state
        .projector
        .compactor()
        .expect("a compactor on S3")
        .clone();
    let s3 = host.s3.clone().unwrap();
    for _ in 0..200 {
        if compactor.behind() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        compactor.behind(),
        0,
        "every stream is in its segments within 10 s"
    );
    for id in ["busy", "quiet"] {
        assert_eq!(
            s3.keys(&format!("segments/{id}/")).await.unwrap(),
            [format!("segments/{id}/head.json")],
            "{id}: fewer commits than a sealed segment holds: all in the head"
        );
    }
    let pool = host.pg.as_ref().unwrap().pool().clone();
    let live = dump(&pool).await;
    let report = host.state.projector.rebuild().await.unwrap();
    assert_eq!((report.streams, report.events), (2, 73));
    assert_eq!(
        dump(&pool).await,
        live,
        "a rebuild from the segments gives the same rows"
    );
}

#[tokio::test]
async fn the_s3_store_reads_from_any_revision_and_lists_its_streams() {
    let dir = tempfile::tempdir().unwrap();
    let backends = Backends::fresh().await;
    let host = host(&backends.config(dir.path()), Role::Gateway).await;
    let api = Api::start(&host).await;
    for id in ["alpha", "beta"] {
        api.post("/accounts", &format!(r#"{{"ID": "{id}"}}"#)).await;
        for _ in 0..3 {
            api.post(&format!("/accounts/{id}/deposit"), r#"{"Amount": 1}"#)
                .await;
        }
    }
    let store = host.store.clone();
    assert_eq!(
        store.streams().await.unwrap(),
        vec![stream("alpha"), stream("beta")]
    );
    let all = store
        .read(&stream("alpha"), Revision::new(1))
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|c| c.revision.get()).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let tail = store
        .read(&stream("alpha"), Revision::new(3))
        .await
        .unwrap();
    assert_eq!(
        tail.iter().map(|c| c.revision.get()).collect::<Vec<_>>(),
        vec![3, 4]
    );
    assert!(store
        .read(&stream("alpha"), Revision::new(5))
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .read(&stream("nobody"), Revision::new(1))
        .await
        .unwrap()
        .is_empty());
    // What came after a commit boundary (a warm stream's refresh): nothing new, a few
    // commits fetched by key, more than that (listed), everything, an unknown stream.
    let revisions = |commits: Vec<tally_es::StoredCommit>| {
        commits.iter().map(|c| c.revision.get()).collect::<Vec<_>>()
    };
    for _ in 0..4 {
        api.post("/accounts/beta/deposit", r#"{"Amount": 1}"#).await;
    }
    for (id, after, expected) in [
        ("alpha", 4, vec![]),
        ("alpha", 2, vec![3, 4]),
        ("beta", 1, vec![2, 3, 4, 5, 6, 7, 8]),
        ("beta", 0, vec![1, 2, 3, 4, 5, 6, 7, 8]),
        ("nobody", 3, vec![]),
    ] {
        let read = store
            .read_after(&stream(id), Revision::new(after))
            .await
            .unwrap();
        assert_eq!(revisions(read), expected, "{id} after {after}");
    }
    // One commit by its key (the relay's read): there, not there, unknown stream.
    let third = store
        .read_commit(&stream("beta"), Revision::new(3))
        .await
        .unwrap()
        .expect("beta@3 exists");
    assert_eq!(
        (third.stream, third.revision),
        (stream("beta"), Revision::new(3))
    );
    for (id, revision) in [("beta", 9), ("nobody", 1)] {
        assert_eq!(
            store
                .read_commit(&stream(id), Revision::new(revision))
                .await
                .unwrap(),
            None,
            "{id}@{revision}"
        );
    }
}

#[tokio::test]
async fn tally_refuses_an_s3_server_that_ignores_conditional_writes() {
    // A server that says yes to every request, like one that ignores If-None-Match.
    let app = axum::Router::new().fallback(|| async { "" });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let err = s3_store(&endpoint, "any")
        .verify_conditional_writes()
        .await
        .unwrap_err();
    assert!(err.contains("ignores If-None-Match"), "{err}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_seed_flow_on_the_real_backends_reaches_postgres_and_redis_through_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let backends = Backends::fresh().await;
    let host = host(&backends.config(dir.path()), Role::Gateway).await;
    host.start_projection().await.unwrap();
    cache_past_its_grace(&host).await;
    let api = Api::start(&host).await;
    assert_eq!(
        api.post("/accounts", r#"{"ID": "account123"}"#).await.0,
        201
    );
    assert_eq!(
        api.post("/accounts/account123/deposit", r#"{"Amount": 500.00}"#)
            .await
            .0,
        200
    );
    let (s, b) = api
        .post("/accounts/account123/withdraw", r#"{"Amount": 150.00}"#)
        .await;
    assert_eq!((s, b["revision"].as_u64()), (200, Some(3)));
    // Projected through Kafka, not caught up on demand:
    let view = converged(&host, "account123", 3).await;
    assert_eq!(view.balance, 35_000);
    let cached = host
        .cache
        .get(&AccountId::parse("account123").unwrap())
        .await;
    assert_eq!(
        cached.map(|c| (c.balance, c.revision.get())),
        Some((35_000, 3))
    );
    let (_, b) = api.get("/accounts/account123/balance").await;
    assert_eq!(
        b,
        json!({"id": "account123", "balance": "350.00", "currency": "USD", "revision": 3})
    );
    let (_, page) = api.get("/accounts/account123/transactions").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    // Nothing is left in the outbox once published.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(host
        .outbox
        .as_ref()
        .unwrap()
        .pending(10)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_keep_working_while_kafka_is_down_and_the_read_model_converges_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = PrivateService::persistent_broker().await;
    let mut backends = Backends::fresh().await;
    backends.brokers = broker.address();
    let config = backends.config(dir.path());
    let host = host(&config, Role::Gateway).await;
    let projection = host.start_projection().await.unwrap();
    let relay = host.relay().unwrap().with_grace(Duration::from_millis(200));
    let api = Api::start(&host).await;
    api.post("/accounts", r#"{"ID": "steady"}"#).await;
    converged(&host, "steady", 1).await;

    broker.stop().await;
    for n in 1..=10 {
        let (s, b) = api
            .post("/accounts/steady/deposit", r#"{"Amount": 1.00}"#)
            .await;
        assert_eq!(s, 200, "deposit {n} with the broker down: {b}");
    }
    assert!(
        !host
            .outbox
            .as_ref()
            .unwrap()
            .pending(100)
            .await
            .unwrap()
            .is_empty(),
        "undelivered commits wait in the outbox"
    );
    broker.start().await;
    let sweeper = tokio::spawn(async move {
        loop {
            let _ = relay.sweep().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let view = converged(&host, "steady", 11).await;
    assert_eq!(view.balance, 1_000);
    sweeper.abort();
    // Let the consumer leave its group while the broker is still there.
    projection.abort();
    let _ = projection.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_whose_process_died_before_publishing_still_reaches_the_read_model() {
    let dir = tempfile::tempdir().unwrap();
    let backends = Backends::fresh().await;
    let bin = env!("CARGO_BIN_EXE_gateway");
    let mut env = backends.env();
    env.push(("TALLY_FAULT_INJECTION".into(), "crash-after-append".into()));
    let doomed = tally_testkit::Function::server_with(bin, dir.path(), &env).await;
    let req = tally_testkit::Req::post("/accounts").json(r#"{"ID": "phoenix"}"#);
    let answer = tokio::time::timeout(Duration::from_secs(10), doomed.try_call(&req))
        .await
        .expect("the request ends");
    assert!(answer.is_err(), "the process died mid-request: {answer:?}");
    drop(doomed);

    // The commit is in the store, and nowhere else yet.
    let config = backends.config(dir.path());
    let observer = host(&config, Role::Tool).await;
    let mut landed = false;
    for _ in 0..100 {
        if !observer
            .store
            .read(&stream("phoenix"), Revision::new(1))
            .await
            .unwrap()
            .is_empty()
        {
            landed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(landed, "the append happened before the crash");
    assert!(observer
        .read_model
        .account(&AccountId::parse("phoenix").unwrap())
        .await
        .unwrap()
        .is_none());

    // A healthy gateway (its relay and projector) delivers it, with no manual step.
    let healthy = tally_testkit::Function::server_with(bin, dir.path(), &backends.env()).await;
    let view = converged(&observer, "phoenix", 1).await;
    assert!(!view.closed);
    drop(healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_down_queries_still_answer_and_commands_are_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = PrivateService::redis().await;
    let mut backends = Backends::fresh().await;
    backends.redis_url = format!("redis://{}", redis.address());
    let host = host(&backends.config(dir.path()), Role::Gateway).await;
    host.start_projection().await.unwrap();
    let api = Api::start(&host).await;
    api.post("/accounts", r#"{"ID": "cached"}"#).await;
    api.post("/accounts/cached/deposit", r#"{"Amount": 5}"#)
        .await;
    converged(&host, "cached", 2).await;

    redis.stop().await;
    let (s, _) = api
        .post("/accounts/cached/deposit", r#"{"Amount": 5}"#)
        .await;
    assert_eq!(s, 200, "commands do not need the cache");
    let (s, b) = api.get("/accounts/cached/balance?min_revision=3").await;
    assert_eq!((s, b["balance"].as_str()), (200, Some("10.00")));
    let (s, b) = api.get("/accounts/cached").await;
    assert_eq!(s, 200, "{b}");

    redis.start().await;
    // The cache waits a second after a failed connection before it tries again, and a
    // restarted Redis takes no entry in its first seconds.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    cache_past_its_grace(&host).await;
    api.post("/accounts/cached/deposit", r#"{"Amount": 5}"#)
        .await;
    converged(&host, "cached", 4).await;
    let mut cached = None;
    for _ in 0..100 {
        cached = host.cache.get(&AccountId::parse("cached").unwrap()).await;
        if cached.is_some_and(|c| c.revision.get() == 4) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        cached.map(|c| c.balance),
        Some(1_500),
        "the cache is written again once Redis is back"
    );
}

async fn dump(pool: &sqlx::PgPool) -> Vec<String> {
    let mut rows: Vec<String> = sqlx::query_scalar(
        "SELECT row_to_json(a)::text FROM (SELECT * FROM accounts ORDER BY id) a",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let txs: Vec<String> = sqlx::query_scalar(
        "SELECT row_to_json(t)::text FROM (SELECT * FROM transactions ORDER BY account_id, revision) t",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.extend(txs);
    rows
}

/// The movements' foreign key as PostgreSQL describes it, if it is there.
async fn movements_foreign_key(pool: &sqlx::PgPool) -> Option<String> {
    sqlx::query_scalar(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint
          WHERE conrelid = 'transactions'::regclass AND contype = 'f'",
    )
    .fetch_optional(pool)
    .await
    .unwrap()
}

const MOVEMENTS_FOREIGN_KEY: &str =
    "FOREIGN KEY (account_id) REFERENCES accounts(id) ON DELETE CASCADE";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropping_the_read_model_and_rebuilding_it_from_the_store_gives_identical_rows() {
    let dir = tempfile::tempdir().unwrap();
    let backends = Backends::fresh().await;
    let host = host(&backends.config(dir.path()), Role::Gateway).await;
    host.start_projection().await.unwrap();
    let api = Api::start(&host).await;
    for id in ["r1", "r2", "r3"] {
        api.post("/accounts", &format!(r#"{{"ID": "{id}"}}"#)).await;
        for n in 1..=4 {
            api.post(
                &format!("/accounts/{id}/deposit"),
                &format!(r#"{{"Amount": {n}.25}}"#),
            )
            .await;
        }
        api.post(&format!("/accounts/{id}/withdraw"), r#"{"Amount": 2}"#)
            .await;
    }
    api.post("/accounts/r3/withdraw", r#"{"Amount": 9}"#).await;
    api.post("/accounts/r3/close", "").await;
    converged(&host, "r1", 6).await;
    converged(&host, "r2", 6).await;
    converged(&host, "r3", 8).await;
    let pool = host.pg.as_ref().unwrap().pool().clone();
    let live = dump(&pool).await;
    assert_eq!(live.len(), 3 + 16, "three accounts, sixteen movements");

    assert_eq!(
        movements_foreign_key(&pool).await.as_deref(),
        Some(MOVEMENTS_FOREIGN_KEY)
    );

    let report = host.state.projector.rebuild().await.unwrap();
    assert_eq!((report.streams, report.events), (3, 20));
    assert_eq!(dump(&pool).await, live, "a rebuild gives the same rows");
    assert_eq!(
        movements_foreign_key(&pool).await.as_deref(),
        Some(MOVEMENTS_FOREIGN_KEY),
        "the new generation has the foreign key as the migration made it"
    );

    // And into a brand-new database, from the store alone.
    let mut other = backends.config(dir.path());
    other.database_url = Some(fresh_database().await);
    let fresh = host_no_init(&other).await;
    fresh.state.projector.rebuild().await.unwrap();
    assert_eq!(dump(fresh.pg.as_ref().unwrap().pool()).await, live);
}

/// More streams than one rebuild batch (`REBUILD_BATCH`), commits of one and of two
/// events, movements with and without a transfer: the batched rebuild (its movements
/// copied in with `COPY`) gives exactly the rows the projector gave commit by commit
/// (with `INSERT`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_in_batches_gives_the_rows_the_projector_gave_commit_by_commit() {
    use tally_domain::{AccountEvent, Currency};
    use tally_es::{Commit, CommitMetadata};
    let dir = tempfile::tempdir().unwrap();
    let backends = Backends::fresh().await;
    let host = host(&backends.config(dir.path()), Role::Tool).await;
    let streams = tally_app::REBUILD_BATCH * 2 + 7;
    let at = time::OffsetDateTime::now_utc();
    let commits = (0..streams).flat_map(|n| {
        let id = AccountId::parse(&format!("batch-{n:03}")).unwrap();
        let commit = |revision: u64, events: Vec<AccountEvent>| {
            Commit::new(
                id.stream_id().clone(),
                Revision::new(revision),
                at,
                events,
                CommitMetadata::default(),
            )
        };
        let amount = 100 + n as i64;
        let mut commits = vec![
            commit(
                1,
                vec![AccountEvent::Opened {
                    id: id.clone(),
                    currency: Currency::USD,
                    owner: None,
                    holder: None,
                }],
            ),
            commit(
                2,
                vec![
                    AccountEvent::Deposited {
                        amount,
                        balance: amount,
                    },
                    AccountEvent::Withdrawn {
                        amount: 1,
                        balance: amount - 1,
                    },
                ],
            ),
        ];
        if n % 3 == 0 {
            commits.push(commit(4, vec![AccountEvent::Closed]));
        } else {
            // A movement with its transfer and counterparty (the other columns NULL).
            let transfer = tally_domain::TransferId::parse(&format!("{n:032x}")).unwrap();
            commits.push(commit(
                4,
                vec![AccountEvent::TransferredOut {
                    transfer,
                    counterparty: AccountId::parse("batch-000").unwrap(),
                    amount: 1,
                    balance: amount - 2,
                }],
            ));
        }
        commits
    });
    for commit in commits {
        let stored = commit.encode();
        host.store.append(&stored).await.unwrap();
        host.state.projector.handle(&stored).await.unwrap();
    }
    let pool = host.pg.as_ref().unwrap().pool().clone();
    let live = dump(&pool).await;
    let closed = streams.div_ceil(3);
    assert_eq!(
        live.len(),
        streams * 3 + (streams - closed),
        "an account row and two movements each, and a transfer out of those not closed"
    );

    let report = host.state.projector.rebuild().await.unwrap();
    assert_eq!(report.streams, streams);
    assert_eq!(report.events, streams * 4);
    assert_eq!(
        dump(&pool).await,
        live,
        "a batched rebuild gives the same rows"
    );
}

/// A rebuild that fails half-way (a stream that does not start with its opening)
/// leaves the live read model as it was — its rows, its foreign key — and drops the
/// generation it had half filled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_that_fails_leaves_the_live_read_model_as_it_was() {
    use tally_domain::AccountEvent;
    use tally_es::{Commit, CommitMetadata};
    let dir = tempfile::tempdir().unwrap();
    let backends = Backends::fresh().await;
    let host = host(&backends.config(dir.path()), Role::Tool).await;
    let api = Api::start(&host).await;
    api.post("/accounts", r#"{"ID": "fine"}"#).await;
    let orphan = Commit::new(
        stream("orphan"),
        Revision::new(1),
        time::OffsetDateTime::now_utc(),
        vec![AccountEvent::Deposited {
            amount: 5,
            balance: 5,
        }],
        CommitMetadata::default(),
    );
    host.store.append(&orphan.encode()).await.unwrap();
    let pool = host.pg.as_ref().unwrap().pool().clone();
    let before = dump(&pool).await;

    let failed = host.state.projector.rebuild().await;
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(dump(&pool).await, before, "the live rows are untouched");
    let leftover: Option<String> = sqlx::query_scalar("SELECT to_regclass('accounts_next')::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(leftover, None, "the half-built generation is gone");
    assert_eq!(
        movements_foreign_key(&pool).await.as_deref(),
        Some(MOVEMENTS_FOREIGN_KEY)
    );
    let refused = sqlx::query(
        "INSERT INTO transactions (account_id, revision, kind, amount, balance, recorded_at)
         VALUES ('nobody', 1, 'deposit', 1, 1, now())",
    )
    .execute(&pool)
    .await;
    assert!(
        refused.is_err(),
        "a movement without its account is refused"
    );
}

async fn host_no_init(config: &Config) -> Host {
    Host::build(config, Role::Tool).await.unwrap()
}

#[tokio::test]
async fn a_balance_whose_write_through_failed_is_never_served_stale() {
    use tally_app::Cache;
    let redis = PrivateService::redis().await;
    let cache = tally_redis::RedisCache::new(&format!("redis://{}", redis.address()), "t:")
        .unwrap()
        .with_fresh_grace(Duration::ZERO);
    let id = AccountId::parse("blip").unwrap();
    cache.put(&id, cached(100, 1)).await;
    assert_eq!(cache.get(&id).await, Some(cached(100, 1)));

    // Redis stops answering writes for a moment: the write-through of revision 2 fails.
    let paused = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "CLIENT",
            "PAUSE",
            "500",
            "WRITE",
        ])
        .status()
        .unwrap();
    assert!(paused.success());
    cache.put(&id, cached(200, 2)).await;
    tokio::time::sleep(Duration::from_millis(1600)).await;

    // Revision 1 must not be served as the balance any more: either it was
    // invalidated, or the write of revision 2 (sent again on a new connection) landed
    // once Redis took writes again.
    let now = cache.get(&id).await;
    assert!(
        now.is_none() || now == Some(cached(200, 2)),
        "the stale balance was invalidated or replaced: {now:?}"
    );
    cache.put(&id, cached(200, 2)).await;
    assert_eq!(cache.get(&id).await, Some(cached(200, 2)));
}

/// Found by `make torture` (stack, seed 20261201: `monotonic-reads`): a query missed,
/// read revision 1, and filled the cache after Redis had restarted empty — the restart
/// had swallowed the write-through of revision 2, already acknowledged — so that client
/// read revision 1 from the cache afterwards.
#[tokio::test]
async fn a_query_that_read_before_a_redis_restart_does_not_cache_its_old_balance() {
    use tally_app::Cache;
    let mut redis = PrivateService::redis().await;
    let url = format!("redis://{}", redis.address());
    let grace = Duration::from_millis(400);
    let cache = || {
        tally_redis::RedisCache::new(&url, "t:")
            .unwrap()
            .with_fresh_grace(grace)
    };
    let (query_side, command_side, reader) = (cache(), cache(), cache());
    let id = AccountId::parse("restarted").unwrap();
    // The epoch is past its grace.
    let _ = query_side.lookup(&id).await;
    tokio::time::sleep(grace).await;

    // The query misses and reads revision 1 from the store ...
    let lookup = query_side.lookup(&id).await;
    assert_eq!(lookup.hit, None);
    assert!(
        lookup.token.0.is_some(),
        "past the grace, a lookup may fill"
    );
    // ... Redis restarts, the command's write-through of revision 2 falls in the outage
    // (the command answers all the same) ...
    redis.stop().await;
    command_side.put(&id, cached(200, 2)).await;
    redis.start().await;
    reaches(&query_side).await;
    // ... and the query fills what it read before.
    query_side.fill(&id, cached(100, 1), lookup.token).await;
    assert_eq!(
        reader.get(&id).await,
        None,
        "revision 1, older than what was acknowledged, is not cached"
    );

    // A lookup after the restart, once the new epoch is past its grace, may fill.
    tokio::time::sleep(grace).await;
    let lookup = query_side.lookup(&id).await;
    query_side.fill(&id, cached(200, 2), lookup.token).await;
    assert_eq!(reader.get(&id).await, Some(cached(200, 2)));
    // After a clear (a rebuild), only a lookup that came after it may fill.
    let before = query_side.lookup(&id).await;
    query_side.clear().await;
    query_side.fill(&id, cached(200, 2), before.token).await;
    assert_eq!(reader.get(&id).await, None, "a clear refuses older fills");
}

/// Found by `make torture` (stack, seed 1796183076: `monotonic-reads`, revision 15 read
/// 0.6 s after a Redis restart, 16 acknowledged to that client before). The two ways an
/// older entry got into the restarted, empty Redis while a newer commit's write-through
/// was lost with the old instance (or skipped while its process waited to reconnect):
/// the older command's write-through, sent a second time after its first send failed
/// as Redis went down, created it; or a query that missed on the new Redis, read the
/// store before the newer commit, filled it.
#[tokio::test]
async fn after_a_redis_restart_no_older_balance_is_cached_while_a_newer_write_through_may_be_lost()
{
    use tally_app::Cache;
    let mut redis = PrivateService::redis().await;
    let url = format!("redis://{}", redis.address());
    let grace = Duration::from_millis(1500);
    let cache = || {
        tally_redis::RedisCache::new(&url, "t:")
            .unwrap()
            .with_fresh_grace(grace)
    };
    let (older_command, newer_command, query_side, reader) = (cache(), cache(), cache(), cache());
    let id = AccountId::parse("restarted").unwrap();
    let _ = reader.lookup(&id).await;
    tokio::time::sleep(grace).await;
    newer_command.put(&id, cached(200, 16)).await;
    assert_eq!(reader.get(&id).await, Some(cached(200, 16)));

    // Redis restarts empty: revision 16's entry is gone with it.
    redis.stop().await;
    redis.start().await;
    reaches(&older_command).await;
    // Revision 15's write-through, sent again on a new connection, lands now.
    older_command.put(&id, cached(150, 15)).await;
    assert_eq!(
        reader.get(&id).await,
        None,
        "an older command's write-through creates nothing on a Redis that just lost entries"
    );
    // A query misses, reads revision 15 from the store, and fills.
    let lookup = query_side.lookup(&id).await;
    assert_eq!(lookup.hit, None);
    query_side.fill(&id, cached(150, 15), lookup.token).await;
    assert_eq!(
        reader.get(&id).await,
        None,
        "a query that looked up in the new Redis's first moments cannot fill"
    );

    // Once the grace is over, the cache takes entries again.
    tokio::time::sleep(grace).await;
    newer_command.put(&id, cached(210, 17)).await;
    assert_eq!(reader.get(&id).await, Some(cached(210, 17)));
}

fn cached(minor: i64, revision: u64) -> tally_app::CachedBalance {
    tally_app::CachedBalance {
        balance: minor,
        currency: tally_domain::Currency::USD,
        revision: Revision::new(revision),
    }
}

/// Wait until the host's Redis has an epoch past its grace (`tally_redis::FRESH_GRACE`), as a
/// Redis that has run for a while has: before, no entry is created.
async fn cache_past_its_grace(host: &Host) {
    let id = AccountId::parse("epoch").unwrap();
    for _ in 0..100 {
        if host.cache.lookup(&id).await.token.0.is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the cache's epoch is not past its grace after 10 s");
}

/// Wait until `cache` reaches its (restarted) Redis.
async fn reaches(cache: &tally_redis::RedisCache) {
    for _ in 0..50 {
        if cache.ping().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the cache does not reach the restarted Redis");
}

#[tokio::test]
async fn the_s3_store_keeps_the_newest_snapshot_and_commands_load_from_it() {
    use tally_es::SnapshotStore;
    let dir = tempfile::tempdir().unwrap();
    let backends = Backends::fresh().await;
    let mut config = backends.config(dir.path());
    config.snapshot_every = 5;
    let host = host(&config, Role::Gateway).await;
    let api = Api::start(&host).await;
    api.post("/accounts", r#"{"ID": "snap"}"#).await;
    for _ in 0..11 {
        api.post("/accounts/snap/deposit", r#"{"Amount": 2.50}"#)
            .await;
    }
    let s3 = host.s3.clone().unwrap();
    let mut latest = None;
    for _ in 0..100 {
        latest = s3.latest(&stream("snap")).await.unwrap();
        if latest.as_ref().is_some_and(|s| s.revision.get() == 10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(latest.map(|s| s.revision.get()), Some(10));
    let keys = s3.keys("snapshots/snap/").await.unwrap();
    assert_eq!(keys.len(), 1, "older snapshots are deleted: {keys:?}");
    let (s, b) = api
        .post("/accounts/snap/withdraw", r#"{"Amount": 7.50}"#)
        .await;
    assert_eq!(
        (s, b["balance"].as_str(), b["revision"].as_u64()),
        (200, Some("20.00"), Some(13))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replayed_command_never_puts_an_old_balance_back_in_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let backends = Backends::fresh().await;
    let host = host(&backends.config(dir.path()), Role::Gateway).await;
    host.start_projection().await.unwrap();
    let api = Api::start(&host).await;
    api.post("/accounts", r#"{"ID": "replay"}"#).await;
    let deposit = || {
        api.client
            .post(format!("{}/accounts/replay/deposit", api.base))
            .header("content-type", "application/json")
            .header("idempotency-key", "dep-1")
            .body(r#"{"Amount": 5.00}"#)
            .send()
    };
    assert_eq!(deposit().await.unwrap().status(), 200);
    api.post("/accounts/replay/withdraw", r#"{"Amount": 2.00}"#)
        .await;
    converged(&host, "replay", 3).await;
    host.cache.clear().await;

    let replay = deposit().await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let (_, b) = api.get("/accounts/replay/balance").await;
    assert_eq!(
        (b["balance"].as_str(), b["revision"].as_u64()),
        (Some("3.00"), Some(3))
    );
}

#[tokio::test]
async fn postgres_applies_a_run_of_commits_in_one_go_and_refuses_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let backends = Backends::fresh().await;
    let host = host(&backends.config(dir.path()), Role::Projector).await;
    tally_testkit::read_model::a_run_of_commits_applies_what_is_new_and_refuses_a_gap(
        &*host.read_model,
    )
    .await;
}

#[tokio::test]
async fn postgres_applies_runs_of_several_streams_in_one_transaction_each_as_alone() {
    let dir = tempfile::tempdir().unwrap();
    let backends = Backends::fresh().await;
    let host = host(&backends.config(dir.path()), Role::Projector).await;
    tally_testkit::read_model::runs_of_several_streams_apply_together_each_as_alone(
        &*host.read_model,
    )
    .await;
}

#[tokio::test]
async fn postgres_rebuilds_a_new_generation_beside_the_live_one_and_switches_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let backends = Backends::fresh().await;
    let host = host(&backends.config(dir.path()), Role::Projector).await;
    tally_testkit::read_model::a_rebuild_fills_a_new_generation_beside_the_live_one_and_switches_at_once(
        &*host.read_model,
    )
    .await;
}

/// Two processes' read models on one database: one rebuild at a time between them.
#[tokio::test]
async fn postgres_runs_one_rebuild_at_a_time_across_processes() {
    let url = fresh_database().await;
    let one = tally_postgres::connect(&url, 4).await.unwrap();
    tally_postgres::migrate(&one).await.unwrap();
    let other = tally_postgres::connect(&url, 4).await.unwrap();
    tally_testkit::read_model::one_rebuild_runs_at_a_time(
        &tally_postgres::PgReadModel::new(one),
        &tally_postgres::PgReadModel::new(other),
    )
    .await;
}

/// A rebuild whose session ended (its process killed, its connection terminated) holds
/// nothing: the next rebuild begins and drops what it left; the one that lost its
/// session cannot switch to a generation that is no longer its own.
#[tokio::test]
async fn postgres_a_rebuild_that_lost_its_session_gives_way_and_cannot_switch() {
    use tally_app::{Applied, ReadModel, RebuildBegun};
    let url = fresh_database().await;
    let admin = tally_postgres::connect(&url, 2).await.unwrap();
    tally_postgres::migrate(&admin).await.unwrap();
    let dying = tally_postgres::PgReadModel::new(tally_postgres::connect(&url, 2).await.unwrap());
    let next = tally_postgres::PgReadModel::new(tally_postgres::connect(&url, 2).await.unwrap());
    let id = tally_domain::AccountId::parse("lost-session").unwrap();
    let opened = tally_es::Commit::new(
        id.stream_id().clone(),
        Revision::new(1),
        time::OffsetDateTime::now_utc(),
        vec![tally_domain::AccountEvent::Opened {
            id: id.clone(),
            currency: tally_domain::Currency::USD,
            owner: None,
            holder: None,
        }],
        tally_es::CommitMetadata::default(),
    );

    assert_eq!(dying.begin_rebuild().await.unwrap(), RebuildBegun::Started);
    assert_eq!(
        dying
            .apply_runs_rebuilding(&[std::slice::from_ref(&opened)])
            .await
            .unwrap(),
        vec![Applied::Applied]
    );
    assert_eq!(
        next.begin_rebuild().await.unwrap(),
        RebuildBegun::AnotherRunning
    );
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_locks
         WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(terminated, 1, "the rebuild's session holds the lock");
    // PostgreSQL releases the lock as the terminated backend exits.
    let mut begun = RebuildBegun::AnotherRunning;
    for _ in 0..50 {
        begun = next.begin_rebuild().await.unwrap();
        if begun == RebuildBegun::Started {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        begun,
        RebuildBegun::Started,
        "the lock went with the session"
    );
    let leftover: i64 = sqlx::query_scalar("SELECT count(*) FROM accounts_next")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(leftover, 0, "the dead rebuild's generation was dropped");
    assert!(
        dying.finish_rebuild().await.is_err(),
        "a rebuild without its session does not switch to another's generation"
    );
    dying.abandon_rebuild().await.unwrap_err();
    // The live rebuild is untouched by the dead one's failed switch and abandon.
    assert_eq!(
        next.apply_runs_rebuilding(&[std::slice::from_ref(&opened)])
            .await
            .unwrap(),
        vec![Applied::Applied]
    );
    next.finish_rebuild().await.unwrap();
    assert_eq!(next.position(&id).await.unwrap(), Revision::new(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outbox_entries_done_together_are_deleted_together_and_each_caller_waits_for_its_own() {
    use tally_es::Outbox;
    let store = s3_store(&required_env("TALLY_TEST_S3_ENDPOINT"), &unique("outbox"));
    store.ensure_bucket().await.unwrap();
    let stream = StreamId::parse("batched").unwrap();
    for n in 1..=200 {
        store.record(&stream, Revision::new(n), "a1").await.unwrap();
    }
    assert_eq!(store.pending(1000).await.unwrap().len(), 200);
    let done = futures::future::join_all((1..=200).map(|n| {
        let (store, stream) = (store.clone(), stream.clone());
        async move { store.done(&stream, Revision::new(n), "a1").await }
    }))
    .await;
    assert!(done.iter().all(Result::is_ok), "{done:?}");
    assert!(
        store.pending(1000).await.unwrap().is_empty(),
        "each done() returned after its entry was gone"
    );
    // Forgetting an entry that is not there is not an error (a relay and a command may
    // both be done with one commit).
    store.done(&stream, Revision::new(7), "a1").await.unwrap();
}

/// With a lease, a process's next commits on a stream it recorded an entry for moments
/// ago write no outbox object: they join the lease. A relay of another process leaves a
/// lease alone until its takeover time, then publishes every commit of its streams from
/// the listed revision on — the ones whose writer died before their publish among them
/// — and deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outbox_lease_covers_a_streams_next_commits_and_a_relay_takes_it_over_after_its_writer()
{
    use std::collections::BTreeSet;
    use tally_es::{EventStore, Outbox};
    let endpoint = required_env("TALLY_TEST_S3_ENDPOINT");
    let bucket = unique("outbox-lease");
    let (window, takeover) = (Duration::from_millis(1500), Duration::from_secs(4));
    let writer = s3_store(&endpoint, &bucket).with_outbox_lease_taken_over_after(window, takeover);
    writer.ensure_bucket().await.unwrap();
    let hot = stream("hot");
    let leased_at = std::time::Instant::now();
    for n in 1..=3 {
        writer
            .record(&hot, Revision::new(n), &format!("a{n}"))
            .await
            .unwrap();
        writer.append(&probe_commit(&hot, n)).await.unwrap();
    }
    let objects = writer.keys("outbox/").await.unwrap();
    assert_eq!(
        objects.len(),
        1,
        "the first entry wrote a lease, the next two joined it: {objects:?}"
    );
    assert!(objects[0].starts_with("outbox/="), "{objects:?}");
    assert!(
        writer.pending(100).await.unwrap().len() == 3,
        "the writer lists the entries that joined its lease"
    );
    // The writer publishes the first and dies before it publishes the other two.
    writer.done(&hot, Revision::new(1), "a1").await.unwrap();

    let relay = s3_store(&endpoint, &bucket);
    assert!(
        relay.pending(100).await.unwrap().is_empty(),
        "another process's lease is not read before its takeover time"
    );
    // Before its window closed, the lease was renewed for the stream in use: past the
    // window, the next entry joins the renewal (never appended: its writer died first).
    tokio::time::sleep(window.saturating_sub(leased_at.elapsed()) + Duration::from_millis(100))
        .await;
    let before = writer.keys("outbox/").await.unwrap();
    assert_eq!(before.len(), 2, "the lease and its renewal: {before:?}");
    writer.record(&hot, Revision::new(4), "a4").await.unwrap();
    assert_eq!(
        writer.keys("outbox/").await.unwrap(),
        before,
        "the entry joined the renewal"
    );
    // A lease whose stream has nothing from its revision on (an entry whose append
    // never happened) is deleted when taken over.
    writer
        .record(&stream("cold"), Revision::new(1), "c1")
        .await
        .unwrap();
    // The writer dies: it renews nothing more.
    drop(writer);

    tokio::time::sleep(takeover.saturating_sub(leased_at.elapsed()) + Duration::from_millis(500))
        .await;
    let pending = relay.pending(100).await.unwrap();
    let revisions = revisions_of(&pending, &hot);
    assert_eq!(
        revisions,
        BTreeSet::from([1, 2, 3]),
        "every commit of the lease's stream from its revision on (the published one again: at least once): {pending:?}"
    );
    for e in &pending {
        assert!(relay
            .read_commit(&e.stream, e.revision)
            .await
            .unwrap()
            .is_some());
        relay.done(&e.stream, e.revision, &e.attempt).await.unwrap();
    }
    assert!(
        !relay.keys("outbox/").await.unwrap().contains(&objects[0]),
        "the relay deleted the lease it took over once it did every entry"
    );
    // The renewal of the first (its stream from revision 3, the one entry that joined
    // it never landed) is taken over in turn: commit 3 once more, then nothing is left.
    drain_taken_over_leases(&relay, |e| {
        assert_eq!((e.stream.as_str(), e.revision.get()), ("hot", 3), "{e:?}");
    })
    .await;
}

/// The revisions of `stream` that `pending` names.
fn revisions_of(
    pending: &[tally_es::OutboxEntry],
    stream: &StreamId,
) -> std::collections::BTreeSet<u64> {
    pending
        .iter()
        .filter(|e| &e.stream == stream)
        .map(|e| e.revision.get())
        .collect()
}

/// Do what `relay` lists (each entry checked by `check`) until the outbox is empty —
/// every lease taken over and deleted — within 10 s.
async fn drain_taken_over_leases(
    relay: &tally_s3::S3EventStore,
    check: impl Fn(&tally_es::OutboxEntry),
) {
    use tally_es::Outbox;
    let mut left = Vec::new();
    for _ in 0..50 {
        for e in relay.pending(1000).await.unwrap() {
            check(&e);
            relay.done(&e.stream, e.revision, &e.attempt).await.unwrap();
        }
        left = relay.keys("outbox/").await.unwrap();
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        left.is_empty(),
        "every lease is taken over and deleted: {left:?}"
    );
}

/// A lease taken over late publishes the commits it can have promised — those written
/// by its Last-Modified plus its takeover time — not every later commit of its streams.
/// (Regression: a takeover republished a hot stream's whole history since the lease,
/// for every lease that listed it; after a run with long broker outages the relay
/// worked through thousands of commits and the outbox did not drain in 90 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_taken_over_late_publishes_only_the_commits_it_can_have_promised() {
    use std::collections::BTreeSet;
    use tally_es::{EventStore, Outbox};
    let endpoint = required_env("TALLY_TEST_S3_ENDPOINT");
    let bucket = unique("lease-late");
    let (window, takeover) = (Duration::from_millis(500), Duration::from_secs(2));
    let writer = s3_store(&endpoint, &bucket).with_outbox_lease_taken_over_after(window, takeover);
    writer.ensure_bucket().await.unwrap();
    let hot = stream("hot");
    // Two commits under the writer's lease (the second joins it); it dies before it
    // publishes either.
    for n in 1..=2 {
        writer
            .record(&hot, Revision::new(n), &format!("a{n}"))
            .await
            .unwrap();
        writer.append(&probe_commit(&hot, n)).await.unwrap();
    }
    drop(writer);
    // Well past the lease's takeover time (listings count whole seconds), another
    // process — its own outbox entries, not the lease's — goes on writing the stream.
    tokio::time::sleep(takeover + Duration::from_millis(2500)).await;
    let other = s3_store(&endpoint, &bucket);
    for n in 3..=30 {
        other.append(&probe_commit(&hot, n)).await.unwrap();
    }
    let relay = s3_store(&endpoint, &bucket);
    let pending = relay.pending(1000).await.unwrap();
    let revisions = revisions_of(&pending, &hot);
    assert_eq!(
        revisions,
        BTreeSet::from([1, 2]),
        "the takeover publishes the lease's commits, not the stream's later ones: {pending:?}"
    );
    for e in &pending {
        relay.done(&e.stream, e.revision, &e.attempt).await.unwrap();
    }
    drain_taken_over_leases(&relay, |e| {
        assert!(e.revision.get() <= 2, "a later commit taken over: {e:?}");
    })
    .await;
}

/// A lease a relay has done every entry of but could not delete (the S3 server down) is
/// taken up again by the relay's next listing and deleted then. (Regression: the relay
/// remembered it as finished before its delete landed and passed over it from then
/// on; after `make torture`'s last S3 kill, leases stayed in the outbox for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_whose_delete_failed_is_taken_up_again_by_the_relays_next_listing() {
    use tally_es::{EventStore, Outbox};
    let dir = tempfile::tempdir().unwrap();
    let mut s3 = PrivateService::durable_s3(dir.path()).await;
    let endpoint = format!("http://{}", s3.address());
    let bucket = unique("lease-undeleted");
    let (window, takeover) = (Duration::from_millis(500), Duration::from_secs(2));
    let writer = s3_store(&endpoint, &bucket).with_outbox_lease_taken_over_after(window, takeover);
    writer.ensure_bucket().await.unwrap();
    let hot = stream("hot");
    writer.record(&hot, Revision::new(1), "a1").await.unwrap();
    writer.append(&probe_commit(&hot, 1)).await.unwrap();
    // The writer dies before it publishes.
    drop(writer);
    tokio::time::sleep(takeover + Duration::from_millis(1500)).await;

    let relay = s3_store(&endpoint, &bucket);
    let pending = relay.pending(100).await.unwrap();
    assert!(
        pending
            .iter()
            .any(|e| e.stream == hot && e.revision == Revision::new(1)),
        "the relay takes the lease over: {pending:?}"
    );
    // The S3 server goes down while the relay is done with the entries: the lease's
    // delete fails.
    s3.stop().await;
    let mut failed = false;
    for e in &pending {
        failed |= relay.done(&e.stream, e.revision, &e.attempt).await.is_err();
    }
    assert!(
        failed,
        "the delete of the lease failed with the server down"
    );
    s3.start().await;
    assert!(
        !relay.keys("outbox/").await.unwrap().is_empty(),
        "the lease is still there"
    );
    drain_taken_over_leases(&relay, |e| {
        assert_eq!((e.stream.as_str(), e.revision.get()), ("hot", 1), "{e:?}");
    })
    .await;
}

/// A lease whose every entry was done is deleted by its writer when its window closes;
/// until then, entries keep joining it. Streams in use are renewed (leases with no
/// entries of their own, deleted in turn) until the writer has been idle for a
/// window; then nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_whose_entries_were_all_done_is_deleted_by_its_writer_when_its_window_closes() {
    use std::collections::BTreeSet;
    use tally_es::Outbox;
    let bucket = unique("lease-closes");
    let window = Duration::from_secs(1);
    let writer =
        s3_store(&required_env("TALLY_TEST_S3_ENDPOINT"), &bucket).with_outbox_lease(window);
    writer.ensure_bucket().await.unwrap();
    let (a, b) = (stream("a"), stream("b"));
    for n in 1..=5 {
        for s in [&a, &b] {
            writer.record(s, Revision::new(n), "x").await.unwrap();
            writer.done(s, Revision::new(n), "x").await.unwrap();
        }
    }
    let first: BTreeSet<String> = writer.keys("outbox/").await.unwrap().into_iter().collect();
    assert!(
        first.len() <= 2 && first.iter().all(|k| k.starts_with("outbox/=")),
        "ten entries on two streams: one lease per stream at most: {first:?}"
    );
    let mut closed = false;
    for _ in 0..30 {
        let now: BTreeSet<String> = writer.keys("outbox/").await.unwrap().into_iter().collect();
        if now.is_disjoint(&first) {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed, "the first leases outlived their window");
    let mut left = Vec::new();
    for _ in 0..100 {
        left = writer.keys("outbox/").await.unwrap();
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        left.is_empty(),
        "renewals outlived the streams' use: {left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outbox_entries_recorded_together_share_one_object_and_a_relay_finishes_what_it_did() {
    use tally_es::Outbox;
    let bucket = unique("outbox-group");
    let store = s3_store(&required_env("TALLY_TEST_S3_ENDPOINT"), &bucket);
    store.ensure_bucket().await.unwrap();
    let stream = StreamId::parse("grouped").unwrap();
    // 200 commands record at once: they wait for each other's batch objects.
    let recorded = futures::future::join_all((1..=200).map(|n| {
        let (store, stream) = (store.clone(), stream.clone());
        async move { store.record(&stream, Revision::new(n), "g").await }
    }))
    .await;
    assert!(recorded.iter().all(Result::is_ok), "{recorded:?}");
    let objects = store.keys("outbox/").await.unwrap();
    assert!(
        objects.len() <= 20,
        "200 entries recorded together are in a few objects, not one each: {}",
        objects.len()
    );
    assert!(
        objects.iter().all(|k| k.starts_with("outbox/~")),
        "{objects:?}"
    );
    assert_eq!(store.pending(1000).await.unwrap().len(), 200);

    // Another process (a relay) lists them: not while they are young (their writer is
    // publishing them), but once they are a couple of seconds old; it finishes half.
    let relay = s3_store(&required_env("TALLY_TEST_S3_ENDPOINT"), &bucket);
    assert!(
        relay.pending(1000).await.unwrap().is_empty(),
        "another process's batches are not read while young"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let pending = relay.pending(1000).await.unwrap();
    assert_eq!(pending.len(), 200, "the relay reads every batch");
    for e in pending.iter().filter(|e| e.revision.get() % 2 == 0) {
        relay.done(&e.stream, e.revision, &e.attempt).await.unwrap();
    }
    assert_eq!(
        relay.pending(1000).await.unwrap().len(),
        100,
        "the relay lists only what it has not done"
    );
    // The writer does the other half: it lists only the relay's half now.
    for n in (1..=200).filter(|n| n % 2 == 1) {
        store.done(&stream, Revision::new(n), "g").await.unwrap();
    }
    let left = store.pending(1000).await.unwrap();
    assert!(
        left.iter().all(|e| e.revision.get() % 2 == 0),
        "the writer lists only what it has not done: {left:?}"
    );
    // The relay does not know what the writer did: it lists the writer's half again
    // (and would publish those commits once more, which consumers ignore); doing them
    // finishes every batch it read, and it deletes them.
    for e in relay.pending(1000).await.unwrap() {
        relay.done(&e.stream, e.revision, &e.attempt).await.unwrap();
    }
    for n in (1..=200).filter(|n| n % 2 == 0) {
        store.done(&stream, Revision::new(n), "g").await.unwrap();
    }
    assert!(
        store.keys("outbox/").await.unwrap().is_empty(),
        "every batch object is gone once each of its entries is done"
    );
}

/// The commits of a test stream: `revision` deposits 1 (the time of each the same, so
/// that one made twice is equal).
fn deposits_of(stream: &StreamId) -> impl Fn(u64) -> tally_es::StoredCommit + '_ {
    let at = time::OffsetDateTime::now_utc();
    move |revision| {
        tally_es::Commit::new(
            stream.clone(),
            Revision::new(revision),
            at,
            vec![tally_domain::AccountEvent::Deposited {
                amount: 1,
                balance: revision as i64,
            }],
            tally_es::CommitMetadata::default(),
        )
        .encode()
    }
}

#[tokio::test]
async fn redis_holds_the_newest_commits_of_each_stream_of_each_store_and_says_when_it_cannot_tell()
{
    use tally_es::RecentCommits;
    let redis = PrivateService::redis().await;
    let cache = std::sync::Arc::new(
        tally_redis::RedisCache::new(&format!("redis://{}", redis.address()), "t:").unwrap(),
    );
    let recent = tally_redis::RecentInRedis::new(cache.clone(), "s3:one");
    let other_store = tally_redis::RecentInRedis::new(cache, "s3:two");
    let stream = StreamId::parse("recent").unwrap();
    let commit = deposits_of(&stream);
    assert_eq!(
        recent.after(&stream, Revision::ZERO).await,
        None,
        "no record"
    );
    for revision in 1..=20 {
        recent.remember(&commit(revision)).await;
    }
    let kept = tally_redis::RECENT_KEPT as u64;
    assert_eq!(
        recent.after(&stream, Revision::ZERO).await,
        None,
        "only the newest {kept} are kept: the first ones are not there to tell"
    );
    let newer = recent.after(&stream, Revision::new(15)).await.unwrap();
    assert_eq!(
        newer.iter().map(|c| c.revision.get()).collect::<Vec<_>>(),
        [16, 17, 18, 19, 20]
    );
    assert_eq!(newer[0], commit(16));
    assert_eq!(recent.after(&stream, Revision::new(20)).await, Some(vec![]));
    assert_eq!(
        other_store.after(&stream, Revision::new(15)).await,
        None,
        "another store's commits are not this one's"
    );
    // A hole: 21 never reached Redis.
    recent.remember(&commit(22)).await;
    assert_eq!(recent.after(&stream, Revision::new(20)).await, None);
    assert_eq!(
        recent
            .after(&stream, Revision::new(21))
            .await
            .map(|c| c.len()),
        Some(1)
    );
}

#[tokio::test]
async fn a_stream_turn_in_redis_is_one_process_s_until_it_gives_it_back() {
    use tally_es::StreamTurns;
    let mut redis = PrivateService::redis().await;
    let cache = std::sync::Arc::new(
        tally_redis::RedisCache::new(&format!("redis://{}", redis.address()), "t:").unwrap(),
    );
    let (one, other) = (
        tally_redis::RecentInRedis::new(cache.clone(), "s3:one"),
        tally_redis::RecentInRedis::new(cache.clone(), "s3:one"),
    );
    let stream = StreamId::parse("turned").unwrap();
    let patience = Duration::from_millis(150);
    let token = one.take(&stream, patience).await.expect("a free turn");
    assert_eq!(other.take(&stream, patience).await, None, "taken");
    other.give_back(&stream, "not-the-token").await;
    assert_eq!(other.take(&stream, patience).await, None, "still taken");
    // Another store's stream of the same name is another turn.
    let elsewhere = tally_redis::RecentInRedis::new(cache, "s3:two");
    assert!(elsewhere.take(&stream, patience).await.is_some());
    // Given back while the other waits: the other has it.
    let waiting = tokio::spawn(async move {
        other
            .take(&StreamId::parse("turned").unwrap(), Duration::from_secs(5))
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    one.give_back(&stream, &token).await;
    assert!(waiting.await.unwrap().is_some(), "the waiter takes it");
    // Redis down: no turn, at once.
    redis.stop().await;
    let started = std::time::Instant::now();
    assert_eq!(one.take(&stream, Duration::from_secs(5)).await, None);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// A turn taken with the record and given back with a commit, in one round trip each
/// way: what `take` then `after`, and `remember` then `give_back`, do one by one.
#[tokio::test]
async fn a_stream_turn_in_redis_comes_with_the_recent_commits_and_gives_the_next_one_back() {
    use tally_es::{RecentCommits, TurnsWithRecent};
    let mut redis = PrivateService::redis().await;
    let cache = std::sync::Arc::new(
        tally_redis::RedisCache::new(&format!("redis://{}", redis.address()), "t:").unwrap(),
    );
    let one = std::sync::Arc::new(tally_redis::RecentInRedis::new(cache.clone(), "s3:one"));
    let other = std::sync::Arc::new(tally_redis::RecentInRedis::new(cache, "s3:one"));
    let stream = StreamId::parse("handed").unwrap();
    let commit = deposits_of(&stream);
    let patience = Duration::from_millis(150);
    let (token, found) = one
        .take_reading(&stream, patience, Revision::ZERO)
        .await
        .expect("a free turn");
    assert_eq!(found, None, "no record yet: cannot tell");
    assert!(other
        .take_reading(&stream, patience, Revision::ZERO)
        .await
        .is_none());
    // The waiter takes the turn once it is given back, with the commit made in it.
    let waiting = {
        let (other, stream) = (other.clone(), stream.clone());
        tokio::spawn(async move {
            other
                .take_reading(&stream, Duration::from_secs(5), Revision::ZERO)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    one.remember_giving_back(&stream, &token, Some(&commit(1)))
        .await;
    let (token, found) = waiting.await.unwrap().expect("the waiter takes it");
    assert_eq!(found, Some(vec![commit(1)]));
    assert_eq!(one.after(&stream, Revision::new(1)).await, Some(vec![]));
    // Another's token remembers the commit but leaves the turn as it is.
    one.remember_giving_back(&stream, "not-the-token", Some(&commit(2)))
        .await;
    assert!(one
        .take_reading(&stream, patience, Revision::new(1))
        .await
        .is_none());
    // Given back without a commit: only the turn.
    other.remember_giving_back(&stream, &token, None).await;
    let (token, found) = one
        .take_reading(&stream, patience, Revision::new(1))
        .await
        .expect("given back");
    assert_eq!(found, Some(vec![commit(2)]));
    // Kept as `remember` keeps them: the newest RECENT_KEPT, a hole says nothing.
    for revision in 3..=40 {
        one.remember(&commit(revision)).await;
    }
    one.remember_giving_back(&stream, &token, Some(&commit(42)))
        .await;
    let (token, found) = one
        .take_reading(&stream, patience, Revision::new(40))
        .await
        .unwrap();
    assert_eq!(found, None, "41 never reached the record");
    one.remember_giving_back(&stream, &token, None).await;
    let (_, found) = one
        .take_reading(&stream, patience, Revision::new(41))
        .await
        .unwrap();
    assert_eq!(found, Some(vec![commit(42)]));
    assert_eq!(
        one.after(&stream, Revision::new(20)).await,
        None,
        "only the newest {} are kept",
        tally_redis::RECENT_KEPT
    );
    // Redis down: no turn, at once.
    redis.stop().await;
    let started = std::time::Instant::now();
    assert!(one
        .take_reading(&stream, Duration::from_secs(5), Revision::new(42))
        .await
        .is_none());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// Hole 2 of issue 13: when another transaction inserted a new account's row after this
/// one's row lock found none (a query's catch-up racing the projector, a rebuild beside
/// the live projector), the whole run was taken for a duplicate — the commits after the
/// opening included — and the projector acknowledged a commit it never applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_opening_another_transaction_inserted_first_still_applies_the_rest() {
    use tally_app::Applied;
    use tally_domain::{AccountEvent, Currency};
    use tally_es::{Commit, CommitMetadata};
    let dir = tempfile::tempdir().unwrap();
    let backends = Backends::fresh().await;
    let host = host(&backends.config(dir.path()), Role::Projector).await;
    let pg = host.pg.clone().unwrap();
    let id = AccountId::parse("raced").unwrap();
    let at = time::OffsetDateTime::now_utc();
    let commit = |revision: u64, event: AccountEvent| {
        Commit::new(
            id.stream_id().clone(),
            Revision::new(revision),
            at,
            vec![event],
            CommitMetadata::default(),
        )
    };
    let run = vec![
        commit(
            1,
            AccountEvent::Opened {
                id: id.clone(),
                currency: Currency::USD,
                owner: None,
                holder: None,
            },
        ),
        commit(
            2,
            AccountEvent::Deposited {
                amount: 700,
                balance: 700,
            },
        ),
    ];

    // The other transaction opens the account and holds its row, uncommitted.
    let mut other = pg.pool().begin().await.unwrap();
    sqlx::query(
        "INSERT INTO accounts (id, currency, balance, closed, revision, opened_at, updated_at)
         VALUES ('raced', 'USD', 0, FALSE, 1, now(), now())",
    )
    .execute(&mut *other)
    .await
    .unwrap();
    let read_model = host.read_model.clone();
    let applying = tokio::spawn({
        let run = run.clone();
        async move { read_model.apply_all(&run).await }
    });
    // The apply has found no row to lock and now waits on the other's INSERT.
    tokio::time::sleep(Duration::from_millis(500)).await;
    other.commit().await.unwrap();

    assert_eq!(applying.await.unwrap().unwrap(), Applied::Applied);
    assert_eq!(
        host.read_model.position(&id).await.unwrap(),
        Revision::new(2),
        "the deposit after the opening was applied"
    );
    let view = host.read_model.account(&id).await.unwrap().unwrap();
    assert_eq!(view.balance, 700);
}

/// Found by `make torture` (stack, seed 1796195194): the transfer saga, restarted by the
/// nemesis while the S3 server was down, resumed pending transfers before it served its
/// probes — and failed to start at all once that sweep gave up.
#[tokio::test]
async fn the_transfer_saga_starts_while_the_store_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tally_host::Config::with_data_dir(dir.path());
    // Nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    config.s3_bucket = Some("down".into());
    config.s3_endpoint = Some(endpoint);
    config.s3_access_key_id = Some("test".into());
    config.s3_secret_access_key = Some("test".into());
    let host = host_no_init(&config).await;
    let started = tokio::time::timeout(Duration::from_secs(5), host.start_saga()).await;
    assert!(
        matches!(started, Ok(Ok(_))),
        "the saga starts at once, and resumes pending transfers once the store answers"
    );
}

/// The record of destroyed data keys in Redis, under the kept keys of two processes: a
/// destroy in one is seen by the other's next use at once; with Redis out of reach a use
/// asks the key store and a destroy deletes nothing; and a Redis that comes back —
/// here empty, with the record's epoch field put back as a snapshot would restore it,
/// without the newest marks — is another epoch all the same (its `run_id`), under which
/// nothing kept before is used.
#[tokio::test]
async fn kept_data_keys_are_never_used_after_a_destroy_even_across_a_redis_restart() {
    use std::sync::Arc;
    use tally_es::{KeyStore, Revocations, StoreError};
    let mut redis = PrivateService::redis().await;
    let url = format!("redis://{}", redis.address());
    let record = || {
        Arc::new(tally_redis::RevocationsInRedis::new(Arc::new(
            tally_redis::RedisCache::new(&url, "t:").unwrap(),
        )))
    };
    let store: Arc<dyn KeyStore> = Arc::new(tally_vault::MemoryKeyStore::default());
    let (record_a, record_b) = (record(), record());
    let a = tally_vault::KeptKeys::new(store.clone(), record_a.clone());
    let b = tally_vault::KeptKeys::new(store.clone(), record_b.clone());
    for id in ["k-1", "k-2", "k-3"] {
        a.put(id, id.as_bytes()).await.unwrap();
    }
    let (epoch, marked) = record_a.check("k-1").await.unwrap();
    assert!(!marked);
    assert_eq!(record_b.check("k-1").await.unwrap(), (epoch.clone(), false));
    assert!(a.get("k-1").await.unwrap().is_some());
    assert!(b.get("k-1").await.unwrap().is_some());
    assert!(a.get("k-3").await.unwrap().is_some(), "k-3 is kept in a");

    b.destroy("k-1").await.unwrap();
    assert_eq!(
        a.get("k-1").await.unwrap(),
        None,
        "destroyed in b, erased in a"
    );
    assert_eq!(record_a.check("k-1").await.unwrap(), (epoch.clone(), true));

    redis.stop().await;
    assert!(matches!(
        b.destroy("k-2").await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(store.get("k-2").await.unwrap().is_some(), "nothing deleted");

    // Redis comes back with the record's epoch field as it was (a restored snapshot),
    // but not the mark of k-3's destroy, which the old server took with it.
    redis.start().await;
    let field = epoch.rsplit('/').next().unwrap().to_owned();
    let mut restored = String::new();
    for _ in 0..50 {
        restored = raw_redis(
            &redis.address(),
            &["HSET", "t:revoked-keys", "epoch", &field],
        )
        .await;
        if restored.starts_with(':') {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(restored.starts_with(':'), "HSET answered {restored:?}");
    store.destroy("k-3").await.unwrap();
    let mut after = None;
    for _ in 0..50 {
        if let Ok(reading) = record_a.check("k-3").await {
            after = Some(reading);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (new_epoch, marked) = after.expect("the record is back within 5 s");
    assert!(!marked);
    assert!(
        new_epoch.ends_with(&field),
        "the field was restored: {new_epoch}"
    );
    assert_ne!(new_epoch, epoch, "another server, another epoch");
    assert_eq!(
        a.get("k-3").await.unwrap(),
        None,
        "the key kept under the old server is not used: the key store says"
    );
    let mut destroyed = b.destroy("k-2").await;
    for _ in 0..50 {
        if destroyed.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        destroyed = b.destroy("k-2").await;
    }
    destroyed.expect("a destroy once Redis is back");
    assert_eq!(a.get("k-2").await.unwrap(), None);
}

/// One command to the Redis at `address` in its wire protocol; the first line of the
/// answer (`""` if it could not connect).
async fn raw_redis(address: &str, args: &[&str]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut conn) = tokio::net::TcpStream::connect(address).await else {
        return String::new();
    };
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    if conn.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut answer = vec![0u8; 512];
    let n = conn.read(&mut answer).await.unwrap_or(0);
    String::from_utf8_lossy(&answer[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The S3 requests moto has answered for `bucket` since `from` lines of its log: the
/// keys of the commit objects read (`streams/{id}/…`).
async fn commit_reads_since(bucket: &str, from: usize) -> Vec<String> {
    // moto logs a request once it has answered it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = std::fs::read_to_string(required_env("TALLY_TEST_S3_LOG")).unwrap();
    let needle = format!("GET /{bucket}/streams/");
    log.lines()
        .skip(from)
        .filter_map(|l| l.split_once(&needle).map(|(_, rest)| rest))
        .map(|rest| rest.split('/').next().unwrap_or_default().to_owned())
        .collect()
}

fn s3_log_lines() -> usize {
    std::fs::read_to_string(required_env("TALLY_TEST_S3_LOG"))
        .unwrap()
        .lines()
        .count()
}

/// A rebuild on S3 reads the newest pack of many streams, and from the store only the
/// streams that moved since the pack's marks on the commit topic (named by the topic's
/// tail) or whose commit is not published yet (named by its outbox entry): the others
/// cost no request of their own, and nothing is missed. A pack the topic does not bear
/// out (its marks name another message: a topic recreated under the same name) is not
/// used, and the rebuild reads every stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_reads_the_pack_and_only_the_streams_that_moved_since() {
    use tally_es::packs::Packs;
    let dir = tempfile::tempdir().unwrap();
    let backends = Backends::fresh().await;
    let mut config = backends.config(dir.path());
    // No background compaction or packing while the test packs by hand.
    config.compaction_quiet_seconds = 3_600;
    let host = host(&config, Role::Gateway).await;
    host.start_projection().await.unwrap();
    let api = Api::start(&host).await;
    for n in 0..12 {
        let (s, b) = api.post("/accounts", &format!(r#"{{"ID": "p{n}"}}"#)).await;
        assert_eq!(s, 201, "{b}");
        let (s, b) = api
            .post(&format!("/accounts/p{n}/deposit"), r#"{"Amount": 1}"#)
            .await;
        assert_eq!(s, 200, "{b}");
    }
    for n in 0..12 {
        converged(&host, &format!("p{n}"), 2).await;
    }
    let packer = host
        .state
        .projector
        .packer()
        .expect("a packer on S3")
        .clone();
    let first = packer.round().await.unwrap();
    assert_eq!((first.written, first.streams, first.read), (true, 12, 12));
    let again = packer.round().await.unwrap();
    assert!(!again.written, "the topic did not move: no new pack");

    // After the pack: a deposit (published), a new account (published), and a commit
    // appended but not published yet — its process died between the two: its outbox
    // entry stays.
    let (s, _) = api.post("/accounts/p0/deposit", r#"{"Amount": 2}"#).await;
    assert_eq!(s, 200);
    let (s, _) = api.post("/accounts", r#"{"ID": "p12"}"#).await;
    assert_eq!(s, 201);
    converged(&host, "p0", 3).await;
    converged(&host, "p12", 1).await;
    let unpublished = tally_es::Commit::new(
        stream("p1"),
        Revision::new(3),
        time::OffsetDateTime::now_utc(),
        vec![tally_domain::AccountEvent::Deposited {
            amount: 500,
            balance: 600,
        }],
        Default::default(),
    )
    .encode();
    // In another process: the rebuild's does not know its outbox batch (young, too).
    let other = s3_store(&backends.s3_endpoint, &backends.bucket);
    {
        use tally_es::{EventStore, Outbox};
        other
            .record(&stream("p1"), Revision::new(3), "died-before-publishing")
            .await
            .unwrap();
        other.append(&unpublished).await.unwrap();
    }

    let plan = packer.plan().await.expect("the pack is used");
    let mut kinds: Vec<(String, &str)> = plan
        .iter()
        .map(|r| {
            let kind = match r {
                tally_app::packing::StreamRead::Whole(_) => "whole",
                tally_app::packing::StreamRead::Packed(_) => "packed",
                tally_app::packing::StreamRead::PackedThenAfter(_) => "packed, then after",
            };
            (r.stream().as_str().to_owned(), kind)
        })
        .collect();
    kinds.sort();
    let moved: Vec<_> = kinds.iter().filter(|(_, k)| *k != "packed").collect();
    assert_eq!(
        moved,
        [
            &("p0".to_owned(), "packed, then after"),
            &("p1".to_owned(), "packed, then after"),
            &("p12".to_owned(), "whole"),
        ],
        "{kinds:?}"
    );
    assert_eq!(kinds.len(), 13);

    let from = s3_log_lines();
    let report = host.state.projector.rebuild().await.unwrap();
    assert_eq!((report.streams, report.events), (13, 12 * 2 + 1 + 1 + 1));
    let mut read: Vec<String> = commit_reads_since(&backends.bucket, from).await;
    read.sort();
    read.dedup();
    assert_eq!(
        read,
        ["p0", "p1", "p12"],
        "only the streams that moved are read from the store"
    );
    let p1 = converged(&host, "p1", 3).await;
    assert_eq!(
        p1.balance, 600,
        "the unpublished commit is in the rebuilt read model"
    );

    // A pack whose marks the topic does not bear out is passed over.
    let s3 = host.s3.clone().unwrap();
    let mut forged = s3.latest_pack().await.unwrap().unwrap();
    for mark in &mut forged.marks {
        if mark.before.is_some() {
            mark.before = Some((stream("nobody"), Revision::new(1)));
        }
    }
    s3.put_pack(&forged).await.unwrap();
    assert!(packer.plan().await.is_none(), "the forged pack is not used");
    let report = host.state.projector.rebuild().await.unwrap();
    assert_eq!((report.streams, report.events), (13, 27));
}
