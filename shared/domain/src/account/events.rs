//! Account events and their stored schema.
//!
//! | type             | version | payload                                  |
//! | ---------------- | ------- | ---------------------------------------- |
//! | `AccountOpened`  | 2       | `{"id": "...", "currency": "USD", "owner": "sub" \| null, "holder": sealed \| null}` |
//! | `AccountOpened`  | 1       | `{"id": "...", "currency": "USD"}` — upcast to v2 with no owner and no holder |
//! | `Deposited`      | 1       | `{"amount": 50000, "balance": 50000}`    |
//! | `Withdrawn`      | 1       | `{"amount": 15000, "balance": 35000}`    |
//! | `AccountClosed`  | 1       | `{}`                                     |
//! | `HolderForgotten` | 1      | `{"balance": 3000}` — the holder's key was destroyed: their details are erased; the balance is unchanged |
//! | `TransferredOut`, `TransferredIn`, `TransferRefunded` | 1 | `{"transfer": "…", "counterparty": "b", "amount": 2500, "balance": 7500}` |
//!
//! A transfer's movements name the transfer and the other account: the debited
//! account's counterparty is the credited one, and the other way round; a refund's is
//! the account that refused the credit.
//! Amounts and balances are integer minor units of the account's currency. Each event
//! carries the balance after it, so projections stay dumb. The owner is the subject that
//! opened the account (none before owners were recorded); the holder's details are
//! sealed under the holder's key ([`Sealed`]), never stored in the clear.
//!
//! A new schema version bumps the type's current version in [`TYPES`], adds an
//! [`Upcaster`] from the old payload to [`STEPS`], and a fixture of the old version under
//! `tests/fixtures/` that stays forever; [`AccountEvent::decode`] reads current payloads
//! only.

use crate::Owner;
use crate::{AccountId, Currency, TransferId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::LazyLock;
use tally_es::{ChainError, DecodeError, DomainEvent, Sealed, Upcaster, Upcasters};

/// Something that happened to an account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccountEvent {
    Opened {
        id: AccountId,
        currency: Currency,
        /// The subject that opened it; `None` for accounts opened before owners were
        /// recorded (v1).
        owner: Option<Owner>,
        /// The holder's details, sealed under the holder's key.
        holder: Option<Sealed>,
    },
    Deposited {
        amount: i64,
        balance: i64,
    },
    Withdrawn {
        amount: i64,
        balance: i64,
    },
    Closed,
    /// The holder's personal data was forgotten: the key it was sealed under is
    /// destroyed, so the sealed `holder` of the opening reads as erased everywhere.
    /// Carries the balance (unchanged), as every event after the opening does.
    HolderForgotten {
        balance: i64,
    },
    TransferredOut {
        transfer: TransferId,
        counterparty: AccountId,
        amount: i64,
        balance: i64,
    },
    TransferredIn {
        transfer: TransferId,
        counterparty: AccountId,
        amount: i64,
        balance: i64,
    },
    TransferRefunded {
        transfer: TransferId,
        counterparty: AccountId,
        amount: i64,
        balance: i64,
    },
}

impl AccountEvent {
    /// The money this event moved and the balance after it, if it moved any.
    pub fn movement(&self) -> Option<(i64, i64)> {
        match self {
            Self::Deposited { amount, balance }
            | Self::Withdrawn { amount, balance }
            | Self::TransferredOut {
                amount, balance, ..
            }
            | Self::TransferredIn {
                amount, balance, ..
            }
            | Self::TransferRefunded {
                amount, balance, ..
            } => Some((*amount, *balance)),
            Self::Opened { .. } | Self::Closed | Self::HolderForgotten { .. } => None,
        }
    }

    /// The transfer and the other account of a transfer's movement.
    pub fn transfer(&self) -> Option<(&TransferId, &AccountId)> {
        match self {
            Self::TransferredOut {
                transfer,
                counterparty,
                ..
            }
            | Self::TransferredIn {
                transfer,
                counterparty,
                ..
            }
            | Self::TransferRefunded {
                transfer,
                counterparty,
                ..
            } => Some((transfer, counterparty)),
            _ => None,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenedV2 {
    id: AccountId,
    currency: Currency,
    owner: Option<Owner>,
    holder: Option<Sealed>,
}

/// Every account event type: the first schema version ever stored, the current one.
pub const TYPES: &[(&str, u32, u32)] = &[
    ("AccountOpened", 1, 2),
    ("Deposited", 1, 1),
    ("Withdrawn", 1, 1),
    ("AccountClosed", 1, 1),
    ("HolderForgotten", 1, 1),
    ("TransferredOut", 1, 1),
    ("TransferredIn", 1, 1),
    ("TransferRefunded", 1, 1),
];

/// The upcasters of account events.
pub const STEPS: &[Upcaster] = &[Upcaster {
    event_type: "AccountOpened",
    from: 1,
    to: 2,
    upcast: opened_v1_to_v2,
}];

/// `AccountOpened` v1 → v2: opened before owners and holders were recorded.
fn opened_v1_to_v2(mut data: Value) -> Result<Value, String> {
    let fields = data.as_object_mut().ok_or("not an object")?;
    for field in ["owner", "holder"] {
        if fields.insert(field.to_owned(), Value::Null).is_some() {
            return Err(format!("a v1 payload has no `{field}`"));
        }
    }
    Ok(data)
}

/// The chain of account events, checked: what every function checks at start-up.
pub fn chain() -> Result<Upcasters, ChainError> {
    Upcasters::new(TYPES, STEPS)
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForgottenV1 {
    balance: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MovedV1 {
    amount: i64,
    balance: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferMovedV1 {
    transfer: TransferId,
    counterparty: AccountId,
    amount: i64,
    balance: i64,
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Opened { .. } => "AccountOpened",
            Self::Deposited { .. } => "Deposited",
            Self::Withdrawn { .. } => "Withdrawn",
            Self::Closed => "AccountClosed",
            Self::HolderForgotten { .. } => "HolderForgotten",
            Self::TransferredOut { .. } => "TransferredOut",
            Self::TransferredIn { .. } => "TransferredIn",
            Self::TransferRefunded { .. } => "TransferRefunded",
        }
    }

    fn schema_version(&self) -> u32 {
        match self {
            Self::Opened { .. } => 2,
            _ => 1,
        }
    }

    fn upcasters() -> &'static Upcasters {
        static CHAIN: LazyLock<Upcasters> =
            LazyLock::new(|| chain().expect("the account event chain is checked at start-up"));
        &CHAIN
    }

    fn encode(&self) -> Value {
        match self {
            Self::Opened {
                id,
                currency,
                owner,
                holder,
            } => json!(OpenedV2 {
                id: id.clone(),
                currency: *currency,
                owner: owner.clone(),
                holder: holder.clone(),
            }),
            Self::Deposited { amount, balance } | Self::Withdrawn { amount, balance } => {
                json!(MovedV1 {
                    amount: *amount,
                    balance: *balance
                })
            }
            Self::Closed => json!({}),
            Self::HolderForgotten { balance } => json!(ForgottenV1 { balance: *balance }),
            Self::TransferredOut {
                transfer,
                counterparty,
                amount,
                balance,
            }
            | Self::TransferredIn {
                transfer,
                counterparty,
                amount,
                balance,
            }
            | Self::TransferRefunded {
                transfer,
                counterparty,
                amount,
                balance,
            } => json!(TransferMovedV1 {
                transfer: transfer.clone(),
                counterparty: counterparty.clone(),
                amount: *amount,
                balance: *balance,
            }),
        }
    }

    fn decode(event_type: &str, version: u32, data: Value) -> Result<Self, DecodeError> {
        match (event_type, version) {
            ("AccountOpened", 2) => {
                let p: OpenedV2 = DecodeError::payload(event_type, version, data)?;
                Ok(Self::Opened {
                    id: p.id,
                    currency: p.currency,
                    owner: p.owner,
                    holder: p.holder,
                })
            }
            ("Deposited", 1) => {
                let p: MovedV1 = DecodeError::payload(event_type, version, data)?;
                Ok(Self::Deposited {
                    amount: p.amount,
                    balance: p.balance,
                })
            }
            ("Withdrawn", 1) => {
                let p: MovedV1 = DecodeError::payload(event_type, version, data)?;
                Ok(Self::Withdrawn {
                    amount: p.amount,
                    balance: p.balance,
                })
            }
            ("AccountClosed", 1) => Ok(Self::Closed),
            ("HolderForgotten", 1) => {
                let p: ForgottenV1 = DecodeError::payload(event_type, version, data)?;
                Ok(Self::HolderForgotten { balance: p.balance })
            }
            ("TransferredOut" | "TransferredIn" | "TransferRefunded", 1) => {
                let p: TransferMovedV1 = DecodeError::payload(event_type, version, data)?;
                let (transfer, counterparty, amount, balance) =
                    (p.transfer, p.counterparty, p.amount, p.balance);
                Ok(match event_type {
                    "TransferredOut" => Self::TransferredOut {
                        transfer,
                        counterparty,
                        amount,
                        balance,
                    },
                    "TransferredIn" => Self::TransferredIn {
                        transfer,
                        counterparty,
                        amount,
                        balance,
                    },
                    _ => Self::TransferRefunded {
                        transfer,
                        counterparty,
                        amount,
                        balance,
                    },
                })
            }
            (
                "AccountOpened" | "Deposited" | "Withdrawn" | "AccountClosed" | "HolderForgotten"
                | "TransferredOut" | "TransferredIn" | "TransferRefunded",
                _,
            ) => Err(DecodeError::UnsupportedVersion {
                event_type: event_type.to_owned(),
                version,
            }),
            _ => Err(DecodeError::UnknownType(event_type.to_owned())),
        }
    }
}
