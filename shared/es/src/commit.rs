//! Commits: the unit of atomic append.

use crate::{DecodeError, DomainEvent, Revision, StreamId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

/// One event as stored: type name, schema version and payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    #[serde(rename = "type")]
    pub event_type: String,
    pub version: u32,
    pub data: Value,
}

/// What a command carried besides its events.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitMetadata {
    /// The client's `Idempotency-Key`, if it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// A digest of the request the key was first used with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// A unique id of the append attempt that wrote this commit. A writer whose append
    /// failed ambiguously (a timeout, a retried request answered 412) finds out from it
    /// whether the commit in the store is its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_id: Option<String>,
    /// The request id that produced this commit, for tracing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// A commit as the store and the stream carry it: domain-agnostic JSON.
///
/// `revision` is the revision of the first event; the events that follow take the next
/// revisions. The store key of a commit is `(stream, revision)`, so two writers that
/// loaded the same stream revision race for the same key and only one can create it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredCommit {
    pub stream: StreamId,
    pub revision: Revision,
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
    pub events: Vec<StoredEvent>,
    #[serde(default)]
    pub metadata: CommitMetadata,
}

impl StoredCommit {
    /// The revision of the last event of this commit.
    pub fn last_revision(&self) -> Revision {
        self.revision.advance(self.events.len() as u64 - 1)
    }

    /// Serialize to the bytes that are stored.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a commit always serializes")
    }

    /// Parse stored bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// A commit whose events have been decoded (and upcast) into a domain event type.
#[derive(Clone, Debug, PartialEq)]
pub struct Commit<E> {
    pub stream: StreamId,
    pub revision: Revision,
    pub recorded_at: OffsetDateTime,
    pub events: Vec<E>,
    pub metadata: CommitMetadata,
}

impl<E: DomainEvent> Commit<E> {
    /// Build a new commit. Panics if `events` is empty: an empty commit means nothing.
    pub fn new(
        stream: StreamId,
        revision: Revision,
        recorded_at: OffsetDateTime,
        events: Vec<E>,
        metadata: CommitMetadata,
    ) -> Self {
        assert!(!events.is_empty(), "a commit carries at least one event");
        Self {
            stream,
            revision,
            recorded_at,
            events,
            metadata,
        }
    }

    /// The revision of the last event.
    pub fn last_revision(&self) -> Revision {
        self.revision.advance(self.events.len() as u64 - 1)
    }

    /// The events paired with their revisions.
    pub fn numbered(&self) -> impl Iterator<Item = (Revision, &E)> {
        self.events
            .iter()
            .enumerate()
            .map(|(i, e)| (self.revision.advance(i as u64), e))
    }

    /// Encode at the current schema versions.
    pub fn encode(&self) -> StoredCommit {
        StoredCommit {
            stream: self.stream.clone(),
            revision: self.revision,
            recorded_at: self.recorded_at,
            events: self
                .events
                .iter()
                .map(|e| StoredEvent {
                    event_type: e.event_type().to_owned(),
                    version: e.schema_version(),
                    data: e.encode(),
                })
                .collect(),
            metadata: self.metadata.clone(),
        }
    }

    /// Decode, upcasting old schema versions.
    pub fn decode(stored: &StoredCommit) -> Result<Self, DecodeError> {
        let events = stored
            .events
            .iter()
            .map(crate::decode_event)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            stream: stored.stream.clone(),
            revision: stored.revision,
            recorded_at: stored.recorded_at,
            events,
            metadata: stored.metadata.clone(),
        })
    }
}
