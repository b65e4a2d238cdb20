//! The projector: from commits to the read model and the cache, exactly once.

use crate::ports::{Applied, Cache, CachedBalance, ReadModel, ReadModelError};
use futures::stream::{self, StreamExt};
use std::sync::Arc;
use tally_domain::{AccountEvent, AccountId};
use tally_es::{Commit, DecodeError, Delivery, EventStore, StoreError, StoredCommit, Subscription};

/// Why a commit could not be projected. Handling rule: leave the commit
/// unacknowledged and retry it later; never skip it.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    ReadModel(#[from] ReadModelError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// How many streams a rebuild replays at once (reads from the store and read-model
/// transactions in flight together).
pub const REBUILD_CONCURRENCY: usize = 8;

fn decode_all(stored: &[StoredCommit]) -> Result<Vec<Commit<AccountEvent>>, DecodeError> {
    stored.iter().map(Commit::decode).collect()
}

/// What a rebuild did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RebuildReport {
    pub streams: usize,
    pub commits: usize,
    pub events: usize,
    /// Streams that could not be caught up (see the log).
    pub failed: usize,
}

/// Applies account commits to a read model, then writes balances through to a cache.
#[derive(Clone)]
pub struct Projector {
    store: Arc<dyn EventStore>,
    read_model: Arc<dyn ReadModel>,
    cache: Arc<dyn Cache>,
}

impl Projector {
    /// A projector reading gaps from `store`.
    pub fn new(
        store: Arc<dyn EventStore>,
        read_model: Arc<dyn ReadModel>,
        cache: Arc<dyn Cache>,
    ) -> Self {
        Self {
            store,
            read_model,
            cache,
        }
    }

    /// Handle one delivered commit (at-least-once, possibly out of order). A duplicate
    /// is skipped; a gap is repaired from the store before anything newer is applied.
    pub async fn handle(&self, stored: &StoredCommit) -> Result<Applied, ProjectionError> {
        let commit = Commit::<AccountEvent>::decode(stored)?;
        let outcome = self.read_model.apply(&commit).await?;
        match outcome {
            Applied::Applied => self.write_through(&commit).await,
            Applied::Duplicate => {}
            Applied::Gap { expected } => {
                tracing::info!(stream = %stored.stream, %expected, got = %stored.revision,
                    "gap in delivery; repairing from the store");
                self.catch_up(&AccountId::from(stored.stream.clone()))
                    .await?;
            }
        }
        Ok(outcome)
    }

    /// Apply every commit of `id` that the store has and the read model lacks, in one
    /// [`ReadModel::apply_all`]. Returns the number of commits applied.
    pub async fn catch_up(&self, id: &AccountId) -> Result<usize, ProjectionError> {
        let position = self.read_model.position(id).await?;
        let stored = self.store.read(id.stream_id(), position.next()).await?;
        let commits = decode_all(&stored)?;
        let Some(last) = commits.last() else {
            return Ok(0);
        };
        match self.read_model.apply_all(&commits).await? {
            Applied::Applied => {
                self.write_through(last).await;
                Ok(commits
                    .iter()
                    .filter(|c| c.last_revision() > position)
                    .count())
            }
            // Another projector got there first, or the read model moved on meanwhile.
            Applied::Duplicate | Applied::Gap { .. } => Ok(0),
        }
    }

    /// Catch up every stream in the store (at start-up, or after a lagging subscriber).
    /// A stream that fails is logged and counted in `failed`; the others go on.
    pub async fn catch_up_all(&self) -> Result<RebuildReport, ProjectionError> {
        let mut report = RebuildReport::default();
        for stream in self.store.streams().await? {
            report.streams += 1;
            match self.catch_up(&AccountId::from(stream.clone())).await {
                Ok(applied) => report.commits += applied,
                Err(e) => {
                    report.failed += 1;
                    tracing::error!(%stream, error = %e, "catch-up of this stream failed");
                }
            }
        }
        Ok(report)
    }

    /// Drop the read model and the cache and replay every stream from the store.
    pub async fn rebuild(&self) -> Result<RebuildReport, ProjectionError> {
        self.rebuild_reporting(|_| {}).await
    }

    /// [`Projector::rebuild`], calling `progress` with the running totals after each
    /// stream. [`REBUILD_CONCURRENCY`] streams are replayed at once, each read in full
    /// and applied with one [`ReadModel::apply_all`].
    pub async fn rebuild_reporting(
        &self,
        mut progress: impl FnMut(&RebuildReport),
    ) -> Result<RebuildReport, ProjectionError> {
        self.read_model.clear().await?;
        self.cache.clear().await;
        let mut report = RebuildReport::default();
        let streams = self.store.streams().await?;
        let mut replays = stream::iter(streams)
            .map(|stream| self.replay(AccountId::from(stream)))
            .buffer_unordered(REBUILD_CONCURRENCY);
        while let Some(replayed) = replays.next().await {
            let (commits, events) = replayed?;
            report.streams += 1;
            report.commits += commits;
            report.events += events;
            progress(&report);
        }
        Ok(report)
    }

    /// Replay one stream into the (emptied) read model; returns its commits and events.
    async fn replay(&self, id: AccountId) -> Result<(usize, usize), ProjectionError> {
        let stored = self
            .store
            .read(id.stream_id(), tally_es::Revision::new(1))
            .await?;
        let commits = decode_all(&stored)?;
        self.read_model.apply_all(&commits).await?;
        if let Some(view) = self.read_model.account(&id).await? {
            self.cache.put(&id, CachedBalance::from(&view)).await;
        }
        let events = commits.iter().map(|c| c.events.len()).sum();
        Ok((commits.len(), events))
    }

    /// Follow `subscription` until it closes: handle each commit, then acknowledge it;
    /// on a lag, catch every stream up from the store. A commit that cannot be applied
    /// (the read model is down) is retried with backoff, never passed over: acknowledging
    /// a later message would move the consumer offset past it.
    pub async fn run(&self, mut subscription: Box<dyn Subscription>) {
        while let Some(delivery) = subscription.next().await {
            match delivery {
                Delivery::Commit(commit) => {
                    let mut delay = std::time::Duration::from_millis(50);
                    while let Err(e) = self.handle(&commit).await {
                        tracing::error!(stream = %commit.stream, revision = %commit.revision, error = %e,
                            retry_in_ms = delay.as_millis() as u64, "projection failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(std::time::Duration::from_secs(5));
                    }
                    if let Err(e) = subscription.ack(&commit).await {
                        tracing::warn!(stream = %commit.stream, error = %e, "ack failed; the commit may be delivered again");
                    }
                }
                Delivery::Lagged { missed } => {
                    tracing::warn!(missed, "subscription lagged; catching up from the store");
                    if let Err(e) = self.catch_up_all().await {
                        tracing::error!(error = %e, "catch-up failed");
                    }
                }
            }
        }
    }

    async fn write_through(&self, commit: &Commit<AccountEvent>) {
        let id = AccountId::from(commit.stream.clone());
        match self.read_model.account(&id).await {
            Ok(Some(view)) if view.revision >= commit.last_revision() => {
                self.cache.put(&id, CachedBalance::from(&view)).await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(stream = %id, error = %e, "cache write-through skipped"),
        }
    }
}
