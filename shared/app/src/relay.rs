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

use futures::stream::{self, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tally_es::{EventPublisher, EventStore, Outbox, PublishError, StoreError};
use time::OffsetDateTime;

/// How many outbox entries a sweep handles at once.
pub const RELAY_CONCURRENCY: usize = 16;

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayReport {
    /// Commits published and removed from the outbox.
    pub published: usize,
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
        // Several entries at once (order does not matter: the projector applies each
        // stream in order and repairs gaps). One entry that fails (an unreadable
        // stream, a broker hiccup) must not hold up the others: log it, leave it for
        // the next sweep, go on.
        let mut outcomes = stream::iter(due)
            .map(|entry| async move {
                let outcome = self.relay_one(&entry, now - entry.recorded_at).await;
                (entry, outcome)
            })
            .buffer_unordered(RELAY_CONCURRENCY);
        while let Some((entry, outcome)) = outcomes.next().await {
            match outcome {
                Ok(Some(true)) => report.published += 1,
                Ok(Some(false)) => report.abandoned += 1,
                Ok(None) => report.waiting += 1,
                Err(e) => {
                    report.waiting += 1;
                    tracing::warn!(stream = %entry.stream, revision = %entry.revision, error = %e,
                        "relay could not handle this entry; will retry");
                }
            }
        }
        Ok(report)
    }

    /// `Some(true)`: published; `Some(false)`: abandoned; `None`: left for later.
    async fn relay_one(
        &self,
        entry: &tally_es::OutboxEntry,
        age: time::Duration,
    ) -> Result<Option<bool>, RelayError> {
        match self
            .store
            .read_commit(&entry.stream, entry.revision)
            .await?
        {
            Some(commit) => {
                self.publisher.publish(&commit).await?;
                self.outbox
                    .done(&entry.stream, entry.revision, &entry.attempt)
                    .await?;
                tracing::info!(stream = %entry.stream, revision = %entry.revision,
                    "relayed a commit the fast path did not publish");
                Ok(Some(true))
            }
            // Only this attempt's entry goes: a newer attempt at the same revision has
            // an entry of its own, which stays until its own commit is published.
            None if age > self.abandon_after => {
                self.outbox
                    .done(&entry.stream, entry.revision, &entry.attempt)
                    .await?;
                Ok(Some(false))
            }
            None => Ok(None),
        }
    }
}
