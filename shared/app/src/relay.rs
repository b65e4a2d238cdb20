//! The relay: publishes the commits the outbox still holds.
//!
//! A command records `(stream, revision)` in the outbox before it appends, publishes
//! after, and removes the entry once the broker acknowledged. Whatever is left — the
//! process died between the append and the publish, or the broker was down — is found
//! here: an entry older than the grace period whose commit is in the store is
//! published, then removed. An entry whose commit never made it into the store (the
//! append lost a race or failed) is removed once it is older than `abandon_after`, long
//! past any append that could still be in flight. Several relays may run at once: a
//! commit published twice is applied once by the projections.
//!
//! Several entries may name one commit — two attempts' entries, or, on S3, the leases a
//! relay takes over, each of which names every commit of its streams for a while (a
//! process renews its leases every second) —: a sweep publishes each commit once for
//! all the entries that name it, and a relay remembers the commits it published, so an
//! entry of a later sweep that names one is done without a read or a publish. A commit
//! never changes once stored, so one acknowledged publish of it is all any entry asks.

use futures::stream::{self, StreamExt};
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally_es::{
    EventPublisher, EventStore, Outbox, OutboxEntry, PublishError, Revision, StoreError, StreamId,
};
use time::OffsetDateTime;

/// How many outbox entries a sweep handles at once.
pub const RELAY_CONCURRENCY: usize = 16;
/// How many of the commits it published a relay remembers.
const REMEMBERED_PUBLISHED: usize = 65_536;

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayReport {
    /// Commits published, their entries removed from the outbox.
    pub published: usize,
    /// Entries removed without a publish: their commit was published by this relay
    /// already (in this sweep, for another entry, or in an earlier one).
    pub already_published: usize,
    /// Entries removed because their commit never reached the store.
    pub abandoned: usize,
    /// Entries left for later (too young, or their publish failed).
    pub waiting: usize,
}

/// Why a sweep stopped. Handling rule: log and sweep again later.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// Publishes what the outbox holds.
#[derive(Clone)]
pub struct Relay {
    store: Arc<dyn EventStore>,
    outbox: Arc<dyn Outbox>,
    publisher: Arc<dyn EventPublisher>,
    grace: Duration,
    abandon_after: Duration,
    batch: usize,
    /// The commits this relay published (most recent first, at most
    /// [`REMEMBERED_PUBLISHED`]).
    published: Arc<Mutex<lru::LruCache<(StreamId, Revision), ()>>>,
}

impl Relay {
    /// A relay with a grace period of 2 s (the fast path's time to publish) and
    /// abandonment after 10 minutes.
    pub fn new(
        store: Arc<dyn EventStore>,
        outbox: Arc<dyn Outbox>,
        publisher: Arc<dyn EventPublisher>,
    ) -> Self {
        Self {
            store,
            outbox,
            publisher,
            grace: Duration::from_secs(2),
            abandon_after: Duration::from_secs(600),
            batch: 500,
            published: Arc::new(Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(REMEMBERED_PUBLISHED).expect("not zero"),
            ))),
        }
    }

    /// Entries younger than `grace` are left to the command that wrote them.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Entries whose commit is not in the store are removed once older than `after`
    /// (default 10 minutes: long past any append that could still land).
    pub fn with_abandon_after(mut self, after: Duration) -> Self {
        self.abandon_after = after;
        self
    }

    /// One pass over the outbox.
    pub async fn sweep(&self) -> Result<RelayReport, RelayError> {
        let mut report = RelayReport::default();
        let now = OffsetDateTime::now_utc();
        let mut entries = self.outbox.pending(self.batch).await?;
        entries.sort_by_key(|e| e.recorded_at);
        let (due, young): (Vec<_>, Vec<_>) = entries
            .into_iter()
            .partition(|e| now - e.recorded_at >= self.grace);
        report.waiting += young.len();
        // The entries that name one commit go together: one read and one publish.
        let mut commits: Vec<Vec<OutboxEntry>> = Vec::new();
        let mut index: HashMap<(StreamId, Revision), usize> = HashMap::new();
        for entry in due {
            let at = *index
                .entry((entry.stream.clone(), entry.revision))
                .or_insert_with(|| {
                    commits.push(Vec::new());
                    commits.len() - 1
                });
            commits[at].push(entry);
        }
        // Several commits at once (order does not matter: the projector applies each
        // stream in order and repairs gaps). One that fails (an unreadable stream, a
        // broker hiccup) must not hold up the others: log it, leave its entries for
        // the next sweep, go on.
        let mut outcomes = stream::iter(commits)
            .map(|entries| async move {
                let outcome = self.relay_commit(&entries, now).await;
                (entries, outcome)
            })
            .buffer_unordered(RELAY_CONCURRENCY);
        while let Some((entries, outcome)) = outcomes.next().await {
            match outcome {
                Ok(done) => {
                    report.published += done.published;
                    report.already_published += done.already_published;
                    report.abandoned += done.abandoned;
                    report.waiting += done.waiting;
                }
                Err(e) => {
                    report.waiting += entries.len();
                    tracing::warn!(stream = %entries[0].stream, revision = %entries[0].revision, error = %e,
                        "relay could not handle this entry; will retry");
                }
            }
        }
        Ok(report)
    }

    /// `entries`, which all name one commit: publish it (unless this relay did already)
    /// and remove them; if it is not in the store, remove those older than
    /// `abandon_after` and leave the others for later.
    async fn relay_commit(
        &self,
        entries: &[OutboxEntry],
        now: OffsetDateTime,
    ) -> Result<RelayReport, RelayError> {
        let first = &entries[0];
        let key = (first.stream.clone(), first.revision);
        let mut report = RelayReport::default();
        let already = self
            .published
            .lock()
            .expect("published commits poisoned")
            .get(&key)
            .is_some();
        if !already {
            match self
                .store
                .read_commit(&first.stream, first.revision)
                .await?
            {
                Some(commit) => {
                    self.publisher.publish(&commit).await?;
                    self.published
                        .lock()
                        .expect("published commits poisoned")
                        .put(key, ());
                    tracing::info!(stream = %first.stream, revision = %first.revision, entries = entries.len(),
                        "relayed a commit the fast path did not publish");
                    report.published = 1;
                    report.already_published = entries.len() - 1;
                }
                None => {
                    // Only an old attempt's entry goes: a newer attempt at the same
                    // revision has an entry of its own, which stays until its own
                    // commit is published.
                    for entry in entries {
                        if now - entry.recorded_at > self.abandon_after {
                            self.outbox
                                .done(&entry.stream, entry.revision, &entry.attempt)
                                .await?;
                            report.abandoned += 1;
                        } else {
                            report.waiting += 1;
                        }
                    }
                    return Ok(report);
                }
            }
        } else {
            report.already_published = entries.len();
        }
        for entry in entries {
            self.outbox
                .done(&entry.stream, entry.revision, &entry.attempt)
                .await?;
        }
        Ok(report)
    }
}
