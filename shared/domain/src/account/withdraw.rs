//! Withdrawing: from an open account, never below zero.

use super::{Account, AccountError, AccountEvent};
use crate::Amount;

pub(super) fn decide(account: &Account, amount: Amount) -> Result<Vec<AccountEvent>, AccountError> {
    account.accept(&amount)?;
    if amount.minor() > account.balance {
        return Err(AccountError::InsufficientFunds {
            balance: account.balance_money(),
            requested: amount.money(),
        });
    }
    Ok(vec![AccountEvent::Withdrawn {
        amount: amount.minor(),
        balance: account.balance - amount.minor(),
    }])
}
