//! The projector: from commits to the read model and the cache, exactly once.

use crate::compaction::Compactor;
use crate::faults::{Fault, Faults};
use crate::packing::StreamRead;
use crate::ports::{Applied, Cache, CachedBalance, ReadModel, ReadModelError, RebuildBegun};
use futures::stream::{self, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tally_domain::{AccountEvent, AccountId};
use tally_es::{
    Commit, DecodeError, Delivery, EventStore, RecentCommits, Revision, StoreError, StoredCommit,
    StreamId, Subscription,
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
    /// Another rebuild of this read model is running (in this process or another).
    /// Handling rule: 409; wait for it to end, then ask again if still needed.
    #[error("another rebuild of the read model is running")]
    RebuildRunning,
    /// The read model is still behind a commit after catching up from the store (it
    /// kept moving underneath: emptied, or rows dropped). Handling rule: do not
    /// acknowledge the commit; retry.
    #[error("the read model of {stream} is at revision {at}, behind revision {wanted}")]
    Behind {
        stream: StreamId,
        at: Revision,
        wanted: Revision,
    },
}

/// How many times a catch-up reads the store again when the read model moved
/// underneath it between reading its position and applying (a gap where there was
/// none a moment before).
const CATCH_UP_ROUNDS: usize = 3;

/// How many streams a rebuild or catch-up reads from the store at once.
pub const REBUILD_CONCURRENCY: usize = 8;

/// How many delivered commits the projector applies together at most (one
/// [`Projector::handle_batch`]).
pub const PROJECTION_BATCH: usize = 256;

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
    /// Streams a rebuild read from a pack alone, with no request of their own (see
    /// [`crate::packing`]).
    pub packed: usize,
    /// Streams a rebuild read from a pack and then, from the store, what came after it.
    pub after_pack: usize,
}

/// What [`Projector::handle_batch`] did, in commits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Commits delivered.
    pub commits: usize,
    /// Commits of streams whose run applied whole.
    pub applied: usize,
    /// Commits the read model already held (or not an account's, or dropped by the
    /// `drop-projection` fault).
    pub duplicates: usize,
    /// Commits of streams made sure of from the store (a gap before or inside the run).
    pub repaired: usize,
}

/// One stream's delivered commits in a batch (see [`Projector::handle_batch`]).
struct Run {
    id: AccountId,
    /// In revision order, once each, up to the first break in contiguity.
    commits: Vec<Commit<AccountEvent>>,
    /// The last revision delivered (past a break too): what the read model must hold.
    wanted: Revision,
    /// No break: `commits` is every delivered commit of the stream.
    whole: bool,
}

/// Applies account commits to a read model, then writes balances through to a cache.
#[derive(Clone)]
pub struct Projector {
    store: Arc<dyn EventStore>,
    read_model: Arc<dyn ReadModel>,
    cache: Arc<dyn Cache>,
    /// What the command functions say each stream's newest commit is (see
    /// [`Projector::sweep`]).
    recent: Option<Arc<dyn RecentCommits>>,
    /// Told of every commit handled, to copy streams into segments as they grow.
    compactor: Option<Arc<Compactor>>,
    /// Packs of many streams, which a rebuild reads instead of every stream.
    packer: Option<Arc<crate::packing::Packer>>,
    faults: Faults,
    /// Deliveries handled, for `drop-projection`.
    handled: Arc<AtomicU64>,
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
            recent: None,
            compactor: None,
            packer: None,
            faults: Faults::NONE,
            handled: Arc::default(),
        }
    }

    /// Read what the command functions say each stream's newest commit is (see
    /// [`Projector::sweep`]).
    pub fn with_recent_commits(mut self, recent: Arc<dyn RecentCommits>) -> Self {
        self.recent = Some(recent);
        self
    }

    /// Tell `compactor` of every commit handled (see [`crate::compaction`]).
    pub fn with_compactor(mut self, compactor: Arc<Compactor>) -> Self {
        self.compactor = Some(compactor);
        self
    }

    /// The compactor it tells of each commit, if any.
    pub fn compactor(&self) -> Option<&Arc<Compactor>> {
        self.compactor.as_ref()
    }

    /// Rebuild through `packer`'s packs (see [`crate::packing`]).
    pub fn with_packer(mut self, packer: Arc<crate::packing::Packer>) -> Self {
        self.packer = Some(packer);
        self
    }

    /// The packer a rebuild reads through, if any.
    pub fn packer(&self) -> Option<&Arc<crate::packing::Packer>> {
        self.packer.as_ref()
    }

    /// Inject `faults` (tests only; see [`crate::faults`]).
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Handle one delivered commit (at-least-once, possibly out of order). A duplicate
    /// is skipped; a gap is repaired from the store before anything newer is applied.
    /// Returns only once the read model holds the commit: the caller may then
    /// acknowledge it. Anything else — the read model moved underneath, lost the rows
    /// it said it had — is an error, and the commit is not to be acknowledged. The
    /// outcome is the read model's apply of it (`Duplicate` for another aggregate's
    /// commit).
    pub async fn handle(&self, stored: &StoredCommit) -> Result<Applied, ProjectionError> {
        let (_, outcomes) = self.project(std::slice::from_ref(stored)).await?;
        Ok(outcomes.into_iter().next().unwrap_or(Applied::Duplicate))
    }

    /// Handle delivered commits together, as [`Projector::handle`] would one after
    /// another, in fewer round trips: the account commits are grouped by stream (in
    /// revision order, duplicates dropped) and applied with one
    /// [`ReadModel::apply_runs`] — one transaction on PostgreSQL instead of one per
    /// commit —, then each stream applied is written through to the cache once. A
    /// stream whose run did not apply whole (a gap before it or inside it, or the
    /// read model already ahead) is made sure of as `handle` does: caught up from the
    /// store if behind. Returns only once the read model holds every commit of the
    /// batch: the caller may then acknowledge all of them.
    pub async fn handle_batch(
        &self,
        batch: &[StoredCommit],
    ) -> Result<BatchReport, ProjectionError> {
        Ok(self.project(batch).await?.0)
    }

    /// What [`Projector::handle`] and [`Projector::handle_batch`] do: the report, and
    /// the read model's outcome for each stream's run, in the order the streams first
    /// appear in `batch`.
    async fn project(
        &self,
        batch: &[StoredCommit],
    ) -> Result<(BatchReport, Vec<Applied>), ProjectionError> {
        let mut report = BatchReport {
            commits: batch.len(),
            ..BatchReport::default()
        };
        let mut runs: Vec<Run> = Vec::new();
        let mut run_of: HashMap<&StreamId, usize> = HashMap::new();
        for stored in batch {
            let Some(id) = AccountId::of_stream(&stored.stream) else {
                // Another aggregate's commit on the shared topic (a transfer's): the
                // read model of accounts has nothing to do with it.
                report.duplicates += 1;
                continue;
            };
            let commit = Commit::<AccountEvent>::decode(stored)?;
            if self.dropped_by_fault(stored) {
                report.duplicates += 1;
                continue;
            }
            let run = *run_of.entry(&stored.stream).or_insert_with(|| {
                runs.push(Run {
                    id,
                    commits: Vec::new(),
                    wanted: Revision::ZERO,
                    whole: true,
                });
                runs.len() - 1
            });
            runs[run].commits.push(commit);
        }
        // Each run in revision order, once per revision, cut at the first break in
        // contiguity (what follows it is the store's to fill in).
        for run in &mut runs {
            run.commits.sort_by_key(|c| c.revision);
            run.commits.dedup_by_key(|c| c.revision);
            let contiguous = 1 + run
                .commits
                .windows(2)
                .take_while(|pair| pair[1].revision == pair[0].last_revision().next())
                .count();
            run.wanted = run
                .commits
                .last()
                .map_or(Revision::ZERO, Commit::last_revision);
            run.whole = contiguous == run.commits.len();
            run.commits.truncate(contiguous);
        }
        let slices: Vec<&[Commit<AccountEvent>]> =
            runs.iter().map(|run| run.commits.as_slice()).collect();
        let outcomes = self.read_model.apply_runs(&slices).await?;
        let mut written = Vec::new();
        for (run, outcome) in runs.iter().zip(&outcomes) {
            match outcome {
                Applied::Applied if run.whole => {
                    report.applied += run.commits.len();
                    written.push(run.commits.last().expect("a run is never empty"));
                }
                _ => {
                    // Not all applied by this call: make sure before acknowledging.
                    if *outcome == Applied::Duplicate && run.whole {
                        report.duplicates += run.commits.len();
                    } else {
                        report.repaired += run.commits.len();
                    }
                    self.ensure_applied(&run.id, run.wanted).await?;
                }
            }
        }
        stream::iter(written)
            .for_each_concurrent(REBUILD_CONCURRENCY, |last| self.write_through(last))
            .await;
        // Account streams only: those are what grow long and what a rebuild reads. A
        // transfer's stream is a handful of commits read whole while its saga runs;
        // segments would only cost it requests.
        if let Some(compactor) = &self.compactor {
            for run in &runs {
                compactor.note(run.id.stream_id(), run.wanted);
            }
        }
        Ok((report, outcomes))
    }

    /// `drop-projection` (tests only): every third delivery is to be acknowledged
    /// without being applied.
    fn dropped_by_fault(&self, stored: &StoredCommit) -> bool {
        let dropped = self.faults.has(Fault::DropProjection)
            && self
                .handled
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(3);
        if dropped {
            tracing::error!(stream = %stored.stream, revision = %stored.revision,
                "fault injection: this delivery is acknowledged without being applied");
        }
        dropped
    }

    /// Make sure the read model holds `id` up to `wanted`, catching up from the store if
    /// it does not; [`ProjectionError::Behind`] if it still does not after that.
    async fn ensure_applied(
        &self,
        id: &AccountId,
        wanted: Revision,
    ) -> Result<(), ProjectionError> {
        let mut at = self.read_model.position(id).await?;
        if at < wanted {
            self.catch_up(id).await?;
            at = self.read_model.position(id).await?;
        }
        if at < wanted {
            return Err(ProjectionError::Behind {
                stream: id.stream_id().clone(),
                at,
                wanted,
            });
        }
        Ok(())
    }

    /// The event store it reads.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// Apply every commit of `id` that the store has and the read model lacks, in one
    /// [`ReadModel::apply_all`]. Returns the number of commits applied. On a gap — the
    /// read model lost rows between reading its position and the apply (emptied by a
    /// rebuild, say) — it reads its position and the store again, a few times.
    pub async fn catch_up(&self, id: &AccountId) -> Result<usize, ProjectionError> {
        for _ in 0..CATCH_UP_ROUNDS {
            let position = self.read_model.position(id).await?;
            let stored = self.store.read_after(id.stream_id(), position).await?;
            let commits = decode_all(&stored)?;
            let Some(last) = commits.last() else {
                return Ok(0);
            };
            match self.read_model.apply_all(&commits).await? {
                Applied::Applied => {
                    self.write_through(last).await;
                    return Ok(commits
                        .iter()
                        .filter(|c| c.last_revision() > position)
                        .count());
                }
                // Another projector got there first.
                Applied::Duplicate => return Ok(0),
                Applied::Gap { expected } => {
                    tracing::info!(stream = %id, %position, %expected,
                        "the read model moved underneath a catch-up; reading again");
                }
            }
        }
        let at = self.read_model.position(id).await?;
        Err(ProjectionError::Behind {
            stream: id.stream_id().clone(),
            at,
            wanted: at.next(),
        })
    }

    /// Catch up every stream in the store (at start-up, or after a lagging subscriber),
    /// [`REBUILD_CONCURRENCY`] streams at once. A stream that fails is logged and
    /// counted in `failed`; the others go on.
    pub async fn catch_up_all(&self) -> Result<RebuildReport, ProjectionError> {
        self.catch_up_each(|_| async { Ok(true) }).await
    }

    /// The periodic safety net for commits the stream did not deliver. With recent
    /// commits ([`Projector::with_recent_commits`]) a stream whose record shows nothing
    /// newer than the read model is passed over — no store request; one the record
    /// shows ahead, or does not know (idle for long, Redis lost it or is down), is
    /// caught up from the store. Without them, or on a `full` round, every stream is
    /// caught up as by [`Projector::catch_up_all`] (for a newest commit the record
    /// missed: its writer could not reach Redis). So a round of a busy system costs a
    /// store request per stream that is behind, not one per stream.
    pub async fn sweep(&self, full: bool) -> Result<RebuildReport, ProjectionError> {
        let Some(recent) = self.recent.as_ref().filter(|_| !full) else {
            return self.catch_up_all().await;
        };
        self.catch_up_each(|id| async move {
            Ok(match recent.head(id.stream_id()).await {
                Some(head) => head > self.read_model.position(&id).await?,
                None => true,
            })
        })
        .await
    }

    /// Catch up each account stream of the store that `behind` says may be behind,
    /// [`REBUILD_CONCURRENCY`] at once; a stream that fails is logged and counted.
    async fn catch_up_each<F, Fut>(&self, behind: F) -> Result<RebuildReport, ProjectionError>
    where
        F: Fn(AccountId) -> Fut,
        Fut: std::future::Future<Output = Result<bool, ProjectionError>>,
    {
        let mut report = RebuildReport::default();
        let mut catch_ups = stream::iter(self.account_streams().await?)
            .map(|id| {
                let behind = behind(id.clone());
                async move {
                    let caught_up = match behind.await {
                        Ok(true) => self.catch_up(&id).await,
                        Ok(false) => Ok(0),
                        Err(e) => Err(e),
                    };
                    (id, caught_up)
                }
            })
            .buffer_unordered(REBUILD_CONCURRENCY);
        while let Some((stream, caught_up)) = catch_ups.next().await {
            report.streams += 1;
            match caught_up {
                Ok(applied) => report.commits += applied,
                Err(e) => {
                    report.failed += 1;
                    tracing::error!(stream = %stream, error = %e, "catch-up of this stream failed");
                }
            }
        }
        Ok(report)
    }

    /// Rebuild the read model from the store, without downtime: every stream is
    /// replayed into a new generation while queries and the live projector go on with
    /// the current one, then readers switch over at once (see
    /// [`ReadModel::finish_rebuild`]) and the cache is emptied.
    pub async fn rebuild(&self) -> Result<RebuildReport, ProjectionError> {
        self.rebuild_reporting(|_| {}).await
    }

    /// [`Projector::rebuild`], calling `progress` with the running totals after each
    /// batch. Streams are read [`REBUILD_CONCURRENCY`] at once, in full, and applied
    /// [`REBUILD_BATCH`] at a time with one [`ReadModel::apply_runs_rebuilding`]; the
    /// next batch is read while one is applied. A failed replay drops the new
    /// generation and leaves the live one as it was. The cache is emptied after the
    /// switch: queries fill it again as they miss (each miss catches up from the store).
    pub async fn rebuild_reporting(
        &self,
        mut progress: impl FnMut(&RebuildReport),
    ) -> Result<RebuildReport, ProjectionError> {
        if self.read_model.begin_rebuild().await? == RebuildBegun::AnotherRunning {
            return Err(ProjectionError::RebuildRunning);
        }
        // From here the rebuild ends in a finish or an abandon, also when this future
        // is dropped halfway (a client that hung up on `POST /projector/rebuild`):
        // otherwise it would hold the read model's one rebuild until the process ends.
        let mut unfinished = Unfinished(Some(self.read_model.clone()));
        let replayed = self.replay_every_stream(&mut progress).await;
        let finished = match replayed {
            Ok(report) => self
                .read_model
                .finish_rebuild()
                .await
                .map(|()| report)
                .map_err(ProjectionError::from),
            Err(e) => Err(e),
        };
        match finished {
            Ok(report) => {
                unfinished.0 = None;
                self.cache.clear().await;
                Ok(report)
            }
            Err(e) => {
                unfinished.0 = None;
                if let Err(dropped) = self.read_model.abandon_rebuild().await {
                    tracing::warn!(error = %dropped, "the failed rebuild's generation was not dropped");
                }
                Err(e)
            }
        }
    }

    /// The rebuild's replay: every stream of the store into the new generation.
    async fn replay_every_stream(
        &self,
        progress: &mut impl FnMut(&RebuildReport),
    ) -> Result<RebuildReport, ProjectionError> {
        let mut report = RebuildReport::default();
        // Through the newest pack, when there is one to use; else every stream whole.
        let planned = match &self.packer {
            Some(packer) => packer.plan().await,
            None => None,
        };
        let reads = match planned {
            Some(reads) => reads,
            None => self
                .account_streams()
                .await?
                .into_iter()
                .map(|id| StreamRead::Whole(id.stream_id().clone()))
                .collect(),
        };
        for read in &reads {
            match read {
                StreamRead::Packed(_) => report.packed += 1,
                StreamRead::PackedThenAfter(_) => report.after_pack += 1,
                StreamRead::Whole(_) => {}
            }
        }
        let mut batches = stream::iter(reads)
            .map(|read| self.read_all(read))
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

    /// Every commit of a stream, read as `read` says, decoded.
    async fn read_all(
        &self,
        read: StreamRead,
    ) -> Result<Vec<Commit<AccountEvent>>, ProjectionError> {
        let stored = match (&self.packer, read) {
            (Some(packer), read) => packer.read(read).await?,
            (None, read) => self.store.read(read.stream(), Revision::new(1)).await?,
        };
        Ok(decode_all(&stored)?)
    }

    /// Replay a batch of streams read in full into the generation being rebuilt.
    async fn replay(
        &self,
        read: Vec<Result<Vec<Commit<AccountEvent>>, ProjectionError>>,
    ) -> Result<RebuildReport, ProjectionError> {
        let runs = read.into_iter().collect::<Result<Vec<_>, _>>()?;
        let slices: Vec<&[Commit<AccountEvent>]> = runs.iter().map(Vec::as_slice).collect();
        self.read_model.apply_runs_rebuilding(&slices).await?;
        Ok(RebuildReport {
            streams: runs.len(),
            commits: runs.iter().map(Vec::len).sum(),
            events: runs.iter().flatten().map(|c| c.events.len()).sum(),
            ..RebuildReport::default()
        })
    }

    /// Follow `subscription` until it closes: take the next delivery and whatever else
    /// it already holds (up to [`PROJECTION_BATCH`]), handle them as one batch
    /// ([`Projector::handle_batch`]), then acknowledge them; on a lag, catch every
    /// stream up from the store. A batch that cannot be applied (the read model is down)
    /// is retried with backoff, never passed over: acknowledging a later message would
    /// move the consumer offset past it.
    pub async fn run(&self, mut subscription: Box<dyn Subscription>) {
        while let Some(first) = subscription.next().await {
            let mut batch = Vec::new();
            let mut lagged = None;
            let mut next = Some(first);
            while let Some(delivery) = next.take() {
                match delivery {
                    Delivery::Commit(commit) => batch.push(commit),
                    Delivery::Lagged { missed } => {
                        lagged = Some(missed);
                        break;
                    }
                }
                if batch.len() < PROJECTION_BATCH {
                    next = subscription.try_next().await;
                }
            }
            if let Some(last) = batch.last() {
                let mut delay = std::time::Duration::from_millis(50);
                while let Err(e) = self.handle_batch(&batch).await {
                    tracing::error!(commits = batch.len(), first_stream = %batch[0].stream, error = %e,
                        retry_in_ms = delay.as_millis() as u64, "projection failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(5));
                }
                tracing::debug!(commits = batch.len(), "batch projected");
                if let Err(e) = subscription.ack(last).await {
                    tracing::warn!(stream = %last.stream, error = %e, "ack failed; the commits may be delivered again");
                }
            }
            if let Some(missed) = lagged {
                tracing::warn!(missed, "subscription lagged; catching up from the store");
                if let Err(e) = self.catch_up_all().await {
                    tracing::error!(error = %e, "catch-up failed");
                }
            }
        }
    }

    /// Every account's stream in the store (not the streams of other aggregates).
    async fn account_streams(&self) -> Result<Vec<AccountId>, ProjectionError> {
        let streams = self.store.streams().await?;
        Ok(streams.iter().filter_map(AccountId::of_stream).collect())
    }

    async fn write_through(&self, commit: &Commit<AccountEvent>) {
        let Some(id) = AccountId::of_stream(&commit.stream) else {
            return;
        };
        match self.read_model.account(&id).await {
            // Refresh only: this delivery may be late, and a newer acknowledged balance
            // may have been lost with the cache (Redis restarted empty); an entry
            // created from it would be older than what a client was told.
            Ok(Some(view)) if view.revision >= commit.last_revision() => {
                self.cache.refresh(&id, CachedBalance::from(&view)).await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(stream = %id, error = %e, "cache write-through skipped"),
        }
    }
}

/// A rebuild begun and not yet finished or abandoned: dropped so (its future was
/// cancelled), it abandons the rebuild on a task of its own.
struct Unfinished(Option<Arc<dyn ReadModel>>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        let Some(read_model) = self.0.take() else {
            return;
        };
        tracing::warn!("a rebuild was stopped halfway; abandoning it");
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = read_model.abandon_rebuild().await {
                    tracing::warn!(error = %e, "the stopped rebuild's generation was not dropped");
                }
            });
        }
    }
}
