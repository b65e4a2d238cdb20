//! The account's snapshot form (schema `account/1`). Change the schema name when this
//! form changes: snapshots of another schema are ignored and the stream is replayed.

use super::{Account, AccountStatus};
use crate::{AccountId, Currency};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub(super) const SCHEMA: &str = "account/1";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountV1 {
    id: Option<AccountId>,
    status: String,
    currency: Option<Currency>,
    balance: i64,
}

pub(super) fn to_value(account: &Account) -> Value {
    let status = match account.status {
        AccountStatus::NotOpened => "not-opened",
        AccountStatus::Open => "open",
        AccountStatus::Closed => "closed",
    };
    serde_json::to_value(AccountV1 {
        id: account.id.clone(),
        status: status.to_owned(),
        currency: account.currency,
        balance: account.balance,
    })
    .expect("an account always serializes")
}

pub(super) fn from_value(value: Value) -> Option<Account> {
    let v: AccountV1 = serde_json::from_value(value).ok()?;
    let status = match v.status.as_str() {
        "not-opened" => AccountStatus::NotOpened,
        "open" => AccountStatus::Open,
        "closed" => AccountStatus::Closed,
        _ => return None,
    };
    (v.balance >= 0).then_some(Account {
        id: v.id,
        status,
        currency: v.currency,
        balance: v.balance,
    })
}
