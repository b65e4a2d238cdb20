//! [`KeptKeys`]: a [`KeyStore`] that keeps the keys it read in memory and still uses
//! none once it is destroyed, by this process or any other.
//!
//! Reading a holder's details needs the data key they are sealed under; on S3 that is a
//! GET per `GET /accounts/{id}`, a quarter of the requests a command costs in
//! `make bench`. A key never changes, so it could be kept — but a key kept in one
//! process must not outlive `POST /accounts/{id}/forget` in another: "forgotten" means
//! erased at once, everywhere. So each use of a kept key first reads a shared record of
//! the keys destroyed ([`Revocations`], one Redis round trip instead of an S3 GET):
//!
//! * **A use** reads the record: marked → erased (the store is not asked); otherwise the
//!   kept key is used only if the record's epoch is the one read *before* the key was
//!   fetched from the store, and the key was fetched less than [`KEPT_FOR`] ago;
//!   otherwise the store is asked, and what it holds is kept under that epoch.
//! * **A destroy** marks the key, deletes it from the store, then marks it again.
//! * **The record unreachable**: a use asks the store, as without this layer; a destroy
//!   fails (503, retry) before it deletes anything, so no process can keep using a key
//!   whose destruction the record missed.
//!
//! Why a destroyed key is never used after its destroy returned: take a use after it,
//! of a key kept under epoch `E`. If the record's epoch is still `E`, the record was not
//! lost since the key was kept, before the destroy's second mark — which was therefore
//! made in `E`, and is seen. If the epoch changed, the store is asked, and the key is
//! gone from it. A key kept under `E` from a store read *after* the delete does not
//! exist: that read found nothing.

use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally_es::{KeyStore, Revocations, StoreError};

/// How long a key read from the store is kept (a bound on memory and on trust: the
/// record is read on every use all the same).
pub const KEPT_FOR: Duration = Duration::from_secs(300);

/// How many keys are kept at most.
pub const KEYS_KEPT: usize = 100_000;

struct Kept {
    wrapped: Vec<u8>,
    epoch: String,
    at: Instant,
}

/// `inner`'s keys, kept in memory as long as `revocations` says they may be.
pub struct KeptKeys {
    inner: Arc<dyn KeyStore>,
    revocations: Arc<dyn Revocations>,
    kept: Mutex<LruCache<String, Kept>>,
}

impl KeptKeys {
    /// Keys of `inner`, kept while `revocations` (shared by every process that reads or
    /// destroys them) has no mark for them.
    pub fn new(inner: Arc<dyn KeyStore>, revocations: Arc<dyn Revocations>) -> Self {
        Self {
            inner,
            revocations,
            kept: Mutex::new(LruCache::new(
                NonZeroUsize::new(KEYS_KEPT).expect("not zero"),
            )),
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, LruCache<String, Kept>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl KeyStore for KeptKeys {
    async fn put(&self, id: &str, wrapped: &[u8]) -> Result<(), StoreError> {
        self.inner.put(id, wrapped).await
    }

    async fn get(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let epoch = match self.revocations.check(id).await {
            Ok((_, true)) => {
                self.kept().pop(id);
                return Ok(None);
            }
            Ok((epoch, false)) => epoch,
            Err(e) => {
                // Nothing here can tell whether it was destroyed: the store decides.
                tracing::warn!(error = %e, "the record of destroyed keys is out of reach; reading the key store");
                self.kept().pop(id);
                return self.inner.get(id).await;
            }
        };
        {
            let mut kept = self.kept();
            match kept.get(id) {
                Some(k) if k.epoch == epoch && k.at.elapsed() < KEPT_FOR => {
                    return Ok(Some(k.wrapped.clone()));
                }
                Some(_) => {
                    kept.pop(id);
                }
                None => {}
            }
        }
        let at = Instant::now();
        let wrapped = self.inner.get(id).await?;
        if let Some(w) = &wrapped {
            self.kept().put(
                id.to_owned(),
                Kept {
                    wrapped: w.clone(),
                    epoch,
                    at,
                },
            );
        }
        Ok(wrapped)
    }

    async fn destroy(&self, id: &str) -> Result<(), StoreError> {
        // Marked first: a crash before the delete leaves the key erased for every
        // process that reads the record (a retry deletes it).
        self.revocations.revoke(id).await?;
        self.kept().pop(id);
        self.inner.destroy(id).await?;
        // And again: should the record have been lost since the first mark, this one
        // is in the epoch every later use reads (see the module's argument). If this
        // mark fails the destroy answers an error although the key is gone: the promise
        // is for a destroy that returned, and the client's retry marks again.
        self.revocations.revoke(id).await
    }
}

/// The record of destroyed keys in memory, shared by the [`KeptKeys`] of one test's
/// "processes"; [`MemoryRevocations::lose`] loses it, as a Redis restarting empty does.
#[derive(Default)]
pub struct MemoryRevocations {
    record: Mutex<Option<(String, std::collections::HashSet<String>)>>,
    /// While set, every call fails (the record out of reach).
    pub down: std::sync::atomic::AtomicBool,
}

impl MemoryRevocations {
    /// Lose the record: its epoch and marks go; the next use begins another.
    pub fn lose(&self) {
        *self.record.lock().expect("record") = None;
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut (String, std::collections::HashSet<String>)) -> T,
    ) -> Result<T, StoreError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Unavailable("the record is down".into()));
        }
        let mut record = self.record.lock().expect("record");
        let record =
            record.get_or_insert_with(|| (crate::hex(&crate::random::<16>()), Default::default()));
        Ok(f(record))
    }
}

#[async_trait::async_trait]
impl Revocations for MemoryRevocations {
    async fn check(&self, key_id: &str) -> Result<(String, bool), StoreError> {
        self.with(|(epoch, marks)| (epoch.clone(), marks.contains(key_id)))
    }

    async fn revoke(&self, key_id: &str) -> Result<(), StoreError> {
        self.with(|(_, marks)| {
            marks.insert(key_id.to_owned());
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryKeyStore;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A key store that counts its reads; and, once asked to, makes a destroy slow in
    /// the worst way: between the destroy's first mark and its delete, the record is
    /// lost and another process reads the record and the key (what it read is kept in
    /// `read_during_destroy`, for the test to keep it as that process would).
    #[derive(Default)]
    struct Counted {
        keys: MemoryKeyStore,
        reads: AtomicUsize,
        lose_during_destroy: Mutex<Option<Arc<MemoryRevocations>>>,
        read_during_destroy: Mutex<Option<(String, Vec<u8>)>>,
        /// Once set, the next read is slow in the worst way: another process's whole
        /// destroy of the key runs after the read found it, and then the record is lost.
        destroy_during_get: Mutex<Option<Arc<MemoryRevocations>>>,
    }

    #[async_trait::async_trait]
    impl KeyStore for Counted {
        async fn put(&self, id: &str, wrapped: &[u8]) -> Result<(), StoreError> {
            self.keys.put(id, wrapped).await
        }
        async fn get(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let found = self.keys.get(id).await;
            let record = self.destroy_during_get.lock().unwrap().take();
            if let Some(record) = record {
                record.revoke(id).await?;
                self.keys.destroy(id).await?;
                record.revoke(id).await?;
                record.lose();
            }
            found
        }
        async fn destroy(&self, id: &str) -> Result<(), StoreError> {
            let record = self.lose_during_destroy.lock().unwrap().take();
            if let Some(record) = record {
                record.lose();
                let (epoch, marked) = record.check(id).await?;
                assert!(!marked, "the first mark went with the record");
                let wrapped = self.keys.get(id).await?.expect("not deleted yet");
                *self.read_during_destroy.lock().unwrap() = Some((epoch, wrapped));
            }
            self.keys.destroy(id).await
        }
    }

    /// Two processes' kept keys over one store and one record.
    fn two() -> (Arc<Counted>, Arc<MemoryRevocations>, KeptKeys, KeptKeys) {
        let store = Arc::new(Counted::default());
        let record = Arc::new(MemoryRevocations::default());
        let process = || KeptKeys::new(store.clone(), record.clone());
        (store.clone(), record.clone(), process(), process())
    }

    #[tokio::test]
    async fn a_key_is_read_from_the_store_once_and_then_kept() {
        let (store, _, a, _) = two();
        a.put("k-1", b"wrapped").await.unwrap();
        for _ in 0..5 {
            assert_eq!(
                a.get("k-1").await.unwrap().as_deref(),
                Some(&b"wrapped"[..])
            );
        }
        assert_eq!(store.reads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_key_destroyed_by_another_process_is_erased_here_at_once() {
        let (store, _, a, b) = two();
        a.put("k-1", b"wrapped").await.unwrap();
        assert!(a.get("k-1").await.unwrap().is_some());
        assert!(b.get("k-1").await.unwrap().is_some());
        b.destroy("k-1").await.unwrap();
        assert_eq!(a.get("k-1").await.unwrap(), None, "a kept key is not used");
        assert_eq!(store.keys.get("k-1").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_record_lost_after_a_destroy_sends_every_use_to_the_store() {
        let (store, record, a, b) = two();
        a.put("k-1", b"wrapped").await.unwrap();
        a.put("k-2", b"other").await.unwrap();
        assert!(a.get("k-1").await.unwrap().is_some());
        assert!(a.get("k-2").await.unwrap().is_some());
        b.destroy("k-1").await.unwrap();
        record.lose();
        let reads = store.reads.load(Ordering::SeqCst);
        assert_eq!(
            a.get("k-1").await.unwrap(),
            None,
            "the mark is lost; the store says"
        );
        assert!(a.get("k-2").await.unwrap().is_some());
        assert_eq!(
            store.reads.load(Ordering::SeqCst),
            reads + 2,
            "a new epoch trusts nothing kept"
        );
    }

    #[tokio::test]
    async fn a_key_read_while_it_is_destroyed_is_not_used_after_the_destroy() {
        // The record is lost just after the destroy's first mark; a use begins the new
        // epoch, finds no mark, and reads the key before the delete, keeping it under
        // the new epoch. Only the destroy's second mark stops its next use.
        let (store, record, a, b) = two();
        a.put("k-1", b"wrapped").await.unwrap();
        *store.lose_during_destroy.lock().unwrap() = Some(record.clone());
        b.destroy("k-1").await.unwrap();
        let (epoch, wrapped) = store.read_during_destroy.lock().unwrap().take().unwrap();
        a.kept().put(
            "k-1".into(),
            Kept {
                wrapped,
                epoch,
                at: Instant::now(),
            },
        );
        assert_eq!(a.get("k-1").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_key_is_kept_under_the_epoch_read_before_it_was_fetched() {
        // The read finds the key; before it is kept, another process destroys it and
        // the record is lost. Kept under the epoch of a reading after the fetch (the new
        // one, with no mark), it would be used; under the one before, it is not.
        let (store, record, a, _) = two();
        a.put("k-1", b"wrapped").await.unwrap();
        *store.destroy_during_get.lock().unwrap() = Some(record.clone());
        assert!(
            a.get("k-1").await.unwrap().is_some(),
            "found before the destroy"
        );
        assert_eq!(a.get("k-1").await.unwrap(), None);
    }

    #[tokio::test]
    async fn with_the_record_out_of_reach_uses_ask_the_store_and_destroys_change_nothing() {
        let (store, record, a, _) = two();
        a.put("k-1", b"wrapped").await.unwrap();
        assert!(a.get("k-1").await.unwrap().is_some());
        record.down.store(true, Ordering::SeqCst);
        let reads = store.reads.load(Ordering::SeqCst);
        assert!(a.get("k-1").await.unwrap().is_some());
        assert!(a.get("k-1").await.unwrap().is_some());
        assert_eq!(store.reads.load(Ordering::SeqCst), reads + 2);
        assert!(matches!(
            a.destroy("k-1").await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(
            store.keys.get("k-1").await.unwrap().is_some(),
            "nothing deleted"
        );
        record.down.store(false, Ordering::SeqCst);
        a.destroy("k-1").await.unwrap();
        assert_eq!(a.get("k-1").await.unwrap(), None);
    }
}
