//! `tally-es`: the reusable event-sourcing toolkit under Tally.
//!
//! It knows nothing of bank accounts, HTTP, Lambda, S3, Kafka, SQL or Redis:
//!
//! * [`Aggregate`] — decide in [`Aggregate::handle`], change state in [`Aggregate::apply`];
//! * [`DomainEvent`] — every stored event carries its type name and schema version, and
//!   old versions climb an [`Upcasters`] chain (checked when built: no gap, no cycle)
//!   in [`decode_event`], the one function every read path decodes through;
//! * [`StoredCommit`] / [`Commit`] — the unit of atomic append: one object, one or more
//!   events, the stream revision of its first event, and metadata;
//! * [`StreamId`] and [`Revision`] — parsed newtypes: a stream id that reaches a storage
//!   key has passed [`StreamId::parse`];
//! * the ports [`EventStore`], [`EventPublisher`] and [`EventStream`] (with
//!   [`Subscription`]), implemented by adapter crates;
//! * [`segments`] — history in segments (the [`Compact`] port): the layout and its
//!   checks, shared by the stores that keep one;
//! * [`packs`] — many streams' history in one object, with the commit topic's marks up
//!   to which it is whole (the [`packs::Packs`] and [`packs::TopicMarks`] ports): what a
//!   rebuild reads instead of every stream;
//! * [`testing`] — a given/when/then harness for any aggregate.

mod aggregate;
mod commit;
#[cfg(feature = "conformance")]
pub mod conformance;
mod event;
mod ids;
pub mod packs;
mod sealed;
pub mod segments;
mod snapshot;
mod store;
pub mod testing;
mod upcast;

pub use aggregate::Aggregate;
pub use commit::{Commit, CommitMetadata, StoredCommit, StoredEvent};
pub use event::{DecodeError, DomainEvent};
pub use ids::{Revision, RevisionParseError, StreamId, StreamIdError, STREAM_ID_MAX_LEN};
pub use sealed::Sealed;
pub use snapshot::{RememberedKey, Snapshot, SnapshotStore};
pub use store::{
    check_contiguous, error_chain, outbox_name, AppendError, Compact, Compacted, Delivery,
    EventPublisher, EventStore, EventStream, KeyStore, Outbox, OutboxEntry, PublishError,
    RecentCommits, Revocations, StoreError, StreamTurns, Subscription, TurnsWithRecent,
};
pub use upcast::{decode_event, ChainError, Upcaster, Upcasters};
