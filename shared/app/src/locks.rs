//! Per-stream async locks: a fast path that keeps writers in one process from racing
//! each other. They are an optimisation only — the store's conditional create is what
//! decides between writers in different processes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use tally_es::StreamId;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

#[derive(Default)]
pub(crate) struct StreamLocks {
    locks: Mutex<HashMap<StreamId, Weak<AsyncMutex<()>>>>,
}

impl StreamLocks {
    pub(crate) async fn lock(&self, stream: &StreamId) -> OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.locks.lock().expect("lock map poisoned");
            if map.len() > 4096 {
                map.retain(|_, weak| weak.strong_count() > 0);
            }
            match map.get(stream).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(AsyncMutex::new(()));
                    map.insert(stream.clone(), Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }
}
