//! History in segments on S3 (the layout and its checks: `tally_es::segments`):
//! `segments/{stream}/head.json` and `segments/{stream}/{first:020}-{last:020}.json`,
//! so that a long stream, or every stream in a rebuild, reads in a handful of requests
//! instead of one per commit.
//!
//! Reading: one GET of the head; the sealed segments that hold the range wanted,
//! fetched at once and checked against the head's digest; then the commits after the
//! head, probed by key like a warm stream's (one 404 when the segments are up to date).
//! Segments are only ever a faster copy: the commit objects stay, a read that finds no
//! head, a head that does not reach the revision wanted, or a segment that is missing or
//! does not match its digest reads the commits instead (and says so in the log), and a
//! stale head (a slower compactor's, written last) only leaves more commits to probe.
//!
//! Compacting ([`Compact::compact`]): the head, then the commits after it, each read
//! from its own object (never from the topic or a cache); the runs that fill a segment
//! are sealed, each read back and compared byte for byte before the head lists it;
//! then the head is written.

use crate::{S3EventStore, READ_CONCURRENCY};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use tally_es::segments::{open_sealed, Sealed, SegmentHead, HEAD_NAME};
use tally_es::{Compact, Compacted, Revision, StoreError, StoredCommit, StreamId};

/// How many revisions past its head one compaction reads at most (the next one goes on
/// from there).
const MAX_COMPACTED_AT_ONCE: u64 = 4_096;

impl S3EventStore {
    fn segment_key(&self, stream: &StreamId, name: &str) -> String {
        format!("{}segments/{}/{name}", self.prefix, stream.as_str())
    }

    /// The head of `stream`'s segments, if it has one that reads as one.
    pub(crate) async fn head(&self, stream: &StreamId) -> Result<Option<SegmentHead>, StoreError> {
        let key = self.segment_key(stream, HEAD_NAME);
        let Some(bytes) = self.get_bytes_if_any(&key).await? else {
            return Ok(None);
        };
        match SegmentHead::parse(stream, &bytes) {
            Ok(head) => Ok(Some(head)),
            Err(why) => {
                tracing::warn!(key, why, "unreadable segment head: reading the commits");
                Ok(None)
            }
        }
    }

    /// The commits of `stream` whose last event is at or after `from`, as far as its
    /// segments hold them, and the last revision they hold: `None` when the segments do
    /// not reach `from`, or one of those needed is missing or does not match its digest
    /// (the caller reads the commits).
    pub(crate) async fn read_segments(
        &self,
        stream: &StreamId,
        from: Revision,
    ) -> Result<Option<(Vec<StoredCommit>, Revision)>, StoreError> {
        let Some(head) = self.head(stream).await? else {
            return Ok(None);
        };
        let covered = head.covered();
        if covered < from {
            return Ok(None);
        }
        let Some(mut commits) = self.sealed_runs(stream, head.sealed_from(from)).await? else {
            return Ok(None);
        };
        commits.extend(head.commits);
        commits.retain(|c| c.last_revision() >= from);
        Ok(Some((commits, covered)))
    }

    /// The commits of the sealed segments `entries` of `stream`, in order (fetched at
    /// once); `None` if one of them is missing or is not what the head says it is.
    pub(crate) async fn sealed_runs(
        &self,
        stream: &StreamId,
        entries: Vec<Sealed>,
    ) -> Result<Option<Vec<StoredCommit>>, StoreError> {
        let runs: Vec<Option<Vec<StoredCommit>>> = stream::iter(entries)
            .map(|s| async move { self.sealed(stream, &s).await })
            .buffered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        let mut commits = Vec::new();
        for run in runs {
            let Some(run) = run else { return Ok(None) };
            commits.extend(run);
        }
        Ok(Some(commits))
    }

    /// The commits of the sealed segment `entry` of `stream`; `None` if it is missing
    /// or is not what the head says it is.
    async fn sealed(
        &self,
        stream: &StreamId,
        entry: &Sealed,
    ) -> Result<Option<Vec<StoredCommit>>, StoreError> {
        let key = self.segment_key(stream, &entry.name());
        let Some(bytes) = self.get_bytes_if_any(&key).await? else {
            tracing::warn!(
                key,
                "a segment the head lists is missing: reading the commits"
            );
            return Ok(None);
        };
        match open_sealed(stream, entry, &bytes) {
            Ok(commits) => Ok(Some(commits)),
            Err(why) => {
                tracing::warn!(key, why, "a segment does not verify: reading the commits");
                Ok(None)
            }
        }
    }

    /// The commits of `stream` after `after` up to `known` (a revision the caller knows
    /// exists), fetched by key at once: every key in the range is asked for (a key
    /// inside a commit of several events is simply not there), then the run that
    /// follows `after` without a hole is kept.
    async fn commits_through(
        &self,
        stream: &StreamId,
        after: Revision,
        known: Revision,
    ) -> Result<Vec<StoredCommit>, StoreError> {
        let last = known.get().min(after.get() + MAX_COMPACTED_AT_ONCE);
        let found: Vec<Option<StoredCommit>> = stream::iter(after.get() + 1..=last)
            .map(|r| {
                use tally_es::EventStore;
                self.read_commit(stream, Revision::new(r))
            })
            .buffered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        let mut next = after.next();
        let mut run = Vec::new();
        for commit in found.into_iter().flatten() {
            if commit.revision == next {
                next = commit.last_revision().next();
                run.push(commit);
            }
        }
        Ok(run)
    }

    /// Write `body` at `key` (a sealed segment), then read it back: `Ok` only if the
    /// server holds exactly those bytes.
    async fn put_verified(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        self.put(key, body.clone(), "application/json").await?;
        match self.get_bytes_if_any(key).await? {
            Some(stored) if stored == body => Ok(()),
            _ => Err(StoreError::Corrupt(format!(
                "{key}: what reads back is not what was written"
            ))),
        }
    }
}

#[async_trait]
impl Compact for S3EventStore {
    async fn compact(
        &self,
        stream: &StreamId,
        known: Option<Revision>,
    ) -> Result<Compacted, StoreError> {
        let mut head = self
            .head(stream)
            .await?
            .unwrap_or_else(|| SegmentHead::empty(stream));
        let covered = head.covered();
        let unchanged = Compacted {
            covered,
            ..Compacted::default()
        };
        let new = match known {
            Some(known) if known <= covered => return Ok(unchanged),
            Some(known) => self.commits_through(stream, covered, known).await?,
            None => self.read_commits_after(stream, covered).await?,
        };
        if new.is_empty() {
            return Ok(unchanged);
        }
        let copied = new.len();
        let sealed = head.extend(new, self.segment_commits)?;
        for (entry, body) in &sealed {
            self.put_verified(
                &self.segment_key(stream, &entry.name()),
                body.clone().into(),
            )
            .await?;
        }
        // The head is not read back: every reader checks it (it parses, names the
        // stream, and its ranges and commits follow each other from revision 1), and
        // one that fails reads the commits; a second request per compaction would buy
        // nothing those checks do not.
        self.put(
            &self.segment_key(stream, HEAD_NAME),
            head.to_bytes().into(),
            "application/json",
        )
        .await?;
        Ok(Compacted {
            covered: head.covered(),
            commits: copied,
            segments: sealed.len() + 1,
        })
    }
}
