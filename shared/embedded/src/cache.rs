//! The balance cache in memory.

use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Mutex;
use tally_app::{Cache, CachedBalance, FillToken, Lookup};
use tally_domain::AccountId;

/// Balances by account, never replaced by an older revision.
#[derive(Default)]
pub struct MemoryCache {
    entries: Mutex<HashMap<AccountId, CachedBalance>>,
}

#[async_trait]
impl Cache for MemoryCache {
    async fn lookup(&self, id: &AccountId) -> Lookup {
        Lookup {
            hit: self.entries.lock().ok().and_then(|e| e.get(id).copied()),
            // It lives as long as the process that reads it: it never loses entries
            // behind a reader's back, so any fill may go in.
            token: FillToken(Some(String::new())),
        }
    }

    async fn fill(&self, id: &AccountId, balance: CachedBalance, _token: FillToken) {
        self.put(id, balance).await
    }

    async fn put(&self, id: &AccountId, balance: CachedBalance) {
        if let Ok(mut entries) = self.entries.lock() {
            let entry = entries.entry(id.clone()).or_insert(balance);
            if entry.revision < balance.revision {
                *entry = balance;
            }
        }
    }

    async fn refresh(&self, id: &AccountId, balance: CachedBalance) {
        if let Ok(mut entries) = self.entries.lock() {
            if let Some(entry) = entries.get_mut(id) {
                if entry.revision < balance.revision {
                    *entry = balance;
                }
            }
        }
    }

    async fn clear(&self) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.clear();
        }
    }
}
