//! Transfer events and their stored schema.
//!
//! | type                     | payload                                                          |
//! | ------------------------ | ---------------------------------------------------------------- |
//! | `TransferRequested` v2   | `{"id", "from", "to", "amount": 2500, "currency": "USD", "reference", "from_at_request": 41, "to_at_request": 7}` |
//! | `TransferRequested` v1   | as v2 without the two revisions (read as zero)                   |
//! | `TransferDebited`        | `{"revision": 7}` (of `from`)                                    |
//! | `TransferFailed`         | `{"code", "account", "detail"}` (the debit was refused)          |
//! | `TransferCredited`       | `{"revision": 3}` (of `to`)                                      |
//! | `TransferCreditRefused`  | `{"code", "account", "detail"}`                                  |
//! | `TransferReversed`       | `{"revision": 8}` (the refund's, of `from`)                      |

use super::{TransferFailure, TransferId};
use crate::{AccountId, Currency};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tally_es::{DecodeError, DomainEvent, Revision};

/// Something that happened to a transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransferEvent {
    Requested {
        id: TransferId,
        from: AccountId,
        to: AccountId,
        amount: i64,
        currency: Currency,
        reference: String,
        /// The revisions `from` and `to` were at, at most, when the transfer was
        /// requested (zero if unknown): every step on each comes after it, so a step's
        /// idempotency key is looked up exactly however many commands came since.
        from_at_request: Revision,
        to_at_request: Revision,
    },
    Debited {
        revision: Revision,
    },
    Failed {
        failure: TransferFailure,
    },
    Credited {
        revision: Revision,
    },
    CreditRefused {
        failure: TransferFailure,
    },
    Reversed {
        revision: Revision,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestedV1 {
    id: TransferId,
    from: AccountId,
    to: AccountId,
    amount: i64,
    currency: Currency,
    reference: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestedV2 {
    id: TransferId,
    from: AccountId,
    to: AccountId,
    amount: i64,
    currency: Currency,
    reference: String,
    from_at_request: Revision,
    to_at_request: Revision,
}

impl From<RequestedV1> for RequestedV2 {
    /// A v1 request said nothing of the accounts' revisions: zero, the whole stream.
    fn from(v: RequestedV1) -> Self {
        Self {
            id: v.id,
            from: v.from,
            to: v.to,
            amount: v.amount,
            currency: v.currency,
            reference: v.reference,
            from_at_request: Revision::ZERO,
            to_at_request: Revision::ZERO,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepV1 {
    revision: Revision,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefusedV1 {
    code: String,
    account: AccountId,
    detail: String,
}

impl From<RefusedV1> for TransferFailure {
    fn from(v: RefusedV1) -> Self {
        Self {
            code: v.code,
            account: v.account,
            detail: v.detail,
        }
    }
}

fn refused(failure: &TransferFailure) -> Value {
    json!(RefusedV1 {
        code: failure.code.clone(),
        account: failure.account.clone(),
        detail: failure.detail.clone(),
    })
}

const TYPES: [&str; 6] = [
    "TransferRequested",
    "TransferDebited",
    "TransferFailed",
    "TransferCredited",
    "TransferCreditRefused",
    "TransferReversed",
];

impl DomainEvent for TransferEvent {
    fn event_type(&self) -> &'static str {
        TYPES[match self {
            Self::Requested { .. } => 0,
            Self::Debited { .. } => 1,
            Self::Failed { .. } => 2,
            Self::Credited { .. } => 3,
            Self::CreditRefused { .. } => 4,
            Self::Reversed { .. } => 5,
        }]
    }

    fn schema_version(&self) -> u32 {
        match self {
            Self::Requested { .. } => 2,
            _ => 1,
        }
    }

    fn encode(&self) -> Value {
        match self {
            Self::Requested {
                id,
                from,
                to,
                amount,
                currency,
                reference,
                from_at_request,
                to_at_request,
            } => json!(RequestedV2 {
                id: id.clone(),
                from: from.clone(),
                to: to.clone(),
                amount: *amount,
                currency: *currency,
                reference: reference.clone(),
                from_at_request: *from_at_request,
                to_at_request: *to_at_request,
            }),
            Self::Debited { revision }
            | Self::Credited { revision }
            | Self::Reversed { revision } => {
                json!(StepV1 {
                    revision: *revision
                })
            }
            Self::Failed { failure } | Self::CreditRefused { failure } => refused(failure),
        }
    }

    fn decode(event_type: &str, version: u32, data: Value) -> Result<Self, DecodeError> {
        if !TYPES.contains(&event_type) {
            return Err(DecodeError::UnknownType(event_type.to_owned()));
        }
        let newest = if event_type == "TransferRequested" {
            2
        } else {
            1
        };
        if !(1..=newest).contains(&version) {
            return Err(DecodeError::UnsupportedVersion {
                event_type: event_type.to_owned(),
                version,
            });
        }
        let step =
            |data| DecodeError::payload::<StepV1>(event_type, version, data).map(|s| s.revision);
        let failure =
            |data| DecodeError::payload::<RefusedV1>(event_type, version, data).map(Into::into);
        Ok(match event_type {
            "TransferRequested" => {
                let p: RequestedV2 = if version == 1 {
                    DecodeError::payload::<RequestedV1>(event_type, version, data)?.into()
                } else {
                    DecodeError::payload(event_type, version, data)?
                };
                Self::Requested {
                    id: p.id,
                    from: p.from,
                    to: p.to,
                    amount: p.amount,
                    currency: p.currency,
                    reference: p.reference,
                    from_at_request: p.from_at_request,
                    to_at_request: p.to_at_request,
                }
            }
            "TransferDebited" => Self::Debited {
                revision: step(data)?,
            },
            "TransferFailed" => Self::Failed {
                failure: failure(data)?,
            },
            "TransferCredited" => Self::Credited {
                revision: step(data)?,
            },
            "TransferCreditRefused" => Self::CreditRefused {
                failure: failure(data)?,
            },
            _ => Self::Reversed {
                revision: step(data)?,
            },
        })
    }
}
