//! The projector: from commits to the read model and the cache, exactly once.

use crate::ports::{Applied, Cache, CachedBalance, ReadModel, ReadModelError};
use futures::stream::{self, StreamExt};
use std::sync::Arc;
use tally_domain::{AccountEvent, AccountId};
use tally_es::{
    Commit, DecodeError, Delivery, EventStore, Revision, StoreError, StoredCommit, StreamId,
    Subscription,
};

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

/// How many streams a rebuild or catch-up reads from the store at once.
pub const REBUILD_CONCURRENCY: usize = 8;

/// How many streams a rebuild applies to the read model together (one
/// [`ReadModel::apply_runs`]: one transaction on PostgreSQL).
pub const REBUILD_BATCH: usize = 64;

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

    /// Catch up every stream in the store (at start-up, or after a lagging subscriber),
    /// [`REBUILD_CONCURRENCY`] streams at once. A stream that fails is logged and
    /// counted in `failed`; the others go on.
    pub async fn catch_up_all(&self) -> Result<RebuildReport, ProjectionError> {
        let mut report = RebuildReport::default();
        let mut catch_ups = stream::iter(self.store.streams().await?)
            .map(|stream| async move {
                let caught_up = self.catch_up(&AccountId::from(stream.clone())).await;
                (stream, caught_up)
            })
            .buffer_unordered(REBUILD_CONCURRENCY);
        while let Some((stream, caught_up)) = catch_ups.next().await {
            report.streams += 1;
            match caught_up {
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
    /// batch. Streams are read [`REBUILD_CONCURRENCY`] at once, in full, and applied
    /// [`REBUILD_BATCH`] at a time with one [`ReadModel::apply_runs`]; the next batch is
    /// read while one is applied. The cache is left empty: queries fill it from the
    /// read model as they miss.
    pub async fn rebuild_reporting(
        &self,
        mut progress: impl FnMut(&RebuildReport),
    ) -> Result<RebuildReport, ProjectionError> {
        self.read_model.clear().await?;
        self.cache.clear().await;
        let replayed = self.replay_every_stream(&mut progress).await;
        // Whatever the replay came to, the read model gets its checks back.
        let restored = self.read_model.rebuilt().await;
        let report = replayed?;
        restored?;
        Ok(report)
    }

    /// The rebuild's replay: every stream of the store into the emptied read model.
    async fn replay_every_stream(
        &self,
        progress: &mut impl FnMut(&RebuildReport),
    ) -> Result<RebuildReport, ProjectionError> {
        let mut report = RebuildReport::default();
        let streams = self.store.streams().await?;
        let mut batches = stream::iter(streams)
            .map(|stream| self.read_all(stream))
            .buffer_unordered(REBUILD_CONCURRENCY)
            .chunks(REBUILD_BATCH)
            .map(|read| self.replay(read))
            .buffered(2);
        while let Some(replayed) = batches.next().await {
            let batch = replayed?;
            report.streams += batch.streams;
            report.commits += batch.commits;
            report.events += batch.events;
            progress(&report);
        }
        Ok(report)
    }

    /// Every commit of `stream`, decoded.
    async fn read_all(
        &self,
        stream: StreamId,
    ) -> Result<Vec<Commit<AccountEvent>>, ProjectionError> {
        let stored = self.store.read(&stream, Revision::new(1)).await?;
        Ok(decode_all(&stored)?)
    }

    /// Replay a batch of streams read in full into the (emptied) read model.
    async fn replay(
        &self,
        read: Vec<Result<Vec<Commit<AccountEvent>>, ProjectionError>>,
    ) -> Result<RebuildReport, ProjectionError> {
        let runs = read.into_iter().collect::<Result<Vec<_>, _>>()?;
        let slices: Vec<&[Commit<AccountEvent>]> = runs.iter().map(Vec::as_slice).collect();
        self.read_model.apply_runs(&slices).await?;
        Ok(RebuildReport {
            streams: runs.len(),
            commits: runs.iter().map(Vec::len).sum(),
            events: runs.iter().flatten().map(|c| c.events.len()).sum(),
            failed: 0,
        })
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
