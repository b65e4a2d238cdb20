//! Depositing: into an open account, in its currency; the event carries the new balance.

use super::{Account, AccountError, AccountEvent};
use crate::Amount;

pub(super) fn decide(account: &Account, amount: Amount) -> Result<Vec<AccountEvent>, AccountError> {
    account.accept(&amount)?;
    let balance = account
        .balance
        .checked_add(amount.minor())
        .ok_or(AccountError::BalanceOverflow)?;
    Ok(vec![AccountEvent::Deposited {
        amount: amount.minor(),
        balance,
    }])
}
