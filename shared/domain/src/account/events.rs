//! Account events and their stored schema.
//!
//! | type             | version | payload                                  |
//! | ---------------- | ------- | ---------------------------------------- |
//! | `AccountOpened`  | 1       | `{"id": "...", "currency": "USD"}`       |
//! | `Deposited`      | 1       | `{"amount": 50000, "balance": 50000}`    |
//! | `Withdrawn`      | 1       | `{"amount": 15000, "balance": 35000}`    |
//! | `AccountClosed`  | 1       | `{}`                                     |
//!
//! Amounts and balances are integer minor units of the account's currency. Each event
//! carries the balance after it, so projections stay dumb. A new schema version adds an
//! arm to [`AccountEvent::decode`] that upcasts the old payload, and a fixture of the old
//! version under `tests/fixtures/` that stays forever.

use crate::{AccountId, Currency};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{json, Value};
use tally_es::{DecodeError, DomainEvent};

/// Something that happened to an account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccountEvent {
    Opened { id: AccountId, currency: Currency },
    Deposited { amount: i64, balance: i64 },
    Withdrawn { amount: i64, balance: i64 },
    Closed,
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

fn payload<T: DeserializeOwned>(
    event_type: &str,
    version: u32,
    data: Value,
) -> Result<T, DecodeError> {
    serde_json::from_value(data).map_err(|e| DecodeError::Malformed {
        event_type: event_type.to_owned(),
        version,
        reason: e.to_string(),
    })
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Opened { .. } => "AccountOpened",
            Self::Deposited { .. } => "Deposited",
            Self::Withdrawn { .. } => "Withdrawn",
            Self::Closed => "AccountClosed",
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
        }
    }

    fn decode(event_type: &str, version: u32, data: Value) -> Result<Self, DecodeError> {
        match (event_type, version) {
            ("AccountOpened", 1) => {
                let p: OpenedV1 = payload(event_type, version, data)?;
                Ok(Self::Opened {
                    id: p.id,
                    currency: p.currency,
                })
            }
            ("Deposited", 1) => {
                let p: MovedV1 = payload(event_type, version, data)?;
                Ok(Self::Deposited {
                    amount: p.amount,
                    balance: p.balance,
                })
            }
            ("Withdrawn", 1) => {
                let p: MovedV1 = payload(event_type, version, data)?;
                Ok(Self::Withdrawn {
                    amount: p.amount,
                    balance: p.balance,
                })
            }
            ("AccountClosed", 1) => Ok(Self::Closed),
            ("AccountOpened" | "Deposited" | "Withdrawn" | "AccountClosed", _) => {
                Err(DecodeError::UnsupportedVersion {
                    event_type: event_type.to_owned(),
                    version,
                })
            }
            _ => Err(DecodeError::UnknownType(event_type.to_owned())),
        }
    }
}
