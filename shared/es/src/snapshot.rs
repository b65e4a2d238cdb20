//! Snapshots: an aggregate's state at a revision, so a long stream loads in a few
//! requests. A snapshot is a cache of the stream, never the truth: one that is missing,
//! unreadable or of another schema is ignored and the stream is replayed.

use crate::{Revision, StoreError, StreamId};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

/// An idempotency key remembered across a snapshot: the key, the request it came with,
/// and the revision of the commit that answered it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RememberedKey {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    pub revision: Revision,
}

/// The state of one stream after its event at `revision`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub stream: StreamId,
    pub revision: Revision,
    /// The aggregate's snapshot schema (see [`crate::Aggregate::SNAPSHOT_SCHEMA`]).
    pub schema: String,
    pub state: Value,
    /// The most recent idempotency keys of the stream, oldest first.
    #[serde(default)]
    pub idempotency: Vec<RememberedKey>,
    #[serde(with = "time::serde::rfc3339")]
    pub taken_at: OffsetDateTime,
}

impl Snapshot {
    /// Serialize to the bytes that are stored.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a snapshot always serializes")
    }

    /// Parse stored bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Where snapshots are kept.
#[async_trait]
pub trait SnapshotStore: Send + Sync + 'static {
    /// The newest snapshot of `stream`, if any. An unreadable snapshot reads as none.
    async fn latest(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError>;
    /// Keep `snapshot` (and drop older ones of its stream, if the store wants to).
    async fn save(&self, snapshot: &Snapshot) -> Result<(), StoreError>;
}
