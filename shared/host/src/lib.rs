//! `tally-host`: turns the environment into backends and runs a function.
//!
//! Every binary under `functions/` is one call: [`run_function`] (one function's
//! routes, or the projector, relay or migrate jobs) or [`run_gateway`] (every public
//! route in one process — on the embedded backends for `make dev`, or as a reverse
//! proxy in front of the function processes for `make stack`).
//!
//! | variable | default | meaning |
//! | --- | --- | --- |
//! | `TALLY_DATA_DIR` | `./.data` | the directory event store (when S3 is not configured) |
//! | `TALLY_S3_BUCKET`, `TALLY_S3_ENDPOINT`, `TALLY_S3_PREFIX` | unset | the S3 event store |
//! | `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` | `us-east-1` | S3 credentials |
//! | `TALLY_KAFKA_BROKERS`, `TALLY_KAFKA_TOPIC`, `TALLY_KAFKA_GROUP` | unset, `tally.commits`, `tally-projector` | the Kafka stream |
//! | `TALLY_SAGA_GROUP`, `TALLY_TRANSFER_DEADLINE_SECONDS` | `tally-transfer-saga`, `10` | the transfer saga's group; when the sweep drives a pending transfer on |
//! | `TALLY_DATABASE_URL` | unset | the PostgreSQL read model |
//! | `TALLY_REDIS_URL`, `TALLY_REDIS_PREFIX` | unset, `tally:` | the Redis cache |
//! | `TALLY_CURRENCY`, `TALLY_MAX_AMOUNT` | `USD`, `1000000.00` | the amount policy |
//! | `TALLY_UPSTREAMS` | unset | gateway proxy mode: `function=url,...` |
//! | `HOST`, `PORT` | `0.0.0.0`, `8080` | where the HTTP server listens |
//! | `RUST_LOG` | `info` | log filter |
//! | `AWS_LAMBDA_RUNTIME_API` | unset | set by Lambda / `cargo lambda`: Lambda mode |

mod backends;
mod config;
mod proxy;

pub use backends::{Host, Kinds, Role};
pub use config::Config;

use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use tally_runtime::{BoxError, Readiness};

struct HostReadiness(Host);

#[async_trait]
impl Readiness for HostReadiness {
    async fn check(&self) -> Result<(), String> {
        self.0.ready().await
    }
}

/// Run function `function` (`deposit`, `get-balance`, `projector`, `relay`,
/// `transfer-saga`, `migrate`).
pub async fn run_function(function: &'static str) -> Result<(), BoxError> {
    run_function_with(function, None).await
}

/// Whether this process may do a singleton's work right now: `None` always may (one
/// replica, or no election configured); otherwise only while the receiver says `true`
/// (see `tally-kube`'s Lease election, which the relay binary starts).
pub type Leader = Option<tokio::sync::watch::Receiver<bool>>;

/// [`run_function`], with the relay's sweeps gated on `leader`.
pub async fn run_function_with(function: &'static str, leader: Leader) -> Result<(), BoxError> {
    tally_runtime::probe_if_asked().await;
    tally_runtime::init_tracing();
    let config = Config::from_env()?;
    let role = Role::of(function);
    if function == "migrate" {
        return migrate(&config).await;
    }
    if !tally_api::routes::functions().contains(&function)
        && !matches!(role, Role::Relay | Role::Saga)
    {
        return Err(format!("unknown function {function}").into());
    }
    let host = Host::build(&config, role).await?;
    host.verify().await?;
    say_auth(&host).await;
    tracing::info!(
        function,
        store = host.kinds.store,
        stream = host.kinds.stream,
        read_model = host.kinds.read_model,
        cache = host.kinds.cache,
        "backends"
    );
    // (A query function on the in-memory read model reads through the store, account
    // by account, on every query: it needs no catch-up at start.)
    match role {
        Role::Projector if tally_runtime::lambda_mode() => return lambda_projector(host).await,
        Role::Projector => {
            if host.kinds.stream == "in-process" {
                // Alone, the embedded projector has no stream to follow: it tails the store.
                tail_store(&host);
            } else {
                host.start_projection().await?;
            }
        }
        Role::Relay => return run_relay(host, leader).await,
        Role::Saga if tally_runtime::lambda_mode() => return lambda_saga(host).await,
        Role::Saga => {
            host.start_saga().await?;
        }
        _ => {}
    }
    let router = tally_api::router(host.state.clone(), |r| r.function == function);
    tally_runtime::serve(function, router, Arc::new(HostReadiness(host))).await
}

/// Say at start whether bearer tokens are checked, and fetch the issuer's keys (a
/// provider out of reach is said now; requests wait for it and get 503 meanwhile).
async fn say_auth(host: &Host) {
    match &host.state.auth {
        tally_api::Auth::Off => tracing::warn!(
            "authentication is OFF: every request may do anything (set TALLY_AUTH_ISSUER to require bearer tokens)"
        ),
        tally_api::Auth::On { verifier, .. } => {
            let config = verifier.config();
            match verifier.prefetch().await {
                Ok(keys) => tracing::info!(issuer = %config.issuer, audience = %config.audience, keys,
                    "authentication is on: bearer tokens of this issuer are required"),
                Err(e) => tracing::warn!(issuer = %config.issuer, error = %e,
                    "authentication is on, but the issuer's keys are out of reach for now"),
            }
        }
    }
}

fn tail_store(host: &Host) {
    backends::catch_up_every(
        host.state.projector.clone(),
        Duration::ZERO,
        Duration::from_secs(1),
        1,
        None,
    );
}

/// Every public route in one process: on the configured backends with the projector
/// in-process, or — with `TALLY_UPSTREAMS` — as a reverse proxy to the functions.
pub async fn run_gateway() -> Result<(), BoxError> {
    tally_runtime::probe_if_asked().await;
    tally_runtime::init_tracing();
    let config = Config::from_env()?;
    if let Some(upstreams) = &config.upstreams {
        let router = proxy::router(upstreams)?;
        tracing::info!(upstreams, "gateway in proxy mode");
        return tally_runtime::serve("gateway", router, Arc::new(tally_runtime::AlwaysReady)).await;
    }
    let host = Host::build(&config, Role::Gateway).await?;
    say_auth(&host).await;
    // The gateway is the all-in-one process: it creates what it needs (init proves the
    // store enforces conditional writes, too).
    host.init().await?;
    host.start_projection().await?;
    host.start_saga().await?;
    if let Some(relay) = host.relay() {
        spawn_relay_loop(relay, None);
    }
    tracing::info!(
        store = host.kinds.store,
        stream = host.kinds.stream,
        read_model = host.kinds.read_model,
        cache = host.kinds.cache,
        "gateway backends"
    );
    let router = public_router(&host);
    tally_runtime::serve("gateway", router, Arc::new(HostReadiness(host))).await
}

fn public_router(host: &Host) -> axum::Router {
    let public = |r: &tally_api::Route| tally_api::ROUTES.contains(r);
    tally_api::router(host.state.clone(), public)
}

/// The gateway's app: every public route wrapped in the runtime's layers (health,
/// request ids, problem+json fallbacks), exactly as the gateway serves it.
pub fn gateway_app(host: &Host) -> axum::Router {
    tally_runtime::app(
        "gateway",
        public_router(host),
        Arc::new(HostReadiness(host.clone())),
    )
}

/// The init step: bucket, topic, schema. Runs once per deploy, not in every function.
/// `migrate [all|storage|schema]`: the bucket (with its conditional-write probe) and
/// the topic (`storage`), the read model's migrations (`schema`), or both (default).
async fn migrate(config: &Config) -> Result<(), BoxError> {
    let what = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let host = Host::build(config, Role::Tool).await?;
    match what.as_str() {
        "all" => host.init().await?,
        "storage" => host.init_storage().await?,
        "schema" => host.init_schema().await?,
        other => return Err(format!("migrate {other}: expected all, storage or schema").into()),
    }
    tracing::info!(
        what,
        store = host.kinds.store,
        stream = host.kinds.stream,
        read_model = host.kinds.read_model,
        "backends initialised"
    );
    Ok(())
}

fn spawn_relay_loop(relay: tally_app::Relay, leader: Leader) {
    tokio::spawn(async move {
        loop {
            if leader.as_ref().is_some_and(|l| !*l.borrow()) {
                // A follower: the leader sweeps; look again in a moment.
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            match relay.sweep().await {
                Ok(report)
                    if report.published + report.already_published + report.abandoned > 0 =>
                {
                    tracing::info!(
                        published = report.published,
                        already_published = report.already_published,
                        abandoned = report.abandoned,
                        waiting = report.waiting,
                        "relay sweep"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "relay sweep failed"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

/// The relay: sweeps the outbox every 500 ms; `POST /relay/sweep` sweeps now. Under the
/// Lambda runtime, every invocation (e.g. a schedule) is one sweep.
async fn run_relay(host: Host, leader: Leader) -> Result<(), BoxError> {
    let relay = host
        .relay()
        .ok_or("the relay needs the S3 store (outbox) and Kafka (stream)")?;
    if tally_runtime::lambda_mode() {
        let handler = lambda_runtime::service_fn(
            move |_event: lambda_runtime::LambdaEvent<serde_json::Value>| {
                let relay = relay.clone();
                async move {
                    let report = relay.sweep().await?;
                    Ok::<_, BoxError>(serde_json::json!({
                        "published": report.published, "already_published": report.already_published,
                        "abandoned": report.abandoned, "waiting": report.waiting
                    }))
                }
            },
        );
        return lambda_runtime::run(handler).await;
    }
    spawn_relay_loop(relay.clone(), leader);
    let router = axum::Router::new().route(
        "/relay/sweep",
        axum::routing::post(move |who: tally_api::Who| {
            let relay = relay.clone();
            async move {
                if let Err(e) = who.require(tally_auth::Scope::Ops) {
                    return e.into_response();
                }
                match relay.sweep().await {
                    Ok(r) => axum::Json(serde_json::json!({
                        "published": r.published, "already_published": r.already_published,
                        "abandoned": r.abandoned, "waiting": r.waiting
                    }))
                    .into_response(),
                    Err(e) => tally_runtime::problem(
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        "Service unavailable",
                        e.to_string(),
                    )
                    .into_response(),
                }
            }
        }),
    );
    let router = tally_api::protect(router, host.state.auth.clone());
    tally_runtime::serve("relay", router, Arc::new(HostReadiness(host))).await
}

use axum::response::IntoResponse;

/// The projector under the Lambda runtime: each invocation is a Kafka batch
/// (`aws_lambda_events` `KafkaEvent`), applied as one [`tally_app::Projector::handle_batch`]
/// (in revision order per stream, one read-model transaction); if it fails, the
/// invocation fails and Lambda retries the batch (duplicates are
/// skipped, so a retry is safe).
async fn lambda_projector(host: Host) -> Result<(), BoxError> {
    let projector = host.state.projector.clone();
    let key = host.config.stream_key()?;
    let handler = lambda_runtime::service_fn(
        move |event: lambda_runtime::LambdaEvent<aws_lambda_events::event::kafka::KafkaEvent>| {
            let (projector, key) = (projector.clone(), key.clone());
            async move { handle_kafka_batch(&projector, &event.payload, key.as_ref()).await }
        },
    );
    lambda_runtime::run(handler).await
}

/// Apply one Lambda Kafka batch; returns counts by outcome (see
/// [`tally_app::BatchReport`]).
pub async fn handle_kafka_batch(
    projector: &tally_app::Projector,
    event: &aws_lambda_events::event::kafka::KafkaEvent,
    key: Option<&tally_kafka::StreamKey>,
) -> Result<serde_json::Value, BoxError> {
    let commits = tally_kafka::decode_lambda_batch(event, key)?;
    let report = projector.handle_batch(&commits).await?;
    Ok(serde_json::json!({
        "commits": report.commits,
        "applied": report.applied,
        "duplicates": report.duplicates,
        "gaps_repaired": report.repaired,
    }))
}

/// The transfer saga under the Lambda runtime. An invocation is either a Kafka batch
/// (`KafkaEvent`, from an event source mapping on the commit topic): every transfer it
/// names is driven on, and if one cannot be (a backend down) the invocation fails and
/// Lambda delivers the batch again (each step is idempotent, so that is safe); or
/// anything else (e.g. a schedule's event): one sweep of the transfers pending past
/// `TALLY_TRANSFER_DEADLINE_SECONDS`, which is what resumes a transfer whose batch
/// Lambda gave up on.
async fn lambda_saga(host: Host) -> Result<(), BoxError> {
    let saga = host.state.saga.clone();
    let deadline = std::time::Duration::from_secs(host.config.transfer_deadline_seconds);
    let key = host.config.stream_key()?;
    let handler = lambda_runtime::service_fn(
        move |event: lambda_runtime::LambdaEvent<serde_json::Value>| {
            let (saga, key) = (saga.clone(), key.clone());
            async move { handle_saga_invocation(&saga, deadline, event.payload, key.as_ref()).await }
        },
    );
    lambda_runtime::run(handler).await
}

/// One invocation of the saga under Lambda (see [`lambda_saga`]): counts by outcome.
pub async fn handle_saga_invocation(
    saga: &tally_app::transfers::Saga,
    deadline: std::time::Duration,
    payload: serde_json::Value,
    key: Option<&tally_kafka::StreamKey>,
) -> Result<serde_json::Value, BoxError> {
    if payload.get("records").is_none() {
        let driven = saga.sweep(deadline).await?;
        return Ok(serde_json::json!({"swept": driven}));
    }
    let event: aws_lambda_events::event::kafka::KafkaEvent = serde_json::from_value(payload)?;
    let commits = tally_kafka::decode_lambda_batch(&event, key)?;
    let mut outcomes = std::collections::BTreeMap::<&'static str, u64>::new();
    for status in saga.try_handle_batch(&commits).await? {
        let outcome = status.map_or("skipped", |s| s.name());
        *outcomes.entry(outcome).or_default() += 1;
    }
    Ok(serde_json::json!({"commits": commits.len(), "transfers": outcomes}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tally_domain::{AccountEvent, AccountId, Currency};
    use tally_es::{
        Commit, CommitMetadata, EventPublisher, EventStore, Outbox, PublishError, Revision,
        StoredCommit,
    };

    #[derive(Default)]
    struct Counting(AtomicUsize);

    #[async_trait]
    impl EventPublisher for Counting {
        async fn publish(&self, _commit: &StoredCommit) -> Result<(), PublishError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// The commit that opens account `id`, at revision 1.
    fn opened(id: &AccountId) -> Commit<AccountEvent> {
        Commit::new(
            id.stream_id().clone(),
            Revision::new(1),
            time::OffsetDateTime::now_utc(),
            vec![AccountEvent::Opened {
                id: id.clone(),
                currency: Currency::USD,
                owner: None,
                holder: None,
            }],
            CommitMetadata::default(),
        )
    }

    /// Entries that name one commit — on S3, the leases a relay takes over, which each
    /// name every commit of their streams for a while — cost one publish, in one sweep
    /// or the next. (Regression: a relay published a commit once per entry naming it;
    /// after a run with broker outages it worked through thousands of repeats.)
    #[tokio::test]
    async fn a_relay_publishes_a_commit_once_for_every_entry_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(tally_embedded::DirEventStore::open(dir.path()).unwrap());
        let id = AccountId::parse("named-twice").unwrap();
        let commit = opened(&id);
        store.append(&commit.encode()).await.unwrap();
        for attempt in ["lease-a", "lease-b"] {
            store
                .record(id.stream_id(), Revision::new(1), attempt)
                .await
                .unwrap();
        }
        let published = Arc::new(Counting::default());
        let relay = tally_app::Relay::new(store.clone(), store.clone(), published.clone())
            .with_grace(Duration::ZERO);
        let report = relay.sweep().await.unwrap();
        assert_eq!(
            (report.published, report.already_published),
            (1, 1),
            "{report:?}"
        );
        assert_eq!(
            published.0.load(Ordering::SeqCst),
            1,
            "one publish for two entries"
        );
        assert!(
            store.pending(10).await.unwrap().is_empty(),
            "both entries done"
        );

        // A later entry naming the same commit: done without a publish.
        store
            .record(id.stream_id(), Revision::new(1), "lease-c")
            .await
            .unwrap();
        let report = relay.sweep().await.unwrap();
        assert_eq!(
            (report.published, report.already_published),
            (0, 1),
            "{report:?}"
        );
        assert_eq!(
            published.0.load(Ordering::SeqCst),
            1,
            "remembered as published"
        );
        assert!(store.pending(10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_relay_that_is_not_the_leader_publishes_nothing_until_it_becomes_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(tally_embedded::DirEventStore::open(dir.path()).unwrap());
        let id = AccountId::parse("left-behind").unwrap();
        let commit = opened(&id);
        // What a command that died after its append leaves: an outbox entry and a commit.
        store
            .record(id.stream_id(), Revision::new(1), "left-behind")
            .await
            .unwrap();
        store.append(&commit.encode()).await.unwrap();

        let published = Arc::new(Counting::default());
        let relay = tally_app::Relay::new(store.clone(), store.clone(), published.clone())
            .with_grace(Duration::ZERO);
        let (leading, leader) = tokio::sync::watch::channel(false);
        spawn_relay_loop(relay, Some(leader));

        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(
            published.0.load(Ordering::SeqCst),
            0,
            "a follower never sweeps"
        );
        assert_eq!(store.pending(10).await.unwrap().len(), 1);

        leading.send_replace(true);
        for _ in 0..100 {
            if published.0.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            published.0.load(Ordering::SeqCst),
            1,
            "the leader publishes it"
        );
        assert!(store.pending(10).await.unwrap().is_empty());
    }
}
