//! `tally-app`: the application layer between the HTTP edge and the adapters.
//!
//! * [`commands::CommandHandler`] — load → decide → conditional append, retried on
//!   conflict, idempotent by `Idempotency-Key`, guarded by `If-Match`; generic over any
//!   [`tally_es::Aggregate`].
//! * [`projection::Projector`] — applies commits to the read model exactly once, in
//!   revision order, repairing gaps from the store; then writes the cache through.
//! * [`queries::Queries`] — cache → read model → store; as-of balances from the store.
//! * [`history`] — a stream's state at a past revision, folded from the store.
//! * [`transfers::Saga`] — transfers: the request, the view, and the saga that moves
//!   the money between accounts step by step, each step an idempotent account command.
//! * [`compaction::Compactor`] — copies streams' commits into segments in the
//!   background, as they grow (for stores that keep history in segments).
//! * [`relay::Relay`] — publishes what the outbox still holds: commits a crash or a
//!   broker outage kept from the stream.
//! * [`ports`] — the read-model and cache ports (the event store and publisher ports are
//!   in `tally-es`).
//!
//! No HTTP here and no concrete backend: adapters come in through the ports.

pub mod commands;
pub mod compaction;
pub mod faults;
pub mod history;
mod locks;
pub mod packing;
pub mod ports;
pub mod projection;
pub mod queries;
pub mod relay;
pub mod transfers;

pub use commands::{CommandContext, CommandError, CommandHandler, Executed, Guard, PublishMode};
pub use compaction::{compact_every_stream, CompactionReport, Compactor};
pub use faults::{Fault, Faults};
pub use ports::{
    AccountView, Applied, Cache, CachedBalance, FillToken, Lookup, ReadModel, ReadModelError,
    RebuildBegun, TransactionKind, TransactionView,
};
pub use projection::{
    BatchReport, ProjectionError, Projector, RebuildReport, PROJECTION_BATCH, REBUILD_BATCH,
    REBUILD_CONCURRENCY,
};
pub use queries::{AsOf, BalanceView, PastBalance, Queries, QueryError, Statement};
pub use relay::{Relay, RelayReport};
pub use transfers::{
    Saga, SagaError, TransferRequest, TransferRequestError, TransferStep, TransferView,
};
