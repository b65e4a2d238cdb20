//! `tally-domain`: the account domain, Tally's first user of the `tally-es` toolkit.
//!
//! **Architecture invariant:** this crate does no IO and knows nothing of HTTP, Lambda,
//! S3, Kafka, SQL or Redis. Adapters depend on it, never the reverse. Its dependency
//! tree is checked by a test (`the_domain_crate_depends_on_no_io_crate`).
//!
//! * [`AccountId`], [`Amount`], [`Money`], [`Currency`], [`IdempotencyKey`] — parsed
//!   newtypes: once you hold one, it is valid.
//! * [`account::Account`] — the aggregate: one file per command under `account/`.
//! * [`transfer::Transfer`] — a transfer's saga state, its own stream `transfer.{id}`.

pub mod account;
mod id;
mod idempotency;
mod money;
mod owner;
pub mod transfer;

pub use account::{Account, AccountCommand, AccountError, AccountEvent, AccountStatus};
pub use id::{AccountId, AccountIdError};
pub use idempotency::{IdempotencyKey, IdempotencyKeyError};
pub use money::{Amount, AmountError, AmountPolicy, Currency, CurrencyError, Money};
pub use owner::{Caller, Owner, OwnerError, OWNER_MAX_LEN};
pub use tally_es::Revision;
/// Check the upcaster chain of every event family (no gap, no cycle): what every
/// function does at start-up, before it reads an event.
pub fn check_event_schemas() -> Result<(), tally_es::ChainError> {
    account::event_chain()?;
    transfer::event_chain()?;
    Ok(())
}

pub use transfer::{
    Reference, Transfer, TransferCommand, TransferError, TransferEvent, TransferFailure,
    TransferId, TransferStatus,
};
