//! `tally-embedded`: adapters that need no service, for `make dev` and for tests.
//!
//! * [`DirEventStore`] — the event store in a local directory, with exactly the commit
//!   semantics of the S3 store: one file per commit, created only if absent, durable
//!   before the append returns, atomic (a commit is visible whole or not at all).
//! * [`InProcessStream`] — the event stream as a broadcast channel.
//! * [`MemoryReadModel`] and [`MemoryCache`] — the read side in memory, rebuilt from
//!   the store at start-up.

mod cache;
mod dir_store;
mod read_model;
mod stream;

pub use cache::MemoryCache;
pub use dir_store::DirEventStore;
pub use read_model::MemoryReadModel;
pub use stream::{InProcessStream, InProcessSubscription};
