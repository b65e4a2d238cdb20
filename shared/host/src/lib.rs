//! `tally-host`: turns the environment into backends and runs a function.
//!
//! Every binary under `functions/` is one call: [`run_function`] (one function's routes)
//! or [`run_gateway`] (every public route in one process, with the projector running
//! in-process). Configuration comes from the environment:
//!
//! | variable            | default       | meaning                                        |
//! | ------------------- | ------------- | ---------------------------------------------- |
//! | `TALLY_DATA_DIR`    | `./.data`     | the embedded event store's directory           |
//! | `TALLY_CURRENCY`    | `USD`         | currency of accounts and amounts               |
//! | `TALLY_MAX_AMOUNT`  | `1000000.00`  | the largest accepted deposit or withdrawal     |
//! | `HOST`, `PORT`      | `0.0.0.0:8080`| where the HTTP server listens (server mode)    |
//! | `RUST_LOG`          | `info`        | log filter                                     |
//! | `AWS_LAMBDA_RUNTIME_API` | unset    | set by Lambda / `cargo lambda`: Lambda mode    |

use async_trait::async_trait;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tally_api::AppState;
use tally_app::{CommandHandler, Projector, Queries, ReadModel};
use tally_domain::{AmountPolicy, Currency};
use tally_embedded::{DirEventStore, InProcessStream, MemoryCache, MemoryReadModel};
use tally_es::{EventPublisher, EventStore, EventStream, PublishError, StoredCommit};
use tally_runtime::{BoxError, Readiness};

/// Settings read from the environment.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default = "default_currency")]
    pub currency: String,
    #[serde(default = "default_max_amount")]
    pub max_amount: String,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./.data")
}
fn default_currency() -> String {
    "USD".into()
}
fn default_max_amount() -> String {
    "1000000.00".into()
}

impl Config {
    /// Read `TALLY_*` variables.
    pub fn from_env() -> Result<Self, BoxError> {
        envy::prefixed("TALLY_")
            .from_env::<Config>()
            .map_err(|e| format!("configuration: {e}").into())
    }

    /// A config with defaults and the given data directory.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            currency: default_currency(),
            max_amount: default_max_amount(),
        }
    }

    /// The amount policy: currency and maximum.
    pub fn policy(&self) -> Result<AmountPolicy, BoxError> {
        let currency =
            Currency::parse(&self.currency).map_err(|e| format!("TALLY_CURRENCY: {e}"))?;
        let max = AmountPolicy::new(currency, i64::MAX)
            .parse(&self.max_amount)
            .map_err(|e| format!("TALLY_MAX_AMOUNT={:?}: {e}", self.max_amount))?;
        Ok(AmountPolicy::new(currency, max.minor()))
    }
}

/// The embedded backends and the state built on them.
#[derive(Clone)]
pub struct Embedded {
    pub state: AppState,
    pub store: DirEventStore,
    pub stream: InProcessStream,
    pub read_model: Arc<MemoryReadModel>,
}

impl Embedded {
    /// Open the embedded backends described by `config`. With `read_through`, queries
    /// first catch their account up from the store (for a process that gets no stream).
    pub fn open(config: &Config, read_through: bool) -> Result<Self, BoxError> {
        let store = DirEventStore::open(&config.data_dir).map_err(|e| {
            format!(
                "cannot open the event store in {}: {e}",
                config.data_dir.display()
            )
        })?;
        let stream = InProcessStream::new(4096);
        let read_model = Arc::new(MemoryReadModel::default());
        let cache = Arc::new(MemoryCache::default());
        let store_port: Arc<dyn EventStore> = Arc::new(store.clone());
        let projector = Projector::new(store_port.clone(), read_model.clone(), cache.clone());
        let publisher = Arc::new(ProjectInline {
            projector: projector.clone(),
            stream: stream.clone(),
        });
        let state = AppState {
            commands: Arc::new(CommandHandler::new(store_port, publisher)),
            queries: Queries::new(read_model.clone(), cache, projector.clone(), read_through),
            projector,
            policy: config.policy()?,
        };
        Ok(Self {
            state,
            store,
            stream,
            read_model,
        })
    }

    /// Project every commit published from now on, in the background; catches up from
    /// the store first (subscribing before, so nothing falls in between).
    pub async fn start_projection(&self) -> Result<tokio::task::JoinHandle<()>, BoxError> {
        let subscription = self.stream.subscribe("projector").await?;
        let projector = self.state.projector.clone();
        let report = projector.catch_up_all().await?;
        tracing::info!(
            streams = report.streams,
            commits = report.commits,
            "read model rebuilt from the store"
        );
        Ok(tokio::spawn(
            async move { projector.run(subscription).await },
        ))
    }
}

/// The embedded publisher: applies each commit to this process's read model before
/// the command answers (so a client reads its own writes without asking for a
/// revision), then publishes it on the in-process stream. Applying is idempotent, so the
/// projector following the stream skips what was applied here.
struct ProjectInline {
    projector: Projector,
    stream: InProcessStream,
}

#[async_trait]
impl EventPublisher for ProjectInline {
    async fn publish(&self, commit: &StoredCommit) -> Result<(), PublishError> {
        if let Err(e) = self.projector.handle(commit).await {
            tracing::warn!(stream = %commit.stream, error = %e, "inline projection failed; the projector will catch up");
        }
        self.stream.publish(commit).await
    }
}

struct EmbeddedReadiness(Embedded);

#[async_trait]
impl Readiness for EmbeddedReadiness {
    async fn check(&self) -> Result<(), String> {
        self.0.store.ready().await.map_err(|e| e.to_string())?;
        self.0.read_model.ready().await.map_err(|e| e.to_string())
    }
}

/// Run one function (`deposit`, `get-balance`, `projector`, ...) with its routes only.
pub async fn run_function(function: &'static str) -> Result<(), BoxError> {
    tally_runtime::init_tracing();
    if !tally_api::routes::functions().contains(&function) {
        return Err(format!("unknown function {function}").into());
    }
    let config = Config::from_env()?;
    let is_query = function.starts_with("get-") || function == "list-transactions";
    let embedded = Embedded::open(&config, is_query)?;
    if is_query || function == "projector" {
        let report = embedded.state.projector.catch_up_all().await?;
        tracing::info!(
            function,
            streams = report.streams,
            commits = report.commits,
            "read model rebuilt from the store"
        );
    }
    if function == "projector" && !tally_runtime::lambda_mode() {
        // Alone, the projector has no in-process stream to follow: it tails the store.
        let projector = embedded.state.projector.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Err(e) = projector.catch_up_all().await {
                    tracing::warn!(error = %e, "catch-up failed");
                }
            }
        });
    }
    let router = tally_api::router(embedded.state.clone(), |r| r.function == function);
    tally_runtime::serve(function, router, Arc::new(EmbeddedReadiness(embedded))).await
}

/// Run every public route in one process on the embedded backends, with the projector
/// following the in-process stream. This is `make dev`.
pub async fn run_gateway() -> Result<(), BoxError> {
    tally_runtime::init_tracing();
    let config = Config::from_env()?;
    let embedded = Embedded::open(&config, false)?;
    embedded.start_projection().await?;
    tracing::info!(data_dir = %config.data_dir.display(), "embedded backends");
    let public = |r: &tally_api::Route| tally_api::ROUTES.contains(r);
    let router = tally_api::router(embedded.state.clone(), public);
    tally_runtime::serve("gateway", router, Arc::new(EmbeddedReadiness(embedded))).await
}

/// The gateway's router: every public route, wrapped in the runtime's layers (health,
/// request ids, problem+json fallbacks), exactly as `make dev` serves it.
pub fn gateway_app(embedded: &Embedded) -> axum::Router {
    let public = |r: &tally_api::Route| tally_api::ROUTES.contains(r);
    let router = tally_api::router(embedded.state.clone(), public);
    tally_runtime::app(
        "gateway",
        router,
        Arc::new(EmbeddedReadiness(embedded.clone())),
    )
}
