//! Ports: what an event store and an event publisher must do.
//!
//! Adapter crates implement these (a local directory, S3, Kafka, ...). Each error variant
//! says what the caller should do with it.

use crate::{Revision, StoredCommit, StreamId};
use async_trait::async_trait;
use time::OffsetDateTime;

/// Why an append did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another writer already created a commit at this revision. Nothing was written by
    /// this call. Handling rule: reload the stream and decide again (bounded retries).
    #[error("a commit at revision {revision} of stream `{stream}` already exists")]
    Conflict {
        stream: StreamId,
        revision: Revision,
    },
    /// The store could not be reached or failed. The commit may or may not exist; a
    /// later read tells. Handling rule: answer 503 with `Retry-After`.
    #[error("event store unavailable: {0}")]
    Unavailable(String),
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or failed. Handling rule: 503 with `Retry-After`.
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// Stored data is unreadable or inconsistent (a gap, an overlap, bad JSON). Handling
    /// rule: this is a bug or tampering; answer 500 and alert, never guess.
    #[error("event store corrupt: {0}")]
    Corrupt(String),
}

/// `e` and its sources, `: `-separated: the message an adapter keeps from a client
/// library's error (whose own message often names only the request, e.g. reqwest's).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The source of truth: append-only streams of commits.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Create `commit` if and only if no commit exists at `(commit.stream,
    /// commit.revision)`. Atomic (all events or none) and durable once it returns `Ok`.
    /// The caller guarantees `commit.revision` is its loaded revision + 1.
    async fn append(&self, commit: &StoredCommit) -> Result<(), AppendError>;

    /// All commits of `stream` whose last event is at or after `from`, in order. An
    /// unknown stream reads as empty. Implementations check that revisions are
    /// contiguous and fail with [`StoreError::Corrupt`] otherwise.
    async fn read(
        &self,
        stream: &StreamId,
        from: Revision,
    ) -> Result<Vec<StoredCommit>, StoreError>;

    /// Every commit after `after`, which is the last revision of a commit the caller
    /// already holds (a commit boundary, or [`Revision::ZERO`] for the whole stream):
    /// what `read(stream, after + 1)` returns, and what this does by default. A store
    /// may answer the usual case of a warm stream, nothing new, more cheaply — and may
    /// then answer a gap right after `after` (no commit at `after + 1`, a later one
    /// there: only tampering makes one) as nothing new, where `read` reports it.
    async fn read_after(
        &self,
        stream: &StreamId,
        after: Revision,
    ) -> Result<Vec<StoredCommit>, StoreError> {
        self.read(stream, after.next()).await
    }

    /// The commit that starts at `revision`, if there is one.
    async fn read_commit(
        &self,
        stream: &StreamId,
        revision: Revision,
    ) -> Result<Option<StoredCommit>, StoreError> {
        let commits = self.read(stream, revision).await?;
        Ok(commits.into_iter().find(|c| c.revision == revision))
    }

    /// The ids of every stream that has at least one commit (for rebuilds).
    async fn streams(&self) -> Result<Vec<StreamId>, StoreError>;

    /// Whether the store can serve requests now (for `/readyz`).
    async fn ready(&self) -> Result<(), StoreError>;
}

/// Why a publish failed. Handling rule: never fail the command for it; the commit is in
/// the store and a relay or a catch-up delivers it later.
#[derive(Debug, thiserror::Error)]
#[error("publish failed: {0}")]
pub struct PublishError(pub String);

/// The fast path from the store to projections.
#[async_trait]
pub trait EventPublisher: Send + Sync + 'static {
    /// Publish one accepted commit, keyed by its stream id.
    async fn publish(&self, commit: &StoredCommit) -> Result<(), PublishError>;
}

/// A commit that must still be published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    pub stream: StreamId,
    pub revision: Revision,
    /// Which append attempt recorded it (the commit id it was about to append): two
    /// attempts at one revision are two entries, so forgetting one never forgets the
    /// other. Empty for entries recorded before attempts were named.
    pub attempt: String,
    /// When the entry was recorded (just before the append was attempted).
    pub recorded_at: OffsetDateTime,
}

/// The outbox: a durable note, written *before* a commit is appended, that the commit
/// at `(stream, revision)` must reach the event stream. It is removed once the commit
/// is published. A relay publishes whatever is left behind by a crash or a broker
/// outage (see `tally_app::relay`).
///
/// Each entry is named by its append attempt (`attempt`: the commit id, `[0-9a-zA-Z_-]`,
/// at most 64 characters), so an entry is only ever removed by whoever knows that
/// attempt: a relay abandoning an old attempt that never landed cannot remove the
/// entry of a newer attempt at the same revision.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Record that attempt `attempt` is about to append a commit at `(stream, revision)`.
    async fn record(
        &self,
        stream: &StreamId,
        revision: Revision,
        attempt: &str,
    ) -> Result<(), StoreError>;
    /// That attempt's commit was published (or never made it into the store): forget
    /// its entry. Forgetting an entry that is not there is not an error.
    async fn done(
        &self,
        stream: &StreamId,
        revision: Revision,
        attempt: &str,
    ) -> Result<(), StoreError>;
    /// Up to `limit` entries still pending.
    async fn pending(&self, limit: usize) -> Result<Vec<OutboxEntry>, StoreError>;
}

/// What one [`Compact::compact`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Compacted {
    /// The last revision the stream's segments now hold ([`Revision::ZERO`]: none).
    pub covered: Revision,
    /// Commits copied into segments by this call.
    pub commits: usize,
    /// Segment objects written by this call.
    pub segments: usize,
}

/// History in segments: a store that can copy a stream's commits into a few larger
/// objects, so that reading a long stream, or every stream in a rebuild, reads a
/// handful of objects per stream instead of one per commit. A background job (never the
/// command path): the commits stay where they are — their keys are what decides between
/// writers — and a read that finds no segment, or one it cannot verify, reads them.
#[async_trait]
pub trait Compact: Send + Sync + 'static {
    /// Copy the commits of `stream` that no segment holds yet into segments, verified
    /// against the commits; `known` is the newest revision the caller knows the stream
    /// has (it lets the store fetch the new commits at once), `None` when it cannot tell.
    async fn compact(
        &self,
        stream: &StreamId,
        known: Option<Revision>,
    ) -> Result<Compacted, StoreError>;
}

/// Where the (wrapped) data keys of personal data live, beside the events: unlike
/// them, a key can be destroyed, and with it every value sealed under it
/// (crypto-shredding; see `tally_vault`). Ids are checked by the caller (`k-` and hex).
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Keep `wrapped` under `id` (a new id: keys are never rewritten).
    async fn put(&self, id: &str, wrapped: &[u8]) -> Result<(), StoreError>;
    /// The wrapped key `id`, or `None` if it was destroyed (or never kept).
    async fn get(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Destroy key `id` for good. Destroying a key that is not there is not an error.
    async fn destroy(&self, id: &str) -> Result<(), StoreError>;
}

/// A shared record of the data keys destroyed, which lets each process keep the keys it
/// read in memory and still use none once it is destroyed anywhere (see
/// `tally_vault::KeptKeys`; in Redis: `tally_redis::RevocationsInRedis`).
///
/// The record has an **epoch**, a random value it takes when it begins — the first use,
/// or after it was lost (Redis restarted empty, evicted it) — and keeps: marks are never
/// removed within an epoch, so the same epoch seen twice means no mark made between the
/// two readings was lost. A record restored from an older copy (a snapshot, a replica
/// that was behind) must report another epoch too.
#[async_trait]
pub trait Revocations: Send + Sync + 'static {
    /// One reading: the record's epoch (begun now if there was none) and whether it
    /// marks `key_id` destroyed.
    async fn check(&self, key_id: &str) -> Result<(String, bool), StoreError>;
    /// Mark `key_id` destroyed (beginning the record if there was none). Idempotent.
    async fn revoke(&self, key_id: &str) -> Result<(), StoreError>;
}

/// A shared, lossy record of the newest commits of each stream, kept beside the store
/// so that a process whose warm state of a stream is behind can catch up without
/// reading the store (a cache in Redis: `tally_redis`). It never decides anything: a
/// state caught up through it is *unverified*, and only an append — which the store's
/// conditional create checks — may be decided on it (a stale state loses the race and
/// reloads from the store).
#[async_trait]
pub trait RecentCommits: Send + Sync + 'static {
    /// The commits of `stream` after `after` (the last revision of a commit the caller
    /// holds), if this record can tell: `Some` — possibly empty — when it holds the
    /// stream's newest commits from `after + 1` on without a hole, `None` when it
    /// cannot tell (no record of the stream, a hole, unreachable, corrupt).
    async fn after(&self, stream: &StreamId, after: Revision) -> Option<Vec<StoredCommit>>;

    /// Remember `commit`, which the store has accepted. Best effort: a failure only
    /// makes a later [`RecentCommits::after`] answer `None` or stale.
    async fn remember(&self, commit: &StoredCommit);

    /// The last revision of the newest commit this record holds for `stream`; `None`
    /// when it has no record of it (or cannot tell). A hint: a commit whose remember
    /// failed is not counted.
    async fn head(&self, stream: &StreamId) -> Option<Revision>;
}

/// Turn-taking per stream between processes: writers of one stream in different
/// processes (one function per command) wait for each other instead of racing to the
/// same revision, where the loser's append is a wasted request. A fast path only, like
/// the in-process turns: the store's conditional create still decides, and a turn that
/// cannot be had (the holder is slow or gone, Redis is down) is gone ahead without.
#[async_trait]
pub trait StreamTurns: Send + Sync + 'static {
    /// Wait up to `patience` for `stream`'s turn; the token to give it back with, or
    /// `None` when it could not be had. A turn left unreturned lapses by itself.
    async fn take(&self, stream: &StreamId, patience: std::time::Duration) -> Option<String>;

    /// Give back the turn taken with `token` (a lapsed one that another process has
    /// since taken is left alone).
    async fn give_back(&self, stream: &StreamId, token: &str);
}

/// [`StreamTurns`] kept together with the [`RecentCommits`] that a turn hands over, so
/// that each end of a turn is one round trip instead of two: the turn is taken together
/// with what the record holds after the taker's state, and given back together with
/// the commit made during it (remembered before the turn is free, as the next holder
/// expects). What each half does is what the two traits' methods do one after the
/// other.
#[async_trait]
pub trait TurnsWithRecent: StreamTurns + RecentCommits {
    /// [`StreamTurns::take`]; with the turn, what [`RecentCommits::after`] answers for
    /// `after`, read as the turn was taken. `None` when the turn could not be had.
    async fn take_reading(
        &self,
        stream: &StreamId,
        patience: std::time::Duration,
        after: Revision,
    ) -> Option<(String, Option<Vec<StoredCommit>>)>;

    /// [`RecentCommits::remember`] `commit` (if there is one), then
    /// [`StreamTurns::give_back`] the turn taken with `token`.
    async fn remember_giving_back(
        &self,
        stream: &StreamId,
        token: &str,
        commit: Option<&StoredCommit>,
    );
}

/// What a subscription delivers.
#[derive(Clone, Debug, PartialEq)]
pub enum Delivery {
    /// A commit, at least once, in publish order per stream.
    Commit(StoredCommit),
    /// The subscriber fell behind and `missed` deliveries are gone. Handling rule:
    /// catch every stream up from the store, then go on.
    Lagged { missed: u64 },
}

/// One consumer's view of the stream.
#[async_trait]
pub trait Subscription: Send + 'static {
    /// The next delivery; `None` when the stream is closed for good.
    async fn next(&mut self) -> Option<Delivery>;
    /// A delivery this subscriber already holds, without waiting for one: `None` when
    /// none is at hand now (not a closed stream). What lets a consumer handle what
    /// arrived together as one batch. The default holds nothing.
    async fn try_next(&mut self) -> Option<Delivery> {
        None
    }
    /// Record that `commit` — the last delivery handed out — and every delivery before
    /// it were handled, so none is delivered to this group again (consumer offsets).
    /// Call only after the effects of all of them are durable.
    async fn ack(&mut self, commit: &StoredCommit) -> Result<(), PublishError>;
}

/// The event stream: publish commits, and subscribe to them.
#[async_trait]
pub trait EventStream: EventPublisher {
    /// Subscribe as a member of consumer group `group`: each commit goes to one member
    /// of each group.
    async fn subscribe(&self, group: &str) -> Result<Box<dyn Subscription>, PublishError>;
}

/// The name of an outbox entry within its stream: `{revision:020}.{attempt}`, or
/// `{revision:020}` for an empty attempt (entries recorded before attempts were named).
/// An attempt that could not be part of a file name or an object key — other than
/// `[0-9a-zA-Z_-]`, or over 64 characters — is refused.
pub fn outbox_name(revision: Revision, attempt: &str) -> Result<String, StoreError> {
    let valid = attempt.len() <= 64
        && attempt
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err(StoreError::Corrupt(format!(
            "{attempt:?} cannot name an outbox entry"
        )));
    }
    Ok(if attempt.is_empty() {
        format!("{:020}", revision.get())
    } else {
        format!("{:020}.{attempt}", revision.get())
    })
}

/// Check that `commits` continue a stream at `expected` without gap or overlap.
pub fn check_contiguous(
    stream: &StreamId,
    mut expected: Revision,
    commits: &[StoredCommit],
) -> Result<(), StoreError> {
    for c in commits {
        if c.events.is_empty() {
            return Err(StoreError::Corrupt(format!(
                "empty commit at {stream}@{}",
                c.revision
            )));
        }
        if &c.stream != stream || c.revision != expected {
            return Err(StoreError::Corrupt(format!(
                "stream `{stream}`: expected a commit at revision {expected}, found {}@{}",
                c.stream, c.revision
            )));
        }
        expected = c.last_revision().next();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_chain_names_every_cause_in_order() {
        #[derive(Debug, thiserror::Error)]
        #[error("request to http://127.0.0.1:9/ failed")]
        struct Outer(#[source] std::io::Error);
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(
            error_chain(&Outer(inner)),
            "request to http://127.0.0.1:9/ failed: refused"
        );
        assert_eq!(
            error_chain(&PublishError("alone".into())),
            "publish failed: alone"
        );
    }
}
