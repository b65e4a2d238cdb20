//! An account's side of a transfer: the debit, the credit, and the refund of a debit
//! whose credit was refused. Each is an ordinary account command; the transfer saga
//! runs it with an idempotency key derived from the transfer and the step.

use super::{Account, AccountError, AccountEvent, AccountStatus};
use crate::{AccountId, Amount, TransferId};

/// The debit: like a withdrawal, from an open account, never below zero.
pub(super) fn debit(
    account: &Account,
    transfer: TransferId,
    to: AccountId,
    amount: Amount,
) -> Result<Vec<AccountEvent>, AccountError> {
    let Some(AccountEvent::Withdrawn { amount, balance }) =
        super::withdraw::decide(account, amount)?.pop()
    else {
        unreachable!("a withdrawal decides one Withdrawn")
    };
    Ok(vec![AccountEvent::TransferredOut {
        transfer,
        counterparty: to,
        amount,
        balance,
    }])
}

/// The credit: like a deposit, into an open account in its currency.
pub(super) fn credit(
    account: &Account,
    transfer: TransferId,
    from: AccountId,
    amount: Amount,
) -> Result<Vec<AccountEvent>, AccountError> {
    let Some(AccountEvent::Deposited { amount, balance }) =
        super::deposit::decide(account, amount)?.pop()
    else {
        unreachable!("a deposit decides one Deposited")
    };
    Ok(vec![AccountEvent::TransferredIn {
        transfer,
        counterparty: from,
        amount,
        balance,
    }])
}

/// The refund of a debit: the money goes back even to an account closed since (a
/// closed account may then hold a balance, and refuses everything else), since it left
/// that account and has nowhere else to go.
pub(super) fn refund(
    account: &Account,
    transfer: TransferId,
    to: AccountId,
    amount: Amount,
) -> Result<Vec<AccountEvent>, AccountError> {
    let currency = match (account.status, account.currency) {
        (AccountStatus::Open | AccountStatus::Closed, Some(c)) => c,
        _ => return Err(AccountError::NotFound),
    };
    if amount.currency() != currency {
        return Err(AccountError::CurrencyMismatch {
            account: currency,
            amount: amount.currency(),
        });
    }
    let balance = account
        .balance
        .checked_add(amount.minor())
        .ok_or(AccountError::BalanceOverflow)?;
    Ok(vec![AccountEvent::TransferRefunded {
        transfer,
        counterparty: to,
        amount: amount.minor(),
        balance,
    }])
}
