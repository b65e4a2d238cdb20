//! The packer, and the rebuild's reading through packs (`tally_es::packs`): many
//! streams' history in one object, whole up to marks on the commit topic, so that a
//! rebuild reads the newest pack and then only the streams the topic's tail or the
//! outbox name — not one request or two per stream.
//!
//! The packer runs in the projector's process, never on the command path: once the
//! topic has been still for [`QUIET`] (or [`AT_MOST`] has gone by since it last packed,
//! so that a busy store's tail stays bounded), it takes the topic's marks, then reads
//! the streams that moved since the newest pack's marks (every stream if there is no
//! pack it can build on) and writes the next pack. A failed round is tried again later;
//! a rebuild that finds no pack it can use reads every stream, as without packs.

use crate::projection::ProjectionError;
use futures::stream::{self, StreamExt, TryStreamExt};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally_es::packs::{Pack, Packs, TopicMarks};
use tally_es::segments::SegmentHead;
use tally_es::{check_contiguous, EventStore, PublishError, StoreError, StoredCommit, StreamId};

/// How long the topic must have been still before a pack is written: longer than the
/// compactor's quiet time, so that the streams are in segments first (a stream's commits
/// outside them cost the packer a request each).
pub const QUIET: Duration = Duration::from_secs(15);

/// A busy topic is packed at least this often.
pub const AT_MOST: Duration = Duration::from_secs(600);

/// How many streams the packer or a rebuild reads at once.
const READ_CONCURRENCY: usize = 16;

/// Why a pack could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("commit topic: {0}")]
    Topic(#[from] PublishError),
}

/// What one packing round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Packed {
    /// Whether a pack was written (`false`: the newest pack already has the topic's end).
    pub written: bool,
    /// Streams in the pack written.
    pub streams: usize,
    /// Streams read from the store for it.
    pub read: usize,
}

/// How one stream is read by a rebuild.
#[derive(Debug)]
pub enum StreamRead {
    /// From the store, whole.
    Whole(StreamId),
    /// From the pack alone: nothing followed it.
    Packed(SegmentHead),
    /// From the pack, then from the store what came after it.
    PackedThenAfter(SegmentHead),
}

impl StreamRead {
    /// The stream it reads.
    pub fn stream(&self) -> &StreamId {
        match self {
            Self::Whole(stream) => stream,
            Self::Packed(head) | Self::PackedThenAfter(head) => &head.stream,
        }
    }
}

/// The topic's ends as the packer last saw them, and since when.
#[derive(Default)]
struct Seen {
    ends: Vec<(i32, i64)>,
    since: Option<Instant>,
    /// The ends when it last packed (or found the newest pack at them), and when (at
    /// first, when it first looked).
    packed: Vec<(i32, i64)>,
    packed_at: Option<Instant>,
}

/// Writes packs of the streams `wanted` picks, and reads them for a rebuild.
pub struct Packer {
    store: Arc<dyn EventStore>,
    packs: Arc<dyn Packs>,
    topic: Arc<dyn TopicMarks>,
    wanted: fn(&StreamId) -> bool,
    seen: Mutex<Seen>,
    quiet: Duration,
    at_most: Duration,
}

impl Packer {
    pub fn new(
        store: Arc<dyn EventStore>,
        packs: Arc<dyn Packs>,
        topic: Arc<dyn TopicMarks>,
        wanted: fn(&StreamId) -> bool,
    ) -> Self {
        Self {
            store,
            packs,
            topic,
            wanted,
            seen: Mutex::default(),
            quiet: QUIET,
            at_most: AT_MOST,
        }
    }

    /// Wait `quiet` instead of [`QUIET`] for a still topic.
    pub fn with_quiet(mut self, quiet: Duration) -> Self {
        self.quiet = quiet;
        self
    }

    /// Pack at least every `at_most` instead of [`AT_MOST`] while the topic moves.
    pub fn with_at_most(mut self, at_most: Duration) -> Self {
        self.at_most = at_most;
        self
    }

    /// Whether the topic has moved past the newest pack this packer knows of.
    pub fn behind(&self) -> bool {
        let seen = self.seen.lock().expect("packer poisoned");
        seen.ends != seen.packed
    }

    /// Look at the topic; pack if it has been still for the quiet time (or long enough
    /// has gone by) and moved since the last pack. `None`: not due.
    pub async fn tick(&self) -> Result<Option<Packed>, PackError> {
        let ends = self.topic.ends().await?;
        let now = Instant::now();
        {
            let mut seen = self.seen.lock().expect("packer poisoned");
            if seen.ends != ends || seen.since.is_none() {
                seen.ends = ends.clone();
                seen.since = Some(now);
            }
            // Counted from the first look when it has not packed yet.
            let packed_at = *seen.packed_at.get_or_insert(now);
            let still = seen.since.is_some_and(|t| now - t >= self.quiet);
            let overdue = now - packed_at >= self.at_most;
            if seen.packed == ends || !(still || overdue) {
                return Ok(None);
            }
        }
        let packed = self.round().await?;
        let mut seen = self.seen.lock().expect("packer poisoned");
        seen.packed = ends;
        seen.packed_at = Some(now);
        Ok(Some(packed))
    }

    /// One round: the topic's marks, then the streams that moved since the newest
    /// pack's (every stream, when there is none to build on), and the next pack.
    pub async fn round(&self) -> Result<Packed, PackError> {
        // The marks first: a commit published below one was appended before any of the
        // streams below is read.
        let marks = self.topic.marks().await?;
        let latest = self
            .packs
            .latest_pack()
            .await?
            .filter(|p| p.topic == self.topic.topic());
        let (mut pack, moved) = match latest {
            Some(p) if p.marks == marks => {
                return Ok(Packed {
                    written: false,
                    streams: p.streams.len(),
                    read: 0,
                })
            }
            Some(p) => match self.topic.streams_since(&p.marks).await? {
                Some(moved) => (p, Some(moved)),
                None => {
                    tracing::warn!(
                        "the newest pack's marks are not on the topic: packing every stream"
                    );
                    (Pack::default(), None)
                }
            },
            None => (Pack::default(), None),
        };
        let streams: Vec<StreamId> = match moved {
            Some(moved) => moved.into_iter().collect(),
            None => self.store.streams().await?,
        };
        let streams: Vec<StreamId> = streams.into_iter().filter(|s| (self.wanted)(s)).collect();
        let read = streams.len();
        let heads: Vec<SegmentHead> = stream::iter(streams)
            .map(|s| async move { self.packs.pack_head(&s).await })
            .buffer_unordered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        for head in heads {
            if head.covered() > tally_es::Revision::ZERO {
                pack.set(head);
            }
        }
        pack.topic = self.topic.topic().to_owned();
        pack.marks = marks;
        self.packs.put_pack(&pack).await?;
        Ok(Packed {
            written: true,
            streams: pack.streams.len(),
            read,
        })
    }

    /// How a rebuild reads every stream `wanted` picks, from the newest pack: `None` when
    /// there is none it can use (the rebuild reads every stream from the store).
    ///
    /// Sound because every commit that exists now is in the pack, or was published at or
    /// after its marks (the topic's tail, read to its end after the outbox, names its
    /// stream), or is not published yet (its outbox entry, recorded before its append and
    /// forgotten after its publish, names it).
    pub async fn plan(&self) -> Option<Vec<StreamRead>> {
        match self.try_plan().await {
            Ok(plan) => plan,
            Err(e) => {
                tracing::warn!(error = %e, "the pack cannot be used: reading every stream");
                None
            }
        }
    }

    async fn try_plan(&self) -> Result<Option<Vec<StreamRead>>, PackError> {
        let pending = self.packs.unpublished_streams().await?;
        let Some(pack) = self.packs.latest_pack().await? else {
            return Ok(None);
        };
        if pack.topic != self.topic.topic() {
            return Ok(None);
        }
        let Some(moved) = self.topic.streams_since(&pack.marks).await? else {
            tracing::warn!("the newest pack's marks are not on the topic: reading every stream");
            return Ok(None);
        };
        let mut read: Vec<StreamRead> = moved
            .union(&pending)
            .filter(|s| (self.wanted)(s) && pack.stream(s).is_none())
            .map(|s| StreamRead::Whole(s.clone()))
            .collect();
        for head in pack.streams {
            if !(self.wanted)(&head.stream) {
                continue;
            }
            if moved.contains(&head.stream) || pending.contains(&head.stream) {
                read.push(StreamRead::PackedThenAfter(head));
            } else {
                read.push(StreamRead::Packed(head));
            }
        }
        Ok(Some(read))
    }

    /// Every commit of one stream, as `read` says to read it; from the store, whole, if
    /// the pack's sealed segments do not verify.
    pub async fn read(&self, read: StreamRead) -> Result<Vec<StoredCommit>, ProjectionError> {
        let (head, after) = match read {
            StreamRead::Whole(stream) => {
                return Ok(self.store.read(&stream, tally_es::Revision::new(1)).await?)
            }
            StreamRead::Packed(head) => (head, false),
            StreamRead::PackedThenAfter(head) => (head, true),
        };
        let Some(mut commits) = self.packs.unpack(&head).await? else {
            return Ok(self
                .store
                .read(&head.stream, tally_es::Revision::new(1))
                .await?);
        };
        if after {
            commits.extend(self.store.read_after(&head.stream, head.covered()).await?);
        }
        check_contiguous(&head.stream, tally_es::Revision::new(1), &commits)?;
        Ok(commits)
    }
}
