//! The Account aggregate. `handle` dispatches each command to the file named after it;
//! `apply` is the one place state changes.

mod close;
mod deposit;
mod events;
mod open;
mod snapshot;
mod transfer;
mod withdraw;

pub use events::{chain as event_chain, AccountEvent};

use crate::{AccountId, Amount, Caller, Currency, Money, Owner, TransferId};
use tally_es::{Aggregate, Sealed};

/// Where an account is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AccountStatus {
    /// No event yet: the stream is empty.
    #[default]
    NotOpened,
    Open,
    Closed,
}

/// The state of one account, folded from its events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Account {
    pub id: Option<AccountId>,
    pub status: AccountStatus,
    pub currency: Option<Currency>,
    /// Balance in minor units; never negative.
    pub balance: i64,
    /// The subject that opened it (`None`: opened before owners were recorded).
    pub owner: Option<Owner>,
    /// The id of the key the holder's details are sealed under, if any were given.
    pub holder_key: Option<String>,
    /// The holder's personal data was forgotten (`HolderForgotten`).
    pub forgotten: bool,
}

/// What a client can ask of an account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccountCommand {
    /// Open the account for `owner` (the caller's subject; `None` with authentication
    /// off).
    Open {
        id: AccountId,
        currency: Currency,
        owner: Option<Owner>,
        /// The holder's details, sealed under their own key before they get here.
        holder: Option<Sealed>,
    },
    Deposit {
        amount: Amount,
    },
    Withdraw {
        amount: Amount,
    },
    Close,
    /// Forget the holder's personal data (its key is destroyed by the caller first).
    ForgetHolder,
    /// A transfer's debit of this account, for `to`.
    TransferOut {
        transfer: TransferId,
        to: AccountId,
        amount: Amount,
    },
    /// A transfer's credit of this account, from `from`.
    TransferIn {
        transfer: TransferId,
        from: AccountId,
        amount: Amount,
    },
    /// The refund of a transfer's debit whose credit `to` refused.
    Refund {
        transfer: TransferId,
        to: AccountId,
        amount: Amount,
    },
}

/// Why a command was refused. Each variant names the HTTP answer the API gives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// 409: the stream already has events.
    #[error("account already exists")]
    AlreadyOpen,
    /// 404: nothing was ever stored for this id.
    #[error("account not found")]
    NotFound,
    /// 409: closed accounts accept no more commands.
    #[error("account is closed")]
    Closed,
    /// 422: a withdrawal larger than the balance.
    #[error("insufficient funds: balance {balance}, requested {requested}")]
    InsufficientFunds { balance: Money, requested: Money },
    /// 409: only an account at zero can be closed.
    #[error("the balance is {balance}; only an account with a zero balance can be closed")]
    BalanceNotZero { balance: Money },
    /// 422: the amount is in another currency than the account.
    #[error("the account holds {account}, the amount is in {amount}")]
    CurrencyMismatch { account: Currency, amount: Currency },
    /// 422: the balance would exceed what the account can hold.
    #[error("the balance would exceed the largest representable amount")]
    BalanceOverflow,
    /// 409: the holder's personal data was already forgotten.
    #[error("the holder's personal data was already forgotten")]
    AlreadyForgotten,
}

impl Account {
    /// Whether `caller` may send `command` to this account. A caller that does not
    /// reach an opened account is told it does not exist (404), exactly as if it did
    /// not: ids are not probeable. Opening is the exception: the id is the client's
    /// choice, so an id in use is a conflict (409) whoever asks.
    pub fn admits(&self, caller: &Caller, command: &AccountCommand) -> Result<(), AccountError> {
        let opening = matches!(command, AccountCommand::Open { .. });
        if opening || self.reaches(caller) {
            Ok(())
        } else {
            Err(AccountError::NotFound)
        }
    }

    /// Whether `caller` may see or act on this account (one that was never opened is
    /// nobody's, and reads as not found anyway).
    pub fn reaches(&self, caller: &Caller) -> bool {
        self.status == AccountStatus::NotOpened || caller.reaches(self.owner.as_ref())
    }

    /// The balance as money (zero in USD before the account is opened).
    pub fn balance_money(&self) -> Money {
        Money {
            minor: self.balance,
            currency: self.currency.unwrap_or(Currency::USD),
        }
    }

    /// The currency of an open account, or the reason commands are refused.
    fn open_currency(&self) -> Result<Currency, AccountError> {
        match (self.status, self.currency) {
            (AccountStatus::Open, Some(c)) => Ok(c),
            (AccountStatus::Closed, _) => Err(AccountError::Closed),
            _ => Err(AccountError::NotFound),
        }
    }

    /// Check that `amount` may touch this open account; returns the account's currency.
    fn accept(&self, amount: &Amount) -> Result<Currency, AccountError> {
        let currency = self.open_currency()?;
        if amount.currency() != currency {
            return Err(AccountError::CurrencyMismatch {
                account: currency,
                amount: amount.currency(),
            });
        }
        Ok(currency)
    }
}

impl Aggregate for Account {
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;

    const SNAPSHOT_SCHEMA: Option<&'static str> = Some(snapshot::SCHEMA);

    fn to_snapshot(&self) -> Option<serde_json::Value> {
        Some(snapshot::to_value(self))
    }

    fn from_snapshot(value: serde_json::Value) -> Option<Self> {
        snapshot::from_value(value)
    }

    fn handle(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Open {
                id,
                currency,
                owner,
                holder,
            } => open::decide(self, id, currency, owner, holder),
            AccountCommand::ForgetHolder => {
                // Open or closed: a closed account's holder may be forgotten too.
                if self.status == AccountStatus::NotOpened {
                    Err(AccountError::NotFound)
                } else if self.forgotten {
                    Err(AccountError::AlreadyForgotten)
                } else {
                    Ok(vec![AccountEvent::HolderForgotten {
                        balance: self.balance,
                    }])
                }
            }
            AccountCommand::Deposit { amount } => deposit::decide(self, amount),
            AccountCommand::Withdraw { amount } => withdraw::decide(self, amount),
            AccountCommand::Close => close::decide(self),
            AccountCommand::TransferOut {
                transfer,
                to,
                amount,
            } => transfer::debit(self, transfer, to, amount),
            AccountCommand::TransferIn {
                transfer,
                from,
                amount,
            } => transfer::credit(self, transfer, from, amount),
            AccountCommand::Refund {
                transfer,
                to,
                amount,
            } => transfer::refund(self, transfer, to, amount),
        }
    }

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened {
                id,
                currency,
                owner,
                holder,
            } => {
                self.id = Some(id.clone());
                self.owner = owner.clone();
                self.holder_key = holder.as_ref().map(|h| h.key.clone());
                self.currency = Some(*currency);
                self.status = AccountStatus::Open;
                self.balance = 0;
            }
            AccountEvent::Deposited { balance, .. }
            | AccountEvent::Withdrawn { balance, .. }
            | AccountEvent::TransferredOut { balance, .. }
            | AccountEvent::TransferredIn { balance, .. }
            | AccountEvent::TransferRefunded { balance, .. } => {
                self.balance = *balance;
            }
            AccountEvent::Closed => self.status = AccountStatus::Closed,
            AccountEvent::HolderForgotten { .. } => self.forgotten = true,
        }
    }
}
