//! The read model in memory.

use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Mutex;
use tally_app::{
    AccountView, Applied, ReadModel, ReadModelError, TransactionKind, TransactionView,
};
use tally_domain::{AccountEvent, AccountId};
use tally_es::{Commit, Revision};

struct Entry {
    view: AccountView,
    transactions: Vec<TransactionView>,
}

/// Accounts and their transactions, applied commit by commit under one lock.
#[derive(Default)]
pub struct MemoryReadModel {
    accounts: Mutex<HashMap<AccountId, Entry>>,
}

fn poisoned<T>(_: T) -> ReadModelError {
    ReadModelError("read model lock poisoned".into())
}

#[async_trait]
impl ReadModel for MemoryReadModel {
    async fn position(&self, id: &AccountId) -> Result<Revision, ReadModelError> {
        let accounts = self.accounts.lock().map_err(poisoned)?;
        Ok(accounts.get(id).map_or(Revision::ZERO, |e| e.view.revision))
    }

    async fn apply(&self, commit: &Commit<AccountEvent>) -> Result<Applied, ReadModelError> {
        let id = AccountId::from(commit.stream.clone());
        let mut accounts = self.accounts.lock().map_err(poisoned)?;
        let position = accounts
            .get(&id)
            .map_or(Revision::ZERO, |e| e.view.revision);
        if commit.last_revision() <= position {
            return Ok(Applied::Duplicate);
        }
        if commit.revision != position.next() {
            return Ok(Applied::Gap {
                expected: position.next(),
            });
        }
        // Build the new entry aside, then swap it in: all of the commit or none of it.
        let mut entry = match accounts.get(&id) {
            Some(e) => Entry {
                view: e.view.clone(),
                transactions: Vec::new(),
            },
            None => match commit.events.first() {
                Some(AccountEvent::Opened { currency, .. }) => Entry {
                    view: AccountView {
                        id: id.clone(),
                        currency: *currency,
                        balance: 0,
                        closed: false,
                        revision: Revision::ZERO,
                        opened_at: commit.recorded_at,
                        updated_at: commit.recorded_at,
                    },
                    transactions: Vec::new(),
                },
                other => {
                    return Err(ReadModelError(format!(
                        "stream {id} does not start with AccountOpened: {other:?}"
                    )))
                }
            },
        };
        for (revision, event) in commit.numbered() {
            let kind = match event {
                AccountEvent::Opened { .. } => None,
                AccountEvent::Deposited { amount, balance } => {
                    Some((TransactionKind::Deposit, amount, balance))
                }
                AccountEvent::Withdrawn { amount, balance } => {
                    Some((TransactionKind::Withdrawal, amount, balance))
                }
                AccountEvent::Closed => {
                    entry.view.closed = true;
                    None
                }
            };
            if let Some((kind, amount, balance)) = kind {
                entry.view.balance = *balance;
                entry.transactions.push(TransactionView {
                    revision,
                    kind,
                    amount: *amount,
                    balance: *balance,
                    recorded_at: commit.recorded_at,
                });
            }
            entry.view.revision = revision;
        }
        entry.view.updated_at = commit.recorded_at;
        match accounts.get_mut(&id) {
            Some(existing) => {
                existing.view = entry.view;
                existing.transactions.append(&mut entry.transactions);
            }
            None => {
                accounts.insert(id, entry);
            }
        }
        Ok(Applied::Applied)
    }

    async fn account(&self, id: &AccountId) -> Result<Option<AccountView>, ReadModelError> {
        let accounts = self.accounts.lock().map_err(poisoned)?;
        Ok(accounts.get(id).map(|e| e.view.clone()))
    }

    async fn transactions(
        &self,
        id: &AccountId,
        after: Revision,
        limit: usize,
    ) -> Result<Vec<TransactionView>, ReadModelError> {
        let accounts = self.accounts.lock().map_err(poisoned)?;
        let Some(entry) = accounts.get(id) else {
            return Ok(Vec::new());
        };
        let start = entry.transactions.partition_point(|t| t.revision <= after);
        Ok(entry.transactions[start..]
            .iter()
            .take(limit)
            .cloned()
            .collect())
    }

    async fn clear(&self) -> Result<(), ReadModelError> {
        self.accounts.lock().map_err(poisoned)?.clear();
        Ok(())
    }

    async fn ready(&self) -> Result<(), ReadModelError> {
        self.accounts.lock().map_err(poisoned).map(|_| ())
    }
}
