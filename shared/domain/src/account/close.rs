//! Closing: only an open account with a zero balance.

use super::{Account, AccountError, AccountEvent};

pub(super) fn decide(account: &Account) -> Result<Vec<AccountEvent>, AccountError> {
    account.open_currency()?;
    if account.balance != 0 {
        return Err(AccountError::BalanceNotZero {
            balance: account.balance_money(),
        });
    }
    Ok(vec![AccountEvent::Closed])
}
