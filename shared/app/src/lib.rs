//! `tally-app`: the application layer between the HTTP edge and the adapters.
//!
//! * [`commands::CommandHandler`] — load → decide → conditional append, retried on
//!   conflict, idempotent by `Idempotency-Key`, guarded by `If-Match`; generic over any
//!   [`tally_es::Aggregate`].
//! * [`projection::Projector`] — applies commits to the read model exactly once, in
//!   revision order, repairing gaps from the store; then writes the cache through.
//! * [`queries::Queries`] — cache → read model → store.
//! * [`ports`] — the read-model and cache ports (the event store and publisher ports are
//!   in `tally-es`).
//!
//! No HTTP here and no concrete backend: adapters come in through the ports.

pub mod commands;
mod locks;
pub mod ports;
pub mod projection;
pub mod queries;

pub use commands::{CommandContext, CommandError, CommandHandler, Executed};
pub use ports::{
    AccountView, Applied, Cache, CachedBalance, ReadModel, ReadModelError, TransactionKind,
    TransactionView,
};
pub use projection::{ProjectionError, Projector, RebuildReport};
pub use queries::{BalanceView, Queries, QueryError};
