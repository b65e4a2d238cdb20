//! Packs: many streams' history in one object, with the place on the commit topic up to
//! which it holds every commit — so that a rebuild reads a handful of objects for the
//! whole store, and proves that nothing follows a packed stream without a request per
//! stream.
//!
//! A pack ([`Pack`]) holds, for each stream it packs, the stream as a segment head does
//! ([`SegmentHead`]: its sealed segments by reference, and every commit after them), and
//! for each partition of the commit topic a [`Mark`]: an offset such that every commit
//! published below it is in the pack. The packer ([`Packs`], [`TopicMarks`]; driven by
//! `tally_app::packing`) reads the marks *before* the streams, so a commit published
//! below a mark was appended before the packer read its stream.
//!
//! What a reader may conclude: every commit that exists when the reader starts is in the
//! pack, or on the topic at or after a mark (published since: its stream is named by a
//! message the reader reads from the marks to the end), or not yet published — and then
//! its outbox entry, recorded before the append and forgotten only after the publish, is
//! pending. So only the streams the topic's tail or the outbox name are read from the
//! store. A mark carries the stream and revision of the message just before it, so a
//! topic recreated (or truncated by retention) under the same name is noticed, and the
//! pack is not used.
//!
//! Packs are a faster copy, never the truth: a pack that does not verify (its digest, or
//! one of its heads), or whose marks the topic does not bear out, is passed over and the
//! reader reads every stream from the store.

use crate::segments::SegmentHead;
use crate::{PublishError, Revision, StoreError, StreamId};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;

/// A place on one partition of the commit topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub partition: i32,
    /// Every commit published on the partition below this offset is in the pack.
    pub offset: i64,
    /// The stream and revision of the message at `offset - 1` (`None` at offset 0):
    /// what a reader checks to know the topic is still the one the pack was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<(StreamId, Revision)>,
}

/// Many streams' history and the topic marks up to which it is whole.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Pack {
    /// The commit topic the marks are on.
    pub topic: String,
    pub marks: Vec<Mark>,
    /// One head per stream, sorted by stream, each holding every commit after its
    /// sealed segments.
    pub streams: Vec<SegmentHead>,
}

impl Pack {
    /// The bytes to store, and their SHA-256 (hex), which names them.
    pub fn to_bytes(&self) -> (Vec<u8>, String) {
        let bytes = serde_json::to_vec(self).expect("a pack always serializes");
        let digest = sha256(&bytes);
        (bytes, digest)
    }

    /// The pack in `bytes`, if it is one: the digest is `sha256`, it parses, and each of
    /// its heads is a head of its stream (see [`SegmentHead::parse`]), each stream once.
    pub fn parse(bytes: &[u8], sha256_hex: &str) -> Result<Self, String> {
        if sha256(bytes) != sha256_hex {
            return Err("its digest is not the one its name gives".into());
        }
        let pack: Self = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let mut seen = BTreeSet::new();
        for head in &pack.streams {
            if !seen.insert(head.stream.clone()) {
                return Err(format!("stream `{}` is in it twice", head.stream));
            }
            head.check()
                .map_err(|why| format!("stream `{}`: {why}", head.stream))?;
        }
        Ok(pack)
    }

    /// The head of `stream` in the pack.
    pub fn stream(&self, stream: &StreamId) -> Option<&SegmentHead> {
        self.streams
            .binary_search_by(|h| h.stream.cmp(stream))
            .ok()
            .map(|i| &self.streams[i])
    }

    /// Put `head` in place of the stream's head (or add it), keeping the order.
    pub fn set(&mut self, head: SegmentHead) {
        match self
            .streams
            .binary_search_by(|h| h.stream.cmp(&head.stream))
        {
            Ok(i) => self.streams[i] = head,
            Err(i) => self.streams.insert(i, head),
        }
    }
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A store that keeps packs (S3). The streams in a pack are read as the store reads a
/// stream through its segments.
#[async_trait]
pub trait Packs: Send + Sync + 'static {
    /// The newest pack that verifies, if any.
    async fn latest_pack(&self) -> Result<Option<Pack>, StoreError>;
    /// Keep `pack` as the newest (older ones may go).
    async fn put_pack(&self, pack: &Pack) -> Result<(), StoreError>;
    /// Every stream with an outbox entry not done yet, read completely (a listing a
    /// relay makes may leave young entries to their writer; this may not): a commit
    /// appended and not published yet is among them.
    async fn unpublished_streams(&self) -> Result<BTreeSet<StreamId>, StoreError>;
    /// `stream` as the store holds it now: its segment head, with every commit after it.
    async fn pack_head(&self, stream: &StreamId) -> Result<SegmentHead, StoreError>;
    /// Every commit `head` holds, its sealed segments fetched (and checked against it);
    /// `None` if one of them is missing or does not verify (read the stream instead).
    async fn unpack(
        &self,
        head: &SegmentHead,
    ) -> Result<Option<Vec<crate::StoredCommit>>, StoreError>;
}

/// The commit topic's side of a pack (Kafka).
#[async_trait]
pub trait TopicMarks: Send + Sync + 'static {
    /// The topic's name.
    fn topic(&self) -> &str;
    /// Each partition's end now (partition, offset): the cheap question, to tell whether
    /// the topic moved.
    async fn ends(&self) -> Result<Vec<(i32, i64)>, PublishError>;
    /// Each partition's end now, with the message just before it.
    async fn marks(&self) -> Result<Vec<Mark>, PublishError>;
    /// The streams named by the messages from `marks` to each partition's end now; `None`
    /// when the topic does not bear the marks out (a message before a mark is another
    /// than the mark says, or is gone; a partition is missing) — the pack is not whole
    /// for this topic.
    async fn streams_since(
        &self,
        marks: &[Mark],
    ) -> Result<Option<BTreeSet<StreamId>>, PublishError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CommitMetadata, StoredCommit, StoredEvent};

    fn head(stream: &str, commits: u64) -> SegmentHead {
        let stream = StreamId::parse(stream).unwrap();
        let mut head = SegmentHead::empty(&stream);
        head.commits = (1..=commits)
            .map(|r| StoredCommit {
                stream: stream.clone(),
                revision: Revision::new(r),
                events: vec![StoredEvent {
                    event_type: "Noted".into(),
                    version: 1,
                    data: serde_json::json!({"n": r}),
                }],
                metadata: CommitMetadata::default(),
                recorded_at: time::OffsetDateTime::UNIX_EPOCH,
            })
            .collect();
        head
    }

    #[test]
    fn a_pack_reads_back_and_finds_its_streams() {
        let mut pack = Pack {
            topic: "commits".into(),
            marks: vec![Mark {
                partition: 0,
                offset: 7,
                before: Some((StreamId::parse("b").unwrap(), Revision::new(2))),
            }],
            streams: Vec::new(),
        };
        pack.set(head("b", 2));
        pack.set(head("a", 3));
        pack.set(head("b", 4));
        let (bytes, digest) = pack.to_bytes();
        let back = Pack::parse(&bytes, &digest).unwrap();
        assert_eq!(back.marks, pack.marks);
        let names: Vec<&str> = back.streams.iter().map(|h| h.stream.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let b = back.stream(&StreamId::parse("b").unwrap()).unwrap();
        assert_eq!(b.covered(), Revision::new(4));
        assert!(back.stream(&StreamId::parse("c").unwrap()).is_none());
    }

    #[test]
    fn a_pack_that_is_not_what_its_name_says_or_holds_a_broken_head_is_refused() {
        let mut pack = Pack::default();
        pack.set(head("a", 3));
        let (bytes, digest) = pack.to_bytes();
        let mut flipped = bytes.clone();
        let at = flipped.len() / 2;
        flipped[at] ^= 1;
        assert!(Pack::parse(&flipped, &digest).is_err());
        // A head with a hole (revision 2 missing), under a digest that matches.
        pack.streams[0].commits.remove(1);
        let (bytes, digest) = pack.to_bytes();
        let why = Pack::parse(&bytes, &digest).unwrap_err();
        assert!(why.contains("stream `a`"), "{why}");
        // A stream twice.
        let twice = Pack {
            streams: vec![head("a", 1), head("a", 1)],
            ..Pack::default()
        };
        let (bytes, digest) = twice.to_bytes();
        assert!(Pack::parse(&bytes, &digest).unwrap_err().contains("twice"));
    }
}
