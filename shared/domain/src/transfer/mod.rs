//! The Transfer aggregate: the state of one transfer's saga, its own event stream
//! (`transfer.{id}`) beside the account events it causes.
//!
//! ```text
//! requested ──debit done──▶ debited ──credit done──▶ completed
//!     │                        │
//!     └─debit refused─▶ failed └─credit refused─▶ credit-refused ──refund done──▶ reversed
//! ```
//!
//! The saga (in `tally-app`) runs each step as an account command and records its
//! outcome here; the aggregate only checks that a step fits the state. A refused
//! credit is recorded before the refund is made, so a saga resumed after a crash never
//! credits an account the money was already refunded from.

mod events;
mod id;

pub use events::{chain as event_chain, TransferEvent};
pub use id::{TransferId, TransferIdError};

use crate::{AccountError, AccountId, Amount, Currency};
use tally_es::{Aggregate, Revision};

/// The longest accepted reference, in characters.
pub const REFERENCE_MAX_CHARS: usize = 140;

/// A transfer's reference (free text a client wrote) as stored: sealed under the
/// debited account holder's key (so forgetting the holder erases it), or — written
/// before references were sealed (v1, v2) — in the clear.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Reference {
    Sealed(tally_es::Sealed),
    Legacy(String),
}

/// Where a transfer is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransferStatus {
    /// No event yet.
    #[default]
    NotRequested,
    Requested,
    Debited,
    CreditRefused,
    Completed,
    Failed,
    Reversed,
}

impl TransferStatus {
    /// How the API names it: `pending` until the transfer ends.
    pub fn name(self) -> &'static str {
        match self {
            Self::NotRequested => "not-requested",
            Self::Requested | Self::Debited | Self::CreditRefused => "pending",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Reversed => "reversed",
        }
    }

    /// Whether the transfer has ended (completed, failed or reversed).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Reversed)
    }
}

/// Why a step was refused by an account: the reason a transfer failed or was reversed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferFailure {
    /// `insufficient-funds`, `account-not-found`, `account-closed`,
    /// `currency-mismatch` or `balance-overflow`.
    pub code: String,
    /// The account that refused.
    pub account: AccountId,
    /// The account's words.
    pub detail: String,
}

impl TransferFailure {
    /// What `account` refusing with `error` means for a transfer.
    pub fn of(account: &AccountId, error: &AccountError) -> Self {
        let code = match error {
            AccountError::InsufficientFunds { .. } => "insufficient-funds",
            AccountError::NotFound => "account-not-found",
            AccountError::Closed => "account-closed",
            AccountError::CurrencyMismatch { .. } => "currency-mismatch",
            AccountError::BalanceOverflow => "balance-overflow",
            AccountError::AlreadyOpen
            | AccountError::BalanceNotZero { .. }
            | AccountError::AlreadyForgotten => "refused",
        };
        Self {
            code: code.to_owned(),
            account: account.clone(),
            detail: error.to_string(),
        }
    }
}

/// The state of one transfer, folded from its events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transfer {
    pub id: Option<TransferId>,
    pub status: TransferStatus,
    pub from: Option<AccountId>,
    pub to: Option<AccountId>,
    /// Minor units of `currency`.
    pub amount: i64,
    pub currency: Option<Currency>,
    pub reference: Option<Reference>,
    /// The revisions `from` and `to` were at, at most, when the transfer was requested:
    /// each step's idempotency key cannot have been used at or before it.
    pub from_at_request: Revision,
    pub to_at_request: Revision,
    /// The revisions of `from` and `to` the steps produced.
    pub debit_revision: Option<Revision>,
    pub credit_revision: Option<Revision>,
    pub refund_revision: Option<Revision>,
    /// Why it failed or was reversed.
    pub failure: Option<TransferFailure>,
}

/// What can be asked of a transfer: the request, then the outcome of each step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransferCommand {
    Request {
        id: TransferId,
        from: AccountId,
        to: AccountId,
        amount: Amount,
        /// Sealed by the caller (the API) under the debited account holder's key.
        reference: Option<Reference>,
        /// The revisions `from` and `to` were at, at most, before the request (zero if
        /// unknown; never more than a revision already stored).
        from_at_request: Revision,
        to_at_request: Revision,
    },
    RecordDebit {
        revision: Revision,
    },
    RefuseDebit {
        failure: TransferFailure,
    },
    RecordCredit {
        revision: Revision,
    },
    RefuseCredit {
        failure: TransferFailure,
    },
    RecordRefund {
        revision: Revision,
    },
}

/// Why a transfer command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// 409: the stream already has a request (a retry with the same key is answered
    /// before this, by its idempotency key).
    #[error("this transfer was already requested")]
    AlreadyRequested,
    /// 422: money would not move.
    #[error("a transfer needs two different accounts")]
    SameAccount,
    /// 422.
    #[error("the reference is {0} characters long; at most {REFERENCE_MAX_CHARS} are allowed")]
    ReferenceTooLong(usize),
    /// The step does not fit the state: another saga worker recorded it first.
    #[error("the transfer is {status:?}; this step does not apply")]
    OutOfStep { status: TransferStatus },
}

impl Transfer {
    /// The amount as the account commands take it.
    pub fn amount(&self) -> Option<Amount> {
        Amount::accepted(self.amount, self.currency?)
    }

    fn expect(&self, status: TransferStatus) -> Result<(), TransferError> {
        if self.status == status {
            Ok(())
        } else {
            Err(TransferError::OutOfStep {
                status: self.status,
            })
        }
    }
}

impl Aggregate for Transfer {
    type Command = TransferCommand;
    type Event = TransferEvent;
    type Error = TransferError;

    fn handle(&self, command: TransferCommand) -> Result<Vec<TransferEvent>, TransferError> {
        use TransferStatus as S;
        Ok(vec![match command {
            TransferCommand::Request {
                id,
                from,
                to,
                amount,
                reference,
                from_at_request,
                to_at_request,
            } => {
                if self.status != S::NotRequested {
                    return Err(TransferError::AlreadyRequested);
                }
                if from == to {
                    return Err(TransferError::SameAccount);
                }
                if let Some(Reference::Legacy(text)) = &reference {
                    let length = text.chars().count();
                    if length > REFERENCE_MAX_CHARS {
                        return Err(TransferError::ReferenceTooLong(length));
                    }
                }
                TransferEvent::Requested {
                    id,
                    from,
                    to,
                    amount: amount.minor(),
                    currency: amount.currency(),
                    reference,
                    from_at_request,
                    to_at_request,
                }
            }
            TransferCommand::RecordDebit { revision } => {
                self.expect(S::Requested)?;
                TransferEvent::Debited { revision }
            }
            TransferCommand::RefuseDebit { failure } => {
                self.expect(S::Requested)?;
                TransferEvent::Failed { failure }
            }
            TransferCommand::RecordCredit { revision } => {
                self.expect(S::Debited)?;
                TransferEvent::Credited { revision }
            }
            TransferCommand::RefuseCredit { failure } => {
                self.expect(S::Debited)?;
                TransferEvent::CreditRefused { failure }
            }
            TransferCommand::RecordRefund { revision } => {
                self.expect(S::CreditRefused)?;
                TransferEvent::Reversed { revision }
            }
        }])
    }

    fn apply(&mut self, event: &TransferEvent) {
        use TransferStatus as S;
        match event {
            TransferEvent::Requested {
                id,
                from,
                to,
                amount,
                currency,
                reference,
                from_at_request,
                to_at_request,
            } => {
                self.id = Some(id.clone());
                self.from = Some(from.clone());
                self.to = Some(to.clone());
                self.amount = *amount;
                self.currency = Some(*currency);
                self.reference = reference.clone();
                self.from_at_request = *from_at_request;
                self.to_at_request = *to_at_request;
                self.status = S::Requested;
            }
            TransferEvent::Debited { revision } => {
                self.debit_revision = Some(*revision);
                self.status = S::Debited;
            }
            TransferEvent::Failed { failure } => {
                self.failure = Some(failure.clone());
                self.status = S::Failed;
            }
            TransferEvent::Credited { revision } => {
                self.credit_revision = Some(*revision);
                self.status = S::Completed;
            }
            TransferEvent::CreditRefused { failure } => {
                self.failure = Some(failure.clone());
                self.status = S::CreditRefused;
            }
            TransferEvent::Reversed { revision } => {
                self.refund_revision = Some(*revision);
                self.status = S::Reversed;
            }
        }
    }
}
