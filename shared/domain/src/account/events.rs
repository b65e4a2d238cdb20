//! Account events and their stored schema.
//!
//! | type             | version | payload                                  |
//! | ---------------- | ------- | ---------------------------------------- |
//! | `AccountOpened`  | 1       | `{"id": "...", "currency": "USD"}`       |
//! | `Deposited`      | 1       | `{"amount": 50000, "balance": 50000}`    |
//! | `Withdrawn`      | 1       | `{"amount": 15000, "balance": 35000}`    |
//! | `AccountClosed`  | 1       | `{}`                                     |
//! | `TransferredOut`, `TransferredIn`, `TransferRefunded` | 1 | `{"transfer": "…", "counterparty": "b", "amount": 2500, "balance": 7500}` |
//!
//! A transfer's movements name the transfer and the other account: the debited
//! account's counterparty is the credited one, and the other way round; a refund's is
//! the account that refused the credit.
//! Amounts and balances are integer minor units of the account's currency. Each event
//! carries the balance after it, so projections stay dumb. A new schema version adds an
//! arm to [`AccountEvent::decode`] that upcasts the old payload, and a fixture of the old
//! version under `tests/fixtures/` that stays forever.

use crate::{AccountId, Currency, TransferId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tally_es::{DecodeError, DomainEvent};

/// Something that happened to an account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccountEvent {
    Opened {
        id: AccountId,
        currency: Currency,
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
            Self::Opened { .. } | Self::Closed => None,
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
struct OpenedV1 {
    id: AccountId,
    currency: Currency,
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
            Self::TransferredOut { .. } => "TransferredOut",
            Self::TransferredIn { .. } => "TransferredIn",
            Self::TransferRefunded { .. } => "TransferRefunded",
        }
    }

    fn schema_version(&self) -> u32 {
        1
    }

    fn encode(&self) -> Value {
        match self {
            Self::Opened { id, currency } => json!(OpenedV1 {
                id: id.clone(),
                currency: *currency
            }),
            Self::Deposited { amount, balance } | Self::Withdrawn { amount, balance } => {
                json!(MovedV1 {
                    amount: *amount,
                    balance: *balance
                })
            }
            Self::Closed => json!({}),
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
            ("AccountOpened", 1) => {
                let p: OpenedV1 = DecodeError::payload(event_type, version, data)?;
                Ok(Self::Opened {
                    id: p.id,
                    currency: p.currency,
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
                "AccountOpened" | "Deposited" | "Withdrawn" | "AccountClosed" | "TransferredOut"
                | "TransferredIn" | "TransferRefunded",
                _,
            ) => Err(DecodeError::UnsupportedVersion {
                event_type: event_type.to_owned(),
                version,
            }),
            _ => Err(DecodeError::UnknownType(event_type.to_owned())),
        }
    }
}
