//! The backends a process runs on, built from the configuration.

use crate::config::Config;
use async_trait::async_trait;
use std::sync::Arc;
use tally_api::AppState;
use tally_app::packing::Packer;
use tally_app::{
    Cache, CommandHandler, Compactor, Faults, Projector, PublishMode, Queries, ReadModel, Relay,
    Saga,
};
use tally_domain::AccountId;
use tally_embedded::{DirEventStore, InProcessStream, MemoryCache, MemoryReadModel};
use tally_es::{
    Compact, EventPublisher, EventStore, EventStream, Outbox, PublishError, SnapshotStore,
    StoredCommit,
};
use tally_runtime::BoxError;

/// What a process does, which decides what it checks and how its queries read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A command function: appends commits.
    Command,
    /// A query function: reads the projections.
    Query,
    /// The projector: applies commits to the read model.
    Projector,
    /// The relay: publishes what the outbox holds.
    Relay,
    /// Everything in one process (`make dev`).
    Gateway,
    /// The transfer saga: follows the stream and runs the transfers' account steps.
    Saga,
    /// A one-shot tool (migrations, seeding).
    Tool,
}

impl Role {
    /// The role of function `name`.
    pub fn of(name: &str) -> Self {
        match name {
            "open-account" | "deposit" | "withdraw" | "close-account" | "forget-holder"
            | "transfer" => Role::Command,
            "transfer-saga" => Role::Saga,
            "get-account" | "get-balance" | "list-transactions" | "get-transfer" => Role::Query,
            "projector" => Role::Projector,
            "relay" => Role::Relay,
            "gateway" => Role::Gateway,
            _ => Role::Tool,
        }
    }
}

/// Which implementation backs each port, for logs and `/readyz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kinds {
    pub store: &'static str,
    pub stream: &'static str,
    pub read_model: &'static str,
    pub cache: &'static str,
}

/// The event store and what the same backend also provides.
struct StoreParts {
    store: Arc<dyn EventStore>,
    outbox: Option<Arc<dyn Outbox>>,
    snapshots: Arc<dyn SnapshotStore>,
    s3: Option<tally_s3::S3EventStore>,
    pg: Option<tally_postgres::PgEventStore>,
    /// The store's compaction into segments, if it keeps history in segments.
    compact: Option<Arc<dyn Compact>>,
    /// Where holders' data keys live, beside the events.
    keys: Arc<dyn tally_es::KeyStore>,
    kind: &'static str,
    /// Names this store among others behind one Redis (no credentials).
    scope: String,
}

/// `postgres://user:password@host:5432/db` → `host:5432/db`.
fn without_credentials(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.rsplit_once('@').map_or(rest, |(_, r)| r)
}

/// Connections of a PostgreSQL pool: the all-in-one gateway serves every route and
/// appends for all of them; a function serves one route, and a stack of a dozen of them
/// must stay within a server's usual 100 connections.
fn pool_size(role: Role) -> u32 {
    if role == Role::Gateway {
        32
    } else {
        8
    }
}

/// Idle connections go back to the server after this long, so a burst on one function
/// does not keep connections from the others.
const POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// A lazily connecting pool for `url`, sized for `role`.
fn pool(url: &str, role: Role) -> Result<tally_postgres::PgPool, BoxError> {
    Ok(tally_postgres::connect_lazy(
        url,
        pool_size(role),
        POOL_IDLE,
    )?)
}

/// A process wired to its backends.
#[derive(Clone)]
pub struct Host {
    pub config: Config,
    pub role: Role,
    pub state: AppState,
    pub store: Arc<dyn EventStore>,
    pub outbox: Option<Arc<dyn Outbox>>,
    pub stream: Arc<dyn EventStream>,
    pub read_model: Arc<dyn ReadModel>,
    pub cache: Arc<dyn Cache>,
    pub kinds: Kinds,
    /// The S3 store, when configured (for init and checks).
    pub s3: Option<tally_s3::S3EventStore>,
    /// The Kafka stream, when configured (for init).
    pub kafka: Option<tally_kafka::KafkaStream>,
    /// The PostgreSQL pool, when configured (for migrations).
    pub pg: Option<tally_postgres::PgReadModel>,
    /// The PostgreSQL event store, when configured (for migrations).
    pub pg_store: Option<tally_postgres::PgEventStore>,
    /// The store's compaction into segments, when it keeps history in segments.
    pub compact: Option<Arc<dyn Compact>>,
}

/// How many periodic catch-up rounds go by between two full ones: with recent commits
/// in Redis, a round asks the store only about the streams Redis shows ahead of the
/// read model; every tenth (5 minutes at the default 30 s) asks about every stream, for
/// the commits Redis does not know (see [`Projector::sweep`]).
const FULL_SWEEP_EVERY: u64 = 10;

/// Catch streams up from the store in the background ([`Projector::sweep`]): first
/// after `first`, then `period` after each round ends; every `full_every`-th round is a
/// full one (every stream asked of the store). A round that applied anything logs
/// `applied` as a warning (when given); a failed one is logged and retried by the next.
pub(crate) fn catch_up_every(
    projector: Projector,
    first: std::time::Duration,
    period: std::time::Duration,
    full_every: u64,
    applied: Option<&'static str>,
) {
    tokio::spawn(async move {
        tokio::time::sleep(first).await;
        for round in 1u64.. {
            match projector.sweep(round % full_every.max(1) == 0).await {
                Ok(report) if report.commits > 0 => {
                    if let Some(applied) = applied {
                        tracing::warn!(commits = report.commits, "{applied}");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "catch-up from the store failed"),
            }
            tokio::time::sleep(period).await;
        }
    });
}

/// How often the compactor looks for streams that are due.
const COMPACT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Compact the streams that are due every `period`, in the background, and say how it
/// goes in `/metrics`: `tally_segments_streams_behind` (streams with commits their
/// segments do not hold yet, as far as this process knows),
/// `tally_segments_commits_total`, `tally_segments_written_total` and
/// `tally_segments_failures_total`.
fn compact_every(compactor: Arc<Compactor>, period: std::time::Duration) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            let report = compactor.round().await;
            metrics::counter!("tally_segments_commits_total").increment(report.commits as u64);
            metrics::counter!("tally_segments_written_total").increment(report.segments as u64);
            metrics::counter!("tally_segments_failures_total").increment(report.failed as u64);
            metrics::gauge!("tally_segments_streams_behind").set(compactor.behind() as f64);
        }
    });
}

/// How often the packer looks at the topic (see [`tally_app::packing`]).
const PACK_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// How much longer than the compactor the packer waits for a still topic: the streams
/// are in segments when it packs them.
const PACK_AFTER_COMPACTION: std::time::Duration = std::time::Duration::from_secs(5);

/// Write packs in the background, as the topic settles.
fn pack_every(packer: Arc<Packer>, period: std::time::Duration) {
    tokio::spawn(async move {
        // Failures in a row: the first is a warning, the next ones (a broker or a store
        // that is down fails every look) only every sixtieth.
        let mut failures = 0u64;
        loop {
            tokio::time::sleep(period).await;
            match packer.tick().await {
                Ok(Some(packed)) => {
                    failures = 0;
                    if packed.written {
                        metrics::counter!("tally_packs_written_total").increment(1);
                        tracing::info!(
                            streams = packed.streams,
                            read = packed.read,
                            "a pack was written"
                        );
                    }
                }
                Ok(None) => failures = 0,
                Err(e) => {
                    metrics::counter!("tally_packs_failures_total").increment(1);
                    if failures.is_multiple_of(60) {
                        tracing::warn!(error = %e, failures_in_a_row = failures + 1,
                            "packing failed; again later");
                    }
                    failures += 1;
                }
            }
            metrics::gauge!("tally_packs_behind").set(f64::from(u8::from(packer.behind())));
        }
    });
}

/// The embedded publisher: applies each commit to this process's read model before
/// the command answers (so a client reads its own writes without asking for a
/// revision). Only a commit it could not apply goes on the in-process stream, where the
/// projector retries it until it applies; the others would only be duplicates there.
struct ProjectInline {
    projector: Projector,
    stream: InProcessStream,
}

#[async_trait]
impl EventPublisher for ProjectInline {
    async fn publish(&self, commit: &StoredCommit) -> Result<(), PublishError> {
        match self.projector.handle(commit).await {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!(stream = %commit.stream, error = %e,
                    "inline projection failed; the projector retries it");
                self.stream.publish(commit).await
            }
        }
    }
}

impl Host {
    /// Wire the backends `config` names for a process in `role`. Connections are made
    /// lazily: a backend that is down only fails the requests that need it.
    pub async fn build(config: &Config, role: Role) -> Result<Self, BoxError> {
        // Before any event is read: every family's upcaster chain is whole.
        tally_domain::check_event_schemas()
            .map_err(|e| format!("the event schemas' upcaster chain: {e}"))?;
        let policy = config.policy()?;
        // The read model's pool; the event store shares it when both are in one database.
        let read_model_pool = config
            .database_url
            .as_deref()
            .map(|url| pool(url, role))
            .transpose()?;

        let StoreParts {
            store,
            outbox,
            snapshots,
            s3,
            pg: pg_store,
            compact,
            keys,
            kind: store_kind,
            scope: store_scope,
        } = match (config.store.as_deref(), config.s3()?) {
            (Some("postgres"), _) => {
                let url = config
                    .event_store_url
                    .as_ref()
                    .or(config.database_url.as_ref())
                    .ok_or(
                        "TALLY_STORE=postgres: set TALLY_EVENT_STORE_URL (or TALLY_DATABASE_URL)",
                    )?;
                let pg = tally_postgres::PgEventStore::new(
                    match read_model_pool
                        .as_ref()
                        .filter(|_| config.event_store_shares_database())
                    {
                        Some(p) => p.clone(),
                        None => pool(url, role)?,
                    },
                );
                // Outbox rows only where a relay publishes them: with a broker.
                let pg = if config.kafka_brokers.is_some() {
                    pg
                } else {
                    pg.without_outbox()
                };
                StoreParts {
                    store: Arc::new(pg.clone()),
                    outbox: Some(Arc::new(pg.clone())),
                    snapshots: Arc::new(pg.clone()),
                    s3: None,
                    keys: Arc::new(pg.clone()),
                    pg: Some(pg),
                    compact: None,
                    kind: "postgres",
                    scope: format!("pg:{}", without_credentials(url)),
                }
            }
            (None | Some("s3"), Some(s3_config)) => {
                // Outbox leases (`TALLY_OUTBOX_LEASE_SECONDS`, 0: none): a command on a
                // stream this process wrote to moments ago writes no outbox object.
                let s3 = tally_s3::S3EventStore::new(&s3_config)?
                    .with_outbox_lease(std::time::Duration::from_secs(config.outbox_lease_seconds));
                let scope = format!(
                    "s3:{}/{}/{}",
                    s3_config.endpoint.as_deref().unwrap_or("aws"),
                    s3_config.bucket,
                    s3_config.prefix
                );
                StoreParts {
                    scope,
                    store: Arc::new(s3.clone()),
                    outbox: Some(Arc::new(s3.clone())),
                    snapshots: Arc::new(s3.clone()),
                    compact: Some(Arc::new(s3.clone())),
                    keys: Arc::new(s3.clone()),
                    s3: Some(s3),
                    pg: None,
                    kind: "s3",
                }
            }
            (Some("s3"), None) => return Err("TALLY_STORE=s3: set TALLY_S3_BUCKET".into()),
            (None | Some("directory"), _) => {
                let dir = DirEventStore::open(&config.data_dir).map_err(|e| {
                    format!(
                        "cannot open the event store in {}: {e}",
                        config.data_dir.display()
                    )
                })?;
                StoreParts {
                    store: Arc::new(dir.clone()),
                    outbox: Some(Arc::new(dir.clone())),
                    snapshots: Arc::new(dir.clone()),
                    s3: None,
                    pg: None,
                    keys: Arc::new(dir.clone()),
                    compact: Some(Arc::new(dir)),
                    kind: "directory",
                    scope: format!("dir:{}", config.data_dir.display()),
                }
            }
            (Some(other), _) => {
                return Err(format!("TALLY_STORE={other:?}: one of directory, s3, postgres").into())
            }
        };

        let (read_model, pg, read_model_kind): (Arc<dyn ReadModel>, _, _) = match read_model_pool {
            Some(pool) => {
                let rm = tally_postgres::PgReadModel::new(pool);
                (Arc::new(rm.clone()), Some(rm), "postgres")
            }
            None => (Arc::new(MemoryReadModel::default()), None, "memory"),
        };

        let redis = match &config.redis_url {
            Some(url) => Some(Arc::new(tally_redis::RedisCache::new(
                url,
                &config.redis_prefix,
            )?)),
            None => None,
        };
        let (cache, cache_kind): (Arc<dyn Cache>, _) = match &redis {
            Some(redis) => (redis.clone(), "redis"),
            None => (Arc::new(MemoryCache::default()), "memory"),
        };

        // Where command functions share their streams (with a broker), they catch warm
        // streams up through Redis; the projector's periodic sweep reads it too.
        let recent = match (&redis, &config.kafka_brokers) {
            (Some(redis), Some(_)) => Some(Arc::new(tally_redis::RecentInRedis::new(
                redis.clone(),
                &store_scope,
            ))),
            _ => None,
        };
        // With Redis, each process keeps the data keys it read, checking Redis's record
        // of destroyed keys on every use instead of reading the key store (an S3 GET per
        // `GET /accounts/{id}`); every process of a deployment shares that Redis, the
        // ones that destroy keys (forget-holder, open-account) included.
        let keys: Arc<dyn tally_es::KeyStore> = match &redis {
            Some(redis) => Arc::new(tally_vault::KeptKeys::new(
                keys,
                Arc::new(tally_redis::RevocationsInRedis::new(redis.clone())),
            )),
            None => keys,
        };
        let faults = Faults::parse(config.fault_injection.as_deref().unwrap_or_default())
            .map_err(|e| format!("TALLY_FAULT_INJECTION: {e}"))?;
        if faults != Faults::NONE {
            tracing::warn!(%faults, "fault injection is on: this process breaks guarantees on purpose");
        }
        let mut projector =
            Projector::new(store.clone(), read_model.clone(), cache.clone()).with_faults(faults);
        if let Some(recent) = &recent {
            projector = projector.with_recent_commits(recent.clone());
        }
        // The process that follows the stream copies streams into segments as they
        // grow (under the Lambda runtime nothing runs between invocations: not there).
        if let (Some(compact), Role::Projector | Role::Gateway, false) =
            (&compact, role, tally_runtime::lambda_mode())
        {
            let quiet = std::time::Duration::from_secs(config.compaction_quiet_seconds);
            projector = projector
                .with_compactor(Arc::new(Compactor::new(compact.clone()).with_quiet(quiet)));
        }

        let (stream, kafka, commands, stream_kind): (Arc<dyn EventStream>, _, _, _) = match &config
            .kafka_brokers
        {
            Some(brokers) => {
                let key = config.stream_key()?;
                if key.is_none() {
                    tracing::warn!("TALLY_STREAM_KEY is not set: messages on the commit topic are neither signed nor checked");
                }
                let kafka = tally_kafka::KafkaStream::new(tally_kafka::KafkaConfig {
                    brokers: brokers.clone(),
                    topic: config.kafka_topic.clone(),
                    publish_timeout: std::time::Duration::from_secs(10),
                    fetch_wait: config.kafka_fetch_wait()?,
                    key,
                })?;
                let mut commands = CommandHandler::new(store.clone(), Arc::new(kafka.clone()))
                    .with_snapshots(snapshots.clone(), config.snapshot_every)
                    .with_publish_mode(PublishMode::Background)
                    .with_trusted_warm_streams(role == Role::Gateway)
                    .with_faults(faults);
                let mut transfers = CommandHandler::new(store.clone(), Arc::new(kafka.clone()))
                    .with_publish_mode(PublishMode::Background)
                    .with_faults(faults);
                if let Some(outbox) = &outbox {
                    commands = commands.with_outbox(outbox.clone());
                    transfers = transfers.with_outbox(outbox.clone());
                }
                // Functions share their streams (one per command, and the saga): they
                // take turns per stream and catch warm streams up through Redis rather
                // than racing and reading the store, a turn and the record in one round
                // trip each way.
                if let Some(recent) = &recent {
                    commands = commands.with_turns_and_recent(recent.clone());
                    transfers = transfers.with_turns_and_recent(recent.clone());
                }
                (
                    Arc::new(kafka.clone()),
                    Some(kafka),
                    (commands, transfers),
                    "kafka",
                )
            }
            None => {
                let in_process = InProcessStream::new(4096);
                let publisher = Arc::new(ProjectInline {
                    projector: projector.clone(),
                    stream: in_process.clone(),
                });
                let commands = CommandHandler::new(store.clone(), publisher)
                    .with_snapshots(snapshots.clone(), config.snapshot_every)
                    .with_trusted_warm_streams(role == Role::Gateway)
                    .with_faults(faults);
                // Transfer commits are not projected: they go to the stream, where
                // the saga follows them.
                let transfers = CommandHandler::new(store.clone(), Arc::new(in_process.clone()))
                    .with_faults(faults);
                (
                    Arc::new(in_process),
                    None,
                    (commands, transfers),
                    "in-process",
                )
            }
        };

        // On S3 with a broker, a rebuild reads through packs of many streams (and the
        // process that compacts writes them: `start_projection`).
        // `TALLY_PACK_AT_MOST_SECONDS=0`: no packs (a rebuild reads every stream).
        if let (Some(s3), Some(kafka), true) = (&s3, &kafka, config.pack_at_most_seconds > 0) {
            let quiet = std::time::Duration::from_secs(config.compaction_quiet_seconds)
                + PACK_AFTER_COMPACTION;
            let packer = Packer::new(
                store.clone(),
                Arc::new(s3.clone()),
                Arc::new(kafka.clone()),
                |s| AccountId::of_stream(s).is_some(),
            )
            .with_quiet(quiet)
            .with_at_most(std::time::Duration::from_secs(config.pack_at_most_seconds));
            projector = projector.with_packer(Arc::new(packer));
        }

        // A lone query function on the embedded backends receives no stream: it reads
        // through the store.
        let read_through = role == Role::Query && read_model_kind == "memory";
        let (commands, transfers) = commands;
        let commands = Arc::new(commands);
        let queries = Queries::new(
            read_model.clone(),
            cache.clone(),
            projector.clone(),
            read_through,
        )
        .with_snapshots(snapshots.clone())
        .with_faults(faults);
        let saga = Saga::new(
            commands.clone(),
            Arc::new(transfers),
            store.clone(),
            queries.clone(),
            policy.currency,
        )
        .with_faults(faults);
        let state = AppState {
            commands,
            queries,
            projector,
            saga,
            policy,
            auth: config.auth()?,
            // A development master key only beside the directory store (`make dev`).
            vault: config.vault(keys, store_kind == "directory")?,
        };
        Ok(Self {
            config: config.clone(),
            role,
            state,
            store,
            outbox,
            stream,
            read_model,
            cache,
            kinds: Kinds {
                store: store_kind,
                stream: stream_kind,
                read_model: read_model_kind,
                cache: cache_kind,
            },
            s3,
            kafka,
            pg,
            pg_store,
            compact,
        })
    }

    /// Embedded backends with their data in `data_dir` (tests, tools).
    pub async fn embedded(data_dir: impl Into<std::path::PathBuf>) -> Result<Self, BoxError> {
        Self::build(&Config::with_data_dir(data_dir), Role::Gateway).await
    }

    /// Whether a projector in this process should first catch up from the store.
    pub fn catch_up_on_start(&self) -> bool {
        // Without a broker nothing redelivers what a crash kept from the in-process
        // stream, and a memory read model starts empty: catch up from the store.
        self.config
            .catch_up_on_start
            .unwrap_or(self.kinds.read_model == "memory" || self.kinds.stream == "in-process")
    }

    /// Follow the stream in the background (consumer group `TALLY_KAFKA_GROUP`), after
    /// catching up from the store if [`Host::catch_up_on_start`]. Subscribes first, so
    /// nothing falls between the catch-up and the stream.
    pub async fn start_projection(&self) -> Result<tokio::task::JoinHandle<()>, BoxError> {
        let subscription = self.stream.subscribe(&self.config.kafka_group).await?;
        let projector = self.state.projector.clone();
        if self.catch_up_on_start() {
            let report = projector.catch_up_all().await?;
            tracing::info!(
                streams = report.streams,
                commits = report.commits,
                "read model caught up from the store"
            );
        }
        let every = self.config.catch_up_every;
        if every > 0 && self.kinds.stream != "in-process" {
            // The stream is the fast path; the store is the truth. A broker that lost
            // messages, or a consumer left without partitions after a rebalance that
            // never completed, would otherwise keep commits from the read model until
            // the next write on their account.
            let every = std::time::Duration::from_secs(every);
            catch_up_every(
                projector.clone(),
                every,
                every,
                FULL_SWEEP_EVERY,
                Some("the periodic catch-up applied commits the stream had not delivered"),
            );
        }
        if let Some(compactor) = projector.compactor() {
            compact_every(compactor.clone(), COMPACT_EVERY);
            if let Some(packer) = projector.packer() {
                pack_every(packer.clone(), PACK_EVERY);
            }
        }
        Ok(tokio::spawn(
            async move { projector.run(subscription).await },
        ))
    }

    /// Drive transfers in the background: from the stream (consumer group
    /// `TALLY_SAGA_GROUP`), after driving every transfer left pending (a restart
    /// resumes them), and by a sweep every few seconds of those pending past
    /// `TALLY_TRANSFER_DEADLINE_SECONDS`.
    pub async fn start_saga(&self) -> Result<tokio::task::JoinHandle<()>, BoxError> {
        let subscription = self.stream.subscribe(&self.config.saga_group).await?;
        let saga = self.state.saga.clone();
        // Resume what a stop left pending, beside the stream: a store that is down now
        // only delays it, and never keeps the process from starting (and answering its
        // probes).
        let resume = saga.clone();
        tokio::spawn(async move {
            loop {
                match resume.sweep(std::time::Duration::ZERO).await {
                    Ok(resumed) => {
                        if resumed > 0 {
                            tracing::info!(resumed, "transfers left pending were driven on");
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "resuming pending transfers failed; again in 1 s");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        });
        let deadline = std::time::Duration::from_secs(self.config.transfer_deadline_seconds);
        saga.sweep_every(deadline.max(std::time::Duration::from_secs(1)), deadline);
        Ok(tokio::spawn(async move { saga.run(subscription).await }))
    }

    /// The relay, if this process has an outbox to relay from.
    pub fn relay(&self) -> Option<Relay> {
        let outbox = self.outbox.clone()?;
        let kafka = self.kafka.clone()?;
        Some(Relay::new(self.store.clone(), outbox, Arc::new(kafka)))
    }

    /// At start-up: refuse an S3 server that ignores conditional writes (writers only).
    pub async fn verify(&self) -> Result<(), BoxError> {
        if let (Some(s3), Role::Command | Role::Gateway | Role::Saga) = (&self.s3, self.role) {
            s3.verify_conditional_writes().await?;
        }
        Ok(())
    }

    /// Create what the backends need (bucket, topic, schema). Idempotent: the init step.
    pub async fn init(&self) -> Result<(), BoxError> {
        self.init_storage().await?;
        self.init_schema().await
    }

    /// The bucket (and its conditional-write probe) and the topic.
    pub async fn init_storage(&self) -> Result<(), BoxError> {
        if let Some(s3) = &self.s3 {
            s3.ensure_bucket().await?;
            s3.verify_conditional_writes().await?;
        }
        if let Some(kafka) = &self.kafka {
            kafka.ensure_topic(4).await?;
        }
        Ok(())
    }

    /// The migrations of the read model's database and the event store's.
    pub async fn init_schema(&self) -> Result<(), BoxError> {
        if let Some(pg) = &self.pg {
            tally_postgres::migrate(pg.pool()).await?;
        }
        if let Some(store) = &self.pg_store {
            // Once per database: the store may be in the read model's, migrated above.
            if !self.config.event_store_shares_database() {
                tally_postgres::migrate(store.pool()).await?;
            }
        }
        Ok(())
    }

    /// `/readyz`: the backends this role cannot work without.
    pub async fn ready(&self) -> Result<(), String> {
        let store = || async { self.store.ready().await.map_err(|e| e.to_string()) };
        let read_model = || async { self.read_model.ready().await.map_err(|e| e.to_string()) };
        match self.role {
            Role::Command | Role::Relay | Role::Saga => store().await,
            Role::Query => read_model().await,
            Role::Projector | Role::Gateway => {
                store().await?;
                read_model().await
            }
            Role::Tool => Ok(()),
        }
    }
}
