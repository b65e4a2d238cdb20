//! The account's snapshot form (schema `account/3`: `account/1` plus the owner, the id
//! of the holder's key — never the holder's details — and whether they were forgotten). Change
//! the schema name when this form changes: a snapshot of another schema is ignored, the
//! stream is replayed, and the next command past the snapshot interval writes one of
//! the current schema.

use super::{Account, AccountStatus};
use crate::{AccountId, Currency, Owner};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub(super) const SCHEMA: &str = "account/3";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountV3 {
    id: Option<AccountId>,
    status: String,
    currency: Option<Currency>,
    balance: i64,
    owner: Option<Owner>,
    holder_key: Option<String>,
    forgotten: bool,
}

pub(super) fn to_value(account: &Account) -> Value {
    let status = match account.status {
        AccountStatus::NotOpened => "not-opened",
        AccountStatus::Open => "open",
        AccountStatus::Closed => "closed",
    };
    serde_json::to_value(AccountV3 {
        id: account.id.clone(),
        status: status.to_owned(),
        currency: account.currency,
        balance: account.balance,
        owner: account.owner.clone(),
        holder_key: account.holder_key.clone(),
        forgotten: account.forgotten,
    })
    .expect("an account always serializes")
}

pub(super) fn from_value(value: Value) -> Option<Account> {
    let v: AccountV3 = serde_json::from_value(value).ok()?;
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
        owner: v.owner,
        holder_key: v.holder_key,
        forgotten: v.forgotten,
    })
}
