//! The aggregate contract.

use crate::DomainEvent;

/// A consistency boundary whose state is the left fold of its events.
///
/// Business rules live in [`handle`](Aggregate::handle), which only *decides*: it returns
/// the events a command produces, or a domain error, and never mutates. State changes
/// live in [`apply`](Aggregate::apply), which must be total: an event that was stored is
/// a fact, so applying it cannot fail.
pub trait Aggregate: Default + Clone + Send + Sync + 'static {
    /// What a caller asks for.
    type Command;
    /// What happened.
    type Event: DomainEvent;
    /// Why a command was refused.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decide which events `command` produces against the current state.
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Apply one event to the state.
    fn apply(&mut self, event: &Self::Event);

    /// The schema of this aggregate's snapshots; change it whenever the snapshot form
    /// changes, and old snapshots are ignored. `None`: this aggregate is never
    /// snapshotted.
    const SNAPSHOT_SCHEMA: Option<&'static str> = None;

    /// The state as a snapshot (only called when `SNAPSHOT_SCHEMA` is set).
    fn to_snapshot(&self) -> Option<serde_json::Value> {
        None
    }

    /// The state back from a snapshot of the current schema.
    fn from_snapshot(_value: serde_json::Value) -> Option<Self> {
        None
    }

    /// Fold a sequence of events onto the default state.
    fn replay<'a>(events: impl IntoIterator<Item = &'a Self::Event>) -> Self {
        let mut state = Self::default();
        for event in events {
            state.apply(event);
        }
        state
    }
}
