//! The read model in memory.

use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Mutex;
use tally_app::{AccountView, Applied, ReadModel, ReadModelError, RebuildBegun, TransactionView};
use tally_domain::{AccountEvent, AccountId};
use tally_es::{Commit, Revision};

#[derive(Clone)]
struct Entry {
    view: AccountView,
    transactions: Vec<TransactionView>,
}

type Accounts = HashMap<AccountId, Entry>;

/// Accounts and their transactions, applied commit by commit under one lock. A rebuild
/// fills a second generation (`next`) while readers and the live projector go on with
/// the first; [`ReadModel::finish_rebuild`] swaps them under the lock.
#[derive(Default)]
pub struct MemoryReadModel {
    accounts: Mutex<Accounts>,
    next: Mutex<Option<Accounts>>,
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
        let mut accounts = self.accounts.lock().map_err(poisoned)?;
        apply_to(&mut accounts, commit)
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

    async fn begin_rebuild(&self) -> Result<RebuildBegun, ReadModelError> {
        let mut next = self.next.lock().map_err(poisoned)?;
        if next.is_some() {
            return Ok(RebuildBegun::AnotherRunning);
        }
        *next = Some(Accounts::new());
        Ok(RebuildBegun::Started)
    }

    async fn apply_runs_rebuilding(
        &self,
        runs: &[&[Commit<AccountEvent>]],
    ) -> Result<Vec<Applied>, ReadModelError> {
        let mut next = self.next.lock().map_err(poisoned)?;
        let next = next
            .as_mut()
            .ok_or_else(|| ReadModelError("no rebuild in progress".into()))?;
        let mut outcomes = Vec::with_capacity(runs.len());
        for run in runs {
            let mut outcome = Applied::Duplicate;
            for commit in run.iter() {
                match apply_to(next, commit)? {
                    Applied::Applied => outcome = Applied::Applied,
                    Applied::Duplicate => {}
                    gap @ Applied::Gap { .. } => {
                        if outcome == Applied::Duplicate {
                            outcome = gap;
                        }
                        break;
                    }
                }
            }
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// Under the live lock: every account the live generation holds past the rebuilt one
    /// (the live projector went on during the rebuild) takes its newer rows from it;
    /// then the rebuilt generation is the live one.
    async fn finish_rebuild(&self) -> Result<(), ReadModelError> {
        let mut live = self.accounts.lock().map_err(poisoned)?;
        let mut next = self
            .next
            .lock()
            .map_err(poisoned)?
            .take()
            .ok_or_else(|| ReadModelError("no rebuild in progress".into()))?;
        for (id, current) in live.iter() {
            match next.get_mut(id) {
                None => {
                    next.insert(id.clone(), current.clone());
                }
                Some(rebuilt) if rebuilt.view.revision < current.view.revision => {
                    let after = rebuilt.view.revision;
                    rebuilt.view = current.view.clone();
                    rebuilt.transactions.extend(
                        current
                            .transactions
                            .iter()
                            .filter(|t| t.revision > after)
                            .cloned(),
                    );
                }
                Some(_) => {}
            }
        }
        *live = next;
        Ok(())
    }

    async fn abandon_rebuild(&self) -> Result<(), ReadModelError> {
        *self.next.lock().map_err(poisoned)? = None;
        Ok(())
    }

    async fn ready(&self) -> Result<(), ReadModelError> {
        self.accounts.lock().map_err(poisoned).map(|_| ())
    }
}

/// Apply one commit to `accounts` if it is the next of its stream.
fn apply_to(
    accounts: &mut Accounts,
    commit: &Commit<AccountEvent>,
) -> Result<Applied, ReadModelError> {
    let Some(id) = AccountId::of_stream(&commit.stream) else {
        return Ok(Applied::Duplicate);
    };
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
            Some(AccountEvent::Opened {
                currency, owner, ..
            }) => Entry {
                view: AccountView {
                    id: id.clone(),
                    currency: *currency,
                    balance: 0,
                    closed: false,
                    revision: Revision::ZERO,
                    opened_at: commit.recorded_at,
                    updated_at: commit.recorded_at,
                    owner: owner.clone(),
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
        if matches!(event, AccountEvent::Closed) {
            entry.view.closed = true;
        }
        if let Some(movement) = TransactionView::of_event(revision, event, commit.recorded_at) {
            entry.view.balance = movement.balance;
            entry.transactions.push(movement);
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
