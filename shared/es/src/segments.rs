//! History in segments, as a store keeps it (the [`crate::Compact`] port): the layout
//! and its checks, shared by the stores that implement it; each store does its own IO.
//!
//! A stream's segments are a *head* and *sealed* segments. A sealed segment holds
//! exactly a store's segment size in commits (256 by default: [`SEGMENT_COMMITS`]) —
//! the stream's first run of that many, its second, … — so where segments begin is a
//! function of the stream's immutable history, and two compactors that seal one run
//! write the same bytes ([`sealed_name`] names it by its revisions). The head
//! ([`SegmentHead`], [`HEAD_NAME`]) lists the sealed segments, each with its range, its
//! count and the SHA-256 of its bytes, and holds the commits after the last of them.
//!
//! Segments are a faster copy, never the truth: a reader checks the head
//! ([`SegmentHead::parse`]) and each sealed segment against the head
//! ([`open_sealed`]), and reads the commits instead when either fails.

use crate::{check_contiguous, Revision, StoreError, StoredCommit, StreamId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How many commits a sealed segment holds, unless a store is told otherwise.
pub const SEGMENT_COMMITS: usize = 256;

/// The head's name in a stream's segments.
pub const HEAD_NAME: &str = "head.json";

/// A sealed segment's name in a stream's segments: `{first:020}-{last:020}.json`.
pub fn sealed_name(first: Revision, last: Revision) -> String {
    format!("{:020}-{:020}.json", first.get(), last.get())
}

/// A sealed segment as the head lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// The revision of its first commit.
    pub first: Revision,
    /// The last revision of its last commit.
    pub last: Revision,
    /// How many commits it holds.
    pub commits: usize,
    /// The SHA-256 of its bytes, in hex.
    pub sha256: String,
}

impl Sealed {
    /// Its name in the stream's segments.
    pub fn name(&self) -> String {
        sealed_name(self.first, self.last)
    }
}

/// A stream's segment head: its sealed segments in order, and the commits after them.
#[derive(Debug, Serialize, Deserialize)]
pub struct SegmentHead {
    pub stream: StreamId,
    pub sealed: Vec<Sealed>,
    /// The commits after the last sealed segment (fewer than a sealed one holds).
    pub commits: Vec<StoredCommit>,
}

/// A sealed segment's body.
#[derive(Serialize, Deserialize)]
struct Segment {
    stream: StreamId,
    commits: Vec<StoredCommit>,
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl SegmentHead {
    /// The head of a stream with no segments yet.
    pub fn empty(stream: &StreamId) -> Self {
        Self {
            stream: stream.clone(),
            sealed: Vec::new(),
            commits: Vec::new(),
        }
    }

    /// The head of `stream` in `bytes`, if it is one: it parses, names the stream, and
    /// its sealed ranges and commits follow each other from revision 1 without a hole.
    pub fn parse(stream: &StreamId, bytes: &[u8]) -> Result<Self, String> {
        let head: Self = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if &head.stream != stream {
            return Err(format!("it is the head of stream `{}`", head.stream));
        }
        head.check()?;
        Ok(head)
    }

    /// Its sealed ranges and commits follow each other from revision 1 without a hole,
    /// and every commit is of its stream.
    pub fn check(&self) -> Result<(), String> {
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
            check_contiguous(&self.stream, next, &self.commits).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The bytes to store.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a head always serializes")
    }

    /// The last revision the segments hold ([`Revision::ZERO`]: none).
    pub fn covered(&self) -> Revision {
        match (self.commits.last(), self.sealed.last()) {
            (Some(c), _) => c.last_revision(),
            (None, Some(s)) => s.last,
            (None, None) => Revision::ZERO,
        }
    }

    /// The sealed segments that hold revisions at or after `from`.
    pub fn sealed_from(&self, from: Revision) -> Vec<Sealed> {
        self.sealed
            .iter()
            .filter(|s| s.last >= from)
            .cloned()
            .collect()
    }

    /// Take `new`, the commits that follow what the head holds, and seal every
    /// `segment_commits` of the commits after the last sealed segment: returns each
    /// segment sealed, listed already in the head, with the bytes to store under its
    /// [`Sealed::name`] (before the head that lists it).
    pub fn extend(
        &mut self,
        new: Vec<StoredCommit>,
        segment_commits: usize,
    ) -> Result<Vec<(Sealed, Vec<u8>)>, StoreError> {
        if new.is_empty() {
            return Ok(Vec::new());
        }
        check_contiguous(&self.stream, self.covered().next(), &new)?;
        self.commits.extend(new);
        let size = segment_commits.max(1);
        let mut sealed = Vec::new();
        while self.commits.len() >= size {
            let rest = self.commits.split_off(size);
            let commits = std::mem::replace(&mut self.commits, rest);
            let (first, last) = (
                commits[0].revision,
                commits[commits.len() - 1].last_revision(),
            );
            let body = serde_json::to_vec(&Segment {
                stream: self.stream.clone(),
                commits,
            })
            .expect("a segment always serializes");
            let entry = Sealed {
                first,
                last,
                commits: size,
                sha256: sha256(&body),
            };
            self.sealed.push(entry.clone());
            sealed.push((entry, body));
        }
        Ok(sealed)
    }
}

/// The commits of the sealed segment `entry` of `stream` in `bytes`, if they are what
/// the head says: the digest matches, and it holds the stream's run from `entry.first`
/// to `entry.last`, `entry.commits` of them, without a hole.
pub fn open_sealed(
    stream: &StreamId,
    entry: &Sealed,
    bytes: &[u8],
) -> Result<Vec<StoredCommit>, String> {
    if sha256(bytes) != entry.sha256 {
        return Err("its digest is not the head's".into());
    }
    let segment: Segment = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let fits = segment.stream == *stream
        && segment.commits.len() == entry.commits
        && segment.commits.last().map(StoredCommit::last_revision) == Some(entry.last);
    if !fits {
        return Err("it does not hold the range the head names".into());
    }
    check_contiguous(stream, entry.first, &segment.commits).map_err(|e| e.to_string())?;
    Ok(segment.commits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoredEvent;

    fn commit(stream: &StreamId, revision: u64, events: usize) -> StoredCommit {
        StoredCommit {
            stream: stream.clone(),
            revision: Revision::new(revision),
            recorded_at: time::OffsetDateTime::UNIX_EPOCH,
            events: (0..events)
                .map(|i| StoredEvent {
                    event_type: "Probe".into(),
                    version: 1,
                    data: serde_json::json!({ "i": i }),
                })
                .collect(),
            metadata: Default::default(),
        }
    }

    fn run(stream: &StreamId, from: u64, count: usize) -> Vec<StoredCommit> {
        (0..count as u64)
            .map(|i| commit(stream, from + i, 1))
            .collect()
    }

    #[test]
    fn a_head_seals_every_run_of_the_segment_size_and_keeps_the_rest() {
        let s = StreamId::parse("s").unwrap();
        let mut head = SegmentHead::empty(&s);
        assert!(head.extend(run(&s, 1, 3), 4).unwrap().is_empty());
        let sealed = head.extend(run(&s, 4, 6), 4).unwrap();
        let names: Vec<_> = sealed.iter().map(|(e, _)| e.name()).collect();
        assert_eq!(
            names,
            [
                "00000000000000000001-00000000000000000004.json",
                "00000000000000000005-00000000000000000008.json"
            ]
        );
        assert_eq!((head.covered(), head.commits.len()), (Revision::new(9), 1));
        let parsed = SegmentHead::parse(&s, &head.to_bytes()).unwrap();
        assert_eq!(parsed.sealed, head.sealed);
        for (entry, body) in &sealed {
            let commits = open_sealed(&s, entry, body).unwrap();
            assert_eq!(commits.len(), 4);
            assert_eq!(commits[0].revision, entry.first);
        }
    }

    #[test]
    fn sealing_depends_only_on_the_history_not_on_how_it_arrived() {
        let s = StreamId::parse("s").unwrap();
        let mut at_once = SegmentHead::empty(&s);
        let all = at_once.extend(run(&s, 1, 10), 4).unwrap();
        let mut in_steps = SegmentHead::empty(&s);
        let mut steps = in_steps.extend(run(&s, 1, 3), 4).unwrap();
        steps.extend(in_steps.extend(run(&s, 4, 2), 4).unwrap());
        steps.extend(in_steps.extend(run(&s, 6, 5), 4).unwrap());
        assert_eq!(all, steps, "the same sealed bytes");
        assert_eq!(at_once.to_bytes(), in_steps.to_bytes());
    }

    #[test]
    fn what_does_not_follow_or_does_not_match_is_refused() {
        let s = StreamId::parse("s").unwrap();
        let mut head = SegmentHead::empty(&s);
        assert!(head.extend(run(&s, 2, 1), 4).is_err(), "a gap at the start");
        let sealed = head.extend(run(&s, 1, 4), 4).unwrap();
        let (entry, body) = &sealed[0];
        let mut altered = body.clone();
        let at = altered.len() - 10;
        altered[at] ^= 1;
        assert!(open_sealed(&s, entry, &altered).is_err(), "another digest");
        let other = StreamId::parse("other").unwrap();
        assert!(open_sealed(&other, entry, body).is_err(), "another stream");
        assert!(SegmentHead::parse(&other, &head.to_bytes()).is_err());
        assert!(SegmentHead::parse(&s, b"{not json").is_err());
        let mut holed = SegmentHead::empty(&s);
        holed.commits = vec![commit(&s, 1, 1), commit(&s, 3, 1)];
        assert!(SegmentHead::parse(&s, &holed.to_bytes()).is_err(), "a hole");
        let mut several = SegmentHead::empty(&s);
        several
            .extend(vec![commit(&s, 1, 3), commit(&s, 4, 1)], 4)
            .unwrap();
        assert_eq!(several.covered(), Revision::new(4));
    }
}
