//! The ceiling: the bare backends at the load's concurrency levels, through the same
//! clients and settings Tally uses — conditional PUTs of new keys on the S3 server
//! (`If-None-Match: *`, as an append), produce acknowledgements from the broker
//! (`acks=all`, idempotent, as a publish), and single-row upserts on PostgreSQL (one
//! transaction each, as the projector's row update). A command costs several of these,
//! so Tally's commands/s is reported as a fraction of the slowest.

use crate::{Figures, Recorder};
use futures::stream::{self, StreamExt};
use serde::Serialize;
use std::future::Future;
use std::time::Instant;
use tally_es::{EventPublisher, Revision, StoredCommit, StoredEvent, StreamId};

/// The backends to measure (from the same variables the functions read).
#[derive(Clone, Debug)]
pub struct Backends {
    pub s3: tally_s3::S3Config,
    pub kafka_brokers: String,
    pub database_url: String,
    /// What serves S3 and Kafka here, for the report (e.g. `moto 5.2.5`).
    pub s3_server: String,
    pub broker: String,
    /// The event store the measured Tally appends to (`TALLY_STORE`: `s3` unless
    /// `postgres`): which bare backends a command needs.
    pub store: String,
}

impl Backends {
    /// `TALLY_S3_*`/`AWS_*`, `TALLY_KAFKA_BROKERS`, `TALLY_DATABASE_URL`, and the names
    /// `TALLY_BENCH_S3_SERVER`, `TALLY_BENCH_BROKER`.
    pub fn from_env() -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
        Ok(Self {
            s3: tally_s3::S3Config::from_env()?,
            kafka_brokers: var("TALLY_KAFKA_BROKERS")?,
            database_url: var("TALLY_DATABASE_URL")?,
            s3_server: var("TALLY_BENCH_S3_SERVER").unwrap_or_else(|_| "unnamed".into()),
            broker: var("TALLY_BENCH_BROKER").unwrap_or_else(|_| "unnamed".into()),
            store: var("TALLY_STORE").unwrap_or_else(|_| "s3".into()),
        })
    }
}

/// One concurrency level of the ceiling.
#[derive(Clone, Debug, Serialize)]
pub struct CeilingLevel {
    pub concurrency: usize,
    /// Not measured (`None`) for a Tally whose events are in PostgreSQL.
    pub s3_conditional_put: Option<Figures>,
    pub broker_produce: Figures,
    pub postgres_upsert: Figures,
}

impl CeilingLevel {
    /// The slowest backend at this level that a command on event store `store` needs
    /// (S3 only when the events are in S3): its name and operations per second.
    pub fn slowest(&self, store: &str) -> (&'static str, f64) {
        let s3 = self
            .s3_conditional_put
            .as_ref()
            .filter(|_| store != "postgres")
            .map(|f| ("S3 conditional PUT", f.per_second));
        s3.into_iter()
            .chain([
                ("broker produce", self.broker_produce.per_second),
                ("PostgreSQL upsert", self.postgres_upsert.per_second),
            ])
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("two or three backends")
    }
}

/// The ceiling at every level.
#[derive(Clone, Debug, Serialize)]
pub struct Ceiling {
    /// The event store of the Tally measured beside it (`s3` or `postgres`).
    pub store: String,
    pub s3_server: String,
    pub broker: String,
    pub ops: usize,
    pub levels: Vec<CeilingLevel>,
}

impl Ceiling {
    /// The level measured at `concurrency`.
    pub fn at(&self, concurrency: usize) -> Option<&CeilingLevel> {
        self.levels.iter().find(|l| l.concurrency == concurrency)
    }
}

/// Run `ops` calls of `call` (given the call's number) with `concurrency` in flight.
async fn drive<F, Fut>(ops: usize, concurrency: usize, call: F) -> Figures
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    let mut recorder = Recorder::new();
    let mut calls = stream::iter(0..ops)
        .map(|i| {
            let call = call(i);
            async move {
                let began = Instant::now();
                let ok = call.await;
                (began.elapsed(), if ok { 200 } else { 500 })
            }
        })
        .buffer_unordered(concurrency.max(1));
    while let Some((elapsed, status)) = calls.next().await {
        recorder.record(elapsed, status);
    }
    recorder.figures(start.elapsed().as_secs_f64())
}

/// Measure the three backends at each of `concurrency`, `ops` calls each.
pub async fn measure(
    backends: &Backends,
    concurrency: &[usize],
    ops: usize,
    progress: impl Fn(&str),
) -> Result<Ceiling, String> {
    // The S3 server only for a Tally whose events are there.
    let s3 = match backends.store.as_str() {
        "postgres" => None,
        _ => {
            let s3 = tally_s3::S3EventStore::new(&backends.s3)?;
            s3.ensure_bucket().await.map_err(|e| e.to_string())?;
            Some(s3)
        }
    };
    let kafka = tally_kafka::KafkaStream::new(tally_kafka::KafkaConfig {
        brokers: backends.kafka_brokers.clone(),
        topic: "tally.bench-ceiling".into(),
        publish_timeout: std::time::Duration::from_secs(10),
        fetch_wait: tally_kafka::DEFAULT_FETCH_WAIT,
        key: None,
    })
    .map_err(|e| e.to_string())?;
    kafka.ensure_topic(1).await.map_err(|e| e.to_string())?;
    let max = concurrency.iter().copied().max().unwrap_or(1) as u32;
    let pg = tally_postgres::connect(&backends.database_url, max)
        .await
        .map_err(|e| format!("PostgreSQL: {e}"))?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS tally_bench_ceiling (id text PRIMARY KEY, n bigint NOT NULL)",
    )
    .execute(&pg)
    .await
    .map_err(|e| format!("PostgreSQL: {e}"))?;

    // A body the size of a deposit commit.
    let commit = StoredCommit {
        stream: StreamId::parse("bench-ceiling").expect("valid id"),
        revision: Revision::new(2),
        recorded_at: time::OffsetDateTime::now_utc(),
        events: vec![StoredEvent {
            event_type: "Deposited".into(),
            version: 1,
            data: serde_json::json!({"amount": 10000, "balance": 10000}),
        }],
        metadata: Default::default(),
    };
    let body = commit.to_bytes();
    let run = format!("{:08x}", fastrand::u32(..));
    let mut levels = Vec::new();
    for &c in concurrency {
        let s3_conditional_put = match &s3 {
            Some(s3) => {
                progress(&format!("ceiling: S3 conditional PUTs at concurrency {c}"));
                Some(
                    drive(ops, c, |i| {
                        let body = body.clone();
                        let key = format!("bench-ceiling/{run}/{c}/{i:08}.json");
                        async move {
                            matches!(s3.create(&key, body, "application/json").await, Ok(true))
                        }
                    })
                    .await,
                )
            }
            None => None,
        };
        progress(&format!("ceiling: broker produce acks at concurrency {c}"));
        let broker_produce = drive(ops, c, |_| {
            let (kafka, commit) = (&kafka, &commit);
            async move { kafka.publish(commit).await.is_ok() }
        })
        .await;
        progress(&format!("ceiling: PostgreSQL upserts at concurrency {c}"));
        let postgres_upsert = drive(ops, c, |i| {
            let pg = pg.clone();
            async move {
                sqlx::query(
                    "INSERT INTO tally_bench_ceiling (id, n) VALUES ($1, $2)
                     ON CONFLICT (id) DO UPDATE SET n = tally_bench_ceiling.n + EXCLUDED.n",
                )
                .bind(format!("row-{}", i % 200))
                .bind(1_i64)
                .execute(&pg)
                .await
                .is_ok()
            }
        })
        .await;
        levels.push(CeilingLevel {
            concurrency: c,
            s3_conditional_put,
            broker_produce,
            postgres_upsert,
        });
    }
    Ok(Ceiling {
        store: backends.store.clone(),
        s3_server: backends.s3_server.clone(),
        broker: backends.broker.clone(),
        ops,
        levels,
    })
}
