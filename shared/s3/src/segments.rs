//! History in segments: a stream's commits copied into a few larger objects, so that a
//! long stream, or every stream in a rebuild, reads in a handful of requests instead of
//! one per commit.
//!
//! * `segments/{stream}/{first:020}-{last:020}.json` — a *sealed* segment: exactly
//!   [`S3EventStore::with_segment_commits`] commits (256 by default), the stream's first
//!   such run, its second, … Written once; its content follows from the stream's
//!   immutable history, so two compactors that seal one run write the same bytes.
//! * `segments/{stream}/head.json` — the index: the sealed segments in order, each with
//!   its range, its count and the SHA-256 of its bytes, and the commits after the last
//!   of them (fewer than a sealed segment holds). Rewritten by each compaction.
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
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tally_es::{
    check_contiguous, Compact, Compacted, Revision, StoreError, StoredCommit, StreamId,
};

/// How many commits a sealed segment holds, unless the store is told otherwise.
pub const SEGMENT_COMMITS: usize = 256;

/// How many revisions past its head one compaction reads at most (the next one goes on
/// from there).
const MAX_COMPACTED_AT_ONCE: u64 = 4_096;

/// A sealed segment as the head lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Sealed {
    first: Revision,
    last: Revision,
    commits: usize,
    sha256: String,
}

/// `segments/{stream}/head.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Head {
    stream: StreamId,
    sealed: Vec<Sealed>,
    /// The commits after the last sealed segment.
    commits: Vec<StoredCommit>,
}

/// A sealed segment's body.
#[derive(Serialize, Deserialize)]
struct Segment {
    stream: StreamId,
    commits: Vec<StoredCommit>,
}

impl Head {
    fn empty(stream: &StreamId) -> Self {
        Self {
            stream: stream.clone(),
            sealed: Vec::new(),
            commits: Vec::new(),
        }
    }

    /// The last revision the segments hold.
    fn covered(&self) -> Revision {
        match (self.commits.last(), self.sealed.last()) {
            (Some(c), _) => c.last_revision(),
            (None, Some(s)) => s.last,
            (None, None) => Revision::ZERO,
        }
    }

    /// Whether this head describes `stream` from revision 1 on without a hole.
    fn check(&self, stream: &StreamId) -> Result<(), String> {
        if &self.stream != stream {
            return Err(format!("it is the head of stream `{}`", self.stream));
        }
        let mut next = Revision::new(1);
        for s in &self.sealed {
            if s.first != next || s.last < s.first || s.commits == 0 {
                return Err(format!(
                    "sealed segment {}-{} where {next} comes next",
                    s.first, s.last
                ));
            }
            next = s.last.next();
        }
        if !self.commits.is_empty() {
            check_contiguous(stream, next, &self.commits).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl S3EventStore {
    fn segment_prefix(&self, stream: &StreamId) -> String {
        format!("{}segments/{}/", self.prefix, stream.as_str())
    }

    fn head_key(&self, stream: &StreamId) -> String {
        format!("{}head.json", self.segment_prefix(stream))
    }

    fn sealed_key(&self, stream: &StreamId, first: Revision, last: Revision) -> String {
        format!(
            "{}{:020}-{:020}.json",
            self.segment_prefix(stream),
            first.get(),
            last.get()
        )
    }

    /// The head of `stream`'s segments, if it has one that reads as one.
    async fn head(&self, stream: &StreamId) -> Result<Option<Head>, StoreError> {
        let key = self.head_key(stream);
        let Some(bytes) = self.get_bytes_if_any(&key).await? else {
            return Ok(None);
        };
        let head = serde_json::from_slice::<Head>(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|head| head.check(stream).map(|()| head));
        match head {
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
        let needed: Vec<Sealed> = head
            .sealed
            .iter()
            .filter(|s| s.last >= from)
            .cloned()
            .collect();
        let sealed: Vec<Option<Vec<StoredCommit>>> = stream::iter(needed)
            .map(|s| async move { self.sealed(stream, &s).await })
            .buffered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        let mut commits = Vec::new();
        for run in sealed {
            let Some(run) = run else { return Ok(None) };
            commits.extend(run);
        }
        commits.extend(head.commits);
        commits.retain(|c| c.last_revision() >= from);
        Ok(Some((commits, covered)))
    }

    /// The commits of the sealed segment `entry` of `stream`; `None` if it is missing
    /// or is not what the head says it is.
    async fn sealed(
        &self,
        stream: &StreamId,
        entry: &Sealed,
    ) -> Result<Option<Vec<StoredCommit>>, StoreError> {
        let key = self.sealed_key(stream, entry.first, entry.last);
        let Some(bytes) = self.get_bytes_if_any(&key).await? else {
            tracing::warn!(
                key,
                "a segment the head lists is missing: reading the commits"
            );
            return Ok(None);
        };
        let checked = if sha256(&bytes) != entry.sha256 {
            Err("its digest is not the head's".to_owned())
        } else {
            serde_json::from_slice::<Segment>(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|s| {
                    let fits = s.stream == *stream
                        && s.commits.len() == entry.commits
                        && s.commits.last().map(StoredCommit::last_revision) == Some(entry.last);
                    if !fits {
                        return Err("it does not hold the range its key names".to_owned());
                    }
                    check_contiguous(stream, entry.first, &s.commits).map_err(|e| e.to_string())?;
                    Ok(s.commits)
                })
        };
        match checked {
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
        let head = self
            .head(stream)
            .await?
            .unwrap_or_else(|| Head::empty(stream));
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
        check_contiguous(stream, covered.next(), &new)?;
        let copied = new.len();
        let Head {
            mut sealed,
            commits: mut open,
            ..
        } = head;
        open.extend(new);
        let mut written = 0;
        while open.len() >= self.segment_commits {
            let rest = open.split_off(self.segment_commits);
            let commits = std::mem::replace(&mut open, rest);
            let (first, last) = (
                commits[0].revision,
                commits[commits.len() - 1].last_revision(),
            );
            let body = Bytes::from(
                serde_json::to_vec(&Segment {
                    stream: stream.clone(),
                    commits,
                })
                .expect("a segment always serializes"),
            );
            let entry = Sealed {
                first,
                last,
                commits: self.segment_commits,
                sha256: sha256(&body),
            };
            self.put_verified(&self.sealed_key(stream, first, last), body)
                .await?;
            sealed.push(entry);
            written += 1;
        }
        let head = Head {
            stream: stream.clone(),
            sealed,
            commits: open,
        };
        // The head is not read back: every reader checks it (it parses, names the
        // stream, and its ranges and commits follow each other from revision 1), and
        // one that fails reads the commits; a second request per compaction would buy
        // nothing those checks do not.
        let body = serde_json::to_vec(&head).expect("a head always serializes");
        self.put(&self.head_key(stream), body.into(), "application/json")
            .await?;
        Ok(Compacted {
            covered: head.covered(),
            commits: copied,
            segments: written + 1,
        })
    }
}
