//! Transfer events and their stored schema.
//!
//! | type                     | payload                                                          |
//! | ------------------------ | ---------------------------------------------------------------- |
//! | `TransferRequested` v3   | `{"id", "from", "to", "amount": 2500, "currency": "USD", "reference": sealed \| null, "from_at_request": 41, "to_at_request": 7}` |
//! | `TransferRequested` v2   | as v3 with the reference as text (upcast: kept as legacy text, `""` as null) |
//! | `TransferRequested` v1   | as v2 without the two revisions (upcast to zero)                 |
//! | `TransferDebited`        | `{"revision": 7}` (of `from`)                                    |
//! | `TransferFailed`         | `{"code", "account", "detail"}` (the debit was refused)          |
//! | `TransferCredited`       | `{"revision": 3}` (of `to`)                                      |
//! | `TransferCreditRefused`  | `{"code", "account", "detail"}`                                  |
//! | `TransferReversed`       | `{"revision": 8}` (the refund's, of `from`)                      |

use super::{Reference, TransferFailure, TransferId};
use crate::{AccountId, Currency};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::LazyLock;
use tally_es::{ChainError, DecodeError, DomainEvent, Revision, Upcaster, Upcasters};

/// Something that happened to a transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransferEvent {
    Requested {
        id: TransferId,
        from: AccountId,
        to: AccountId,
        amount: i64,
        currency: Currency,
        reference: Option<Reference>,
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
struct RequestedV3 {
    id: TransferId,
    from: AccountId,
    to: AccountId,
    amount: i64,
    currency: Currency,
    reference: Option<Reference>,
    from_at_request: Revision,
    to_at_request: Revision,
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

/// Every transfer event type: the first schema version ever stored, the current one.
pub const TYPES: &[(&str, u32, u32)] = &[
    ("TransferRequested", 1, 3),
    ("TransferDebited", 1, 1),
    ("TransferFailed", 1, 1),
    ("TransferCredited", 1, 1),
    ("TransferCreditRefused", 1, 1),
    ("TransferReversed", 1, 1),
];

/// The upcasters of transfer events.
pub const STEPS: &[Upcaster] = &[
    Upcaster {
        event_type: "TransferRequested",
        from: 1,
        to: 2,
        upcast: requested_v1_to_v2,
    },
    Upcaster {
        event_type: "TransferRequested",
        from: 2,
        to: 3,
        upcast: requested_v2_to_v3,
    },
];

/// `TransferRequested` v2 → v3: the reference was text in the clear; it stays so
/// (legacy), an empty one becomes none.
fn requested_v2_to_v3(mut data: Value) -> Result<Value, String> {
    let fields = data.as_object_mut().ok_or("not an object")?;
    match fields.get("reference") {
        Some(Value::String(text)) if text.is_empty() => {
            fields.insert("reference".into(), Value::Null);
        }
        Some(Value::String(_)) => {}
        _ => return Err("a v2 reference is text".into()),
    }
    Ok(data)
}

/// `TransferRequested` v1 → v2: a v1 request said nothing of the accounts' revisions:
/// zero, the whole stream.
fn requested_v1_to_v2(mut data: Value) -> Result<Value, String> {
    let fields = data.as_object_mut().ok_or("not an object")?;
    for field in ["from_at_request", "to_at_request"] {
        if fields.insert(field.to_owned(), json!(0)).is_some() {
            return Err(format!("a v1 payload has no `{field}`"));
        }
    }
    Ok(data)
}

/// The chain of transfer events, checked: what every function checks at start-up.
pub fn chain() -> Result<Upcasters, ChainError> {
    Upcasters::new(TYPES, STEPS)
}

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
        .0
    }

    fn schema_version(&self) -> u32 {
        match self {
            Self::Requested { .. } => 3,
            _ => 1,
        }
    }

    fn upcasters() -> &'static Upcasters {
        static CHAIN: LazyLock<Upcasters> =
            LazyLock::new(|| chain().expect("the transfer event chain is checked at start-up"));
        &CHAIN
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
            } => json!(RequestedV3 {
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
        let Some(&(_, _, current)) = TYPES.iter().find(|(t, _, _)| *t == event_type) else {
            return Err(DecodeError::UnknownType(event_type.to_owned()));
        };
        if version != current {
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
                let p: RequestedV3 = DecodeError::payload(event_type, version, data)?;
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
